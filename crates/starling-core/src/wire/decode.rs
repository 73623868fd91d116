//! The browser's readers of a model spec and a plan, written by hand over
//! [`crate::wire::json`]: [`model_spec`] and [`plan`] read what `serde_json` reads into
//! [`ModelSpec`] and [`Plan`] through their derives, with the same defaults, tags and
//! refusals, at a small part of the code that serde's derives generate (the browser's
//! WebAssembly module is held under 100 KB gzip). Native code keeps `serde_json`; the tests
//! hold the two to the same answers on every built-in model and on malformed input.
//!
//! The structs are built with every field named, so a field added in `trainer/` stops this
//! file from compiling until it is read here too; the tests' exhaustive match on
//! [`LayerSpec`] does the same for a new layer type.
//!
//! One deliberate difference: a struct must be a JSON object (serde also accepts an array
//! of its fields in order, which no one sends).

use crate::trainer::spec::{Init, LayerSpec, LossSpec, ModelSpec, Padding, TensorSpec};
use crate::trainer::train::{Plan, Requirements};
use crate::wire::json::{self, Json, JsonError};

fn error(msg: String) -> JsonError {
    JsonError::new(msg)
}

/// A JSON object's fields, taken out one by one.
struct Fields(Vec<(String, Json)>);

impl Fields {
    fn new(v: Json, what: &str) -> Result<Self, JsonError> {
        let Json::Object(fields) = v else {
            return Err(error(format!("invalid type: expected {what}")));
        };
        for (i, (k, _)) in fields.iter().enumerate() {
            if fields[..i].iter().any(|(o, _)| o == k) {
                return Err(error(format!("duplicate field `{k}`")));
            }
        }
        Ok(Self(fields))
    }

    /// The field's value, converted; `None` when absent.
    fn opt<T>(
        &mut self,
        key: &str,
        read: impl FnOnce(Json) -> Option<T>,
    ) -> Result<Option<T>, JsonError> {
        match self.0.iter().position(|(k, _)| k == key) {
            None => Ok(None),
            Some(i) => {
                let (_, v) = self.0.swap_remove(i);
                read(v)
                    .map(Some)
                    .ok_or_else(|| error(format!("invalid value for `{key}`")))
            }
        }
    }

    /// A field without a default.
    fn req<T>(&mut self, key: &str, read: impl FnOnce(Json) -> Option<T>) -> Result<T, JsonError> {
        self.opt(key, read)?
            .ok_or_else(|| error(format!("missing field `{key}`")))
    }

    /// An optional field that may also be `null` (`#[serde(default)]` on an `Option`).
    fn nullable<T>(
        &mut self,
        key: &str,
        read: impl FnOnce(Json) -> Option<T>,
    ) -> Result<Option<T>, JsonError> {
        Ok(self
            .opt(key, |v| match v {
                Json::Null => Some(None),
                v => read(v).map(Some),
            })?
            .flatten())
    }

    /// Refuses what is left (`#[serde(deny_unknown_fields)]`).
    fn deny_rest(self) -> Result<(), JsonError> {
        match self.0.first() {
            Some((k, _)) => Err(error(format!("unknown field `{k}`"))),
            None => Ok(()),
        }
    }
}

fn uint<T: TryFrom<u64>>(v: Json) -> Option<T> {
    match v {
        Json::U64(n) => T::try_from(n).ok(),
        _ => None,
    }
}

/// As serde reads an `f32`: any JSON number, rounded from its `u64`, `i64` or `f64`.
/// A number as f32; one beyond f32's range is refused (as `serde_json` with
/// `float_roundtrip`, which the server builds with, refuses it; without that feature it
/// would become an infinity, which no plan or spec may hold anyway).
fn float(v: Json) -> Option<f32> {
    let x = match v {
        Json::U64(n) => n as f32,
        Json::I64(n) => n as f32,
        Json::F64(n) => n as f32,
        _ => return None,
    };
    x.is_finite().then_some(x)
}

