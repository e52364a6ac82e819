//! The command handlers of [`MetaState`]: authentication, authorization,
//! the change, and the audit record, in that order.
//!
//! This file holds the pipeline (`apply`, authentication, routing in
//! `execute`) and the shared rules (validation, authorization, views). Each
//! domain's commands are in a module of their own, so the rule that refused a
//! call is found by its domain: [`tenants`] (tenants, principals, tokens,
//! grants, settings), [`nodes`], [`volumes`] (and their snapshots),
//! [`attachments`] (attach, fencing, capabilities, replica failure and
//! rebuild), [`cluster`] (audit chain and membership). Keys, backups, clones,
//! erasure, operations and security events live in the sibling modules of
//! `state` that `execute` calls directly.
//!
//! Rule for every handler: check everything first, mutate after. A handler
//! that returns `Err` must leave the state as it found it.

use super::clones::RefreshGrant;
use super::command::{
    AttachRequest, Command, CreatePrincipalRequest, CreateVolumeRequest, Credential, Envelope, ErrorCode, Refusal,
    RegisterNodeRequest, Response, UpdateSettingsRequest,
};
use super::types::{
    Access, AttachMode, Attachment, Disk, DiskState, Grant, NodeState, Principal, Replica, ReplicaState, Role, Segment,
    Snapshot, SnapshotState, StorageNode, Tenant, Token, Volume,
};
use super::view::{
    AttachGrant, AuditPage, CapabilityClaims, DekInfo, DiskView, GrantView, IssuedToken, NodeView, PrincipalView,
    ReconfigureResult, ReplicaView, SegmentView, SettingsView, ShredReport, SnapshotView, TenantView, TokenView,
    VolumeState, VolumeView,
};
use super::{take, Applied, MetaState};
use crate::audit::AuditEntry;
use crate::keys::{KeyRelease, RootKey, WrappedKey};
use crate::placement::{self, Candidate, DomainLevel};
use serde::Serialize;
use slate_protocol::ops::ReleaseReason;
use slate_protocol::{Rights, BLOCK_SIZE_BYTES_U64};
use std::collections::{BTreeMap, BTreeSet};

mod attachments;
mod cluster;
mod nodes;
mod tenants;
mod volumes;

/// Smallest volume: 1 MiB.
pub const MIN_VOLUME_BYTES: u64 = 1 << 20;
/// Largest volume: 16 TiB.
pub const MAX_VOLUME_BYTES: u64 = 16 << 40;
/// Replication factor bounds.
pub const MIN_REPLICAS: u8 = 2;
pub const MAX_REPLICAS: u8 = 5;
/// Most records one audit listing returns.
pub const MAX_AUDIT_PAGE: u32 = 10_000;

/// Who is acting.
#[derive(Clone, Debug)]
pub(crate) struct Actor {
    pub principal: Option<u64>,
    pub name: String,
    pub role: Role,
    pub tenant: Option<u64>,
    /// The storage node a `node` principal speaks for.
    pub node: Option<u64>,
}

impl Actor {
    fn system() -> Self {
        Self { principal: None, name: "system".into(), role: Role::Operator, tenant: None, node: None }
    }
    pub(super) fn label(&self) -> String {
        match self.principal {
            Some(id) => format!("principal:{id}({})", self.name),
            None => "system".into(),
        }
    }
    pub(super) fn is_operator(&self) -> bool {
        self.role == Role::Operator
    }
    pub(super) fn is_admin_of(&self, tenant: u64) -> bool {
        self.is_operator() || (self.role == Role::TenantAdmin && self.tenant == Some(tenant))
    }
    /// May send storage-node traffic (heartbeats, release, move, scrub and decommission
    /// reports, repair-source questions, freeze reports): operators, and node principals,
    /// whose node `execute` has already checked against the one the call names.
    pub(super) fn sends_node_traffic(&self) -> bool {
        matches!(self.role, Role::Operator | Role::Node)
    }
}

/// Per-call context: what the audit record will say.
pub(super) struct Ctx {
    pub(super) now: u64,
    pub(super) actor: Actor,
    pub(super) object: String,
    pub(super) object_tenant: Option<u64>,
    shredded: bool,
    /// The wrapped DEK an attach or restore hands to its proposer (opened there, once).
    pub(super) release: Option<KeyRelease>,
    pub(super) skip_audit: bool,
}

impl Ctx {
    /// The command destroyed or replaced key material: persist, store the root, purge the log.
    pub(super) fn set_shredded(&mut self) {
        self.shredded = true;
    }
}

pub(super) type Res = Result<serde_json::Value, Refusal>;

pub(super) fn json<T: Serialize>(v: &T) -> Res {
    serde_json::to_value(v).map_err(|e| Refusal::new(ErrorCode::Internal, format!("encoding reply: {e}")))
}

pub(super) fn internal(msg: impl Into<String>) -> Refusal {
    Refusal::new(ErrorCode::Internal, msg)
}

