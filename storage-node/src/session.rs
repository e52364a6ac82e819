//! What a data-plane session may do, and in which order its writes reach the engine.
//!
//! These are the pure parts of the server, kept apart from sockets so that they
//! read (and test) as plain rules:
//!
//! - [`open`] turns a hello into a [`Session`]: protocol version, then the
//!   capability's signature, expiry and node scope.
//! - [`Session::authorize`] checks every later request against the capability:
//!   expiry again, the volume, the right the request needs, and the
//!   generation, both against the capability's and against the highest
//!   generation this node has seen for the volume ([`GenerationTable`]).
//! - [`OrderTracker`] makes overlapping mutations of one connection reach the
//!   engine in arrival order while everything else runs concurrently: a
//!   request that overlaps an earlier, unfinished mutation waits for it first.
//!   Ordering is by construction here, so it does not depend on how the engine
//!   queues work internally.

use ed25519_dalek::VerifyingKey;
use slate_protocol::message::BlockRange;
use slate_protocol::{
    Capability, CapabilityError, ErrorKind, Generation, Holder, NodeId, Request, Rights, SignedCapability, VolumeId,
    WireError, PROTOCOL_VERSION,
};
use std::collections::HashMap;
use std::sync::Mutex;
use tokio::sync::watch;

/// The highest generation seen per volume on this node, in memory.
///
/// The engine persists the same number (fencing survives restarts); every hello
/// goes through the engine's durable check first and then raises this table,
/// so a per-request lookup here refuses exactly what the engine would refuse,
/// without a round trip to the engine thread on every request.
///
/// A per-volume *fence* closes the race between a takeover and requests that
/// were admitted under the older generation: every request holds the fence
/// shared from its final generation check until the engine has finished it,
/// and a hello raising the generation holds it exclusively. So a takeover
/// completes only after every older request already admitted has landed, and
/// no request of the older generation is admitted after it.
#[derive(Debug, Default)]
pub struct GenerationTable {
    highest: Mutex<HashMap<VolumeId, Generation>>,
    fences: Mutex<HashMap<VolumeId, std::sync::Arc<tokio::sync::RwLock<()>>>>,
}

impl GenerationTable {
    /// Records that `generation` of `volume` was admitted (keeps the maximum).
    pub fn raise(&self, volume: VolumeId, generation: Generation) {
        let mut h = self.highest.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let e = h.entry(volume).or_insert(generation);
        *e = (*e).max(generation);
    }

    /// The highest admitted generation of `volume`, if any session opened for it.
    pub fn highest(&self, volume: VolumeId) -> Option<Generation> {
        self.highest.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(&volume).copied()
    }

    /// The fence of `volume` (see the type's docs).
    pub fn fence(&self, volume: VolumeId) -> std::sync::Arc<tokio::sync::RwLock<()>> {
        let mut f = self.fences.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        std::sync::Arc::clone(f.entry(volume).or_default())
    }

    /// Refuses `generation` of `volume` if a newer one has been admitted.
    pub fn check(&self, volume: VolumeId, generation: Generation) -> Result<(), WireError> {
        match self.highest(volume) {
            Some(highest) if generation < highest => Err(WireError::new(
                ErrorKind::StaleGeneration,
                format!("{generation} is fenced: {volume} has attached {highest}"),
            )),
            _ => Ok(()),
        }
    }
}

/// An open session: the verified claims of its capability.
#[derive(Debug, Clone)]
pub struct Session {
    pub claims: Capability,
}

/// The wire error for a refused capability.
pub fn capability_refusal(e: CapabilityError) -> WireError {
    let kind = match e {
        CapabilityError::Forged => ErrorKind::Forged,
        CapabilityError::Expired => ErrorKind::Expired,
        CapabilityError::WrongNode => ErrorKind::WrongNode,
        CapabilityError::Malformed => ErrorKind::Malformed,
        CapabilityError::NotYetValid => ErrorKind::NotYetValid,
    };
    WireError::new(kind, e.to_string())
}

/// The security-event kind of a refused hello, if the refusal is one
/// (a wrong node or an old protocol version is a configuration matter, not an attack).
pub fn kind_of_refusal(kind: ErrorKind) -> Option<&'static str> {
    use slate_protocol::ops::security_kind as k;
    match kind {
        ErrorKind::Forged | ErrorKind::Malformed => Some(k::FORGED_CAPABILITY),
        ErrorKind::Expired | ErrorKind::NotYetValid => Some(k::EXPIRED_CAPABILITY),
        ErrorKind::NotHolder => Some(k::CAPABILITY_KEY_MISMATCH),
        _ => None,
    }
}

