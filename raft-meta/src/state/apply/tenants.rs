//! Command handlers: tenants, principals, tokens, grants and cluster settings: who may act, and on what.

use super::{
    grant_view, internal, json, require_operator, take, valid_hash, validate_name, validate_principal,
    validate_settings, BTreeMap, Command, Ctx, ErrorCode, Grant, GrantView, IssuedToken, MetaState, Principal,
    PrincipalView, Refusal, Res, Role, RootKey, SettingsView, ShredReport, Tenant, TenantView, Token, TokenView,
};

impl MetaState {
    /// Runs a command of this domain (`execute` routes here).
    pub(super) fn execute_tenants(&mut self, ctx: &mut Ctx, cmd: &Command, root: &mut RootKey) -> Res {
        match cmd {
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
                if let Some(v) = req.audit_max_records {
                    s.audit_max_records = v;
                }
                if let Some(v) = req.audit_max_age_ms {
                    s.audit_max_age_ms = v;
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
            _ => Err(internal("a command was routed to the tenants handlers by mistake")),
        }
    }
}
