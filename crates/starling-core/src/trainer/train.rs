//! The local training loop: epochs of mini-batches, one optimiser step per batch, loss = mean
//! over the batch — exactly the original demo's TensorFlow loop.
//!
//! The caller may stop the loop between steps (the progress callback answers a
//! [`ControlFlow`]); that is FedProx's partial work, which a device does only when the plan
//! allows it ([`Plan::partial_work`], [`Plan::training_budget_secs`]). The core keeps no
//! clock: the caller measures time and decides.
//!
//! The loss and accuracy a device reports come from the training pass (each batch's forward
//! pass already computes them); evaluating the whole local data after training is one more
//! pass that a plan asks for ([`Plan::evaluate_after_training`]).

use std::ops::ControlFlow;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use crate::data::{DataError, Dataset};
use crate::trainer::model::{BatchStats, Evaluation, Model};
use crate::trainer::optim::Sgd;
use crate::trainer::spec::LossSpec;
use crate::wire::params::{Parameters, ParamsError};

/// What a device does in one round: sent by the server with each assignment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Plan {
    /// Passes over the local data.
    pub epochs: u32,
    /// Examples per optimiser step (the last batch of an epoch may be smaller).
    pub batch_size: usize,
    /// SGD learning rate.
    pub learning_rate: f32,
    /// SGD momentum (0: plain gradient descent).
    pub momentum: f32,
    /// Shuffle the examples before each epoch; when false, batches follow the file order.
    pub shuffle: bool,
    /// Seed of the shuffle.
    pub seed: u64,
    /// FedProx's proximal weight (Li et al. 2020): local training adds
    /// `(mu / 2) ||w - w_global||²` to the loss, `w_global` being the parameters it started
    /// from, which keeps a device's model near the global one. 0 (the default) is plain
    /// FedAvg; a plan without the key has 0.
    pub mu: f32,
    /// FedProx's partial work (Li et al. 2020): a device whose local training would run past
    /// the round's deadline stops early, between steps ([`Plan::training_budget_secs`]), and
    /// sends the update of the steps it ran, counting only the examples it trained on
    /// ([`TrainReport::examples`]), instead of missing the round. Off (the default, and when a
    /// plan leaves the key out), a device always runs every step. Meant for FedProx (`mu` >
    /// 0), whose proximal term keeps updates made of unequal amounts of local work
    /// consistent; with plain FedAvg partial updates pull the average towards what the
    /// devices that stopped early saw, so no partial work is the safer default.
    pub partial_work: bool,
    /// Evaluate the whole local data set after training (one more forward pass over it) and
    /// report that loss and accuracy with the update. Off (the default, and when a plan leaves
    /// the key out), the update reports the training pass's own figures: the mean loss and
    /// accuracy of the last epoch's batches, each measured as the step on it was computed, so
    /// training costs no extra pass over the data ([`TrainReport::after`]). A plan sends the
    /// key only when it is on, so devices that predate it read every plan that leaves it off.
    #[serde(skip_serializing_if = "is_false")]
    pub evaluate_after_training: bool,
    /// The conditions a device must be in before it checks in (the eligibility Google's
    /// production client applies): charging, idle, on an unmetered network, a battery level.
    /// The host reports its conditions and the client library checks in only when they hold
    /// ([`Requirements::unmet`]). None by default.
    #[serde(skip_serializing_if = "Requirements::is_none")]
    pub requires: Requirements,
}

/// What a task asks of a device's conditions before it takes part (see [`Plan::requires`]).
/// A condition the host does not report counts as unmet when required.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Requirements {
    /// The device must be charging.
    pub charging: bool,
    /// The device must be idle (not in use).
    pub idle: bool,
    /// The device must be on an unmetered network (Wi-Fi, not mobile data).
    pub unmetered: bool,
    /// The battery must be at least this full, from 0 to 1 (0: any level).
    pub min_battery: f32,
}

/// A device's conditions, as its host reports them; `None`: unknown.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Conditions {
    /// Charging.
    pub charging: Option<bool>,
    /// Idle.
    pub idle: Option<bool>,
    /// On an unmetered network.
    pub unmetered: Option<bool>,
    /// Battery level, from 0 to 1.
    pub battery: Option<f32>,
}

impl Requirements {
    /// Whether nothing is required.
    pub fn is_none(&self) -> bool {
        *self == Self::default()
    }

