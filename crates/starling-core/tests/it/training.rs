//! The training loop against plain float32 gradient descent written out by hand.

use starling_core::data::{Dataset, TargetColumn};
use starling_core::trainer::train::{train, Plan};
use starling_core::{trainer::builtin, Model};

/// Plain float32 mini-batch gradient descent on `y = w x + b` with MSE, batches in order.
fn reference(xs: &[f32], ys: &[f32], epochs: u32, batch: usize, lr: f32) -> (f32, f32) {
    let (mut w, mut b) = (5.0f32, 3.0f32);
    for _ in 0..epochs {
        for (bx, by) in xs.chunks(batch).zip(ys.chunks(batch)) {
            let n = bx.len() as f32;
            let (mut gw, mut gb) = (0.0f32, 0.0f32);
            for (&x, &y) in bx.iter().zip(by) {
                let d = w * x + b - y;
                gw += 2.0 * d * x / n;
                gb += 2.0 * d / n;
            }
            w -= lr * gw;
            b -= lr * gb;
        }
    }
    (w, b)
}

#[test]
fn linear_model_matches_hand_written_gradient_descent() {
    let xs: Vec<f32> = (0..37).map(|i| i as f32 * 0.1 - 1.5).collect();
    let ys: Vec<f32> = xs
        .iter()
        .map(|x| 2.0 * x + 1.0 + (x * 7.0).sin() * 0.1)
        .collect();
    let csv: String = xs
        .iter()
        .zip(&ys)
        .map(|(x, y)| format!("{x},{y}\n"))
        .collect();
    let data = Dataset::from_csv(csv.as_bytes(), &TargetColumn::Last).unwrap();
    let spec = builtin::linear(1, 1);
    let model = Model::new(spec.clone()).unwrap();
    let mut params = spec.init_params(0);
    let plan = Plan {
        epochs: 20,
        batch_size: 8,
        learning_rate: 0.01,
        shuffle: false,
        ..Plan::default()
    };
    let report = train(&model, &mut params, &data, &plan, |_| {}).unwrap();
    let (w, b) = reference(&xs, &ys, 20, 8, 0.01);
    let got_w = params.get("W").unwrap().data()[0];
    let got_b = params.get("b").unwrap().data()[0];
    assert!(
        (got_w - w).abs() <= 1e-5 * w.abs().max(1.0),
        "W {got_w} vs {w}"
    );
    assert!(
        (got_b - b).abs() <= 1e-5 * b.abs().max(1.0),
        "b {got_b} vs {b}"
    );
    assert_eq!(report.steps, 20 * 5);
    assert!(report.after.loss < report.before.loss);
}

#[test]
fn shuffled_training_is_reproducible_and_differs_from_file_order() {
    let csv: String = (0..50)
        .map(|i| format!("{},{}\n", i as f32 / 50.0, i % 7))
        .collect();
    let data = Dataset::from_csv(csv.as_bytes(), &TargetColumn::Last).unwrap();
    let spec = builtin::linear(1, 1);
    let model = Model::new(spec.clone()).unwrap();
    let run = |shuffle: bool, seed: u64| {
        let mut p = spec.init_params(0);
        let plan = Plan {
            epochs: 2,
            batch_size: 4,
            shuffle,
            seed,
            ..Plan::default()
        };
        train(&model, &mut p, &data, &plan, |_| {}).unwrap();
        p
    };
    assert_eq!(run(true, 9), run(true, 9));
    assert_ne!(run(true, 9), run(false, 9));
    assert_ne!(run(true, 9), run(true, 10));
}

