//! The engine's view of a storage-node connection.
//!
//! The engine needs two things from a connection: to send a request *now*
//! (so that requests leave in the order the engine issued them) and to await
//! its reply later. [`NodeLink::start`] is therefore synchronous and returns
//! the reply as a future. The real implementation is the storage node's
//! pipelined `slate_dataplane::client::NodeClient`; tests can put a seeded fake
//! behind the same trait to lose, corrupt or fence requests deterministically.

use slate_protocol::{NodeId, Reply, Request, SignedCapability, WireError};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

/// A boxed, sendable future.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// Why a request got no usable reply.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LinkError {
    /// The connection is gone or could not be made.
    #[error("connection: {0}")]
    Closed(String),
    /// The node sent something that does not parse or does not fit the request.
    #[error("protocol: {0}")]
    Protocol(String),
    /// No reply within the request timeout.
    #[error("timed out")]
    Timeout,
    /// The node answered with an error.
    #[error("node refused: {0}")]
    Remote(WireError),
}

/// One session with one storage node.
pub trait NodeLink: Send + Sync + std::fmt::Debug + 'static {
    /// The node this session talks to.
    fn node(&self) -> NodeId;
    /// Sends `req` before returning (requests leave in call order) and returns its reply.
    /// An error reply may come back either as `Ok(Reply::Error)` or as `Err(LinkError::Remote)`.
    fn start(&self, req: &Request) -> BoxFuture<Result<Reply, LinkError>>;

    /// Sends `req` before returning, like [`NodeLink::start`], and calls `on_reply` with
    /// its outcome, or with [`LinkError::Timeout`] once `timeout` has passed without one.
    /// `on_reply` may run on any task and must not block. The default spawns a task to
    /// wait; a real connection calls it from its reader, with no task or timer per request.
    fn start_with(&self, req: &Request, timeout: Duration, on_reply: OnReply) {
        let fut = self.start(req);
        tokio::spawn(async move {
            on_reply(tokio::time::timeout(timeout, fut).await.unwrap_or(Err(LinkError::Timeout)));
        });
    }
}

/// Receives one request's outcome (see [`NodeLink::start_with`]).
pub type OnReply = Box<dyn FnOnce(Result<Reply, LinkError>) + Send>;

/// Opens sessions.
pub trait Connector: Send + Sync + std::fmt::Debug + 'static {
    /// Connects to `node` at `addr` and opens a session with `capability`.
    fn connect(
        &self,
        node: NodeId,
        addr: &str,
        capability: &SignedCapability,
    ) -> BoxFuture<Result<Arc<dyn NodeLink>, LinkError>>;
}
