//! SecAgg+ end to end in process: whole rounds of devices and a server exchanging the
//! protocol's messages, with devices dropping out after advertising keys, after sharing them,
//! and after sending their masked inputs. The server's result is exactly the sum of the
//! survivors' inputs in the ring (so the average is plain FedAvg's within the quantisation
//! error), a round below its threshold is refused, and what the server receives of any one
//! device is indistinguishable from uniform noise.

use std::collections::{BTreeMap, BTreeSet};

use rand::{Rng, SeedableRng};
use starling_core::secagg::encode::{add_into, FixedPoint};
use starling_core::secagg::protocol::{Aggregator, Client, Params, SecAggError};

/// Who leaves when.
#[derive(Default, Clone)]
struct Dropouts {
    after_keys: BTreeSet<usize>,
    after_shares: BTreeSet<usize>,
    after_masked: BTreeSet<usize>,
}

impl Dropouts {
    /// `fraction` of the devices at each step, disjoint, from a seeded shuffle.
    fn spread(n: usize, fraction: f64, seed: u64) -> Self {
        let mut ids: Vec<usize> = (0..n).collect();
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        use rand::seq::SliceRandom;
        ids.shuffle(&mut rng);
        let k = (n as f64 * fraction).round() as usize;
        Self {
            after_keys: ids[..k].iter().copied().collect(),
            after_shares: ids[k..2 * k].iter().copied().collect(),
            after_masked: ids[2 * k..3 * k].iter().copied().collect(),
        }
    }
}

/// One round: every device's `inputs[i]`; the server's result, and also every message the
/// server received from device `watch` (its masked input) for inspection.
fn round(
    params: Params,
    inputs: &[Vec<u32>],
    drop: &Dropouts,
    seed: u64,
) -> Result<(Vec<u32>, usize), SecAggError> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut server = Aggregator::new(params);
    let mut clients: BTreeMap<usize, Client> = BTreeMap::new();
    for i in 0..params.devices {
        let (c, keys) = Client::new(i, params, &mut rng);
        server.advertise(i, keys)?;
        clients.insert(i, c);
    }
    clients.retain(|i, _| !drop.after_keys.contains(i));
    let mut shares = Vec::new();
    for (i, c) in &mut clients {
        shares.push((*i, c.share_keys(&server.keys_for(*i), &mut rng)?));
    }
    for (i, s) in shares {
        server.share(i, s)?;
    }
    clients.retain(|i, _| !drop.after_shares.contains(i));
    for (i, c) in &mut clients {
        let y = c.masked_input(&server.envelopes_for(*i), &inputs[*i])?;
        server.masked_input(*i, &y)?;
    }
    clients.retain(|i, _| !drop.after_masked.contains(i));
    let survivors = server.survivors()?;
    for c in clients.values() {
        server.unmask(c.unmask(&survivors)?)?;
    }
    server.finish()
}

fn params(n: usize, len: usize, min_survivors: usize) -> Params {
    Params::new(
        7,
        n,
        min_survivors,
        FixedPoint::new(16, n).unwrap(),
        len,
        [42; 32],
    )
}

fn random_inputs(p: &Params, seed: u64) -> Vec<Vec<u32>> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..p.devices)
        .map(|_| {
            let v: Vec<f64> = (0..p.len).map(|_| rng.random_range(-1.0..1.0)).collect();
            p.fixed_point.encode(&v, &mut rng)
        })
        .collect()
}

fn plain_sum(p: &Params, inputs: &[Vec<u32>], who: impl Iterator<Item = usize>) -> Vec<u32> {
    let mut sum = vec![0u32; p.len];
    for i in who {
        add_into(&mut sum, &inputs[i], p.fixed_point.ring_mask());
    }
    sum
}

#[test]
fn the_sum_is_exact_with_dropouts_at_every_step() {
    let n = 60;
    let p = params(n, 40, 20);
    assert!(p.degree < n - 1, "a sparse graph: {}", p.degree);
    let inputs = random_inputs(&p, 1);
    let ids = |seed: u64, fraction: f64| -> BTreeSet<usize> {
        let mut ids: Vec<usize> = (0..n).collect();
        use rand::seq::SliceRandom;
        ids.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
        ids.into_iter()
            .take((n as f64 * fraction).round() as usize)
            .collect()
    };
    let mut cases = Vec::new();
    for fraction in [0.0, 0.1, 0.3] {
        cases.push((
            format!("{fraction} after keys"),
            Dropouts {
                after_keys: ids(2, fraction),
                ..Dropouts::default()
            },
        ));
        cases.push((
            format!("{fraction} after shares"),
            Dropouts {
                after_shares: ids(3, fraction),
                ..Dropouts::default()
            },
        ));
        cases.push((
            format!("{fraction} after masked inputs"),
            Dropouts {
                after_masked: ids(4, fraction),
                ..Dropouts::default()
            },
        ));
    }
    // 30% in all, a tenth at each step.
    cases.push(("0.1 at each step".into(), Dropouts::spread(n, 0.1, 5)));
    for (name, drop) in cases {
        let (sum, survivors) =
            round(p, &inputs, &drop, 3).unwrap_or_else(|e| panic!("{name}: {e}"));
        let expected: Vec<usize> = (0..n)
            .filter(|i| !drop.after_keys.contains(i) && !drop.after_shares.contains(i))
            .collect();
        assert_eq!(survivors, expected.len(), "{name}");
        assert_eq!(
            sum,
            plain_sum(&p, &inputs, expected.into_iter()),
            "{name}: the survivors' sum, exactly"
        );
    }
}

