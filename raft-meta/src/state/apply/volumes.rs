//! Command handlers: volumes and their snapshots: create, show, resize, delete (crypto-shred).

use super::{
    internal, json, place_segments, snapshot_view, take, validate_create_volume, validate_name, validate_size,
    BTreeMap, BTreeSet, Command, CreateVolumeRequest, Ctx, ErrorCode, MetaState, Need, Refusal, ReleaseReason, Res,
    RootKey, ShredReport, Snapshot, SnapshotState, SnapshotView, Volume, VolumeView, WrappedKey,
};

impl MetaState {
    /// Runs a command of this domain (`execute` routes here).
    pub(super) fn execute_volumes(&mut self, ctx: &mut Ctx, cmd: &Command, root: &mut RootKey) -> Res {
        match cmd {
            Command::CreateVolume { tenant, req, wrapped_dek, tenant_key_version } => {
                self.create_volume(ctx, root, *tenant, req, wrapped_dek, *tenant_key_version)
            }
            Command::ListVolumes => {
                let list: Vec<VolumeView> = self
                    .volumes
                    .values()
                    .filter(|v| self.check_volume(&ctx.actor, v, Need::View).is_ok())
                    .map(|v| self.volume_view(v, ctx.now))
                    .collect();
                json(&list)
            }
            Command::GetVolume { volume } => {
                let v = self.volume_for(ctx, *volume)?;
                self.check_volume(&ctx.actor, v, Need::View)?;
                // An attachment's client polls its layout every few seconds: like a heartbeat,
                // that routine read is not audited (its attach and every change it makes are).
                if v.attachments.values().any(|a| Some(a.principal) == ctx.actor.principal) {
                    ctx.skip_audit = true;
                }
                json(&self.volume_view(v, ctx.now))
            }
            Command::ResizeVolume { volume, req } => self.resize_volume(ctx, *volume, req.size_bytes),
            Command::DeleteVolume { volume, force } => {
                let v = self.volume_for(ctx, *volume)?;
                self.check_volume(&ctx.actor, v, Need::Manage)?;
                if !v.attachments.is_empty() && !force {
                    return Err(Refusal::conflict(format!(
                        "vol-{volume} has {} live attachment(s); detach first or delete with force",
                        v.attachments.len()
                    )));
                }
                let tenant = v.tenant;
                self.shred(root, ctx, Some(tenant), None, &[*volume])?;
                json(&ShredReport {
                    deleted: format!("volume:vol-{volume}"),
                    root_epoch: self.root_epoch,
                    volumes_shredded: 1,
                })
            }
            Command::CreateSnapshot { volume, req } => {
                validate_name("snapshot name", &req.name, &[])?;
                let v = self.volume_for(ctx, *volume)?;
                self.check_volume(&ctx.actor, v, Need::Snapshot)?;
                if v.snapshots.values().any(|s| s.name == req.name) {
                    return Err(Refusal::conflict(format!("vol-{volume} has a snapshot named {:?}", req.name)));
                }
                let sid = take(&mut self.next.snapshot);
                let v = self.volumes.get_mut(volume).expect("checked");
                v.snapshot_epoch += 1;
                let snap = Snapshot {
                    id: sid,
                    name: req.name.clone(),
                    epoch: v.snapshot_epoch,
                    created_ms: ctx.now,
                    state: SnapshotState::Pending,
                    frozen_nodes: BTreeSet::new(),
                    ready_ms: None,
                    size_bytes: v.size_bytes,
                };
                v.snapshots.insert(sid, snap.clone());
                ctx.object = format!("volume:vol-{volume} snapshot:{sid}");
                json(&snapshot_view(*volume, &snap))
            }
            Command::ListSnapshots { volume } => {
                let v = self.volume_for(ctx, *volume)?;
                self.check_volume(&ctx.actor, v, Need::Snapshot)?;
                let list: Vec<SnapshotView> = v.snapshots.values().map(|s| snapshot_view(*volume, s)).collect();
                json(&list)
            }
            Command::DeleteSnapshot { volume, snapshot } => {
                let v = self.volume_for(ctx, *volume)?;
                self.check_volume(&ctx.actor, v, Need::Snapshot)?;
                if !v.snapshots.contains_key(snapshot) {
                    return Err(Refusal::not_found(format!("vol-{volume} has no snapshot {snapshot}")));
                }
                self.refuse_if_cloned(*volume, *snapshot)?;
                ctx.object = format!("volume:vol-{volume} snapshot:{snapshot}");
                let epoch = v.snapshots[snapshot].epoch;
                let work: Vec<(u64, u32)> =
                    v.segments.iter().flat_map(|s| s.replicas.iter().map(move |r| (r.node, s.index))).collect();
                let tenant = v.tenant;
                for (node, seg) in work {
                    self.queue_release(
                        ctx.now,
                        node,
                        (*volume, tenant, seg),
                        Some(epoch),
                        ReleaseReason::SnapshotDeleted,
                    );
                }
                self.volumes.get_mut(volume).expect("checked").snapshots.remove(snapshot);
                json(&serde_json::json!({"deleted": snapshot}))
            }
            _ => Err(internal("a command was routed to the volumes handlers by mistake")),
        }
    }

