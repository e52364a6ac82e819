//! slate (work in progress).

pub mod blockdev;
pub mod cli;
pub mod crypto;
pub mod export;
pub mod nbd;
pub mod volume;
