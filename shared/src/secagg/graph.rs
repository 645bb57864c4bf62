//! The SecAgg+ neighbour graph: a Harary graph `H(k, n)` over a permutation of the sites
//! seeded by the round setup, or the complete graph when `k >= n - 1`.

use std::collections::{BTreeMap, BTreeSet};

use rand_chacha::rand_core::{RngCore as _, SeedableRng};
use rand_chacha::ChaCha20Rng;
use sha2::{Digest, Sha256};

use super::RoundSetup;
use crate::ids::SiteId;

/// Each site's neighbours (never itself), for the sorted, distinct `sites`. Symmetric:
/// `v` is `u`'s neighbour exactly when `u` is `v`'s. Every participant computes the same
/// graph from the same setup and site list.
pub fn neighbours(setup: &RoundSetup, sites: &[SiteId]) -> BTreeMap<SiteId, BTreeSet<SiteId>> {
    let n = sites.len();
    let k = setup.params.neighbours;
    if k + 1 >= n {
        return sites.iter().map(|u| (u.clone(), sites.iter().filter(|v| *v != u).cloned().collect())).collect();
    }
    // A seeded Fisher-Yates shuffle; the seed hashes the setup and the site list, so the
    // graph is fixed once the round's sites are. (The slight modulo bias of the index
    // draw is irrelevant: only determinism matters here.)
    let mut h = Sha256::new();
    h.update(b"fedward-secagg-graph-v1");
    h.update(setup.digest());
    for s in sites {
        h.update([s.as_str().len() as u8]);
        h.update(s.as_str().as_bytes());
    }
    let mut rng = ChaCha20Rng::from_seed(h.finalize().into());
    let mut order: Vec<&SiteId> = sites.iter().collect();
    for i in (1..n).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        order.swap(i, j);
    }
    let mut graph: BTreeMap<SiteId, BTreeSet<SiteId>> = BTreeMap::new();
    for (p, u) in order.iter().enumerate() {
        let set = graph.entry((*u).clone()).or_default();
        for d in 1..=k / 2 {
            set.insert(order[(p + d) % n].clone());
            set.insert(order[(p + n - d) % n].clone());
        }
    }
    graph
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::RoundId;
    use crate::secagg::SecAggParams;

    fn sites(n: usize) -> Vec<SiteId> {
        let mut v: Vec<SiteId> = (0..n).map(|i| SiteId::new(format!("site-{i:03}")).unwrap()).collect();
        v.sort();
        v
    }

    #[test]
    fn harary_graph_is_k_regular_symmetric_and_deterministic() {
        let params = SecAggParams { threshold: 4, min_sites: 4, neighbours: 6, modulus_bits: 32 };
        let setup = RoundSetup::new(RoundId(3), params, 8).unwrap();
        let s = sites(50);
        let g = neighbours(&setup, &s);
        assert_eq!(g, neighbours(&setup, &s));
        for (u, ns) in &g {
            assert_eq!(ns.len(), 6, "{u}");
            assert!(!ns.contains(u));
            for v in ns {
                assert!(g[v].contains(u));
            }
        }
        let other = RoundSetup::new(RoundId(4), params, 8).unwrap();
        assert_ne!(g, neighbours(&other, &s), "another round, another graph");
        // Small rounds get the complete graph.
        let full = neighbours(&setup, &sites(7));
        assert!(full.values().all(|ns| ns.len() == 6));
        let full = neighbours(&setup, &sites(3));
        assert!(full.values().all(|ns| ns.len() == 2));
    }
}