/// Names: 1-63 of `[A-Za-z0-9._-]` (plus `extra`).
pub fn validate_name(what: &str, s: &str, extra: &[u8]) -> Result<(), Refusal> {
    if s.is_empty()
        || s.len() > 63
        || !s.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b) || extra.contains(&b))
    {
        return Err(Refusal::bad(format!("{what} must be 1-63 characters of letters, digits, '.', '_' or '-'")));
    }
    Ok(())
}

/// Checks a new volume's request (also done by the API before proposing).
pub fn validate_create_volume(req: &CreateVolumeRequest) -> Result<(), Refusal> {
    validate_name("volume name", &req.name, &[])?;
    validate_size(req.size_bytes)?;
    if !(MIN_REPLICAS..=MAX_REPLICAS).contains(&req.replicas) {
        return Err(Refusal::bad(format!(
            "replicas must be between {MIN_REPLICAS} and {MAX_REPLICAS} (got {}): every volume keeps at least 2 copies",
            req.replicas
        )));
    }
    if let Some(iops) = req.qos.iops_limit {
        if !(1..=10_000_000).contains(&iops) {
            return Err(Refusal::bad("qos.iops_limit must be between 1 and 10000000"));
        }
    }
    if let Some(mbps) = req.qos.mbps_limit {
        if !(1..=100_000).contains(&mbps) {
            return Err(Refusal::bad("qos.mbps_limit must be between 1 and 100000"));
        }
    }
    Ok(())
}

/// Checks a volume size.
pub fn validate_size(size_bytes: u64) -> Result<(), Refusal> {
    if !size_bytes.is_multiple_of(BLOCK_SIZE_BYTES_U64) {
        return Err(Refusal::bad(format!(
            "size_bytes must be a multiple of the 4096-byte block size (got {size_bytes})"
        )));
    }
    if !(MIN_VOLUME_BYTES..=MAX_VOLUME_BYTES).contains(&size_bytes) {
        return Err(Refusal::bad(format!(
            "size_bytes must be between {MIN_VOLUME_BYTES} (1 MiB) and {MAX_VOLUME_BYTES} (16 TiB) (got {size_bytes})"
        )));
    }
    Ok(())
}

/// Checks a settings change.
pub fn validate_settings(req: &UpdateSettingsRequest) -> Result<(), Refusal> {
    let check = |name: &str, v: Option<u64>, lo: u64, hi: u64| match v {
        Some(v) if !(lo..=hi).contains(&v) => Err(Refusal::bad(format!("{name} must be between {lo} and {hi}"))),
        _ => Ok(()),
    };
    check("heartbeat_timeout_ms", req.heartbeat_timeout_ms, 1000, 3_600_000)?;
    check("lockout_threshold", req.lockout_threshold.map(u64::from), 1, 100)?;
    check("lockout_ms", req.lockout_ms, 1000, 86_400_000)?;
    check("capability_ttl_secs", req.capability_ttl_secs, 60, 86_400)?;
    check("segment_blocks", req.segment_blocks, 256, 1 << 22)?;
    check("audit_max_records", req.audit_max_records, 10, 100_000_000)?;
    check("audit_max_age_ms", req.audit_max_age_ms, 60_000, 3650 * 24 * 3600 * 1000)?;
    if req.segment_blocks.is_some_and(|b| !b.is_power_of_two()) {
        return Err(Refusal::bad("segment_blocks must be a power of two"));
    }
    Ok(())
}

fn validate_host(host: &str) -> Result<(), Refusal> {
    if host.is_empty() || host.len() > 128 || !host.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(Refusal::bad("host must be 1-128 printable characters without spaces"));
    }
    Ok(())
}

/// Checks a node registration.
pub fn validate_register_node(req: &RegisterNodeRequest) -> Result<(), Refusal> {
    validate_name("node name", &req.name, &[])?;
    req.addr.parse::<std::net::SocketAddr>().map_err(|_| Refusal::bad("addr must be ip:port"))?;
    placement::validate_domain_path(&req.failure_domain).map_err(Refusal::bad)?;
    if req.disks.is_empty() || req.disks.len() > 64 {
        return Err(Refusal::bad("a node registers 1 to 64 disks"));
    }
    for d in &req.disks {
        validate_name("disk name", &d.name, &[])?;
        if !((1 << 20)..=(1 << 50)).contains(&d.capacity_bytes) {
            return Err(Refusal::bad("disk capacity_bytes must be between 1 MiB and 1 PiB"));
        }
    }
    Ok(())
}

/// Checks a new principal.
pub fn validate_principal(req: &CreatePrincipalRequest) -> Result<(), Refusal> {
    validate_name("principal name", &req.name, b"@")?;
    match (req.role, req.tenant) {
        (Role::Operator, Some(_)) => return Err(Refusal::bad("an operator belongs to no tenant")),
        (Role::TenantAdmin | Role::TenantMember, None) => {
            return Err(Refusal::bad("tenant_admin and tenant_member principals need a tenant"))
        }
        (Role::Node, Some(_)) => return Err(Refusal::bad("a node principal belongs to no tenant")),
        _ => {}
    }
    match (req.role, req.node) {
        (Role::Node, None) => return Err(Refusal::bad("a node principal needs the id of its storage node (node)")),
        (Role::Node, Some(0)) => return Err(Refusal::bad("node id 0 is invalid")),
        (Role::Node, Some(_)) | (_, None) => {}
        (_, Some(_)) => return Err(Refusal::bad("only a node principal is bound to a storage node")),
    }
    if let (Some(a), Some(b)) = (req.not_before_ms, req.not_after_ms) {
        if a >= b {
            return Err(Refusal::bad("not_before_ms must be earlier than not_after_ms"));
        }
    }
    Ok(())
}

