//! The data set loaders on fixtures built in memory (raw and gzip), and on the real files in
//! `../shared/data/` beside the project, which must be there: a missing folder fails the
//! test with the path it looked for.

use std::io::Write;
use std::path::PathBuf;

use starling_core::datasets::shakespeare::{self, char_index, SEQ_LEN, UNKNOWN, VOCAB};
use starling_core::datasets::{idx, DatasetError};

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

/// A file of the shared data sets beside the project; panics naming the path when absent.
fn shared_data(rel: &str) -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/data")
        .join(rel);
    match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) => panic!(
            "cannot read the real data set file {} ({e}); the data sets live in \
             ../shared/data/ beside the project (see its README.md)",
            path.display()
        ),
    }
}

fn check_real_idx(folder: &str) {
    let data = idx::load(
        &shared_data(&format!("{folder}/t10k-images-idx3-ubyte.gz")),
        &shared_data(&format!("{folder}/t10k-labels-idx1-ubyte.gz")),
    )
    .unwrap();
    assert_eq!((data.len(), data.feature_dim()), (10_000, 784));
    let mut counts = [0usize; 10];
    for &t in data.targets() {
        assert!((0.0..10.0).contains(&t) && t.fract() == 0.0, "label {t}");
        counts[t as usize] += 1;
    }
    assert!(
        counts.iter().all(|&c| (800..=1200).contains(&c)),
        "{counts:?}"
    );
    assert!(data.features().iter().all(|p| (0.0..=1.0).contains(p)));
    let max = data.features().iter().copied().fold(0.0f32, f32::max);
    assert_eq!(max, 1.0);
}

#[test]
fn real_mnist_test_set_loads_as_10000_by_784() {
    check_real_idx("mnist");
}

#[test]
fn real_fashion_mnist_test_set_loads_as_10000_by_784() {
    check_real_idx("fashion-mnist");
}

#[test]
fn real_shakespeare_has_the_roles_its_readme_counts() {
    let bytes = shared_data("shakespeare/roles.json.gz");
    let corpus = shakespeare::parse(&bytes, 64).unwrap();
    assert_eq!(corpus.roles.len(), 1024);
    assert_eq!(corpus.samples(), 4_055_591);
    let all = shakespeare::parse(&bytes, 1).unwrap();
    assert_eq!(all.roles.len(), 1119);
    assert_eq!(all.roles[0].name, "alls_well_that_ends_well/ALL");
    assert_eq!(all.roles[0].samples(), 12);
}
