//! Built-in models. `linear` is the original demo's model: `y = x W + b` with `W` and `b`
//! starting at 5 and 3, mean squared error, learning rate 0.01. `mlp` and `cnn` are the two
//! MNIST models of the FedAvg paper (McMahan et al., 2017, "Communication-Efficient Learning
//! of Deep Networks from Decentralized Data"): the "2NN" and the "CNN". `lstm` is the same
//! paper's character model for Shakespeare.

use crate::trainer::spec::{Init, LayerSpec, LossSpec, ModelSpec, Padding};
use crate::trainer::train::Plan;

/// The names of the built-in models.
pub const NAMES: &[&str] = &["linear", "logistic", "mlp", "cnn", "lstm"];

/// The shape of an MNIST or Fashion-MNIST image: one channel of 28 x 28 pixels.
pub const MNIST_SHAPE: [usize; 3] = [1, 28, 28];

/// The original demo's linear regression for `inputs` features and `outputs` targets:
/// parameters `W` (all 5) and `b` (all 3), MSE.
pub fn linear(inputs: usize, outputs: usize) -> ModelSpec {
    ModelSpec {
        name: "linear".into(),
        inputs,
        input_shape: None,
        layers: vec![LayerSpec::Dense {
            units: outputs,
            weight: Some("W".into()),
            bias: Some("b".into()),
            weight_init: Init::Constant { value: 5.0 },
            bias_init: Init::Constant { value: 3.0 },
        }],
        loss: LossSpec::Mse,
        external: None,
    }
}