fn valid_hash(h: &str) -> bool {
    h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

fn object_hint(cmd: &Command) -> String {
    match cmd {
        Command::GetTenant { tenant } | Command::DeleteTenant { tenant } | Command::RotateTenantKey { tenant, .. } => {
            format!("tenant:{tenant}")
        }
        Command::CreateTenant { req, .. } => format!("tenant:{}", req.name),
        Command::CreatePrincipal { req, .. } => format!("principal:{}", req.name),
        Command::GetPrincipal { principal }
        | Command::DeletePrincipal { principal }
        | Command::UnlockPrincipal { principal }
        | Command::CreateToken { principal, .. }
        | Command::ListTokens { principal } => format!("principal:{principal}"),
        Command::RevokeToken { token } => format!("token:{token}"),
        Command::CreateGrant(g) => format!("volume:vol-{}", g.volume),
        Command::DeleteGrant { grant } => format!("grant:{grant}"),
        Command::RegisterNode(r) => format!("node:{}", r.name),
        Command::GetNode { node } | Command::Heartbeat { node } | Command::SetNodeState { node, .. } => {
            format!("node:node-{node}")
        }
        Command::CreateVolume { req, tenant, .. } => format!("volume:{}(tenant {tenant})", req.name),
        Command::GetVolume { volume }
        | Command::ResizeVolume { volume, .. }
        | Command::DeleteVolume { volume, .. }
        | Command::Attach { volume, .. }
        | Command::Detach { volume, .. }
        | Command::RefreshCapability { volume, .. }
        | Command::ReportFailure { volume, .. }
        | Command::MarkInSync { volume, .. }
        | Command::CreateSnapshot { volume, .. }
        | Command::ListSnapshots { volume }
        | Command::DeleteSnapshot { volume, .. }
        | Command::CreateClone { volume, .. }
        | Command::CloneFlattened { volume, .. }
        | Command::GetErasure { volume }
        | Command::BeginBackup { volume, .. }
        | Command::RestoreProgress { volume, .. } => format!("volume:vol-{volume}"),
        Command::CompleteBackup { backup, .. } | Command::GetBackup { backup } => format!("backup:{backup}"),
        Command::RestoreVolume { req, .. } => format!("backup:{} into:{}", req.backup, req.name),
        Command::ListAudit { tenant: Some(t), .. } => format!("audit:tenant-{t}"),
        Command::ReportRelease { node, release, .. } => format!("node:node-{node} release:{release}"),
        Command::ChangeMembership { req, .. } => format!("member:{}", req.id),
        _ => "-".into(),
    }
}

impl MetaState {
    /// Applies one committed envelope at `index`, then the audit retention: pruning is driven
    /// by the entry's (monotonic) proposer clock, so every replica drops the same records.
    pub fn apply(&mut self, index: u64, env: &Envelope, root: &mut RootKey) -> Applied {
        let applied = self.apply_envelope(index, env, root);
        let s = &self.settings;
        self.audit.enforce_retention(self.last_time_ms, s.audit_max_records, s.audit_max_age_ms);
        applied
    }

    fn apply_envelope(&mut self, index: u64, env: &Envelope, root: &mut RootKey) -> Applied {
        self.applied_index = index;
        let now = env.time_ms.max(self.last_time_ms);
        self.last_time_ms = now;
        let cmd = &env.command;
        if matches!(env.credential, Credential::System) {
            return self.apply_system(now, cmd);
        }
        if cmd.is_system() {
            return Applied {
                response: Response::Err(Refusal::forbidden("system command from a client")),
                shredded: false,
            };
        }
        if !self.bootstrapped {
            return Applied {
                response: Response::Err(Refusal::new(ErrorCode::Unavailable, "cluster not bootstrapped yet; retry")),
                shredded: false,
            };
        }
        let actor = match self.authenticate(now, &env.credential) {
            Ok(a) => a,
            Err((who, tenant, refusal)) => {
                self.audit.append(AuditEntry {
                    time_ms: now,
                    actor: who,
                    tenant,
                    client: env.client.clone(),
                    action: cmd.action().into(),
                    object: object_hint(cmd),
                    result: format!("denied: {}", refusal.message),
                });
                return Applied { response: Response::Err(refusal), shredded: false };
            }
        };
        let mut ctx = Ctx {
            now,
            actor,
            object: object_hint(cmd),
            object_tenant: None,
            shredded: false,
            release: None,
            skip_audit: false,
        };
        let result = self.execute(&mut ctx, cmd, root);
        let result_text = match &result {
            Ok(_) => "ok".to_string(),
            Err(r) if matches!(r.code, ErrorCode::Unauthorized | ErrorCode::Forbidden | ErrorCode::Locked) => {
                format!("denied: {}", r.message)
            }
            Err(r) => format!("error: {}", r.message),
        };
        if !(ctx.skip_audit && result.is_ok()) {
            self.audit.append(AuditEntry {
                time_ms: now,
                actor: ctx.actor.label(),
                tenant: ctx.actor.tenant.or(ctx.object_tenant),
                client: env.client.clone(),
                action: cmd.action().into(),
                object: ctx.object.clone(),
                result: result_text,
            });
        }
        let response = match result {
            Ok(body) => Response::Ok { body, dek_hex: None, release: ctx.release.take() },
            Err(r) => Response::Err(r),
        };
        Applied { response, shredded: ctx.shredded }
    }

    fn apply_system(&mut self, now: u64, cmd: &Command) -> Applied {
        let mut ctx = Ctx {
            now,
            actor: Actor::system(),
            object: object_hint(cmd),
            object_tenant: None,
            shredded: false,
            release: None,
            skip_audit: true,
        };
        let result = match cmd {
            Command::Bootstrap { operator_name, token_secret_sha256, token_id } => {
                self.bootstrap(now, operator_name, token_secret_sha256, *token_id)
            }
            Command::Tick => {
                self.sweep(&mut ctx);
                Ok(serde_json::Value::Null)
            }
            Command::Sweep { liveness_ms } => {
                self.merge_liveness(liveness_ms);
                self.sweep(&mut ctx);
                Ok(serde_json::Value::Null)
            }
            Command::SecurityEvents { events } => {
                self.record_security_events(now, events);
                Ok(serde_json::Value::Null)
            }
            Command::ReportPurge { meta_node, root_epoch, voters } => {
                let r = self.report_purge(now, *meta_node, *root_epoch, voters);
                if r.is_ok() && self.settle_root_rotation() {
                    ctx.shredded = true;
                }
                r
            }
            Command::DrainStep => {
                self.drain_step(now);
                Ok(serde_json::Value::Null)
            }
            // Only the leader duties and purge reports run as the system; nothing else may borrow its authority.
            _ => Err(Refusal::forbidden("only bootstrap and liveness sweeps run as the system")),
        };
        let response = match result {
            Ok(body) => Response::Ok { body, dek_hex: None, release: None },
            Err(r) => Response::Err(r),
        };
        Applied { response, shredded: ctx.shredded }
    }

    fn bootstrap(
        &mut self,
        now: u64,
        name: &str,
        hash: &str,
        token_id: Option<u64>,
    ) -> Result<serde_json::Value, Refusal> {
        if self.bootstrapped {
            return Ok(serde_json::json!({"bootstrapped": false}));
        }
        validate_name("operator name", name, b"@")?;
        if !valid_hash(hash) {
            return Err(Refusal::bad("bootstrap token hash must be 64 lowercase hex digits"));
        }
        let tid = self.new_token_id(token_id)?;
        let pid = take(&mut self.next.principal);
        self.principals.insert(
            pid,
            Principal {
                id: pid,
                name: name.into(),
                role: Role::Operator,
                tenant: None,
                node: None,
                created_ms: now,
                not_before_ms: None,
                not_after_ms: None,
                failed_auths: 0,
                locked_until_ms: None,
            },
        );
        self.tokens.insert(
            tid,
            Token { id: tid, principal: pid, secret_sha256: hash.into(), created_ms: now, expires_ms: None },
        );
        self.bootstrapped = true;
        self.audit.append(AuditEntry {
            time_ms: now,
            actor: "system".into(),
            tenant: None,
            client: "-".into(),
            action: "cluster.bootstrap".into(),
            object: format!("principal:{pid}({name})"),
            result: "ok".into(),
        });
        Ok(serde_json::json!({"bootstrapped": true, "principal": pid, "token": tid}))
    }

    #[allow(clippy::type_complexity)]
    fn authenticate(&mut self, now: u64, cred: &Credential) -> Result<Actor, (String, Option<u64>, Refusal)> {
        let unauthorized = |m: &str| Refusal::new(ErrorCode::Unauthorized, m);
        let (token_id, presented) = match cred {
            Credential::Missing => return Err(("anonymous".into(), None, unauthorized("missing bearer token"))),
            Credential::Malformed => return Err(("anonymous".into(), None, unauthorized("malformed bearer token"))),
            Credential::System => unreachable!("system credentials are handled before authentication"),
            Credential::Token { token, secret_sha256 } => (*token, secret_sha256),
        };
        let Some(token) = self.tokens.get(&token_id).cloned() else {
            return Err((format!("token:{token_id}"), None, unauthorized("unknown or revoked token")));
        };
        let threshold = self.settings.lockout_threshold;
        let lockout_ms = self.settings.lockout_ms;
        let Some(p) = self.principals.get_mut(&token.principal) else {
            return Err((format!("token:{token_id}"), None, unauthorized("unknown or revoked token")));
        };
        let who = format!("principal:{}({})", p.id, p.name);
        let tenant = p.tenant;
        if let Some(until) = p.locked_until_ms {
            if until > now {
                return Err((
                    who,
                    tenant,
                    Refusal::new(
                        ErrorCode::Locked,
                        format!("principal is locked out until {until} ms after repeated failed authentications"),
                    ),
                ));
            }
        }
        if presented != &token.secret_sha256 {
            p.failed_auths += 1;
            let mut msg = "bad credentials".to_string();
            if p.failed_auths >= threshold {
                p.locked_until_ms = Some(now + lockout_ms);
                p.failed_auths = 0;
                msg.push_str("; the principal is now locked out");
            }
            return Err((who, tenant, unauthorized(&msg)));
        }
        if p.not_before_ms.is_some_and(|t| now < t) {
            return Err((who, tenant, unauthorized("account is not valid yet")));
        }
        if p.not_after_ms.is_some_and(|t| now >= t) {
            return Err((who, tenant, unauthorized("account has expired")));
        }
        if token.expires_ms.is_some_and(|t| now >= t) {
            return Err((who, tenant, unauthorized("token has expired")));
        }
        if p.failed_auths != 0 || p.locked_until_ms.is_some() {
            p.failed_auths = 0;
            p.locked_until_ms = None;
        }
        Ok(Actor { principal: Some(p.id), name: p.name.clone(), role: p.role, tenant, node: p.node })
    }

    /// A node principal's whole set of rights: its own node's heartbeats and reports, security
    /// event reports, and who-am-I. Checked before any handler runs, so that no handler's rule
    /// (written for tenants, hosts or operators) can grant it more.
    fn node_principal_may(&self, actor: &Actor, cmd: &Command) -> Result<(), Refusal> {
        let own = actor.node.ok_or_else(|| Refusal::forbidden("a node principal without a node"))?;
        let target = match cmd {
            Command::WhoAmI | Command::ReportSecurityEvent { .. } => return Ok(()),
            Command::Heartbeat { node }
            | Command::ReportRelease { node, .. }
            | Command::ReportMove { node, .. }
            | Command::ReportScrub { node, .. }
            | Command::RepairSource { node, .. } => *node,
            Command::SnapshotFrozen { req, .. } if req.node.is_some() => req.node.unwrap_or_default(),
            Command::ReportDecommission { disk, .. } => match self.disks.get(disk) {
                Some(d) => d.node,
                None => return Err(Refusal::forbidden(format!("disk {disk} is not on node {own}"))),
            },
            _ => {
                return Err(Refusal::forbidden(format!(
                    "{} is node {own}'s principal: it may only send that node's heartbeats and reports",
                    actor.label()
                )))
            }
        };
        if target != own {
            return Err(Refusal::forbidden(format!("{} speaks for node {own}, not node {target}", actor.label())));
        }
        Ok(())
    }

    fn execute(&mut self, ctx: &mut Ctx, cmd: &Command, root: &mut RootKey) -> Res {
        if ctx.actor.role == Role::Node {
            self.node_principal_may(&ctx.actor, cmd)?;
        }
        match cmd {
            Command::WhoAmI
            | Command::GetSettings
            | Command::UpdateSettings { .. }
            | Command::CreateTenant { .. }
            | Command::ListTenants
            | Command::GetTenant { .. }
            | Command::DeleteTenant { .. }
            | Command::RotateTenantKey { .. }
            | Command::CreatePrincipal { .. }
            | Command::ListPrincipals
            | Command::GetPrincipal { .. }
            | Command::DeletePrincipal { .. }
            | Command::UnlockPrincipal { .. }
            | Command::CreateToken { .. }
            | Command::ListTokens { .. }
            | Command::RevokeToken { .. }
            | Command::CreateGrant { .. }
            | Command::ListGrants
            | Command::DeleteGrant { .. } => self.execute_tenants(ctx, cmd, root),
            Command::RegisterNode { .. }
            | Command::ListNodes
            | Command::GetNode { .. }
            | Command::ListDisks
            | Command::Heartbeat { .. }
            | Command::SetNodeState { .. } => self.execute_nodes(ctx, cmd),
            Command::CreateVolume { .. }
            | Command::ListVolumes
            | Command::GetVolume { .. }
            | Command::ResizeVolume { .. }
            | Command::DeleteVolume { .. }
            | Command::CreateSnapshot { .. }
            | Command::ListSnapshots { .. }
            | Command::DeleteSnapshot { .. } => self.execute_volumes(ctx, cmd, root),
            Command::Attach { .. }
            | Command::Detach { .. }
            | Command::RefreshCapability { .. }
            | Command::ReportFailure { .. }
            | Command::MarkInSync { .. } => self.execute_attachments(ctx, cmd),
            Command::ListAudit { .. }
            | Command::VerifyAudit
            | Command::ListMembers
            | Command::ChangeMembership { .. } => self.execute_cluster(ctx, cmd),
            Command::Bootstrap { .. }
            | Command::Tick
            | Command::Sweep { .. }
            | Command::SecurityEvents { .. }
            | Command::ReportPurge { .. }
            | Command::DrainStep => Err(Refusal::forbidden("system command")),
            Command::RotateRoot { wrapped_root, root_epoch } => self.rotate_root(ctx, root, wrapped_root, *root_epoch),
            Command::ReportRelease { node, release, report } => self.report_release(ctx, *node, *release, report),
            Command::ListReleases { node } => self.list_releases(ctx, *node),
            Command::ListErasures => self.list_erasures(ctx),
            Command::DrainNode { node } => self.drain_node(ctx, *node),
            Command::DrainDisk { disk } => {
                let node = self.disks.get(disk).ok_or_else(|| Refusal::not_found(format!("no disk {disk}")))?.node;
                self.drain_node(ctx, node)
            }
            Command::GetDrain { node } => {
                require_operator(&ctx.actor)?;
                let node = self.node_id_of(*node)?;
                json(&self.drain_view(node))
            }
            Command::ReportMove { node, id, report } => self.report_move(ctx, *node, *id, report),
            Command::RebuildProgress { volume, req } => self.rebuild_progress(ctx, *volume, req),
            Command::DecommissionDisk { disk } => self.decommission_disk(ctx, *disk),
            Command::GetDecommission { disk } => {
                require_operator(&ctx.actor)?;
                if !self.disks.contains_key(disk) {
                    return Err(Refusal::not_found(format!("no disk {disk}")));
                }
                json(&self.decommission_view(*disk))
            }
            Command::ReportDecommission { disk, report } => self.report_decommission(ctx, *disk, report),
            Command::GetCertificate { disk } => self.certificate(ctx, *disk),
            Command::RequestScrub { node } => self.request_scrub(ctx, *node),
            Command::ReportScrub { node, report } => self.report_scrub(ctx, *node, report),
            Command::SnapshotFrozen { volume, snapshot, req } => self.snapshot_frozen(ctx, *volume, *snapshot, req),
            Command::RepairSource { node, req } => self.repair_source(ctx, *node, req),
            Command::GetErasure { volume } => self.get_erasure(ctx, *volume),
            Command::BeginBackup { volume, req } => self.begin_backup(ctx, root, *volume, req),
            Command::CompleteBackup { backup, req } => self.complete_backup(ctx, *backup, req),
            Command::ListBackups { volume } => self.list_backups(ctx, *volume),
            Command::GetBackup { backup } => self.get_backup(ctx, *backup),
            Command::RestoreVolume { req, wrapped_dek, tenant_key_version } => {
                self.restore_volume(ctx, root, req, wrapped_dek, *tenant_key_version)
            }
            Command::RestoreProgress { volume, req } => self.restore_progress(ctx, *volume, req),
            Command::CreateClone { volume, req } => self.create_clone(ctx, root, *volume, req),
            Command::CloneFlattened { volume, req } => self.clone_flattened(ctx, *volume, req),
            Command::ReportSecurityEvent { .. } => Self::report_security_event(ctx),
        }
    }

    // ----- volumes -----

    // ----- authorization -----

    pub(super) fn volume_for(&self, ctx: &mut Ctx, volume: u64) -> Result<&Volume, Refusal> {
        let v = self.volumes.get(&volume).ok_or_else(|| Refusal::not_found(format!("no volume vol-{volume}")))?;
        ctx.object_tenant = Some(v.tenant);
        Ok(v)
    }

    pub(super) fn check_volume(&self, actor: &Actor, v: &Volume, need: Need) -> Result<(), Refusal> {
        if actor.is_admin_of(v.tenant) {
            return Ok(());
        }
        let grants: Vec<Access> = self
            .grants
            .values()
            .filter(|g| g.volume == v.id && Some(g.principal) == actor.principal)
            .map(|g| g.access)
            .collect();
        let member = actor.role == Role::TenantMember && actor.tenant == Some(v.tenant);
        let ok = match need {
            Need::View => member || !grants.is_empty(),
            Need::Manage => false,
            Need::AttachRw => grants.contains(&Access::ReadWrite),
            Need::AttachRo => grants.iter().any(|a| matches!(a, Access::ReadWrite | Access::ReadOnly | Access::Backup)),
            Need::Snapshot => grants.iter().any(|a| matches!(a, Access::Snapshot | Access::Backup)),
            Need::Backup => grants.contains(&Access::Backup),
            Need::Reconfigure => {
                grants.contains(&Access::ReadWrite)
                    || v.attachments.values().any(|a| Some(a.principal) == actor.principal)
            }
        };
        if ok {
            Ok(())
        } else {
            Err(Refusal::forbidden(format!("{} may not {} vol-{}", actor.label(), need.verb(), v.id)))
        }
    }

    fn may_manage_principal(&self, ctx: &mut Ctx, principal: u64, self_ok: bool) -> Result<(), Refusal> {
        let p =
            self.principals.get(&principal).ok_or_else(|| Refusal::not_found(format!("no principal {principal}")))?;
        ctx.object_tenant = p.tenant;
        let ok = ctx.actor.is_operator()
            || (self_ok && ctx.actor.principal == Some(principal))
            || (p.tenant.is_some_and(|t| ctx.actor.is_admin_of(t)) && p.role != Role::Operator);
        if ok {
            Ok(())
        } else {
            Err(Refusal::forbidden(format!("{} may not manage principal {principal}", ctx.actor.label())))
        }
    }

    // ----- placement helpers -----

    pub(super) fn candidates(&self) -> Vec<Candidate> {
        self.nodes
            .values()
            .filter(|n| n.state == NodeState::Active)
            .filter_map(|n| {
                let cap: u64 = self.disks.values().filter(|d| d.node == n.id).map(|d| d.capacity_bytes).sum();
                (cap > 0).then(|| Candidate {
                    node: n.id,
                    domain_path: n.failure_domain.clone(),
                    free_bytes: i128::from(cap) - i128::from(n.allocated_bytes),
                })
            })
            .collect()
    }

    pub(super) fn charge(&mut self, segments: &[Segment], size_bytes: u64, segment_blocks: u64, add: bool) {
        for s in segments {
            let bytes = segment_bytes(size_bytes, segment_blocks, s.index);
            for r in &s.replicas {
                if let Some(n) = self.nodes.get_mut(&r.node) {
                    n.allocated_bytes =
                        if add { n.allocated_bytes + bytes } else { n.allocated_bytes.saturating_sub(bytes) };
                }
            }
        }
    }

    pub(super) fn replicas_on(&self, node: u64) -> u64 {
        self.volumes
            .values()
            .flat_map(|v| v.segments.iter())
            .filter(|s| s.replicas.iter().any(|r| r.node == node))
            .count() as u64
    }

    // ----- views -----

    fn claims(&self, v: &Volume, a: &Attachment) -> CapabilityClaims {
        let nodes: BTreeSet<u64> = v.segments.iter().flat_map(|s| s.replicas.iter().map(|r| r.node)).collect();
        let rights = match a.mode {
            AttachMode::ReadWrite => Rights::READ_WRITE.union(Rights::ADMIN),
            AttachMode::ReadOnly => Rights::READ,
        };
        CapabilityClaims {
            volume: v.id,
            generation: a.generation,
            rights: rights.bits(),
            nodes: nodes.into_iter().collect(),
            ttl_secs: self.settings.capability_ttl_secs,
            size_blocks: 0,
            segments: 0,
        }
        .scoped_to(v.size_bytes, v.segments.len())
    }

    fn tenant_view(&self, id: u64) -> Result<TenantView, Refusal> {
        let t = self.tenants.get(&id).ok_or_else(|| Refusal::not_found(format!("no tenant {id}")))?;
        Ok(TenantView {
            id,
            name: t.name.clone(),
            created_ms: t.created_ms,
            key_version: t.key_version,
            key_created_ms: t.key_created_ms,
            volumes: self.volumes.values().filter(|v| v.tenant == id).count() as u64,
        })
    }

    fn principal_view(&self, id: u64) -> Result<PrincipalView, Refusal> {
        let p = self.principals.get(&id).ok_or_else(|| Refusal::not_found(format!("no principal {id}")))?;
        Ok(PrincipalView {
            id,
            name: p.name.clone(),
            role: p.role,
            tenant: p.tenant,
            node: p.node,
            created_ms: p.created_ms,
            not_before_ms: p.not_before_ms,
            not_after_ms: p.not_after_ms,
            failed_auths: p.failed_auths,
            locked_until_ms: p.locked_until_ms,
            tokens: self.tokens.values().filter(|t| t.principal == id).map(|t| t.id).collect(),
        })
    }

    fn disk_view(&self, d: &Disk) -> DiskView {
        DiskView {
            id: d.id,
            node: d.node,
            node_name: self.nodes.get(&d.node).map_or_else(|| format!("node-{}", d.node), |n| n.name.clone()),
            name: d.name.clone(),
            capacity_bytes: d.capacity_bytes,
            state: d.state,
            decommission_stage: d.decommission.as_ref().map_or_else(|| "none".into(), |x| x.stage.clone()),
        }
    }

    pub(super) fn node_view(&self, id: u64) -> Result<NodeView, Refusal> {
        let n = self.nodes.get(&id).ok_or_else(|| Refusal::not_found(format!("no node {id}")))?;
        let disks: Vec<DiskView> = self.disks.values().filter(|d| d.node == id).map(|d| self.disk_view(d)).collect();
        Ok(NodeView {
            id,
            name: n.name.clone(),
            addr: n.addr.clone(),
            failure_domain: n.failure_domain.clone(),
            state: n.state,
            registered_ms: n.registered_ms,
            last_heartbeat_ms: n.last_heartbeat_ms,
            capacity_bytes: disks.iter().map(|d| d.capacity_bytes).sum(),
            allocated_bytes: n.allocated_bytes,
            replicas: self.replicas_on(id),
            releases_outstanding: self.releases_outstanding_on(id),
            disks,
            drain: self.drain_view(id),
            scrub: self.scrubs.get(&id).and_then(|s| s.report.clone()),
            scrub_requested: self.scrubs.get(&id).map_or(0, |s| s.requested),
            scrub_requested_report: self.scrubs.get(&id).and_then(|s| s.requested_report.clone()),
        })
    }

    fn segment_view(&self, v: &Volume, s: &Segment) -> SegmentView {
        let first = u64::from(s.index) * v.segment_blocks;
        let total_blocks = v.size_bytes / BLOCK_SIZE_BYTES_U64;
        SegmentView {
            index: s.index,
            epoch: s.epoch,
            first_block: first,
            blocks: v.segment_blocks.min(total_blocks.saturating_sub(first)),
            replicas: s
                .replicas
                .iter()
                .map(|r| {
                    let n = self.nodes.get(&r.node);
                    ReplicaView {
                        node: r.node,
                        addr: n.map(|n| n.addr.clone()).unwrap_or_default(),
                        failure_domain: n.map(|n| n.failure_domain.clone()).unwrap_or_default(),
                        state: r.state,
                        node_state: n.map_or(NodeState::Down, |n| n.state),
                        rebuild_done_blocks: r.rebuild_done_blocks,
                        rebuild_total_blocks: r.rebuild_total_blocks,
                    }
                })
                .collect(),
        }
    }

    pub(super) fn volume_view(&self, v: &Volume, now: u64) -> VolumeView {
        let degraded = v.segments.iter().any(|s| {
            s.replicas
                .iter()
                .filter(|r| {
                    r.state == ReplicaState::InSync
                        && self.nodes.get(&r.node).is_some_and(|n| n.state != NodeState::Down)
                })
                .count()
                < usize::from(v.replicas)
        });
        let state = if degraded {
            VolumeState::Degraded
        } else if v.attachments.is_empty() {
            VolumeState::Available
        } else {
            VolumeState::Attached
        };
        VolumeView {
            id: v.id,
            name: v.name.clone(),
            tenant: v.tenant,
            size_bytes: v.size_bytes,
            block_size: BLOCK_SIZE_BYTES_U64,
            replicas: v.replicas,
            failure_domain_level: v.level,
            qos: v.qos,
            state,
            generation: v.generation,
            segment_blocks: v.segment_blocks,
            segments: v.segments.iter().map(|s| self.segment_view(v, s)).collect(),
            attachments: v.attachments.values().cloned().collect(),
            snapshots: v.snapshots.values().map(|s| snapshot_view(v.id, s)).collect(),
            parent: self.parent_view(v),
            clones: self.clone_views(v.id),
            dek: DekInfo {
                created_ms: v.dek_created_ms,
                age_secs: now.saturating_sub(v.dek_created_ms) / 1000,
                wrapped_ms: v.dek_wrapped_ms,
                tenant_key_version: self.tenants.get(&v.tenant).map_or(0, |t| t.key_version),
            },
        }
    }
}

/// What a caller needs on a volume.
#[derive(Clone, Copy, Debug)]
pub(super) enum Need {
    View,
    Manage,
    AttachRw,
    AttachRo,
    Snapshot,
    /// Take and read backups (the backup grant).
    Backup,
    Reconfigure,
}

impl Need {
    fn verb(self) -> &'static str {
        match self {
            Self::View => "see",
            Self::Manage => "manage",
            Self::AttachRw => "attach read-write",
            Self::AttachRo => "attach read-only",
            Self::Snapshot => "snapshot",
            Self::Backup => "back up",
            Self::Reconfigure => "reconfigure",
        }
    }
}

