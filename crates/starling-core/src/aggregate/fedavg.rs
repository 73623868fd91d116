//! Plain federated averaging (McMahan et al. 2017), the default [`Strategy`]: no server
//! state, the next model is the weighted mean of the devices' models.

use super::{AggregateError, Strategy, WeightedSum};
use crate::wire::params::Parameters;

/// Plain federated averaging (McMahan et al. 2017): the next model is the weighted mean of
/// the devices' models, i.e. the base plus the mean update.
#[derive(Debug, Clone, Copy, Default)]
pub struct FedAvg;

impl Strategy for FedAvg {
    fn name(&self) -> &'static str {
        "fedavg"
    }
    fn next_params(
        &mut self,
        base: &Parameters,
        aggregate: &WeightedSum,
    ) -> Result<Parameters, AggregateError> {
        aggregate.finish(base)
    }
}
