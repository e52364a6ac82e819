//! Command handlers: attachments: attach and fencing, detach, capabilities, replica failure and rebuild.

use super::{
    internal, json, placement, segment_bytes, take, validate_host, AttachGrant, AttachMode, AttachRequest, Attachment,
    BTreeSet, Command, Ctx, ErrorCode, KeyRelease, MetaState, Need, ReconfigureResult, RefreshGrant, Refusal,
    ReleaseReason, Replica, ReplicaState, Res, SnapshotState,
};

impl MetaState {
    /// Runs a command of this domain (`execute` routes here).
    pub(super) fn execute_attachments(&mut self, ctx: &mut Ctx, cmd: &Command) -> Res {
        match cmd {
            Command::Attach { volume, req } => self.attach(ctx, *volume, req),
            Command::Detach { volume, req } => {
                let v = self.volume_for(ctx, *volume)?;
                let a = v
                    .attachments
                    .get(&req.attachment)
                    .ok_or_else(|| Refusal::not_found(format!("vol-{volume} has no attachment {}", req.attachment)))?;
                if !(ctx.actor.is_admin_of(v.tenant) || ctx.actor.principal == Some(a.principal)) {
                    return Err(Refusal::forbidden("only the attachment's holder or the tenant admin may detach"));
                }
                ctx.object = format!("volume:vol-{volume} attachment:{}", req.attachment);
                self.volumes.get_mut(volume).expect("checked").attachments.remove(&req.attachment);
                json(&serde_json::json!({"detached": req.attachment}))
            }
            Command::RefreshCapability { volume, attachment } => {
                let v = self.volume_for(ctx, *volume)?;
                let a = v
                    .attachments
                    .get(attachment)
                    .ok_or_else(|| Refusal::not_found(format!("vol-{volume} has no attachment {attachment}")))?;
                if ctx.actor.principal != Some(a.principal) && !ctx.actor.is_admin_of(v.tenant) {
                    return Err(Refusal::forbidden("only the attachment's holder may refresh its capability"));
                }
                json(&RefreshGrant { claims: self.claims(v, a), parent: self.parent_grant(v, ctx.now) })
            }
            Command::ReportFailure { volume, req } => self.report_failure(ctx, *volume, req.segment, req.node),
            Command::MarkInSync { volume, req } => {
                let v = self.volume_for(ctx, *volume)?;
                self.check_volume(&ctx.actor, v, Need::Reconfigure)?;
                Self::require_current_writer(&ctx.actor, v)?;
                let seg = v
                    .segments
                    .get(req.segment as usize)
                    .ok_or_else(|| Refusal::not_found(format!("vol-{volume} has no segment {}", req.segment)))?;
                if !seg.replicas.iter().any(|r| r.node == req.node) {
                    return Err(Refusal::not_found(format!(
                        "node {} holds no replica of segment {}",
                        req.node, req.segment
                    )));
                }
                Self::require_rebuilding(v, req.segment, req.node)?;
                ctx.object = format!("volume:vol-{volume} segment:{} node:{}", req.segment, req.node);
                let v = self.volumes.get_mut(volume).expect("checked");
                let seg = &mut v.segments[req.segment as usize];
                for r in &mut seg.replicas {
                    if r.node == req.node {
                        r.state = ReplicaState::InSync;
                        r.rebuild_done_blocks = r.rebuild_total_blocks;
                    }
                }
                self.finish_moves(ctx.now);
                let v = &self.volumes[volume];
                json(&self.segment_view(v, &v.segments[req.segment as usize]))
            }
            _ => Err(internal("a command was routed to the attachments handlers by mistake")),
        }
    }

