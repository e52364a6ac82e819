//! The durable raft log: raft-rs's `Storage` trait over TiKV's `raft-engine`, plus snapshot files.
//!
//! Layout inside raft-engine (one process = one raft group, so raft-engine's "region" ids are used as
//! namespaces):
//! - region `META_REGION` holds key-values: hard state, conf state, snapshot metadata, the peer address
//!   table and the id of the region that currently holds the entries;
//! - the entries live in region `entry_region` (starts at `FIRST_ENTRY_REGION`). Installing a snapshot
//!   received from the leader replaces the whole log, so it moves the entries to a fresh region and
//!   cleans the old one, instead of truncating in place (raft-engine has no truncate, and a fresh
//!   region avoids re-creating a cleaned one).
//!
//! Invariant: the snapshot recorded in META is the one at `first_index - 1`; the log is compacted only
//! together with recording a newer snapshot, in the same synced write. The snapshot's file is written
//! and fsynced before that write.
//!
//! Purging (crypto-shred): compaction alone only drops entries from raft-engine's in-memory index; the
//! bytes stay in the append file until it is rotated out, and raft-engine recycles purged files by
//! renaming them (contents intact). So recycling is disabled, and `purge_all_obsolete` rotates the
//! append queue, rewrites every live entry and key-value into the rewrite queue, rewrites the rewrite
//! queue itself, and deletes all older files of both queues.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::sync::Arc;

use raft::eraftpb::{ConfState, Entry, HardState, Snapshot, SnapshotMetadata};
use raft::{GetEntriesContext, RaftState, StorageError};
use raft_engine::{Command, Engine, LogBatch, MessageExt, ReadableSize};

use super::snapshot::SnapshotDir;

const META_REGION: u64 = 1;
const FIRST_ENTRY_REGION: u64 = 2;
const KEY_HARD_STATE: &[u8] = b"hard_state";
const KEY_CONF_STATE: &[u8] = b"conf_state";
const KEY_SNAPSHOT: &[u8] = b"snapshot_meta";
const KEY_ENTRY_REGION: &[u8] = b"entry_region";
const KEY_PEERS: &[u8] = b"peers";

/// Tells raft-engine how to index raft-rs entries.
#[derive(Debug, Clone, Copy)]
pub(crate) struct EntryExt;

impl MessageExt for EntryExt {
    type Entry = Entry;
    fn index(e: &Entry) -> u64 {
        e.index
    }
}

pub(crate) type StoreResult<T> = Result<T, String>;

fn se(e: impl std::fmt::Display) -> String {
    e.to_string()
}

pub(crate) struct LogStore {
    engine: Arc<Engine>,
    snaps: SnapshotDir,
    entry_region: u64,
    hard_state: HardState,
    conf_state: ConfState,
    snap_meta: SnapshotMetadata,
    /// Set when raft asked for a snapshot newer than the stored one; the node loop then makes one.
    snapshot_wanted: Cell<bool>,
}

impl std::fmt::Debug for LogStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogStore")
            .field("entry_region", &self.entry_region)
            .field("snapshot_index", &self.snap_meta.index)
            .finish_non_exhaustive()
    }
}

impl LogStore {
    /// Open the store under `data_dir`. `initialized()` tells whether it was bootstrapped before.
    pub fn open(data_dir: &Path) -> StoreResult<Self> {
        Self::open_with(data_dir, super::DEFAULT_LOG_FILE_BYTES, super::DEFAULT_LOG_PURGE_BYTES)
    }

