//! A sequential model built from a [`ModelSpec`]: forward pass, loss, and gradients.

use crate::layers::activation::Activation;
use crate::layers::dense;
use crate::loss;
use crate::params::{Layout, Parameters};
use crate::spec::{LayerSpec, LossSpec, ModelSpec, SpecError};

#[derive(Debug, Clone)]
enum Op {
    Dense {
        weight: usize,
        bias: usize,
        inputs: usize,
        units: usize,
    },
    Act(Activation),
}

/// A model ready to run: the spec compiled into a list of operations over a parameter set in
/// the spec's layout.
#[derive(Debug, Clone)]
pub struct Model {
    spec: ModelSpec,
    layout: Layout,
    ops: Vec<Op>,
}

/// Loss and, for classifiers, accuracy over a data set.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Metrics {
    /// Mean loss per example.
    pub loss: f32,
    /// Fraction of examples whose largest output is the label (classifiers only).
    pub accuracy: Option<f32>,
}

impl Model {
    /// Compiles a spec.
    pub fn new(spec: ModelSpec) -> Result<Self, SpecError> {
        spec.validate()?;
        let layout = spec.layout();
        let mut dense_seen = 0;
        let mut width = spec.inputs;
        let mut ops = Vec::new();
        for l in &spec.layers {
            ops.push(match l {
                LayerSpec::Dense { units, .. } => {
                    let op = Op::Dense {
                        weight: 2 * dense_seen,
                        bias: 2 * dense_seen + 1,
                        inputs: width,
                        units: *units,
                    };
                    dense_seen += 1;
                    width = *units;
                    op
                }
                LayerSpec::Relu => Op::Act(Activation::Relu),
                LayerSpec::Sigmoid => Op::Act(Activation::Sigmoid),
                LayerSpec::Tanh => Op::Act(Activation::Tanh),
            });
        }
        Ok(Self { spec, layout, ops })
    }

    /// The spec.
    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    /// The parameter layout.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Runs the layers on `n` rows of `x`, keeping every layer's output (the input first).
    fn forward_all(&self, params: &Parameters, x: &[f32], n: usize) -> Vec<Vec<f32>> {
        let mut acts = vec![x.to_vec()];
        for op in &self.ops {
            let input = acts.last().expect("acts starts non-empty");
            let out = match *op {
                Op::Dense {
                    weight,
                    bias,
                    inputs,
                    units,
                } => dense::forward(
                    input,
                    n,
                    params.at(weight).data(),
                    params.at(bias).data(),
                    inputs,
                    units,
                ),
                Op::Act(a) => {
                    let mut y = input.clone();
                    a.forward(&mut y);
                    y
                }
            };
            acts.push(out);
        }
        acts
    }

    /// The model's output for `n` rows of `x`.
    pub fn forward(&self, params: &Parameters, x: &[f32], n: usize) -> Vec<f32> {
        self.forward_all(params, x, n)
            .pop()
            .expect("at least the input")
    }

    /// The batch's mean loss given the model's output, and the gradient of that loss with
    /// respect to the output.
    fn loss(&self, output: &[f32], target: &[f32]) -> (f32, Vec<f32>) {
        let mut grad = vec![0.0; output.len()];
        let l = match self.spec.loss {
            LossSpec::Mse => loss::mse(output, target, &mut grad),
            LossSpec::SoftmaxCrossEntropy => {
                loss::softmax_cross_entropy(output, target, self.spec.outputs(), &mut grad)
            }
        };
        (l, grad)
    }

    /// The mean loss of a batch and its gradient with respect to every parameter, written into
    /// `grads` (same layout as `params`).
    pub fn loss_and_grad(
        &self,
        params: &Parameters,
        x: &[f32],
        target: &[f32],
        n: usize,
        grads: &mut Parameters,
    ) -> f32 {
        let acts = self.forward_all(params, x, n);
        let (l, mut dy) = self.loss(acts.last().expect("output"), target);
        for (i, op) in self.ops.iter().enumerate().rev() {
            match *op {
                Op::Dense {
                    weight,
                    bias,
                    inputs,
                    units,
                } => {
                    let mut dw = std::mem::take(grads.at_mut(weight).data_mut_vec());
                    let mut db = std::mem::take(grads.at_mut(bias).data_mut_vec());
                    let dx = dense::backward(
                        &acts[i],
                        n,
                        params.at(weight).data(),
                        &dy,
                        inputs,
                        units,
                        &mut dw,
                        &mut db,
                        i > 0,
                    );
                    *grads.at_mut(weight).data_mut_vec() = dw;
                    *grads.at_mut(bias).data_mut_vec() = db;
                    match dx {
                        Some(dx) => dy = dx,
                        None => break,
                    }
                }
                Op::Act(a) => a.backward(&acts[i + 1], &mut dy),
            }
        }
        l
    }

    /// Mean loss (and accuracy for classifiers) over `n` rows, evaluated in chunks.
    pub fn evaluate(&self, params: &Parameters, x: &[f32], target: &[f32], n: usize) -> Metrics {
        const CHUNK: usize = 1024;
        let (fw, tw) = (self.spec.inputs, self.spec.target_width());
        let mut loss_sum = 0.0f64;
        let mut correct = 0usize;
        let mut start = 0;
        while start < n {
            let m = CHUNK.min(n - start);
            let out = self.forward(params, &x[start * fw..(start + m) * fw], m);
            let t = &target[start * tw..(start + m) * tw];
            let (l, _) = self.loss(&out, t);
            loss_sum += f64::from(l) * m as f64;
            if self.spec.loss == LossSpec::SoftmaxCrossEntropy {
                correct += loss::argmax_rows(&out, self.spec.outputs())
                    .zip(t)
                    .filter(|(p, &label)| *p == label as usize)
                    .count();
            }
            start += m;
        }
        let n_f = n.max(1) as f64;
        Metrics {
            loss: (loss_sum / n_f) as f32,
            accuracy: (self.spec.loss == LossSpec::SoftmaxCrossEntropy)
                .then(|| (correct as f64 / n_f) as f32),
        }
    }
}
