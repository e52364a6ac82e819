//! What the API's guard and the leader's liveness tracker read from, and write into, the
//! replicated state (design/api-security.md).
//!
//! * **Reads without a log entry.** [`MetaState::auth_table`] is the token table the guard
//!   checks credentials against before anything is proposed; [`MetaState::heartbeat_reply`]
//!   and [`MetaState::attached_layout`] answer a storage node's heartbeat and an attached
//!   client's layout poll from a replica's state, read-only. Both were already unaudited when
//!   they changed nothing; they now also cost no Raft entry.
//! * **Writes that summarize.** [`MetaState::merge_liveness`] takes the leader's in-memory
//!   heartbeat times into the state only when a sweep is proposed, and
//!   [`MetaState::record_security_events`] appends one audit record per aggregated event
//!   (source, kind, count), never one per refused request.

use super::apply::{Actor, Ctx, Need};
use super::command::{Refusal, SecurityEvent};
use super::types::{NodeState, Role};
use super::view::VolumeView;
use super::MetaState;
use crate::audit::AuditEntry;
use slate_protocol::ops::HeartbeatReply;
use std::collections::{BTreeMap, HashMap};

/// Public token ids drawn by the proposer lie in `[RANDOM_TOKEN_ID_MIN, RANDOM_TOKEN_ID_MAX)`:
/// above any sequential id, and below 2^53 so every JSON reader keeps them exact.
pub const RANDOM_TOKEN_ID_MIN: u64 = 1 << 32;
pub const RANDOM_TOKEN_ID_MAX: u64 = 1 << 53;

/// What the guard needs to know about one token (no secret: only its hash).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuthEntry {
    pub principal: u64,
    pub principal_name: String,
    pub role: Role,
    pub tenant: Option<u64>,
    /// The storage node a `node` principal speaks for.
    pub node: Option<u64>,
    /// Hex SHA-256 of the secret.
    pub secret_sha256: String,
    pub token_expires_ms: Option<u64>,
    pub not_before_ms: Option<u64>,
    pub not_after_ms: Option<u64>,
    /// The principal is locked in the replicated state (legacy lockout, or an operator's choice).
    pub locked_until_ms: Option<u64>,
}

/// One storage node as the leader's liveness tracker sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NodeLiveness {
    pub id: u64,
    pub state: NodeState,
    pub last_heartbeat_ms: u64,
}

impl MetaState {
    /// The id of a new token: the proposer's random id if it is in range and free, else (older
    /// log entries) the next counter value.
    pub(super) fn new_token_id(&mut self, proposed: Option<u64>) -> Result<u64, Refusal> {
        match proposed {
            Some(id) => {
                if !(RANDOM_TOKEN_ID_MIN..RANDOM_TOKEN_ID_MAX).contains(&id) {
                    return Err(Refusal::bad("token id out of range"));
                }
                if self.tokens.contains_key(&id) {
                    return Err(Refusal::conflict("token id already in use; retry"));
                }
                Ok(id)
            }
            None => Ok(super::take(&mut self.next.token)),
        }
    }

    /// Every token the guard may accept, by public id.
    pub fn auth_table(&self) -> HashMap<u64, AuthEntry> {
        self.tokens
            .values()
            .filter_map(|t| {
                let p = self.principals.get(&t.principal)?;
                Some((
                    t.id,
                    AuthEntry {
                        principal: p.id,
                        principal_name: p.name.clone(),
                        role: p.role,
                        tenant: p.tenant,
                        node: p.node,
                        secret_sha256: t.secret_sha256.clone(),
                        token_expires_ms: t.expires_ms,
                        not_before_ms: p.not_before_ms,
                        not_after_ms: p.not_after_ms,
                        locked_until_ms: p.locked_until_ms,
                    },
                ))
            })
            .collect()
    }