    /// [`LogStore::open`] with raft-engine's file size and purge threshold.
    pub fn open_with(data_dir: &Path, file_bytes: u64, purge_bytes: u64) -> StoreResult<Self> {
        // raft-engine creates the log's files itself: owner-only through the umask,
        // inside directories created 0700 here (crate::fsutil).
        crate::fsutil::restrict_umask();
        crate::fsutil::create_private_dir(&data_dir.join("raft-log")).map_err(se)?;
        let cfg = raft_engine::Config {
            dir: data_dir.join("raft-log").to_string_lossy().into_owned(),
            // A recycled file keeps its old contents: never for a log that must forget.
            enable_log_recycle: false,
            // Uncompressed, so that a scan of the files for a purged secret is meaningful.
            batch_compression_threshold: ReadableSize(0),
            target_file_size: ReadableSize(file_bytes),
            purge_threshold: ReadableSize(purge_bytes),
            ..Default::default()
        };
        let engine = Arc::new(Engine::open(cfg).map_err(se)?);
        let snaps = SnapshotDir::open(data_dir.join("snapshots")).map_err(se)?;
        let get = |k: &[u8]| engine.get(META_REGION, k);
        let hard_state = engine.get_message::<HardState>(META_REGION, KEY_HARD_STATE).map_err(se)?.unwrap_or_default();
        let conf_state = engine.get_message::<ConfState>(META_REGION, KEY_CONF_STATE).map_err(se)?.unwrap_or_default();
        let snap_meta =
            engine.get_message::<SnapshotMetadata>(META_REGION, KEY_SNAPSHOT).map_err(se)?.unwrap_or_default();
        let entry_region = match get(KEY_ENTRY_REGION) {
            Some(v) => u64::from_be_bytes(v.as_slice().try_into().map_err(|_| "bad entry region record".to_owned())?),
            None => FIRST_ENTRY_REGION,
        };
        Ok(Self { engine, snaps, entry_region, hard_state, conf_state, snap_meta, snapshot_wanted: Cell::new(false) })
    }

    /// True once `bootstrap` (or a snapshot from a leader) has recorded a snapshot.
    pub fn initialized(&self) -> bool {
        self.snap_meta.index > 0
    }

    /// First start of a member of a new cluster: record the initial snapshot (the state machine's empty state
    /// at `index`, with the initial voters) so that every node starts from the same state, and nodes added later
    /// catch up from a snapshot instead of replaying a log that lacks the initial configuration.
    pub fn bootstrap(&mut self, snap: &Snapshot, peers: &BTreeMap<u64, SocketAddr>) -> StoreResult<()> {
        self.snaps.save(snap).map_err(se)?;
        let m = snap.get_metadata();
        let hs = HardState { term: m.term, commit: m.index, ..Default::default() };
        let mut b = LogBatch::default();
        b.put_message(META_REGION, KEY_HARD_STATE.to_vec(), &hs).map_err(se)?;
        b.put_message(META_REGION, KEY_CONF_STATE.to_vec(), m.get_conf_state()).map_err(se)?;
        b.put_message(META_REGION, KEY_SNAPSHOT.to_vec(), m).map_err(se)?;
        b.put(META_REGION, KEY_ENTRY_REGION.to_vec(), self.entry_region.to_be_bytes().to_vec()).map_err(se)?;
        b.put(META_REGION, KEY_PEERS.to_vec(), encode_peers(peers)).map_err(se)?;
        self.engine.write(&mut b, true).map_err(se)?;
        self.hard_state = hs;
        self.conf_state = m.get_conf_state().clone();
        self.snap_meta = m.clone();
        Ok(())
    }

    pub fn conf_state(&self) -> &ConfState {
        &self.conf_state
    }
    pub fn snapshot_meta(&self) -> &SnapshotMetadata {
        &self.snap_meta
    }
    pub fn peers(&self) -> BTreeMap<u64, SocketAddr> {
        self.engine.get(META_REGION, KEY_PEERS).map(|v| decode_peers(&v)).unwrap_or_default()
    }
    pub fn take_snapshot_wanted(&self) -> bool {
        self.snapshot_wanted.replace(false)
    }

    /// Load the recorded snapshot (metadata + data).
    pub fn load_snapshot(&self) -> StoreResult<Snapshot> {
        self.snaps.load(self.snap_meta.index, self.snap_meta.term).map_err(se)
    }

