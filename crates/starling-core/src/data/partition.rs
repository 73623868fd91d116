//! Splitting a data set's examples over simulated devices. Every function is seeded and
//! deterministic (the same arguments give the same partition on every machine), assigns
//! every example to exactly one device, and returns one list of example indices per device,
//! each in ascending order.
//!
//! - [`iid`]: a uniform shuffle cut into nearly equal parts.
//! - [`label_shards`]: the FedAvg paper's pathological non-IID split: examples sorted by
//!   label, cut into equal shards, a few random shards per device (MNIST: 200 shards of 300,
//!   2 per device, so most devices see only two digits).
//! - [`dirichlet`]: label skew of tunable strength: each class is spread over the devices in
//!   proportions drawn from a symmetric Dirichlet(alpha) (small alpha: each device holds few
//!   classes; large alpha: close to IID).
//!
//! Natural partitions need writer ids, which only some data sets have: Shakespeare's come
//! with [`crate::data::datasets::shakespeare`] (one device per speaking role).

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Gamma};

use crate::data::Dataset;

/// Why a partition cannot be made.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PartitionError {
    /// Zero devices.
    #[error("a partition needs at least one device")]
    NoDevices,
    /// Fewer examples than parts, so some device would get nothing.
    #[error("{parts} {what} need at least as many examples, but there are {examples}")]
    TooFewExamples {
        /// What the parts are (`devices`, `shards`).
        what: &'static str,
        /// Parts asked for.
        parts: usize,
        /// Examples available.
        examples: usize,
    },
    /// Zero shards per device.
    #[error("each device needs at least one shard")]
    NoShards,
    /// The Dirichlet concentration is not a positive number.
    #[error("alpha must be a positive finite number, got {0}")]
    BadAlpha(f64),
    /// A label is not a class index.
    #[error("example {index}: label {label} is not below the number of classes, {classes}")]
    LabelOutOfRange {
        /// The example.
        index: usize,
        /// Its label.
        label: usize,
        /// Classes given.
        classes: usize,
    },
}

/// The class index of every example: the first target column, as the loaders and the
/// softmax loss store it.
pub fn class_labels(data: &Dataset) -> Vec<usize> {
    data.targets()
        .chunks_exact(data.target_dim().max(1))
        .map(|t| t[0] as usize)
        .collect()
}

fn check_parts(what: &'static str, parts: usize, examples: usize) -> Result<(), PartitionError> {
    if parts == 0 {
        return Err(PartitionError::NoDevices);
    }
    if examples < parts {
        return Err(PartitionError::TooFewExamples {
            what,
            parts,
            examples,
        });
    }
    Ok(())
}

/// Cuts `items` into `parts` consecutive runs whose lengths differ by at most one (the
/// longer ones first).
fn cut(items: &[usize], parts: usize) -> Vec<&[usize]> {
    let (base, extra) = (items.len() / parts, items.len() % parts);
    let mut out = Vec::with_capacity(parts);
    let mut start = 0;
    for p in 0..parts {
        let len = base + usize::from(p < extra);
        out.push(&items[start..start + len]);
        start += len;
    }
    out
}

fn sorted(mut devices: Vec<Vec<usize>>) -> Vec<Vec<usize>> {
    devices.iter_mut().for_each(|d| d.sort_unstable());
    devices
}

/// `n_examples` examples shuffled and dealt to `n_devices` devices, whose sizes differ by at
/// most one.
pub fn iid(
    n_examples: usize,
    n_devices: usize,
    seed: u64,
) -> Result<Vec<Vec<usize>>, PartitionError> {
    check_parts("devices", n_devices, n_examples)?;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut order: Vec<usize> = (0..n_examples).collect();
    order.shuffle(&mut rng);
    Ok(sorted(
        cut(&order, n_devices)
            .into_iter()
            .map(<[usize]>::to_vec)
            .collect(),
    ))
}