#[test]
fn the_average_is_fedavgs_within_the_quantisation_error() {
    // Ten devices' weighted updates (weight in the last coordinate), each scaled into [-1, 1].
    let n = 10;
    let dim = 6;
    let p = params(n, dim + 1, 5);
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let deltas: Vec<Vec<f64>> = (0..n)
        .map(|_| (0..dim).map(|_| rng.random_range(-1.0..1.0)).collect())
        .collect();
    let weights: Vec<f64> = (0..n).map(|_| rng.random_range(0.1..1.0)).collect();
    let inputs: Vec<Vec<u32>> = (0..n)
        .map(|i| {
            let mut v: Vec<f64> = deltas[i].iter().map(|d| d * weights[i]).collect();
            v.push(weights[i]);
            p.fixed_point.encode(&v, &mut rng)
        })
        .collect();
    let (sum, _) = round(p, &inputs, &Dropouts::default(), 4).unwrap();
    let decoded = p.fixed_point.decode(&sum);
    let total_weight: f64 = weights.iter().sum();
    for d in 0..dim {
        let fedavg: f64 = (0..n).map(|i| weights[i] * deltas[i][d]).sum::<f64>() / total_weight;
        let secure = decoded[d] / decoded[dim];
        // Each of the 2n encoded values is off by less than one level.
        let bound = 2.0 * n as f64 / p.fixed_point.levels() / total_weight * 2.0;
        assert!((fedavg - secure).abs() < bound, "{d}: {fedavg} vs {secure}");
    }
}

#[test]
fn below_the_threshold_the_round_is_refused() {
    let n = 30;
    let p = params(n, 8, 20);
    let inputs = random_inputs(&p, 5);
    // 12 of 30 leave after their masked input: 18 survivors, fewer than 20.
    let drop = Dropouts {
        after_masked: (0..12).collect(),
        ..Dropouts::default()
    };
    let mut too_few = p;
    too_few.min_survivors = 0;
    assert!(round(too_few, &inputs, &drop, 6).is_ok());
    // Counted as survivors but gone before unmasking: 21 of 30 vanish, so the 9 left hold
    // fewer shares of each secret than its threshold of 10.
    assert_eq!(p.threshold, 10);
    let drop = Dropouts {
        after_masked: (0..21).collect(),
        ..Dropouts::default()
    };
    match round(too_few, &inputs, &drop, 6) {
        Err(SecAggError::Reconstruct { .. }) => {}
        other => panic!("{other:?}"),
    }
    let drop = Dropouts {
        after_shares: (0..12).collect(),
        ..Dropouts::default()
    };
    match round(p, &inputs, &drop, 6) {
        Err(SecAggError::TooFewSurvivors { have: 18, need: 20 }) => {}
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_masked_input_looks_uniform_in_the_ring() {
    // One device whose input is all zeros: what the server receives is its masks alone. Its
    // values' top 4 bits are uniform (chi-square, 15 degrees of freedom), and it reveals
    // nothing that distinguishes it from a device whose input is all ones.
    let n = 12;
    let p = params(n, 4000, 6);
    let mut rng = rand::rngs::StdRng::seed_from_u64(8);
    let mut clients = Vec::new();
    let mut server = Aggregator::new(p);
    for i in 0..n {
        let (c, keys) = Client::new(i, p, &mut rng);
        server.advertise(i, keys).unwrap();
        clients.push(c);
    }
    let mut envelopes = Vec::new();
    for (i, c) in clients.iter_mut().enumerate() {
        envelopes.push((i, c.share_keys(&server.keys_for(i), &mut rng).unwrap()));
    }
    for (i, e) in envelopes {
        server.share(i, e).unwrap();
    }
    let bits = p.fixed_point.bits;
    for (i, value) in [(0usize, 0.0), (1, 1.0)] {
        let input = p.fixed_point.encode(&vec![value; p.len], &mut rng);
        let y = clients[i]
            .masked_input(&server.envelopes_for(i), &input)
            .unwrap();
        assert_ne!(y, input);
        let mut counts = [0u32; 16];
        for v in &y {
            counts[(v >> (bits - 4)) as usize] += 1;
        }
        let expected = p.len as f64 / 16.0;
        let chi2: f64 = counts
            .iter()
            .map(|&c| (f64::from(c) - expected).powi(2) / expected)
            .sum();
        // 99.9% quantile of chi-square(15) is 37.7.
        assert!(chi2 < 37.7, "device {i}: chi-square {chi2}, {counts:?}");
    }
}

#[test]
fn the_server_refuses_messages_out_of_place() {
    let p = params(8, 3, 4);
    let mut rng = rand::rngs::StdRng::seed_from_u64(2);
    let mut server = Aggregator::new(p);
    let (_, keys) = Client::new(0, p, &mut rng);
    server.advertise(0, keys).unwrap();
    assert!(server.advertise(0, keys).is_err(), "twice");
    assert!(server.advertise(8, keys).is_err(), "no such device");
    assert!(
        server.masked_input(0, &[0, 0, 0]).is_err(),
        "before sharing"
    );
    assert!(matches!(
        server.survivors(),
        Err(SecAggError::TooFewSurvivors { have: 0, need: 4 })
    ));
}
