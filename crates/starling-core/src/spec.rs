//! The JSON model spec: the architecture that travels with the weights, so a device trains a
//! new model without a code change (the role the original demo's exported TensorFlow graph had).

use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::params::{Layout, Parameters};
use crate::tensor::Tensor;

/// Errors in a model spec.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SpecError {
    /// The JSON could not be parsed.
    #[error("invalid model spec JSON: {0}")]
    Json(String),
    /// The spec is structurally wrong.
    #[error("invalid model spec: {0}")]
    Invalid(String),
}

/// How a parameter tensor starts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Init {
    /// Every value is `value`.
    Constant {
        /// The value.
        value: f32,
    },
    /// Zeros.
    Zeros,
    /// Glorot (Xavier) uniform: U(-l, l) with l = sqrt(6 / (fan_in + fan_out)).
    GlorotUniform,
}

/// One layer of a sequential model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum LayerSpec {
    /// `y = x W + b`, with `W` of shape `[inputs, units]` and `b` of shape `[units]`.
    Dense {
        /// Output width.
        units: usize,
        /// Name of the weight tensor (default `dense{i}.weight`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        weight: Option<String>,
        /// Name of the bias tensor (default `dense{i}.bias`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        bias: Option<String>,
        /// Initialiser of the weight.
        #[serde(default = "default_weight_init")]
        weight_init: Init,
        /// Initialiser of the bias.
        #[serde(default = "default_bias_init")]
        bias_init: Init,
    },
    /// Element-wise `max(0, x)`.
    Relu,
    /// Element-wise logistic sigmoid.
    Sigmoid,
    /// Element-wise hyperbolic tangent.
    Tanh,
}

fn default_weight_init() -> Init {
    Init::GlorotUniform
}

fn default_bias_init() -> Init {
    Init::Zeros
}

/// The loss a model is trained with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LossSpec {
    /// Mean squared error over every output of every example (TensorFlow's
    /// `reduce_mean(square(output - target))`); targets are real-valued columns.
    Mse,
    /// Softmax cross-entropy averaged over the batch; the target is one column holding the
    /// class index.
    SoftmaxCrossEntropy,
}

/// A sequential model: inputs, layers, loss.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelSpec {
    /// A short name (`linear`, `logistic`, …).
    pub name: String,
    /// Number of input features.
    pub inputs: usize,
    /// The layers, applied in order.
    pub layers: Vec<LayerSpec>,
    /// The loss.
    pub loss: LossSpec,
}

impl ModelSpec {
    /// Parses and checks a spec from JSON.
    pub fn from_json(json: &str) -> Result<Self, SpecError> {
        let spec: ModelSpec =
            serde_json::from_str(json).map_err(|e| SpecError::Json(e.to_string()))?;
        spec.validate()?;
        Ok(spec)
    }

    /// The spec as JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("specs always serialize")
    }

    /// Checks widths and names.
    pub fn validate(&self) -> Result<(), SpecError> {
        if self.inputs == 0 {
            return Err(SpecError::Invalid("inputs must be at least 1".into()));
        }
        if !self
            .layers
            .iter()
            .any(|l| matches!(l, LayerSpec::Dense { .. }))
        {
            return Err(SpecError::Invalid(
                "a model needs at least one dense layer".into(),
            ));
        }
        for l in &self.layers {
            if let LayerSpec::Dense { units: 0, .. } = l {
                return Err(SpecError::Invalid(
                    "a dense layer needs at least 1 unit".into(),
                ));
            }
        }
        if self.loss == LossSpec::SoftmaxCrossEntropy && self.outputs() < 2 {
            return Err(SpecError::Invalid(
                "softmax cross-entropy needs at least 2 outputs (classes)".into(),
            ));
        }
        let layout = self.layout();
        for (i, (name, _)) in layout.entries().iter().enumerate() {
            if layout.entries()[..i].iter().any(|(n, _)| n == name) {
                return Err(SpecError::Invalid(format!(
                    "parameter name `{name}` is used twice"
                )));
            }
        }
        Ok(())
    }

    /// The width of the model's output.
    pub fn outputs(&self) -> usize {
        self.layers
            .iter()
            .rev()
            .find_map(|l| match l {
                LayerSpec::Dense { units, .. } => Some(*units),
                _ => None,
            })
            .unwrap_or(self.inputs)
    }

    /// How many target columns a data set for this model has.
    pub fn target_width(&self) -> usize {
        match self.loss {
            LossSpec::Mse => self.outputs(),
            LossSpec::SoftmaxCrossEntropy => 1,
        }
    }

    /// For each dense layer: `(layer index, weight name, bias name, inputs, units)`.
    pub fn dense_layers(&self) -> Vec<(usize, String, String, usize, usize)> {
        let mut width = self.inputs;
        let mut out = Vec::new();
        for (i, l) in self.layers.iter().enumerate() {
            if let LayerSpec::Dense {
                units,
                weight,
                bias,
                ..
            } = l
            {
                let w = weight.clone().unwrap_or_else(|| format!("dense{i}.weight"));
                let b = bias.clone().unwrap_or_else(|| format!("dense{i}.bias"));
                out.push((i, w, b, width, *units));
                width = *units;
            }
        }
        out
    }

    /// The parameter layout this spec defines.
    pub fn layout(&self) -> Layout {
        Layout::new(
            self.dense_layers()
                .into_iter()
                .flat_map(|(_, w, b, inp, units)| [(w, vec![inp, units]), (b, vec![units])])
                .collect(),
        )
    }

    /// Fresh parameters from the spec's initialisers, seeded.
    pub fn init_params(&self, seed: u64) -> Parameters {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut tensors = Vec::new();
        for (i, w, b, inp, units) in self.dense_layers() {
            let LayerSpec::Dense {
                weight_init,
                bias_init,
                ..
            } = &self.layers[i]
            else {
                unreachable!("dense_layers only lists dense layers")
            };
            for (name, shape, init) in [
                (w, vec![inp, units], weight_init),
                (b, vec![units], bias_init),
            ] {
                let t = match init {
                    Init::Constant { value } => Tensor::full(shape, *value),
                    Init::Zeros => Tensor::zeros(shape),
                    Init::GlorotUniform => {
                        let limit = (6.0 / (inp + units) as f32).sqrt();
                        let n = shape.iter().product();
                        let data = (0..n).map(|_| rng.random_range(-limit..=limit)).collect();
                        Tensor::new(shape, data).unwrap()
                    }
                };
                tensors.push((name, t));
            }
        }
        Parameters::new(tensors).expect("validated specs have unique names")
    }
}
