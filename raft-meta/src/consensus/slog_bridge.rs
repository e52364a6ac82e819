//! Routes raft-rs's `slog` records to `tracing`.
//!
//! Only Info and above are forwarded: raft-rs's Debug and Trace records print whole messages, entries
//! included, and entries carry commands (wrapped keys among them) that must never reach a log.

use std::fmt::Write as _;

use slog::{Drain, Key, Level, OwnedKVList, Record, Serializer, KV};

struct TracingDrain;

struct Collect(String);

impl Serializer for Collect {
    fn emit_arguments(&mut self, key: Key, val: &std::fmt::Arguments<'_>) -> slog::Result {
        let _ = write!(self.0, " {key}={val}");
        Ok(())
    }
}

impl Drain for TracingDrain {
    type Ok = ();
    type Err = slog::Never;

    fn log(&self, record: &Record<'_>, values: &OwnedKVList) -> Result<(), slog::Never> {
        if !record.level().is_at_least(Level::Info) {
            return Ok(());
        }
        let mut kv = Collect(String::new());
        let _ = record.kv().serialize(record, &mut kv);
        let _ = values.serialize(record, &mut kv);
        let msg = record.msg();
        match record.level() {
            Level::Critical | Level::Error => tracing::error!(target: "raft", "{msg}{}", kv.0),
            Level::Warning => tracing::warn!(target: "raft", "{msg}{}", kv.0),
            _ => tracing::info!(target: "raft", "{msg}{}", kv.0),
        }
        Ok(())
    }
}

/// The logger handed to raft-rs, tagged with this node's id.
pub(crate) fn logger(id: u64) -> slog::Logger {
    slog::Logger::root(TracingDrain.fuse(), slog::o!("raft_id" => id))
}
