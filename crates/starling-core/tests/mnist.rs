//! The paper models learn real digits: a short local training run on part of the MNIST test
//! set (from `../shared/data/mnist/` beside the project, which must be there), scored on
//! another part. A smoke test of the whole path — loader, model, default plan, training.

use std::path::PathBuf;

use starling_core::datasets::idx;
use starling_core::train::{train, Plan};
use starling_core::{builtin, Dataset, Model, ModelSpec};

fn mnist_t10k() -> Dataset {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data/mnist");
    let read = |name: &str| {
        let path = dir.join(name);
        std::fs::read(&path).unwrap_or_else(|e| {
            panic!(
                "cannot read the real data set file {} ({e}); the data sets live in \
                 ../shared/data/ beside the project (see its README.md)",
                path.display()
            )
        })
    };
    idx::load(
        &read("t10k-images-idx3-ubyte.gz"),
        &read("t10k-labels-idx1-ubyte.gz"),
    )
    .unwrap()
}

fn learns(spec: ModelSpec, train_n: usize, epochs: u32, min_accuracy: f32) {
    let data = mnist_t10k();
    let train_set = data.subset(&(0..train_n).collect::<Vec<_>>());
    let test_set = data.subset(&(8000..10_000).collect::<Vec<_>>());
    let model = Model::new(spec.clone()).unwrap();
    let mut params = spec.init_params(0);
    let plan = Plan {
        epochs,
        ..builtin::default_plan(&spec.name)
    };
    train(&model, &mut params, &train_set, &plan, |_| {}).unwrap();
    let m = model.evaluate(
        &params,
        test_set.features(),
        test_set.targets(),
        test_set.len(),
    );
    let accuracy = m.accuracy.unwrap();
    assert!(
        accuracy >= min_accuracy,
        "{}: accuracy {accuracy} on held-out digits",
        spec.name
    );
}

#[test]
fn the_mlp_learns_real_digits() {
    learns(builtin::mlp(784, 10), 3000, 2, 0.85);
}

#[test]
fn the_cnn_learns_real_digits() {
    learns(builtin::cnn(builtin::MNIST_SHAPE, 10), 1500, 1, 0.8);
}
