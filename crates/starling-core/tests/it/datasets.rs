//! The data set loaders on fixtures built in memory (raw and gzip), and on the committed
//! slices of the real data sets in `tests/fixtures/` (real formats and file names; made by
//! `scripts/make-fixtures.py`, which also checks the full sets): MNIST, Fashion-MNIST and
//! the Shakespeare roles, loaded, refused when mismatched, and partitioned.

use std::io::{Read, Write};
use std::path::PathBuf;

use starling_core::data::datasets::shakespeare::{self, char_index, SEQ_LEN, UNKNOWN, VOCAB};
use starling_core::data::datasets::{idx, DatasetError};
use starling_core::data::partition::{self, class_labels};
use starling_core::Dataset;

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(bytes).unwrap();
    enc.finish().unwrap()
}

fn idx_file(magic: u32, dims: &[u32], data: &[u8]) -> Vec<u8> {
    let mut out = magic.to_be_bytes().to_vec();
    for d in dims {
        out.extend_from_slice(&d.to_be_bytes());
    }
    out.extend_from_slice(data);
    out
}

/// Three 2x3 images with pixels 0, 51, 255, … and their labels 7, 0, 9.
fn fixture() -> (Vec<u8>, Vec<u8>) {
    let pixels: Vec<u8> = (0..18).map(|i| [0u8, 51, 255][i % 3]).collect();
    (
        idx_file(0x0803, &[3, 2, 3], &pixels),
        idx_file(0x0801, &[3], &[7, 0, 9]),
    )
}

#[test]
fn idx_images_and_labels_load_raw_and_gzipped_alike() {
    let (images, labels) = fixture();
    let raw = idx::load(&images, &labels).unwrap();
    assert_eq!((raw.len(), raw.feature_dim(), raw.target_dim()), (3, 6, 1));
    assert_eq!(raw.targets(), &[7.0, 0.0, 9.0]);
    assert_eq!(&raw.features()[..3], &[0.0, 0.2, 1.0]);
    assert_eq!(idx::load(&gzip(&images), &gzip(&labels)).unwrap(), raw);
    assert_eq!(idx::load(&gzip(&images), &labels).unwrap(), raw);
    // Several gzip members read as one stream, as gunzip does.
    let mut two_members = gzip(&images[..10]);
    two_members.extend(gzip(&images[10..]));
    assert_eq!(idx::load(&two_members, &labels).unwrap(), raw);
    let parsed = idx::parse_images(&images).unwrap();
    assert_eq!((parsed.count(), parsed.rows, parsed.cols), (3, 2, 3));
}

#[test]
fn truncated_idx_files_say_how_much_is_missing() {
    let (images, labels) = fixture();
    assert_eq!(
        idx::parse_images(&images[..images.len() - 1]),
        Err(DatasetError::Truncated {
            what: "IDX images",
            expected: 16 + 18,
            found: 16 + 17
        })
    );
    assert_eq!(
        idx::parse_images(&images[..9]),
        Err(DatasetError::Truncated {
            what: "IDX images",
            expected: 16,
            found: 9
        })
    );
    assert_eq!(
        idx::parse_labels(&labels[..2]),
        Err(DatasetError::Truncated {
            what: "IDX labels",
            expected: 8,
            found: 2
        })
    );
    let err = idx::parse_labels(&labels[..10]).unwrap_err().to_string();
    assert!(
        err.contains("truncated: expected 11 bytes, found 10"),
        "{err}"
    );
    let mut long = labels.clone();
    long.push(3);
    assert!(matches!(
        idx::parse_labels(&long),
        Err(DatasetError::TrailingBytes {
            expected: 11,
            found: 12,
            ..
        })
    ));
}

#[test]
fn swapped_or_foreign_files_are_refused_by_their_magic_number() {
    let (images, labels) = fixture();
    assert_eq!(
        idx::load(&labels, &images),
        Err(DatasetError::BadMagic {
            what: "IDX images",
            expected: 0x0803,
            found: 0x0801
        })
    );
    let err = idx::parse_labels(b"PK\x03\x04 a zip file").unwrap_err();
    assert!(matches!(err, DatasetError::BadMagic { .. }));
    assert!(err.to_string().contains("expected 0x00000801"), "{err}");
}

