//! slate (work in progress).

pub mod backup;
pub mod blockdev;
pub mod cli;
pub mod crypto;
pub mod export;
pub mod nbd;
pub mod volume;
