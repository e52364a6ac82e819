//! The operator's flows on storage: drain (move every replica off a node,
//! never below R in-sync copies), decommission (overwrite, verify and certify a
//! drained disk), scrub requests and reports, and rebuild progress.
//!
//! A move adds the target as a `rebuilding` member of the segment (R+1 members);
//! the copy is made by the attached client's rebuild, or, when no client holds the
//! volume read-write, by a mover on the target node under the volume's current
//! generation. Only when the target is in sync does the source leave the set and go
//! to the release queue. Everything is in the replicated state, so a drain survives
//! the loss of the leader, the mover or the client, and picks up where it was.

use super::apply::{json, require_operator, segment_bytes, Ctx, Need, Res};
use super::command::{ErrorCode, RebuildProgressRequest, Refusal};
use super::types::{AttachMode, Decommission, DiskState, Drain, Move, NodeState, Replica, ReplicaState};
use super::view::{DecommissionView, DrainState, DrainView, MoveView};
use super::{take, MetaState};
use crate::audit::AuditEntry;
use crate::placement;
use slate_protocol::ops::{
    CopyTask, DecommissionReport, DecommissionTask, EraseSummary, MoveReport, PeerReplica, ReleaseReason, RepairSource,
    RepairSourceRequest, ScrubReport, ScrubRequest,
};
use slate_protocol::BLOCK_SIZE_BYTES_U64;
use std::collections::BTreeSet;

/// Moves in flight per draining node (the rate limit of a drain in segments; the
/// mover's byte rate is limited on the node).
pub const MOVES_PER_NODE: usize = 2;

impl MetaState {
    fn audit_system(&mut self, now: u64, tenant: Option<u64>, action: &str, object: String, result: String) {
        self.audit.append(AuditEntry {
            time_ms: now,
            actor: "system".into(),
            tenant,
            client: "-".into(),
            action: action.into(),
            object,
            result,
        });
    }

    /// A node by id or name.
    pub(super) fn node_id_of(&self, node: u64) -> Result<u64, Refusal> {
        if self.nodes.contains_key(&node) {
            Ok(node)
        } else {
            Err(Refusal::not_found(format!("no node {node}")))
        }
    }

    // ----- drain -----

    /// Segments (volume, segment) with a replica on `node`.
    fn segments_on(&self, node: u64) -> Vec<(u64, u32)> {
        self.volumes
            .values()
            .flat_map(|v| v.segments.iter().map(move |s| (v.id, s)))
            .filter(|(_, s)| s.replicas.iter().any(|r| r.node == node))
            .map(|(v, s)| (v, s.index))
            .collect()
    }

    /// A target for moving `volume`'s `segment` off `from`: a node in a failure domain
    /// none of the other members use.
    fn move_target(&self, volume: u64, segment: u32, from: u64) -> Result<u64, String> {
        let v = &self.volumes[&volume];
        let seg = &v.segments[segment as usize];
        let taken: BTreeSet<String> = seg
            .replicas
            .iter()
            .filter(|r| r.node != from)
            .filter_map(|r| self.nodes.get(&r.node))
            .map(|n| placement::domain_at(&n.failure_domain, v.level))
            .collect();
        let mut excluded: BTreeSet<u64> = seg.replicas.iter().map(|r| r.node).collect();
        excluded.extend(self.nodes.keys().copied().filter(|n| self.release_pending_on(*n, volume, segment)));
        let bytes = segment_bytes(v.size_bytes, v.segment_blocks, segment);
        let mut cands = self.candidates();
        placement::place(&mut cands, 1, v.level, &taken, &excluded, bytes)
            .map(|p| p[0])
            .map_err(|e| format!("segment {segment} of vol-{volume}: {e}"))
    }

