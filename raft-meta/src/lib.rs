//! slate-meta: Slate's metadata service (Raft consensus, state machine, management API).

pub mod consensus;
