//! Model specs with image layers, the built-in zoo, and the compiled model's bookkeeping
//! (evaluation in chunks, buffer reuse between models).

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use starling_core::data::Dataset;
use starling_core::trainer::spec::{LayerSpec, Padding};
use starling_core::trainer::train::{train, Plan};
use starling_core::{trainer::builtin, Model, ModelSpec, Parameters};

#[test]
fn the_stored_json_of_the_original_models_is_unchanged() {
    // The server stores specs and compares them: these strings must never change.
    assert_eq!(
        builtin::linear(1, 1).to_json(),
        r#"{"name":"linear","inputs":1,"layers":[{"type":"dense","units":1,"weight":"W","bias":"b","weight_init":{"kind":"constant","value":5.0},"bias_init":{"kind":"constant","value":3.0}}],"loss":"mse"}"#
    );
    assert_eq!(
        builtin::logistic(784, 10).to_json(),
        r#"{"name":"logistic","inputs":784,"layers":[{"type":"dense","units":10,"weight":"W","bias":"b","weight_init":{"kind":"zeros"},"bias_init":{"kind":"zeros"}}],"loss":"softmax_cross_entropy"}"#
    );
}

#[test]
fn image_layers_parse_with_their_defaults_and_round_trip() {
    let json = r#"{"name":"tiny","inputs":16,"input_shape":[1,4,4],"layers":[
        {"type":"conv2d","filters":2,"kernel":3,"padding":"same"},
        {"type":"relu"},
        {"type":"max_pool","size":2},
        {"type":"flatten"},
        {"type":"dense","units":3}],"loss":"softmax_cross_entropy"}"#;
    let spec = ModelSpec::from_json(json).unwrap();
    match &spec.layers[0] {
        LayerSpec::Conv2d {
            stride,
            padding,
            weight,
            ..
        } => {
            assert_eq!(
                (*stride, *padding, weight.as_deref()),
                (1, Padding::Same, None)
            );
        }
        other => panic!("expected conv2d, got {other:?}"),
    }
    assert_eq!(
        spec.layers[2],
        LayerSpec::MaxPool {
            size: 2,
            stride: None
        }
    );
    assert_eq!(
        spec.shapes().unwrap(),
        vec![
            vec![1, 4, 4],
            vec![2, 4, 4],
            vec![2, 4, 4],
            vec![2, 2, 2],
            vec![8],
            vec![3]
        ]
    );
    let layout = spec.layout();
    let entries: Vec<(&str, &[usize])> = layout
        .entries()
        .iter()
        .map(|(n, s)| (n.as_str(), s.as_slice()))
        .collect();
    assert_eq!(
        entries,
        [
            ("conv0.weight", &[2, 1, 3, 3][..]),
            ("conv0.bias", &[2][..]),
            ("dense4.weight", &[8, 3][..]),
            ("dense4.bias", &[3][..])
        ]
    );
    assert_eq!(ModelSpec::from_json(&spec.to_json()).unwrap(), spec);
    assert!(spec.to_json().contains(r#""type":"conv2d""#));
    assert!(spec.to_json().contains(r#""type":"max_pool""#));
}

#[test]
fn glorot_limits_of_a_convolution_use_its_kernel_area() {
    let spec = builtin::cnn(builtin::MNIST_SHAPE, 10);
    let p = spec.init_params(3);
    let limit = |fan_in: usize, fan_out: usize| (6.0 / (fan_in + fan_out) as f32).sqrt();
    let max_abs = |name: &str| {
        p.get(name)
            .unwrap()
            .data()
            .iter()
            .fold(0.0f32, |m, v| m.max(v.abs()))
    };
    let l0 = limit(25, 32 * 25);
    assert!(max_abs("conv0.weight") <= l0 && max_abs("conv0.weight") > 0.9 * l0);
    let l3 = limit(32 * 25, 64 * 25);
    assert!(max_abs("conv3.weight") <= l3 && max_abs("conv3.weight") > 0.9 * l3);
    assert_eq!(max_abs("conv0.bias"), 0.0);
}

fn invalid(json: &str) -> String {
    ModelSpec::from_json(json).unwrap_err().to_string()
}

#[test]
fn misfitting_image_layers_are_refused_with_the_reason() {
    let err = invalid(
        r#"{"name":"x","inputs":16,"input_shape":[1,4,4],"layers":[
        {"type":"conv2d","filters":2,"kernel":3,"padding":"same"},{"type":"dense","units":3}],
        "loss":"mse"}"#,
    );
    assert!(
        err.contains("layer 1 (dense)") && err.contains("flatten"),
        "{err}"
    );
    let err = invalid(
        r#"{"name":"x","inputs":15,"input_shape":[1,4,4],"layers":[{"type":"flatten"},
        {"type":"dense","units":3}],"loss":"mse"}"#,
    );
    assert!(err.contains("holds 16 values but inputs is 15"), "{err}");
    let err = invalid(
        r#"{"name":"x","inputs":16,"input_shape":[1,4,4],"layers":[
        {"type":"conv2d","filters":2,"kernel":5,"padding":"valid"},{"type":"flatten"},
        {"type":"dense","units":3}],"loss":"mse"}"#,
    );
    assert!(err.contains("does not fit a 4x4 input"), "{err}");
    let err = invalid(
        r#"{"name":"x","inputs":16,"layers":[
        {"type":"conv2d","filters":2,"kernel":3,"padding":"same"},{"type":"flatten"},
        {"type":"dense","units":3}],"loss":"mse"}"#,
    );
    assert!(
        err.contains("needs a [channels, height, width] input"),
        "{err}"
    );
    let err = invalid(
        r#"{"name":"x","inputs":16,"input_shape":[1,4,4],"layers":[
        {"type":"max_pool","size":5},{"type":"flatten"},{"type":"dense","units":3}],"loss":"mse"}"#,
    );
    assert!(err.contains("window does not fit"), "{err}");
    let err = invalid(
        r#"{"name":"x","inputs":16,"input_shape":[1,4,4],"layers":[
        {"type":"conv2d","filters":0,"kernel":3,"padding":"same"},{"type":"flatten"},
        {"type":"dense","units":3}],"loss":"mse"}"#,
    );
    assert!(err.contains("filters must be at least 1"), "{err}");
    let err = invalid(
        r#"{"name":"x","inputs":16,"input_shape":[1,4,4],"layers":[
        {"type":"conv2d","filters":2,"kernel":3},{"type":"flatten"},
        {"type":"dense","units":3}],"loss":"mse"}"#,
    );
    assert!(err.contains("padding"), "{err}");
}

