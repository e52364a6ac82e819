//! The state machine consensus drives: [`MetaState`] plus the root key, the
//! state file, and the crypto-shred choreography.
//!
//! Files: `<data_dir>/state/state.json` holds the whole state and its applied
//! index (written to a temp file, fsynced, renamed, directory fsynced). The
//! root key file lives outside the data directory (see `keys::provider`).
//!
//! A shred (volume or tenant delete) is applied like this on every node:
//! 1. `MetaState::apply` drops the victim's wrapped key, rotates the tenant
//!    key one-way, ratchets the root key in memory, re-wraps every tenant key
//!    under the new root (deterministic AES-KW: identical bytes everywhere);
//! 2. the state is persisted (fsync): it is now at root epoch e+1;
//! 3. the root key file is replaced by (e+1, M_{e+1}) and M_e destroyed;
//! 4. `take_purge_request` tells consensus to compact and purge the Raft log
//!    and old snapshots, so the wrapped DEK leaves every file.
//!
//! A crash between 2 and 3 leaves the state one epoch ahead of the file;
//! [`SlateMachine::open`] ratchets the file forward (the ratchet is one-way, so
//! forward is always possible, backward never). A state *behind* the file is
//! a data directory from before a shred: it is refused, which is the shred
//! doing its job.

use crate::audit::{self, VerifyReport};
use crate::consensus::StateMachine;
use crate::keys::{Dek, FileRootKeyProvider, KeyError, RootKey, RootKeyProvider, TenantKey, WrappedKey};
use crate::state::command::Response;
use crate::state::MetaState;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use zeroize::Zeroize;

/// Name of the state file under `<data_dir>/state/`.
pub const STATE_FILE: &str = "state.json";

/// The state directory inside a data directory.
pub fn state_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("state")
}

/// Slate's metadata state machine.
pub struct SlateMachine {
    state: MetaState,
    root: RootKey,
    provider: Arc<dyn RootKeyProvider>,
    dir: PathBuf,
    purge: bool,
    root_store_failed: bool,
    dek_unwraps: u64,
}

impl std::fmt::Debug for SlateMachine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SlateMachine")
            .field("applied_index", &self.state.applied_index)
            .field("root_epoch", &self.state.root_epoch)
            .finish_non_exhaustive()
    }
}

