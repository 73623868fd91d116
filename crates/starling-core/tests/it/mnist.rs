//! The built-in models learn real digits: a short central training run on the 1,000 training
//! digits of the committed MNIST fixture (`tests/fixtures/mnist/`, the real files' first
//! examples; see its README.md), scored on the fixture's 300 test digits. A smoke test of
//! the whole path — loader, model, default plan, training, evaluation — and, on the
//! Fashion-MNIST fixture (200 training and 100 test items), of a harder set.

use std::path::PathBuf;
use std::time::Instant;

use starling_core::data::datasets::idx;
use starling_core::trainer::train::{train, Plan};
use starling_core::{trainer::builtin, Dataset, Model, ModelSpec};

/// One split (`train` or `t10k`) of a fixture IDX set.
fn fixture(folder: &str, split: &str) -> Dataset {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(folder);
    let read = |name: String| {
        let path = dir.join(name);
        std::fs::read(&path).unwrap_or_else(|e| {
            panic!(
                "cannot read the fixture {} ({e}); regenerate the fixtures with \
                 scripts/make-fixtures.py (see tests/fixtures/README.md)",
                path.display()
            )
        })
    };
    idx::load(
        &read(format!("{split}-images-idx3-ubyte.gz")),
        &read(format!("{split}-labels-idx1-ubyte.gz")),
    )
    .unwrap()
}

/// Trains `spec` from its seed-0 initialisation with its default plan for `epochs` epochs
/// on the first `train_n` training examples, and asserts that its accuracy on the test split
/// goes from about chance to at least `min_accuracy`.
fn learns(folder: &str, spec: ModelSpec, train_n: usize, epochs: u32, min_accuracy: f32) {
    let start = Instant::now();
    let train_set = fixture(folder, "train");
    let train_set = train_set.subset(&(0..train_n).collect::<Vec<_>>());
    let test_set = fixture(folder, "t10k");
    let model = Model::new(spec.clone()).unwrap();
    let mut params = spec.init_params(0);
    let plan = Plan {
        epochs,
        ..builtin::default_plan(&spec.name)
    };
    let before = model
        .evaluate(
            &params,
            test_set.features(),
            test_set.targets(),
            test_set.len(),
        )
        .accuracy
        .unwrap();
    assert!(
        before < 0.25,
        "{folder} {}: accuracy {before} before training",
        spec.name
    );
    train(&model, &mut params, &train_set, &plan, |_| {}).unwrap();
    let m = model.evaluate(
        &params,
        test_set.features(),
        test_set.targets(),
        test_set.len(),
    );
    let accuracy = m.accuracy.unwrap();
    eprintln!(
        "{folder} {}: accuracy {before} -> {accuracy} on {} held-out examples after {epochs} \
         epoch(s) on {train_n} ({:.2?})",
        spec.name,
        test_set.len(),
        start.elapsed()
    );
    assert!(
        accuracy >= min_accuracy,
        "{folder} {}: accuracy {accuracy} on held-out examples, expected at least {min_accuracy}",
        spec.name
    );
}

// Accuracies measured when the thresholds were set (deterministic: seed 0 for the
// initialisation and the shuffle): logistic 0.870, MLP 0.893, CNN 0.623 on the 300 MNIST test
// digits; MLP 0.75 on the 100 Fashion-MNIST test items. Chance is 0.1. The thresholds leave
// room for numerical changes (kernels, summation order) without letting a model that does not
// learn pass.

#[test]
fn logistic_regression_learns_real_digits() {
    learns("mnist", builtin::logistic(784, 10), 1000, 10, 0.8);
}

#[test]
fn the_mlp_learns_real_digits() {
    learns("mnist", builtin::mlp(784, 10), 1000, 5, 0.8);
}

/// The CNN is by far the slowest model (several milliseconds per example at the test
/// profile's opt-level 1), so it sees only 400 digits once: a check that it learns, well
/// above chance, not of how well.
#[test]
fn the_cnn_learns_real_digits() {
    learns(
        "mnist",
        builtin::cnn(builtin::MNIST_SHAPE, 10),
        400,
        1,
        0.45,
    );
}

#[test]
fn the_mlp_learns_real_clothes() {
    learns("fashion-mnist", builtin::mlp(784, 10), 200, 10, 0.6);
}