    /// The first requirement `conditions` do not meet, in words; `None` when all hold.
    pub fn unmet(&self, conditions: &Conditions) -> Option<String> {
        let need = |required: bool, state: Option<bool>, what: &str| {
            (required && state != Some(true)).then(|| {
                format!(
                    "the task requires the device to be {what}, and it {}",
                    if state.is_none() {
                        "does not say"
                    } else {
                        "is not"
                    }
                )
            })
        };
        need(self.charging, conditions.charging, "charging")
            .or_else(|| need(self.idle, conditions.idle, "idle"))
            .or_else(|| {
                need(
                    self.unmetered,
                    conditions.unmetered,
                    "on an unmetered network",
                )
            })
            .or_else(|| {
                (self.min_battery > 0.0
                    && conditions
                        .battery
                        .is_none_or(|b| b.is_nan() || b < self.min_battery))
                .then(|| {
                    format!(
                        "the task requires a battery at least {:.0}% full, and it {}",
                        self.min_battery * 100.0,
                        match conditions.battery {
                            None => "does not say".to_string(),
                            Some(b) => format!("is {:.0}%", b * 100.0),
                        }
                    )
                })
            })
    }
}

impl Default for Plan {
    fn default() -> Self {
        Self {
            epochs: 1,
            batch_size: 32,
            learning_rate: 0.01,
            momentum: 0.0,
            shuffle: true,
            seed: 0,
            mu: 0.0,
            partial_work: false,
            evaluate_after_training: false,
            requires: Requirements::default(),
        }
    }
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// Errors that stop local training before it starts.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum TrainError {
    /// The plan is unusable.
    #[error("invalid plan: {0}")]
    Plan(String),
    /// The data does not fit the model.
    #[error(transparent)]
    Data(#[from] DataError),
    /// The parameters do not fit the model.
    #[error("parameters do not fit the model: {0}")]
    Params(#[from] ParamsError),
}

impl Plan {
    /// Checks the plan's values.
    pub fn validate(&self) -> Result<(), TrainError> {
        if self.epochs == 0 {
            return Err(TrainError::Plan("epochs must be at least 1".into()));
        }
        if self.batch_size == 0 {
            return Err(TrainError::Plan("batch size must be at least 1".into()));
        }
        if !(self.learning_rate.is_finite() && self.learning_rate > 0.0) {
            return Err(TrainError::Plan(
                "learning rate must be a positive number".into(),
            ));
        }
        if !(self.momentum.is_finite() && (0.0..1.0).contains(&self.momentum)) {
            return Err(TrainError::Plan("momentum must be in [0, 1)".into()));
        }
        if !(self.mu.is_finite() && self.mu >= 0.0) {
            return Err(TrainError::Plan("mu must be a finite number >= 0".into()));
        }
        let b = self.requires.min_battery;
        if !(b.is_finite() && (0.0..=1.0).contains(&b)) {
            return Err(TrainError::Plan(
                "requires.min_battery must be in [0, 1]".into(),
            ));
        }
        Ok(())
    }

    /// With partial work, the seconds after its check-in at which a device stops local
    /// training (after the step under way), so that its update still reaches the server
    /// before the round's deadline; `deadline_secs` is the check-in answer's time to the
    /// deadline.
    ///
    /// The budget is the deadline minus a margin for evaluating, encoding and uploading the
    /// update: a tenth of `deadline_secs`, at least 1 s, but at most half of it. So 60 s
    /// leave 54 s of training, 5 s leave 4 s and 1 s leaves 0.5 s. A deadline at or below 0
    /// gives 0: the loop asks only after a step, so the first step always runs and there is
    /// always an update to send.
    ///
    /// `None` (train to the end) when the plan does not allow partial work, or when
    /// `deadline_secs` is not a finite number (the server sent no usable deadline).
    pub fn training_budget_secs(&self, deadline_secs: f64) -> Option<f64> {
        if !self.partial_work || !deadline_secs.is_finite() {
            return None;
        }
        let margin = (deadline_secs / 10.0).max(1.0).min(deadline_secs / 2.0);
        Some((deadline_secs - margin).max(0.0))
    }
}

/// What local training did.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainReport {
    /// Distinct examples training ran on: the count an update reports. Every example of the
    /// local data set, unless training stopped early within its first epoch; then the
    /// examples of the batches it ran (an epoch's batches do not overlap). A run that stopped
    /// in a later epoch has seen every example.
    pub examples: usize,
    /// Optimiser steps run.
    pub steps: usize,
    /// Optimiser steps the plan asks for (batches per epoch times epochs): more than `steps`
    /// when training stopped early.
    pub planned_steps: usize,
    /// The training pass's loss and accuracy over the first epoch's batches (weighted by
    /// their sizes): each batch is measured by the forward pass of its own step, so before
    /// that step changes the model, and the figure is the model as training found it,
    /// improving through the epoch. With one epoch it equals `after` unless the plan
    /// evaluates after training.
    pub before: Evaluation,
    /// What the update reports. With [`Plan::evaluate_after_training`], the loss and accuracy
    /// over the whole local data after training; otherwise the training pass's over the last
    /// epoch's batches (those that ran, when training stopped early), measured like
    /// `before`.
    pub after: Evaluation,
    /// Whether `after` is an evaluation of the whole local data after training.
    pub evaluated_after: bool,
}

impl TrainReport {
    /// Whether training stopped before running every step of the plan (partial work).
    pub fn is_partial(&self) -> bool {
        self.steps < self.planned_steps
    }
}

/// What a progress callback answers after a step: whether training goes on.
///
/// Implemented for `()`, a callback that only watches (training runs every step), and for
/// [`ControlFlow<()>`], where `Break(())` stops training after the step just reported.
pub trait StepControl {
    /// True when training is to stop after the step just reported.
    fn stops(self) -> bool;
}

impl StepControl for () {
    fn stops(self) -> bool {
        false
    }
}

impl StepControl for ControlFlow<()> {
    fn stops(self) -> bool {
        self.is_break()
    }
}

/// Progress of local training, reported after every step.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    /// Steps done.
    pub step: usize,
    /// Steps in all.
    pub total_steps: usize,
    /// The last batch's loss.
    pub batch_loss: f32,
}