#[test]
fn corrupt_gzip_is_an_error_not_garbage() {
    let (images, _) = fixture();
    let gz = gzip(&images);
    assert!(matches!(
        idx::parse_images(&gz[..gz.len() / 2]),
        Err(DatasetError::Gzip(_))
    ));
    let mut flipped = gz.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0xff;
    flipped[mid + 1] ^= 0x55;
    assert!(matches!(
        idx::parse_images(&flipped),
        Err(DatasetError::Gzip(_))
    ));
}

#[test]
fn images_and_labels_must_pair_up() {
    let (images, _) = fixture();
    let labels = idx_file(0x0801, &[2], &[1, 2]);
    let err = idx::load(&images, &labels).unwrap_err();
    assert_eq!(
        err,
        DatasetError::CountMismatch {
            images: 3,
            labels: 2
        }
    );
    assert!(err.to_string().contains("3 images but 2 labels"));
}

#[test]
fn impossible_headers_are_refused() {
    assert!(matches!(
        idx::parse_images(&idx_file(0x0803, &[2, 0, 3], &[])),
        Err(DatasetError::BadHeader { .. })
    ));
    let huge = idx_file(0x0803, &[u32::MAX, u32::MAX, u32::MAX], &[]);
    let err = idx::parse_images(&huge).unwrap_err();
    assert!(err.to_string().contains("too large"), "{err}");
}

#[test]
fn the_vocabulary_is_leafs_80_characters_and_one_for_the_rest() {
    assert_eq!(VOCAB.chars().count(), 80);
    for (i, c) in VOCAB.chars().enumerate() {
        assert_eq!(char_index(c), i, "{c:?}");
    }
    for c in ['@', '{', '_', '/', 'é', '\t'] {
        assert_eq!(char_index(c), UNKNOWN, "{c:?}");
    }
    assert_eq!(shakespeare::VOCAB_SIZE, UNKNOWN + 1);
}

fn text(len: usize, salt: usize) -> String {
    let letters: Vec<char> = "To be, or not to be: that is the question.\n@"
        .chars()
        .collect();
    (0..len)
        .map(|i| letters[(i * 7 + salt) % letters.len()])
        .collect()
}

#[test]
fn roles_become_next_character_samples_with_a_minimum_count() {
    let (b, a, short) = (
        text(SEQ_LEN + 5, 1),
        text(SEQ_LEN + 2, 2),
        text(SEQ_LEN + 1, 3),
    );
    let json = serde_json::json!({"play/B": b, "play/A": a, "play/SHORT": short, "play/TINY": "x"})
        .to_string();
    let corpus = shakespeare::parse(json.as_bytes(), 2).unwrap();
    let names: Vec<&str> = corpus.roles.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["play/A", "play/B"]);
    assert_eq!(corpus.roles[1].samples(), 5);
    assert_eq!(corpus.samples(), 2 + 5);
    // Without a minimum, every role with at least one sample stays; `x` alone has none.
    let all = shakespeare::parse(json.as_bytes(), 0).unwrap();
    assert_eq!(all.roles.len(), 3);

    let d = corpus.roles[1].dataset();
    assert_eq!((d.len(), d.feature_dim(), d.target_dim()), (5, SEQ_LEN, 1));
    let idx: Vec<f32> = b.chars().map(|c| char_index(c) as f32).collect();
    for s in 0..5 {
        assert_eq!(
            &d.features()[s * SEQ_LEN..(s + 1) * SEQ_LEN],
            &idx[s..s + SEQ_LEN]
        );
        assert_eq!(d.targets()[s], idx[s + SEQ_LEN]);
    }
    assert!(
        d.features().contains(&(UNKNOWN as f32)),
        "`@` maps to UNKNOWN"
    );

    // As sequences predicting every next character: one piece of 80 (85 characters leave
    // 5 over, of which the first is the last piece's last target).
    let seq = corpus.roles[1].sequences();
    assert_eq!(corpus.roles[1].sequences_len(), 1);
    assert_eq!(
        (seq.len(), seq.feature_dim(), seq.target_dim()),
        (1, SEQ_LEN, SEQ_LEN)
    );
    assert_eq!(seq.features(), &idx[..SEQ_LEN]);
    assert_eq!(seq.targets(), &idx[1..=SEQ_LEN]);
    let long = shakespeare::Role {
        name: "play/LONG".into(),
        text: (0..3 * SEQ_LEN + 1).map(|i| (i % 81) as u8).collect(),
    };
    let seq = long.sequences();
    assert_eq!(seq.len(), 3);
    for s in 0..3 {
        let f = &seq.features()[s * SEQ_LEN..(s + 1) * SEQ_LEN];
        let t = &seq.targets()[s * SEQ_LEN..(s + 1) * SEQ_LEN];
        assert_eq!(f[0], ((s * SEQ_LEN) % 81) as f32);
        // Each target is the character after its feature.
        for (k, (&a, &b)) in f.iter().zip(t).enumerate() {
            assert_eq!(b, long.text[s * SEQ_LEN + k + 1] as f32);
            assert_eq!(a, long.text[s * SEQ_LEN + k] as f32);
        }
    }
    // One character short of a third piece: two.
    let short = shakespeare::Role {
        name: "play/SHORT".into(),
        text: long.text[..3 * SEQ_LEN].to_vec(),
    };
    assert_eq!(short.sequences().len(), 2);

    let (whole, partition) = corpus.dataset();
    assert_eq!(whole.len(), 7);
    assert_eq!(partition, vec![vec![0, 1], vec![2, 3, 4, 5, 6]]);
    assert_eq!(whole.subset(&partition[1]), d);

    assert_eq!(
        shakespeare::parse(&gzip(json.as_bytes()), 2).unwrap(),
        corpus
    );
}