    /// Persist new entries and/or hard state in one write; fsync when `sync`.
    pub fn persist_ready(&mut self, entries: &[Entry], hs: Option<&HardState>, sync: bool) -> StoreResult<()> {
        if entries.is_empty() && hs.is_none() {
            return Ok(());
        }
        let mut b = LogBatch::default();
        if !entries.is_empty() {
            b.add_entries::<EntryExt>(self.entry_region, entries).map_err(se)?;
        }
        if let Some(hs) = hs {
            b.put_message(META_REGION, KEY_HARD_STATE.to_vec(), hs).map_err(se)?;
        }
        self.engine.write(&mut b, sync).map_err(se)?;
        if let Some(hs) = hs {
            self.hard_state = hs.clone();
        }
        Ok(())
    }

    /// Record a new commit index (from a light ready); no fsync needed: commit can be re-learned.
    pub fn set_commit(&mut self, commit: u64) -> StoreResult<()> {
        let mut hs = self.hard_state.clone();
        hs.commit = commit;
        self.persist_ready(&[], Some(&hs), false)
    }

    /// Raise the recorded commit index to `applied` if the state machine got ahead of it (it may persist
    /// applied entries before the hard state of the same ready reaches the disk).
    pub fn ensure_commit_at_least(&mut self, applied: u64) -> StoreResult<()> {
        if self.hard_state.commit < applied && applied <= self.last_index_inner() {
            let mut hs = self.hard_state.clone();
            hs.commit = applied;
            self.persist_ready(&[], Some(&hs), true)?;
        }
        Ok(())
    }

    /// Record the conf state and peer table after a conf change was applied (synced).
    pub fn set_conf_state(&mut self, cs: &ConfState, peers: &BTreeMap<u64, SocketAddr>) -> StoreResult<()> {
        let mut b = LogBatch::default();
        b.put_message(META_REGION, KEY_CONF_STATE.to_vec(), cs).map_err(se)?;
        b.put(META_REGION, KEY_PEERS.to_vec(), encode_peers(peers)).map_err(se)?;
        self.engine.write(&mut b, true).map_err(se)?;
        self.conf_state = cs.clone();
        Ok(())
    }

    /// Install a snapshot received from the leader: the snapshot file first, then one synced write that moves
    /// entries to a fresh region (the old log is discarded), records the snapshot, conf state and peers.
    pub fn install_snapshot(&mut self, snap: &Snapshot, peers: &BTreeMap<u64, SocketAddr>) -> StoreResult<()> {
        let m = snap.get_metadata();
        self.snaps.save(snap).map_err(se)?;
        let mut hs = self.hard_state.clone();
        hs.commit = hs.commit.max(m.index);
        hs.term = hs.term.max(m.term);
        let new_region = self.entry_region + 1;
        let mut b = LogBatch::default();
        b.add_command(self.entry_region, Command::Clean);
        b.put(META_REGION, KEY_ENTRY_REGION.to_vec(), new_region.to_be_bytes().to_vec()).map_err(se)?;
        b.put_message(META_REGION, KEY_HARD_STATE.to_vec(), &hs).map_err(se)?;
        b.put_message(META_REGION, KEY_CONF_STATE.to_vec(), m.get_conf_state()).map_err(se)?;
        b.put_message(META_REGION, KEY_SNAPSHOT.to_vec(), m).map_err(se)?;
        b.put(META_REGION, KEY_PEERS.to_vec(), encode_peers(peers)).map_err(se)?;
        self.engine.write(&mut b, true).map_err(se)?;
        self.entry_region = new_region;
        self.hard_state = hs;
        self.conf_state = m.get_conf_state().clone();
        self.snap_meta = m.clone();
        self.snaps.remove_all_but(m.index, m.term).map_err(se)
    }

