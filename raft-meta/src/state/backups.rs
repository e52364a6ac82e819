//! Backup records and restores.
//!
//! The data of a backup lives in its target (a directory or an S3 bucket),
//! written by the `slate` CLI as the ciphertext the storage nodes hold. slate-meta
//! keeps the record of each backup: which snapshot, which target, its parent in an
//! incremental chain, the fingerprint of the key its blocks are encrypted under,
//! and the SHA-256 of its manifest once the CLI completed it (the API then signs
//! the manifest with the cluster key). A backup is begun before any data is sent,
//! so a backup killed half way resumes under the same id.
//!
//! A restore creates a new volume under a fresh DEK of its own and hands the
//! restorer (who holds the backup right) the source volume's DEK, as an attach
//! would, to decrypt the backup with; the CLI re-encrypts every block under the new
//! key. So no volume ever shares a key with its backup's source, and once the
//! source is deleted its DEK is crypto-shredded, nothing in the cluster holds it,
//! and every one of its backups is undecryptable: restore says so ("key destroyed").

use super::apply::{internal, json, Actor, Ctx, Need, Res};
use super::command::{
    BeginBackupRequest, CompleteBackupRequest, CreateVolumeRequest, ErrorCode, Refusal, RestoreProgressRequest,
    RestoreVolumeRequest,
};
use super::types::SnapshotState;
use super::{take, MetaState};
use crate::keys::{KeyRelease, RootKey, WrappedKey};
use std::fmt::Write as _;

pub use slate_protocol::api::{Backup, BackupState, Restore};

/// Checks a target URL's form (the CLI reaches it; slate-meta only records it).
fn validate_target(target: &str) -> Result<(), Refusal> {
    let ok = (target.starts_with("file:///") && target.len() > 8)
        || target.strip_prefix("s3://").is_some_and(|r| !r.is_empty() && !r.starts_with('/'));
    if !ok || target.len() > 1024 || target.contains('@') || target.chars().any(char::is_control) {
        return Err(Refusal::bad(format!("backup target {target:?} is not file:///DIR or s3://BUCKET[/PREFIX]")));
    }
    Ok(())
}

impl MetaState {
    fn backup(&self, id: u64) -> Result<&Backup, Refusal> {
        self.backups.get(&id).ok_or_else(|| Refusal::not_found(format!("no backup {id}")))
    }

    /// May `actor` read backup `b` (its volume's backup right, or the tenant's admin)?
    fn may_read_backup(&self, actor: &Actor, b: &Backup) -> Result<(), Refusal> {
        match self.volumes.get(&b.volume) {
            Some(v) => self.check_volume(actor, v, Need::Backup),
            None if actor.is_admin_of(b.tenant) => Ok(()),
            None => Err(Refusal::forbidden(format!("{} may not read backup {}", actor.label(), b.id))),
        }
    }

    fn check_backup(&self, ctx: &mut Ctx, b: &Backup) -> Result<(), Refusal> {
        ctx.object_tenant = Some(b.tenant);
        self.may_read_backup(&ctx.actor, b)
    }