#[test]
fn malformed_role_files_are_refused() {
    for bad in [&b"[1, 2]"[..], b"{\"a/B\": 3}", b"{\"a/B\": \"text\"", b""] {
        let err = shakespeare::parse(bad, 1).unwrap_err();
        assert!(matches!(err, DatasetError::Json(_)), "{err}");
        assert!(err.to_string().contains("<play>/<ROLE>"), "{err}");
    }
}

/// A committed fixture file (`tests/fixtures/<rel>`); panics naming the path when absent.
fn fixture_file(rel: &str) -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(rel);
    std::fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "cannot read the fixture {} ({e}); regenerate the fixtures with \
             scripts/make-fixtures.py (see tests/fixtures/README.md)",
            path.display()
        )
    })
}

fn gunzip(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(bytes)
        .read_to_end(&mut out)
        .unwrap();
    out
}

/// The fixture's images and labels of one split (`train` or `t10k`) of an IDX data set.
fn idx_pair(folder: &str, split: &str) -> (Vec<u8>, Vec<u8>) {
    (
        fixture_file(&format!("{folder}/{split}-images-idx3-ubyte.gz")),
        fixture_file(&format!("{folder}/{split}-labels-idx1-ubyte.gz")),
    )
}

/// Loads one split of a fixture IDX set and checks what any slice of MNIST or Fashion-MNIST
/// must be: 28x28 images with pixels in `[0, 1]` reaching both ends, and integral labels
/// with exactly the per-class counts and first labels of the real files' beginning.
fn check_idx_fixture(
    folder: &str,
    split: &str,
    class_counts: [usize; 10],
    first_labels: [u8; 10],
) -> Dataset {
    let (images, labels) = idx_pair(folder, split);
    let parsed = idx::parse_images(&images).unwrap();
    assert_eq!((parsed.rows, parsed.cols), (28, 28), "{folder}/{split}");
    let data = idx::load(&images, &labels).unwrap();
    let n: usize = class_counts.iter().sum();
    assert_eq!(
        (data.len(), data.feature_dim(), data.target_dim()),
        (n, 784, 1),
        "{folder}/{split}"
    );
    let mut counts = [0usize; 10];
    for &t in data.targets() {
        assert!((0.0..10.0).contains(&t) && t.fract() == 0.0, "label {t}");
        counts[t as usize] += 1;
    }
    assert_eq!(counts, class_counts, "{folder}/{split}");
    assert_eq!(
        &idx::parse_labels(&labels).unwrap()[..10],
        &first_labels,
        "{folder}/{split}"
    );
    assert!(data.features().iter().all(|p| (0.0..=1.0).contains(p)));
    let max = data.features().iter().copied().fold(0.0f32, f32::max);
    let min = data.features().iter().copied().fold(1.0f32, f32::min);
    assert_eq!((min, max), (0.0, 1.0), "{folder}/{split}");
    // The same bytes unpacked load to the same data set.
    assert_eq!(idx::load(&gunzip(&images), &gunzip(&labels)).unwrap(), data);
    data
}