    pub(in crate::state) fn attach(&mut self, ctx: &mut Ctx, volume: u64, req: &AttachRequest) -> Res {
        validate_host(&req.host)?;
        let v = self.volume_for(ctx, volume)?;
        let need = match req.mode {
            AttachMode::ReadWrite => Need::AttachRw,
            AttachMode::ReadOnly => Need::AttachRo,
        };
        self.check_volume(&ctx.actor, v, need)?;
        let rw_holders: Vec<u64> =
            v.attachments.values().filter(|a| a.mode == AttachMode::ReadWrite).map(|a| a.id).collect();
        if req.mode == AttachMode::ReadWrite && !rw_holders.is_empty() && !req.force {
            let a = &v.attachments[&rw_holders[0]];
            return Err(Refusal::conflict(format!(
                "vol-{volume} is attached read-write by attachment {} (host {}, generation {}); use force to take over",
                a.id, a.host, a.generation
            )));
        }
        if req.mode == AttachMode::ReadWrite && rw_holders.is_empty() {
            if let Some(s) = v.snapshots.values().find(|s| s.state == SnapshotState::Pending) {
                // The nodes are freezing a detached volume: no writer may start in between.
                return Err(Refusal::new(
                    ErrorCode::Unavailable,
                    format!("snapshot {:?} of vol-{volume} is being frozen on its nodes; retry in a moment", s.name),
                ));
            }
        }
        let t = self.tenants.get(&v.tenant).ok_or_else(|| internal("volume's tenant is missing"))?;
        // Not unwrapped here: every replica applies this; only the proposer opens the release.
        let release = KeyRelease {
            root_epoch: self.root_epoch,
            wrapped_tenant_key: t.wrapped_key.clone(),
            wrapped_dek: v.wrapped_dek.clone(),
        };
        let aid = take(&mut self.next.attachment);
        let principal = ctx.actor.principal.unwrap_or(0);
        let v = self.volumes.get_mut(&volume).expect("checked");
        if req.mode == AttachMode::ReadWrite {
            for old in &rw_holders {
                v.attachments.remove(old);
            }
            v.generation += 1;
        }
        let a = Attachment {
            id: aid,
            principal,
            host: req.host.clone(),
            mode: req.mode,
            generation: v.generation,
            attached_ms: ctx.now,
        };
        v.attachments.insert(aid, a.clone());
        ctx.object = if rw_holders.is_empty() || req.mode == AttachMode::ReadOnly {
            format!("volume:vol-{volume} attachment:{aid} {:?} generation:{}", req.mode, a.generation)
        } else {
            format!(
                "volume:vol-{volume} attachment:{aid} forced takeover from {rw_holders:?} generation:{}",
                a.generation
            )
        };
        ctx.release = Some(release);
        if req.insecure_plaintext_nbd {
            // The operator chose to serve the decrypted volume over TCP without TLS.
            ctx.object.push_str(" nbd:insecure-plaintext-tcp");
        }
        let v = &self.volumes[&volume];
        let parent = self.parent_grant(v, ctx.now);
        if let Some(p) = &parent {
            use std::fmt::Write as _;
            let _ = write!(ctx.object, " reads parent vol-{} at epoch:{} read-only", p.volume.id, p.epoch);
        }
        json(&AttachGrant {
            attachment: a.clone(),
            volume: self.volume_view(v, ctx.now),
            claims: self.claims(v, &a),
            parent,
        })
    }

    pub(in crate::state) fn report_failure(&mut self, ctx: &mut Ctx, volume: u64, segment: u32, node: u64) -> Res {
        let v = self.volume_for(ctx, volume)?;
        self.check_volume(&ctx.actor, v, Need::Reconfigure)?;
        Self::require_current_writer(&ctx.actor, v)?;
        let seg = v
            .segments
            .get(segment as usize)
            .ok_or_else(|| Refusal::not_found(format!("vol-{volume} has no segment {segment}")))?;
        ctx.object = format!("volume:vol-{volume} segment:{segment} failed node:{node}");
        let replaced = if seg.replicas.iter().any(|r| r.node == node) {
            Some(self.replace_replica(ctx.now, volume, segment, node)?)
        } else {
            None
        };
        if let Some(n) = replaced {
            use std::fmt::Write as _;
            let _ = write!(ctx.object, " replaced by node:{n}");
        }
        let v = &self.volumes[&volume];
        let claims = v
            .attachments
            .values()
            .filter(|a| Some(a.principal) == ctx.actor.principal)
            .max_by_key(|a| a.id)
            .map(|a| self.claims(v, a));
        json(&ReconfigureResult {
            replaced: replaced.is_some(),
            new_node: replaced,
            segment: self.segment_view(v, &v.segments[segment as usize]),
            claims,
        })
    }

    /// Replaces `failed` in a segment's replica set by a node in a failure
    /// domain none of the survivors use. Bumps the segment's epoch.
    pub(in crate::state) fn replace_replica(
        &mut self,
        now: u64,
        volume: u64,
        segment: u32,
        failed: u64,
    ) -> Result<u64, Refusal> {
        let v = &self.volumes[&volume];
        let seg = &v.segments[segment as usize];
        let level = v.level;
        let taken: BTreeSet<String> = seg
            .replicas
            .iter()
            .filter(|r| r.node != failed)
            .filter_map(|r| self.nodes.get(&r.node))
            .map(|n| placement::domain_at(&n.failure_domain, level))
            .collect();
        // Nodes that still hold an unreleased copy of this segment are out too: the release
        // would destroy the new replica.
        let mut excluded: BTreeSet<u64> = seg.replicas.iter().map(|r| r.node).collect();
        excluded.extend(self.nodes.keys().copied().filter(|n| self.release_pending_on(*n, volume, segment)));
        let bytes = segment_bytes(v.size_bytes, v.segment_blocks, segment);
        let mut cands = self.candidates();
        let picked = placement::place(&mut cands, 1, level, &taken, &excluded, bytes)
            .map_err(|e| Refusal::new(ErrorCode::Unsatisfiable, format!("no replacement replica: {e}")))?;
        let new = picked[0];
        let tenant = v.tenant;
        self.queue_release(now, failed, (volume, tenant, segment), None, ReleaseReason::ReplicaReplaced);
        let v = self.volumes.get_mut(&volume).expect("exists");
        let seg = &mut v.segments[segment as usize];
        for r in &mut seg.replicas {
            if r.node == failed {
                *r = Replica::new(new, ReplicaState::Rebuilding);
            }
        }
        seg.epoch += 1;
        if let Some(n) = self.nodes.get_mut(&failed) {
            n.allocated_bytes = n.allocated_bytes.saturating_sub(bytes);
        }
        if let Some(n) = self.nodes.get_mut(&new) {
            n.allocated_bytes += bytes;
        }
        Ok(new)
    }
}
