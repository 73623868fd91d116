//! The served form of a model version: safetensors whose metadata carries the task, the
//! version and the model spec (JSON), so a device needs nothing else to train it.

use std::collections::HashMap;

use crate::trainer::spec::{ModelSpec, SpecError};
use crate::wire::params::{Parameters, ParamsError};

/// Errors decoding a checkpoint.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum CheckpointError {
    /// The tensors are unusable.
    #[error(transparent)]
    Params(#[from] ParamsError),
    /// The spec is unusable.
    #[error(transparent)]
    Spec(#[from] SpecError),
    /// A metadata field is missing or invalid.
    #[error("checkpoint metadata `{0}` is missing or invalid")]
    Metadata(&'static str),
}

/// A decoded checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct Checkpoint {
    /// The task it belongs to.
    pub task: String,
    /// Its version.
    pub version: u64,
    /// The model.
    pub spec: ModelSpec,
    /// The parameters, in the spec's layout.
    pub params: Parameters,
}

/// Encodes a checkpoint.
pub fn encode(task: &str, version: u64, spec: &ModelSpec, params: &Parameters) -> Vec<u8> {
    params.to_safetensors(Some(HashMap::from([
        ("task".to_string(), task.to_string()),
        ("version".to_string(), version.to_string()),
        ("spec".to_string(), spec.to_json()),
    ])))
}

/// Decodes a checkpoint, checking its tensors against its spec.
pub fn decode(bytes: &[u8]) -> Result<Checkpoint, CheckpointError> {
    let (_, meta) = Parameters::from_safetensors(bytes)?;
    let spec = spec_from_json(meta.get("spec").ok_or(CheckpointError::Metadata("spec"))?)?;
    let version = meta
        .get("version")
        .and_then(|v| v.parse().ok())
        .ok_or(CheckpointError::Metadata("version"))?;
    let task = meta.get("task").cloned().unwrap_or_default();
    let (params, _) = Parameters::from_safetensors_with_layout(bytes, &spec.layout())?;
    Ok(Checkpoint {
        task,
        version,
        spec,
        params,
    })
}

/// [`ModelSpec::from_json`]; in the browser through the lean [`crate::wire::decode`]
/// reader (held to the same answers by its tests), where `serde_json` and serde's derives
/// were most of the module.
fn spec_from_json(json: &str) -> Result<ModelSpec, SpecError> {
    #[cfg(not(target_arch = "wasm32"))]
    return ModelSpec::from_json(json);
    #[cfg(target_arch = "wasm32")]
    {
        let spec =
            crate::wire::decode::model_spec(json).map_err(|e| SpecError::Json(e.to_string()))?;
        spec.validate()?;
        Ok(spec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoint_round_trip() {
        let spec = crate::trainer::builtin::linear(1, 1);
        let params = spec.init_params(0);
        let c = decode(&encode("linear", 4, &spec, &params)).unwrap();
        assert_eq!((c.task.as_str(), c.version), ("linear", 4));
        assert_eq!(c.spec, spec);
        assert_eq!(c.params, params);
        assert_eq!(
            decode(&params.to_safetensors(None)).unwrap_err(),
            CheckpointError::Metadata("spec")
        );
    }
}