    pub(super) fn drain_node(&mut self, ctx: &mut Ctx, node: u64) -> Res {
        require_operator(&ctx.actor)?;
        let node = self.node_id_of(node)?;
        let n = &self.nodes[&node];
        match n.state {
            NodeState::Draining if n.drain.as_ref().is_some_and(|d| d.completed_ms.is_none()) => {
                return Err(Refusal::conflict(format!("node {} is already being drained", n.name)));
            }
            NodeState::Decommissioned => {
                return Err(Refusal::conflict(format!("node {} is decommissioned", n.name)));
            }
            _ => {}
        }
        ctx.object = format!("node:node-{node}({})", n.name);
        self.refuse_if_retained_on(node)?;
        // Every replica must have somewhere to go, now, without this node.
        let segments = self.segments_on(node);
        let mut plan = self.clone();
        plan.nodes.get_mut(&node).expect("exists").state = NodeState::Draining;
        for (v, s) in &segments {
            plan.move_target(*v, *s, node).map_err(|e| {
                Refusal::new(
                    ErrorCode::Unsatisfiable,
                    format!(
                        "draining {} would leave no node for {e}; add a node in another failure domain first",
                        self.nodes[&node].name
                    ),
                )
            })?;
        }
        let n = self.nodes.get_mut(&node).expect("exists");
        n.state = NodeState::Draining;
        n.drain = Some(Drain {
            started_ms: ctx.now,
            operator: ctx.actor.label(),
            replicas_total: segments.len() as u64,
            replicas_moved: 0,
            completed_ms: None,
            blocked: None,
        });
        let _ = ctx.object.len();
        self.drain_step(ctx.now);
        json(&self.drain_view(node))
    }

    /// True if some drain has work a leader should push (a system `DrainStep`).
    pub fn drain_due(&self) -> bool {
        self.nodes.values().any(|n| n.drain.as_ref().is_some_and(|d| d.completed_ms.is_none()))
    }

    /// Starts moves up to the per-node limit, finishes those whose target is in sync,
    /// and closes drains with nothing left. Deterministic: runs inside `apply`.
    pub(super) fn drain_step(&mut self, now: u64) {
        self.finish_moves(now);
        let draining: Vec<u64> = self
            .nodes
            .values()
            .filter(|n| n.state == NodeState::Draining && n.drain.as_ref().is_some_and(|d| d.completed_ms.is_none()))
            .map(|n| n.id)
            .collect();
        for node in draining {
            let moving: BTreeSet<(u64, u32)> =
                self.moves.values().filter(|m| m.from == node).map(|m| (m.volume, m.segment)).collect();
            let mut room = MOVES_PER_NODE.saturating_sub(moving.len());
            let mut blocked = None;
            for (vol, seg) in self.segments_on(node) {
                if room == 0 {
                    break;
                }
                if moving.contains(&(vol, seg)) {
                    continue;
                }
                let to = match self.move_target(vol, seg, node) {
                    Ok(t) => t,
                    Err(e) => {
                        blocked = Some(e);
                        continue;
                    }
                };
                room -= 1;
                self.start_move(now, vol, seg, node, to);
            }
            let left = self.replicas_on(node);
            let n = self.nodes.get_mut(&node).expect("listed");
            let d = n.drain.as_mut().expect("draining");
            d.blocked = blocked;
            if left == 0 && !self.moves.values().any(|m| m.from == node) {
                d.completed_ms = Some(now);
                let (moved, name) = (d.replicas_moved, n.name.clone());
                self.audit_system(
                    now,
                    None,
                    "node.drained",
                    format!("node:node-{node}({name})"),
                    format!("ok: {moved} replica(s) moved off; the node holds none"),
                );
            }
        }
    }

    fn start_move(&mut self, now: u64, volume: u64, segment: u32, from: u64, to: u64) {
        let id = take(&mut self.next.moves);
        let v = self.volumes.get_mut(&volume).expect("listed");
        let bytes = segment_bytes(v.size_bytes, v.segment_blocks, segment);
        let seg = &mut v.segments[segment as usize];
        seg.replicas.push(Replica::new(to, ReplicaState::Rebuilding));
        seg.epoch += 1;
        let tenant = v.tenant;
        if let Some(n) = self.nodes.get_mut(&to) {
            n.allocated_bytes += bytes;
        }
        self.moves.insert(
            id,
            Move {
                id,
                volume,
                segment,
                from,
                to,
                started_ms: now,
                done_blocks: 0,
                total_blocks: bytes / BLOCK_SIZE_BYTES_U64,
            },
        );
        self.audit_system(
            now,
            Some(tenant),
            "segment.move_start",
            format!("volume:vol-{volume} segment:{segment} from node:{from} to node:{to} move:{id}"),
            "ok".into(),
        );
    }