pub(super) fn require_operator(actor: &Actor) -> Result<(), Refusal> {
    if actor.is_operator() {
        Ok(())
    } else {
        Err(Refusal::forbidden(format!("{} is not an operator", actor.label())))
    }
}

pub(super) fn segment_bytes(size_bytes: u64, segment_blocks: u64, index: u32) -> u64 {
    let seg = segment_blocks * BLOCK_SIZE_BYTES_U64;
    let start = u64::from(index) * seg;
    seg.min(size_bytes.saturating_sub(start))
}

/// Places segments `first..` of a volume of `size_bytes`.
pub(super) fn place_segments(
    cands: &mut [Candidate],
    first: u32,
    size_bytes: u64,
    segment_blocks: u64,
    replicas: u8,
    level: DomainLevel,
) -> Result<Vec<Segment>, Refusal> {
    let count = (size_bytes / BLOCK_SIZE_BYTES_U64).div_ceil(segment_blocks);
    let count = u32::try_from(count).map_err(|_| Refusal::bad("too many segments"))?;
    let no_domains = BTreeSet::new();
    let no_nodes = BTreeSet::new();
    let mut out = Vec::new();
    for index in first..count {
        let bytes = segment_bytes(size_bytes, segment_blocks, index);
        let nodes = placement::place(cands, usize::from(replicas), level, &no_domains, &no_nodes, bytes)
            .map_err(|e| Refusal::new(ErrorCode::Unsatisfiable, e.to_string()))?;
        out.push(Segment {
            index,
            epoch: 1,
            replicas: nodes.into_iter().map(|node| Replica::new(node, ReplicaState::InSync)).collect(),
        });
    }
    Ok(out)
}

fn grant_view(g: &Grant) -> GrantView {
    GrantView { id: g.id, principal: g.principal, volume: g.volume, access: g.access, created_ms: g.created_ms }
}

fn snapshot_view(volume: u64, s: &Snapshot) -> SnapshotView {
    SnapshotView {
        id: s.id,
        volume,
        name: s.name.clone(),
        epoch: s.epoch,
        created_ms: s.created_ms,
        state: s.state,
        ready_ms: s.ready_ms,
    }
}
