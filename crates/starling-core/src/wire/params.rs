//! Ordered sets of named f32 tensors ([`Parameters`]), their [`Layout`] (names and shapes),
//! and the safetensors codec used on the wire and on disk.

#[cfg(not(target_arch = "wasm32"))]
use std::borrow::Cow;
use std::collections::HashMap;

#[cfg(not(target_arch = "wasm32"))]
use safetensors::tensor::{Dtype, SafeTensors, View};

use crate::tensor::{numel, Tensor};

/// Errors of the parameter codec and of combining parameter sets.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ParamsError {
    /// The bytes are not a valid safetensors file.
    #[error("not a valid safetensors body: {0}")]
    Malformed(String),
    /// A tensor has a dtype other than F32.
    #[error("tensor `{name}` has dtype {dtype}, expected F32")]
    WrongDtype {
        /// The tensor's name.
        name: String,
        /// The dtype found.
        dtype: String,
    },
    /// A tensor the layout requires is absent.
    #[error("tensor `{0}` is missing")]
    Missing(String),
    /// A tensor the layout does not know is present.
    #[error("unexpected tensor `{0}`")]
    Unexpected(String),
    /// A tensor has the wrong shape.
    #[error("tensor `{name}` has shape {found:?}, expected {expected:?}")]
    WrongShape {
        /// The tensor's name.
        name: String,
        /// The shape the layout requires.
        expected: Vec<usize>,
        /// The shape found.
        found: Vec<usize>,
    },
    /// The same name appears twice.
    #[error("tensor `{0}` appears twice")]
    Duplicate(String),
}

/// The names and shapes of a parameter set, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    entries: Vec<(String, Vec<usize>)>,
}

impl Layout {
    /// A layout from `(name, shape)` pairs.
    pub fn new(entries: Vec<(String, Vec<usize>)>) -> Self {
        Self { entries }
    }

    /// The `(name, shape)` pairs in order.
    pub fn entries(&self) -> &[(String, Vec<usize>)] {
        &self.entries
    }

    /// The position of a name.
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.entries.iter().position(|(n, _)| n == name)
    }

    /// The total number of scalar parameters.
    pub fn numel(&self) -> usize {
        self.entries.iter().map(|(_, s)| numel(s)).sum()
    }
}

/// An ordered set of named f32 tensors: a model's weights, or an update's delta.
#[derive(Debug, Clone, PartialEq)]
pub struct Parameters {
    tensors: Vec<(String, Tensor)>,
}

/// A borrowed view of an f32 tensor for the safetensors serializer.
#[cfg(not(target_arch = "wasm32"))]
struct F32View<'a>(&'a Tensor);

#[cfg(not(target_arch = "wasm32"))]
impl View for F32View<'_> {
    fn dtype(&self) -> Dtype {
        Dtype::F32
    }
    fn shape(&self) -> &[usize] {
        self.0.shape()
    }
    fn data(&self) -> Cow<'_, [u8]> {
        let mut bytes = Vec::with_capacity(self.0.len() * 4);
        for v in self.0.data() {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
        Cow::Owned(bytes)
    }
    fn data_len(&self) -> usize {
        self.0.len() * 4
    }
}

/// Reads little-endian f32 values out of a byte slice (no alignment needed).
pub fn f32s_from_le(bytes: &[u8]) -> impl ExactSizeIterator<Item = f32> + '_ {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
}

impl Parameters {
    /// A parameter set from named tensors, in order. Names must be unique.
    pub fn new(tensors: Vec<(String, Tensor)>) -> Result<Self, ParamsError> {
        for (i, (name, _)) in tensors.iter().enumerate() {
            if tensors[..i].iter().any(|(n, _)| n == name) {
                return Err(ParamsError::Duplicate(name.clone()));
            }
        }
        Ok(Self { tensors })
    }

    /// Zeros in the given layout.
    pub fn zeros(layout: &Layout) -> Self {
        Self {
            tensors: layout
                .entries()
                .iter()
                .map(|(n, s)| (n.clone(), Tensor::zeros(s.clone())))
                .collect(),
        }
    }