    /// Completes moves whose target is in sync (the source leaves the set and is
    /// released); forgets moves whose volume or target is gone (they restart).
    pub(super) fn finish_moves(&mut self, now: u64) {
        let ids: Vec<u64> = self.moves.keys().copied().collect();
        for id in ids {
            let m = self.moves[&id].clone();
            let Some(v) = self.volumes.get(&m.volume) else {
                self.moves.remove(&id);
                continue;
            };
            let seg = &v.segments[m.segment as usize];
            let target = seg.replicas.iter().find(|r| r.node == m.to).copied();
            let source_there = seg.replicas.iter().any(|r| r.node == m.from);
            match target {
                None => {
                    // The target failed and was replaced: a rebuilding member stands in for it.
                    match seg.replicas.iter().find(|r| r.state == ReplicaState::Rebuilding && r.node != m.from) {
                        Some(r) => self.moves.get_mut(&id).expect("listed").to = r.node,
                        None => {
                            self.moves.remove(&id);
                        }
                    }
                }
                Some(t) if t.state == ReplicaState::InSync => {
                    let in_sync_others =
                        seg.replicas.iter().filter(|r| r.node != m.from && r.state == ReplicaState::InSync).count();
                    if in_sync_others < usize::from(v.replicas) {
                        continue;
                    }
                    let (tenant, bytes) = (v.tenant, segment_bytes(v.size_bytes, v.segment_blocks, m.segment));
                    let v = self.volumes.get_mut(&m.volume).expect("listed");
                    let seg = &mut v.segments[m.segment as usize];
                    if source_there {
                        seg.replicas.retain(|r| r.node != m.from);
                        seg.epoch += 1;
                        if let Some(n) = self.nodes.get_mut(&m.from) {
                            n.allocated_bytes = n.allocated_bytes.saturating_sub(bytes);
                            if let Some(d) = n.drain.as_mut() {
                                d.replicas_moved += 1;
                            }
                        }
                        self.queue_release(
                            now,
                            m.from,
                            (m.volume, tenant, m.segment),
                            None,
                            ReleaseReason::ReplicaMoved,
                        );
                    }
                    self.moves.remove(&id);
                    self.audit_system(
                        now,
                        Some(tenant),
                        "segment.moved",
                        format!(
                            "volume:vol-{} segment:{} from node:{} to node:{} move:{id}",
                            m.volume, m.segment, m.from, m.to
                        ),
                        "ok: target in sync; source released".into(),
                    );
                }
                Some(_) => {}
            }
        }
    }

    /// Copies `node` must make as a mover: moves onto it of volumes no client holds read-write.
    pub(super) fn copy_tasks(&self, node: u64) -> Vec<CopyTask> {
        self.moves
            .values()
            .filter(|m| m.to == node)
            .filter_map(|m| {
                let v = self.volumes.get(&m.volume)?;
                if v.attachments.values().any(|a| a.mode == AttachMode::ReadWrite) {
                    return None;
                }
                let seg = &v.segments[m.segment as usize];
                if !seg.replicas.iter().any(|r| r.node == m.to && r.state == ReplicaState::Rebuilding) {
                    return None;
                }
                // Copy from the source, or any in-sync member if the source is gone.
                let src = seg
                    .replicas
                    .iter()
                    .filter(|r| r.state == ReplicaState::InSync)
                    .map(|r| r.node)
                    .find(|n| *n == m.from)
                    .or_else(|| seg.replicas.iter().find(|r| r.state == ReplicaState::InSync).map(|r| r.node))?;
                let first_block = u64::from(m.segment) * v.segment_blocks;
                Some(CopyTask {
                    id: m.id,
                    volume: m.volume,
                    segment: m.segment,
                    segment_blocks: v.segment_blocks,
                    first_block,
                    blocks: m.total_blocks,
                    generation: v.generation,
                    source_node: src,
                    source_addr: self.nodes.get(&src).map(|n| n.addr.clone()).unwrap_or_default(),
                    capability: String::new(),
                })
            })
            .collect()
    }

