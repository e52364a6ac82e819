//! Replica sets as the client sees them: who gets writes, who serves reads,
//! and how far each rebuild has got.
//!
//! - The **write set** of a segment is every member, in sync or rebuilding:
//!   a rebuilding replica must see every write made after it joined, or the
//!   copy from the survivor could leave it behind.
//! - The **read set** is the in-sync members only; reads rotate over it
//!   (round robin per segment) and skip replicas that already failed this read.
//! - A rebuild's progress is counted in blocks of its segment, copied (or
//!   found unwritten on the source) out of the segment's length.
//!
//! Pure logic, no I/O: the volume's actor owns these.

use super::layout::{ReplicaRole, SegmentReplicas};
use serde::Serialize;
use slate_protocol::{Epoch, NodeId, SegmentIndex};

/// A member of a segment's replica set.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Member {
    pub node: NodeId,
    pub addr: String,
    pub role: ReplicaRole,
    /// Blocks of the segment copied so far, while rebuilding.
    pub rebuild_done_blocks: u64,
    /// Blocks the rebuild must cover (the segment's length).
    pub rebuild_total_blocks: u64,
}

/// What [`SegmentSet::merge`] changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct MergeOutcome {
    /// Members new to this client: they join as rebuilding and need a copy.
    pub joined: Vec<NodeId>,
    /// Members the metadata service dropped.
    pub left: Vec<NodeId>,
}

/// One segment's replica set.
#[derive(Clone, Debug)]
pub struct SegmentSet {
    pub segment: SegmentIndex,
    pub epoch: Epoch,
    /// The segment's length in blocks (for rebuild progress).
    pub len_blocks: u64,
    members: Vec<Member>,
    next_reader: usize,
}

impl SegmentSet {
    /// The set as the metadata service gave it at attach.
    pub fn from_layout(s: &SegmentReplicas, len_blocks: u64) -> Self {
        let members = s
            .replicas
            .iter()
            .map(|r| Member {
                node: r.node,
                addr: r.addr.clone(),
                role: r.role,
                rebuild_done_blocks: 0,
                rebuild_total_blocks: if r.role == ReplicaRole::Rebuilding { len_blocks } else { 0 },
            })
            .collect();
        Self { segment: s.segment, epoch: s.epoch, len_blocks, members, next_reader: s.segment.0 as usize }
    }

    pub fn members(&self) -> &[Member] {
        &self.members
    }

    pub fn contains(&self, node: NodeId) -> bool {
        self.members.iter().any(|m| m.node == node)
    }

    pub fn role(&self, node: NodeId) -> Option<ReplicaRole> {
        self.members.iter().find(|m| m.node == node).map(|m| m.role)
    }

    /// Every member: writes go to all of them.
    pub fn write_set(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.members.iter().map(|m| m.node)
    }

    /// In-sync members.
    pub fn in_sync(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.members.iter().filter(|m| m.role == ReplicaRole::InSync).map(|m| m.node)
    }

    pub fn in_sync_count(&self) -> usize {
        self.in_sync().count()
    }

    /// The next in-sync member to read from, skipping `exclude`; rotates so that
    /// successive reads spread over the replicas.
    pub fn pick_reader(&mut self, exclude: &[NodeId]) -> Option<NodeId> {
        self.pick_least_loaded(exclude, |_| 0)
    }

    /// The in-sync member not in `exclude` with the fewest requests in flight (`load`);
    /// members equally loaded take turns.
    pub fn pick_least_loaded(&mut self, exclude: &[NodeId], load: impl Fn(NodeId) -> usize) -> Option<NodeId> {
        let n = self.members.len();
        let mut best: Option<(usize, usize)> = None; // (load, k)
        for k in 0..n {
            let m = &self.members[(self.next_reader + k) % n];
            if m.role == ReplicaRole::InSync && !exclude.contains(&m.node) {
                let l = load(m.node);
                if best.is_none_or(|(bl, _)| l < bl) {
                    best = Some((l, k));
                }
            }
        }
        let (_, k) = best?;
        let node = self.members[(self.next_reader + k) % n].node;
        self.next_reader = (self.next_reader + k + 1) % n;
        Some(node)
    }

    /// Removes a failed member. Returns whether it was one.
    pub fn remove(&mut self, node: NodeId) -> bool {
        let before = self.members.len();
        self.members.retain(|m| m.node != node);
        self.members.len() != before
    }

    /// Installs the metadata service's new set. Members this client already
    /// had keep their role and progress (the client knows best whether a
    /// rebuild it runs has finished); new members join as rebuilding whatever
    /// the service says, because they hold none of this attachment's writes.
    pub fn merge(&mut self, new: &SegmentReplicas) -> MergeOutcome {
        let mut out = MergeOutcome::default();
        let mut members = Vec::with_capacity(new.replicas.len());
        for r in &new.replicas {
            if let Some(old) = self.members.iter().find(|m| m.node == r.node) {
                members.push(old.clone());
            } else {
                out.joined.push(r.node);
                members.push(Member {
                    node: r.node,
                    addr: r.addr.clone(),
                    role: ReplicaRole::Rebuilding,
                    rebuild_done_blocks: 0,
                    rebuild_total_blocks: self.len_blocks,
                });
            }
        }
        out.left =
            self.members.iter().filter(|m| !new.replicas.iter().any(|r| r.node == m.node)).map(|m| m.node).collect();
        self.members = members;
        self.epoch = self.epoch.max(new.epoch);
        out
    }