    /// The layout (names and shapes).
    pub fn layout(&self) -> Layout {
        Layout::new(
            self.tensors
                .iter()
                .map(|(n, t)| (n.clone(), t.shape().to_vec()))
                .collect(),
        )
    }

    /// The tensor with this name.
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.tensors.iter().find(|(n, _)| n == name).map(|(_, t)| t)
    }

    /// The tensor with this name, mutable.
    pub fn get_mut(&mut self, name: &str) -> Option<&mut Tensor> {
        self.tensors
            .iter_mut()
            .find(|(n, _)| n == name)
            .map(|(_, t)| t)
    }

    /// The `(name, tensor)` pairs in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Tensor)> {
        self.tensors.iter().map(|(n, t)| (n.as_str(), t))
    }

    /// The tensors in order, mutable.
    pub fn tensors_mut(&mut self) -> impl Iterator<Item = &mut Tensor> {
        self.tensors.iter_mut().map(|(_, t)| t)
    }

    /// The tensor at a position.
    pub fn at(&self, index: usize) -> &Tensor {
        &self.tensors[index].1
    }

    /// The tensor at a position, mutable.
    pub fn at_mut(&mut self, index: usize) -> &mut Tensor {
        &mut self.tensors[index].1
    }

    /// The number of tensors.
    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    /// True when there are no tensors.
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// `self - other`, tensor by tensor; the layouts must match.
    pub fn sub(&self, other: &Parameters) -> Result<Parameters, ParamsError> {
        other.check_layout(&self.layout())?;
        Ok(Parameters {
            tensors: self
                .tensors
                .iter()
                .zip(&other.tensors)
                .map(|((n, a), (_, b))| {
                    let data = a.data().iter().zip(b.data()).map(|(x, y)| x - y).collect();
                    (n.clone(), Tensor::new(a.shape().to_vec(), data).unwrap())
                })
                .collect(),
        })
    }

    /// The Euclidean norm over all values (computed in f64).
    pub fn l2_norm(&self) -> f64 {
        self.tensors
            .iter()
            .flat_map(|(_, t)| t.data())
            .map(|&v| f64::from(v) * f64::from(v))
            .sum::<f64>()
            .sqrt()
    }

    /// Checks that this set has exactly the layout's names and shapes, in order.
    pub fn check_layout(&self, layout: &Layout) -> Result<(), ParamsError> {
        check_names_and_shapes(
            self.tensors.iter().map(|(n, t)| (n.as_str(), t.shape())),
            layout,
        )
        .map(|_| ())
    }

    /// Encodes as safetensors with optional string metadata (`__metadata__`).
    pub fn to_safetensors(&self, metadata: Option<HashMap<String, String>>) -> Vec<u8> {
        #[cfg(not(target_arch = "wasm32"))]
        return safetensors::serialize(
            self.tensors.iter().map(|(n, t)| (n.as_str(), F32View(t))),
            metadata,
        )
        .expect("f32 tensors with consistent shapes always serialize");
        // The browser's lean codec writes the tensors in layout order (the crate sorts
        // them by name; the format keeps no order).
        #[cfg(target_arch = "wasm32")]
        return super::header::write(
            self.tensors
                .iter()
                .map(|(n, t)| (n.as_str(), t.shape(), t.data())),
            metadata.as_ref(),
        );
    }

    /// Decodes a safetensors body into parameters in the order of `layout`, returning the
    /// metadata too. Every tensor must be F32 and match the layout exactly.
    pub fn from_safetensors_with_layout(
        bytes: &[u8],
        layout: &Layout,
    ) -> Result<(Parameters, HashMap<String, String>), ParamsError> {
        let (views, metadata) = decode_views(bytes, layout)?;
        let tensors = views
            .into_iter()
            .zip(layout.entries())
            .map(|(data, (name, shape))| {
                let t = Tensor::new(shape.clone(), f32s_from_le(data).collect()).unwrap();
                (name.clone(), t)
            })
            .collect();
        Ok((Parameters { tensors }, metadata))
    }

    /// Decodes a safetensors body with any F32 tensors, sorted by name (safetensors itself
    /// keeps no order), returning the metadata too.
    pub fn from_safetensors(
        bytes: &[u8],
    ) -> Result<(Parameters, HashMap<String, String>), ParamsError> {
        let (raw, metadata) = read_body(bytes)?;
        let mut tensors = Vec::with_capacity(raw.len());
        // By name (see `read_body`), so that of several wrong dtypes the same is named.
        for t in raw {
            if let Some(dtype) = t.wrong_dtype {
                return Err(ParamsError::WrongDtype {
                    name: t.name,
                    dtype,
                });
            }
            let name = t.name;
            let t = Tensor::new(t.shape, f32s_from_le(t.data).collect())
                .ok_or_else(|| ParamsError::Malformed(format!("tensor `{name}` size")))?;
            tensors.push((name, t));
        }
        Ok((Parameters { tensors }, metadata))
    }
}

