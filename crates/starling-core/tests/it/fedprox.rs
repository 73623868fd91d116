//! FedProx's proximal term in local training, against hand-computed steps: one step from a
//! known base, whole training runs with and without momentum, mu 0 bit-identical to plain
//! SGD, a larger mu keeping the model nearer its base, and plans without `mu`.

use rand::seq::SliceRandom;
use rand::SeedableRng;
use starling_core::data::{Dataset, TargetColumn};
use starling_core::trainer::optim::Sgd;
use starling_core::trainer::train::{train, Plan};
use starling_core::{trainer::builtin, Model, Parameters};

fn line_data() -> (Vec<f32>, Vec<f32>, Dataset) {
    let xs: Vec<f32> = (0..21).map(|i| i as f32 * 0.15 - 1.5).collect();
    let ys: Vec<f32> = xs
        .iter()
        .map(|x| 2.0 * x + 1.0 + (x * 5.0).sin() * 0.1)
        .collect();
    let csv: String = xs
        .iter()
        .zip(&ys)
        .map(|(x, y)| format!("{x},{y}\n"))
        .collect();
    let data = Dataset::from_csv(csv.as_bytes(), &TargetColumn::Last).unwrap();
    (xs, ys, data)
}

fn linear_params(w: f32, b: f32) -> Parameters {
    let mut p = builtin::linear(1, 1).init_params(0);
    p.get_mut("W").unwrap().data_mut()[0] = w;
    p.get_mut("b").unwrap().data_mut()[0] = b;
    p
}

fn wb(p: &Parameters) -> (f32, f32) {
    (p.get("W").unwrap().data()[0], p.get("b").unwrap().data()[0])
}

/// The MSE gradient of `y = w x + b` over a batch, in float32.
fn mse_grad(w: f32, b: f32, xs: &[f32], ys: &[f32]) -> (f32, f32) {
    let n = xs.len() as f32;
    let (mut gw, mut gb) = (0.0f32, 0.0f32);
    for (&x, &y) in xs.iter().zip(ys) {
        let d = w * x + b - y;
        gw += 2.0 * d * x / n;
        gb += 2.0 * d / n;
    }
    (gw, gb)
}

fn close(got: f32, want: f32, what: &str) {
    assert!(
        (got - want).abs() <= 1e-5 * want.abs().max(1.0),
        "{what}: {got} vs {want}"
    );
}

#[test]
fn one_proximal_step_matches_the_hand_computed_step() {
    let (xs, ys, data) = line_data();
    let model = Model::new(builtin::linear(1, 1)).unwrap();
    let (w0, b0) = (5.0f32, 3.0f32);
    let (w, b) = (1.5f32, -0.5f32);
    let (lr, mu) = (0.05f32, 0.7f32);
    let mut params = linear_params(w, b);
    let mut grads = Parameters::zeros(model.layout());
    model.loss_and_grad(
        &params,
        data.features(),
        data.targets(),
        data.len(),
        &mut grads,
    );
    let mut opt = Sgd::new(lr, 0.0).with_proximal(mu, linear_params(w0, b0));
    opt.step(&mut params, &grads);
    let (gw, gb) = mse_grad(w, b, &xs, &ys);
    let want_w = w - lr * (gw + mu * (w - w0));
    let want_b = b - lr * (gb + mu * (b - b0));
    let (got_w, got_b) = wb(&params);
    close(got_w, want_w, "W");
    close(got_b, want_b, "b");
    // The proximal term moved the step: plain SGD lands elsewhere.
    let plain_w = w - lr * gw;
    assert!((got_w - plain_w).abs() > 1e-3, "{got_w} vs plain {plain_w}");
}

/// Mini-batch gradient descent with momentum and the proximal term, batches in order, from
/// the base (5, 3): `v = m v + g + mu (w - w0); w -= lr v`.
fn reference(xs: &[f32], ys: &[f32], plan: &Plan) -> (f32, f32) {
    let (w0, b0) = (5.0f32, 3.0f32);
    let (mut w, mut b) = (w0, b0);
    let (mut vw, mut vb) = (0.0f32, 0.0f32);
    let (lr, m, mu) = (plan.learning_rate, plan.momentum, plan.mu);
    for _ in 0..plan.epochs {
        for (bx, by) in xs.chunks(plan.batch_size).zip(ys.chunks(plan.batch_size)) {
            let (gw, gb) = mse_grad(w, b, bx, by);
            vw = m * vw + gw + mu * (w - w0);
            vb = m * vb + gb + mu * (b - b0);
            w -= lr * vw;
            b -= lr * vb;
        }
    }
    (w, b)
}