    pub(super) fn report_move(&mut self, ctx: &mut Ctx, node: u64, id: u64, report: &MoveReport) -> Res {
        if !ctx.actor.sends_node_traffic() {
            return Err(Refusal::forbidden("move reports come from storage nodes"));
        }
        let m = self.moves.get(&id).ok_or_else(|| Refusal::not_found(format!("no move {id} in flight")))?.clone();
        if m.to != node {
            return Err(Refusal::bad(format!("move {id} copies onto node {}, not node {node}", m.to)));
        }
        let v = self.volumes.get(&m.volume).ok_or_else(|| Refusal::not_found("the volume is gone"))?;
        ctx.object_tenant = Some(v.tenant);
        ctx.object = format!("volume:vol-{} segment:{} node:{node} move:{id}", m.volume, m.segment);
        match report {
            MoveReport::Progress { done_blocks, total_blocks } => {
                ctx.skip_audit = true;
                let mm = self.moves.get_mut(&id).expect("checked");
                mm.done_blocks = *done_blocks;
                mm.total_blocks = *total_blocks;
                self.set_rebuild_progress(m.volume, m.segment, node, *done_blocks, *total_blocks);
            }
            MoveReport::Failed { message } => {
                use std::fmt::Write as _;
                let _ = write!(ctx.object, " failed: {}", message.chars().take(200).collect::<String>());
            }
            MoveReport::Copied { blocks_copied, generation } => {
                let attached = v.attachments.values().any(|a| a.mode == AttachMode::ReadWrite);
                if *generation != v.generation || attached {
                    // A client attached meanwhile: its rebuild owns the copy now.
                    return Err(Refusal::conflict(format!(
                        "vol-{} is at generation {} (copied under {generation}){}; the client's rebuild takes over",
                        m.volume,
                        v.generation,
                        if attached { ", attached" } else { "" }
                    )));
                }
                use std::fmt::Write as _;
                let _ = write!(ctx.object, " copied blocks:{blocks_copied} generation:{generation}");
                let v = self.volumes.get_mut(&m.volume).expect("checked");
                for r in &mut v.segments[m.segment as usize].replicas {
                    if r.node == node {
                        r.state = ReplicaState::InSync;
                        r.rebuild_done_blocks = r.rebuild_total_blocks;
                    }
                }
                self.drain_step(ctx.now);
            }
        }
        json(&serde_json::json!({"move": id}))
    }

    fn set_rebuild_progress(&mut self, volume: u64, segment: u32, node: u64, done: u64, total: u64) {
        if let Some(v) = self.volumes.get_mut(&volume) {
            if let Some(s) = v.segments.get_mut(segment as usize) {
                for r in &mut s.replicas {
                    if r.node == node && r.state == ReplicaState::Rebuilding {
                        r.rebuild_done_blocks = done.min(total);
                        r.rebuild_total_blocks = total;
                    }
                }
            }
        }
        for m in self.moves.values_mut() {
            if m.volume == volume && m.segment == segment && m.to == node {
                m.done_blocks = done.min(total);
                m.total_blocks = total;
            }
        }
    }

    pub(super) fn rebuild_progress(&mut self, ctx: &mut Ctx, volume: u64, req: &RebuildProgressRequest) -> Res {
        let v = self.volume_for(ctx, volume)?;
        self.check_volume(&ctx.actor, v, Need::Reconfigure)?;
        if v.segments.get(req.segment as usize).is_none() {
            return Err(Refusal::not_found(format!("vol-{volume} has no segment {}", req.segment)));
        }
        ctx.skip_audit = true;
        self.set_rebuild_progress(volume, req.segment, req.node, req.done_blocks, req.total_blocks);
        json(&serde_json::json!({"segment": req.segment, "node": req.node}))
    }

    pub(super) fn drain_view(&self, node: u64) -> DrainView {
        let n = &self.nodes[&node];
        let moves = self
            .moves
            .values()
            .filter(|m| m.from == node)
            .map(|m| MoveView {
                id: m.id,
                volume: m.volume,
                segment: m.segment,
                to: m.to,
                started_ms: m.started_ms,
                done_blocks: m.done_blocks,
                total_blocks: m.total_blocks,
            })
            .collect();
        let d = n.drain.as_ref();
        DrainView {
            node,
            node_name: n.name.clone(),
            state: match d {
                None => DrainState::None,
                Some(d) if d.completed_ms.is_some() => DrainState::Complete,
                Some(d) if d.blocked.is_some() => DrainState::Blocked,
                Some(_) => DrainState::Draining,
            },
            started_ms: d.map(|d| d.started_ms),
            completed_ms: d.and_then(|d| d.completed_ms),
            replicas_total: d.map_or(0, |d| d.replicas_total),
            replicas_moved: d.map_or(0, |d| d.replicas_moved),
            replicas_left: self.replicas_on(node),
            blocked: d.and_then(|d| d.blocked.clone()),
            moves,
        }
    }