/// Loads `<data_dir>/state/state.json`, or an empty state when there is none.
pub fn load_state(data_dir: &Path) -> anyhow::Result<MetaState> {
    let path = state_dir(data_dir).join(STATE_FILE);
    match fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map_err(|e| anyhow::anyhow!("state file {} is unreadable: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(MetaState::default()),
        Err(e) => Err(anyhow::anyhow!("reading {}: {e}", path.display())),
    }
}

fn write_durably(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    crate::fsutil::create_private_dir(dir)?;
    let tmp = dir.join(format!("{name}.tmp"));
    {
        // Wrapped keys, principals and the audit chain: owner only.
        let mut f = crate::fsutil::create_private_file(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, dir.join(name))?;
    File::open(dir)?.sync_all()
}

impl SlateMachine {
    /// Opens the machine on `data_dir`, reconciling the state's root epoch with the stored root key.
    pub fn open(data_dir: &Path, provider: Arc<dyn RootKeyProvider>) -> anyhow::Result<Self> {
        let state = load_state(data_dir)?;
        let mut root = provider.load()?;
        if root.epoch() < state.root_epoch {
            // Crash after persisting a shredded state but before storing the ratcheted key.
            root = root.advance_to(state.root_epoch, state.root_rotation.as_ref()).ok_or_else(|| {
                anyhow::anyhow!(
                    "the root key (epoch {}) cannot reach the state's epoch {}: a root rotation on the way is \
                     no longer recorded; start this node with an empty data directory to resync",
                    root.epoch(),
                    state.root_epoch
                )
            })?;
            match provider.store(&root) {
                Ok(()) => tracing::warn!(epoch = root.epoch(), "root key was behind the state; ratcheted it forward"),
                // A read-only provider (environment variable): keep the ratcheted key in memory only.
                Err(e) => tracing::error!(error = %e, "root key is behind the state and cannot be stored"),
            }
        } else if root.epoch() > state.root_epoch && state.applied_index > 0 {
            return Err(KeyError::Epoch {
                file: root.epoch(),
                state: state.root_epoch,
                hint: "this data directory predates a crypto-shred and its keys are destroyed; \
                       start this node with an empty data directory to resync from the cluster",
            }
            .into());
        }
        if root.epoch() == state.root_epoch {
            for t in state.tenants.values() {
                root.unwrap_tenant_key(&t.wrapped_key).map_err(|_| {
                    anyhow::anyhow!(
                        "the root key from {} does not unwrap tenant {}'s key: wrong root key file for this cluster",
                        provider.describe(),
                        t.id
                    )
                })?;
            }
        }
        Ok(Self {
            state,
            root,
            provider,
            dir: state_dir(data_dir),
            purge: false,
            root_store_failed: false,
            dek_unwraps: 0,
        })
    }

    /// The state, for reads.
    pub fn state(&self) -> &MetaState {
        &self.state
    }

    /// The root key epoch held in memory.
    pub fn root_epoch(&self) -> u64 {
        self.root.epoch()
    }

    /// True when a ratcheted root key could not be stored (e.g. a read-only provider).
    pub fn root_store_failed(&self) -> bool {
        self.root_store_failed
    }

    /// A fresh tenant key from the OS CSPRNG, wrapped under the current root, with the root epoch.
    /// Called by the proposer before proposing a tenant create or key rotation.
    pub fn wrap_fresh_tenant_key(&self) -> (WrappedKey, u64) {
        let k = TenantKey::generate();
        (self.root.wrap_tenant_key(&k), self.root.epoch())
    }

    /// A fresh root key from the OS CSPRNG, wrapped under the current root, with the
    /// current epoch: the proposer's part of `slate-meta rotate-root`.
    pub fn wrap_fresh_root(&self) -> (WrappedKey, u64) {
        let next = self.root.fresh_successor();
        (self.root.wrap_successor(&next), self.root.epoch())
    }

    /// How many times the root was re-keyed with fresh randomness.
    pub fn root_generation(&self) -> u64 {
        self.state.root_generation
    }

    /// A fresh DEK wrapped under `tenant`'s current key, with the key version; `None` when the tenant is unknown.
    pub fn wrap_fresh_dek(&self, tenant: u64) -> Option<(WrappedKey, u64)> {
        let t = self.state.tenants.get(&tenant)?;
        if self.root.epoch() != self.state.root_epoch {
            return None;
        }
        let tk = self.root.unwrap_tenant_key(&t.wrapped_key).ok()?;
        Some((tk.wrap_dek(&Dek::generate()), t.key_version))
    }

    fn persist_state(&self) -> std::io::Result<()> {
        let bytes = serde_json::to_vec(&self.state).map_err(std::io::Error::other)?;
        write_durably(&self.dir, STATE_FILE, &bytes)
    }

    /// Steps 2 and 3 of a shred: persist the state, then store the ratcheted root key.
    fn commit_shred(&mut self) {
        if let Err(e) = self.persist_state() {
            // The log still holds the shred; a restart replays it. Keep the old root file until the state is safe.
            tracing::error!(error = %e, "persisting the state after a shred failed; root key file not advanced");
            return;
        }
        match self.provider.store(&self.root) {
            Ok(()) => self.root_store_failed = false,
            Err(e) => {
                self.root_store_failed = true;
                tracing::error!(error = %e, "storing the ratcheted root key failed");
            }
        }
    }
}

impl SlateMachine {
    /// How many DEKs this node unwrapped for a reply (attach, restore): only for
    /// commands it proposed itself, never for those it merely replicated.
    pub fn dek_unwraps(&self) -> u64 {
        self.dek_unwraps
    }

    /// Opens a key release for the proposer (outside `MetaState::apply`, after it,
    /// with the root key of that moment), or drops it on every other replica.
    fn settle_release(&mut self, response: &mut Response, proposed_here: bool) {
        let Response::Ok { dek_hex, release, .. } = response else { return };
        let Some(r) = release.take() else { return };
        if !proposed_here {
            return;
        }
        match r.open(&self.root) {
            Ok(dek) => {
                self.dek_unwraps += 1;
                *dek_hex = Some(dek.to_hex().to_string());
            }
            Err(e) => {
                tracing::error!(error = %e, "opening the key release for the caller failed");
                *response = Response::Err(crate::state::command::Refusal::new(
                    crate::state::command::ErrorCode::Internal,
                    "the volume key could not be opened for this reply",
                ));
            }
        }
    }
}

impl StateMachine for SlateMachine {
    fn apply(&mut self, index: u64, command: &[u8]) -> Vec<u8> {
        self.apply_proposed(index, command, false)
    }

    fn apply_proposed(&mut self, index: u64, command: &[u8], proposed_here: bool) -> Vec<u8> {
        let mut applied = self.state.apply_bytes(index, command, &mut self.root);
        if applied.shredded {
            self.commit_shred();
            self.purge = true;
        }
        self.settle_release(&mut applied.response, proposed_here);
        let out =
            serde_json::to_vec(&applied.response).unwrap_or_else(|_| b"{\"err\":{\"code\":\"internal\"}}".to_vec());
        if let Response::Ok { dek_hex: Some(h), .. } = &mut applied.response {
            h.zeroize();
        }
        out
    }

    fn applied_index(&self) -> u64 {
        self.state.applied_index
    }

    fn snapshot(&self) -> Vec<u8> {
        serde_json::to_vec(&self.state).unwrap_or_default()
    }

    fn restore(&mut self, index: u64, snapshot: &[u8]) -> Result<(), String> {
        let mut state: MetaState =
            serde_json::from_slice(snapshot).map_err(|e| format!("snapshot does not decode: {e}"))?;
        state.applied_index = index;
        let root = self.root.advance_to(state.root_epoch, state.root_rotation.as_ref()).ok_or_else(|| {
            format!(
                "snapshot is at root epoch {} but this node's root key is at {}: cannot go back",
                state.root_epoch,
                self.root.epoch()
            )
        })?;
        for t in state.tenants.values() {
            root.unwrap_tenant_key(&t.wrapped_key)
                .map_err(|_| format!("root key does not unwrap tenant {}'s key from the snapshot", t.id))?;
        }
        let advanced = root.epoch() != self.root.epoch();
        self.state = state;
        self.root = root;
        self.persist_state().map_err(|e| format!("persisting restored state: {e}"))?;
        if advanced {
            self.commit_shred();
            self.purge = true;
        }
        Ok(())
    }

    fn persist(&mut self) -> std::io::Result<()> {
        self.persist_state()
    }

    fn take_purge_request(&mut self) -> bool {
        std::mem::take(&mut self.purge)
    }
}

/// Decodes a response produced by [`SlateMachine::apply`].
pub fn decode_response(bytes: &[u8]) -> Result<Response, String> {
    serde_json::from_slice(bytes).map_err(|e| format!("undecodable state machine response: {e}"))
}

// ----- offline tools (the `slate-meta` subcommands) -----

/// Walks the audit chain stored in `<data_dir>/state/state.json` from its anchor (or genesis),
/// naming the first broken record.
pub fn verify_audit_file(data_dir: &Path) -> anyhow::Result<VerifyReport> {
    let path = state_dir(data_dir).join(STATE_FILE);
    let bytes = fs::read(&path).map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
    let v: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|e| anyhow::anyhow!("state file is not JSON: {e}"))?;
    let audit = v.get("audit").ok_or_else(|| anyhow::anyhow!("state file has no audit chain"))?;
    let records = audit
        .get("records")
        .and_then(|r| r.as_array())
        .ok_or_else(|| anyhow::anyhow!("state file has no audit records"))?;
    // Records pruned by retention leave an anchor: the walk starts there.
    Ok(audit::verify_json_from(audit.get("anchor"), records))
}

/// The wrapped forms (hex) of every key in a stored state: `(kind, id, hex)`.
/// For tests that scan data directories for them; wrapped keys are not secrets
/// on their own, and this never touches plaintext.
pub fn dump_wrapped(data_dir: &Path) -> anyhow::Result<Vec<(String, u64, String)>> {
    let s = load_state(data_dir)?;
    let mut out = Vec::new();
    for t in s.tenants.values() {
        out.push(("tenant".to_string(), t.id, t.wrapped_key.to_hex()));
    }
    for v in s.volumes.values() {
        out.push(("volume".to_string(), v.id, v.wrapped_dek.to_hex()));
    }
    Ok(out)
}

/// Tries to recover `volume`'s DEK from the state in `data_dir` with every key
/// obtainable from `root_key_file` (and, if given, from the states in
/// `key_dirs`, e.g. the current data directories after a shred). Returns the
/// DEK's fingerprint on success, or why every attempt failed.
pub fn try_unwrap_dek(
    data_dir: &Path,
    root_key_file: &Path,
    key_dirs: &[PathBuf],
    volume: u64,
) -> anyhow::Result<Result<String, String>> {
    let target = load_state(data_dir)?;
    let root = FileRootKeyProvider::new(root_key_file).load()?;
    // The copy's Raft log too: entries after its state file (replayed onto it), and any
    // wrapped key in an entry, are tried as well as the state file itself.
    let log = crate::consensus::read_log_entries(&data_dir.join("raft")).map_err(|e| anyhow::anyhow!(e))?;
    let (replayed, seen) = replay_log(&target, &log, &root, volume);
    let Some(tenant) =
        target.volumes.get(&volume).or_else(|| replayed.volumes.get(&volume)).map(|v| v.tenant).or(seen.tenant)
    else {
        return Ok(Err(format!(
            "volume {volume} is in neither the state (applied index {}) nor the Raft log ({} entries, indexes {:?}..{:?}) of {}",
            target.applied_index,
            log.len(),
            log.first().map(|e| e.0),
            log.last().map(|e| e.0),
            data_dir.display()
        )));
    };
    let mut deks: Vec<WrappedKey> = target.volumes.get(&volume).map(|v| v.wrapped_dek.clone()).into_iter().collect();
    deks.extend(seen.deks);
    deks.extend(log_wrapped_keys(&log, crate::keys::DEK_BYTES + 8));
    let mut attempts = Vec::new();
    let mut tenant_keys: Vec<(String, TenantKey)> = Vec::new();
    let mut states = vec![(data_dir.display().to_string(), target.clone())];
    states.push((format!("{} (state replayed from its Raft log)", data_dir.display()), replayed));
    for d in key_dirs {
        states.push((d.display().to_string(), load_state(d)?));
    }
    let mut wrapped_tenant_keys: Vec<(String, u64, WrappedKey)> = Vec::new();
    for (dir, s) in &states {
        match s.tenants.get(&tenant) {
            Some(t) => wrapped_tenant_keys.push((dir.clone(), s.root_epoch, t.wrapped_key.clone())),
            None => attempts.push(format!("{dir}: tenant {tenant} absent")),
        }
    }
    for (i, (epoch, w)) in seen.tenant_keys.into_iter().enumerate() {
        wrapped_tenant_keys.push((format!("tenant key {i} seen in the Raft log"), epoch, w));
    }
    for w in log_wrapped_keys(&log, crate::keys::TENANT_KEY_BYTES + 8) {
        wrapped_tenant_keys.push(("a Raft log entry".into(), root.epoch(), w));
    }
    for (from, epoch, w) in &wrapped_tenant_keys {
        match root.ratchet_to(*epoch) {
            None => attempts.push(format!(
                "{from}: wrapped at root epoch {epoch} but the root key is at {} (older keys destroyed)",
                root.epoch()
            )),
            Some(r) => match r.unwrap_tenant_key(w) {
                Ok(k) => tenant_keys.push((from.clone(), k)),
                Err(e) => attempts.push(format!("{from}: {e}")),
            },
        }
    }
    let mut replayed_found = false;
    for (from, k) in &tenant_keys {
        for w in &deks {
            if let Ok(dek) = k.unwrap_dek(w) {
                // A log value that is not this volume's could open too (another volume of
                // the tenant): only a key the state or the replay attributes to it counts.
                if seen.attributed.contains(w) || target.volumes.get(&volume).is_some_and(|v| v.wrapped_dek == *w) {
                    return Ok(Ok(dek.fingerprint()));
                }
                replayed_found = true;
            }
        }
        attempts.push(format!("tenant key from {from}: opens none of the volume's wrapped keys"));
    }
    if replayed_found {
        attempts.push("some other volume key in the log opened (not this volume's)".into());
    }
    Ok(Err(attempts.join("; ")))
}

/// What replaying a copy's Raft log showed about one volume.
#[derive(Default)]
struct Seen {
    tenant: Option<u64>,
    /// Every wrapped form of the volume's DEK the replay produced.
    deks: Vec<WrappedKey>,
    attributed: Vec<WrappedKey>,
    /// Every wrapped form of its tenant's key, with the root epoch it was under.
    tenant_keys: Vec<(u64, WrappedKey)>,
}

/// Applies the log entries after the state's applied index onto a copy of the state
/// (with the given root key moved to the state's epoch, if it can be), recording every
/// wrapped form of `volume`'s DEK and of its tenant's key along the way.
fn replay_log(state: &MetaState, log: &[(u64, Vec<u8>)], root: &RootKey, volume: u64) -> (MetaState, Seen) {
    let mut s = state.clone();
    let mut seen = Seen::default();
    let Some(mut r) = root.ratchet_to(s.root_epoch) else { return (s, seen) };
    for (index, data) in log {
        if *index <= s.applied_index {
            continue;
        }
        let _ = s.apply_bytes(*index, data, &mut r);
        if let Some(v) = s.volumes.get(&volume) {
            seen.tenant = Some(v.tenant);
            if !seen.deks.contains(&v.wrapped_dek) {
                seen.deks.push(v.wrapped_dek.clone());
                seen.attributed.push(v.wrapped_dek.clone());
            }
            if let Some(t) = s.tenants.get(&v.tenant) {
                let e = (s.root_epoch, t.wrapped_key.clone());
                if !seen.tenant_keys.contains(&e) {
                    seen.tenant_keys.push(e);
                }
            }
        }
    }
    (s, seen)
}

/// Every string in the log's commands that decodes from hex to `len` bytes (a wrapped key's size).
fn log_wrapped_keys(log: &[(u64, Vec<u8>)], len: usize) -> Vec<WrappedKey> {
    fn walk(v: &serde_json::Value, len: usize, out: &mut Vec<WrappedKey>) {
        match v {
            serde_json::Value::String(s) if s.len() == 2 * len => {
                if let Ok(b) = hex::decode(s) {
                    let w = WrappedKey(b);
                    if !out.contains(&w) {
                        out.push(w);
                    }
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|x| walk(x, len, out)),
            serde_json::Value::Object(o) => o.values().for_each(|x| walk(x, len, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    for (_, data) in log {
        if let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) {
            walk(&v, len, &mut out);
        }
    }
    out
}

impl Drop for SlateMachine {
    /// A clean stop leaves an up-to-date state file (a crash replays the log instead).
    fn drop(&mut self) {
        if self.state.applied_index > 0 {
            if let Err(e) = self.persist_state() {
                tracing::warn!(error = %e, "persisting the state at shutdown failed");
            }
        }
    }
}
