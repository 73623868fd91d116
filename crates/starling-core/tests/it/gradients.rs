//! Every backward pass checked against central finite differences of the loss: through whole
//! models (parameter gradients) and, for the image layers, layer by layer (input gradients
//! too, which a model never computes for its first layer).

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use starling_core::trainer::layers::conv::Conv2d;
use starling_core::trainer::layers::pool::MaxPool;
use starling_core::trainer::spec::{Init, LayerSpec, LossSpec, ModelSpec, Padding};
use starling_core::{trainer::builtin, Model, Parameters};

fn assert_close(what: &str, analytic: f64, numeric: f64) {
    let tol = 2e-3 + 2e-2 * numeric.abs().max(analytic.abs());
    assert!(
        (numeric - analytic).abs() <= tol,
        "{what}: analytic {analytic}, numeric {numeric}"
    );
}

/// Compares `loss_and_grad` with `(L(p + h) - L(p - h)) / 2h` for every parameter, with a
/// batch of `n` random examples.
fn check_with(spec: ModelSpec, n: usize, h: f32, targets: impl Fn(&mut StdRng) -> f32) {
    let mut rng = StdRng::seed_from_u64(42);
    let model = Model::new(spec.clone()).unwrap();
    let mut params = spec.init_params(1);
    // Move away from special points (zeros) so every path carries gradient.
    for t in params.tensors_mut() {
        for v in t.data_mut() {
            *v += rng.random_range(-0.5..0.5);
        }
    }
    let x: Vec<f32> = (0..n * spec.inputs)
        .map(|_| rng.random_range(-1.0..1.0))
        .collect();
    let y: Vec<f32> = (0..n * spec.target_width())
        .map(|_| targets(&mut rng))
        .collect();
    let mut grads = Parameters::zeros(model.layout());
    model.loss_and_grad(&params, &x, &y, n, &mut grads);
    assert!(
        grads
            .iter()
            .any(|(_, g)| g.data().iter().any(|&v| v != 0.0)),
        "{}: all gradients are zero",
        spec.name
    );

    let loss_at = |p: &Parameters| -> f64 {
        let mut g = Parameters::zeros(model.layout());
        f64::from(model.loss_and_grad(p, &x, &y, n, &mut g))
    };
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
            assert_close(
                &format!("{}: parameter {ti}[{i}]", spec.name),
                analytic,
                numeric,
            );
        }
    }
}

fn check(spec: ModelSpec, targets: impl Fn(&mut StdRng) -> f32) {
    check_with(spec, 5, 1e-2, targets);
}

fn classes(k: usize) -> impl Fn(&mut StdRng) -> f32 {
    move |r| r.random_range(0..k) as f32
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

fn conv(filters: usize, kernel: usize, stride: usize, padding: Padding) -> LayerSpec {
    LayerSpec::Conv2d {
        filters,
        kernel,
        stride,
        padding,
        weight: None,
        bias: None,
        weight_init: Init::GlorotUniform,
        bias_init: Init::Zeros,
    }
}

fn pool(size: usize, stride: Option<usize>) -> LayerSpec {
    LayerSpec::MaxPool { size, stride }
}

fn image_model(name: &str, shape: [usize; 3], layers: Vec<LayerSpec>, loss: LossSpec) -> ModelSpec {
    ModelSpec {
        name: name.into(),
        inputs: shape.iter().product(),
        input_shape: Some(shape.to_vec()),
        layers,
        loss,
        external: None,
    }
}

#[test]
fn linear_mse_gradients() {
    check(builtin::linear(1, 1), |r| r.random_range(-3.0..3.0));
    check(builtin::linear(3, 2), |r| r.random_range(-3.0..3.0));
}

#[test]
fn softmax_cross_entropy_gradients() {
    check(builtin::logistic(4, 3), classes(3));
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
                input_shape: None,
                layers: vec![dense(4), act.clone(), dense(3)],
                loss: LossSpec::SoftmaxCrossEntropy,
                external: None,
            },
            classes(3),
        );
        check(
            ModelSpec {
                name: format!("regression-{name}"),
                inputs: 2,
                input_shape: None,
                layers: vec![dense(3), act, dense(1)],
                loss: LossSpec::Mse,
                external: None,
            },
            |r| r.random_range(-1.0..1.0),
        );
    }
}

