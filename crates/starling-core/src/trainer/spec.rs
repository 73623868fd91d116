//! The JSON model spec: the architecture that travels with the weights, so a device trains a
//! new model without a code change (the role the original demo's exported TensorFlow graph had).

use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::tensor::{numel, Tensor};
use crate::trainer::layers::{conv, pool};
use crate::wire::params::{Layout, Parameters};

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

/// Zero padding of a convolution, as in TensorFlow and Keras.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Padding {
    /// Pad with zeros so that the output has `ceil(input / stride)` rows and columns; when the
    /// padding is odd, the extra row (column) goes at the bottom (right), as in TensorFlow.
    Same,
    /// No padding: only windows that lie wholly inside the input, `(input - kernel) / stride
    /// + 1` rows and columns.
    Valid,
}

/// One layer of a sequential model.
///
/// Data flows between layers as a batch of examples, each a row-major tensor of the shape
/// [`ModelSpec::shapes`] gives: `[features]` for dense layers, `[channels, height, width]`
/// (NCHW over the batch) for convolutions and pooling. A dense layer needs a one-dimensional
/// input, so a `flatten` must come between the last convolution or pooling layer and the
/// first dense layer after it: the spec says where the image becomes a vector, instead of
/// the trainer guessing.
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
    /// Two-dimensional convolution (cross-correlation, as in every framework) of a
    /// `[channels, height, width]` input with `filters` square kernels: weight of shape
    /// `[filters, channels, kernel, kernel]`, bias of shape `[filters]`, output
    /// `[filters, out_height, out_width]`.
    Conv2d {
        /// Number of output channels.
        filters: usize,
        /// Side of the square kernel.
        kernel: usize,
        /// Step between windows, in both directions (default 1).
        #[serde(default = "default_stride")]
        stride: usize,
        /// `same` or `valid`.
        padding: Padding,
        /// Name of the weight tensor (default `conv{i}.weight`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        weight: Option<String>,
        /// Name of the bias tensor (default `conv{i}.bias`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        bias: Option<String>,
        /// Initialiser of the weight (Glorot uses fan-in `channels k k` and fan-out
        /// `filters k k`).
        #[serde(default = "default_weight_init")]
        weight_init: Init,
        /// Initialiser of the bias.
        #[serde(default = "default_bias_init")]
        bias_init: Init,
    },
    /// Max pooling over square `size x size` windows of each channel of a
    /// `[channels, height, width]` input; only windows wholly inside the input count
    /// (TensorFlow's `valid`).
    MaxPool {
        /// Side of the square window.
        size: usize,
        /// Step between windows (default: `size`, non-overlapping windows).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        stride: Option<usize>,
    },
    /// Turns any input shape into one dimension (no data moves: the layout is row-major).
    Flatten,
    /// Element-wise `max(0, x)`.
    Relu,
    /// Element-wise logistic sigmoid.
    Sigmoid,
    /// Element-wise hyperbolic tangent.
    Tanh,
    /// Tokens to vectors: each of the example's `steps` features is a token index in
    /// `0..vocab` and becomes a row of the table (shape `[vocab, width]`); the output is the
    /// sequence `[steps, width]`. Only as the first layer.
    Embedding {
        /// Number of tokens.
        vocab: usize,
        /// Values per token.
        width: usize,
        /// Name of the table (default `embedding{i}.weight`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        table: Option<String>,
        /// Initialiser of the table.
        #[serde(default = "default_weight_init")]
        table_init: Init,
    },
    /// A long short-term memory layer over a sequence `[steps, inputs]` (from an embedding
    /// or an LSTM that returns sequences): weight `[inputs, 4 units]`, recurrent weight
    /// `[units, 4 units]`, bias `[4 units]`, gates in the order input, forget, cell, output.
    /// The output is every step's hidden state, `[steps, units]`, with `return_sequences`,
    /// else the last step's, `[units]`.
    Lstm {
        /// Hidden units.
        units: usize,
        /// Output every step's hidden state (to feed another LSTM) rather than the last.
        #[serde(default)]
        return_sequences: bool,
        /// Name of the input weight (default `lstm{i}.weight`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        weight: Option<String>,
        /// Name of the recurrent weight (default `lstm{i}.recurrent`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        recurrent: Option<String>,
        /// Name of the bias (default `lstm{i}.bias`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        bias: Option<String>,
        /// Initialiser of both weights.
        #[serde(default = "default_weight_init")]
        weight_init: Init,
        /// Initialiser of the bias.
        #[serde(default = "default_bias_init")]
        bias_init: Init,
    },
}

