//! SecAgg+'s sparse neighbourhoods (Bell et al., CCS 2020): instead of every pair of
//! devices, each device shares masks and secret shares with `k` neighbours on a random
//! Harary graph H(n, k) drawn from a public seed. The devices are put in a random order
//! (a ChaCha20 stream from the seed shuffles them), and each is joined to the `k / 2` devices
//! before and after it in that order, around the circle. With k = O(log n) the sum stays
//! private and reconstructible under dropouts with high probability, at O(log n) cost per
//! device instead of O(n).

use rand::seq::SliceRandom;
use rand::SeedableRng;

/// The neighbours of each of `n` devices (indices 0..n), `k` each (rounded up to even, and
/// everyone else when `k >= n - 1`), on the Harary graph ordered by `seed`. Symmetric:
/// `j` is a neighbour of `i` exactly when `i` is one of `j`.
pub fn neighbours(n: usize, k: usize, seed: [u8; 32]) -> Vec<Vec<usize>> {
    if n == 0 {
        return Vec::new();
    }
    if k + 1 >= n {
        return (0..n)
            .map(|i| (0..n).filter(|&j| j != i).collect())
            .collect();
    }
    let half = k.div_ceil(2);
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut rand_chacha::ChaCha20Rng::from_seed(seed));
    let mut position = vec![0; n];
    for (p, &i) in order.iter().enumerate() {
        position[i] = p;
    }
    (0..n)
        .map(|i| {
            let p = position[i];
            let mut list: Vec<usize> = (1..=half)
                .flat_map(|d| [order[(p + d) % n], order[(p + n - d) % n]])
                .collect();
            list.sort_unstable();
            list.dedup();
            list
        })
        .collect()
}

/// The neighbourhood size for `n` devices: about 6 log2(n), even (everyone when there are
/// fewer). With a threshold of a third of it (see [`super::protocol::Params::new`]), a
/// device's secrets survive up to about two thirds of its neighbours dropping out.
pub fn default_degree(n: usize) -> usize {
    let log = (usize::BITS - n.max(2).leading_zeros()) as usize;
    (6 * log).div_ceil(2) * 2
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_graph_is_symmetric_regular_and_seeded() {
        for (n, k) in [(10, 4), (100, 20), (101, 7), (5, 10)] {
            let g = neighbours(n, k, [7; 32]);
            let degree = if k + 1 >= n { n - 1 } else { k.div_ceil(2) * 2 };
            for (i, list) in g.iter().enumerate() {
                assert_eq!(list.len(), degree, "n {n} k {k} node {i}");
                assert!(!list.contains(&i));
                for &j in list {
                    assert!(g[j].contains(&i), "{i} -> {j} but not back");
                }
            }
            assert_eq!(g, neighbours(n, k, [7; 32]), "the seed fixes the graph");
        }
        assert_ne!(neighbours(50, 6, [1; 32]), neighbours(50, 6, [2; 32]));
        assert_eq!(default_degree(1000), 60);
    }
}
