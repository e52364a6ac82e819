//! The engine's link traits over the storage node's own client,
//! `slate_dataplane::client::NodeClient` (one pipelined TLS session per node;
//! `start` enqueues the frame before returning, so requests leave in the
//! order the engine issued them).

use super::link::{BoxFuture, Connector, LinkError, NodeLink, OnReply};
use slate_dataplane::client::{ClientError, NodeClient};
use slate_protocol::{NodeId, Reply, Request, SignedCapability};
use std::sync::Arc;
use std::time::Duration;

fn link_error(e: ClientError) -> LinkError {
    match e {
        ClientError::Remote(w) => LinkError::Remote(w),
        ClientError::Closed(s) => LinkError::Closed(s),
        ClientError::Connect { addr, detail } => LinkError::Closed(format!("connect to {addr}: {detail}")),
        ClientError::Protocol(s) => LinkError::Protocol(s),
        ClientError::Timeout => LinkError::Timeout,
    }
}

/// A `NodeClient` session as a [`NodeLink`].
#[derive(Debug, Clone)]
pub struct NodeClientLink {
    client: NodeClient,
}

impl NodeClientLink {
    pub fn new(client: NodeClient) -> Self {
        Self { client }
    }
}

impl NodeLink for NodeClientLink {
    fn node(&self) -> NodeId {
        self.client.node()
    }

    fn start(&self, req: &Request) -> BoxFuture<Result<Reply, LinkError>> {
        let fut = self.client.start(req);
        Box::pin(async move { fut.await.map_err(link_error) })
    }

    fn start_with(&self, req: &Request, timeout: Duration, on_reply: OnReply) {
        self.client.start_with(req, timeout, Box::new(move |r| on_reply(r.map_err(link_error))));
    }
}

/// Opens `NodeClient` sessions through a data-plane connector (TLS as this
/// client); checks that the node is the one the layout names.
#[derive(Debug, Clone, Default)]
pub struct NodeClientConnector(pub slate_dataplane::tls::Connector);

impl Connector for NodeClientConnector {
    fn connect(
        &self,
        node: NodeId,
        addr: &str,
        capability: &SignedCapability,
    ) -> BoxFuture<Result<Arc<dyn NodeLink>, LinkError>> {
        let addr = addr.to_string();
        let capability = capability.clone();
        let data_plane = self.0.clone();
        Box::pin(async move {
            let sock = tokio::net::lookup_host(&addr)
                .await
                .map_err(|e| LinkError::Closed(format!("resolve {addr}: {e}")))?
                .next()
                .ok_or_else(|| LinkError::Closed(format!("{addr} resolves to nothing")))?;
            let client = NodeClient::connect_with(&data_plane, sock, capability).await.map_err(link_error)?;
            if client.node() != node {
                return Err(LinkError::Protocol(format!("{addr} is {}, not {node}", client.node())));
            }
            Ok(Arc::new(NodeClientLink::new(client)) as Arc<dyn NodeLink>)
        })
    }
}
