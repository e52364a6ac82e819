//! Slate's shared vocabulary: ids and units, data-plane messages, the frame
//! codec, capability tokens and the management API's request and view types. This crate does no I/O, so every component
//! (storage node, metadata service, volume client, tests) speaks exactly the
//! same bytes.

/// `as_str` and `Display` for a field-less enum: each variant's name as serde writes it.
/// The names are the wire format; `api/tests.rs` checks they match serde's.
macro_rules! wire_names {
    ($ty:ident { $($variant:ident => $name:literal),+ $(,)? }) => {
        impl $ty {
            /// The value as it appears on the wire.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(Self::$variant => $name,)+
                }
            }
        }

        impl std::fmt::Display for $ty {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

pub mod api;
pub mod backup;
pub mod capability;
pub mod certificate;
pub mod frame;
pub mod ids;
pub mod message;
pub mod ops;
pub mod stages;
pub mod wire;

pub use capability::{Capability, CapabilityError, Holder, Rights, SignedCapability};
pub use frame::{decode_frame, encode_reply, encode_request, encode_request_parts, FrameError, MAX_FRAME_PAYLOAD};
pub use ids::*;
pub use message::{BlockRange, ErrorKind, Reply, Request, Target, WireError, PROTOCOL_VERSION};
pub use wire::DecodeError;

/// crc32c of one block as sent (ciphertext): the checksum every layer agrees on.
pub fn block_crc(block: &[u8]) -> u32 {
    crc32c::crc32c(block)
}

/// Seconds since the Unix epoch, for capability expiry.
pub fn now_unix_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}
