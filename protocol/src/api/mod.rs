//! The management API's request bodies and replies (views), as JSON.
//!
//! slate-meta's handlers serialize these types and every client of the API
//! (the `slate` CLI and volume client, storage nodes, tests) deserializes the
//! same types, so a field or a state added here is added for both sides and
//! the compiler finds every place that must handle it. The JSON they produce
//! is the API's: field names and enum values (`snake_case`) are part of the
//! wire format and change only with it.
//!
//! Requests refuse unknown fields (`deny_unknown_fields`) so that a typo in a
//! call is an error rather than silently ignored. With the `openapi` feature
//! every type also describes itself for slate-meta's OpenAPI document.
//!
//! The storage nodes' work and reports (heartbeat replies, release, move,
//! decommission and scrub reports) are in [`crate::ops`].

mod attachments;
mod backups;
mod clones;
mod cluster;
mod erasure;
mod errors;
mod nodes;
mod tenants;
mod volumes;

pub use attachments::*;
pub use backups::*;
pub use clones::*;
pub use cluster::*;
pub use erasure::*;
pub use errors::*;
pub use nodes::*;
pub use tenants::*;
pub use volumes::*;

#[cfg(test)]
mod tests;