fn boolean(v: Json) -> Option<bool> {
    match v {
        Json::Bool(b) => Some(b),
        _ => None,
    }
}

fn string(v: Json) -> Option<String> {
    match v {
        Json::String(s) => Some(s),
        _ => None,
    }
}

fn dims(v: Json) -> Option<Vec<usize>> {
    match v {
        Json::Array(items) => items.into_iter().map(uint).collect(),
        _ => None,
    }
}

/// Reads a plan as `serde_json::from_str::<Plan>` does: every field optional (the default
/// plan's value), unknown fields refused, here and in `requires`.
pub fn plan(text: &str) -> Result<Plan, JsonError> {
    let mut f = Fields::new(json::parse(text)?, "a plan object")?;
    let d = Plan::default();
    let requires = match f.opt("requires", Some)? {
        None => d.requires,
        Some(v) => {
            let mut r = Fields::new(v, "a requirements object")?;
            let d = Requirements::default();
            let requires = Requirements {
                charging: r.opt("charging", boolean)?.unwrap_or(d.charging),
                idle: r.opt("idle", boolean)?.unwrap_or(d.idle),
                unmetered: r.opt("unmetered", boolean)?.unwrap_or(d.unmetered),
                min_battery: r.opt("min_battery", float)?.unwrap_or(d.min_battery),
            };
            r.deny_rest()?;
            requires
        }
    };
    let plan = Plan {
        epochs: f.opt("epochs", uint)?.unwrap_or(d.epochs),
        batch_size: f.opt("batch_size", uint)?.unwrap_or(d.batch_size),
        learning_rate: f.opt("learning_rate", float)?.unwrap_or(d.learning_rate),
        momentum: f.opt("momentum", float)?.unwrap_or(d.momentum),
        shuffle: f.opt("shuffle", boolean)?.unwrap_or(d.shuffle),
        seed: f.opt("seed", uint)?.unwrap_or(d.seed),
        mu: f.opt("mu", float)?.unwrap_or(d.mu),
        partial_work: f.opt("partial_work", boolean)?.unwrap_or(d.partial_work),
        evaluate_after_training: f
            .opt("evaluate_after_training", boolean)?
            .unwrap_or(d.evaluate_after_training),
        requires,
    };
    f.deny_rest()?;
    Ok(plan)
}

/// An internally tagged value's tag (`"type": "dense"`) and its other fields.
fn tagged(v: Json, tag: &str, what: &str) -> Result<(String, Fields), JsonError> {
    let mut f = Fields::new(v, what)?;
    let name = f.req(tag, string)?;
    Ok((name, f))
}

fn init(v: Json) -> Result<Init, JsonError> {
    let (kind, mut f) = tagged(v, "kind", "an initialiser object")?;
    Ok(match kind.as_str() {
        "constant" => Init::Constant {
            value: f.req("value", float)?,
        },
        "zeros" => Init::Zeros,
        "glorot_uniform" => Init::GlorotUniform,
        other => return Err(error(format!("unknown initialiser `{other}`"))),
    })
}

/// An optional initialiser, with the spec's default (Glorot for weights, zeros for biases).
fn init_or(f: &mut Fields, key: &str, default: Init) -> Result<Init, JsonError> {
    match f.opt(key, Some)? {
        None => Ok(default),
        Some(v) => init(v),
    }
}

