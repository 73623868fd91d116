//! The saved form of a strategy's server state: a small versioned binary encoding of its
//! f64 vectors, labelled with the strategy's name so that a state is never resumed by another
//! strategy or for another model size.
//!
//! Layout: format version (1 byte, 1), name length (1 byte), the name (UTF-8), the number of
//! vectors (u32 LE), their common length (u64 LE), then every vector's values as f64 LE, one
//! vector after the other.

use super::AggregateError;

const FORMAT: u8 = 1;

/// Encodes `vectors` (all of one length) as `name`'s state.
pub(super) fn encode(name: &str, vectors: &[&[f64]]) -> Vec<u8> {
    let len = vectors.first().map_or(0, |v| v.len());
    debug_assert!(vectors.iter().all(|v| v.len() == len));
    let mut out = Vec::with_capacity(14 + name.len() + 8 * len * vectors.len());
    out.push(FORMAT);
    out.push(u8::try_from(name.len()).expect("strategy names are short"));
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(&(vectors.len() as u32).to_le_bytes());
    out.extend_from_slice(&(len as u64).to_le_bytes());
    for v in vectors {
        for x in *v {
            out.extend_from_slice(&x.to_le_bytes());
        }
    }
    out
}

/// Decodes `name`'s state of `count` vectors of `len` values each, refusing anything else.
pub(super) fn decode(
    name: &str,
    count: usize,
    len: usize,
    state: &[u8],
) -> Result<Vec<Vec<f64>>, AggregateError> {
    let bad = |m: String| Err(AggregateError::State(m));
    let Some((&format, rest)) = state.split_first() else {
        return bad(format!("{name}: the state is empty"));
    };
    if format != FORMAT {
        return bad(format!("{name}: unknown state format {format}"));
    }
    let Some((&name_len, rest)) = rest.split_first() else {
        return bad(format!("{name}: the state is truncated"));
    };
    let name_len = usize::from(name_len);
    if rest.len() < name_len + 12 {
        return bad(format!("{name}: the state is truncated"));
    }
    let (stored_name, rest) = rest.split_at(name_len);
    if stored_name != name.as_bytes() {
        return bad(format!(
            "the state is {}'s, not {name}'s (a task keeps its strategy once it has state)",
            String::from_utf8_lossy(stored_name)
        ));
    }
    let (n, rest) = rest.split_at(4);
    let (l, body) = rest.split_at(8);
    let n = u32::from_le_bytes(n.try_into().expect("4 bytes")) as usize;
    let l = u64::from_le_bytes(l.try_into().expect("8 bytes"));
    if n != count || l != len as u64 {
        return bad(format!(
            "{name}: the state holds {n} vectors of {l} values, the model needs {count} of {len}"
        ));
    }
    if body.len() != 8 * count * len {
        return bad(format!(
            "{name}: the state has {} bytes of values, not {}",
            body.len(),
            8 * count * len
        ));
    }
    let values: Vec<f64> = body
        .chunks_exact(8)
        .map(|b| f64::from_le_bytes(b.try_into().expect("8 bytes")))
        .collect();
    if len == 0 {
        return Ok(vec![Vec::new(); count]);
    }
    Ok(values.chunks(len).map(<[f64]>::to_vec).collect())
}