#[test]
fn mnist_fixture_loads_as_1000_and_300_digits_of_every_class() {
    check_idx_fixture(
        "mnist",
        "train",
        [97, 116, 99, 93, 105, 92, 94, 117, 87, 100],
        [5, 0, 4, 1, 9, 2, 1, 3, 1, 4],
    );
    check_idx_fixture(
        "mnist",
        "t10k",
        [24, 41, 32, 24, 37, 29, 24, 34, 21, 34],
        [7, 2, 1, 0, 4, 1, 4, 9, 5, 9],
    );
}

#[test]
fn fashion_mnist_fixture_loads_as_200_and_100_items_of_every_class() {
    check_idx_fixture(
        "fashion-mnist",
        "train",
        [24, 26, 18, 17, 18, 20, 21, 21, 16, 19],
        [9, 0, 0, 3, 0, 2, 7, 2, 5, 5],
    );
    check_idx_fixture(
        "fashion-mnist",
        "t10k",
        [8, 13, 14, 9, 10, 9, 8, 11, 12, 6],
        [9, 2, 1, 1, 6, 1, 4, 6, 5, 7],
    );
}

#[test]
fn mismatched_or_damaged_real_files_are_refused() {
    let (train_images, train_labels) = idx_pair("mnist", "train");
    let (_, test_labels) = idx_pair("mnist", "t10k");
    assert_eq!(
        idx::load(&train_images, &test_labels),
        Err(DatasetError::CountMismatch {
            images: 1000,
            labels: 300
        })
    );
    assert_eq!(
        idx::load(&train_labels, &train_images),
        Err(DatasetError::BadMagic {
            what: "IDX images",
            expected: idx::IMAGES_MAGIC,
            found: idx::LABELS_MAGIC
        })
    );
    assert!(matches!(
        idx::parse_images(&train_images[..train_images.len() / 2]),
        Err(DatasetError::Gzip(_))
    ));
    let raw = gunzip(&train_images);
    assert_eq!(
        idx::parse_images(&raw[..raw.len() - 784]),
        Err(DatasetError::Truncated {
            what: "IDX images",
            expected: 16 + 1000 * 784,
            found: 16 + 999 * 784
        })
    );
    // A roles file is not an IDX file, nor the other way round.
    let roles = fixture_file("shakespeare/roles.json.gz");
    assert!(matches!(
        idx::parse_labels(&roles),
        Err(DatasetError::BadMagic { .. })
    ));
    assert!(matches!(
        shakespeare::parse(&train_labels, 1),
        Err(DatasetError::Json(_))
    ));
}

/// The fixture's long roles (at least 64 samples) and their sample counts, by name.
const LONG_ROLES: [(&str, usize); 12] = [
    ("alls_well_that_ends_well/HELENA", 1406),
    ("comedy_of_errors/ADRIANA", 1389),
    ("hamlet/HAM", 1381),
    ("henry_v/KING HENRY", 1415),
    ("henry_vi_part_3/WARWICK", 1408),
    ("julius_caesar/BRUTUS", 1414),
    ("macbeth/MACBETH", 1381),
    ("merry_wives_of_windsor/FALSTAFF", 1407),
    ("othello/IAGO", 1401),
    ("richard_iii/GLOSTER", 1408),
    ("tempest/PROSPERO", 1420),
    ("troilus_and_cressida/TROILUS", 1418),
];

