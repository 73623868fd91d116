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
    let r = train(&model, &mut p, &data, &plan, |_| {}).unwrap();
    assert_eq!(r.before.accuracy.map(|a| a < 0.8), Some(true));
    assert!(r.after.accuracy.unwrap() > 0.95, "{:?}", r.after);
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
