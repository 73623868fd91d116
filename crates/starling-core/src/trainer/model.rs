//! A sequential model built from a [`ModelSpec`]: forward pass, loss, and gradients.
//!
//! The layers' buffers (activations, gradients, im2col scratch) live in a per-thread
//! workspace that grows to the largest batch seen and is then reused, so a training step
//! allocates nothing once warm — this matters when one thread trains thousands of simulated
//! devices one after another. `flatten` moves no data, and an element-wise activation works
//! in place on the previous layer's output unless a backward pass still needs that output
//! (the output of another activation); no layer needs its pre-activation input.

use std::cell::RefCell;

use crate::tensor::numel;
use crate::trainer::layers::activation::Activation;
use crate::trainer::layers::conv::Conv2d;
use crate::trainer::layers::lstm::LstmCache;
#[cfg(not(target_arch = "wasm32"))]
use crate::trainer::layers::lstm::{Embedding, Lstm};
use crate::trainer::layers::pool::MaxPool;
use crate::trainer::layers::{dense, kernels};
use crate::trainer::loss;
use crate::trainer::optim::Sgd;
use crate::trainer::spec::{LayerSpec, LossSpec, ModelSpec, SpecError};
use crate::wire::params::{Layout, Parameters};

#[derive(Debug, Clone)]
enum Op {
    Dense {
        weight: usize,
        bias: usize,
        inputs: usize,
        units: usize,
        /// Rows per example: 1, or the steps of a sequence (the layer applied to each step;
        /// time-major data makes that one product over `steps n` rows).
        steps: usize,
        /// The input is a ReLU's output, perhaps pooled or flattened since: its gradient is
        /// masked wherever it is zero ([`dense::backward_sgd`] skips those rows).
        relu_input: bool,
    },
    Conv {
        weight: usize,
        bias: usize,
        conv: Conv2d,
    },
    MaxPool(MaxPool),
    Act(Activation),
    Flatten,
    /// Tokens to a step-by-step sequence (time-major: step `t` of the batch together).
    /// Not in the browser's device app, which stays under its size budget without them.
    #[cfg(not(target_arch = "wasm32"))]
    Embedding {
        table: usize,
        emb: Embedding,
        steps: usize,
    },
    /// An LSTM over a time-major sequence; its output is every step's hidden state
    /// (`sequences`) or the last step's.
    #[cfg(not(target_arch = "wasm32"))]
    Lstm {
        weight: usize,
        recurrent: usize,
        bias: usize,
        lstm: Lstm,
        steps: usize,
        sequences: bool,
    },
}

/// Values per activation buffer the evaluation chunk size aims at (4 MiB of f32): a CNN's
/// wide feature maps get small chunks, a regression model big ones.
const EVAL_BUFFER_VALUES: usize = 1 << 20;
/// The largest evaluation chunk.
const MAX_EVAL_CHUNK: usize = 1024;

/// A model ready to run: the spec compiled into a list of operations over a parameter set in
/// the spec's layout.
#[derive(Debug, Clone)]
pub struct Model {
    spec: ModelSpec,
    layout: Layout,
    ops: Vec<Op>,
    /// For each operation, the activation buffers (`Workspace::acts`) of its input and of its
    /// output: the same one for an in-place operation, a later one otherwise.
    slots: Vec<(usize, usize)>,
    /// Examples per chunk in [`Model::evaluate`] and [`Model::forward`].
    eval_chunk: usize,
    /// Predictions per example ([`ModelSpec::output_steps`]): more than 1 for a model that
    /// ends in a sequence, whose output is then time-major (step by step, each step's block
    /// holding the batch's rows).
    out_steps: usize,
}

/// Loss and, for classifiers, accuracy over a data set.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Evaluation {
    /// Mean loss per prediction (per example, or per step of a sequence output).
    pub loss: f32,
    /// Fraction of predictions whose largest output is the label (classifiers only).
    pub accuracy: Option<f32>,
}

