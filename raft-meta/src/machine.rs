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
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

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
    fs::create_dir_all(dir)?;
    let tmp = dir.join(format!("{name}.tmp"));
    {
        let mut f = OpenOptions::new().write(true).create(true).truncate(true).open(&tmp)?;
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
            root = root.ratchet_to(state.root_epoch).expect("forward ratchet");
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
        Ok(Self { state, root, provider, dir: state_dir(data_dir), purge: false, root_store_failed: false })
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

impl StateMachine for SlateMachine {
    fn apply(&mut self, index: u64, command: &[u8]) -> Vec<u8> {
        let applied = self.state.apply_bytes(index, command, &mut self.root);
        if applied.shredded {
            self.commit_shred();
            self.purge = true;
        }
        serde_json::to_vec(&applied.response).unwrap_or_else(|_| b"{\"err\":{\"code\":\"internal\"}}".to_vec())
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
        let root = self.root.ratchet_to(state.root_epoch).ok_or_else(|| {
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

/// Walks the audit chain stored in `<data_dir>/state/state.json`, naming the first broken record.
pub fn verify_audit_file(data_dir: &Path) -> anyhow::Result<VerifyReport> {
    let path = state_dir(data_dir).join(STATE_FILE);
    let bytes = fs::read(&path).map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
    let v: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|e| anyhow::anyhow!("state file is not JSON: {e}"))?;
    let records = v
        .get("audit")
        .and_then(|a| a.get("records"))
        .and_then(|r| r.as_array())
        .ok_or_else(|| anyhow::anyhow!("state file has no audit records"))?;
    Ok(audit::verify_json(records))
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
    let Some(v) = target.volumes.get(&volume) else {
        return Ok(Err(format!("volume {volume} is not in {}", data_dir.display())));
    };
    let root = FileRootKeyProvider::new(root_key_file).load()?;
    let mut attempts = Vec::new();
    let mut tenant_keys: Vec<(String, TenantKey)> = Vec::new();
    let mut states = vec![(data_dir.to_path_buf(), target.clone())];
    for d in key_dirs {
        states.push((d.clone(), load_state(d)?));
    }
    for (dir, s) in &states {
        let Some(t) = s.tenants.get(&v.tenant) else {
            attempts.push(format!("{}: tenant {} absent", dir.display(), v.tenant));
            continue;
        };
        match root.ratchet_to(s.root_epoch) {
            None => attempts.push(format!(
                "{}: state at root epoch {} but the root key is at {} (older keys destroyed)",
                dir.display(),
                s.root_epoch,
                root.epoch()
            )),
            Some(r) => match r.unwrap_tenant_key(&t.wrapped_key) {
                Ok(k) => tenant_keys.push((dir.display().to_string(), k)),
                Err(e) => attempts.push(format!("{}: {e}", dir.display())),
            },
        }
    }
    for (from, k) in &tenant_keys {
        match k.unwrap_dek(&v.wrapped_dek) {
            Ok(dek) => return Ok(Ok(dek.fingerprint())),
            Err(e) => attempts.push(format!("tenant key from {from}: {e}")),
        }
    }
    Ok(Err(attempts.join("; ")))
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
