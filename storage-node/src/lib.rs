//! slate-node: the storage node. `engine` is the disk engine (io_uring, extents,
//! checksums, layers, verified zeroing).

pub mod engine;
pub mod erase;
pub mod fence;

// Data-plane server side: sessions and capability checks, the TCP server,
// metrics, local admin, configuration, and the node assembly. The data-plane
// client, TLS and security reporting are in slate-dataplane.
pub mod admin;
pub mod cli;
pub mod config;
pub mod decommission;
pub mod demo;
pub mod heartbeat;
pub mod metrics;
pub mod mover;
pub mod node;
pub mod release;
pub mod scrub;
pub mod server;
pub mod session;
pub mod work;