/// Checks a hello: version, then the capability (signature, validity window,
/// node scope), then its holder binding against the certificate the TLS peer
/// proved it holds (`peer`, `None` on a plaintext test listener, where there is
/// no peer to bind to). The durable generation check against the engine comes after this.
pub fn open(
    version: u16,
    capability: &SignedCapability,
    key: &VerifyingKey,
    node: NodeId,
    now_unix_secs: u64,
    peer: Option<Holder>,
) -> Result<Session, WireError> {
    if version != PROTOCOL_VERSION {
        return Err(WireError::new(
            ErrorKind::Version,
            format!("protocol version {version} not supported; this node speaks {PROTOCOL_VERSION}"),
        ));
    }
    let claims = capability.verify(key, node, now_unix_secs).map_err(capability_refusal)?;
    if let Some(peer) = peer {
        if claims.holder != peer {
            return Err(WireError::new(
                ErrorKind::NotHolder,
                "the capability is bound to another client certificate than this TLS session's",
            ));
        }
    }
    Ok(Session { claims: claims.clone() })
}

/// The right a request needs.
pub fn required_right(req: &Request) -> Rights {
    match req {
        Request::Read { .. }
        | Request::ReadAt { .. }
        | Request::Allocated { .. }
        | Request::ChangedBlocks { .. }
        | Request::WriteIntents { .. }
        | Request::Hello { .. } => Rights::READ,
        Request::Write { .. }
        | Request::Trim { .. }
        | Request::WriteZeroes { .. }
        | Request::Flush { .. }
        | Request::ClearIntents { .. } => Rights::WRITE,
        Request::AssignSegment { .. }
        | Request::ReleaseSegment { .. }
        | Request::Snapshot { .. }
        | Request::DeleteLayer { .. } => Rights::ADMIN,
    }
}

impl Session {
    /// Checks one request against the capability and the node's generation table.
    pub fn authorize(&self, req: &Request, now_unix_secs: u64, gens: &GenerationTable) -> Result<(), WireError> {
        let Some(target) = req.target() else {
            return Err(WireError::new(ErrorKind::NoSession, "hello sent twice on one connection"));
        };
        if self.claims.expired_at(now_unix_secs) {
            return Err(WireError::new(ErrorKind::Expired, "capability expired during the session"));
        }
        if target.volume != self.claims.volume {
            return Err(WireError::new(
                ErrorKind::WrongVolume,
                format!("request for {} on a session for {}", target.volume, self.claims.volume),
            ));
        }
        let need = required_right(req);
        if !self.claims.rights.contains(need) {
            return Err(WireError::new(
                ErrorKind::NoRight,
                format!("request needs {need:?}; capability grants {:?}", self.claims.rights),
            ));
        }
        if target.generation > self.claims.generation {
            return Err(WireError::new(
                ErrorKind::NoRight,
                format!("request claims {} but the capability is for {}", target.generation, self.claims.generation),
            ));
        }
        check_scope(req, &self.claims)?;
        let highest = gens.highest(target.volume).unwrap_or(self.claims.generation).max(self.claims.generation);
        if target.generation < highest {
            return Err(WireError::new(
                ErrorKind::StaleGeneration,
                format!("{} is fenced: {} has attached {}", target.generation, target.volume, highest),
            ));
        }
        Ok(())
    }
}

/// Checks a layout request against the capability's segment scope: a segment the
/// volume does not have (by count, or starting at or past its size) is refused, so
/// a capability cannot make a node allocate space beyond the volume. Block ranges
/// need no check of their own: the engine serves only blocks of assigned segments.
pub fn check_scope(req: &Request, claims: &Capability) -> Result<(), WireError> {
    let segment = match req {
        Request::AssignSegment { segment, segment_blocks, .. } => {
            let start = u64::from(segment.0).saturating_mul(*segment_blocks);
            if start >= claims.size_blocks {
                return Err(WireError::new(
                    ErrorKind::OutOfRange,
                    format!(
                        "{segment} of {segment_blocks} blocks starts at block {start}, past the volume's {} blocks",
                        claims.size_blocks
                    ),
                ));
            }
            *segment
        }
        Request::ReleaseSegment { segment, .. }
        | Request::ChangedBlocks { segment, .. }
        | Request::DeleteLayer { segment, .. } => *segment,
        _ => return Ok(()),
    };
    if u64::from(segment.0) >= claims.segments {
        return Err(WireError::new(
            ErrorKind::OutOfRange,
            format!("{segment} is outside the capability's {} segment(s)", claims.segments),
        ));
    }
    Ok(())
}

/// Where a request sits in the per-connection order of mutations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ordering {
    /// Runs at once, concurrently with anything (reads, status queries).
    Free,
    /// Mutates these blocks: waits for earlier overlapping mutations; later overlapping ones wait for it.
    Mutates { start: u64, end: u64 },
    /// Changes the layout or layers of the volume: ordered against every mutation, before and after.
    Barrier,
    /// Waits for every earlier mutation, but later ones need not wait for it (flush).
    AfterAll,
}

