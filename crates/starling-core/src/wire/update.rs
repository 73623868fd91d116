//! The update wire format and its validation (DESIGN.md invariant 3).
//!
//! An update is a safetensors body: one F32 tensor per parameter, holding the *difference*
//! between the parameters the device trained from and those it ended with, plus string
//! metadata: `base_version`, `examples`, `token` (the assignment) and optionally `loss` and
//! `accuracy` (local metrics after training); any other field is refused.
//! [`check`] checks everything that can be checked without the round's state and returns a
//! [`CheckedUpdate`]: the only thing an aggregate folds (DESIGN.md invariant 3). It owns the
//! request body and locates the tensors in it once without copying them; folding consumes it.
//! (Zeroing freed memory is the serving binary's allocator's job: `starling` zeroes every block
//! it frees, with `memset`, which is four times faster than a volatile loop and also reaches the
//! HTTP library's buffers, which no wrapper type here could.)
//! [`decode`] gives a borrowed [`UpdateView`] for inspection (tests, the browser's checks).

use std::collections::HashMap;
use std::ops::Range;

use crate::wire::params::{decode_views, f32s_from_le, Layout, Parameters, ParamsError};
use crate::wire::protocol::parse_canonical_u64;

/// Metadata of an update.
#[derive(Debug, Clone, PartialEq)]
pub struct UpdateMeta {
    /// The model version the device trained from.
    pub base_version: u64,
    /// Examples the device trained on: the update's weight in the average.
    pub examples: u64,
    /// Mean local loss after training, if the device reports it.
    pub loss: Option<f32>,
    /// Local accuracy after training (classifiers), if the device reports it.
    pub accuracy: Option<f32>,
    /// The upload token of the assignment this update answers.
    pub token: String,
}

/// Why an update was refused. Every variant leaves the aggregate untouched.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum UpdateError {
    /// The body is not a usable safetensors file, or its tensors do not match the model.
    #[error(transparent)]
    Params(#[from] ParamsError),
    /// A metadata field is missing.
    #[error("update metadata lacks `{0}`")]
    MissingField(&'static str),
    /// A metadata field does not parse.
    #[error("update metadata `{field}` is invalid: `{value}`")]
    InvalidField {
        /// The field.
        field: &'static str,
        /// Its value.
        value: String,
    },
    /// The example count is zero, negative, or beyond [`MAX_EXAMPLES`].
    #[error("an update must count between 1 and {MAX_EXAMPLES} examples, got {0}")]
    NoExamples(i64),
    /// The metadata has a field the protocol does not define: an update carries nothing but
    /// the fields of [`UpdateMeta`] (DESIGN.md invariant 2).
    #[error("update metadata has an unknown field `{0}`")]
    UnknownField(String),
    /// A value is NaN or infinite.
    #[error("tensor `{0}` holds a NaN or infinite value")]
    NotFinite(String),
    /// The update's norm exceeds the task's bound.
    #[error("update norm {norm:.4} exceeds the bound {bound}")]
    NormTooLarge {
        /// The update's L2 norm.
        norm: f64,
        /// The bound.
        bound: f64,
    },
}

/// A decoded, checked update whose tensors borrow the request body.
#[derive(Debug)]
pub struct UpdateView<'a> {
    /// The metadata.
    pub meta: UpdateMeta,
    /// Each parameter's little-endian f32 bytes, in layout order.
    pub tensors: Vec<&'a [u8]>,
    /// The update's L2 norm, when a norm bound made [`decode`] compute it.
    pub norm: Option<f64>,
}

/// How much one update weighs in the average. The weight is decided here, by validation, and
/// nowhere else: a device can claim any example count, but it cannot weigh more than this.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Weighting {
    /// By the claimed example count, capped at `cap` (FedAvg with bounded influence).
    Examples {
        /// The most weight one update carries.
        cap: u64,
    },
    /// Every update weighs 1, whatever it claims.
    Uniform,
}

/// What a task requires of an update beyond the wire format.
#[derive(Debug, Clone)]
pub struct Rules {
    /// The model's tensor names and shapes.
    pub layout: Layout,
    /// The largest L2 norm an update may have.
    pub max_norm: Option<f64>,
    /// How updates are weighted.
    pub weighting: Weighting,
    /// Differential privacy's clip bound: an update whose L2 norm exceeds it is scaled down
    /// to it (not refused), so that no device moves the sum by more (`None`: no clipping).
    pub clip: Option<f64>,
}