/// What a training step's forward pass measured on its batch.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BatchStats {
    /// The batch's mean loss per prediction.
    pub loss: f32,
    /// Predictions whose largest output is the label (classifiers only).
    pub correct: Option<usize>,
    /// Predictions made: the examples, times the steps of a sequence output.
    pub predictions: usize,
}

/// The parameters a backward pass reads, and whether it also steps them.
enum Params<'a> {
    /// Gradients only ([`Model::train_batch`]).
    Read(&'a Parameters),
    /// Gradients and a plain SGD step, layer by layer ([`Model::train_step`]).
    Step {
        params: &'a mut Parameters,
        learning_rate: f32,
    },
}

impl Params<'_> {
    /// The parameters as they are.
    fn get(&self) -> &Parameters {
        match self {
            Params::Read(p) => p,
            Params::Step { params, .. } => params,
        }
    }
}

/// Reusable buffers of the forward and backward passes.
#[derive(Debug, Default)]
struct Workspace {
    /// The input, then the output of each operation that is not in place.
    acts: Vec<Vec<f32>>,
    /// Per operation: the winners of a max-pooling layer's windows.
    argmax: Vec<Vec<u32>>,
    /// Per operation: an LSTM's gates and states, for its backward pass.
    lstm: Vec<LstmCache>,
    col: Vec<f32>,
    dcol: Vec<f32>,
    /// Gradient buffers of the backward pass (swapped layer by layer).
    grad: Vec<f32>,
    spare: Vec<f32>,
    /// The targets reordered time-major, for a model whose output is a sequence.
    targets: Vec<f32>,
}

thread_local! {
    static WORKSPACE: RefCell<Workspace> = RefCell::new(Workspace::default());
}

/// Runs `f` with this thread's workspace (a fresh one if it is somehow in use already).
fn with_workspace<R>(f: impl FnOnce(&mut Workspace) -> R) -> R {
    WORKSPACE.with(|cell| match cell.try_borrow_mut() {
        Ok(mut ws) => f(&mut ws),
        Err(_) => f(&mut Workspace::default()),
    })
}

/// Whether the output of `ops` is a ReLU's, perhaps max-pooled or flattened since: then it
/// is zero only where the ReLU's was at the positions it came from, and a gradient with
/// respect to it matters only where it is not zero (the ReLU's backward pass zeroes the rest).
/// The browser's module has no use for it (its dense step is the GEMM's).
#[cfg(not(target_arch = "wasm32"))]
fn relu_before(ops: &[Op]) -> bool {
    for op in ops.iter().rev() {
        match op {
            Op::Flatten | Op::MaxPool(_) => continue,
            Op::Act(Activation::Relu) => return true,
            _ => return false,
        }
    }
    false
}

#[cfg(target_arch = "wasm32")]
fn relu_before(_: &[Op]) -> bool {
    false
}

fn dims3(shape: &[usize]) -> [usize; 3] {
    match *shape {
        [c, h, w] => [c, h, w],
        _ => unreachable!("validated specs give image layers 3-D inputs"),
    }
}