    /// A storage node's heartbeat reply: its state and its work (releases, copies, a
    /// decommission, a scrub, freezes), computed without changing anything.
    pub fn heartbeat_reply(&self, node: u64) -> Result<serde_json::Value, Refusal> {
        let n = self.nodes.get(&node).ok_or_else(|| Refusal::not_found(format!("no node {node}")))?;
        let mut work = self.node_work(node);
        work.copies = self.copy_tasks(node);
        work.decommission = self.decommission_task(node);
        work.scrub = self.scrub_request(node);
        work.freezes = self.freeze_tasks(node);
        work.fences = self.fences_for(node);
        serde_json::to_value(HeartbeatReply { node, state: n.state, work })
            .map_err(|e| super::apply::internal(e.to_string()))
    }

    /// The storage nodes and their replicated liveness.
    pub fn liveness(&self) -> Vec<NodeLiveness> {
        self.nodes
            .values()
            .map(|n| NodeLiveness { id: n.id, state: n.state, last_heartbeat_ms: n.last_heartbeat_ms })
            .collect()
    }

    /// True if a sweep has work when the nodes' last signs of life are `liveness_ms` (the
    /// leader's view; nodes missing from it use the replicated time).
    pub fn sweep_due_with(&self, now_ms: u64, liveness_ms: &BTreeMap<u64, u64>) -> bool {
        let timeout = self.settings.heartbeat_timeout_ms;
        let overdue = self.nodes.values().any(|n| {
            let seen = liveness_ms.get(&n.id).copied().unwrap_or(0).max(n.last_heartbeat_ms);
            matches!(n.state, NodeState::Active | NodeState::Draining) && now_ms.saturating_sub(seen) > timeout
        });
        overdue || self.segments_on_down_nodes() > 0
    }

    /// Takes the leader's view of heartbeat times into the state (never moving one back).
    pub(super) fn merge_liveness(&mut self, liveness_ms: &BTreeMap<u64, u64>) {
        for (id, ms) in liveness_ms {
            if let Some(n) = self.nodes.get_mut(id) {
                n.last_heartbeat_ms = n.last_heartbeat_ms.max(*ms);
            }
        }
    }

    /// The layout of `volume` for a principal that holds one of its attachments (the client's
    /// routine poll), or `None` when the call must go through the log (no such attachment, not
    /// allowed, no such volume: those outcomes are audited).
    pub fn attached_layout(
        &self,
        principal: u64,
        name: &str,
        role: Role,
        tenant: Option<u64>,
        volume: u64,
        now_ms: u64,
    ) -> Option<VolumeView> {
        let v = self.volumes.get(&volume)?;
        if !v.attachments.values().any(|a| a.principal == principal) {
            return None;
        }
        let actor = Actor { principal: Some(principal), name: name.to_owned(), role, tenant, node: None };
        self.check_volume(&actor, v, Need::View).ok()?;
        Some(self.volume_view(v, now_ms))
    }

    /// `POST /v1/security-events` from a principal the API did not let through: storage nodes
    /// (their node principals), hosts and operators may report; anyone else is refused here,
    /// in the chain.
    pub(super) fn report_security_event(ctx: &mut Ctx) -> Result<serde_json::Value, Refusal> {
        if !matches!(ctx.actor.role, Role::Operator | Role::Host | Role::Node) {
            return Err(Refusal::forbidden("security events are reported by storage nodes, hosts or operators"));
        }
        ctx.skip_audit = true;
        Ok(serde_json::json!({"accepted": true}))
    }

    /// One audit record per aggregated security event. Cluster-level records (tenant `None`):
    /// only operators read them, since a source address or a token id tells nothing a tenant
    /// should learn about another.
    pub(super) fn record_security_events(&mut self, now: u64, events: &[SecurityEvent]) {
        for e in events {
            let detail = if e.detail.is_empty() { String::new() } else { format!("; last: {}", e.detail) };
            self.audit.append(AuditEntry {
                time_ms: now,
                actor: if e.reporter == "api" { "anonymous".into() } else { e.reporter.clone() },
                tenant: None,
                client: e.source.clone(),
                action: format!("security.{}", e.kind),
                object: format!("count:{} first_ms:{} last_ms:{}", e.count, e.first_ms, e.last_ms),
                result: format!("denied: {} x {} from {}{detail}", e.count, e.kind, e.source),
            });
        }
    }
}
