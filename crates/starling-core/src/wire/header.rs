//! The safetensors format read and written with [`crate::wire::json`] instead of the
//! `safetensors` crate (whose header goes through `serde_json`): the browser build's codec,
//! which keeps its WebAssembly module small. [`crate::wire::params`] uses it on `wasm32`
//! and the `safetensors` crate elsewhere; tests hold the two to the same bytes.
//!
//! It checks what the crate checks: the header's length, UTF-8 and JSON, a known `dtype`
//! per tensor, `data_offsets` that tile the data exactly in some order, each tensor's byte
//! length against its shape, and `__metadata__` as strings only. A name given twice is
//! refused (the crate keeps the last).

// Natively only the tests use it (against the crate).
#![cfg_attr(not(target_arch = "wasm32"), allow(dead_code))]

use std::collections::HashMap;
use std::fmt::Write as _;

use crate::wire::json::{self, Json};

/// The largest header accepted, as in the `safetensors` crate.
const MAX_HEADER: usize = 100_000_000;

/// One tensor of a safetensors body.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Entry<'a> {
    /// Its name.
    pub name: String,
    /// Its dtype, as the header spells it (`F32`, `U8`, …).
    pub dtype: String,
    /// Its shape.
    pub shape: Vec<usize>,
    /// Its little-endian bytes.
    pub data: &'a [u8],
}

/// Bits per value of each dtype the format defines.
fn dtype_bits(dtype: &str) -> Option<usize> {
    Some(match dtype {
        "F4" => 4,
        "F6_E2M3" | "F6_E3M2" => 6,
        "BOOL" | "U8" | "I8" | "F8_E5M2" | "F8_E4M3" | "F8_E8M0" => 8,
        "I16" | "U16" | "F16" | "BF16" => 16,
        "I32" | "U32" | "F32" => 32,
        "I64" | "U64" | "F64" => 64,
        _ => return None,
    })
}

fn usize_of(v: &Json) -> Option<usize> {
    match v {
        Json::U64(n) => usize::try_from(*n).ok(),
        _ => None,
    }
}

/// Reads a safetensors body: its tensors in header order and its string metadata.
pub(crate) fn read(bytes: &[u8]) -> Result<(Vec<Entry<'_>>, HashMap<String, String>), String> {
    let Some(len) = bytes.get(..8) else {
        return Err("the header is too small".into());
    };
    let n = u64::from_le_bytes(len.try_into().unwrap_or_default());
    let n = usize::try_from(n)
        .ok()
        .filter(|&n| n <= MAX_HEADER)
        .ok_or("the header is too large")?;
    let header = bytes.get(8..8 + n).ok_or("the header length is invalid")?;
    let header = std::str::from_utf8(header).map_err(|_| "the header is not UTF-8")?;
    let data = &bytes[8 + n..];
    let Json::Object(fields) =
        json::parse(header).map_err(|e| format!("the header is not valid JSON: {e}"))?
    else {
        return Err("the header is not a JSON object".into());
    };
    let mut metadata = HashMap::new();
    let mut infos: Vec<(String, String, Vec<usize>, usize, usize)> = Vec::new();
    for (name, value) in fields {
        if name == "__metadata__" {
            match value {
                Json::Null => {}
                Json::Object(pairs) => {
                    for (k, v) in pairs {
                        let Json::String(v) = v else {
                            return Err(format!("metadata `{k}` is not a string"));
                        };
                        metadata.insert(k, v);
                    }
                }
                _ => return Err("`__metadata__` is not an object".into()),
            }
            continue;
        }
        if infos.iter().any(|i| i.0 == name) {
            return Err(format!("tensor `{name}` appears twice in the header"));
        }
        let bad = || format!("tensor `{name}` has invalid information");
        let Json::Object(info) = value else {
            return Err(bad());
        };
        let field = |key: &str| info.iter().find(|(k, _)| k == key).map(|(_, v)| v);
        let dtype = match field("dtype") {
            Some(Json::String(d)) if dtype_bits(d).is_some() => d.clone(),
            _ => return Err(bad()),
        };
        let shape = match field("shape") {
            Some(Json::Array(dims)) => dims.iter().map(usize_of).collect::<Option<Vec<_>>>(),
            _ => None,
        }
        .ok_or_else(bad)?;
        let (start, end) = match field("data_offsets") {
            Some(Json::Array(o)) if o.len() == 2 => usize_of(&o[0]).zip(usize_of(&o[1])),
            _ => None,
        }
        .ok_or_else(bad)?;
        infos.push((name, dtype, shape, start, end));
    }
    // The tensors must tile the data: taken in order of their offsets, each starts where
    // the one before ended, and the last ends where the body does.
    let mut by_offset: Vec<(usize, usize, usize)> = infos
        .iter()
        .enumerate()
        .map(|(i, t)| (t.3, t.4, i))
        .collect();
    insertion_sort(&mut by_offset, |a, b| a < b);
    let mut at = 0;
    for &(start, end, i) in &by_offset {
        let (name, dtype, shape, ..) = &infos[i];
        if start != at || end < start {
            return Err(format!("tensor `{name}` has invalid offsets"));
        }
        at = end;
        let bits = shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .and_then(|count| count.checked_mul(dtype_bits(dtype).unwrap_or(8)))
            .ok_or("tensor sizes overflow")?;
        if bits % 8 != 0 || end - start != bits / 8 {
            return Err(format!("tensor `{name}`'s offsets do not match its shape"));
        }
    }
    if at != data.len() {
        return Err("the tensors do not cover the body".into());
    }
    let entries = infos
        .into_iter()
        .map(|(name, dtype, shape, start, end)| Entry {
            name,
            dtype,
            shape,
            data: &data[start..end],
        })
        .collect();
    Ok((entries, metadata))
}

