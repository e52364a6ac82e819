//! Replica placement: R nodes in R distinct failure domains, balanced by free space.
//!
//! A pure function of its inputs (the candidates are listed in node-id order and
//! ties are broken by node id), so every metadata replica that applies the same
//! command computes the same replica sets. Failure domains are paths
//! `zone/rack/host`; the operator picks the level at which replicas must differ.

use std::collections::{BTreeMap, BTreeSet};

pub use slate_protocol::api::DomainLevel;

/// Longest failure-domain path accepted.
pub const MAX_DOMAIN_PATH: usize = 192;

/// Checks a failure-domain path: exactly `zone/rack/host`, each part 1..=63 of `[A-Za-z0-9._-]`.
pub fn validate_domain_path(path: &str) -> Result<(), String> {
    if path.len() > MAX_DOMAIN_PATH {
        return Err(format!("failure domain path longer than {MAX_DOMAIN_PATH} bytes"));
    }
    let parts: Vec<&str> = path.split('/').collect();
    if parts.len() != 3 {
        return Err(format!("failure domain must be zone/rack/host (3 parts), got {} part(s)", parts.len()));
    }
    for p in parts {
        if p.is_empty() || p.len() > 63 || !p.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)) {
            return Err("each failure domain part must be 1-63 characters of letters, digits, '.', '_' or '-'".into());
        }
    }
    Ok(())
}

/// The domain of `path` at `level`: its first 1, 2 or 3 parts.
pub fn domain_at(path: &str, level: DomainLevel) -> String {
    path.split('/').take(level.depth()).collect::<Vec<_>>().join("/")
}

/// A node that may take replicas.
#[derive(Clone, Debug)]
pub struct Candidate {
    pub node: u64,
    pub domain_path: String,
    /// Capacity minus what placement has already assigned (may go negative: thin provisioning).
    pub free_bytes: i128,
}

/// Why placement failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PlacementError {
    #[error(
        "cannot place {needed} replicas in distinct failure domains at the {level:?} level: only {available} \
         such domain(s) have an active storage node with capacity"
    )]
    NotEnoughDomains { needed: usize, available: usize, level: DomainLevel },
}

/// Picks `needed` nodes from `candidates`, each in a domain (at `level`)
/// distinct from the others and from `taken_domains`, never one of
/// `excluded_nodes`; prefers the most free space. Charges `charge_bytes` to the
/// chosen candidates so that the next call spreads further.
pub fn place(
    candidates: &mut [Candidate],
    needed: usize,
    level: DomainLevel,
    taken_domains: &BTreeSet<String>,
    excluded_nodes: &BTreeSet<u64>,
    charge_bytes: u64,
) -> Result<Vec<u64>, PlacementError> {
    // Best candidate per domain: most free, then lowest node id.
    let mut best: BTreeMap<String, usize> = BTreeMap::new();
    for (i, c) in candidates.iter().enumerate() {
        if excluded_nodes.contains(&c.node) {
            continue;
        }
        let d = domain_at(&c.domain_path, level);
        if taken_domains.contains(&d) {
            continue;
        }
        match best.get(&d) {
            Some(&j)
                if (candidates[j].free_bytes, std::cmp::Reverse(candidates[j].node))
                    >= (c.free_bytes, std::cmp::Reverse(c.node)) => {}
            _ => {
                best.insert(d, i);
            }
        }
    }
    if best.len() < needed {
        return Err(PlacementError::NotEnoughDomains {
            needed: needed + taken_domains.len(),
            available: best.len() + taken_domains.len(),
            level,
        });
    }
    let mut picks: Vec<usize> = best.into_values().collect();
    picks.sort_by_key(|&i| (std::cmp::Reverse(candidates[i].free_bytes), candidates[i].node));
    picks.truncate(needed);
    let charge = i128::from(charge_bytes);
    let mut nodes = Vec::with_capacity(needed);
    for i in picks {
        candidates[i].free_bytes -= charge;
        nodes.push(candidates[i].node);
    }
    Ok(nodes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cands(paths: &[&str]) -> Vec<Candidate> {
        paths
            .iter()
            .enumerate()
            .map(|(i, p)| Candidate { node: i as u64 + 1, domain_path: (*p).to_string(), free_bytes: 100 })
            .collect()
    }

    #[test]
    fn distinct_domains_and_balance() {
        let mut c = cands(&["z/r1/h1", "z/r1/h2", "z/r2/h3"]);
        let none = BTreeSet::new();
        for _ in 0..10 {
            let p = place(&mut c, 2, DomainLevel::Rack, &none, &BTreeSet::new(), 10).unwrap();
            let d: BTreeSet<String> =
                p.iter().map(|n| domain_at(&c[*n as usize - 1].domain_path, DomainLevel::Rack)).collect();
            assert_eq!(d.len(), 2);
        }
        // h1 and h2 share rack r1, so together they got as many replicas as h3.
        assert_eq!(c[0].free_bytes + c[1].free_bytes - 100, c[2].free_bytes);
        let err = place(&mut c, 3, DomainLevel::Rack, &none, &BTreeSet::new(), 10).unwrap_err();
        assert_eq!(err, PlacementError::NotEnoughDomains { needed: 3, available: 2, level: DomainLevel::Rack });
        let mut one = cands(&["z/r/h1"]);
        assert!(place(&mut one, 2, DomainLevel::Host, &none, &BTreeSet::new(), 1).is_err());
    }

    #[test]
    fn domain_paths() {
        assert!(validate_domain_path("zone-a/rack-3/host-7").is_ok());
        assert!(validate_domain_path("zone-a/rack-3").is_err());
        assert!(validate_domain_path("a//b").is_err());
        assert!(validate_domain_path("a/b/c d").is_err());
        assert_eq!(domain_at("a/b/c", DomainLevel::Zone), "a");
        assert_eq!(domain_at("a/b/c", DomainLevel::Rack), "a/b");
    }
}