#[test]
fn logistic_regression_learns_a_separable_problem() {
    let csv: String = (0..200)
        .map(|i| {
            let x = (i as f32 / 200.0) * 4.0 - 2.0;
            let y = (i as f32 * 0.37).sin();
            format!("{x},{y},{}\n", u8::from(x + 0.5 * y > 0.0))
        })
        .collect();
    let data = Dataset::from_csv(csv.as_bytes(), &TargetColumn::Last).unwrap();
    let spec = builtin::logistic(2, 2);
    let model = Model::new(spec.clone()).unwrap();
    let mut p = spec.init_params(0);
    let plan = Plan {
        epochs: 30,
        batch_size: 10,
        learning_rate: 0.5,
        ..Plan::default()
    };
    let start = model.evaluate(&p, data.features(), data.targets(), data.len());
    assert!(start.accuracy.unwrap() < 0.8, "{start:?}");
    let r = train(&model, &mut p, &data, &plan, |_| {}).unwrap();
    // The last epoch's batches, as the training pass measured them.
    assert!(r.after.accuracy.unwrap() > 0.95, "{:?}", r.after);
    assert!(r.before.accuracy < r.after.accuracy, "{r:?}");
    let end = model.evaluate(&p, data.features(), data.targets(), data.len());
    assert!(end.accuracy.unwrap() > 0.95, "{end:?}");
}

/// Logistic regression on 23 examples of two noisy classes in two features.
fn noisy_two_classes() -> Dataset {
    let csv: String = (0..23)
        .map(|i| {
            let x = (i as f32 / 23.0) * 4.0 - 2.0;
            let y = (i as f32 * 0.91).sin();
            format!("{x},{y},{}\n", u8::from(x + y > 0.3))
        })
        .collect();
    Dataset::from_csv(csv.as_bytes(), &TargetColumn::Last).unwrap()
}

#[test]
fn the_reported_loss_is_the_training_pass_unless_the_plan_evaluates_after_training() {
    let data = noisy_two_classes();
    let spec = builtin::logistic(2, 2);
    let model = Model::new(spec.clone()).unwrap();
    let plan = Plan {
        epochs: 3,
        batch_size: 5,
        learning_rate: 0.5,
        momentum: 0.3,
        shuffle: false,
        ..Plan::default()
    };
    // The same run by hand: each batch measured on the parameters its step starts from.
    let mut reference = spec.init_params(3);
    let mut opt = starling_core::trainer::optim::Sgd::new(plan.learning_rate, plan.momentum);
    let mut grads = starling_core::Parameters::zeros(model.layout());
    let mut epochs = Vec::new();
    for _ in 0..plan.epochs {
        let (mut loss, mut correct) = (0.0f64, 0.0f64);
        for rows in (0..data.len()).collect::<Vec<_>>().chunks(plan.batch_size) {
            let (mut x, mut y) = (Vec::new(), Vec::new());
            data.gather(rows, &mut x, &mut y);
            let e = model.evaluate(&reference, &x, &y, rows.len());
            loss += f64::from(e.loss) * rows.len() as f64;
            correct += f64::from(e.accuracy.unwrap()) * rows.len() as f64;
            model.loss_and_grad(&reference, &x, &y, rows.len(), &mut grads);
            opt.step(&mut reference, &grads);
        }
        let n = data.len() as f64;
        epochs.push(((loss / n) as f32, (correct / n) as f32));
    }
    let close = |a: f32, b: f32| (a - b).abs() <= 1e-5 * b.abs().max(1.0);

    let mut p = spec.init_params(3);
    let r = train(&model, &mut p, &data, &plan, |_| {}).unwrap();
    assert_eq!(p, reference);
    assert!(!r.evaluated_after);
    let (first, last) = (epochs[0], epochs[2]);
    assert!(close(r.before.loss, first.0), "{r:?} vs {epochs:?}");
    assert!(close(r.before.accuracy.unwrap(), first.1), "{r:?}");
    assert!(close(r.after.loss, last.0), "{r:?} vs {epochs:?}");
    assert!(close(r.after.accuracy.unwrap(), last.1), "{r:?}");
    // The last epoch's figures, not the whole data's after training (they differ here).
    let whole = model.evaluate(&p, data.features(), data.targets(), data.len());
    assert_ne!(r.after, whole);

    // Asked for, the figures are the whole data's after training; training is the same.
    let evaluating = Plan {
        evaluate_after_training: true,
        ..plan.clone()
    };
    let mut q = spec.init_params(3);
    let e = train(&model, &mut q, &data, &evaluating, |_| {}).unwrap();
    assert_eq!(q, p);
    assert!(e.evaluated_after);
    assert_eq!(e.after, whole);
    assert_eq!(e.before, r.before);
}

