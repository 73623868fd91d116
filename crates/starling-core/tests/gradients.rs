//! Every backward pass checked against central finite differences of the loss.

use rand::{Rng, SeedableRng};
use starling_core::spec::{Init, LayerSpec, LossSpec, ModelSpec};
use starling_core::{builtin, Model, Parameters};

/// Compares `loss_and_grad` with `(L(p + h) - L(p - h)) / 2h` for every parameter.
fn check(spec: ModelSpec, targets: impl Fn(&mut rand::rngs::StdRng) -> f32) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    let model = Model::new(spec.clone()).unwrap();
    let mut params = spec.init_params(1);
    // Move away from special points (zeros) so every path carries gradient.
    for t in params.tensors_mut() {
        for v in t.data_mut() {
            *v += rng.random_range(-0.5..0.5);
        }
    }
    let n = 5;
    let x: Vec<f32> = (0..n * spec.inputs)
        .map(|_| rng.random_range(-1.0..1.0))
        .collect();
    let y: Vec<f32> = (0..n * spec.target_width())
        .map(|_| targets(&mut rng))
        .collect();
    let mut grads = Parameters::zeros(model.layout());
    model.loss_and_grad(&params, &x, &y, n, &mut grads);

    let loss_at = |p: &Parameters| -> f64 {
        let mut g = Parameters::zeros(model.layout());
        f64::from(model.loss_and_grad(p, &x, &y, n, &mut g))
    };
    let h = 1e-2f32;
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
                "{}: parameter {ti}[{i}]: analytic {analytic}, numeric {numeric}",
                spec.name
            );
        }
    }
}

fn dense(units: usize) -> LayerSpec {
    LayerSpec::Dense {
        units,
        weight: None,
        bias: None,
        weight_init: Init::GlorotUniform,
        bias_init: Init::Zeros,
    }
}

#[test]
fn linear_mse_gradients() {
    check(builtin::linear(1, 1), |r| r.random_range(-3.0..3.0));
    check(builtin::linear(3, 2), |r| r.random_range(-3.0..3.0));
}

#[test]
fn softmax_cross_entropy_gradients() {
    check(builtin::logistic(4, 3), |r| r.random_range(0..3) as f32);
}

#[test]
fn hidden_layers_with_each_activation() {
    for (act, name) in [
        (LayerSpec::Relu, "relu"),
        (LayerSpec::Sigmoid, "sigmoid"),
        (LayerSpec::Tanh, "tanh"),
    ] {
        check(
            ModelSpec {
                name: format!("mlp-{name}"),
                inputs: 3,
                layers: vec![dense(4), act.clone(), dense(3)],
                loss: LossSpec::SoftmaxCrossEntropy,
            },
            |r| r.random_range(0..3) as f32,
        );
        check(
            ModelSpec {
                name: format!("regression-{name}"),
                inputs: 2,
                layers: vec![dense(3), act, dense(1)],
                loss: LossSpec::Mse,
            },
            |r| r.random_range(-1.0..1.0),
        );
    }
}
