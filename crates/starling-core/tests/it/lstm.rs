//! The character LSTM as a model: its parameter gradients through embedding, two LSTM
//! layers and dense against central finite differences (tokens as inputs, so the embedding's
//! rows are looked up, not clamped), specs that put a sequence where it cannot go refused,
//! and a small LSTM learning a sequence task that needs memory.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use starling_core::trainer::spec::{Init, LayerSpec, LossSpec, ModelSpec};
use starling_core::trainer::train::{train, Plan};
use starling_core::{Dataset, Model, Parameters};

fn lstm_layer(units: usize, return_sequences: bool) -> LayerSpec {
    LayerSpec::Lstm {
        units,
        return_sequences,
        weight: None,
        recurrent: None,
        bias: None,
        weight_init: Init::GlorotUniform,
        bias_init: Init::Zeros,
    }
}

/// The same model predicting at every step: both LSTM layers return sequences, and the dense
/// layer applies to each step.
fn per_step(vocab: usize, steps: usize, units: usize) -> ModelSpec {
    let mut spec = small(vocab, steps, units);
    spec.layers[2] = lstm_layer(units, true);
    spec
}

/// A small character model: embedding, two LSTM layers, dense over the vocabulary.
fn small(vocab: usize, steps: usize, units: usize) -> ModelSpec {
    ModelSpec {
        name: "small-lstm".into(),
        inputs: steps,
        input_shape: None,
        layers: vec![
            LayerSpec::Embedding {
                vocab,
                width: 3,
                table: None,
                table_init: Init::GlorotUniform,
            },
            lstm_layer(units, true),
            lstm_layer(units, false),
            LayerSpec::Dense {
                units: vocab,
                weight: None,
                bias: None,
                weight_init: Init::GlorotUniform,
                bias_init: Init::Zeros,
            },
        ],
        loss: LossSpec::SoftmaxCrossEntropy,
        external: None,
    }
}

#[test]
fn the_character_models_gradients_match_finite_differences() {
    // Predicting after the last step, and at every step (targets per step).
    for spec in [small(5, 4, 3), per_step(5, 4, 3)] {
        gradients_match(spec);
    }
}

fn gradients_match(spec: ModelSpec) {
    let (vocab, steps, n) = (5, 4, 3);
    let model = Model::new(spec.clone()).unwrap();
    let mut rng = StdRng::seed_from_u64(3);
    let mut params = spec.init_params(9);
    for t in params.tensors_mut() {
        for v in t.data_mut() {
            *v += rng.random_range(-0.3..0.3);
        }
    }
    let x: Vec<f32> = (0..n * steps)
        .map(|_| rng.random_range(0..vocab) as f32)
        .collect();
    let y: Vec<f32> = (0..n * spec.target_width())
        .map(|_| rng.random_range(0..vocab) as f32)
        .collect();
    let mut grads = Parameters::zeros(model.layout());
    model.loss_and_grad(&params, &x, &y, n, &mut grads);
    let loss_at = |p: &Parameters| {
        let mut g = Parameters::zeros(model.layout());
        f64::from(model.loss_and_grad(p, &x, &y, n, &mut g))
    };
    let h = 1e-2f32;
    let mut checked = 0;
    for ti in 0..params.len() {
        for i in 0..params.at(ti).len() {
            let orig = params.at(ti).data()[i];
            params.at_mut(ti).data_mut()[i] = orig + h;
            let up = loss_at(&params);
            params.at_mut(ti).data_mut()[i] = orig - h;
            let down = loss_at(&params);
            params.at_mut(ti).data_mut()[i] = orig;
            let numeric = (up - down) / (2.0 * f64::from(h));
            let analytic = f64::from(grads.at(ti).data()[i]);
            let tol = 2e-3 + 2e-2 * numeric.abs().max(analytic.abs());
            assert!(
                (numeric - analytic).abs() <= tol,
                "{}[{i}]: analytic {analytic}, numeric {numeric}",
                model.layout().entries()[ti].0
            );
            checked += usize::from(analytic != 0.0);
        }
    }
    // Every tensor carries gradient (the table only on the rows of tokens that occur).
    assert!(
        checked > params.iter().map(|(_, t)| t.len()).sum::<usize>() / 2,
        "{checked}"
    );
}