/// Softmax (multinomial logistic) regression: parameters `W` and `b` starting at zero,
/// softmax cross-entropy; the target column holds the class index.
pub fn logistic(inputs: usize, classes: usize) -> ModelSpec {
    ModelSpec {
        name: "logistic".into(),
        inputs,
        input_shape: None,
        layers: vec![LayerSpec::Dense {
            units: classes,
            weight: Some("W".into()),
            bias: Some("b".into()),
            weight_init: Init::Zeros,
            bias_init: Init::Zeros,
        }],
        loss: LossSpec::SoftmaxCrossEntropy,
        external: None,
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

/// The FedAvg paper's "2NN": two hidden layers of 200 ReLU units, then `classes` logits,
/// softmax cross-entropy (199,210 parameters for MNIST's 784 inputs and 10 classes).
/// Parameters `dense0.*`, `dense2.*`, `dense4.*`, Glorot-uniform weights, zero biases.
pub fn mlp(inputs: usize, classes: usize) -> ModelSpec {
    ModelSpec {
        name: "mlp".into(),
        inputs,
        input_shape: None,
        layers: vec![
            dense(200),
            LayerSpec::Relu,
            dense(200),
            LayerSpec::Relu,
            dense(classes),
        ],
        loss: LossSpec::SoftmaxCrossEntropy,
        external: None,
    }
}

/// The FedAvg paper's CNN on images of `input_shape` (`[channels, height, width]`; MNIST is
/// [`MNIST_SHAPE`]): 5x5 convolution with 32 filters (`same` padding) + ReLU + 2x2 max-pool,
/// 5x5 convolution with 64 filters (`same`) + ReLU + 2x2 max-pool, flatten, dense 512 +
/// ReLU, dense `classes`, softmax cross-entropy (1,663,370 parameters for MNIST).
/// Parameters `conv0.*`, `conv3.*`, `dense7.*`, `dense9.*`.
pub fn cnn(input_shape: [usize; 3], classes: usize) -> ModelSpec {
    let conv = |filters| LayerSpec::Conv2d {
        filters,
        kernel: 5,
        stride: 1,
        padding: Padding::Same,
        weight: None,
        bias: None,
        weight_init: Init::GlorotUniform,
        bias_init: Init::Zeros,
    };
    let pool = || LayerSpec::MaxPool {
        size: 2,
        stride: None,
    };
    ModelSpec {
        name: "cnn".into(),
        inputs: input_shape.iter().product(),
        input_shape: Some(input_shape.to_vec()),
        layers: vec![
            conv(32),
            LayerSpec::Relu,
            pool(),
            conv(64),
            LayerSpec::Relu,
            pool(),
            LayerSpec::Flatten,
            dense(512),
            LayerSpec::Relu,
            dense(classes),
        ],
        loss: LossSpec::SoftmaxCrossEntropy,
        external: None,
    }
}

/// The FedAvg paper's character model unrolled over `steps` characters of a vocabulary of
/// `vocab`: an 8-dimensional embedding, two LSTM layers of 256 units, and at every step a
/// dense layer over the vocabulary with softmax cross-entropy against the character that
/// follows (each example has `steps` targets: [`crate::data::datasets::shakespeare::Role::sequences`]).
/// 818,137 parameters for LEAF's 81 characters; the paper, with its own vocabulary, reports
/// 866,578. Parameters `embedding0.weight`, `lstm1.*`, `lstm2.*`, `dense3.*`.
pub fn lstm(vocab: usize, steps: usize) -> ModelSpec {
    let layer = |return_sequences| LayerSpec::Lstm {
        units: 256,
        return_sequences,
        weight: None,
        recurrent: None,
        bias: None,
        weight_init: Init::GlorotUniform,
        bias_init: Init::Zeros,
    };
    ModelSpec {
        name: "lstm".into(),
        inputs: steps,
        input_shape: None,
        layers: vec![
            LayerSpec::Embedding {
                vocab,
                width: 8,
                table: None,
                table_init: Init::GlorotUniform,
            },
            layer(true),
            layer(true),
            dense(vocab),
        ],
        loss: LossSpec::SoftmaxCrossEntropy,
        external: None,
    }
}

/// The default plan of a built-in model: the demo's learning rate 0.01 for `linear`,
/// 0.1 for `logistic`; for `mlp` and `cnn` the FedAvg paper's local batch size 10 and one
/// epoch, learning rate 0.05.
pub fn default_plan(name: &str) -> Plan {
    match name {
        "linear" => Plan {
            learning_rate: 0.01,
            ..Plan::default()
        },
        "mlp" | "cnn" => Plan {
            learning_rate: 0.05,
            batch_size: 10,
            epochs: 1,
            ..Plan::default()
        },
        // The paper's best FedAvg learning rate for Shakespeare is 1.47; on this model's loss
        // (the mean over every step's prediction) it stayed on the unigram plateau (test
        // accuracy 0.163) for 44 rounds of 102 roles, where 4 learns (README, the Shakespeare
        // simulation). 8 diverges: big roles take tens of steps a round.
        "lstm" => Plan {
            learning_rate: 4.0,
            batch_size: 10,
            epochs: 1,
            ..Plan::default()
        },
        _ => Plan {
            learning_rate: 0.1,
            ..Plan::default()
        },
    }
}

/// The side `s` of a square single-channel image of `inputs` pixels, if there is one that
/// the CNN's two 2x2 poolings leave at least one pixel of.
fn square_side(inputs: usize) -> Option<usize> {
    let s = (inputs as f64).sqrt().round() as usize;
    (s * s == inputs && s >= 4).then_some(s)
}

/// A built-in model by name, sized for `inputs` features and `outputs` outputs (classes for
/// `logistic`, `mlp` and `cnn`; for `lstm`, `inputs` characters and a vocabulary of
/// `outputs`). `cnn` reads the `inputs` features as a square
/// single-channel image (784 → [`MNIST_SHAPE`]) and is `None` when `inputs` is not the
/// square of a side of at least 4; use [`cnn`] for other shapes. `None` for unknown names.
pub fn by_name(name: &str, inputs: usize, outputs: usize) -> Option<ModelSpec> {
    match name {
        "linear" => Some(linear(inputs, outputs)),
        "logistic" => Some(logistic(inputs, outputs)),
        "mlp" => Some(mlp(inputs, outputs)),
        "cnn" => square_side(inputs).map(|s| cnn([1, s, s], outputs)),
        "lstm" => Some(lstm(outputs, inputs)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paper_models_have_the_papers_parameter_counts() {
        let mlp = mlp(784, 10);
        mlp.validate().unwrap();
        assert_eq!(
            mlp.layout().numel(),
            784 * 200 + 200 + 200 * 200 + 200 + 200 * 10 + 10
        );
        assert_eq!(mlp.layout().numel(), 199_210);
        let cnn = cnn(MNIST_SHAPE, 10);
        cnn.validate().unwrap();
        let shapes = cnn.shapes().unwrap();
        assert_eq!(shapes[3], vec![32, 14, 14]);
        assert_eq!(shapes[7], vec![64 * 7 * 7]);
        assert_eq!(
            cnn.layout().numel(),
            32 * 25 + 32 + 64 * 32 * 25 + 64 + 3136 * 512 + 512 + 512 * 10 + 10
        );
        assert_eq!(cnn.layout().numel(), 1_663_370);
        let layout = cnn.layout();
        let names: Vec<&str> = layout.entries().iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "conv0.weight",
                "conv0.bias",
                "conv3.weight",
                "conv3.bias",
                "dense7.weight",
                "dense7.bias",
                "dense9.weight",
                "dense9.bias"
            ]
        );
        assert_eq!(cnn.layout().entries()[2].1, vec![64, 32, 5, 5]);
        let lstm = lstm(81, 80);
        lstm.validate().unwrap();
        assert_eq!(
            lstm.layout().numel(),
            81 * 8 + 4 * 256 * (8 + 256 + 1) + 4 * 256 * (256 + 256 + 1) + 256 * 81 + 81
        );
        assert_eq!(lstm.layout().numel(), 818_137);
        let names: Vec<String> = lstm
            .layout()
            .entries()
            .iter()
            .map(|(n, _)| n.clone())
            .collect();
        assert_eq!(
            names,
            [
                "embedding0.weight",
                "lstm1.weight",
                "lstm1.recurrent",
                "lstm1.bias",
                "lstm2.weight",
                "lstm2.recurrent",
                "lstm2.bias",
                "dense3.weight",
                "dense3.bias"
            ]
        );
    }

    #[test]
    fn by_name_knows_every_name_and_sizes_the_cnn_from_square_inputs() {
        for name in NAMES {
            let spec = by_name(name, 784, 10).unwrap();
            assert_eq!(spec.name, *name);
            spec.validate().unwrap();
            assert_eq!(spec.inputs, 784);
            assert_eq!(spec.outputs(), 10);
        }
        assert_eq!(by_name("cnn", 784, 10), Some(cnn(MNIST_SHAPE, 10)));
        assert_eq!(
            by_name("cnn", 16, 3).unwrap().input_shape,
            Some(vec![1, 4, 4])
        );
        assert_eq!(by_name("cnn", 785, 10), None);
        assert_eq!(by_name("cnn", 9, 10), None);
        assert_eq!(by_name("resnet", 784, 10), None);
        assert_eq!(default_plan("cnn").batch_size, 10);
        assert_eq!(default_plan("linear").learning_rate, 0.01);
    }
}
