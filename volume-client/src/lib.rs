//! slate: the client library. A host attaches a volume through the management
//! API ([`api`]), encrypts and checksums its blocks ([`crypto`]), replicates them
//! to storage nodes over the data plane ([`volume`], on `slate_dataplane`) and
//! serves the volume over NBD ([`nbd`]); [`backup`] and [`export`] read
//! snapshots. It links neither the storage node nor the metadata service: the
//! `slate` binary (package slate-cli) brings those in for `slate up`.

pub mod api;
pub mod backup;
pub mod blockdev;
pub mod crypto;
pub mod export;
pub mod nbd;
pub mod volume;