    pub(in crate::state) fn create_volume(
        &mut self,
        ctx: &mut Ctx,
        root: &RootKey,
        tenant: u64,
        req: &CreateVolumeRequest,
        wrapped_dek: &WrappedKey,
        key_version: u64,
    ) -> Res {
        validate_create_volume(req)?;
        ctx.object_tenant = Some(tenant);
        if req.tenant.is_some_and(|t| t != tenant) {
            return Err(Refusal::bad("tenant in the request does not match the command"));
        }
        if !ctx.actor.is_admin_of(tenant) {
            return Err(Refusal::forbidden(format!("creating volumes in tenant {tenant} needs its admin")));
        }
        let t = self.tenants.get(&tenant).ok_or_else(|| Refusal::not_found(format!("no tenant {tenant}")))?;
        if self.volumes.values().any(|v| v.tenant == tenant && v.name == req.name) {
            return Err(Refusal::conflict(format!("tenant {tenant} has a volume named {:?}", req.name)));
        }
        if key_version != t.key_version {
            return Err(Refusal::new(ErrorCode::KeyRotated, "tenant key rotated while proposing; retry"));
        }
        let tk = root.unwrap_tenant_key(&t.wrapped_key).map_err(|e| internal(e.to_string()))?;
        tk.unwrap_dek(wrapped_dek).map_err(|e| internal(e.to_string()))?;
        let level = req.failure_domain_level.unwrap_or(self.settings.placement_level);
        let segment_blocks = self.settings.segment_blocks;
        let mut cands = self.candidates();
        let segments = place_segments(&mut cands, 0, req.size_bytes, segment_blocks, req.replicas, level)?;
        let id = take(&mut self.next.volume);
        ctx.object = format!("volume:vol-{id}({})", req.name);
        self.charge(&segments, req.size_bytes, segment_blocks, true);
        self.volumes.insert(
            id,
            Volume {
                id,
                tenant,
                name: req.name.clone(),
                size_bytes: req.size_bytes,
                segment_blocks,
                replicas: req.replicas,
                level,
                qos: req.qos,
                created_ms: ctx.now,
                generation: 0,
                segments,
                attachments: BTreeMap::new(),
                snapshots: BTreeMap::new(),
                snapshot_epoch: 0,
                wrapped_dek: wrapped_dek.clone(),
                dek_created_ms: ctx.now,
                dek_wrapped_ms: ctx.now,
                parent: None,
            },
        );
        json(&self.volume_view(&self.volumes[&id], ctx.now))
    }

    pub(in crate::state) fn resize_volume(&mut self, ctx: &mut Ctx, volume: u64, size_bytes: u64) -> Res {
        validate_size(size_bytes)?;
        let v = self.volume_for(ctx, volume)?;
        self.check_volume(&ctx.actor, v, Need::Manage)?;
        if size_bytes < v.size_bytes {
            return Err(Refusal::bad(format!(
                "shrinking is not supported (vol-{volume} is {} bytes, asked {size_bytes})",
                v.size_bytes
            )));
        }
        let (old_size, seg_blocks, r, level) = (v.size_bytes, v.segment_blocks, v.replicas, v.level);
        let old_count = v.segments.len();
        let mut cands = self.candidates();
        // The last old segment may grow in place; only whole new segments need placement.
        let new_segments = place_segments(&mut cands, old_count as u32, size_bytes, seg_blocks, r, level)?;
        ctx.object = format!("volume:vol-{volume} {old_size}->{size_bytes}");
        // Account: drop old charges, add new ones for the full new layout.
        let old = self.volumes[&volume].segments.clone();
        self.charge(&old, old_size, seg_blocks, false);
        let v = self.volumes.get_mut(&volume).expect("checked");
        v.size_bytes = size_bytes;
        v.segments.extend(new_segments);
        let all = v.segments.clone();
        self.charge(&all, size_bytes, seg_blocks, true);
        json(&self.volume_view(&self.volumes[&volume], ctx.now))
    }