    /// Records rebuild progress of `node`.
    pub fn set_progress(&mut self, node: NodeId, done_blocks: u64) {
        if let Some(m) = self.members.iter_mut().find(|m| m.node == node && m.role == ReplicaRole::Rebuilding) {
            m.rebuild_done_blocks = done_blocks.min(m.rebuild_total_blocks);
        }
    }

    /// `node` finished its rebuild: it serves reads from now on. Returns whether it was rebuilding.
    pub fn mark_in_sync(&mut self, node: NodeId) -> bool {
        match self.members.iter_mut().find(|m| m.node == node && m.role == ReplicaRole::Rebuilding) {
            Some(m) => {
                m.role = ReplicaRole::InSync;
                m.rebuild_done_blocks = m.rebuild_total_blocks;
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::volume::layout::ReplicaInfo;

    fn set(roles: &[(u64, ReplicaRole)]) -> SegmentReplicas {
        SegmentReplicas {
            segment: SegmentIndex(0),
            epoch: Epoch(1),
            replicas: roles
                .iter()
                .map(|(n, role)| ReplicaInfo { node: NodeId(*n), addr: format!("a{n}"), role: *role })
                .collect(),
        }
    }

    #[test]
    fn reads_rotate_over_in_sync_members_only() {
        let mut s = SegmentSet::from_layout(
            &set(&[(1, ReplicaRole::InSync), (2, ReplicaRole::Rebuilding), (3, ReplicaRole::InSync)]),
            100,
        );
        let picks: Vec<_> = (0..4).map(|_| s.pick_reader(&[]).unwrap()).collect();
        assert!(!picks.contains(&NodeId(2)));
        assert!(picks.contains(&NodeId(1)) && picks.contains(&NodeId(3)));
        assert_ne!(picks[0], picks[1], "successive reads alternate");
        assert_eq!(s.pick_reader(&[NodeId(1)]), Some(NodeId(3)));
        assert_eq!(s.pick_reader(&[NodeId(1), NodeId(3)]), None);
        assert_eq!(s.write_set().count(), 3);
    }

    #[test]
    fn reads_go_to_the_least_loaded_in_sync_member() {
        let mut s = SegmentSet::from_layout(
            &set(&[(1, ReplicaRole::InSync), (2, ReplicaRole::Rebuilding), (3, ReplicaRole::InSync)]),
            100,
        );
        let load = |n: NodeId| match n.0 {
            1 => 5,
            2 => 0, // rebuilding: never a reader, however idle
            _ => 1,
        };
        for _ in 0..3 {
            assert_eq!(s.pick_least_loaded(&[], load), Some(NodeId(3)));
        }
        assert_eq!(s.pick_least_loaded(&[NodeId(3)], load), Some(NodeId(1)), "the busy one when it is the only one");
        let even: Vec<_> = (0..4).map(|_| s.pick_least_loaded(&[], |_| 2).unwrap()).collect();
        assert_ne!(even[0], even[1], "equally loaded members take turns");
    }

    #[test]
    fn replacement_joins_rebuilding_and_finishes_in_sync() {
        let mut s = SegmentSet::from_layout(&set(&[(1, ReplicaRole::InSync), (2, ReplicaRole::InSync)]), 100);
        assert!(s.remove(NodeId(2)));
        assert!(!s.remove(NodeId(2)));
        assert_eq!(s.in_sync_count(), 1);
        let out = s.merge(&set(&[(1, ReplicaRole::InSync), (4, ReplicaRole::InSync)]));
        assert_eq!(out, MergeOutcome { joined: vec![NodeId(4)], left: vec![] });
        assert_eq!(s.role(NodeId(4)), Some(ReplicaRole::Rebuilding), "a newcomer never serves reads at once");
        assert_eq!(s.write_set().collect::<Vec<_>>(), vec![NodeId(1), NodeId(4)]);
        for _ in 0..3 {
            assert_eq!(s.pick_reader(&[]), Some(NodeId(1)));
        }
        s.set_progress(NodeId(4), 40);
        assert_eq!(s.members()[1].rebuild_done_blocks, 40);
        assert!(s.mark_in_sync(NodeId(4)));
        assert!(!s.mark_in_sync(NodeId(4)));
        assert_eq!(s.in_sync_count(), 2);
        let out = s.merge(&set(&[(4, ReplicaRole::InSync), (5, ReplicaRole::InSync)]));
        assert_eq!(out, MergeOutcome { joined: vec![NodeId(5)], left: vec![NodeId(1)] });
    }
}