#[test]
fn shakespeare_fixture_gives_12_roles_of_at_least_64_samples() {
    let bytes = fixture_file("shakespeare/roles.json.gz");
    // The file holds 14 roles; two are too short for the usual minimum.
    let raw: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&gunzip(&bytes)).unwrap();
    assert_eq!(raw.len(), 14);

    let corpus = shakespeare::parse(&bytes, 64).unwrap();
    let got: Vec<(&str, usize)> = corpus
        .roles
        .iter()
        .map(|r| (r.name.as_str(), r.samples()))
        .collect();
    assert_eq!(got, LONG_ROLES);
    assert_eq!(corpus.samples(), 16_848);
    assert_eq!(shakespeare::parse(&gunzip(&bytes), 64).unwrap(), corpus);

    // Without a minimum, the role with 12 samples stays and the one of 3 characters goes.
    let all = shakespeare::parse(&bytes, 0).unwrap();
    assert_eq!(all.roles.len(), 13);
    assert_eq!(all.roles[0].name, "alls_well_that_ends_well/ALL");
    assert_eq!(all.roles[0].samples(), 12);
    assert_eq!(shakespeare::parse(&bytes, 1).unwrap(), all);
    assert_eq!(shakespeare::parse(&bytes, 12).unwrap(), all);
    assert_eq!(shakespeare::parse(&bytes, 13).unwrap(), corpus);

    // Real text: almost every character is in LEAF's vocabulary.
    let chars: usize = corpus.roles.iter().map(|r| r.text.len()).sum();
    let unknown = corpus
        .roles
        .iter()
        .flat_map(|r| &r.text)
        .filter(|&&c| usize::from(c) == UNKNOWN)
        .count();
    assert!(unknown * 100 < chars, "{unknown} of {chars} unknown");

    // Each role's samples slide one character at a time: a sample's target is the last
    // feature of the next sample.
    let d = corpus.roles[2].dataset();
    assert_eq!(
        (d.len(), d.feature_dim(), d.target_dim()),
        (1381, SEQ_LEN, 1)
    );
    for s in 0..d.len() - 1 {
        assert_eq!(d.targets()[s], d.features()[(s + 2) * SEQ_LEN - 1]);
    }
    assert!(d.features().iter().all(|&c| c <= UNKNOWN as f32));

    // One device per role, in order, holding that role's samples.
    let (whole, parts) = corpus.dataset();
    assert_eq!(whole.len(), 16_848);
    assert_eq!(parts.len(), 12);
    let mut start = 0;
    for (part, (_, n)) in parts.iter().zip(LONG_ROLES) {
        assert_eq!(part, &(start..start + n).collect::<Vec<_>>());
        start += n;
    }
    assert_eq!(whole.subset(&parts[2]), d);
}

/// Asserts that the parts hold every index in `0..n` exactly once.
fn assert_exact_cover(parts: &[Vec<usize>], n: usize) {
    let mut all: Vec<usize> = parts.iter().flatten().copied().collect();
    all.sort_unstable();
    assert_eq!(all, (0..n).collect::<Vec<_>>());
}

fn distinct(part: &[usize], labels: &[usize]) -> usize {
    let mut seen: Vec<usize> = part.iter().map(|&i| labels[i]).collect();
    seen.sort_unstable();
    seen.dedup();
    seen.len()
}

#[test]
fn mnist_fixture_partitions_over_devices_as_the_fedavg_paper_splits_it() {
    let (images, labels) = idx_pair("mnist", "train");
    let data = idx::load(&images, &labels).unwrap();
    let labels = class_labels(&data);
    assert_eq!(labels.len(), 1000);

    // Pathological non-IID: 20 shards of 50 digits sorted by label, 2 per device; a shard
    // spans at most two labels, so no device sees more than four, and most see two or less.
    let shards = partition::label_shards(&labels, 10, 2, 0).unwrap();
    assert_exact_cover(&shards, 1000);
    assert!(shards.iter().all(|p| p.len() == 100));
    let mixes: Vec<usize> = shards.iter().map(|p| distinct(p, &labels)).collect();
    assert!(mixes.iter().all(|&m| m <= 4), "{mixes:?}");
    assert!(mixes.iter().sum::<usize>() <= 30, "{mixes:?}");

    // IID: every device sees (nearly) every digit.
    let iid = partition::iid(data.len(), 10, 0).unwrap();
    assert_exact_cover(&iid, 1000);
    assert!(iid.iter().all(|p| distinct(p, &labels) >= 9));

    // Dirichlet(0.1): strong label skew, yet every device holds something.
    let skewed = partition::dirichlet(&labels, 10, 10, 0.1, 0).unwrap();
    assert_exact_cover(&skewed, 1000);
    assert!(skewed.iter().all(|p| !p.is_empty()));
    let mean_mix = skewed.iter().map(|p| distinct(p, &labels)).sum::<usize>() as f64 / 10.0;
    assert!(mean_mix < 6.0, "mean labels per device {mean_mix}");
    assert_eq!(
        skewed,
        partition::dirichlet(&labels, 10, 10, 0.1, 0).unwrap()
    );
}