fn layer(v: Json) -> Result<LayerSpec, JsonError> {
    let (kind, mut f) = tagged(v, "type", "a layer object")?;
    // Unknown fields are ignored, as serde does for an enum without deny_unknown_fields.
    Ok(match kind.as_str() {
        "dense" => LayerSpec::Dense {
            units: f.req("units", uint)?,
            weight: f.nullable("weight", string)?,
            bias: f.nullable("bias", string)?,
            weight_init: init_or(&mut f, "weight_init", Init::GlorotUniform)?,
            bias_init: init_or(&mut f, "bias_init", Init::Zeros)?,
        },
        "conv2d" => LayerSpec::Conv2d {
            filters: f.req("filters", uint)?,
            kernel: f.req("kernel", uint)?,
            stride: f.opt("stride", uint)?.unwrap_or(1),
            padding: f.req("padding", |v| match string(v)?.as_str() {
                "same" => Some(Padding::Same),
                "valid" => Some(Padding::Valid),
                _ => None,
            })?,
            weight: f.nullable("weight", string)?,
            bias: f.nullable("bias", string)?,
            weight_init: init_or(&mut f, "weight_init", Init::GlorotUniform)?,
            bias_init: init_or(&mut f, "bias_init", Init::Zeros)?,
        },
        "max_pool" => LayerSpec::MaxPool {
            size: f.req("size", uint)?,
            stride: f.nullable("stride", uint)?,
        },
        "flatten" => LayerSpec::Flatten,
        "relu" => LayerSpec::Relu,
        "sigmoid" => LayerSpec::Sigmoid,
        "tanh" => LayerSpec::Tanh,
        "embedding" => LayerSpec::Embedding {
            vocab: f.req("vocab", uint)?,
            width: f.req("width", uint)?,
            table: f.nullable("table", string)?,
            table_init: init_or(&mut f, "table_init", Init::GlorotUniform)?,
        },
        "lstm" => LayerSpec::Lstm {
            units: f.req("units", uint)?,
            return_sequences: f.opt("return_sequences", boolean)?.unwrap_or(false),
            weight: f.nullable("weight", string)?,
            recurrent: f.nullable("recurrent", string)?,
            bias: f.nullable("bias", string)?,
            weight_init: init_or(&mut f, "weight_init", Init::GlorotUniform)?,
            bias_init: init_or(&mut f, "bias_init", Init::Zeros)?,
        },
        other => return Err(error(format!("unknown layer type `{other}`"))),
    })
}

