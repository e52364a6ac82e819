//! The keys domain of `apply`: re-keying the root with fresh randomness.
//!
//! `slate-meta rotate-root` asks any node; that node (the proposer) draws a new
//! root from the OS CSPRNG and proposes it wrapped under the current root.
//! Every voter applies the same entry: it opens the new root with the root it
//! holds, re-wraps every tenant key under it (AES-KW is deterministic, so the
//! states stay byte-identical), and then, like a shred, persists its state,
//! stores the new root over the old file (destroying it) and purges its Raft log
//! past the entry, so the wrapped new root leaves the log. Unlike the shred's
//! ratchet, nothing derives the new root from the old one: a root key file
//! stolen before the rotation opens nothing written after it once the rotation
//! record is gone. The record stays in the state only until every voter reports
//! the new epoch (a voter that was down needs it to cross the rotation).

use super::apply::{internal, json, require_operator, Ctx, Res};
use super::command::{ErrorCode, Refusal};
use super::MetaState;
use crate::keys::{RootKey, RootRotation, WrappedKey};
use std::collections::BTreeMap;

impl MetaState {
    pub(super) fn rotate_root(
        &mut self,
        ctx: &mut Ctx,
        root: &mut RootKey,
        wrapped_root: &WrappedKey,
        root_epoch: u64,
    ) -> Res {
        require_operator(&ctx.actor)?;
        if root_epoch != self.root_epoch || root.epoch() != self.root_epoch {
            return Err(Refusal::new(ErrorCode::KeyRotated, "root key moved while proposing; retry"));
        }
        // Check everything first: the new root opens, every tenant key opens.
        let next = root.open_successor(wrapped_root).map_err(|e| internal(e.to_string()))?;
        let mut keys = BTreeMap::new();
        for t in self.tenants.values() {
            keys.insert(t.id, root.unwrap_tenant_key(&t.wrapped_key).map_err(|e| internal(e.to_string()))?);
        }
        for (id, k) in &keys {
            self.tenants.get_mut(id).expect("listed").wrapped_key = next.wrap_tenant_key(k);
        }
        let from = root.epoch();
        *root = next;
        self.root_epoch = root.epoch();
        self.root_epoch_index = self.applied_index;
        self.root_generation += 1;
        self.root_rotation = Some(RootRotation { epoch: self.root_epoch, wrapped_root: wrapped_root.clone() });
        ctx.object = format!("root epoch:{from}->{} generation:{}", self.root_epoch, self.root_generation);
        ctx.set_shredded();
        json(&serde_json::json!({
            "root_epoch": self.root_epoch,
            "root_generation": self.root_generation,
            "tenant_keys_rewrapped": keys.len(),
        }))
    }

    /// Drops the rotation record once every voter holds the new root; true when it did
    /// (the caller then purges the log and old snapshots that still carry it).
    pub(super) fn settle_root_rotation(&mut self) -> bool {
        let Some(r) = &self.root_rotation else { return false };
        let all = !self.meta_voters.is_empty()
            && self.meta_voters.iter().all(|v| self.meta_purged.get(v).is_some_and(|p| *p >= r.epoch));
        if all {
            self.root_rotation = None;
        }
        all
    }
}