    pub(super) fn begin_backup(&mut self, ctx: &mut Ctx, root: &RootKey, volume: u64, req: &BeginBackupRequest) -> Res {
        validate_target(&req.target)?;
        let v = self.volume_for(ctx, volume)?;
        self.check_volume(&ctx.actor, v, Need::Backup)?;
        let s = v
            .snapshots
            .get(&req.snapshot)
            .ok_or_else(|| Refusal::not_found(format!("vol-{volume} has no snapshot {}", req.snapshot)))?;
        if s.state != SnapshotState::Ready {
            return Err(Refusal::conflict(format!("snapshot {} of vol-{volume} is not ready yet", s.name)));
        }
        Self::refuse_if_clone(v, "backed up")?;
        let parent_epoch = match req.parent {
            None => None,
            Some(p) => {
                let pb = self
                    .backups
                    .get(&p)
                    .ok_or_else(|| Refusal::not_found(format!("the base backup {p} does not exist")))?;
                if pb.volume != volume || pb.state != BackupState::Complete {
                    return Err(Refusal::conflict(format!("backup {p} is not a complete backup of vol-{volume}")));
                }
                if !v.snapshots.values().any(|x| x.id == pb.snapshot) {
                    return Err(Refusal::conflict(format!(
                        "the base backup's snapshot {} was deleted: the block difference needs it; take a full backup",
                        pb.snapshot_name
                    )));
                }
                if pb.epoch >= s.epoch {
                    return Err(Refusal::bad(format!(
                        "the base snapshot {} is not older than {}",
                        pb.snapshot_name, s.name
                    )));
                }
                Some(pb.epoch)
            }
        };
        ctx.object = format!("volume:vol-{volume} snapshot:{} target:{}", s.name, req.target);
        // A backup of the same snapshot to the same target that was never completed resumes.
        if let Some(b) = self.backups.values().find(|b| {
            b.state == BackupState::Creating
                && b.volume == volume
                && b.snapshot == req.snapshot
                && b.target == req.target
                && b.parent == req.parent
        }) {
            ctx.skip_audit = true;
            return json(b);
        }
        let tenant = self.tenants.get(&v.tenant).ok_or_else(|| internal("volume without tenant"))?;
        let tk = root.unwrap_tenant_key(&tenant.wrapped_key).map_err(|e| internal(e.to_string()))?;
        let dek = tk.unwrap_dek(&v.wrapped_dek).map_err(|e| internal(e.to_string()))?;
        let mut b = Backup {
            id: 0,
            volume,
            volume_name: v.name.clone(),
            tenant: v.tenant,
            snapshot: s.id,
            snapshot_name: s.name.clone(),
            epoch: s.epoch,
            target: req.target.clone(),
            parent: req.parent,
            parent_epoch,
            state: BackupState::Creating,
            created_ms: ctx.now,
            completed_ms: None,
            key_fingerprint: dek.fingerprint(),
            manifest_sha256: None,
            blocks_changed: 0,
            blocks_stored: 0,
            bytes_stored: 0,
        };
        b.id = take(&mut self.next.backup);
        let _ = write!(ctx.object, " backup:{}", b.id);
        self.backups.insert(b.id, b.clone());
        json(&b)
    }

    pub(super) fn complete_backup(&mut self, ctx: &mut Ctx, backup: u64, req: &CompleteBackupRequest) -> Res {
        let b = self.backup(backup)?.clone();
        self.check_backup(ctx, &b)?;
        ctx.object = format!("backup:{backup} volume:vol-{} snapshot:{}", b.volume, b.snapshot_name);
        match (&b.state, &b.manifest_sha256) {
            (BackupState::Complete, Some(sha)) if *sha == req.manifest_sha256 => {
                ctx.skip_audit = true;
                return json(&b);
            }
            (BackupState::Complete, _) => {
                return Err(Refusal::conflict(format!("backup {backup} is complete already")))
            }
            (BackupState::Creating, _) => {}
        }
        if req.manifest_sha256.len() != 64 || hex::decode(&req.manifest_sha256).is_err() {
            return Err(Refusal::bad("manifest_sha256 is not a SHA-256"));
        }
        let b = self.backups.get_mut(&backup).expect("checked");
        b.state = BackupState::Complete;
        b.completed_ms = Some(ctx.now);
        b.manifest_sha256 = Some(req.manifest_sha256.clone());
        b.blocks_changed = req.blocks_changed;
        b.blocks_stored = req.blocks_stored;
        b.bytes_stored = req.bytes_stored;
        let _ = write!(ctx.object, " manifest:{} bytes:{}", req.manifest_sha256, req.bytes_stored);
        json(&*b)
    }

    pub(super) fn list_backups(&self, ctx: &mut Ctx, volume: Option<u64>) -> Res {
        ctx.skip_audit = true;
        let list: Vec<&Backup> = self
            .backups
            .values()
            .filter(|b| volume.is_none_or(|v| b.volume == v))
            .filter(|b| self.may_read_backup(&ctx.actor, b).is_ok())
            .collect();
        json(&list)
    }

    pub(super) fn get_backup(&self, ctx: &mut Ctx, backup: u64) -> Res {
        let b = self.backup(backup)?;
        self.check_backup(ctx, b)?;
        ctx.skip_audit = true;
        json(b)
    }

