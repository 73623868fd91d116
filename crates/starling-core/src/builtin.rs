//! Built-in models. `linear` is the original demo's model: `y = x W + b` with `W` and `b`
//! starting at 5 and 3, mean squared error, learning rate 0.01.

use crate::spec::{Init, LayerSpec, LossSpec, ModelSpec};
use crate::train::Plan;

/// The names of the built-in models.
pub const NAMES: &[&str] = &["linear", "logistic"];

/// The original demo's linear regression for `inputs` features and `outputs` targets:
/// parameters `W` (all 5) and `b` (all 3), MSE.
pub fn linear(inputs: usize, outputs: usize) -> ModelSpec {
    ModelSpec {
        name: "linear".into(),
        inputs,
        layers: vec![LayerSpec::Dense {
            units: outputs,
            weight: Some("W".into()),
            bias: Some("b".into()),
            weight_init: Init::Constant { value: 5.0 },
            bias_init: Init::Constant { value: 3.0 },
        }],
        loss: LossSpec::Mse,
    }
}

/// Softmax (multinomial logistic) regression: parameters `W` and `b` starting at zero,
/// softmax cross-entropy; the target column holds the class index.
pub fn logistic(inputs: usize, classes: usize) -> ModelSpec {
    ModelSpec {
        name: "logistic".into(),
        inputs,
        layers: vec![LayerSpec::Dense {
            units: classes,
            weight: Some("W".into()),
            bias: Some("b".into()),
            weight_init: Init::Zeros,
            bias_init: Init::Zeros,
        }],
        loss: LossSpec::SoftmaxCrossEntropy,
    }
}

/// The default plan of a built-in model: the demo's learning rate 0.01 for `linear`,
/// 0.1 for `logistic`.
pub fn default_plan(name: &str) -> Plan {
    Plan {
        learning_rate: if name == "linear" { 0.01 } else { 0.1 },
        ..Plan::default()
    }
}

/// A built-in model by name, sized for `inputs` features and `outputs` outputs (classes for
/// `logistic`).
pub fn by_name(name: &str, inputs: usize, outputs: usize) -> Option<ModelSpec> {
    match name {
        "linear" => Some(linear(inputs, outputs)),
        "logistic" => Some(logistic(inputs, outputs)),
        _ => None,
    }
}