#[test]
fn plans_evaluate_after_training_only_when_they_say_so() {
    // Older plans, and plans that leave it off, do not carry the key.
    let plan: Plan = serde_json::from_str(r#"{"epochs": 2}"#).unwrap();
    assert!(!plan.evaluate_after_training);
    let json = serde_json::to_value(Plan::default()).unwrap();
    assert!(json.get("evaluate_after_training").is_none(), "{json}");
    let on = Plan {
        evaluate_after_training: true,
        ..Plan::default()
    };
    let json = serde_json::to_value(&on).unwrap();
    assert_eq!(json["evaluate_after_training"], serde_json::json!(true));
    assert_eq!(serde_json::from_value::<Plan>(json).unwrap(), on);
}

#[test]
fn unusable_data_and_plans_are_refused() {
    let spec = builtin::logistic(1, 2);
    let model = Model::new(spec.clone()).unwrap();
    let mut p = spec.init_params(0);
    let bad_label = Dataset::from_csv(b"0.5,3\n", &TargetColumn::Last).unwrap();
    let err = train(&model, &mut p, &bad_label, &Plan::default(), |_| {}).unwrap_err();
    assert!(err.to_string().contains("not a class index"), "{err}");
    let wide = Dataset::from_csv(b"1,2,1\n", &TargetColumn::Last).unwrap();
    let err = train(&model, &mut p, &wide, &Plan::default(), |_| {}).unwrap_err();
    assert!(err.to_string().contains("takes 1 feature column"), "{err}");
    let ok = Dataset::from_csv(b"0.5,1\n", &TargetColumn::Last).unwrap();
    let zero = Plan {
        batch_size: 0,
        ..Plan::default()
    };
    assert!(train(&model, &mut p, &ok, &zero, |_| {}).is_err());
}

/// A dense layer after a ReLU skips, in its fused step, the weight rows whose inputs are zero
/// across the whole batch (dead units here; in a trained CNN, the feature maps over an image's
/// blank margins), and writes zeros for their input gradient, which the ReLU would zero. With
/// a third of the first layer's units dead (a large negative bias), the parameters after a
/// few steps still equal those of `train_batch` and `Sgd::step`, and the dead units stay dead.
/// After a tanh, a zero output (of a unit with zero weights and bias) still has a gradient:
/// nothing is skipped, and those units train.
#[test]
fn the_fused_step_skips_dead_relu_inputs_and_changes_nothing() {
    use rand::{Rng, SeedableRng};
    use starling_core::trainer::optim::Sgd;
    use starling_core::trainer::spec::{Init, LayerSpec, LossSpec, ModelSpec};
    use starling_core::Parameters;
    let dense = |units| LayerSpec::Dense {
        units,
        weight: None,
        bias: None,
        weight_init: Init::GlorotUniform,
        bias_init: Init::Zeros,
    };
    let dead = |u: usize| u.is_multiple_of(3);
    for act in [LayerSpec::Relu, LayerSpec::Tanh] {
        // 600 x 512 weights: past the size where a small batch's step goes row by row.
        let spec = ModelSpec {
            name: "dead-units".into(),
            inputs: 64,
            input_shape: None,
            layers: vec![dense(600), act.clone(), dense(512), act.clone(), dense(3)],
            loss: LossSpec::SoftmaxCrossEntropy,
            external: None,
        };
        let relu = act == LayerSpec::Relu;
        let model = Model::new(spec.clone()).unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let mut start = spec.init_params(1);
        // A dead ReLU unit: a large negative bias. A zero tanh unit: zero weights and bias.
        for (u, b) in start.at_mut(1).data_mut().iter_mut().enumerate() {
            if dead(u) {
                *b = if relu { -1e3 } else { 0.0 };
            }
        }
        if !relu {
            for (k, w) in start.at_mut(0).data_mut().iter_mut().enumerate() {
                if dead(k % 600) {
                    *w = 0.0;
                }
            }
        }
        for n in [10, 16, 5] {
            let what = format!("{act:?}, batch {n}");
            let x: Vec<f32> = (0..n * spec.inputs).map(|_| rng.random::<f32>()).collect();
            let y: Vec<f32> = (0..n).map(|_| rng.random_range(0..3) as f32).collect();
            let (mut fused, mut reference) = (start.clone(), start.clone());
            let mut grads = Parameters::zeros(model.layout());
            let (mut opt_a, mut opt_b) = (Sgd::new(0.1, 0.0), Sgd::new(0.1, 0.0));
            for _ in 0..4 {
                let a = model.train_step(&mut fused, &x, &y, n, &mut grads, &mut opt_a);
                let b = model.train_batch(&reference, &x, &y, n, &mut grads);
                opt_b.step(&mut reference, &grads);
                assert!(
                    (a.loss - b.loss).abs() <= 1e-4 * (1.0 + b.loss.abs()),
                    "{what}"
                );
            }
            for ((name, a), (_, b)) in fused.iter().zip(reference.iter()) {
                for (i, (p, q)) in a.data().iter().zip(b.data()).enumerate() {
                    assert!(
                        (p - q).abs() <= 1e-4 * (1.0 + q.abs()),
                        "{what}: {name}[{i}] {p} against {q}"
                    );
                }
            }
            let bias = fused.at(1).data();
            let moved = (0..600).filter(|&u| dead(u) && bias[u] != start.at(1).data()[u]);
            assert_eq!(
                moved.count() > 0,
                !relu,
                "{what}: dead ReLUs stay, tanh units train"
            );
            assert_ne!(
                fused.at(2).data(),
                start.at(2).data(),
                "{what}: the layer trained"
            );
        }
    }
}

/// `Model::train_step` with plain SGD steps each layer as soon as its gradient is known, and
/// a dense layer's weight inside its backward pass; the parameters after a few steps equal
/// those of `train_batch` followed by `Sgd::step` (up to the order of float sums) on models
/// with every layer kind: dense, convolution, pooling, embedding and LSTM. With momentum the
/// two paths are the same code.
#[test]
fn the_fused_sgd_step_equals_the_gradient_then_the_step() {
    use rand::{Rng, SeedableRng};
    use starling_core::trainer::optim::Sgd;
    use starling_core::trainer::spec::LayerSpec;
    use starling_core::Parameters;
    let specs = [
        builtin::mlp(300, 4),
        builtin::cnn([1, 12, 12], 3),
        builtin::lstm(6, 5),
    ];
    for spec in specs {
        let model = Model::new(spec.clone()).unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let n = 10;
        let x: Vec<f32> = (0..n * spec.inputs)
            .map(|_| {
                if matches!(spec.layers.first(), Some(LayerSpec::Embedding { .. })) {
                    rng.random_range(0..6) as f32
                } else {
                    rng.random::<f32>()
                }
            })
            .collect();
        let y: Vec<f32> = (0..n * spec.target_width())
            .map(|_| rng.random_range(0..spec.outputs()) as f32)
            .collect();
        for momentum in [0.0, 0.9] {
            let (mut fused, mut reference) = (spec.init_params(1), spec.init_params(1));
            let mut grads = Parameters::zeros(model.layout());
            let (mut opt_a, mut opt_b) = (Sgd::new(0.1, momentum), Sgd::new(0.1, momentum));
            let mut losses = (Vec::new(), Vec::new());
            for _ in 0..4 {
                let a = model.train_step(&mut fused, &x, &y, n, &mut grads, &mut opt_a);
                let b = model.train_batch(&reference, &x, &y, n, &mut grads);
                opt_b.step(&mut reference, &grads);
                assert_eq!(a.correct, b.correct);
                losses.0.push(a.loss);
                losses.1.push(b.loss);
            }
            let what = format!("{} with momentum {momentum}", spec.layers.len());
            for ((name, a), (_, b)) in fused.iter().zip(reference.iter()) {
                for (i, (p, q)) in a.data().iter().zip(b.data()).enumerate() {
                    assert!(
                        (p - q).abs() <= 1e-4 * (1.0 + q.abs()),
                        "{what}: {name}[{i}] {p} against {q}"
                    );
                }
            }
            assert!(
                losses.0.last() < losses.0.first(),
                "{what}: training lowers the loss {:?}",
                losses.0
            );
            for (a, b) in losses.0.iter().zip(&losses.1) {
                assert!(
                    (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                    "{what}: {a} against {b}"
                );
            }
        }
    }
}