/// Reads a model spec as `serde_json::from_str::<ModelSpec>` does (unknown fields
/// ignored); the caller validates it, as [`ModelSpec::from_json`] does.
pub fn model_spec(text: &str) -> Result<ModelSpec, JsonError> {
    let mut f = Fields::new(json::parse(text)?, "a model spec object")?;
    let layers = match f.req("layers", Some)? {
        Json::Array(items) => items.into_iter().map(layer).collect::<Result<_, _>>()?,
        _ => return Err(error("invalid value for `layers`".into())),
    };
    let external = match f.opt("external", Some)? {
        None | Some(Json::Null) => None,
        Some(Json::Array(items)) => Some(
            items
                .into_iter()
                .map(|t| {
                    let mut t = Fields::new(t, "a tensor object")?;
                    Ok(TensorSpec {
                        name: t.req("name", string)?,
                        shape: t.req("shape", dims)?,
                    })
                })
                .collect::<Result<_, JsonError>>()?,
        ),
        Some(_) => return Err(error("invalid value for `external`".into())),
    };
    Ok(ModelSpec {
        name: f.req("name", string)?,
        inputs: f.req("inputs", uint)?,
        input_shape: f.nullable("input_shape", dims)?,
        layers,
        loss: f.req("loss", |v| match string(v)?.as_str() {
            "mse" => Some(LossSpec::Mse),
            "softmax_cross_entropy" => Some(LossSpec::SoftmaxCrossEntropy),
            _ => None,
        })?,
        external,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trainer::builtin;

    /// Every layer type, so that a new one in the trainer fails to compile here (the match
    /// has no wildcard) until [`layer`] reads it.
    fn layer_types() -> Vec<&'static str> {
        let all = [
            LayerSpec::Dense {
                units: 1,
                weight: None,
                bias: None,
                weight_init: Init::Zeros,
                bias_init: Init::Zeros,
            },
            LayerSpec::Conv2d {
                filters: 1,
                kernel: 1,
                stride: 1,
                padding: Padding::Same,
                weight: None,
                bias: None,
                weight_init: Init::Zeros,
                bias_init: Init::Zeros,
            },
            LayerSpec::MaxPool {
                size: 1,
                stride: None,
            },
            LayerSpec::Flatten,
            LayerSpec::Relu,
            LayerSpec::Sigmoid,
            LayerSpec::Tanh,
            LayerSpec::Embedding {
                vocab: 1,
                width: 1,
                table: None,
                table_init: Init::Zeros,
            },
            LayerSpec::Lstm {
                units: 1,
                return_sequences: false,
                weight: None,
                recurrent: None,
                bias: None,
                weight_init: Init::Zeros,
                bias_init: Init::Zeros,
            },
        ];
        all.iter()
            .map(|l| match l {
                LayerSpec::Dense { .. } => "dense",
                LayerSpec::Conv2d { .. } => "conv2d",
                LayerSpec::MaxPool { .. } => "max_pool",
                LayerSpec::Flatten => "flatten",
                LayerSpec::Relu => "relu",
                LayerSpec::Sigmoid => "sigmoid",
                LayerSpec::Tanh => "tanh",
                LayerSpec::Embedding { .. } => "embedding",
                LayerSpec::Lstm { .. } => "lstm",
            })
            .collect()
    }

    fn same_spec(text: &str) {
        let ours = model_spec(text);
        let theirs = serde_json::from_str::<ModelSpec>(text);
        assert_eq!(ours.as_ref().ok(), theirs.as_ref().ok(), "{text}");
        assert_eq!(ours.is_err(), theirs.is_err(), "{text}: {ours:?}");
    }

    fn same_plan(text: &str) {
        let ours = plan(text);
        let theirs = serde_json::from_str::<Plan>(text);
        assert_eq!(ours.as_ref().ok(), theirs.as_ref().ok(), "{text}");
        assert_eq!(ours.is_err(), theirs.is_err(), "{text}: {ours:?}");
    }

    #[test]
    fn built_in_specs_and_plans_read_as_with_serde_json() {
        for name in builtin::NAMES {
            let spec = builtin::by_name(name, 16, 3).unwrap();
            assert_eq!(model_spec(&spec.to_json()).unwrap(), spec, "{name}");
            let p = builtin::default_plan(name);
            assert_eq!(plan(&serde_json::to_string(&p).unwrap()).unwrap(), p);
        }
        let every = ModelSpec {
            name: "every".into(),
            inputs: 16,
            input_shape: Some(vec![1, 4, 4]),
            layers: layer_types()
                .iter()
                .map(|t| {
                    serde_json::from_str(&format!(
                        r#"{{"type":"{t}","units":2,"filters":2,"kernel":1,"size":1,
                             "padding":"valid","stride":1,"vocab":3,"width":2,
                             "return_sequences":true,"recurrent":"r"}}"#
                    ))
                    .unwrap()
                })
                .collect(),
            loss: LossSpec::SoftmaxCrossEntropy,
            external: None,
        };
        same_spec(&serde_json::to_string(&every).unwrap());
        assert_eq!(
            model_spec(&serde_json::to_string(&every).unwrap()).unwrap(),
            every
        );
    }

    #[test]
    fn specs_read_as_with_serde_json() {
        for text in [
            r#"{"name":"x","inputs":4,"input_shape":[1,2,2],"loss":"softmax_cross_entropy",
                "layers":[{"type":"conv2d","filters":2,"kernel":2,"padding":"same",
                           "weight_init":{"kind":"constant","value":0.25},"extra":1},
                          {"type":"max_pool","size":2,"stride":null},{"type":"flatten","x":1},
                          {"type":"relu"},{"type":"tanh"},{"type":"sigmoid"},
                          {"type":"dense","units":3,"weight":"w","bias":null,
                           "bias_init":{"kind":"zeros"}}],
                "unknown":1}"#,
            r#"{"name":"e","inputs":1,"layers":[],"loss":"mse","input_shape":null,
                "external":[{"name":"t","shape":[2,3]}]}"#,
            r#"{"name":"e","inputs":1,"layers":[],"loss":"mse","external":null}"#,
            r#"{"name":"e","inputs":1,"layers":[],"loss":"mse","external":[{"name":"t"}]}"#,
            r#"{"name":"x","inputs":1,"layers":[{"type":"dense","units":1.5}],"loss":"mse"}"#,
            r#"{"name":"x","inputs":1,"layers":[{"type":"dense","units":-1}],"loss":"mse"}"#,
            r#"{"name":"x","inputs":1,"layers":[{"type":"dense"}],"loss":"mse"}"#,
            r#"{"name":"x","inputs":1,"layers":[{"type":"conv"}],"loss":"mse"}"#,
            r#"{"name":"x","inputs":1,"layers":[{"units":1}],"loss":"mse"}"#,
            r#"{"name":"x","inputs":1,"layers":[{"type":"dense","units":1,"weight_init":{"kind":"constant"}}],"loss":"mse"}"#,
            r#"{"name":"x","inputs":1,"layers":[{"type":"dense","units":1,"weight_init":{"kind":"ones"}}],"loss":"mse"}"#,
            r#"{"name":"x","inputs":1,"layers":[{"type":"conv2d","filters":1,"kernel":1,"padding":"full"}],"loss":"mse"}"#,
            r#"{"name":"x","inputs":1,"layers":[{"type":"conv2d","filters":1,"kernel":1}],"loss":"mse"}"#,
            r#"{"name":"x","inputs":-1,"layers":[],"loss":"mse"}"#,
            r#"{"name":"x","inputs":1,"layers":[],"loss":"l1"}"#,
            r#"{"name":"x","inputs":1,"layers":{},"loss":"mse"}"#,
            r#"{"name":"x","name":"y","inputs":1,"layers":[],"loss":"mse"}"#,
            r#"{"name":"x","layers":[],"loss":"mse"}"#,
            r#"{"name":1,"inputs":1,"layers":[],"loss":"mse"}"#,
            r#"{"name":"x","inputs":1,"input_shape":[1,-2],"layers":[],"loss":"mse"}"#,
            r#"[1]"#,
            r#"{"#,
        ] {
            same_spec(text);
        }
    }

    #[test]
    fn plans_read_as_with_serde_json() {
        for text in [
            r#"{}"#,
            r#"{"epochs":3,"batch_size":2,"learning_rate":0.05,"momentum":0.9,"mu":0.01,
                "shuffle":false,"seed":7,"partial_work":true,
                "requires":{"charging":true,"idle":true,"unmetered":false,"min_battery":0.5}}"#,
            r#"{"learning_rate":0.1}"#,
            r#"{"learning_rate":1}"#,
            r#"{"learning_rate":-1}"#,
            r#"{"learning_rate":1e-3,"epochs":1}"#,
            r#"{"learning_rate":0.123456789012345678901234567890}"#,
            r#"{"learning_rate":null}"#,
            r#"{"bogus":1}"#,
            r#"{"requires":{"bogus":true}}"#,
            r#"{"requires":null}"#,
            r#"{"epochs":-1}"#,
            r#"{"epochs":1.0}"#,
            r#"{"epochs":4294967296}"#,
            r#"{"seed":18446744073709551615}"#,
            r#"{"shuffle":1}"#,
            r#"{"learning_rate":"0.1"}"#,
            r#"{"epochs":1,"epochs":2}"#,
            r#"1"#,
        ] {
            same_plan(text);
        }
        // Beyond f32's range: `serde_json` refuses it with `float_roundtrip` (as the server
        // builds it) and makes it an infinity without; this reader refuses it.
        assert!(plan(r#"{"learning_rate":3.4028236e38}"#).is_err());
        assert!(plan(r#"{"learning_rate":-1e39}"#).is_err());
    }
}