impl Rules {
    /// Rules of a layout with no norm bound and uncapped example weighting (tests, benches).
    pub fn lenient(layout: &Layout) -> Self {
        Self {
            layout: layout.clone(),
            max_norm: None,
            weighting: Weighting::Examples {
                cap: MAX_EXAMPLES as u64,
            },
            clip: None,
        }
    }
}

/// An update that passed [`check`]: the only type an aggregate folds. It owns the request
/// body and knows where each tensor lies in it.
pub struct CheckedUpdate {
    body: Vec<u8>,
    tensors: Vec<Range<usize>>,
    meta: UpdateMeta,
    weight: f64,
    scale: f64,
}

impl std::fmt::Debug for CheckedUpdate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the values: an update's numbers stay out of logs (invariant 1).
        f.debug_struct("CheckedUpdate")
            .field("meta", &self.meta)
            .field("weight", &self.weight)
            .field("scale", &self.scale)
            .field("bytes", &self.body.len())
            .finish()
    }
}

impl CheckedUpdate {
    /// The metadata.
    pub fn meta(&self) -> &UpdateMeta {
        &self.meta
    }

    /// The update's weight in the average, as [`Weighting`] decided it.
    pub fn weight(&self) -> f64 {
        self.weight
    }

    /// Each parameter's little-endian f32 bytes, in layout order.
    pub fn tensors(&self) -> impl Iterator<Item = &[u8]> {
        self.tensors.iter().map(|r| &self.body[r.clone()])
    }

    /// The factor the values are folded with: `min(1, clip / ‖update‖)` under the rules'
    /// clip bound, else 1.
    pub fn scale(&self) -> f64 {
        self.scale
    }

    /// Whether the clip bound scaled this update down.
    pub fn was_clipped(&self) -> bool {
        self.scale < 1.0
    }
}

/// The L2 norm of little-endian f32 tensors, accumulated in f64.
fn l2_norm(tensors: &[&[u8]]) -> f64 {
    tensors
        .iter()
        .map(|data| match bytemuck::try_cast_slice::<u8, f32>(data) {
            Ok(values) if cfg!(target_endian = "little") => {
                crate::aggregate::kernels::sum_squares(values)
            }
            _ => f32s_from_le(data)
                .map(|v| f64::from(v) * f64::from(v))
                .sum(),
        })
        .sum::<f64>()
        .sqrt()
}

/// The largest body an update of `layout` can need: its values plus a generous allowance for
/// the safetensors header (names, shapes, offsets, the metadata). The server refuses a larger
/// upload before reading it.
pub fn max_encoded_len(layout: &Layout) -> usize {
    let names: usize = layout
        .entries()
        .iter()
        .map(|(n, s)| n.len() + 24 * s.len() + 96)
        .sum();
    8 + 4096 + names + 4 * layout.numel()
}

/// Checks an update against a task's rules: the safetensors structure, exactly the model's
/// tensors, the metadata, finite values, the norm bound. A refused body is dropped here.
pub fn check(body: Vec<u8>, rules: &Rules) -> Result<CheckedUpdate, UpdateError> {
    let view = decode(&body, &rules.layout, rules.max_norm)?;
    let start = body.as_ptr() as usize;
    let tensors = view
        .tensors
        .iter()
        .map(|t| {
            let offset = t.as_ptr() as usize - start;
            offset..offset + t.len()
        })
        .collect();
    let scale = match rules.clip {
        Some(clip) => {
            let norm = view.norm.unwrap_or_else(|| l2_norm(&view.tensors));
            if norm > clip {
                clip / norm
            } else {
                1.0
            }
        }
        None => 1.0,
    };
    let meta = view.meta;
    let weight = match rules.weighting {
        Weighting::Examples { cap } => meta.examples.min(cap) as f64,
        Weighting::Uniform => 1.0,
    };
    Ok(CheckedUpdate {
        body,
        tensors,
        meta,
        weight,
        scale,
    })
}

/// Encodes an update for upload.
pub fn encode(delta: &Parameters, meta: &UpdateMeta) -> Vec<u8> {
    let mut m = HashMap::from([
        ("base_version".to_string(), meta.base_version.to_string()),
        ("examples".to_string(), meta.examples.to_string()),
        ("token".to_string(), meta.token.clone()),
    ]);
    if let Some(l) = meta.loss {
        m.insert("loss".into(), l.to_string());
    }
    if let Some(a) = meta.accuracy {
        m.insert("accuracy".into(), a.to_string());
    }
    delta.to_safetensors(Some(m))
}

