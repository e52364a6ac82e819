//! Command handlers: storage nodes and disks: registration, liveness, state.

use super::{
    internal, json, require_operator, take, validate_register_node, AuditEntry, Command, Ctx, Disk, DiskState,
    DiskView, MetaState, NodeState, NodeView, Refusal, Res, StorageNode,
};

impl MetaState {
    /// Runs a command of this domain (`execute` routes here).
    pub(super) fn execute_nodes(&mut self, ctx: &mut Ctx, cmd: &Command) -> Res {
        match cmd {
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
            _ => Err(internal("a command was routed to the nodes handlers by mistake")),
        }
    }

    /// The liveness sweep: marks overdue nodes down and re-places replicas on down nodes.
    pub(in crate::state) fn sweep(&mut self, ctx: &mut Ctx) {
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
}