    /// Record a locally made snapshot (state at `snap.metadata.index`, already persisted by the state machine)
    /// and compact the log up to it; older snapshot files are deleted.
    pub fn compact_with_snapshot(&mut self, snap: &Snapshot) -> StoreResult<()> {
        let m = snap.get_metadata();
        if m.index <= self.snap_meta.index {
            return Ok(());
        }
        self.snaps.save(snap).map_err(se)?;
        let mut b = LogBatch::default();
        b.put_message(META_REGION, KEY_SNAPSHOT.to_vec(), m).map_err(se)?;
        b.add_command(self.entry_region, Command::Compact { index: m.index + 1 });
        self.engine.write(&mut b, true).map_err(se)?;
        self.snap_meta = m.clone();
        self.snaps.remove_all_but(m.index, m.term).map_err(se)?;
        // Routine space reclamation (only acts once the log exceeds raft-engine's purge threshold).
        self.engine.purge_expired_files().map_err(se)?;
        Ok(())
    }

    /// Make sure no byte of a compacted entry, an overwritten key-value or an older snapshot remains in any file:
    /// rotate, rewrite live data, delete all older raft-engine files (see the module header).
    pub fn purge_all_obsolete(&mut self) -> StoreResult<()> {
        self.engine.sync().map_err(se)?;
        let pm = self.engine.purge_manager();
        // The `must_*` helpers panic on I/O errors instead of returning them; contain that here.
        std::panic::catch_unwind(AssertUnwindSafe(|| {
            pm.must_rewrite_append_queue(None, None);
            pm.must_rewrite_rewrite_queue();
        }))
        .map_err(|_| "raft-engine rewrite failed (I/O error)".to_owned())?;
        self.snaps.remove_all_but(self.snap_meta.index, self.snap_meta.term).map_err(se)
    }

    /// Whether any entry in `[low, high)` is a membership change.
    pub fn has_conf_change_in(&self, low: u64, high: u64) -> StoreResult<bool> {
        if low >= high {
            return Ok(false);
        }
        let mut ents = Vec::new();
        self.engine.fetch_entries_to::<EntryExt>(self.entry_region, low, high, None, &mut ents).map_err(se)?;
        Ok(ents.iter().any(|e| e.get_entry_type() != raft::eraftpb::EntryType::EntryNormal))
    }

    /// The term of the entry at `index` (which must be in the log or be the snapshot's index).
    pub fn term_of(&self, index: u64) -> StoreResult<u64> {
        raft::Storage::term(self, index).map_err(se)
    }

    fn first_index_inner(&self) -> u64 {
        let after_snap = self.snap_meta.index + 1;
        self.engine.first_index(self.entry_region).map_or(after_snap, |f| f.max(after_snap))
    }

    fn last_index_inner(&self) -> u64 {
        self.engine.last_index(self.entry_region).map_or(self.snap_meta.index, |l| l.max(self.snap_meta.index))
    }

    pub fn first_last(&self) -> (u64, u64) {
        (self.first_index_inner(), self.last_index_inner())
    }
}

fn store_err(e: StorageError) -> raft::Error {
    raft::Error::Store(e)
}

fn other_err(e: impl std::fmt::Display) -> raft::Error {
    raft::Error::Store(StorageError::Other(e.to_string().into()))
}