/// How `req` is ordered against the other requests of its connection.
pub fn ordering_of(req: &Request) -> Ordering {
    let span = |r: BlockRange| Ordering::Mutates { start: r.start.0, end: r.start.0.saturating_add(r.count) };
    match req {
        Request::Write { start, crcs, .. } => span(BlockRange { start: *start, count: crcs.len() as u64 }),
        Request::Trim { range, .. } | Request::WriteZeroes { range, .. } => span(*range),
        Request::Snapshot { .. }
        | Request::DeleteLayer { .. }
        | Request::AssignSegment { .. }
        | Request::ReleaseSegment { .. }
        | Request::ClearIntents { .. } => Ordering::Barrier,
        Request::Flush { .. } => Ordering::AfterAll,
        Request::Hello { .. }
        | Request::Read { .. }
        | Request::ReadAt { .. }
        | Request::Allocated { .. }
        | Request::ChangedBlocks { .. }
        | Request::WriteIntents { .. } => Ordering::Free,
    }
}

#[derive(Debug)]
struct InFlight {
    start: u64,
    end: u64,
    done: watch::Receiver<()>,
}

/// Signals completion of a mutation when dropped.
#[derive(Debug)]
pub struct Completion(#[allow(dead_code)] Option<watch::Sender<()>>);

/// Waits until every dependency has completed.
#[derive(Debug, Default)]
pub struct Dependencies(Vec<watch::Receiver<()>>);

impl Dependencies {
    /// Number of earlier requests this one waits for.
    pub fn len(&self) -> usize {
        self.0.len()
    }
    /// True when the request can run at once.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    /// Resolves once every dependency's [`Completion`] is dropped.
    /// True when every mutation it waits for has finished already.
    pub fn is_ready(&self) -> bool {
        self.0.iter().all(|rx| rx.has_changed().is_err())
    }

    pub async fn wait(self) {
        for mut rx in self.0 {
            // No value is ever sent: `changed` returns (with an error) when the sender is dropped.
            while rx.changed().await.is_ok() {}
        }
    }
}

/// The unfinished mutations of one connection, owned by its reader loop.
#[derive(Debug, Default)]
pub struct OrderTracker {
    inflight: Vec<InFlight>,
}

impl OrderTracker {
    /// Registers a request that arrived now; returns what it must wait for and
    /// the token it drops when done.
    pub fn arrive(&mut self, ordering: Ordering) -> (Dependencies, Completion) {
        // Forget finished mutations (their senders are gone).
        self.inflight.retain(|f| f.done.has_changed().is_ok());
        let (start, end, register) = match ordering {
            Ordering::Free => return (Dependencies::default(), Completion(None)),
            Ordering::AfterAll => (0, u64::MAX, false),
            Ordering::Barrier => (0, u64::MAX, true),
            Ordering::Mutates { start, end } => (start, end, true),
        };
        let deps = self.inflight.iter().filter(|f| f.start < end && start < f.end).map(|f| f.done.clone()).collect();
        if !register {
            return (Dependencies(deps), Completion(None));
        }
        let (tx, rx) = watch::channel(());
        self.inflight.push(InFlight { start, end, done: rx });
        (Dependencies(deps), Completion(Some(tx)))
    }

    /// Mutations not yet known to be finished.
    pub fn len(&self) -> usize {
        self.inflight.len()
    }

    /// True when no mutation is in flight.
    pub fn is_empty(&self) -> bool {
        self.inflight.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use slate_protocol::{BlockIndex, SegmentIndex, Target};

    #[test]
    fn refused_hellos_that_are_security_events() {
        assert_eq!(kind_of_refusal(ErrorKind::NotHolder), Some("capability-key-mismatch"));
        assert_eq!(kind_of_refusal(ErrorKind::WrongNode), None);
    }

    fn session(rights: Rights, generation: u64) -> Session {
        Session {
            claims: Capability {
                volume: VolumeId(1),
                generation: Generation(generation),
                rights,
                expires_unix_secs: 1_000,
                nodes: vec![NodeId(1)],
                ..Default::default()
            },
        }
    }

    fn read(volume: u64, generation: u64) -> Request {
        Request::Read {
            target: Target { volume: VolumeId(volume), generation: Generation(generation) },
            start: BlockIndex(0),
            count: 1,
        }
    }

    #[test]
    fn authorizes_by_volume_right_generation_expiry() {
        let gens = GenerationTable::default();
        let s = session(Rights::READ, 5);
        assert!(s.authorize(&read(1, 5), 10, &gens).is_ok());
        assert_eq!(s.authorize(&read(2, 5), 10, &gens).unwrap_err().kind, ErrorKind::WrongVolume);
        assert_eq!(s.authorize(&read(1, 4), 10, &gens).unwrap_err().kind, ErrorKind::StaleGeneration);
        assert_eq!(s.authorize(&read(1, 6), 10, &gens).unwrap_err().kind, ErrorKind::NoRight);
        let past = 1_000 + slate_protocol::capability::CLOCK_SKEW_SECS;
        assert_eq!(s.authorize(&read(1, 5), past, &gens).unwrap_err().kind, ErrorKind::Expired);
        let flush = Request::Flush { target: Target { volume: VolumeId(1), generation: Generation(5) } };
        assert_eq!(s.authorize(&flush, 10, &gens).unwrap_err().kind, ErrorKind::NoRight);
        let read_at = Request::ReadAt {
            target: Target { volume: VolumeId(1), generation: Generation(5) },
            epoch: slate_protocol::Epoch(3),
            start: BlockIndex(0),
            count: 1,
        };
        assert!(s.authorize(&read_at, 10, &gens).is_ok(), "a snapshot read needs only READ");
        assert_eq!(ordering_of(&read_at), Ordering::Free);
        assert_eq!(session(Rights::WRITE, 5).authorize(&read_at, 10, &gens).unwrap_err().kind, ErrorKind::NoRight);
        gens.raise(VolumeId(1), Generation(6));
        assert_eq!(s.authorize(&read(1, 5), 10, &gens).unwrap_err().kind, ErrorKind::StaleGeneration);
    }

    #[test]
    fn layout_requests_stay_inside_the_volume() {
        let gens = GenerationTable::default();
        let mut s = session(Rights::ADMIN, 5);
        s.claims.size_blocks = 3 * 1024 - 10; // three segments, the last one short
        s.claims.segments = 3;
        let t = Target { volume: VolumeId(1), generation: Generation(5) };
        let assign = |i| Request::AssignSegment { target: t, segment: SegmentIndex(i), segment_blocks: 1024 };
        assert!(s.authorize(&assign(2), 10, &gens).is_ok());
        assert_eq!(s.authorize(&assign(3), 10, &gens).unwrap_err().kind, ErrorKind::OutOfRange);
        assert_eq!(s.authorize(&assign(u32::MAX), 10, &gens).unwrap_err().kind, ErrorKind::OutOfRange);
        let huge = Request::AssignSegment { target: t, segment: SegmentIndex(1), segment_blocks: 4096 };
        assert_eq!(s.authorize(&huge, 10, &gens).unwrap_err().kind, ErrorKind::OutOfRange, "starts past the size");
        let release = Request::ReleaseSegment { target: t, segment: SegmentIndex(7) };
        assert_eq!(s.authorize(&release, 10, &gens).unwrap_err().kind, ErrorKind::OutOfRange);
    }

    #[test]
    fn a_capability_opens_only_on_its_holders_session() {
        let key = slate_protocol::capability::generate_signing_key();
        let holder = Holder([1; 32]);
        let cap = Capability {
            volume: VolumeId(1),
            generation: Generation(1),
            rights: Rights::READ,
            expires_unix_secs: 2_000,
            nodes: vec![NodeId(1)],
            holder,
            ..Default::default()
        }
        .sign(&key);
        let vk = key.verifying_key();
        assert!(open(PROTOCOL_VERSION, &cap, &vk, NodeId(1), 10, Some(holder)).is_ok());
        let e = open(PROTOCOL_VERSION, &cap, &vk, NodeId(1), 10, Some(Holder([2; 32]))).unwrap_err();
        assert_eq!(e.kind, ErrorKind::NotHolder);
    }

    #[tokio::test]
    async fn overlapping_mutations_wait_in_arrival_order() {
        let mut t = OrderTracker::default();
        let (d1, c1) = t.arrive(Ordering::Mutates { start: 0, end: 8 });
        assert!(d1.is_empty());
        let (d2, c2) = t.arrive(Ordering::Mutates { start: 8, end: 16 });
        assert!(d2.is_empty());
        let (d3, _c3) = t.arrive(Ordering::Mutates { start: 4, end: 10 });
        assert_eq!(d3.len(), 2);
        let (d4, _) = t.arrive(Ordering::Free);
        assert!(d4.is_empty());
        let (d5, _) = t.arrive(Ordering::AfterAll);
        assert_eq!(d5.len(), 3);
        let waiter = tokio::spawn(d3.wait());
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(c1);
        drop(c2);
        waiter.await.unwrap();
        let (d6, _) = t.arrive(Ordering::Mutates { start: 0, end: 1 });
        assert_eq!(t.len(), 2, "finished mutations are forgotten");
        assert!(d6.is_empty());
    }
}
