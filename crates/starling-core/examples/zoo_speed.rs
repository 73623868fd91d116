//! Training speed of the built-in zoo's MNIST models at the FedAvg paper's local batch size
//! of 10, on random MNIST-shaped data, on one core:
//!
//! ```text
//! cargo run --release -p starling-core --example zoo_speed [seconds per measurement]
//! ```
//!
//! `steps` is the bare optimiser loop (forward, backward, SGD step); `train()` is what a
//! simulated device does with 600 examples (one FedAvg-paper client): one epoch, its loss
//! and accuracy from the training pass (the default plan evaluates nothing more).

use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use starling_core::data::Dataset;
use starling_core::trainer::optim::Sgd;
use starling_core::trainer::train::{train, Plan};
use starling_core::{trainer::builtin, Model, ModelSpec, Parameters};

const BATCH: usize = 10;

fn random_data(spec: &ModelSpec, n: usize) -> Dataset {
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    let x = (0..n * spec.inputs).map(|_| rng.random::<f32>()).collect();
    let y = (0..n)
        .map(|_| rng.random_range(0..spec.outputs()) as f32)
        .collect();
    Dataset::new(x, y, spec.inputs, 1).expect("consistent shapes")
}

/// Examples per second of the bare step loop, measured for about `budget`.
fn steps_per_second(spec: &ModelSpec, budget: Duration) -> f64 {
    let model = Model::new(spec.clone()).expect("built-in specs are valid");
    let mut params = spec.init_params(0);
    let mut grads = Parameters::zeros(model.layout());
    let mut opt = Sgd::new(0.01, 0.0);
    let data = random_data(spec, 1000);
    let (mut x, mut y) = (Vec::new(), Vec::new());
    let batches: Vec<Vec<usize>> = (0..data.len())
        .collect::<Vec<_>>()
        .chunks(BATCH)
        .map(<[usize]>::to_vec)
        .collect();
    // Warm-up: grow the buffers and let the CPU settle.
    for b in batches.iter().take(5) {
        data.gather(b, &mut x, &mut y);
        model.train_step(&mut params, &x, &y, BATCH, &mut grads, &mut opt);
    }
    let start = Instant::now();
    let mut examples = 0;
    while start.elapsed() < budget {
        for b in batches.iter().take(10) {
            data.gather(b, &mut x, &mut y);
            model.train_step(&mut params, &x, &y, BATCH, &mut grads, &mut opt);
            examples += BATCH;
        }
    }
    examples as f64 / start.elapsed().as_secs_f64()
}

/// Examples per second of `train()` on a 600-example device, one epoch.
fn device_rounds_per_second(spec: &ModelSpec, budget: Duration) -> (f64, f64) {
    let model = Model::new(spec.clone()).expect("built-in specs are valid");
    let base = spec.init_params(0);
    let data = random_data(spec, 600);
    let plan = Plan {
        batch_size: BATCH,
        ..builtin::default_plan(&spec.name)
    };
    let start = Instant::now();
    let mut rounds = 0;
    while rounds == 0 || start.elapsed() < budget {
        let mut params = base.clone();
        train(&model, &mut params, &data, &plan, |_| {}).expect("the data fits the model");
        rounds += 1;
    }
    let secs = start.elapsed().as_secs_f64();
    (rounds as f64 / secs, rounds as f64 * 600.0 / secs)
}

fn main() {
    let seconds: f64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(3.0);
    let budget = Duration::from_secs_f64(seconds);
    if cfg!(debug_assertions) {
        eprintln!("note: a debug build; run with --release for meaningful figures");
    }
    for spec in [
        builtin::mlp(784, 10),
        builtin::cnn(builtin::MNIST_SHAPE, 10),
    ] {
        let steps = steps_per_second(&spec, budget);
        let (devices, examples) = device_rounds_per_second(&spec, budget);
        println!(
            "{:>4} ({:>9} parameters): steps {:>8.0} examples/s | train() on 600 examples: \
             {:>7.0} examples/s, {:.2} devices/s",
            spec.name,
            spec.layout().numel(),
            steps,
            examples,
            devices,
        );
    }
}
