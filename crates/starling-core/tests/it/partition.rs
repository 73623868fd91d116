//! Partitions over simulated devices: every example assigned once, the sizes and label
//! mixes each scheme promises, and the same partition for the same seed.

use starling_core::data::partition::{self, class_labels, PartitionError};
use starling_core::Dataset;

/// Asserts that the parts hold every index in `0..n` exactly once, each part ascending.
fn assert_exact_cover(parts: &[Vec<usize>], n: usize) {
    let mut seen = vec![false; n];
    for p in parts {
        assert!(p.windows(2).all(|w| w[0] < w[1]), "part not ascending");
        for &i in p {
            assert!(!seen[i], "example {i} assigned twice");
            seen[i] = true;
        }
    }
    assert!(seen.iter().all(|&s| s), "some example unassigned");
}

/// `per_class` examples of each of `classes` labels, interleaved (0, 1, …, 0, 1, …).
fn interleaved(classes: usize, per_class: usize) -> Vec<usize> {
    (0..classes * per_class).map(|i| i % classes).collect()
}

fn distinct_labels(part: &[usize], labels: &[usize]) -> usize {
    let mut seen: Vec<usize> = part.iter().map(|&i| labels[i]).collect();
    seen.sort_unstable();
    seen.dedup();
    seen.len()
}

#[test]
fn iid_deals_nearly_equal_shuffled_parts() {
    let parts = partition::iid(1003, 10, 7).unwrap();
    assert_exact_cover(&parts, 1003);
    let sizes: Vec<usize> = parts.iter().map(Vec::len).collect();
    assert_eq!(sizes, [101, 101, 101, 100, 100, 100, 100, 100, 100, 100]);
    // Shuffled: a device does not hold a contiguous run.
    assert!(parts[0].last().unwrap() - parts[0][0] > 500);
    assert_eq!(parts, partition::iid(1003, 10, 7).unwrap());
    assert_ne!(parts, partition::iid(1003, 10, 8).unwrap());
}

#[test]
fn label_shards_give_each_device_at_most_two_labels_on_mnist_sized_data() {
    // MNIST's shape: 60,000 examples, 10 classes of 6,000, 100 devices x 2 shards of 300.
    let labels = interleaved(10, 6000);
    let parts = partition::label_shards(&labels, 100, 2, 1).unwrap();
    assert_eq!(parts.len(), 100);
    assert_exact_cover(&parts, labels.len());
    assert!(parts.iter().all(|p| p.len() == 600));
    assert!(parts.iter().all(|p| distinct_labels(p, &labels) <= 2));
    // Most devices get two different digits, not one.
    let two = parts
        .iter()
        .filter(|p| distinct_labels(p, &labels) == 2)
        .count();
    assert!(two > 70, "{two} devices with two labels");
    assert_eq!(parts, partition::label_shards(&labels, 100, 2, 1).unwrap());
    assert_ne!(parts, partition::label_shards(&labels, 100, 2, 2).unwrap());
}

#[test]
fn label_shards_cover_counts_that_do_not_divide() {
    let labels = interleaved(7, 143); // 1001 examples
    let parts = partition::label_shards(&labels, 10, 3, 5).unwrap();
    assert_exact_cover(&parts, 1001);
    // 30 shards of 33 or 34: three per device.
    assert!(parts.iter().all(|p| (99..=102).contains(&p.len())));
    assert!(parts.iter().all(|p| distinct_labels(p, &labels) <= 6));
}

