//! The local training loop: epochs of mini-batches, one optimiser step per batch, loss = mean
//! over the batch — exactly the original demo's TensorFlow loop.

use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use crate::data::{DataError, Dataset};
use crate::trainer::model::{Evaluation, Model};
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
        }
    }
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
        Ok(())
    }
}

/// What local training did.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainReport {
    /// Examples in the local data set.
    pub examples: usize,
    /// Optimiser steps taken.
    pub steps: usize,
    /// Loss and accuracy over the whole local data before training.
    pub before: Evaluation,
    /// Loss and accuracy over the whole local data after training.
    pub after: Evaluation,
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

/// Trains `params` in place on `data` following `plan`, calling `progress` after each step.
pub fn train(
    model: &Model,
    params: &mut Parameters,
    data: &Dataset,
    plan: &Plan,
    mut progress: impl FnMut(Progress),
) -> Result<TrainReport, TrainError> {
    plan.validate()?;
    params.check_layout(model.layout())?;
    check_data(model, data)?;
    let n = data.len();
    let before = model.evaluate(params, data.features(), data.targets(), n);
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
    for _ in 0..plan.epochs {
        if plan.shuffle {
            order.shuffle(&mut rng);
        }
        for batch in order.chunks(plan.batch_size) {
            data.gather(batch, &mut x, &mut y);
            let batch_loss = model.loss_and_grad(params, &x, &y, batch.len(), &mut grads);
            opt.step(params, &grads);
            step += 1;
            progress(Progress {
                step,
                total_steps,
                batch_loss,
            });
        }
    }
    let after = model.evaluate(params, data.features(), data.targets(), n);
    Ok(TrainReport {
        examples: n,
        steps: total_steps,
        before,
        after,
    })
}

/// What a device does with an assignment: trains a copy of `base` on its data and encodes
/// the update (the parameter difference, the example count and the local loss). Shared by
/// the native device, the browser app and the simulator.
pub fn local_update(
    model: &Model,
    base: &Parameters,
    data: &Dataset,
    plan: &Plan,
    base_version: u64,
    token: String,
    progress: impl FnMut(Progress),
) -> Result<(Vec<u8>, TrainReport), TrainError> {
    let mut params = base.clone();
    let report = train(model, &mut params, data, plan, progress)?;
    let delta = params.sub(base)?;
    let meta = crate::wire::update::UpdateMeta {
        base_version,
        examples: report.examples as u64,
        loss: Some(report.after.loss),
        accuracy: report.after.accuracy,
        token,
    };
    Ok((crate::wire::update::encode(&delta, &meta), report))
}