/// Checks that a data set fits a model: widths, and class labels for classifiers.
pub fn check_data(model: &Model, data: &Dataset) -> Result<(), DataError> {
    let spec = model.spec();
    if data.is_empty() {
        return Err(DataError::Empty);
    }
    if data.feature_dim() != spec.inputs {
        return Err(DataError::Shape(format!(
            "the model `{}` takes {} feature column(s), the data has {}",
            spec.name,
            spec.inputs,
            data.feature_dim()
        )));
    }
    if data.target_dim() != spec.target_width() {
        return Err(DataError::Shape(format!(
            "the model `{}` needs {} target column(s), the data has {}",
            spec.name,
            spec.target_width(),
            data.target_dim()
        )));
    }
    if spec.loss == LossSpec::SoftmaxCrossEntropy {
        let classes = spec.outputs();
        if let Some((i, &bad)) = data
            .targets()
            .iter()
            .enumerate()
            .find(|(_, &t)| t < 0.0 || t.fract() != 0.0 || t as usize >= classes)
        {
            return Err(DataError::Shape(format!(
                "example {}: label {bad} is not a class index in 0..{classes}",
                i + 1
            )));
        }
    }
    Ok(())
}

/// The loss and accuracy of the batches of one epoch, summed as training goes (the
/// forward pass of each step already computed them).
#[derive(Debug, Clone, Copy, Default)]
struct RunningMean {
    examples: usize,
    loss_sum: f64,
    correct: Option<usize>,
    predictions: usize,
}

impl RunningMean {
    fn add(&mut self, examples: usize, stats: BatchStats) {
        self.examples += examples;
        self.loss_sum += f64::from(stats.loss) * examples as f64;
        self.correct = stats.correct.map(|c| c + self.correct.unwrap_or(0));
        self.predictions += stats.predictions;
    }

    fn mean(&self) -> Evaluation {
        let n = self.examples.max(1) as f64;
        let predictions = self.predictions.max(1) as f64;
        Evaluation {
            loss: (self.loss_sum / n) as f32,
            accuracy: self.correct.map(|c| (c as f64 / predictions) as f32),
        }
    }
}

