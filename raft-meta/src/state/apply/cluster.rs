//! Command handlers: the audit chain and the metadata group's membership.

use super::{internal, json, require_operator, AuditPage, Command, Ctx, MetaState, Refusal, Res, Role, MAX_AUDIT_PAGE};

impl MetaState {
    /// Runs a command of this domain (`execute` routes here).
    pub(super) fn execute_cluster(&mut self, ctx: &mut Ctx, cmd: &Command) -> Res {
        match cmd {
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
                json(&AuditPage {
                    records,
                    last_seq: self.audit.records.last().map_or(0, |r| r.seq),
                    anchor: self.audit.anchor.clone(),
                })
            }
            Command::VerifyAudit => {
                if !(ctx.actor.is_operator() || ctx.actor.role == Role::TenantAdmin) {
                    return Err(Refusal::forbidden("verifying the audit chain needs an operator or tenant admin"));
                }
                json(&self.audit.verify())
            }
            Command::ListMembers => {
                require_operator(&ctx.actor)?;
                Ok(serde_json::Value::Null)
            }
            Command::ChangeMembership { req, add } => {
                require_operator(&ctx.actor)?;
                if *add && req.addr.as_deref().and_then(|a| a.parse::<std::net::SocketAddr>().ok()).is_none() {
                    return Err(Refusal::bad("adding a member needs addr as ip:port"));
                }
                json(&serde_json::json!({"authorized": true}))
            }
            _ => Err(internal("a command was routed to the cluster handlers by mistake")),
        }
    }
}