impl raft::Storage for LogStore {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(RaftState::new(self.hard_state.clone(), self.conf_state.clone()))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        let max_size = max_size.into();
        if low < self.first_index_inner() {
            return Err(store_err(StorageError::Compacted));
        }
        if high > self.last_index_inner() + 1 || low > high {
            return Err(store_err(StorageError::Unavailable));
        }
        let mut ents = Vec::with_capacity((high - low).min(1024) as usize);
        if low == high {
            return Ok(ents);
        }
        self.engine
            .fetch_entries_to::<EntryExt>(self.entry_region, low, high, max_size.map(|m| m as usize), &mut ents)
            .map_err(other_err)?;
        raft::util::limit_size(&mut ents, max_size);
        if ents.is_empty() || ents[0].index != low {
            return Err(store_err(StorageError::Unavailable));
        }
        Ok(ents)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        if idx == self.snap_meta.index {
            return Ok(self.snap_meta.term);
        }
        if idx < self.first_index_inner() {
            return Err(store_err(StorageError::Compacted));
        }
        if idx > self.last_index_inner() {
            return Err(store_err(StorageError::Unavailable));
        }
        match self.engine.get_entry::<EntryExt>(self.entry_region, idx).map_err(other_err)? {
            Some(e) => Ok(e.term),
            None => Err(store_err(StorageError::Unavailable)),
        }
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.first_index_inner())
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.last_index_inner())
    }

    fn snapshot(&self, request_index: u64, to: u64) -> raft::Result<Snapshot> {
        // A node refuses a snapshot whose configuration does not include it (a node just added): such a
        // recipient needs a snapshot taken after its addition was applied. Ask the node loop for a fresh one.
        let cs = self.snap_meta.get_conf_state();
        let includes_to = cs.voters.contains(&to) || cs.learners.contains(&to) || cs.voters_outgoing.contains(&to);
        if request_index > self.snap_meta.index || !includes_to {
            self.snapshot_wanted.set(true);
            return Err(store_err(StorageError::SnapshotTemporarilyUnavailable));
        }
        // raft-rs panics on any other error here; a missing or damaged file is reported and retried instead.
        self.load_snapshot().map_err(|e| {
            tracing::error!(error = %e, "cannot load the raft snapshot to send");
            store_err(StorageError::SnapshotTemporarilyUnavailable)
        })
    }
}

fn encode_peers(peers: &BTreeMap<u64, SocketAddr>) -> Vec<u8> {
    super::codec::encode_snapshot_data(peers, &[])
}

fn decode_peers(b: &[u8]) -> BTreeMap<u64, SocketAddr> {
    super::codec::decode_snapshot_data(b).map(|(p, _)| p).unwrap_or_default()
}

/// Every normal entry's `(index, data)` still in the Raft log under `data_dir`, read
/// from a private copy of its `raft-log` directory (the original is not touched, so
/// this works on an old copy kept as evidence). For offline tools (`try-unwrap`).
pub fn read_log_entries(data_dir: &Path) -> Result<Vec<(u64, Vec<u8>)>, String> {
    let src = data_dir.join("raft-log");
    if !src.is_dir() {
        return Ok(Vec::new());
    }
    let scratch = std::env::temp_dir().join(format!("slate-log-read-{}-{}", std::process::id(), nanos()));
    let copy = scratch.join("raft-log");
    let result = (|| {
        crate::fsutil::create_private_dir(&copy).map_err(se)?;
        for e in std::fs::read_dir(&src).map_err(se)? {
            let e = e.map_err(se)?;
            if e.file_type().map_err(se)?.is_file() {
                std::fs::copy(e.path(), copy.join(e.file_name())).map_err(se)?;
            }
        }
        let store = LogStore::open(&scratch)?;
        // Raw bounds: entries compacted but not yet purged from the files count too.
        let region = store.entry_region;
        let (Some(first), Some(last)) = (store.engine.first_index(region), store.engine.last_index(region)) else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        if last >= first {
            let mut ents = Vec::new();
            store
                .engine
                .fetch_entries_to::<EntryExt>(region, first, last + 1, None, &mut ents)
                .map_err(|e| format!("reading entries {first}..={last}: {e}"))?;
            for e in ents {
                if e.get_entry_type() == raft::eraftpb::EntryType::EntryNormal && !e.data.is_empty() {
                    out.push((e.index, e.data.to_vec()));
                }
            }
        }
        Ok(out)
    })();
    let _ = std::fs::remove_dir_all(&scratch);
    result
}

fn nanos() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos())
}