fn random_batch(spec: &ModelSpec, n: usize, seed: u64) -> (Vec<f32>, Vec<f32>) {
    let mut rng = StdRng::seed_from_u64(seed);
    let x = (0..n * spec.inputs).map(|_| rng.random::<f32>()).collect();
    let y = (0..n)
        .map(|_| rng.random_range(0..spec.outputs()) as f32)
        .collect();
    (x, y)
}

#[test]
fn evaluation_in_chunks_agrees_with_one_big_batch() {
    // The CNN evaluates in chunks of a few dozen examples; 100 examples take several.
    let spec = builtin::cnn([1, 12, 12], 4);
    let model = Model::new(spec.clone()).unwrap();
    let params = spec.init_params(5);
    let n = 100;
    let (x, y) = random_batch(&spec, n, 9);
    let mut grads = Parameters::zeros(model.layout());
    let batch_loss = model.loss_and_grad(&params, &x, &y, n, &mut grads);
    let metrics = model.evaluate(&params, &x, &y, n);
    assert!(
        (metrics.loss - batch_loss).abs() < 1e-4 * batch_loss.abs().max(1.0),
        "{} vs {batch_loss}",
        metrics.loss
    );
    let out = model.forward(&params, &x, n);
    assert_eq!(out.len(), n * 4);
    let one_by_one: Vec<f32> = (0..n)
        .flat_map(|i| model.forward(&params, &x[i * 144..(i + 1) * 144], 1))
        .collect();
    for (a, b) in out.iter().zip(&one_by_one) {
        assert!((a - b).abs() < 1e-5, "{a} vs {b}");
    }
}

