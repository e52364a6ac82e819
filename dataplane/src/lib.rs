//! slate-dataplane: what both ends of the data plane share, and the client end.
//!
//! - [`client`]: the pipelined data-plane client for one storage node
//!   ([`client::NodeClient`]), used by hosts and by nodes dialling their peers;
//! - [`tls`]: TLS 1.3 on the data plane, the client's [`tls::Connector`] and
//!   the server's configuration;
//! - [`security`]: security events (refused hellos and handshakes) reported to slate-meta;
//! - [`alloc`]: keeps large data-path buffers in the heap (no mmap per request);
//! - [`metrics`]: the minimal HTTP endpoint serving a process's Prometheus text.
//!
//! It links neither the disk engine nor raft, so the client library can depend
//! on it without either.

pub mod alloc;
pub mod client;
pub mod metrics;
pub mod security;
pub mod tls;