    // ----- decommission -----

    pub(super) fn decommission_disk(&mut self, ctx: &mut Ctx, disk: u64) -> Res {
        require_operator(&ctx.actor)?;
        let d = self.disks.get(&disk).ok_or_else(|| Refusal::not_found(format!("no disk {disk}")))?;
        ctx.object = format!("disk:{disk}({}) node:node-{}", d.name, d.node);
        match d.state {
            DiskState::Decommissioned => {
                return Err(Refusal::conflict(format!("disk {} is already decommissioned", d.name)))
            }
            DiskState::Decommissioning => {
                return Err(Refusal::conflict(format!("disk {} is already being decommissioned", d.name)))
            }
            DiskState::Active => {}
        }
        let node = d.node;
        let holds = self.replicas_on(node);
        if holds > 0 {
            return Err(Refusal::conflict(format!(
                "disk {} (node {}) still holds {holds} replica(s); drain it first (slate disk drain {})",
                d.name,
                self.nodes.get(&node).map_or_else(|| node.to_string(), |n| n.name.clone()),
                d.name
            )));
        }
        if self.moves.values().any(|m| m.to == node || m.from == node) {
            return Err(Refusal::conflict("a replica move onto or off this disk's node is in flight"));
        }
        self.refuse_if_retained_on(node)?;
        let d = self.disks.get_mut(&disk).expect("checked");
        d.state = DiskState::Decommissioning;
        d.decommission = Some(Decommission {
            requested_ms: ctx.now,
            operator: ctx.actor.label(),
            stage: "queued".into(),
            bytes_done: 0,
            bytes_total: d.capacity_bytes,
            failure: None,
            finished_ms: None,
            certificate: None,
            certificate_sha256: None,
        });
        if let Some(n) = self.nodes.get_mut(&node) {
            if n.state == NodeState::Active {
                n.state = NodeState::Draining;
            }
        }
        json(&self.decommission_view(disk))
    }

    /// The decommission `node` must run, if any.
    pub(super) fn decommission_task(&self, node: u64) -> Option<DecommissionTask> {
        self.disks
            .values()
            .find(|d| d.node == node && d.state == DiskState::Decommissioning)
            .map(|d| DecommissionTask { disk: d.id, disk_name: d.name.clone() })
    }