/// Mean over devices of the total-variation distance between the device's label mix and
/// the whole data's: 0 for perfectly IID devices, near 1 when each holds one rare class.
fn mean_label_skew(parts: &[Vec<usize>], labels: &[usize], classes: usize) -> f64 {
    let mix = |idx: &mut dyn Iterator<Item = usize>| {
        let mut c = vec![0.0; classes];
        let mut n = 0.0;
        for i in idx {
            c[labels[i]] += 1.0;
            n += 1.0;
        }
        c.iter().map(|v| v / n).collect::<Vec<f64>>()
    };
    let global = mix(&mut (0..labels.len()));
    parts
        .iter()
        .map(|p| {
            let local = mix(&mut p.iter().copied());
            0.5 * local
                .iter()
                .zip(&global)
                .map(|(a, b)| (a - b).abs())
                .sum::<f64>()
        })
        .sum::<f64>()
        / parts.len() as f64
}

#[test]
fn dirichlet_skew_follows_alpha() {
    let labels = interleaved(10, 1000);
    let skewed = partition::dirichlet(&labels, 10, 20, 0.1, 3).unwrap();
    let near_iid = partition::dirichlet(&labels, 10, 20, 1000.0, 3).unwrap();
    for parts in [&skewed, &near_iid] {
        assert_eq!(parts.len(), 20);
        assert_exact_cover(parts, labels.len());
        assert!(parts.iter().all(|p| !p.is_empty()));
    }
    let (low, high) = (
        mean_label_skew(&skewed, &labels, 10),
        mean_label_skew(&near_iid, &labels, 10),
    );
    assert!(low > 0.5, "alpha 0.1: mean skew {low}");
    assert!(high < 0.05, "alpha 1000: mean skew {high}");
    // The IID split of the same data is as flat as the large-alpha one.
    let iid = partition::iid(labels.len(), 20, 3).unwrap();
    assert!(mean_label_skew(&iid, &labels, 10) < 0.1);
    assert_eq!(
        skewed,
        partition::dirichlet(&labels, 10, 20, 0.1, 3).unwrap()
    );
    assert_ne!(
        skewed,
        partition::dirichlet(&labels, 10, 20, 0.1, 4).unwrap()
    );
}

#[test]
fn dirichlet_with_tiny_alpha_still_gives_every_device_an_example() {
    // Alpha so small that the Gamma draws underflow: each class goes to one device, and
    // most devices would be empty without the top-up.
    let labels = interleaved(3, 20);
    let parts = partition::dirichlet(&labels, 3, 50, 1e-4, 9).unwrap();
    assert_exact_cover(&parts, 60);
    assert!(parts.iter().all(|p| !p.is_empty()));
    // Exactly as many devices as examples: one each.
    let parts = partition::dirichlet(&labels, 3, 60, 0.5, 9).unwrap();
    assert!(parts.iter().all(|p| p.len() == 1));
}

#[test]
fn impossible_partitions_are_refused() {
    assert_eq!(partition::iid(10, 0, 0), Err(PartitionError::NoDevices));
    assert_eq!(
        partition::iid(3, 4, 0),
        Err(PartitionError::TooFewExamples {
            what: "devices",
            parts: 4,
            examples: 3
        })
    );
    let labels = interleaved(2, 5);
    assert_eq!(
        partition::label_shards(&labels, 3, 0, 0),
        Err(PartitionError::NoShards)
    );
    let err = partition::label_shards(&labels, 6, 2, 0).unwrap_err();
    assert!(err.to_string().contains("12 shards need at least"), "{err}");
    assert_eq!(
        partition::dirichlet(&labels, 2, 2, 0.0, 0),
        Err(PartitionError::BadAlpha(0.0))
    );
    assert!(partition::dirichlet(&labels, 2, 2, f64::NAN, 0).is_err());
    assert_eq!(
        partition::dirichlet(&labels, 1, 2, 1.0, 0),
        Err(PartitionError::LabelOutOfRange {
            index: 1,
            label: 1,
            classes: 1
        })
    );
}

#[test]
fn class_labels_read_the_target_column() {
    let d = Dataset::new(vec![0.0; 6], vec![2.0, 0.0, 1.0], 2, 1).unwrap();
    assert_eq!(class_labels(&d), vec![2, 0, 1]);
}