impl Model {
    /// Compiles a spec.
    pub fn new(spec: ModelSpec) -> Result<Self, SpecError> {
        spec.validate()?;
        if spec.is_external() {
            return Err(SpecError::Invalid(
                "this task's model was brought from outside Starling (an external model): the \
                 built-in trainer cannot train it; train it with your own framework through \
                 an SDK (Python, Java/JNI or C) and submit the weights"
                    .into(),
            ));
        }
        let layout = spec.layout();
        let (resolved, result) = spec.resolve();
        result?;
        let mut next_param = 0;
        let mut widest = spec.inputs;
        let mut ops = Vec::with_capacity(spec.layers.len());
        for (layer, r) in spec.layers.iter().zip(&resolved) {
            // A layer's parameters are in order: weight (or table), then the others.
            let (weight, bias) = (next_param, next_param + 1);
            next_param += r.params.len();
            widest = widest.max(numel(&r.output));
            ops.push(match layer {
                LayerSpec::Dense { units, .. } => {
                    let (steps, inputs) = match *r.input.as_slice() {
                        [steps, width] => (steps, width),
                        _ => (1, numel(&r.input)),
                    };
                    Op::Dense {
                        weight,
                        bias,
                        inputs,
                        units: *units,
                        steps,
                        relu_input: relu_before(&ops),
                    }
                }
                LayerSpec::Conv2d {
                    filters,
                    kernel,
                    stride,
                    padding,
                    ..
                } => Op::Conv {
                    weight,
                    bias,
                    conv: Conv2d::new(dims3(&r.input), *filters, *kernel, *stride, *padding)
                        .expect("validated convolution"),
                },
                LayerSpec::MaxPool { size, stride } => Op::MaxPool(
                    MaxPool::new(dims3(&r.input), *size, stride.unwrap_or(*size))
                        .expect("validated pooling"),
                ),
                LayerSpec::Flatten => Op::Flatten,
                #[cfg(target_arch = "wasm32")]
                LayerSpec::Embedding { .. } | LayerSpec::Lstm { .. } => {
                    return Err(SpecError::Invalid(
                        "this device app does not carry the recurrent layers (embedding, \
                         lstm), to stay small: train this model with `starling device` or an \
                         SDK"
                        .into(),
                    ))
                }
                #[cfg(not(target_arch = "wasm32"))]
                LayerSpec::Embedding { vocab, width, .. } => Op::Embedding {
                    table: weight,
                    emb: Embedding {
                        vocab: *vocab,
                        width: *width,
                    },
                    steps: r.input[0],
                },
                #[cfg(not(target_arch = "wasm32"))]
                LayerSpec::Lstm {
                    units,
                    return_sequences,
                    ..
                } => Op::Lstm {
                    weight,
                    recurrent: weight + 1,
                    bias: weight + 2,
                    lstm: Lstm {
                        inputs: r.input[1],
                        units: *units,
                    },
                    steps: r.input[0],
                    sequences: *return_sequences,
                },
                LayerSpec::Relu => Op::Act(Activation::Relu),
                LayerSpec::Sigmoid => Op::Act(Activation::Sigmoid),
                LayerSpec::Tanh => Op::Act(Activation::Tanh),
            });
        }
        let eval_chunk = (EVAL_BUFFER_VALUES / widest).clamp(1, MAX_EVAL_CHUNK);
        let slots = Self::assign_slots(&ops);
        let out_steps = spec.output_steps();
        Ok(Self {
            spec,
            layout,
            ops,
            slots,
            eval_chunk,
            out_steps,
        })
    }

    /// Chooses each operation's input and output buffer for training: `flatten` keeps its
    /// input's, an activation keeps it unless it holds another activation's output (whose
    /// backward pass reads it), every other operation gets a new one.
    fn assign_slots(ops: &[Op]) -> Vec<(usize, usize)> {
        let mut slots = Vec::with_capacity(ops.len());
        let (mut cur, mut fresh) = (0, 1);
        // Whether the buffer `cur` holds an activation's output.
        let mut holds_activation = false;
        for op in ops {
            let out = match op {
                Op::Flatten => cur,
                Op::Act(_) if !holds_activation => cur,
                _ => {
                    fresh += 1;
                    fresh - 1
                }
            };
            holds_activation = match op {
                Op::Flatten => holds_activation,
                Op::Act(_) => true,
                _ => false,
            };
            slots.push((cur, out));
            cur = out;
        }
        slots
    }