#[test]
fn conv_valid_and_same_padding_with_strides() {
    check(
        image_model(
            "conv-valid",
            [2, 5, 5],
            vec![conv(3, 3, 1, Padding::Valid), LayerSpec::Flatten, dense(3)],
            LossSpec::SoftmaxCrossEntropy,
        ),
        classes(3),
    );
    // Odd total padding (bottom/right get the extra row) and a stride that skips columns.
    check(
        image_model(
            "conv-same-stride2",
            [2, 5, 6],
            vec![
                conv(2, 4, 2, Padding::Same),
                LayerSpec::Tanh,
                LayerSpec::Flatten,
                dense(2),
            ],
            LossSpec::Mse,
        ),
        |r| r.random_range(-1.0..1.0),
    );
    check(
        image_model(
            "conv-valid-stride2",
            [1, 7, 6],
            vec![conv(2, 3, 2, Padding::Valid), LayerSpec::Flatten, dense(2)],
            LossSpec::SoftmaxCrossEntropy,
        ),
        classes(2),
    );
}

#[test]
fn stacked_convolutions_carry_the_input_gradient() {
    check(
        image_model(
            "conv-conv",
            [1, 6, 6],
            vec![
                conv(3, 3, 1, Padding::Same),
                LayerSpec::Sigmoid,
                conv(2, 2, 1, Padding::Valid),
                LayerSpec::Flatten,
                dense(3),
            ],
            LossSpec::SoftmaxCrossEntropy,
        ),
        classes(3),
    );
}

#[test]
fn max_pool_routes_the_gradient_to_each_windows_maximum() {
    // A small step keeps the perturbation from changing which input wins a window.
    for (name, p) in [
        ("pool-2", pool(2, None)),
        ("pool-2-stride-1", pool(2, Some(1))),
        ("pool-3-stride-2", pool(3, Some(2))),
    ] {
        check_with(
            image_model(
                name,
                [1, 7, 7],
                vec![
                    conv(2, 3, 1, Padding::Same),
                    p,
                    LayerSpec::Flatten,
                    dense(3),
                ],
                LossSpec::SoftmaxCrossEntropy,
            ),
            4,
            1e-3,
            classes(3),
        );
    }
}

#[test]
fn conv_relu_pool_flatten_dense_softmax_model() {
    check_with(
        image_model(
            "small-cnn",
            [2, 6, 6],
            vec![
                conv(3, 3, 1, Padding::Same),
                LayerSpec::Relu,
                pool(2, None),
                LayerSpec::Flatten,
                dense(4),
                LayerSpec::Relu,
                dense(3),
            ],
            LossSpec::SoftmaxCrossEntropy,
        ),
        4,
        1e-3,
        classes(3),
    );
}

/// Checks a layer's backward pass for the scalar objective `L = Σ r ⊙ y` (so `dy = r`)
/// against finite differences of step `h` in each of the `inputs` given.
fn check_layer(
    what: &str,
    h: f32,
    mut vars: Vec<Vec<f32>>,
    r: &[f32],
    forward: impl Fn(&[Vec<f32>]) -> Vec<f32>,
    analytic: &[Vec<f32>],
) {
    let objective = |vars: &[Vec<f32>]| -> f64 {
        forward(vars)
            .iter()
            .zip(r)
            .map(|(&y, &w)| f64::from(y) * f64::from(w))
            .sum()
    };
    for v in 0..vars.len() {
        for i in 0..vars[v].len() {
            let orig = vars[v][i];
            vars[v][i] = orig + h;
            let up = objective(&vars);
            vars[v][i] = orig - h;
            let down = objective(&vars);
            vars[v][i] = orig;
            let numeric = (up - down) / (2.0 * f64::from(h));
            assert_close(
                &format!("{what}: variable {v}[{i}]"),
                f64::from(analytic[v][i]),
                numeric,
            );
        }
    }
}

fn random(rng: &mut StdRng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-1.0..1.0)).collect()
}

