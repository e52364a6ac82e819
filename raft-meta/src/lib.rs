//! slate-meta: Slate's metadata service.
//!
//! A Raft-replicated state machine (`consensus`, generic over the machine)
//! driving Slate's metadata (`state`: tenants, principals, grants, nodes,
//! volumes, placement, attachments, keys, audit), served over an HTTPS/JSON
//! management API (`api`). The crate is a library so that tests, benches and
//! the `slate-meta` binary share one implementation.

pub mod consensus;

pub mod api;
pub mod audit;
pub mod cli;
pub mod config;
pub mod fsutil;
pub mod keys;
pub mod machine;
pub mod metrics;
pub mod placement;
pub mod service;
pub mod state;
pub mod tls;