/// The largest example count one update may claim: far above any device's data, low enough
/// that sums of counts and weights can never overflow.
pub const MAX_EXAMPLES: i64 = 1_000_000_000;

/// The metadata fields an update may carry.
const FIELDS: [&str; 5] = ["base_version", "examples", "token", "loss", "accuracy"];

fn field<'m>(m: &'m HashMap<String, String>, name: &'static str) -> Result<&'m str, UpdateError> {
    m.get(name)
        .map(String::as_str)
        .ok_or(UpdateError::MissingField(name))
}

fn parse_meta(m: &HashMap<String, String>) -> Result<UpdateMeta, UpdateError> {
    let invalid = |field: &'static str, value: &str| UpdateError::InvalidField {
        field,
        value: value.chars().take(40).collect(),
    };
    // The smallest unknown key, so that the same body always gets the same message.
    if let Some(k) = m.keys().filter(|k| !FIELDS.contains(&k.as_str())).min() {
        return Err(UpdateError::UnknownField(k.chars().take(40).collect()));
    }
    let bv = field(m, "base_version")?;
    let base_version = parse_canonical_u64(bv).ok_or_else(|| invalid("base_version", bv))?;
    let ex = field(m, "examples")?;
    // A plain decimal number, possibly negative (refused below with its value).
    let examples: i64 = match ex.strip_prefix('-') {
        Some(digits) => parse_canonical_u64(digits)
            .and_then(|v| i64::try_from(v).ok())
            .map(|v| -v),
        None => parse_canonical_u64(ex).map(|v| i64::try_from(v).unwrap_or(i64::MAX)),
    }
    .ok_or_else(|| invalid("examples", ex))?;
    if !(1..=MAX_EXAMPLES).contains(&examples) {
        return Err(UpdateError::NoExamples(examples));
    }
    let token = field(m, "token")?.to_string();
    let loss = match m.get("loss") {
        None => None,
        Some(l) => {
            let v: f32 = l.parse().map_err(|_| invalid("loss", l))?;
            // Losses (MSE, cross-entropy) are never negative: a negative one is a lie that
            // would drag the round's mean below what any device saw.
            if !(v.is_finite() && v >= 0.0) {
                return Err(invalid("loss", l));
            }
            Some(v)
        }
    };
    let accuracy = match m.get("accuracy") {
        None => None,
        Some(a) => {
            let v: f32 = a.parse().map_err(|_| invalid("accuracy", a))?;
            if !(0.0..=1.0).contains(&v) {
                return Err(invalid("accuracy", a));
            }
            Some(v)
        }
    };
    Ok(UpdateMeta {
        base_version,
        examples: examples as u64,
        loss,
        accuracy,
        token,
    })
}