#[test]
fn sequences_where_they_cannot_go_are_refused() {
    let mut spec = small(5, 4, 3);
    // An LSTM on plain features.
    spec.layers.remove(0);
    let e = spec.validate().unwrap_err().to_string();
    assert!(e.contains("needs a sequence"), "{e}");
    // A model that ends in a sequence (it has no dense layer either).
    let mut spec = small(5, 4, 3);
    spec.layers.truncate(2);
    assert!(spec.validate().is_err());
    // Flattening a sequence.
    let mut spec = small(5, 4, 3);
    spec.layers.insert(2, LayerSpec::Flatten);
    let e = spec.validate().unwrap_err().to_string();
    assert!(e.contains("whole sequence"), "{e}");
    // Dense on a sequence is applied to each step: one prediction, and target, per step.
    let mut spec = small(5, 4, 3);
    spec.layers.remove(2);
    spec.validate().unwrap();
    assert_eq!((spec.output_steps(), spec.target_width()), (4, 4));
    assert_eq!(small(5, 4, 3).output_steps(), 1);
    // An embedding after the first layer.
    let mut spec = small(5, 4, 3);
    let first = spec.layers[0].clone();
    spec.layers.insert(1, first);
    let e = spec.validate().unwrap_err().to_string();
    assert!(e.contains("first layer"), "{e}");
}

/// The label is the sequence's first token, seen `steps - 1` steps before the answer: only a
/// model that carries it in its state gets it right.
#[test]
fn a_small_lstm_learns_to_remember_the_first_token() {
    let (vocab, steps, n) = (4, 6, 400);
    let spec = small(vocab, steps, 16);
    let model = Model::new(spec.clone()).unwrap();
    let mut rng = StdRng::seed_from_u64(5);
    let x: Vec<f32> = (0..n * steps)
        .map(|_| rng.random_range(0..vocab) as f32)
        .collect();
    let y: Vec<f32> = (0..n).map(|i| x[i * steps]).collect();
    let data = Dataset::new(x, y, steps, 1).unwrap();
    let mut params = spec.init_params(1);
    let plan = Plan {
        learning_rate: 0.5,
        batch_size: 10,
        epochs: 30,
        ..Plan::default()
    };
    let before = model.evaluate(&params, data.features(), data.targets(), n);
    train(&model, &mut params, &data, &plan, |_| ()).unwrap();
    let after = model.evaluate(&params, data.features(), data.targets(), n);
    // Chance is 25%.
    assert!(before.accuracy.unwrap() < 0.4, "{before:?}");
    assert!(after.accuracy.unwrap() > 0.9, "{after:?}");
}

/// At every step the label is the token of the step before (the first step's, token 0): a
/// model predicting at every step must carry one step of memory, and its accuracy counts
/// every step's prediction (so it ends far above the 1/vocab of guessing, and at most 1).
#[test]
fn a_per_step_lstm_learns_to_repeat_the_previous_token() {
    let (vocab, steps, n) = (4, 6, 300);
    let spec = per_step(vocab, steps, 16);
    let model = Model::new(spec.clone()).unwrap();
    let mut rng = StdRng::seed_from_u64(6);
    let x: Vec<f32> = (0..n * steps)
        .map(|_| rng.random_range(0..vocab) as f32)
        .collect();
    let y: Vec<f32> = (0..n * steps)
        .map(|i| if i % steps == 0 { 0.0 } else { x[i - 1] })
        .collect();
    let data = Dataset::new(x.clone(), y.clone(), steps, steps).unwrap();
    let mut params = spec.init_params(2);
    let before = model.evaluate(&params, &x, &y, n);
    let plan = Plan {
        epochs: 30,
        batch_size: 10,
        learning_rate: 0.5,
        ..Plan::default()
    };
    train(&model, &mut params, &data, &plan, |_| {}).unwrap();
    let after = model.evaluate(&params, &x, &y, n);
    let (a0, a1) = (before.accuracy.unwrap(), after.accuracy.unwrap());
    assert!(a0 < 0.5, "before training {a0}");
    assert!(
        a1 > 0.95 && a1 <= 1.0,
        "after training {a1} (loss {})",
        after.loss
    );
    // The output is example by example, each example's steps in order.
    let out = model.forward(&params, &x[..2 * steps], 2);
    assert_eq!(out.len(), 2 * steps * vocab);
    for (k, row) in out.chunks_exact(vocab).enumerate() {
        let best = (0..vocab)
            .max_by(|&a, &b| row[a].total_cmp(&row[b]))
            .unwrap();
        if k % steps > 0 {
            assert_eq!(
                best as f32,
                x[k - 1],
                "example {}, step {}",
                k / steps,
                k % steps
            );
        }
    }
}