fn default_stride() -> usize {
    1
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
    /// Number of input features: the product of `input_shape` when that is given.
    pub inputs: usize,
    /// The shape of one example, e.g. `[1, 28, 28]` (channels, height, width) for an image
    /// model; absent for a flat vector of `inputs` features. Features arrive row-major, so an
    /// image is its pixels channel by channel, row by row.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_shape: Option<Vec<usize>>,
    /// The layers, applied in order.
    pub layers: Vec<LayerSpec>,
    /// The loss.
    pub loss: LossSpec,
    /// A model brought from outside ("bring your own model"): only its tensors' names and
    /// shapes, in this order, taken from an initial checkpoint; no layers (`layers` is empty)
    /// and no built-in trainer. Devices train it with their own framework through an SDK
    /// (Python, JNI, C) and submit weights; the server averages it like any other.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external: Option<Vec<TensorSpec>>,
}

/// One tensor of an external model: its name and shape (F32).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorSpec {
    /// The tensor's name, as in the checkpoint (`dense1.weight`, `fc.bias`...).
    pub name: String,
    /// Its shape.
    pub shape: Vec<usize>,
}

/// The name of the spec of a model brought from outside.
pub const EXTERNAL: &str = "external";

impl ModelSpec {
    /// The spec of a model brought from outside: these tensors, no layers, no built-in
    /// trainer.
    pub fn external(tensors: Vec<TensorSpec>) -> Self {
        Self {
            name: EXTERNAL.into(),
            inputs: 1,
            input_shape: None,
            layers: Vec::new(),
            loss: LossSpec::Mse,
            external: Some(tensors),
        }
    }

    /// Whether the model is brought from outside (trained only through an SDK).
    pub fn is_external(&self) -> bool {
        self.external.is_some()
    }

    fn validate_external(tensors: &[TensorSpec], layers: usize) -> Result<(), SpecError> {
        if layers > 0 {
            return Err(SpecError::Invalid(
                "an external model has tensors, not layers".into(),
            ));
        }
        if tensors.is_empty() {
            return Err(SpecError::Invalid(
                "an external model needs at least one tensor".into(),
            ));
        }
        for (i, t) in tensors.iter().enumerate() {
            if t.name.is_empty() || t.shape.contains(&0) {
                return Err(SpecError::Invalid(format!(
                    "external tensor {i} (`{}`, shape {:?}) needs a name and no empty dimension",
                    t.name, t.shape
                )));
            }
            if tensors[..i].iter().any(|o| o.name == t.name) {
                return Err(SpecError::Invalid(format!(
                    "parameter name `{}` is used twice",
                    t.name
                )));
            }
        }
        Ok(())
    }
}

/// A parameter tensor of a layer, resolved against the shape of the layer's input.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ParamEntry {
    pub name: String,
    pub shape: Vec<usize>,
    pub init: Init,
    /// Inputs and outputs each value contributes to, for Glorot initialisation.
    pub fans: (usize, usize),
}

/// One layer resolved against its input: the shapes in and out, and its parameters (weight
/// first, then bias).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Resolved {
    pub input: Vec<usize>,
    pub output: Vec<usize>,
    pub params: Vec<ParamEntry>,
}

/// The `[channels, height, width]` of a shape, or an error naming the layer.
fn image_dims(i: usize, kind: &str, shape: &[usize]) -> Result<[usize; 3], SpecError> {
    match *shape {
        [c, h, w] => Ok([c, h, w]),
        _ => Err(SpecError::Invalid(format!(
            "layer {i} ({kind}) needs a [channels, height, width] input, got shape {shape:?} \
             (set input_shape, and do not put {kind} after flatten or dense)"
        ))),
    }
}