/// Decodes and checks an update against the model's layout and an optional L2-norm bound.
pub fn decode<'a>(
    bytes: &'a [u8],
    layout: &Layout,
    max_norm: Option<f64>,
) -> Result<UpdateView<'a>, UpdateError> {
    let (tensors, metadata) = decode_views(bytes, layout)?;
    let meta = parse_meta(&metadata)?;
    for (data, (name, _)) in tensors.iter().zip(layout.entries()) {
        let finite = match bytemuck::try_cast_slice::<u8, f32>(data) {
            Ok(values) if cfg!(target_endian = "little") => {
                crate::aggregate::kernels::all_finite(values)
            }
            _ => f32s_from_le(data).all(f32::is_finite),
        };
        if !finite {
            return Err(UpdateError::NotFinite(name.clone()));
        }
    }
    let mut norm = None;
    if let Some(bound) = max_norm {
        let n = l2_norm(&tensors);
        if n > bound {
            return Err(UpdateError::NormTooLarge { norm: n, bound });
        }
        norm = Some(n);
    }
    Ok(UpdateView {
        meta,
        tensors,
        norm,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::Tensor;

    fn delta(v: f32) -> Parameters {
        Parameters::new(vec![
            ("W".into(), Tensor::full(vec![1, 1], v)),
            ("b".into(), Tensor::full(vec![1], v)),
        ])
        .unwrap()
    }

    fn meta(examples: u64) -> UpdateMeta {
        UpdateMeta {
            base_version: 3,
            examples,
            loss: Some(0.5),
            accuracy: Some(0.75),
            token: "t".into(),
        }
    }

    #[test]
    fn round_trip() {
        let d = delta(1.5);
        let bytes = encode(&d, &meta(7));
        let v = decode(&bytes, &d.layout(), None).unwrap();
        assert_eq!(v.meta, meta(7));
        assert_eq!(v.tensors.len(), 2);
    }

    /// The weight comes from the rules, not from the claim: a device that claims a billion
    /// examples weighs no more than the cap.
    #[test]
    fn checked_updates_carry_a_bounded_weight() {
        let d = delta(1.0);
        let rules = |weighting| Rules {
            clip: None,
            layout: d.layout(),
            max_norm: Some(10.0),
            weighting,
        };
        let body = encode(&d, &meta(1_000_000_000));
        let capped = check(body.clone(), &rules(Weighting::Examples { cap: 100 })).unwrap();
        assert_eq!(capped.weight(), 100.0);
        assert_eq!(capped.meta().examples, 1_000_000_000);
        let uniform = check(body.clone(), &rules(Weighting::Uniform)).unwrap();
        assert_eq!(uniform.weight(), 1.0);
        let small = check(
            encode(&d, &meta(7)),
            &rules(Weighting::Examples { cap: 100 }),
        )
        .unwrap();
        assert_eq!(small.weight(), 7.0);
        let values: Vec<f32> = small.tensors().flat_map(f32s_from_le).collect();
        assert_eq!(values, vec![1.0, 1.0]);
        assert!(!format!("{small:?}").contains("1.0, 1.0"));
    }

    #[test]
    fn refusals_name_their_cause() {
        let layout = delta(0.0).layout();
        let nan = encode(&delta(f32::NAN), &meta(1));
        assert_eq!(
            decode(&nan, &layout, None).unwrap_err(),
            UpdateError::NotFinite("W".into())
        );
        let inf = encode(&delta(f32::INFINITY), &meta(1));
        assert!(matches!(
            decode(&inf, &layout, None),
            Err(UpdateError::NotFinite(_))
        ));
        let big = encode(&delta(10.0), &meta(1));
        assert!(matches!(
            decode(&big, &layout, Some(1.0)),
            Err(UpdateError::NormTooLarge { .. })
        ));
        let mut m = HashMap::from([
            ("base_version".to_string(), "1".to_string()),
            ("examples".to_string(), "-4".to_string()),
            ("token".to_string(), "t".to_string()),
        ]);
        let neg = delta(1.0).to_safetensors(Some(m.clone()));
        assert_eq!(
            decode(&neg, &layout, None).unwrap_err(),
            UpdateError::NoExamples(-4)
        );
        m.insert("examples".into(), "1000000001".into());
        let huge = delta(1.0).to_safetensors(Some(m.clone()));
        assert_eq!(
            decode(&huge, &layout, None).unwrap_err(),
            UpdateError::NoExamples(1_000_000_001)
        );
        m.insert("examples".into(), "4".into());
        m.insert("photo".into(), "data:image/png;base64,...".into());
        let extra = delta(1.0).to_safetensors(Some(m.clone()));
        assert_eq!(
            decode(&extra, &layout, None).unwrap_err(),
            UpdateError::UnknownField("photo".into())
        );
        m.remove("photo");
        m.insert("accuracy".into(), "1.5".into());
        let acc = delta(1.0).to_safetensors(Some(m.clone()));
        assert!(matches!(
            decode(&acc, &layout, None),
            Err(UpdateError::InvalidField {
                field: "accuracy",
                ..
            })
        ));
        m.remove("accuracy");
        for (field, value) in [
            ("examples", "+4"),
            ("examples", "04"),
            ("examples", "4.0"),
            ("base_version", "+1"),
            ("base_version", "01"),
            ("loss", "-0.5"),
            ("loss", "inf"),
        ] {
            let mut bad = m.clone();
            bad.insert(field.into(), value.into());
            let body = delta(1.0).to_safetensors(Some(bad));
            assert!(
                matches!(
                    decode(&body, &layout, None),
                    Err(UpdateError::InvalidField { .. })
                ),
                "{field} = {value:?} must be refused"
            );
        }
        m.remove("token");
        m.insert("examples".into(), "4".into());
        let no_token = delta(1.0).to_safetensors(Some(m));
        assert_eq!(
            decode(&no_token, &layout, None).unwrap_err(),
            UpdateError::MissingField("token")
        );
    }
}