/// Sorts `v` by `less`, stably. Quadratic, but a body has a few dozen tensors, and each
/// element type of the standard library's sorts costs kilobytes of WebAssembly.
pub(crate) fn insertion_sort<T>(v: &mut [T], less: impl Fn(&T, &T) -> bool) {
    for i in 1..v.len() {
        let mut j = i;
        while j > 0 && less(&v[j], &v[j - 1]) {
            v.swap(j, j - 1);
            j -= 1;
        }
    }
}

/// Writes F32 tensors, in the order given, with optional string metadata: a body the
/// `safetensors` crate reads (header padded with spaces to a multiple of 8 bytes).
pub(crate) fn write<'a>(
    tensors: impl Iterator<Item = (&'a str, &'a [usize], &'a [f32])> + Clone,
    metadata: Option<&HashMap<String, String>>,
) -> Vec<u8> {
    let mut header = String::from("{");
    if let Some(m) = metadata {
        header.push_str("\"__metadata__\":{");
        for (i, (k, v)) in m.iter().enumerate() {
            if i > 0 {
                header.push(',');
            }
            json::write_string(&mut header, k);
            header.push(':');
            json::write_string(&mut header, v);
        }
        header.push('}');
    }
    let mut offset = 0;
    for (name, shape, values) in tensors.clone() {
        if header.len() > 1 {
            header.push(',');
        }
        json::write_string(&mut header, name);
        header.push_str(":{\"dtype\":\"F32\",\"shape\":[");
        for (i, d) in shape.iter().enumerate() {
            let _ = write!(header, "{}{d}", if i > 0 { "," } else { "" });
        }
        let end = offset + 4 * values.len();
        let _ = write!(header, "],\"data_offsets\":[{offset},{end}]}}");
        offset = end;
    }
    header.push('}');
    while header.len() % 8 != 0 {
        header.push(' ');
    }
    let mut out = Vec::with_capacity(8 + header.len() + offset);
    out.extend_from_slice(&(header.len() as u64).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for (_, _, values) in tensors {
        for v in values {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::SafeTensors;

    /// A body's tensors (name, dtype, shape, bytes), sorted, and its metadata.
    type Read = (
        Vec<(String, String, Vec<usize>, Vec<u8>)>,
        HashMap<String, String>,
    );

    fn crate_view(bytes: &[u8]) -> Option<Read> {
        let st = SafeTensors::deserialize(bytes).ok()?;
        let (_, meta) = SafeTensors::read_metadata(bytes).ok()?;
        let mut t: Vec<_> = st
            .tensors()
            .into_iter()
            .map(|(n, v)| {
                (
                    n,
                    format!("{:?}", v.dtype()),
                    v.shape().to_vec(),
                    v.data().to_vec(),
                )
            })
            .collect();
        t.sort();
        Some((t, meta.metadata().clone().unwrap_or_default()))
    }

    fn our_view(bytes: &[u8]) -> Option<Read> {
        let (entries, meta) = read(bytes).ok()?;
        let mut t: Vec<_> = entries
            .into_iter()
            .map(|e| (e.name, e.dtype, e.shape, e.data.to_vec()))
            .collect();
        t.sort();
        Some((t, meta))
    }

    fn body(header: &str, data: usize) -> Vec<u8> {
        let mut b = (header.len() as u64).to_le_bytes().to_vec();
        b.extend_from_slice(header.as_bytes());
        b.extend(std::iter::repeat_n(7u8, data));
        b
    }

    #[test]
    fn what_we_write_the_crate_reads_and_the_reverse() {
        let w = [1.5f32, -2.0, 0.25, 3.0];
        let b = [f32::MIN_POSITIVE];
        let tensors = [
            ("w\"eird\n", &[2usize, 2][..], &w[..]),
            ("b", &[1][..], &b[..]),
        ];
        let meta = HashMap::from([
            ("token".to_string(), "t\u{1}\"/é".to_string()),
            ("loss".to_string(), "0.5".to_string()),
        ]);
        for m in [None, Some(&meta)] {
            let ours = write(tensors.iter().copied(), m);
            assert_eq!(u64::from_le_bytes(ours[..8].try_into().unwrap()) % 8, 0);
            let theirs = safetensors::serialize(
                tensors.iter().map(|&(n, s, v)| {
                    let data: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                    (
                        n,
                        safetensors::tensor::TensorView::new(
                            safetensors::Dtype::F32,
                            s.to_vec(),
                            Box::leak(data.into_boxed_slice()),
                        )
                        .unwrap(),
                    )
                }),
                m.cloned(),
            )
            .unwrap();
            let view = crate_view(&ours).unwrap();
            assert_eq!(view.1, m.cloned().unwrap_or_default());
            assert_eq!(Some(view.clone()), our_view(&ours));
            assert_eq!(Some(view), our_view(&theirs));
        }
    }

    #[test]
    fn what_the_crate_refuses_we_refuse() {
        let ok = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"U8","shape":[1,3],"data_offsets":[8,11]},"__metadata__":{"k":"v"}}"#;
        let cases: Vec<Vec<u8>> = vec![
            body(ok, 11),
            body(ok, 10),
            body(ok, 12),
            body(
                r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}"#,
                4,
            ),
            body(
                r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#,
                8,
            ),
            body(
                r#"{"a":{"dtype":"X9","shape":[1],"data_offsets":[0,4]}}"#,
                4,
            ),
            body(r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0]}}"#, 4),
            body(
                r#"{"a":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}}"#,
                4,
            ),
            body(r#"{"a":{"dtype":"F32","data_offsets":[0,4]}}"#, 4),
            body(
                r#"{"a":{"dtype":"F4","shape":[3],"data_offsets":[0,1]}}"#,
                1,
            ),
            body(
                r#"{"a":{"dtype":"F4","shape":[4],"data_offsets":[0,2]}}"#,
                2,
            ),
            body(
                r#"{"a":{"dtype":"F32","shape":[],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[0],"data_offsets":[4,4]}}"#,
                4,
            ),
            body(r#"{"__metadata__":{"k":1}}"#, 0),
            body(r#"{"__metadata__":null}"#, 0),
            body(r#"{}"#, 0),
            body(r#"[]"#, 0),
            body(
                r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}   "#,
                4,
            ),
            body(
                r#"{"a":{"dtype":"F32","shape":[18446744073709551615,2],"data_offsets":[0,4]}}"#,
                4,
            ),
            b"garbage".to_vec(),
            {
                let mut b = body("{}", 0);
                b[0] = 200;
                b
            },
        ];
        for (i, b) in cases.iter().enumerate() {
            assert_eq!(our_view(b), crate_view(b), "case {i}");
        }
    }
}