#[test]
fn reused_buffers_give_the_same_gradients_as_fresh_ones() {
    let cnn = builtin::cnn([1, 8, 8], 3);
    let mlp = builtin::mlp(64, 3);
    let grads_of = |spec: &ModelSpec, n: usize| {
        let model = Model::new(spec.clone()).unwrap();
        let (x, y) = random_batch(spec, n, 1);
        let mut g = Parameters::zeros(model.layout());
        let l = model.loss_and_grad(&spec.init_params(2), &x, &y, n, &mut g);
        (l, g)
    };
    // Fresh buffers: a new thread has its own workspace.
    let fresh = std::thread::scope(|s| s.spawn(|| grads_of(&cnn, 4)).join().unwrap());
    // Warm buffers, left larger and differently shaped by other models and batch sizes.
    grads_of(&mlp, 50);
    grads_of(&cnn, 9);
    grads_of(&mlp, 2);
    assert_eq!(grads_of(&cnn, 4), fresh);
}

/// 8x8 images holding one bright bar: horizontal (class 0) or vertical (class 1).
fn bars(n: usize, seed: u64) -> Dataset {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut x = Vec::with_capacity(n * 64);
    let mut y = Vec::with_capacity(n);
    for _ in 0..n {
        let class = rng.random_range(0..2usize);
        let at = rng.random_range(0..8usize);
        for r in 0..8 {
            for c in 0..8 {
                let on = if class == 0 { r == at } else { c == at };
                x.push(if on { 1.0 } else { 0.0 } + rng.random_range(0.0..0.2));
            }
        }
        y.push(class as f32);
    }
    Dataset::new(x, y, 64, 1).unwrap()
}

#[test]
fn the_cnn_learns_to_tell_horizontal_from_vertical_bars() {
    let spec = builtin::cnn([1, 8, 8], 2);
    let model = Model::new(spec.clone()).unwrap();
    let mut params = spec.init_params(0);
    let data = bars(200, 4);
    let plan = Plan {
        epochs: 3,
        ..builtin::default_plan("cnn")
    };
    let report = train(&model, &mut params, &data, &plan, |_| {}).unwrap();
    assert!(report.after.loss < report.before.loss, "{report:?}");
    let test = bars(100, 5);
    let m = model.evaluate(&params, test.features(), test.targets(), test.len());
    assert!(m.accuracy.unwrap() > 0.95, "{m:?}");
}

#[test]
fn the_mlp_learns_the_same_task() {
    let spec = builtin::mlp(64, 2);
    let model = Model::new(spec.clone()).unwrap();
    let mut params = spec.init_params(0);
    let data = bars(400, 6);
    let plan = Plan {
        epochs: 10,
        ..builtin::default_plan("mlp")
    };
    train(&model, &mut params, &data, &plan, |_| {}).unwrap();
    let test = bars(100, 7);
    let m = model.evaluate(&params, test.features(), test.targets(), test.len());
    assert!(m.accuracy.unwrap() > 0.9, "{m:?}");
}

#[test]
fn full_size_paper_models_take_a_step_on_mnist_shaped_batches() {
    for spec in [
        builtin::mlp(784, 10),
        builtin::cnn(builtin::MNIST_SHAPE, 10),
    ] {
        let model = Model::new(spec.clone()).unwrap();
        let params = spec.init_params(0);
        let (x, y) = random_batch(&spec, 10, 3);
        let mut grads = Parameters::zeros(model.layout());
        let l = model.loss_and_grad(&params, &x, &y, 10, &mut grads);
        // Ten classes at initialisation: the loss is near ln 10.
        assert!((l - 10f32.ln()).abs() < 1.0, "{}: loss {l}", spec.name);
        for (name, g) in grads.iter() {
            assert!(g.data().iter().all(|v| v.is_finite()), "{name}");
            assert!(g.data().iter().any(|&v| v != 0.0), "{name} has no gradient");
        }
    }
}