    /// The spec.
    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    /// The parameter layout.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Runs the layers on `n` rows of `x` without keeping anything for a backward pass;
    /// returns the output, held in `acts`.
    fn forward_eval<'w>(
        &self,
        params: &Parameters,
        x: &[f32],
        n: usize,
        acts: &'w mut Vec<Vec<f32>>,
        col: &mut Vec<f32>,
    ) -> &'w [f32] {
        assert_eq!(x.len(), n * self.spec.inputs, "input length");
        if acts.len() < 2 {
            acts.resize_with(2, Vec::new);
        }
        let (first, rest) = acts.split_at_mut(1);
        let (mut cur, mut next) = (&mut first[0], &mut rest[0]);
        cur.clear();
        cur.extend_from_slice(x);
        for op in &self.ops {
            match op {
                Op::Act(a) => {
                    a.forward(cur);
                    continue;
                }
                Op::Flatten => continue,
                op => Self::forward_op(op, params, cur, n, next, col, None, None),
            }
            std::mem::swap(&mut cur, &mut next);
        }
        cur
    }

    /// Runs the layers on `n` rows of `x`, keeping what the backward pass needs: after
    /// this, `ws.acts[self.slots[i].0]` is the input of operation `i` and
    /// `ws.acts[self.slots[i].1]` its output.
    fn forward_train(&self, params: &Parameters, x: &[f32], n: usize, ws: &mut Workspace) {
        assert_eq!(x.len(), n * self.spec.inputs, "input length");
        let Workspace {
            acts,
            argmax,
            lstm,
            col,
            ..
        } = ws;
        let slots = self.slots.last().map_or(1, |s| s.1 + 1);
        if acts.len() < slots {
            acts.resize_with(slots, Vec::new);
        }
        argmax.resize_with(self.ops.len(), Vec::new);
        lstm.resize_with(self.ops.len(), LstmCache::default);
        acts[0].clear();
        acts[0].extend_from_slice(x);
        for (i, (op, &(a, b))) in self.ops.iter().zip(&self.slots).enumerate() {
            if a == b {
                if let Op::Act(act) = op {
                    act.forward(&mut acts[a]);
                }
                continue;
            }
            let (before, after) = acts.split_at_mut(b);
            let (input, out) = (&before[a], &mut after[0]);
            match op {
                Op::Flatten => unreachable!("flatten is always in place"),
                Op::Act(act) => {
                    out.clear();
                    out.extend_from_slice(input);
                    act.forward(out);
                }
                op => Self::forward_op(
                    op,
                    params,
                    input,
                    n,
                    out,
                    col,
                    Some(&mut argmax[i]),
                    Some(&mut lstm[i]),
                ),
            }
        }
    }

    /// The forward pass of one layer that writes a new buffer (dense, convolution, pooling,
    /// embedding, LSTM): shared by evaluation and training, which differ only in what they
    /// keep. Pooling records where each maximum came from when `argmax` is given, and an LSTM
    /// its gates and states in `cache` (training).
    #[allow(clippy::too_many_arguments)]
    #[cfg_attr(target_arch = "wasm32", allow(unused_variables))]
    fn forward_op(
        op: &Op,
        params: &Parameters,
        input: &[f32],
        n: usize,
        out: &mut Vec<f32>,
        col: &mut Vec<f32>,
        argmax: Option<&mut Vec<u32>>,
        cache: Option<&mut LstmCache>,
    ) {
        match op {
            Op::Dense {
                weight,
                bias,
                inputs,
                units,
                steps,
                ..
            } => dense::forward(
                input,
                n * steps,
                params.at(*weight).data(),
                params.at(*bias).data(),
                *inputs,
                *units,
                out,
            ),
            Op::Conv { weight, bias, conv } => {
                out.resize(n * conv.output_len(), 0.0);
                conv.forward(
                    input,
                    n,
                    params.at(*weight).data(),
                    params.at(*bias).data(),
                    out,
                    col,
                );
            }
            Op::MaxPool(pool) => {
                out.resize(n * pool.output_len(), 0.0);
                pool.forward(input, n, out, argmax);
            }
            #[cfg(not(target_arch = "wasm32"))]
            Op::Embedding { table, emb, steps } => {
                emb.forward(input, n, *steps, params.at(*table).data(), out);
            }
            #[cfg(not(target_arch = "wasm32"))]
            Op::Lstm {
                weight,
                recurrent,
                bias,
                lstm,
                steps,
                sequences,
            } => {
                let mut local = LstmCache::default();
                let cache = cache.unwrap_or(&mut local);
                lstm.forward(
                    input,
                    n,
                    *steps,
                    params.at(*weight).data(),
                    params.at(*recurrent).data(),
                    params.at(*bias).data(),
                    cache,
                );
                let hidden = cache.hidden();
                out.clear();
                if *sequences {
                    out.extend_from_slice(hidden);
                } else {
                    out.extend_from_slice(&hidden[(steps - 1) * n * lstm.units..]);
                }
            }
            Op::Act(_) | Op::Flatten => unreachable!("activations and flatten work in place"),
        }
    }

    /// The model's output for `n` rows of `x`, example by example (for a sequence output,
    /// each example's steps in order).
    pub fn forward(&self, params: &Parameters, x: &[f32], n: usize) -> Vec<f32> {
        let fw = self.spec.inputs;
        assert_eq!(x.len(), n * fw, "input length");
        let mut out = Vec::with_capacity(n * self.out_steps * self.spec.outputs());
        with_workspace(|ws| {
            let mut start = 0;
            while start < n {
                let m = self.eval_chunk.min(n - start);
                let x = &x[start * fw..(start + m) * fw];
                let chunk = self.forward_eval(params, x, m, &mut ws.acts, &mut ws.col);
                if self.out_steps == 1 {
                    out.extend_from_slice(chunk);
                } else {
                    // Time-major to example by example.
                    let width = self.spec.outputs();
                    for i in 0..m {
                        for t in 0..self.out_steps {
                            let at = (t * m + i) * width;
                            out.extend_from_slice(&chunk[at..at + width]);
                        }
                    }
                }
                start += m;
            }
        });
        out
    }

    /// The batch's mean loss given the model's output; writes the gradient of that loss with
    /// respect to the output into `grad`.
    fn loss(&self, output: &[f32], target: &[f32], grad: &mut Vec<f32>) -> f32 {
        grad.resize(output.len(), 0.0);
        match self.spec.loss {
            LossSpec::Mse => loss::mse(output, target, grad),
            LossSpec::SoftmaxCrossEntropy => {
                loss::softmax_cross_entropy(output, target, self.spec.outputs(), grad)
            }
        }
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
        self.train_batch(params, x, target, n, grads).loss
    }

    /// [`Model::loss_and_grad`], also counting the examples a classifier got right: the
    /// training loop's figures come from here, at no extra forward pass.
    pub fn train_batch(
        &self,
        params: &Parameters,
        x: &[f32],
        target: &[f32],
        n: usize,
        grads: &mut Parameters,
    ) -> BatchStats {
        with_workspace(|ws| {
            self.forward_train(params, x, n, ws);
            self.backward(ws, Params::Read(params), target, n, grads)
        })
    }

    /// One optimiser step on a batch: [`Model::train_batch`] followed by
    /// [`Sgd::step`], with the same result (up to the order of floating-point sums).
    ///
    /// With plain SGD (no momentum, no proximal term) each layer's parameters take their step
    /// as soon as the backward pass has their gradient, while they are still in cache, and a
    /// dense layer's step is fused with its backward pass ([`dense::backward_sgd`]):
    /// its weight gradient is never stored, and `grads` is left holding no meaningful
    /// values. Otherwise `grads` holds the batch's gradient, as after `train_batch`.
    pub fn train_step(
        &self,
        params: &mut Parameters,
        x: &[f32],
        target: &[f32],
        n: usize,
        grads: &mut Parameters,
        opt: &mut Sgd,
    ) -> BatchStats {
        let Some(learning_rate) = opt.plain_learning_rate() else {
            let stats = self.train_batch(params, x, target, n, grads);
            opt.step(params, grads);
            return stats;
        };
        with_workspace(|ws| {
            self.forward_train(params, x, n, ws);
            self.backward(
                ws,
                Params::Step {
                    params,
                    learning_rate,
                },
                target,
                n,
                grads,
            )
        })
    }

    /// The loss of the forward pass in `ws` and the backward pass: the gradients go into
    /// `grads`, and with [`Params::Step`] each layer's parameters take their SGD step once the
    /// layer's gradient is known (a layer's input gradient needs only its own parameters, so
    /// the layers below are unaffected).
    fn backward(
        &self,
        ws: &mut Workspace,
        mut params: Params<'_>,
        target: &[f32],
        n: usize,
        grads: &mut Parameters,
    ) -> BatchStats {
        let Workspace {
            acts,
            argmax,
            lstm: lstm_caches,
            col,
            dcol,
            grad,
            spare,
            targets,
        } = ws;
        #[cfg(target_arch = "wasm32")]
        let _ = lstm_caches;
        let output = self.slots.last().map_or(0, |s| s.1);
        let target = self.time_major(target, n, targets);
        let l = self.loss(&acts[output], target, grad);
        let correct = self.correct(&acts[output], target);
        let (mut dy, mut dx) = (grad, spare);
        for (i, op) in self.ops.iter().enumerate().rev() {
            // The first layer's input gradient is never needed.
            let need_dx = i > 0;
            // The tensors whose gradients this layer wrote, for the step.
            let mut stepped: [Option<usize>; 3] = [None; 3];
            match op {
                Op::Act(a) => {
                    a.backward(&acts[self.slots[i].1], dy);
                    continue;
                }
                Op::Flatten => continue,
                Op::Dense {
                    weight,
                    bias,
                    inputs,
                    units,
                    steps,
                    relu_input,
                } => {
                    // A dense layer on a sequence works on all its steps' rows at once.
                    let n = n * steps;
                    if need_dx {
                        dx.resize(n * inputs, 0.0);
                    }
                    let x = &acts[self.slots[i].0];
                    let dx = need_dx.then_some(&mut dx[..]);
                    let mut db = std::mem::take(grads.at_mut(*bias).data_mut_vec());
                    match &mut params {
                        Params::Step {
                            params,
                            learning_rate,
                        } => {
                            let w = params.at_mut(*weight).data_mut();
                            dense::backward_sgd(
                                x,
                                n,
                                w,
                                dy,
                                *inputs,
                                *units,
                                *learning_rate,
                                *relu_input,
                                dx,
                            );
                            dense::bias_gradient(dy, *units, &mut db);
                        }
                        Params::Read(params) => {
                            let mut dw = std::mem::take(grads.at_mut(*weight).data_mut_vec());
                            dense::backward(
                                x,
                                n,
                                params.at(*weight).data(),
                                dy,
                                *inputs,
                                *units,
                                &mut dw,
                                &mut db,
                                dx,
                            );
                            *grads.at_mut(*weight).data_mut_vec() = dw;
                        }
                    }
                    *grads.at_mut(*bias).data_mut_vec() = db;
                    stepped[0] = Some(*bias);
                }
                Op::Conv { weight, bias, conv } => {
                    let mut dw = std::mem::take(grads.at_mut(*weight).data_mut_vec());
                    let mut db = std::mem::take(grads.at_mut(*bias).data_mut_vec());
                    if need_dx {
                        dx.resize(n * conv.input_len(), 0.0);
                    }
                    conv.backward(
                        &acts[self.slots[i].0],
                        n,
                        params.get().at(*weight).data(),
                        dy,
                        &mut dw,
                        &mut db,
                        need_dx.then_some(&mut dx[..]),
                        col,
                        dcol,
                    );
                    *grads.at_mut(*weight).data_mut_vec() = dw;
                    *grads.at_mut(*bias).data_mut_vec() = db;
                    stepped = [Some(*weight), Some(*bias), None];
                }
                Op::MaxPool(pool) => {
                    if need_dx {
                        dx.resize(n * pool.input_len(), 0.0);
                        pool.backward(dy, n, &argmax[i], dx);
                    }
                }
                #[cfg(not(target_arch = "wasm32"))]
                Op::Embedding { table, emb, steps } => {
                    let mut de = std::mem::take(grads.at_mut(*table).data_mut_vec());
                    emb.backward(&acts[self.slots[i].0], n, *steps, dy, &mut de);
                    *grads.at_mut(*table).data_mut_vec() = de;
                    stepped[0] = Some(*table);
                }
                #[cfg(not(target_arch = "wasm32"))]
                Op::Lstm {
                    weight,
                    recurrent,
                    bias,
                    lstm,
                    steps,
                    sequences,
                } => {
                    let mut dw = std::mem::take(grads.at_mut(*weight).data_mut_vec());
                    let mut du = std::mem::take(grads.at_mut(*recurrent).data_mut_vec());
                    let mut db = std::mem::take(grads.at_mut(*bias).data_mut_vec());
                    if need_dx {
                        dx.resize(steps * n * lstm.inputs, 0.0);
                    }
                    let p = params.get();
                    lstm.backward(
                        &acts[self.slots[i].0],
                        n,
                        *steps,
                        p.at(*weight).data(),
                        p.at(*recurrent).data(),
                        &mut lstm_caches[i],
                        dy,
                        *sequences,
                        &mut dw,
                        &mut du,
                        &mut db,
                        need_dx.then_some(&mut dx[..]),
                    );
                    *grads.at_mut(*weight).data_mut_vec() = dw;
                    *grads.at_mut(*recurrent).data_mut_vec() = du;
                    *grads.at_mut(*bias).data_mut_vec() = db;
                    stepped = [Some(*weight), Some(*recurrent), Some(*bias)];
                }
            }
            if let Params::Step {
                params,
                learning_rate,
            } = &mut params
            {
                for t in stepped.into_iter().flatten() {
                    kernels::sgd_step(
                        params.at_mut(t).data_mut(),
                        grads.at(t).data(),
                        *learning_rate,
                    );
                }
            }
            if !need_dx {
                break;
            }
            std::mem::swap(&mut dy, &mut dx);
        }
        BatchStats {
            loss: l,
            correct,
            predictions: n * self.out_steps,
        }
    }

    /// The targets of `n` examples in the order of the model's output: as they are, or for a
    /// sequence output reordered from example by example (each example's steps together) to
    /// step by step, in `buf`.
    fn time_major<'a>(&self, target: &'a [f32], n: usize, buf: &'a mut Vec<f32>) -> &'a [f32] {
        let steps = self.out_steps;
        if steps == 1 {
            return target;
        }
        let per_step = target.len() / (n * steps).max(1);
        buf.clear();
        buf.resize(target.len(), 0.0);
        for (i, example) in target.chunks_exact(steps * per_step).enumerate() {
            for (t, values) in example.chunks_exact(per_step).enumerate() {
                let at = (t * n + i) * per_step;
                buf[at..at + per_step].copy_from_slice(values);
            }
        }
        buf
    }

    /// For a classifier, the rows of `output` whose largest logit is the row's label.
    fn correct(&self, output: &[f32], target: &[f32]) -> Option<usize> {
        (self.spec.loss == LossSpec::SoftmaxCrossEntropy).then(|| {
            loss::argmax_rows(output, self.spec.outputs())
                .zip(target)
                .filter(|(p, &label)| *p == label as usize)
                .count()
        })
    }

    /// Mean loss (and accuracy for classifiers) over `n` rows, evaluated in chunks.
    pub fn evaluate(&self, params: &Parameters, x: &[f32], target: &[f32], n: usize) -> Evaluation {
        let (fw, tw) = (self.spec.inputs, self.spec.target_width());
        let mut loss_sum = 0.0f64;
        let mut correct = 0usize;
        with_workspace(|ws| {
            let mut start = 0;
            while start < n {
                let m = self.eval_chunk.min(n - start);
                let xs = &x[start * fw..(start + m) * fw];
                let out = self.forward_eval(params, xs, m, &mut ws.acts, &mut ws.col);
                let t = self.time_major(&target[start * tw..(start + m) * tw], m, &mut ws.targets);
                let l = self.loss(out, t, &mut ws.grad);
                loss_sum += f64::from(l) * m as f64;
                correct += self.correct(out, t).unwrap_or(0);
                start += m;
            }
        });
        let n_f = n.max(1) as f64;
        let predictions = (n * self.out_steps).max(1) as f64;
        Evaluation {
            loss: (loss_sum / n_f) as f32,
            accuracy: (self.spec.loss == LossSpec::SoftmaxCrossEntropy)
                .then(|| (correct as f64 / predictions) as f32),
        }
    }
}