    pub(super) fn report_decommission(&mut self, ctx: &mut Ctx, disk: u64, report: &DecommissionReport) -> Res {
        if !ctx.actor.sends_node_traffic() {
            return Err(Refusal::forbidden("decommission reports come from storage nodes"));
        }
        let d = self.disks.get(&disk).ok_or_else(|| Refusal::not_found(format!("no disk {disk}")))?;
        if d.state != DiskState::Decommissioning {
            return Err(Refusal::conflict(format!("disk {} is not being decommissioned", d.name)));
        }
        ctx.object = format!("disk:{disk}({}) node:node-{}", d.name, d.node);
        let node = d.node;
        match report {
            DecommissionReport::Progress { stage, bytes_done, bytes_total } => {
                ctx.skip_audit = true;
                let dc = self.disks.get_mut(&disk).expect("checked").decommission.as_mut().expect("decommissioning");
                dc.stage = stage.chars().take(32).collect();
                dc.bytes_done = *bytes_done;
                dc.bytes_total = *bytes_total;
                json(&self.decommission_view(disk))
            }
            DecommissionReport::Failed { message } => {
                let dc = self.disks.get_mut(&disk).expect("checked").decommission.as_mut().expect("decommissioning");
                dc.stage = "failed".into();
                dc.failure = Some(message.chars().take(500).collect());
                json(&self.decommission_view(disk))
            }
            DecommissionReport::Done { erase } => {
                if erase.mismatched_bytes != 0 || erase.bytes_verified < erase.size_bytes {
                    let why = format!(
                        "verification failed: {} of {} bytes checked, {} not zero",
                        erase.bytes_verified, erase.size_bytes, erase.mismatched_bytes
                    );
                    let dc =
                        self.disks.get_mut(&disk).expect("checked").decommission.as_mut().expect("decommissioning");
                    dc.stage = "failed".into();
                    dc.failure = Some(why.clone());
                    return Err(Refusal::new(ErrorCode::Conflict, why));
                }
                let body = self.certificate_body(ctx, disk, erase);
                let sha = slate_protocol::certificate::body_sha256(&body);
                let d = self.disks.get_mut(&disk).expect("checked");
                d.state = DiskState::Decommissioned;
                let dc = d.decommission.as_mut().expect("decommissioning");
                dc.stage = "done".into();
                dc.bytes_done = erase.size_bytes;
                dc.bytes_total = erase.size_bytes;
                dc.finished_ms = Some(ctx.now);
                dc.certificate = Some(body);
                dc.certificate_sha256 = Some(sha.clone());
                if self.disks.values().filter(|d| d.node == node).all(|d| d.state == DiskState::Decommissioned) {
                    if let Some(n) = self.nodes.get_mut(&node) {
                        n.state = NodeState::Decommissioned;
                    }
                }
                // The whole device was overwritten and read back: anything still queued for
                // release on it is erased too.
                for r in self.releases.values_mut().filter(|r| r.node == node && r.outstanding()) {
                    r.released_ms.get_or_insert(ctx.now);
                    r.erased_ms = Some(ctx.now);
                    r.verified_extents = r.extents.len() as u64;
                }
                self.complete_erasures(ctx.now);
                use std::fmt::Write as _;
                let _ = write!(ctx.object, " certificate_sha256:{sha}");
                json(&self.decommission_view(disk))
            }
        }
    }

    /// The certificate's body: the fields of NIST SP 800-88 Rev. 2 / IEEE 2883 records.
    /// Built in `apply` (deterministic; serde_json keeps keys sorted), signed by the API.
    fn certificate_body(&self, ctx: &Ctx, disk: u64, e: &EraseSummary) -> serde_json::Value {
        let d = &self.disks[&disk];
        let n = self.nodes.get(&d.node);
        let operator = d.decommission.as_ref().map_or_else(|| ctx.actor.label(), |dc| dc.operator.clone());
        serde_json::json!({
            "kind": "slate-erase-certificate",
            "version": 1,
            "serial": format!("disk-{disk}-{}", ctx.now),
            "standards": ["NIST SP 800-88 Rev. 2", "IEEE 2883-2022"],
            "cluster": {
                "meta_voters": self.meta_voters,
                "root_key_epoch": self.root_epoch,
            },
            "device": {
                "disk_id": disk,
                "disk_name": d.name,
                "node_id": d.node,
                "node_name": n.map(|n| n.name.clone()),
                "failure_domain": n.map(|n| n.failure_domain.clone()),
                "path": e.device_path,
                "kind": e.device_kind,
                "size_bytes": e.size_bytes,
                "identity": e.identity,
            },
            "sanitization": {
                "category": "Clear",
                "scope": if e.device_kind == "file" {
                    "the file's whole logical content (a file-backed disk: blocks the filesystem beneath once held are outside this operation's reach)"
                } else {
                    "every addressable block of the device"
                },
                "technique": e.technique,
                "device_primitive": e.method,
                "bytes_written": e.bytes_written,
                "tool": e.tool,
                "tool_version": e.tool_version,
            },
            "started_ms": e.started_ms,
            "finished_ms": e.finished_ms,
            "verification": {
                "method": "full read-back of every byte of the device, compared with zero",
                "bytes_checked": e.bytes_verified,
                "mismatched_bytes": e.mismatched_bytes,
                "first_mismatch_offset": e.first_mismatch_offset,
                "result": if e.mismatched_bytes == 0 { "pass" } else { "fail" },
            },
            "operator": operator,
            "reported_by": ctx.actor.label(),
            "issued_ms": ctx.now,
        })
    }