/// The FedAvg paper's label shards: the examples sorted by label (ties by index), cut into
/// `n_devices x shards_per_device` shards of equal size (differing by one when that does not
/// divide the count), and each device given `shards_per_device` shards drawn at random.
pub fn label_shards(
    labels: &[usize],
    n_devices: usize,
    shards_per_device: usize,
    seed: u64,
) -> Result<Vec<Vec<usize>>, PartitionError> {
    if n_devices == 0 {
        return Err(PartitionError::NoDevices);
    }
    if shards_per_device == 0 {
        return Err(PartitionError::NoShards);
    }
    let shards = n_devices.saturating_mul(shards_per_device);
    check_parts("shards", shards, labels.len())?;
    let mut by_label: Vec<usize> = (0..labels.len()).collect();
    by_label.sort_by_key(|&i| (labels[i], i));
    let pieces = cut(&by_label, shards);
    let mut order: Vec<usize> = (0..shards).collect();
    order.shuffle(&mut StdRng::seed_from_u64(seed));
    Ok(sorted(
        order
            .chunks_exact(shards_per_device)
            .map(|mine| mine.iter().flat_map(|&s| pieces[s]).copied().collect())
            .collect(),
    ))
}

/// Proportions drawn from a symmetric Dirichlet(alpha) over `k` parts. Computed in log
/// space (`Gamma(a) = Gamma(a + 1) U^(1/a)`) so that tiny alphas, whose Gamma draws
/// underflow to zero, still give proportions that sum to one.
fn dirichlet_proportions(rng: &mut StdRng, gamma: &Gamma<f64>, alpha: f64, k: usize) -> Vec<f64> {
    let logs: Vec<f64> = (0..k)
        .map(|_| {
            let u: f64 = 1.0 - rng.random::<f64>(); // in (0, 1]
            gamma.sample(rng).ln() + u.ln() / alpha
        })
        .collect();
    let max = logs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let weights: Vec<f64> = logs.iter().map(|l| (l - max).exp()).collect();
    let total: f64 = weights.iter().sum();
    weights.iter().map(|w| w / total).collect()
}

/// Label skew: for each class, its examples (shuffled) are split over the `n_devices`
/// devices in proportions drawn from a symmetric Dirichlet(`alpha`). Every device gets at
/// least one example: a device left empty receives one random example from the largest
/// device. `labels` must be below `n_classes`.
pub fn dirichlet(
    labels: &[usize],
    n_classes: usize,
    n_devices: usize,
    alpha: f64,
    seed: u64,
) -> Result<Vec<Vec<usize>>, PartitionError> {
    check_parts("devices", n_devices, labels.len())?;
    if !(alpha.is_finite() && alpha > 0.0) {
        return Err(PartitionError::BadAlpha(alpha));
    }
    let mut by_class = vec![Vec::new(); n_classes];
    for (index, &label) in labels.iter().enumerate() {
        by_class
            .get_mut(label)
            .ok_or(PartitionError::LabelOutOfRange {
                index,
                label,
                classes: n_classes,
            })?
            .push(index);
    }
    let gamma = Gamma::new(alpha + 1.0, 1.0).map_err(|_| PartitionError::BadAlpha(alpha))?;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut devices = vec![Vec::new(); n_devices];
    for members in &mut by_class {
        if members.is_empty() {
            continue;
        }
        members.shuffle(&mut rng);
        let p = dirichlet_proportions(&mut rng, &gamma, alpha, n_devices);
        let n = members.len();
        let mut cumulative = 0.0;
        let mut start = 0;
        for (d, share) in p.iter().enumerate() {
            cumulative += share;
            let end = if d + 1 == n_devices {
                n
            } else {
                ((cumulative * n as f64).round() as usize).clamp(start, n)
            };
            devices[d].extend_from_slice(&members[start..end]);
            start = end;
        }
    }
    for empty in 0..n_devices {
        if !devices[empty].is_empty() {
            continue;
        }
        let donor = (0..n_devices)
            .max_by_key(|&d| (devices[d].len(), std::cmp::Reverse(d)))
            .expect("at least one device");
        let pick = rng.random_range(0..devices[donor].len());
        let moved = devices[donor].swap_remove(pick);
        devices[empty].push(moved);
    }
    Ok(sorted(devices))
}