    /// Creates the volume a backup restores into, under a fresh key of its own
    /// (`wrapped_dek`, made by the proposer), and hands the restorer the backed-up
    /// volume's key (`ctx.release`, opened by the proposer like an attach's) to decrypt the backup with.
    pub(super) fn restore_volume(
        &mut self,
        ctx: &mut Ctx,
        root: &RootKey,
        req: &RestoreVolumeRequest,
        wrapped_dek: &WrappedKey,
        key_version: u64,
    ) -> Res {
        let b = self.backup(req.backup)?.clone();
        let Some(src) = self.volumes.get(&b.volume) else {
            if !ctx.actor.is_admin_of(b.tenant) {
                return Err(Refusal::forbidden(format!("{} may not restore backup {}", ctx.actor.label(), b.id)));
            }
            return Err(Refusal::new(
                ErrorCode::Conflict,
                format!(
                    "key destroyed: volume {} (vol-{}) was deleted and its key crypto-shredded, so backup {} can no \
                     longer be decrypted by anything in this cluster",
                    b.volume_name, b.volume, b.id
                ),
            ));
        };
        self.check_volume(&ctx.actor, src, Need::Backup)?;
        if b.state != BackupState::Complete {
            return Err(Refusal::conflict(format!("backup {} is not complete: finish or resume it first", b.id)));
        }
        let src_tenant = self.tenants.get(&src.tenant).ok_or_else(|| internal("volume without tenant"))?;
        let stk = root.unwrap_tenant_key(&src_tenant.wrapped_key).map_err(|e| internal(e.to_string()))?;
        // Checked on every replica (the refusal must be deterministic); the key itself is
        // handed out only as a release the proposer opens.
        let dek = stk.unwrap_dek(&src.wrapped_dek).map_err(|e| internal(e.to_string()))?;
        let release = KeyRelease {
            root_epoch: self.root_epoch,
            wrapped_tenant_key: src_tenant.wrapped_key.clone(),
            wrapped_dek: src.wrapped_dek.clone(),
        };
        if dek.fingerprint() != b.key_fingerprint {
            return Err(Refusal::conflict(format!(
                "key destroyed: the key of vol-{} is no longer the one backup {} was taken under",
                b.volume, b.id
            )));
        }
        // The same restore again (after kill -9): resume it where it got to.
        let existing = self.volumes.values().find(|v| v.name == req.name && req.tenant.is_none_or(|t| t == v.tenant));
        if let Some(r) = existing.and_then(|v| self.restores.get(&v.id)).filter(|r| r.backup == b.id) {
            let v = &self.volumes[&r.volume];
            self.check_volume(&ctx.actor, v, Need::Reconfigure)?;
            ctx.skip_audit = true;
            let mut view = json(&self.volume_view(v, ctx.now))?;
            view["restore"] = json(r)?;
            ctx.release = Some(release);
            return Ok(view);
        }
        let tenant = req.tenant.unwrap_or(src.tenant);
        let create = CreateVolumeRequest {
            name: req.name.clone(),
            size_bytes: req.size_bytes,
            tenant: Some(tenant),
            replicas: req.replicas.unwrap_or(src.replicas),
            failure_domain_level: None,
            qos: src.qos,
        };
        let mut view = self.create_volume(ctx, root, tenant, &create, wrapped_dek, key_version)?;
        let id = view["id"].as_u64().ok_or_else(|| internal("created volume without id"))?;
        ctx.object = format!("volume:vol-{id}({}) restore of backup:{} from vol-{}", req.name, b.id, b.volume);
        let r = Restore { volume: id, backup: b.id, done_manifests: 0, done_chunks: 0, started_ms: ctx.now };
        view["restore"] = json(&r)?;
        self.restores.insert(id, r);
        ctx.release = Some(release);
        Ok(view)
    }

    pub(super) fn restore_progress(&mut self, ctx: &mut Ctx, volume: u64, req: &RestoreProgressRequest) -> Res {
        let v = self.volume_for(ctx, volume)?;
        self.check_volume(&ctx.actor, v, Need::Reconfigure)?;
        let r = self
            .restores
            .get_mut(&volume)
            .ok_or_else(|| Refusal::not_found(format!("vol-{volume} is not being restored")))?;
        if req.finished {
            let backup = r.backup;
            self.restores.remove(&volume);
            ctx.object = format!("volume:vol-{volume} restored from backup:{backup}");
            return json(&serde_json::json!({"volume": volume, "restoring": false}));
        }
        ctx.skip_audit = true;
        r.done_manifests = req.done_manifests;
        r.done_chunks = req.done_chunks;
        json(&*r)
    }
}
