//! slate-node: the storage node. `engine` is the disk engine (io_uring, extents,
//! checksums, layers, verified zeroing).

pub mod engine;
pub mod erase;
pub mod fence;

// Data-plane server side: sessions and capability checks, the TCP server, the
// reusable client, metrics, local admin, configuration, and the node assembly.
pub mod admin;
pub mod cli;
pub mod client;
pub mod config;
pub mod decommission;
pub mod demo;
pub mod heartbeat;
pub mod metrics;
pub mod mover;
pub mod node;
pub mod release;
pub mod scrub;
pub mod security;
pub mod server;
pub mod session;
pub mod tls;
pub mod work;