/// Trains `params` in place on `data` following `plan`, calling `progress` after each step.
///
/// `progress` may stop training early by answering `ControlFlow::Break(())` (see
/// [`StepControl`]); a callback returning `()` never stops it. Stopping happens between
/// steps, after at least one, and leaves `params` as they were after that step: the steps
/// that ran are exactly the first steps of the whole run (the same batches, the same
/// optimiser state). The report then says how many steps ran and which examples count
/// ([`TrainReport::examples`]).
///
/// The loss and accuracy reported come from the training pass itself; only a plan with
/// [`Plan::evaluate_after_training`] pays for one more forward pass over the whole local
/// data (the whole of it, even when training stopped early).
pub fn train<C: StepControl>(
    model: &Model,
    params: &mut Parameters,
    data: &Dataset,
    plan: &Plan,
    mut progress: impl FnMut(Progress) -> C,
) -> Result<TrainReport, TrainError> {
    plan.validate()?;
    params.check_layout(model.layout())?;
    check_data(model, data)?;
    let n = data.len();
    let mut rng = rand::rngs::StdRng::seed_from_u64(plan.seed);
    let mut order: Vec<usize> = (0..n).collect();
    let mut grads = Parameters::zeros(model.layout());
    let mut opt = Sgd::new(plan.learning_rate, plan.momentum);
    if plan.mu > 0.0 {
        // FedProx: the proximal term pulls towards the parameters training started from.
        opt = opt.with_proximal(plan.mu, params.clone());
    }
    let (mut x, mut y) = (Vec::new(), Vec::new());
    let per_epoch = n.div_ceil(plan.batch_size);
    let total_steps = per_epoch * plan.epochs as usize;
    let mut step = 0;
    // Distinct examples trained on: those of the first epoch's batches so far; after the
    // first epoch, all of them.
    let mut seen = 0;
    // The first epoch's figures and those of the epoch under way.
    let (mut first, mut current) = (RunningMean::default(), RunningMean::default());
    'epochs: for epoch in 0..plan.epochs {
        if plan.shuffle {
            order.shuffle(&mut rng);
        }
        current = RunningMean::default();
        for batch in order.chunks(plan.batch_size) {
            data.gather(batch, &mut x, &mut y);
            let stats = model.train_step(params, &x, &y, batch.len(), &mut grads, &mut opt);
            step += 1;
            current.add(batch.len(), stats);
            if epoch == 0 {
                seen += batch.len();
                first = current;
            }
            let answer = progress(Progress {
                step,
                total_steps,
                batch_loss: stats.loss,
            });
            if answer.stops() {
                break 'epochs;
            }
        }
    }
    let after = if plan.evaluate_after_training {
        model.evaluate(params, data.features(), data.targets(), n)
    } else {
        current.mean()
    };
    Ok(TrainReport {
        examples: seen,
        steps: step,
        planned_steps: total_steps,
        before: first.mean(),
        after,
        evaluated_after: plan.evaluate_after_training,
    })
}

/// What a device does with an assignment: trains a copy of `base` on its data and encodes
/// the update (the parameter difference, the example count and the local loss). Shared by
/// the native device, the browser app and the simulator.
///
/// `progress` may stop training early, as in [`train`] (devices do so only when
/// [`Plan::partial_work`] allows it); the update is then the difference after the steps
/// that ran, and its example count is the report's [`TrainReport::examples`], the examples
/// those steps trained on. A stopped run has run at least one step, so there is always an
/// update to send.
pub fn local_update<C: StepControl>(
    model: &Model,
    base: &Parameters,
    data: &Dataset,
    plan: &Plan,
    base_version: u64,
    token: String,
    progress: impl FnMut(Progress) -> C,
) -> Result<(Vec<u8>, TrainReport), TrainError> {
    let (delta, report) = trained_delta(model, base, data, plan, progress)?;
    let meta = crate::wire::update::UpdateMeta {
        base_version,
        examples: report.examples as u64,
        loss: Some(report.after.loss),
        accuracy: report.after.accuracy,
        token,
    };
    Ok((crate::wire::update::encode(&delta, &meta), report))
}

/// Trains a copy of `base` and returns the difference it made, with the report.
fn trained_delta<C: StepControl>(
    model: &Model,
    base: &Parameters,
    data: &Dataset,
    plan: &Plan,
    progress: impl FnMut(Progress) -> C,
) -> Result<(Parameters, TrainReport), TrainError> {
    let mut params = base.clone();
    let report = train(model, &mut params, data, plan, progress)?;
    Ok((params.sub(base)?, report))
}

/// [`local_update`] under local differential privacy ([`LocalDp`]): the trained difference
/// is clipped and noised on the device, from the cryptographically secure `rng`, before it is
/// encoded, and the update carries nothing else of the local data: no loss or accuracy, and
/// an example count of 1 (so the server weighs it like any other).
///
/// [`LocalDp`]: crate::privacy::LocalDp
#[allow(clippy::too_many_arguments)]
pub fn local_update_private<C: StepControl, R: rand::Rng + rand::CryptoRng + ?Sized>(
    model: &Model,
    base: &Parameters,
    data: &Dataset,
    plan: &Plan,
    base_version: u64,
    token: String,
    ldp: &crate::privacy::LocalDp,
    rng: &mut R,
    progress: impl FnMut(Progress) -> C,
) -> Result<(Vec<u8>, TrainReport), TrainError> {
    let (mut delta, report) = trained_delta(model, base, data, plan, progress)?;
    ldp.apply(&mut delta, rng);
    let meta = crate::wire::update::UpdateMeta {
        base_version,
        examples: 1,
        loss: None,
        accuracy: None,
        token,
    };
    Ok((crate::wire::update::encode(&delta, &meta), report))
}