#[test]
fn conv_layer_input_weight_and_bias_gradients() {
    let mut rng = StdRng::seed_from_u64(7);
    for (shape, filters, k, stride, padding) in [
        ([2, 5, 5], 3, 3, 1, Padding::Same),
        ([1, 6, 5], 2, 2, 2, Padding::Same),
        ([3, 6, 6], 2, 3, 2, Padding::Valid),
        ([2, 4, 4], 2, 5, 1, Padding::Same),
        // 5x5 at stride 1 over 8 or more channels: Winograd's algorithm natively.
        ([8, 5, 6], 3, 5, 1, Padding::Same),
        ([9, 7, 7], 2, 5, 1, Padding::Valid),
    ] {
        let c = Conv2d::new(shape, filters, k, stride, padding).unwrap();
        let n = 2;
        let x = random(&mut rng, n * c.input_len());
        let w = random(&mut rng, filters * shape[0] * k * k);
        let b = random(&mut rng, filters);
        let r = random(&mut rng, n * c.output_len());
        let (mut dw, mut db) = (vec![0.0; w.len()], vec![0.0; b.len()]);
        let mut dx = vec![0.0; x.len()];
        let (mut col, mut dcol) = (Vec::new(), Vec::new());
        c.backward(
            &x,
            n,
            &w,
            &r,
            &mut dw,
            &mut db,
            Some(&mut dx),
            &mut col,
            &mut dcol,
        );
        // The layer is linear in each variable, so a large step has no truncation error
        // and keeps f32 rounding in the forward pass (larger in Winograd's transformed
        // domain than in im2col's sums) from swamping the difference.
        check_layer(
            &format!("conv {shape:?} f{filters} k{k} s{stride} {padding:?}"),
            0.25,
            vec![x, w, b],
            &r,
            |v| {
                let mut y = vec![0.0; n * c.output_len()];
                c.forward(&v[0], n, &v[1], &v[2], &mut y, &mut Vec::new());
                y
            },
            &[dx, dw, db],
        );
    }
}

#[test]
fn conv_same_padding_matches_a_direct_convolution() {
    // A 3x3 input, one 3x3 kernel of ones, same padding: each output is the sum of its
    // in-image neighbourhood.
    let c = Conv2d::new([1, 3, 3], 1, 3, 1, Padding::Same).unwrap();
    let x: Vec<f32> = (1..=9).map(|v| v as f32).collect();
    let mut y = vec![0.0; 9];
    c.forward(&x, 1, &[1.0; 9], &[0.5], &mut y, &mut Vec::new());
    let expected = [12.0, 21.0, 16.0, 27.0, 45.0, 33.0, 24.0, 39.0, 28.0].map(|v| v + 0.5);
    assert_eq!(y, expected);
}

#[test]
fn max_pool_layer_input_gradient() {
    let mut rng = StdRng::seed_from_u64(8);
    for (shape, size, stride) in [([2, 4, 4], 2, 2), ([1, 5, 5], 3, 2), ([2, 3, 4], 2, 1)] {
        let p = MaxPool::new(shape, size, stride).unwrap();
        let n = 2;
        let x = random(&mut rng, n * p.input_len());
        let r = random(&mut rng, n * p.output_len());
        let mut y = vec![0.0; n * p.output_len()];
        let mut argmax = Vec::new();
        p.forward(&x, n, &mut y, Some(&mut argmax));
        let mut dx = vec![0.0; x.len()];
        p.backward(&r, n, &argmax, &mut dx);
        check_layer(
            &format!("max_pool {shape:?} size {size} stride {stride}"),
            1e-3,
            vec![x],
            &r,
            |v| {
                let mut y = vec![0.0; n * p.output_len()];
                p.forward(&v[0], n, &mut y, None);
                y
            },
            &[dx],
        );
    }
}

/// Regression: an activation's output moved away by a following `flatten` (or overwritten by
/// a following activation working in place) gave the activation's backward pass the wrong
/// values.
#[test]
fn activations_in_a_row_and_around_flatten_keep_their_outputs() {
    check(
        image_model(
            "conv-tanh-flatten",
            [1, 4, 4],
            vec![
                conv(2, 3, 1, Padding::Same),
                LayerSpec::Tanh,
                LayerSpec::Flatten,
                dense(3),
            ],
            LossSpec::SoftmaxCrossEntropy,
        ),
        classes(3),
    );
    check(
        image_model(
            "act-chain",
            [2, 3, 3],
            vec![
                LayerSpec::Sigmoid,
                conv(2, 2, 1, Padding::Valid),
                LayerSpec::Sigmoid,
                LayerSpec::Flatten,
                LayerSpec::Tanh,
                dense(4),
                LayerSpec::Tanh,
                LayerSpec::Sigmoid,
                LayerSpec::Relu,
                dense(2),
            ],
            LossSpec::Mse,
        ),
        |r| r.random_range(-1.0..1.0),
    );
}