    /// Destroys key material: removes `victims` (volumes) and, if given, the
    /// tenant `delete_tenant`; rotates `rotate_tenant`'s key one-way; ratchets
    /// the root key and re-wraps every remaining tenant key under it. All
    /// unwraps are done before anything changes.
    pub(in crate::state) fn shred(
        &mut self,
        root: &mut RootKey,
        ctx: &mut Ctx,
        rotate_tenant: Option<u64>,
        delete_tenant: Option<u64>,
        victims: &[u64],
    ) -> Result<(), Refusal> {
        let mut tenant_keys = BTreeMap::new();
        for t in self.tenants.values() {
            if Some(t.id) == delete_tenant {
                continue;
            }
            tenant_keys.insert(t.id, root.unwrap_tenant_key(&t.wrapped_key).map_err(|e| internal(e.to_string()))?);
        }
        let mut rewrapped_deks = BTreeMap::new();
        if let Some(tid) = rotate_tenant {
            let t = &self.tenants[&tid];
            let old = &tenant_keys[&tid];
            let new = old.shred_successor(tid, t.key_version + 1);
            for v in self.volumes.values().filter(|v| v.tenant == tid && !victims.contains(&v.id)) {
                let dek = old.unwrap_dek(&v.wrapped_dek).map_err(|e| internal(e.to_string()))?;
                rewrapped_deks.insert(v.id, new.wrap_dek(&dek));
            }
            tenant_keys.insert(tid, new);
        }
        let next_root = root.ratchet();
        // Commit.
        let mut erasures = Vec::new();
        for id in victims {
            self.restores.remove(id);
            if let Some(v) = self.volumes.remove(id) {
                erasures.push((v.id, v.name.clone(), v.tenant, v.size_bytes));
                self.grants.retain(|_, g| g.volume != *id);
                // Clones still read through one of its snapshots: its segments stay (clones.rs).
                let Some(v) = self.retain_for_clones(v) else { continue };
                for s in &v.segments {
                    for r in &s.replicas {
                        self.queue_release(
                            ctx.now,
                            r.node,
                            (v.id, v.tenant, s.index),
                            None,
                            ReleaseReason::VolumeDeleted,
                        );
                    }
                }
                self.charge(&v.segments, v.size_bytes, v.segment_blocks, false);
            }
        }
        self.release_unread_parents(ctx.now);
        if let Some(tid) = delete_tenant {
            self.tenants.remove(&tid);
            let gone: BTreeSet<u64> =
                self.principals.values().filter(|p| p.tenant == Some(tid)).map(|p| p.id).collect();
            self.principals.retain(|id, _| !gone.contains(id));
            self.tokens.retain(|_, t| !gone.contains(&t.principal));
            self.grants.retain(|_, g| !gone.contains(&g.principal));
        }
        for (vid, w) in rewrapped_deks {
            let v = self.volumes.get_mut(&vid).expect("listed");
            v.wrapped_dek = w;
            v.dek_wrapped_ms = ctx.now;
        }
        for (tid, key) in &tenant_keys {
            let t = self.tenants.get_mut(tid).expect("listed");
            t.wrapped_key = next_root.wrap_tenant_key(key);
            if Some(*tid) == rotate_tenant {
                t.key_version += 1;
                t.key_created_ms = ctx.now;
            }
        }
        *root = next_root;
        self.root_epoch = root.epoch();
        self.root_epoch_index = self.applied_index;
        for (id, name, tenant, size) in erasures {
            self.open_erasure(ctx, id, &name, tenant, size);
        }
        ctx.shredded = true;
        Ok(())
    }
}