fn at_least_one(i: usize, kind: &str, what: &str, v: usize) -> Result<(), SpecError> {
    if v == 0 {
        return Err(SpecError::Invalid(format!(
            "layer {i} ({kind}): {what} must be at least 1"
        )));
    }
    Ok(())
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

    /// The shape of one example: `input_shape`, or `[inputs]` when that is absent.
    pub fn input_dims(&self) -> Vec<usize> {
        self.input_shape
            .clone()
            .unwrap_or_else(|| vec![self.inputs])
    }

    /// The shape of one example before the first layer and after each layer, in order (so
    /// `layers.len() + 1` shapes).
    pub fn shapes(&self) -> Result<Vec<Vec<usize>>, SpecError> {
        let (resolved, result) = self.resolve();
        result?;
        let mut shapes = vec![self.input_dims()];
        shapes.extend(resolved.into_iter().map(|r| r.output));
        Ok(shapes)
    }

    /// Resolves the layers in order against the input shape, stopping at the first layer
    /// that does not fit; the error says which.
    pub(crate) fn resolve(&self) -> (Vec<Resolved>, Result<(), SpecError>) {
        let mut out = Vec::with_capacity(self.layers.len());
        let mut shape = self.input_dims();
        // Whether the data is a sequence stored step by step (after an embedding or an LSTM
        // that returns sequences): only LSTMs and element-wise layers take it.
        let mut sequence = false;
        for (i, layer) in self.layers.iter().enumerate() {
            if let Err(e) = Self::check_sequence(i, layer, sequence) {
                return (out, Err(e));
            }
            sequence = Self::sequence_after(layer, sequence);
            match Self::resolve_layer(i, layer, &shape) {
                Ok((output, params)) => {
                    out.push(Resolved {
                        input: std::mem::replace(&mut shape, output.clone()),
                        output,
                        params,
                    });
                }
                Err(e) => return (out, Err(e)),
            }
        }
        (out, Ok(()))
    }

    /// Refuses a layer that cannot take (or needs) a step-by-step sequence.
    fn check_sequence(i: usize, layer: &LayerSpec, sequence: bool) -> Result<(), SpecError> {
        match layer {
            LayerSpec::Embedding { .. } if i > 0 => Err(SpecError::Invalid(format!(
                "layer {i} (embedding): an embedding takes the tokens, so it is the first layer"
            ))),
            LayerSpec::Lstm { .. } if !sequence => Err(SpecError::Invalid(format!(
                "layer {i} (lstm) needs a sequence: put an embedding, or an lstm with \
                 return_sequences, before it"
            ))),
            LayerSpec::Conv2d { .. } | LayerSpec::MaxPool { .. } | LayerSpec::Flatten
                if sequence =>
            {
                Err(SpecError::Invalid(format!(
                    "layer {i} gets a whole sequence; only lstm, dense (applied to each step) \
                     and element-wise layers take one: end the recurrent layers with an lstm \
                     without return_sequences (its last step) first"
                )))
            }
            _ => Ok(()),
        }
    }

    fn resolve_layer(
        i: usize,
        layer: &LayerSpec,
        shape: &[usize],
    ) -> Result<(Vec<usize>, Vec<ParamEntry>), SpecError> {
        let named = |given: &Option<String>, default: String| given.clone().unwrap_or(default);
        Ok(match layer {
            LayerSpec::Dense {
                units,
                weight,
                bias,
                weight_init,
                bias_init,
            } => {
                at_least_one(i, "dense", "units", *units)?;
                // A vector, or a sequence [steps, width] (from an embedding or an lstm with
                // return_sequences: the same weights applied to each step).
                let (steps, inputs) = match *shape {
                    [inputs] => (None, inputs),
                    [steps, inputs] => (Some(steps), inputs),
                    _ => {
                        return Err(SpecError::Invalid(format!(
                            "layer {i} (dense) gets an input of shape {shape:?}; \
                             put a `flatten` layer before it"
                        )))
                    }
                };
                let fans = (inputs, *units);
                let params = vec![
                    ParamEntry {
                        name: named(weight, format!("dense{i}.weight")),
                        shape: vec![inputs, *units],
                        init: weight_init.clone(),
                        fans,
                    },
                    ParamEntry {
                        name: named(bias, format!("dense{i}.bias")),
                        shape: vec![*units],
                        init: bias_init.clone(),
                        fans,
                    },
                ];
                let output = match steps {
                    Some(steps) => vec![steps, *units],
                    None => vec![*units],
                };
                (output, params)
            }
            LayerSpec::Conv2d {
                filters,
                kernel,
                stride,
                padding,
                weight,
                bias,
                weight_init,
                bias_init,
            } => {
                let [c, h, w] = image_dims(i, "conv2d", shape)?;
                at_least_one(i, "conv2d", "filters", *filters)?;
                at_least_one(i, "conv2d", "kernel", *kernel)?;
                at_least_one(i, "conv2d", "stride", *stride)?;
                let too_small = || {
                    SpecError::Invalid(format!(
                        "layer {i} (conv2d): a {kernel}x{kernel} kernel with valid padding \
                         does not fit a {h}x{w} input"
                    ))
                };
                let (oh, _) =
                    conv::output_size(h, *kernel, *stride, *padding).ok_or_else(too_small)?;
                let (ow, _) =
                    conv::output_size(w, *kernel, *stride, *padding).ok_or_else(too_small)?;
                let kk = kernel * kernel;
                let fans = (c * kk, filters * kk);
                let params = vec![
                    ParamEntry {
                        name: named(weight, format!("conv{i}.weight")),
                        shape: vec![*filters, c, *kernel, *kernel],
                        init: weight_init.clone(),
                        fans,
                    },
                    ParamEntry {
                        name: named(bias, format!("conv{i}.bias")),
                        shape: vec![*filters],
                        init: bias_init.clone(),
                        fans,
                    },
                ];
                (vec![*filters, oh, ow], params)
            }
            LayerSpec::MaxPool { size, stride } => {
                let [c, h, w] = image_dims(i, "max_pool", shape)?;
                at_least_one(i, "max_pool", "size", *size)?;
                let stride = stride.unwrap_or(*size);
                at_least_one(i, "max_pool", "stride", stride)?;
                let too_small = || {
                    SpecError::Invalid(format!(
                        "layer {i} (max_pool): a {size}x{size} window does not fit a {h}x{w} input"
                    ))
                };
                let oh = pool::output_size(h, *size, stride).ok_or_else(too_small)?;
                let ow = pool::output_size(w, *size, stride).ok_or_else(too_small)?;
                (vec![c, oh, ow], Vec::new())
            }
            LayerSpec::Embedding {
                vocab,
                width,
                table,
                table_init,
            } => {
                at_least_one(i, "embedding", "vocab", *vocab)?;
                at_least_one(i, "embedding", "width", *width)?;
                let &[steps] = shape else {
                    return Err(SpecError::Invalid(format!(
                        "layer {i} (embedding) takes one token per feature, got an input of \
                         shape {shape:?}"
                    )));
                };
                let params = vec![ParamEntry {
                    name: named(table, format!("embedding{i}.weight")),
                    shape: vec![*vocab, *width],
                    init: table_init.clone(),
                    fans: (*vocab, *width),
                }];
                (vec![steps, *width], params)
            }
            LayerSpec::Lstm {
                units,
                return_sequences,
                weight,
                recurrent,
                bias,
                weight_init,
                bias_init,
            } => {
                at_least_one(i, "lstm", "units", *units)?;
                let &[steps, inputs] = shape else {
                    return Err(SpecError::Invalid(format!(
                        "layer {i} (lstm) needs a sequence [steps, width], got {shape:?}"
                    )));
                };
                let gates = 4 * units;
                let params = vec![
                    ParamEntry {
                        name: named(weight, format!("lstm{i}.weight")),
                        shape: vec![inputs, gates],
                        init: weight_init.clone(),
                        fans: (inputs, gates),
                    },
                    ParamEntry {
                        name: named(recurrent, format!("lstm{i}.recurrent")),
                        shape: vec![*units, gates],
                        init: weight_init.clone(),
                        fans: (*units, gates),
                    },
                    ParamEntry {
                        name: named(bias, format!("lstm{i}.bias")),
                        shape: vec![gates],
                        init: bias_init.clone(),
                        fans: (inputs, gates),
                    },
                ];
                let output = if *return_sequences {
                    vec![steps, *units]
                } else {
                    vec![*units]
                };
                (output, params)
            }
            LayerSpec::Flatten => (vec![numel(shape)], Vec::new()),
            LayerSpec::Relu | LayerSpec::Sigmoid | LayerSpec::Tanh => (shape.to_vec(), Vec::new()),
        })
    }

    /// Checks shapes, widths and names.
    pub fn validate(&self) -> Result<(), SpecError> {
        if let Some(tensors) = &self.external {
            return Self::validate_external(tensors, self.layers.len());
        }
        if self.inputs == 0 {
            return Err(SpecError::Invalid("inputs must be at least 1".into()));
        }
        if let Some(shape) = &self.input_shape {
            if shape.is_empty() || shape.contains(&0) {
                return Err(SpecError::Invalid(format!(
                    "input_shape {shape:?} must have at least one dimension, none of them 0"
                )));
            }
            if numel(shape) != self.inputs {
                return Err(SpecError::Invalid(format!(
                    "input_shape {shape:?} holds {} values but inputs is {}",
                    numel(shape),
                    self.inputs
                )));
            }
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
        let (resolved, result) = self.resolve();
        result?;
        let output = &resolved.last().expect("at least one dense layer").output;
        // A vector, or a sequence with a prediction at every step.
        if output.len() != 1 && !(output.len() == 2 && self.ends_in_sequence()) {
            return Err(SpecError::Invalid(format!(
                "the model's output has shape {output:?}; end with a dense layer"
            )));
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
                LayerSpec::Dense { units, .. } | LayerSpec::Lstm { units, .. } => Some(*units),
                _ => None,
            })
            .unwrap_or(self.inputs)
    }

    /// Predictions per example: 1, or for a model that ends in a sequence (its last
    /// recurrent layer returns every step) one per step, each [`ModelSpec::outputs`] wide.
    pub fn output_steps(&self) -> usize {
        match self.resolve() {
            (resolved, Ok(())) => match resolved.last().map(|r| r.output.as_slice()) {
                Some(&[steps, _]) if self.ends_in_sequence() => steps,
                _ => 1,
            },
            _ => 1,
        }
    }

    /// Whether the last layer's output is a sequence (one vector per step).
    fn ends_in_sequence(&self) -> bool {
        self.layers.iter().fold(false, |sequence, layer| {
            Self::sequence_after(layer, sequence)
        })
    }

    /// Whether a layer's output is a sequence stored step by step, given whether its input
    /// is: an embedding makes one, an lstm keeps one with `return_sequences`, element-wise
    /// layers and dense layers (applied to each step) keep what they get.
    fn sequence_after(layer: &LayerSpec, sequence: bool) -> bool {
        match layer {
            LayerSpec::Embedding { .. } => true,
            LayerSpec::Lstm {
                return_sequences, ..
            } => *return_sequences,
            LayerSpec::Relu | LayerSpec::Sigmoid | LayerSpec::Tanh | LayerSpec::Dense { .. } => {
                sequence
            }
            LayerSpec::Conv2d { .. } | LayerSpec::MaxPool { .. } | LayerSpec::Flatten => false,
        }
    }

    /// How many target columns a data set for this model has: per prediction
    /// ([`ModelSpec::output_steps`]), the outputs (MSE) or one class index (softmax
    /// cross-entropy).
    pub fn target_width(&self) -> usize {
        self.output_steps()
            * match self.loss {
                LossSpec::Mse => self.outputs(),
                LossSpec::SoftmaxCrossEntropy => 1,
            }
    }

    /// The parameters in layout order: layer by layer, each layer's weight then its bias.
    /// Of a spec that fails [`ModelSpec::validate`], only the layers before the first one
    /// that does not fit.
    pub(crate) fn param_entries(&self) -> Vec<ParamEntry> {
        self.resolve()
            .0
            .into_iter()
            .flat_map(|r| r.params)
            .collect()
    }

    /// The parameter layout this spec defines: layer by layer, each layer's weight then its
    /// bias.
    pub fn layout(&self) -> Layout {
        if let Some(tensors) = &self.external {
            return Layout::new(
                tensors
                    .iter()
                    .map(|t| (t.name.clone(), t.shape.clone()))
                    .collect(),
            );
        }
        Layout::new(
            self.param_entries()
                .into_iter()
                .map(|p| (p.name, p.shape))
                .collect(),
        )
    }

    /// Fresh parameters from the spec's initialisers, seeded (zeros for an external model,
    /// whose initial values come from its checkpoint).
    pub fn init_params(&self, seed: u64) -> Parameters {
        if let Some(tensors) = &self.external {
            return Parameters::new(
                tensors
                    .iter()
                    .map(|t| (t.name.clone(), Tensor::zeros(t.shape.clone())))
                    .collect(),
            )
            .expect("validated specs have unique names");
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut tensors = Vec::new();
        for p in self.param_entries() {
            let t = match p.init {
                Init::Constant { value } => Tensor::full(p.shape, value),
                Init::Zeros => Tensor::zeros(p.shape),
                Init::GlorotUniform => {
                    let limit = (6.0 / (p.fans.0 + p.fans.1) as f32).sqrt();
                    let n = numel(&p.shape);
                    let data = (0..n).map(|_| rng.random_range(-limit..=limit)).collect();
                    Tensor::new(p.shape, data).expect("n values for the shape")
                }
            };
            tensors.push((p.name, t));
        }
        Parameters::new(tensors).expect("validated specs have unique names")
    }
}