/// One tensor of a safetensors body, its bytes borrowed.
struct RawTensor<'a> {
    name: String,
    /// The dtype's name when it is not F32.
    wrong_dtype: Option<String>,
    shape: Vec<usize>,
    data: &'a [u8],
}

/// A safetensors body's tensors, sorted by name (safetensors itself keeps no order), and its
/// string metadata: through the `safetensors` crate natively, through the lean
/// [`super::header`] codec in the browser, where `serde_json` would double the module.
fn read_body(bytes: &[u8]) -> Result<(Vec<RawTensor<'_>>, HashMap<String, String>), ParamsError> {
    #[cfg(not(target_arch = "wasm32"))]
    let (tensors, metadata) = {
        let malformed = |e: safetensors::SafeTensorError| ParamsError::Malformed(e.to_string());
        let st = SafeTensors::deserialize(bytes).map_err(malformed)?;
        let (_, meta) = SafeTensors::read_metadata(bytes).map_err(malformed)?;
        let mut tensors: Vec<RawTensor<'_>> = st
            .tensors()
            .into_iter()
            .map(|(name, view)| RawTensor {
                name,
                wrong_dtype: (view.dtype() != Dtype::F32).then(|| format!("{:?}", view.dtype())),
                shape: view.shape().to_vec(),
                data: view.data(),
            })
            .collect();
        tensors.sort_unstable_by(|a, b| a.name.cmp(&b.name));
        (tensors, meta.metadata().clone().unwrap_or_default())
    };
    #[cfg(target_arch = "wasm32")]
    let (tensors, metadata) = {
        let (entries, metadata) = super::header::read(bytes).map_err(ParamsError::Malformed)?;
        let mut tensors: Vec<RawTensor<'_>> = entries
            .into_iter()
            .map(|e| RawTensor {
                name: e.name,
                wrong_dtype: (e.dtype != "F32").then_some(e.dtype),
                shape: e.shape,
                data: e.data,
            })
            .collect();
        super::header::insertion_sort(&mut tensors, |a, b| a.name < b.name);
        (tensors, metadata)
    };
    Ok((tensors, metadata))
}

/// Checks `(name, shape)` pairs against a layout; returns, for each layout entry, the
/// position of the pair that provides it.
fn check_names_and_shapes<'a>(
    found: impl Iterator<Item = (&'a str, &'a [usize])>,
    layout: &Layout,
) -> Result<Vec<usize>, ParamsError> {
    let mut slots: Vec<Option<usize>> = vec![None; layout.entries().len()];
    for (i, (name, shape)) in found.enumerate() {
        let Some(idx) = layout.index_of(name) else {
            return Err(ParamsError::Unexpected(name.to_string()));
        };
        if slots[idx].is_some() {
            return Err(ParamsError::Duplicate(name.to_string()));
        }
        let expected = &layout.entries()[idx].1;
        if expected.as_slice() != shape {
            return Err(ParamsError::WrongShape {
                name: name.to_string(),
                expected: expected.clone(),
                found: shape.to_vec(),
            });
        }
        slots[idx] = Some(i);
    }
    slots
        .into_iter()
        .zip(layout.entries())
        .map(|(s, (n, _))| s.ok_or_else(|| ParamsError::Missing(n.clone())))
        .collect()
}

/// Each tensor's raw little-endian bytes in layout order, and the string metadata.
pub type RawTensors<'a> = (Vec<&'a [u8]>, HashMap<String, String>);