    pub(super) fn decommission_view(&self, disk: u64) -> DecommissionView {
        let d = &self.disks[&disk];
        let dc = d.decommission.as_ref();
        DecommissionView {
            disk,
            disk_name: d.name.clone(),
            node: d.node,
            state: d.state,
            stage: dc.map_or_else(|| "none".into(), |x| x.stage.clone()),
            requested_ms: dc.map(|x| x.requested_ms),
            operator: dc.map(|x| x.operator.clone()),
            bytes_done: dc.map_or(0, |x| x.bytes_done),
            bytes_total: dc.map_or(0, |x| x.bytes_total),
            failure: dc.and_then(|x| x.failure.clone()),
            finished_ms: dc.and_then(|x| x.finished_ms),
            certificate_sha256: dc.and_then(|x| x.certificate_sha256.clone()),
        }
    }

    pub(super) fn certificate(&self, ctx: &mut Ctx, disk: u64) -> Res {
        require_operator(&ctx.actor)?;
        let d = self.disks.get(&disk).ok_or_else(|| Refusal::not_found(format!("no disk {disk}")))?;
        let dc = d.decommission.as_ref().and_then(|x| x.certificate.clone().zip(x.certificate_sha256.clone()));
        let (body, sha) = dc.ok_or_else(|| {
            Refusal::not_found(format!("disk {} has no erase certificate (not decommissioned)", d.name))
        })?;
        json(&serde_json::json!({"certificate": body, "sha256": sha}))
    }

    // ----- scrub -----

    pub(super) fn request_scrub(&mut self, ctx: &mut Ctx, node: u64) -> Res {
        require_operator(&ctx.actor)?;
        let node = self.node_id_of(node)?;
        ctx.object = format!("node:node-{node}");
        let s = self.scrubs.entry(node).or_default();
        s.requested += 1;
        let id = s.requested;
        json(&serde_json::json!({"node": node, "scrub": id}))
    }

    pub(super) fn scrub_request(&self, node: u64) -> Option<ScrubRequest> {
        self.scrubs.get(&node).filter(|s| s.requested > 0).map(|s| ScrubRequest { id: s.requested })
    }

    pub(super) fn repair_source(&mut self, ctx: &mut Ctx, node: u64, req: &RepairSourceRequest) -> Res {
        if !ctx.actor.sends_node_traffic() {
            return Err(Refusal::forbidden("repair sources are for storage nodes"));
        }
        ctx.skip_audit = true;
        // Segments of a deleted parent kept for its clones are repaired like any others.
        let v = self
            .volumes
            .get(&req.volume)
            .or_else(|| self.retained.get(&req.volume))
            .ok_or_else(|| Refusal::not_found(format!("no volume vol-{}", req.volume)))?;
        let seg = v
            .segments
            .get(req.segment as usize)
            .ok_or_else(|| Refusal::not_found(format!("vol-{} has no segment {}", req.volume, req.segment)))?;
        if !seg.replicas.iter().any(|r| r.node == node) {
            return Err(Refusal::forbidden(format!("node {node} holds no replica of segment {}", req.segment)));
        }
        let peers: Vec<PeerReplica> = seg
            .replicas
            .iter()
            .filter(|r| r.node != node && r.state == ReplicaState::InSync)
            .filter_map(|r| self.nodes.get(&r.node).map(|n| PeerReplica { node: n.id, addr: n.addr.clone() }))
            .collect();
        json(&RepairSource {
            volume: req.volume,
            segment: req.segment,
            generation: v.generation,
            peers,
            capability: String::new(),
        })
    }

    pub(super) fn report_scrub(&mut self, ctx: &mut Ctx, node: u64, report: &ScrubReport) -> Res {
        if !ctx.actor.sends_node_traffic() {
            return Err(Refusal::forbidden("scrub reports come from storage nodes"));
        }
        let node = self.node_id_of(node)?;
        ctx.object = format!(
            "node:node-{node} scrub:{} checked:{} found:{} repaired:{} unrepaired:{}",
            report.scrub_id, report.blocks_checked, report.corrupt_found, report.repaired, report.unrepaired
        );
        // Progress is not audited; a finished pass is, and so is anything it found.
        ctx.skip_audit = report.running || (report.corrupt_found == 0 && report.scrub_id == 0);
        let s = self.scrubs.entry(node).or_default();
        s.report = Some(report.clone());
        s.reported_ms = ctx.now;
        if report.scrub_id > 0 {
            s.requested_report = Some(report.clone());
        }
        json(&serde_json::json!({"node": node}))
    }
}
