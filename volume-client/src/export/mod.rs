//! Portable export: a snapshot as a LUKS1 image that standard tools open with
//! the tenant's passphrase (QEMU's `luks` driver with a `secret` object,
//! cryptsetup), under a fresh master key of its own.
//!
//! | file | what |
//! |---|---|
//! | `luks.rs` | the LUKS1 format: header, anti-forensic splitter, key slot, master key digest |
//! | `image.rs` | writing an image of a block device: chunks in flight, `FILE.partial`, fsync, rename |
//!
//! `slate export` (`cli/export.rs`) attaches the snapshot read-only and hands
//! the attached volume to [`image::write_image`].

pub mod image;
pub mod luks;