/// Parses a safetensors body without copying tensor data: returns each layout entry's raw
/// little-endian bytes, in layout order, and the string metadata.
pub fn decode_views<'a>(bytes: &'a [u8], layout: &Layout) -> Result<RawTensors<'a>, ParamsError> {
    // By name, so that a body with several faults always names the same one (safetensors
    // hands the tensors over in hash order).
    let (views, metadata) = read_body(bytes)?;
    for view in &views {
        if let Some(dtype) = &view.wrong_dtype {
            return Err(ParamsError::WrongDtype {
                name: view.name.clone(),
                dtype: dtype.clone(),
            });
        }
    }
    let order = check_names_and_shapes(
        views.iter().map(|v| (v.name.as_str(), v.shape.as_slice())),
        layout,
    )?;
    Ok((order.into_iter().map(|i| views[i].data).collect(), metadata))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Parameters {
        Parameters::new(vec![
            (
                "W".into(),
                Tensor::new(vec![2, 1], vec![1.5, -2.0]).unwrap(),
            ),
            ("b".into(), Tensor::new(vec![1], vec![0.25]).unwrap()),
        ])
        .unwrap()
    }

    /// A body with several faulty tensors names the same one every time it is decoded.
    #[test]
    fn several_faults_are_named_the_same_every_time() {
        let layout = Layout::new(vec![("a".into(), vec![1]), ("b".into(), vec![1])]);
        let mut header = String::from("{");
        for (i, name) in ["zeta", "eta", "theta", "iota", "kappa"].iter().enumerate() {
            header += &format!(
                "\"{name}\":{{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[{i},{}]}},",
                i + 1
            );
        }
        header.pop();
        header += "}";
        while header.len() % 8 != 0 {
            header.push(' ');
        }
        let mut body = (header.len() as u64).to_le_bytes().to_vec();
        body.extend_from_slice(header.as_bytes());
        body.extend_from_slice(&[0u8; 5]);
        let first = decode_views(&body, &layout).unwrap_err();
        assert_eq!(
            first,
            ParamsError::WrongDtype {
                name: "eta".into(),
                dtype: "U8".into()
            }
        );
        for _ in 0..20 {
            assert_eq!(decode_views(&body, &layout).unwrap_err(), first);
        }
    }

    #[test]
    fn safetensors_round_trip_keeps_values_order_and_metadata() {
        let p = sample();
        let meta = HashMap::from([("k".to_string(), "v".to_string())]);
        let bytes = p.to_safetensors(Some(meta.clone()));
        let (q, m) = Parameters::from_safetensors_with_layout(&bytes, &p.layout()).unwrap();
        assert_eq!(p, q);
        assert_eq!(m, meta);
    }

    #[test]
    fn layout_mismatches_are_named() {
        let p = sample();
        let bytes = p.to_safetensors(None);
        let other = Layout::new(vec![("W".into(), vec![1, 2]), ("b".into(), vec![1])]);
        assert!(matches!(
            Parameters::from_safetensors_with_layout(&bytes, &other),
            Err(ParamsError::WrongShape { .. })
        ));
        let missing = Layout::new(vec![
            ("W".into(), vec![2, 1]),
            ("b".into(), vec![1]),
            ("c".into(), vec![1]),
        ]);
        assert_eq!(
            Parameters::from_safetensors_with_layout(&bytes, &missing).unwrap_err(),
            ParamsError::Missing("c".into())
        );
        let fewer = Layout::new(vec![("W".into(), vec![2, 1])]);
        assert_eq!(
            Parameters::from_safetensors_with_layout(&bytes, &fewer).unwrap_err(),
            ParamsError::Unexpected("b".into())
        );
        assert!(matches!(
            Parameters::from_safetensors(b"garbage"),
            Err(ParamsError::Malformed(_))
        ));
    }

    #[test]
    fn duplicate_names_are_refused() {
        let t = Tensor::zeros(vec![1]);
        assert_eq!(
            Parameters::new(vec![("a".into(), t.clone()), ("a".into(), t)]).unwrap_err(),
            ParamsError::Duplicate("a".into())
        );
    }
}
