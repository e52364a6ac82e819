//! The command handlers of [`MetaState`]: authentication, authorization,
//! the change, and the audit record, in that order.
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
    AttachGrant, AttachmentView, AuditPage, CapabilityClaims, DekInfo, DiskView, GrantView, IssuedToken, NodeView,
    PrincipalView, ReconfigureResult, ReplicaView, SegmentView, SettingsView, ShredReport, SnapshotView, TenantView,
    TokenView, VolumeView,
};
use super::{take, Applied, MetaState};
use crate::audit::{self, AuditEntry};
use crate::keys::{KeyRelease, RootKey, WrappedKey};
use crate::placement::{self, Candidate, DomainLevel};
use serde::Serialize;
use slate_protocol::ops::ReleaseReason;
use slate_protocol::{Rights, BLOCK_SIZE_BYTES_U64};
use std::collections::{BTreeMap, BTreeSet};

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
    /// Applies one committed envelope at `index`.
    pub fn apply(&mut self, index: u64, env: &Envelope, root: &mut RootKey) -> Applied {
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
            Command::Bootstrap { .. }
            | Command::Tick
            | Command::Sweep { .. }
            | Command::SecurityEvents { .. }
            | Command::ReportPurge { .. }
            | Command::DrainStep => Err(Refusal::forbidden("system command")),
            Command::RotateRoot { wrapped_root, root_epoch } => self.rotate_root(ctx, root, wrapped_root, *root_epoch),
            Command::WhoAmI => {
                let id = ctx.actor.principal.ok_or_else(|| Refusal::forbidden("no principal"))?;
                ctx.object = format!("principal:{id}");
                json(&self.principal_view(id)?)
            }
            Command::GetSettings => {
                require_operator(&ctx.actor)?;
                json(&SettingsView { settings: self.settings.clone(), root_epoch: self.root_epoch })
            }
            Command::UpdateSettings(req) => {
                require_operator(&ctx.actor)?;
                validate_settings(req)?;
                let s = &mut self.settings;
                if let Some(v) = req.placement_level {
                    s.placement_level = v;
                }
                if let Some(v) = req.heartbeat_timeout_ms {
                    s.heartbeat_timeout_ms = v;
                }
                if let Some(v) = req.lockout_threshold {
                    s.lockout_threshold = v;
                }
                if let Some(v) = req.lockout_ms {
                    s.lockout_ms = v;
                }
                if let Some(v) = req.capability_ttl_secs {
                    s.capability_ttl_secs = v;
                }
                if let Some(v) = req.segment_blocks {
                    s.segment_blocks = v;
                }
                json(&SettingsView { settings: self.settings.clone(), root_epoch: self.root_epoch })
            }
            Command::CreateTenant { req, wrapped_key, root_epoch } => {
                require_operator(&ctx.actor)?;
                validate_name("tenant name", &req.name, &[])?;
                if self.tenants.values().any(|t| t.name == req.name) {
                    return Err(Refusal::conflict(format!("a tenant named {:?} exists", req.name)));
                }
                if *root_epoch != self.root_epoch {
                    return Err(Refusal::new(ErrorCode::KeyRotated, "root key rotated while proposing; retry"));
                }
                root.unwrap_tenant_key(wrapped_key).map_err(|e| internal(e.to_string()))?;
                let id = take(&mut self.next.tenant);
                ctx.object = format!("tenant:{id}({})", req.name);
                ctx.object_tenant = Some(id);
                self.tenants.insert(
                    id,
                    Tenant {
                        id,
                        name: req.name.clone(),
                        created_ms: ctx.now,
                        wrapped_key: wrapped_key.clone(),
                        key_version: 1,
                        key_created_ms: ctx.now,
                    },
                );
                json(&self.tenant_view(id)?)
            }
            Command::ListTenants => {
                let list: Vec<TenantView> = self
                    .tenants
                    .keys()
                    .filter(|&&t| ctx.actor.is_operator() || ctx.actor.tenant == Some(t))
                    .filter_map(|&t| self.tenant_view(t).ok())
                    .collect();
                json(&list)
            }
            Command::GetTenant { tenant } => {
                ctx.object_tenant = Some(*tenant);
                if !(ctx.actor.is_operator() || ctx.actor.tenant == Some(*tenant)) {
                    return Err(Refusal::forbidden(format!("tenant {tenant} is not yours")));
                }
                json(&self.tenant_view(*tenant)?)
            }
            Command::DeleteTenant { tenant } => {
                require_operator(&ctx.actor)?;
                ctx.object_tenant = Some(*tenant);
                if !self.tenants.contains_key(tenant) {
                    return Err(Refusal::not_found(format!("no tenant {tenant}")));
                }
                let victims: Vec<u64> = self.volumes.values().filter(|v| v.tenant == *tenant).map(|v| v.id).collect();
                self.shred(root, ctx, None, Some(*tenant), &victims)?;
                json(&ShredReport {
                    deleted: format!("tenant:{tenant}"),
                    root_epoch: self.root_epoch,
                    volumes_shredded: victims.len() as u64,
                })
            }
            Command::RotateTenantKey { tenant, wrapped_key, root_epoch } => {
                ctx.object_tenant = Some(*tenant);
                if !ctx.actor.is_admin_of(*tenant) {
                    return Err(Refusal::forbidden(format!("rotating tenant {tenant}'s key needs its admin")));
                }
                let t = self.tenants.get(tenant).ok_or_else(|| Refusal::not_found(format!("no tenant {tenant}")))?;
                if *root_epoch != self.root_epoch {
                    return Err(Refusal::new(ErrorCode::KeyRotated, "root key rotated while proposing; retry"));
                }
                let old = root.unwrap_tenant_key(&t.wrapped_key).map_err(|e| internal(e.to_string()))?;
                let new = root.unwrap_tenant_key(wrapped_key).map_err(|e| internal(e.to_string()))?;
                let mut rewrapped = BTreeMap::new();
                for v in self.volumes.values().filter(|v| v.tenant == *tenant) {
                    let dek = old.unwrap_dek(&v.wrapped_dek).map_err(|e| internal(e.to_string()))?;
                    rewrapped.insert(v.id, new.wrap_dek(&dek));
                }
                let t = self.tenants.get_mut(tenant).expect("checked above");
                t.wrapped_key = wrapped_key.clone();
                t.key_version += 1;
                t.key_created_ms = ctx.now;
                for (id, w) in rewrapped {
                    let v = self.volumes.get_mut(&id).expect("listed above");
                    v.wrapped_dek = w;
                    v.dek_wrapped_ms = ctx.now;
                }
                json(&self.tenant_view(*tenant)?)
            }
            Command::CreatePrincipal { req, token_secret_sha256, token_id } => {
                validate_principal(req)?;
                if !valid_hash(token_secret_sha256) {
                    return Err(Refusal::bad("token hash must be 64 lowercase hex digits"));
                }
                ctx.object_tenant = req.tenant;
                let allowed = match req.role {
                    Role::Operator | Role::Host | Role::Node => ctx.actor.is_operator(),
                    Role::TenantAdmin | Role::TenantMember => req.tenant.is_some_and(|t| ctx.actor.is_admin_of(t)),
                };
                if !allowed {
                    return Err(Refusal::forbidden(format!("not allowed to create a {:?} principal here", req.role)));
                }
                if let Some(t) = req.tenant {
                    if !self.tenants.contains_key(&t) {
                        return Err(Refusal::not_found(format!("no tenant {t}")));
                    }
                }
                if let Some(n) = req.node {
                    if !self.nodes.contains_key(&n) {
                        return Err(Refusal::not_found(format!("no storage node {n}; register it first")));
                    }
                }
                if self.principals.values().any(|p| p.name == req.name) {
                    return Err(Refusal::conflict(format!("a principal named {:?} exists", req.name)));
                }
                let tid = self.new_token_id(*token_id)?;
                let pid = take(&mut self.next.principal);
                ctx.object = format!("principal:{pid}({})", req.name);
                self.principals.insert(
                    pid,
                    Principal {
                        id: pid,
                        name: req.name.clone(),
                        role: req.role,
                        tenant: req.tenant,
                        node: req.node,
                        created_ms: ctx.now,
                        not_before_ms: req.not_before_ms,
                        not_after_ms: req.not_after_ms,
                        failed_auths: 0,
                        locked_until_ms: None,
                    },
                );
                self.tokens.insert(
                    tid,
                    Token {
                        id: tid,
                        principal: pid,
                        secret_sha256: token_secret_sha256.clone(),
                        created_ms: ctx.now,
                        expires_ms: req.token_expires_ms,
                    },
                );
                json(&IssuedToken { principal: self.principal_view(pid)?, token_id: tid, token: None })
            }
            Command::ListPrincipals => {
                let list: Vec<PrincipalView> = self
                    .principals
                    .values()
                    .filter(|p| ctx.actor.is_operator() || (p.tenant.is_some() && p.tenant == ctx.actor.tenant))
                    .filter_map(|p| self.principal_view(p.id).ok())
                    .collect();
                json(&list)
            }
            Command::GetPrincipal { principal } => {
                self.may_manage_principal(ctx, *principal, true)?;
                json(&self.principal_view(*principal)?)
            }
            Command::DeletePrincipal { principal } => {
                self.may_manage_principal(ctx, *principal, false)?;
                if ctx.actor.principal == Some(*principal) {
                    return Err(Refusal::conflict("a principal cannot delete itself"));
                }
                self.principals.remove(principal);
                self.tokens.retain(|_, t| t.principal != *principal);
                self.grants.retain(|_, g| g.principal != *principal);
                json(&serde_json::json!({"deleted": principal}))
            }
            Command::UnlockPrincipal { principal } => {
                self.may_manage_principal(ctx, *principal, false)?;
                let p = self.principals.get_mut(principal).expect("checked");
                p.failed_auths = 0;
                p.locked_until_ms = None;
                json(&self.principal_view(*principal)?)
            }
            Command::CreateToken { principal, req, secret_sha256, token_id } => {
                self.may_manage_principal(ctx, *principal, true)?;
                if !valid_hash(secret_sha256) {
                    return Err(Refusal::bad("token hash must be 64 lowercase hex digits"));
                }
                let tid = self.new_token_id(*token_id)?;
                self.tokens.insert(
                    tid,
                    Token {
                        id: tid,
                        principal: *principal,
                        secret_sha256: secret_sha256.clone(),
                        created_ms: ctx.now,
                        expires_ms: req.expires_ms,
                    },
                );
                ctx.object = format!("principal:{principal} token:{tid}");
                json(&IssuedToken { principal: self.principal_view(*principal)?, token_id: tid, token: None })
            }
            Command::ListTokens { principal } => {
                self.may_manage_principal(ctx, *principal, true)?;
                let list: Vec<TokenView> = self
                    .tokens
                    .values()
                    .filter(|t| t.principal == *principal)
                    .map(|t| TokenView {
                        id: t.id,
                        principal: t.principal,
                        created_ms: t.created_ms,
                        expires_ms: t.expires_ms,
                    })
                    .collect();
                json(&list)
            }
            Command::RevokeToken { token } => {
                let owner = self
                    .tokens
                    .get(token)
                    .map(|t| t.principal)
                    .ok_or_else(|| Refusal::not_found(format!("no token {token}")))?;
                self.may_manage_principal(ctx, owner, true)?;
                self.tokens.remove(token);
                json(&serde_json::json!({"revoked": token}))
            }
            Command::CreateGrant(req) => {
                let v = self.volume_for(ctx, req.volume)?;
                if !ctx.actor.is_admin_of(v.tenant) {
                    return Err(Refusal::forbidden(format!(
                        "granting access to vol-{} needs its tenant's admin",
                        v.id
                    )));
                }
                let p = self
                    .principals
                    .get(&req.principal)
                    .ok_or_else(|| Refusal::not_found(format!("no principal {}", req.principal)))?;
                if p.tenant.is_some_and(|t| t != v.tenant) {
                    return Err(Refusal::forbidden("cannot grant a volume to another tenant's principal"));
                }
                let gid = take(&mut self.next.grant);
                self.grants.insert(
                    gid,
                    Grant {
                        id: gid,
                        principal: req.principal,
                        volume: req.volume,
                        access: req.access,
                        created_ms: ctx.now,
                    },
                );
                ctx.object = format!("volume:vol-{} grant:{gid} to principal:{}", req.volume, req.principal);
                json(&grant_view(&self.grants[&gid]))
            }
            Command::ListGrants => {
                let list: Vec<GrantView> = self
                    .grants
                    .values()
                    .filter(|g| {
                        ctx.actor.is_operator()
                            || ctx.actor.principal == Some(g.principal)
                            || self.volumes.get(&g.volume).is_some_and(|v| ctx.actor.is_admin_of(v.tenant))
                    })
                    .map(grant_view)
                    .collect();
                json(&list)
            }
            Command::DeleteGrant { grant } => {
                let g = self.grants.get(grant).ok_or_else(|| Refusal::not_found(format!("no grant {grant}")))?;
                let vt = self.volumes.get(&g.volume).map(|v| v.tenant);
                ctx.object_tenant = vt;
                if !(ctx.actor.is_operator() || vt.is_some_and(|t| ctx.actor.is_admin_of(t))) {
                    return Err(Refusal::forbidden("deleting a grant needs the volume's tenant admin"));
                }
                let (principal, volume) = (g.principal, g.volume);
                self.grants.remove(grant);
                let (ended, fence) = self.revoke_attachments(ctx, principal, volume);
                json(&serde_json::json!({"deleted": grant, "attachments_ended": ended, "fenced_generation": fence}))
            }
            Command::RegisterNode(req) => {
                require_operator(&ctx.actor)?;
                validate_register_node(req)?;
                if self.nodes.values().any(|n| n.name == req.name) {
                    return Err(Refusal::conflict(format!("a node named {:?} is registered", req.name)));
                }
                let nid = match req.id {
                    Some(0) => return Err(Refusal::bad("node id 0 is invalid")),
                    Some(id) if self.nodes.contains_key(&id) => {
                        return Err(Refusal::conflict(format!("node id {id} is taken")))
                    }
                    Some(id) => {
                        self.next.node = self.next.node.max(id + 1);
                        id
                    }
                    None => {
                        while self.nodes.contains_key(&self.next.node) {
                            self.next.node += 1;
                        }
                        take(&mut self.next.node)
                    }
                };
                ctx.object = format!("node:node-{nid}({})", req.name);
                self.nodes.insert(
                    nid,
                    StorageNode {
                        id: nid,
                        name: req.name.clone(),
                        addr: req.addr.clone(),
                        failure_domain: req.failure_domain.clone(),
                        state: NodeState::Active,
                        registered_ms: ctx.now,
                        last_heartbeat_ms: ctx.now,
                        allocated_bytes: 0,
                        drain: None,
                    },
                );
                for d in &req.disks {
                    let did = take(&mut self.next.disk);
                    self.disks.insert(
                        did,
                        Disk {
                            id: did,
                            node: nid,
                            name: d.name.clone(),
                            capacity_bytes: d.capacity_bytes,
                            state: DiskState::Active,
                            decommission: None,
                        },
                    );
                }
                json(&self.node_view(nid)?)
            }
            Command::ListNodes => {
                require_operator(&ctx.actor)?;
                let list: Vec<NodeView> = self.nodes.keys().filter_map(|&n| self.node_view(n).ok()).collect();
                json(&list)
            }
            Command::GetNode { node } => {
                require_operator(&ctx.actor)?;
                json(&self.node_view(*node)?)
            }
            Command::ListDisks => {
                require_operator(&ctx.actor)?;
                let list: Vec<DiskView> = self.disks.values().map(|d| self.disk_view(d)).collect();
                json(&list)
            }
            Command::Heartbeat { node } => {
                if !ctx.actor.sends_node_traffic() {
                    return Err(Refusal::forbidden("heartbeats come from the node's own principal (or an operator)"));
                }
                let n = self.nodes.get_mut(node).ok_or_else(|| Refusal::not_found(format!("no node {node}")))?;
                n.last_heartbeat_ms = ctx.now;
                if n.state == NodeState::Down {
                    n.state = NodeState::Active;
                    ctx.object = format!("node:node-{node} down->active");
                } else {
                    ctx.skip_audit = true;
                }
                self.heartbeat_reply(*node)
            }
            Command::SetNodeState { node, req } => {
                require_operator(&ctx.actor)?;
                let holds = self.replicas_on(*node);
                let n = self.nodes.get(node).ok_or_else(|| Refusal::not_found(format!("no node {node}")))?;
                match req.state {
                    NodeState::Down => return Err(Refusal::bad("a node is marked down by missed heartbeats only")),
                    NodeState::Decommissioned if holds > 0 => {
                        return Err(Refusal::conflict(format!(
                            "node {node} still holds {holds} replica(s); drain it first"
                        )))
                    }
                    NodeState::Decommissioned => self.refuse_if_retained_on(*node)?,
                    _ => {}
                }
                ctx.object = format!("node:node-{node} {:?}->{:?}", n.state, req.state);
                self.nodes.get_mut(node).expect("checked").state = req.state;
                json(&self.node_view(*node)?)
            }
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
            Command::ListAudit { tenant, after_seq, limit } => {
                let scope = if ctx.actor.is_operator() {
                    *tenant
                } else {
                    let Some(own) = ctx.actor.tenant else {
                        return Err(Refusal::forbidden(
                            "audit records are readable by operators and tenant principals",
                        ));
                    };
                    if tenant.is_some_and(|t| t != own) {
                        ctx.object_tenant = *tenant;
                        return Err(Refusal::forbidden(format!(
                            "tenant {} audit records are not yours",
                            tenant.unwrap_or(0)
                        )));
                    }
                    Some(own)
                };
                let limit = limit.unwrap_or(1000).min(MAX_AUDIT_PAGE) as usize;
                let after = after_seq.unwrap_or(0);
                let records = self
                    .audit
                    .records
                    .iter()
                    .filter(|r| r.seq > after && (scope.is_none() || r.tenant == scope))
                    .take(limit)
                    .cloned()
                    .collect();
                json(&AuditPage { records, last_seq: self.audit.records.last().map_or(0, |r| r.seq) })
            }
            Command::VerifyAudit => {
                if !(ctx.actor.is_operator() || ctx.actor.role == Role::TenantAdmin) {
                    return Err(Refusal::forbidden("verifying the audit chain needs an operator or tenant admin"));
                }
                json(&audit::verify(&self.audit.records))
            }
            Command::ListMembers => {
                require_operator(&ctx.actor)?;
                Ok(serde_json::Value::Null)
            }
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
            Command::ChangeMembership { req, add } => {
                require_operator(&ctx.actor)?;
                if *add && req.addr.as_deref().and_then(|a| a.parse::<std::net::SocketAddr>().ok()).is_none() {
                    return Err(Refusal::bad("adding a member needs addr as ip:port"));
                }
                json(&serde_json::json!({"authorized": true}))
            }
        }
    }

    // ----- volumes -----

    pub(super) fn create_volume(
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

    fn resize_volume(&mut self, ctx: &mut Ctx, volume: u64, size_bytes: u64) -> Res {
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

    fn attach(&mut self, ctx: &mut Ctx, volume: u64, req: &AttachRequest) -> Res {
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
            attachment: attachment_view(&a),
            volume: self.volume_view(v, ctx.now),
            claims: self.claims(v, &a),
            parent,
        })
    }

    fn report_failure(&mut self, ctx: &mut Ctx, volume: u64, segment: u32, node: u64) -> Res {
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
    fn replace_replica(&mut self, now: u64, volume: u64, segment: u32, failed: u64) -> Result<u64, Refusal> {
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

    /// The liveness sweep: marks overdue nodes down and re-places replicas on down nodes.
    fn sweep(&mut self, ctx: &mut Ctx) {
        let timeout = self.settings.heartbeat_timeout_ms;
        let overdue: Vec<u64> = self
            .nodes
            .values()
            .filter(|n| matches!(n.state, NodeState::Active | NodeState::Draining))
            .filter(|n| ctx.now.saturating_sub(n.last_heartbeat_ms) > timeout)
            .map(|n| n.id)
            .collect();
        for id in overdue {
            self.nodes.get_mut(&id).expect("listed").state = NodeState::Down;
            self.audit.append(AuditEntry {
                time_ms: ctx.now,
                actor: "system".into(),
                tenant: None,
                client: "-".into(),
                action: "node.down".into(),
                object: format!("node:node-{id}"),
                result: format!("ok: no heartbeat for more than {timeout} ms"),
            });
        }
        let mut work = Vec::new();
        for v in self.volumes.values() {
            for s in &v.segments {
                for r in &s.replicas {
                    if self.nodes.get(&r.node).is_none_or(|n| n.state == NodeState::Down) {
                        work.push((v.id, v.tenant, s.index, r.node));
                    }
                }
            }
        }
        for (vol, tenant, seg, node) in work {
            let result = match self.replace_replica(ctx.now, vol, seg, node) {
                Ok(new) => format!("ok: replaced by node:{new}"),
                Err(e) => format!("error: {}", e.message),
            };
            // Unrepairable segments are retried at every sweep; record only repairs.
            if result.starts_with("ok") {
                self.audit.append(AuditEntry {
                    time_ms: ctx.now,
                    actor: "system".into(),
                    tenant: Some(tenant),
                    client: "-".into(),
                    action: "segment.re_replicate".into(),
                    object: format!("volume:vol-{vol} segment:{seg} from node:{node}"),
                    result,
                });
            }
        }
    }

    /// Destroys key material: removes `victims` (volumes) and, if given, the
    /// tenant `delete_tenant`; rotates `rotate_tenant`'s key one-way; ratchets
    /// the root key and re-wraps every remaining tenant key under it. All
    /// unwraps are done before anything changes.
    fn shred(
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
            "degraded"
        } else if v.attachments.is_empty() {
            "available"
        } else {
            "attached"
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
            state: state.into(),
            generation: v.generation,
            segment_blocks: v.segment_blocks,
            segments: v.segments.iter().map(|s| self.segment_view(v, s)).collect(),
            attachments: v.attachments.values().map(attachment_view).collect(),
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

fn attachment_view(a: &Attachment) -> AttachmentView {
    AttachmentView {
        id: a.id,
        principal: a.principal,
        host: a.host.clone(),
        mode: a.mode,
        generation: a.generation,
        attached_ms: a.attached_ms,
    }
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
