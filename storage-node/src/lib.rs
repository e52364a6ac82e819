//! slate-node: the storage node. `engine` is the disk engine (io_uring, extents,
//! checksums, layers, verified zeroing).

pub mod engine;