#[test]
fn training_with_mu_matches_hand_written_fedprox() {
    let (xs, ys, data) = line_data();
    let model = Model::new(builtin::linear(1, 1)).unwrap();
    for momentum in [0.0, 0.5] {
        let plan = Plan {
            epochs: 6,
            batch_size: 4,
            learning_rate: 0.02,
            momentum,
            shuffle: false,
            mu: 0.8,
            ..Plan::default()
        };
        let mut params = linear_params(5.0, 3.0);
        train(&model, &mut params, &data, &plan, |_| {}).unwrap();
        let (w, b) = reference(&xs, &ys, &plan);
        let (got_w, got_b) = wb(&params);
        close(got_w, w, &format!("W, momentum {momentum}"));
        close(got_b, b, &format!("b, momentum {momentum}"));
        // And not the plain-SGD result.
        let (pw, _) = reference(&xs, &ys, &Plan { mu: 0.0, ..plan });
        assert!((got_w - pw).abs() > 1e-3, "{got_w} vs plain {pw}");
    }
}

/// `train` as it was before FedProx: the same loop with a plain `Sgd` (whose steps
/// `Model::train_step` fuses with the backward pass when there is no momentum;
/// `training::the_fused_sgd_step_equals_the_gradient_then_the_step` checks that fusion).
fn plain_train(model: &Model, params: &mut Parameters, data: &Dataset, plan: &Plan) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(plan.seed);
    let mut order: Vec<usize> = (0..data.len()).collect();
    let mut grads = Parameters::zeros(model.layout());
    let mut opt = Sgd::new(plan.learning_rate, plan.momentum);
    let (mut x, mut y) = (Vec::new(), Vec::new());
    for _ in 0..plan.epochs {
        if plan.shuffle {
            order.shuffle(&mut rng);
        }
        for batch in order.chunks(plan.batch_size) {
            data.gather(batch, &mut x, &mut y);
            model.train_step(params, &x, &y, batch.len(), &mut grads, &mut opt);
        }
    }
}

fn classes() -> Dataset {
    let csv: String = (0..120)
        .map(|i| {
            let x = (i as f32 / 120.0) * 4.0 - 2.0;
            let y = (i as f32 * 0.37).sin();
            format!("{x},{y},{}\n", (i * 7) % 3)
        })
        .collect();
    Dataset::from_csv(csv.as_bytes(), &TargetColumn::Last).unwrap()
}

#[test]
fn mu_zero_is_bit_identical_to_plain_sgd() {
    let data = classes();
    let spec = builtin::mlp(2, 3);
    let model = Model::new(spec.clone()).unwrap();
    for momentum in [0.0, 0.9] {
        let plan = Plan {
            epochs: 3,
            batch_size: 7,
            learning_rate: 0.1,
            momentum,
            seed: 11,
            mu: 0.0,
            ..Plan::default()
        };
        let mut a = spec.init_params(3);
        train(&model, &mut a, &data, &plan, |_| {}).unwrap();
        let mut b = spec.init_params(3);
        plain_train(&model, &mut b, &data, &plan);
        assert_eq!(a, b, "momentum {momentum}");
        // A positive mu, however small, changes the result.
        let mut c = spec.init_params(3);
        train(&model, &mut c, &data, &Plan { mu: 0.5, ..plan }, |_| {}).unwrap();
        assert_ne!(a, c, "momentum {momentum}");
    }
}

#[test]
fn a_larger_mu_keeps_the_model_nearer_its_base() {
    let data = classes();
    let spec = builtin::logistic(2, 3);
    let model = Model::new(spec.clone()).unwrap();
    let base = spec.init_params(5);
    // Full batches: no gradient noise, so the pull towards the base decides the distance.
    let plan = Plan {
        epochs: 30,
        batch_size: data.len(),
        learning_rate: 0.1,
        ..Plan::default()
    };
    let distances: Vec<f64> = [0.0f32, 0.1, 0.5, 2.0, 5.0]
        .iter()
        .map(|&mu| {
            let mut p = base.clone();
            train(&model, &mut p, &data, &Plan { mu, ..plan.clone() }, |_| {}).unwrap();
            p.sub(&base).unwrap().l2_norm()
        })
        .collect();
    assert!(distances[0] > 0.0);
    assert!(
        distances.windows(2).all(|w| w[1] < w[0]),
        "distance from the base should fall as mu grows: {distances:?}"
    );
}

#[test]
fn plans_without_mu_parse_and_bad_mus_are_refused() {
    let old =
        r#"{"epochs":2,"batch_size":8,"learning_rate":0.1,"momentum":0.0,"shuffle":true,"seed":4}"#;
    let plan: Plan = serde_json::from_str(old).unwrap();
    assert_eq!(plan.mu, 0.0);
    assert_eq!(plan.epochs, 2);
    plan.validate().unwrap();
    let plan: Plan = serde_json::from_str(r#"{"mu":0.25}"#).unwrap();
    assert_eq!(plan.mu, 0.25);
    plan.validate().unwrap();
    assert_eq!(Plan::default().mu, 0.0);
    assert_eq!(
        serde_json::to_value(Plan::default()).unwrap()["mu"],
        serde_json::json!(0.0)
    );
    for bad in [-0.1f32, f32::NAN, f32::INFINITY] {
        let err = Plan {
            mu: bad,
            ..Plan::default()
        }
        .validate()
        .unwrap_err();
        assert!(err.to_string().contains("mu"), "{err}");
    }
}
