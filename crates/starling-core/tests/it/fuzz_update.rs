//! Property-based fuzzing (proptest) of the update wire format: [`update::decode`] and
//! [`update::check`] on arbitrary bytes and on safetensors-shaped bodies with a hostile header
//! (length prefix, JSON header, data), on valid updates of random layouts (the round trip and
//! the weight), on mutations of valid bodies (flipped bytes, truncation, extension, NaN and
//! infinities spliced into the data, non-canonical or unknown metadata), and around the
//! norm bound.
//!
//! Every property also pins that `decode` and `check` agree (the same refusal, or the same
//! accepted update), and that whatever is accepted is sound: the layout's tensors with the
//! layout's sizes, finite values, metadata in range, the weight the rules give and a norm
//! within the bound.

use std::collections::{BTreeSet, HashMap};

use proptest::prelude::*;
use proptest::sample::{select, Index};
use proptest::test_runner::TestCaseError;
use starling_core::tensor::numel;
use starling_core::wire::params::{f32s_from_le, Layout, ParamsError};
use starling_core::wire::update::{self, Rules, UpdateError, UpdateMeta, Weighting, MAX_EXAMPLES};
use starling_core::{Parameters, Tensor};

/// The metadata fields the protocol defines.
const FIELDS: [&str; 5] = ["base_version", "examples", "token", "loss", "accuracy"];

// ---------------------------------------------------------------------------------------------
// What every outcome must satisfy.
// ---------------------------------------------------------------------------------------------

/// An accepted update: its metadata, its tensors' bytes in layout order, its weight.
#[derive(Debug, Clone, PartialEq)]
struct Accepted {
    meta: UpdateMeta,
    tensors: Vec<Vec<u8>>,
    weight: f64,
}

/// The L2 norm of tensors, summed in layout order in f64 as the checker does.
fn norm_of<'a>(tensors: impl IntoIterator<Item = &'a [u8]>) -> f64 {
    tensors
        .into_iter()
        .flat_map(f32s_from_le)
        .map(|v| f64::from(v) * f64::from(v))
        .sum::<f64>()
        .sqrt()
}

/// Runs `decode` and `check` on `body`; fails unless they agree, and unless an accepted update
/// is sound under `rules`.
fn outcome(body: &[u8], rules: &Rules) -> Result<Result<Accepted, UpdateError>, TestCaseError> {
    let decoded = update::decode(body, &rules.layout, rules.max_norm).map(|v| {
        (
            v.meta,
            v.tensors.iter().map(|t| t.to_vec()).collect::<Vec<_>>(),
        )
    });
    let checked = update::check(body.to_vec(), rules);
    match (decoded, checked) {
        (Err(d), Err(c)) => {
            // A body with several offenders (tensors with a wrong dtype, name or shape, or
            // with tied offsets; several unknown metadata fields) is refused naming one of
            // them, chosen by the iteration order of a `HashMap`, which differs from one
            // decoding to the next: then only the kind of refusal is pinned (the same error
            // code on the wire).
            let same_kind = matches!(
                (&d, &c),
                (UpdateError::UnknownField(_), UpdateError::UnknownField(_))
                    | (
                        UpdateError::Params(ParamsError::Malformed(_)),
                        UpdateError::Params(ParamsError::Malformed(_))
                    )
            ) || (tensor_error(&d) && tensor_error(&c));
            if !same_kind {
                prop_assert_eq!(&d, &c, "decode and check refuse differently");
            }
            prop_assert!(!c.to_string().is_empty());
            Ok(Err(c))
        }
        (Ok((meta, tensors)), Ok(c)) => {
            let accepted = Accepted {
                meta: c.meta().clone(),
                tensors: c.tensors().map(<[u8]>::to_vec).collect(),
                weight: c.weight(),
            };
            prop_assert_eq!(
                &accepted.meta,
                &meta,
                "decode and check read different metadata"
            );
            prop_assert_eq!(
                &accepted.tensors,
                &tensors,
                "decode and check locate different tensors"
            );
            sound(&accepted, rules)?;
            Ok(Ok(accepted))
        }
        (d, c) => Err(TestCaseError::fail(format!(
            "decode and check disagree: decode {:?}, check {:?}",
            d.map(|(m, _)| m),
            c
        ))),
    }
}

/// Whether `e` refuses the tensors (names, shapes, dtypes) of a well-formed body.
fn tensor_error(e: &UpdateError) -> bool {
    matches!(e, UpdateError::Params(p) if !matches!(p, ParamsError::Malformed(_)))
}

/// What an accepted update must be, whatever body it came from.
fn sound(a: &Accepted, rules: &Rules) -> Result<(), TestCaseError> {
    let entries = rules.layout.entries();
    prop_assert_eq!(a.tensors.len(), entries.len());
    for (t, (name, shape)) in a.tensors.iter().zip(entries) {
        prop_assert_eq!(
            t.len(),
            4 * numel(shape),
            "tensor `{}` has the wrong size",
            name
        );
        prop_assert!(
            f32s_from_le(t).all(f32::is_finite),
            "tensor `{}` was accepted with a non-finite value",
            name
        );
    }
    let m = &a.meta;
    prop_assert!((1..=MAX_EXAMPLES as u64).contains(&m.examples), "{:?}", m);
    prop_assert!(m.loss.is_none_or(|l| l.is_finite() && l >= 0.0), "{:?}", m);
    prop_assert!(
        m.accuracy.is_none_or(|x| (0.0..=1.0).contains(&x)),
        "{:?}",
        m
    );
    let weight = match rules.weighting {
        Weighting::Examples { cap } => m.examples.min(cap) as f64,
        Weighting::Uniform => 1.0,
    };
    prop_assert_eq!(a.weight, weight);
    if let Some(bound) = rules.max_norm {
        let norm = norm_of(a.tensors.iter().map(Vec::as_slice));
        prop_assert!(
            norm <= bound,
            "norm {} accepted over the bound {}",
            norm,
            bound
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Strategies.
// ---------------------------------------------------------------------------------------------

/// Any finite f32, of any magnitude (normal, subnormal, zero, either sign).
fn finite_f32() -> impl Strategy<Value = f32> + Clone {
    use proptest::num::f32::{NEGATIVE, NORMAL, POSITIVE, SUBNORMAL, ZERO};
    prop_oneof![
        4 => POSITIVE | NEGATIVE | NORMAL | SUBNORMAL | ZERO,
        2 => -10.0f32..10.0,
        1 => Just(0.0f32),
    ]
}

/// 1 to 4 tensors with distinct names, in random order, of 0 to 3 dimensions of 0 to 4
/// (a dimension of 0 is rare: such a tensor holds no values).
fn layout() -> impl Strategy<Value = Layout> {
    let name = "[A-Za-z_.][A-Za-z0-9_.:/-]{0,11}"
        .prop_filter("not the safetensors metadata key", |n| n != "__metadata__");
    let dim = prop_oneof![9 => 1usize..=4, 1 => Just(0usize)];
    prop::collection::btree_set(name, 1..=4)
        .prop_map(|names: BTreeSet<String>| names.into_iter().collect::<Vec<_>>())
        .prop_shuffle()
        .prop_flat_map(move |names| {
            let shapes =
                prop::collection::vec(prop::collection::vec(dim.clone(), 0..=3), names.len());
            (Just(names), shapes)
        })
        .prop_map(|(names, shapes)| Layout::new(names.into_iter().zip(shapes).collect()))
}

/// Values for a layout, from `value`.
fn params_for<S>(layout: &Layout, value: S) -> impl Strategy<Value = Parameters>
where
    S: Strategy<Value = f32> + Clone,
{
    let sizes: Vec<_> = layout
        .entries()
        .iter()
        .map(|(_, s)| prop::collection::vec(value.clone(), numel(s)))
        .collect();
    let layout = layout.clone();
    sizes.prop_map(move |values| params(&layout, values))
}

fn params(layout: &Layout, values: Vec<Vec<f32>>) -> Parameters {
    Parameters::new(
        layout
            .entries()
            .iter()
            .zip(values)
            .map(|((n, s), v)| (n.clone(), Tensor::new(s.clone(), v).unwrap()))
            .collect(),
    )
    .unwrap()
}

/// A random layout with finite values.
fn delta() -> impl Strategy<Value = Parameters> {
    layout().prop_flat_map(|l| params_for(&l, finite_f32()))
}

/// Valid metadata: any base version, 1 to [`MAX_EXAMPLES`] examples, an optional finite
/// non-negative loss, an optional accuracy in [0, 1], any token.
fn meta() -> impl Strategy<Value = UpdateMeta> {
    use proptest::num::f32::{NORMAL, POSITIVE, SUBNORMAL, ZERO};
    let max = MAX_EXAMPLES as u64;
    let examples = prop_oneof![1u64..=100, Just(1u64), Just(max), 1..=max];
    let loss = prop_oneof![POSITIVE | NORMAL | SUBNORMAL | ZERO, 0.0f32..10.0];
    let accuracy = prop_oneof![0.0f32..=1.0, Just(0.0f32), Just(1.0f32)];
    let token = prop_oneof![Just(String::new()), "[A-Za-z0-9_-]{1,43}", ".{0,40}"];
    (
        any::<u64>(),
        examples,
        proptest::option::of(loss),
        proptest::option::of(accuracy),
        token,
    )
        .prop_map(
            |(base_version, examples, loss, accuracy, token)| UpdateMeta {
                base_version,
                examples,
                loss,
                accuracy,
                token,
            },
        )
}

fn weighting() -> impl Strategy<Value = Weighting> {
    prop_oneof![
        (1u64..=200).prop_map(|cap| Weighting::Examples { cap }),
        any::<u64>().prop_map(|cap| Weighting::Examples { cap }),
        Just(Weighting::Uniform),
    ]
}

fn rules(layout: &Layout, max_norm: Option<f64>, weighting: Weighting) -> Rules {
    Rules {
        layout: layout.clone(),
        max_norm,
        weighting,
        clip: None,
    }
}

/// The metadata map [`update::encode`] writes, to re-encode it with one field changed.
fn meta_map(m: &UpdateMeta) -> HashMap<String, String> {
    let mut map = HashMap::from([
        ("base_version".to_string(), m.base_version.to_string()),
        ("examples".to_string(), m.examples.to_string()),
        ("token".to_string(), m.token.clone()),
    ]);
    if let Some(l) = m.loss {
        map.insert("loss".into(), l.to_string());
    }
    if let Some(a) = m.accuracy {
        map.insert("accuracy".into(), a.to_string());
    }
    map
}

fn bytes_of(p: &Parameters) -> Vec<Vec<u8>> {
    p.iter()
        .map(|(_, t)| t.data().iter().flat_map(|v| v.to_le_bytes()).collect())
        .collect()
}

/// Where a safetensors body's data starts, and each tensor's byte range within the data, read
/// from the header with serde_json (independently of the codec under test).
fn data_ranges(body: &[u8]) -> (usize, HashMap<String, (usize, usize)>) {
    let n = u64::from_le_bytes(body[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&body[8..8 + n]).unwrap();
    let ranges = header
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .map(|(k, v)| {
            let o = &v["data_offsets"];
            let range = (
                o[0].as_u64().unwrap() as usize,
                o[1].as_u64().unwrap() as usize,
            );
            (k.clone(), range)
        })
        .collect();
    (8 + n, ranges)
}

// ---------------------------------------------------------------------------------------------
// Hostile safetensors-shaped bodies: a length prefix, a JSON-ish header, data.
// ---------------------------------------------------------------------------------------------

/// The layout the hostile bodies aim at.
fn fuzz_layout() -> Layout {
    Layout::new(vec![("W".into(), vec![2, 1]), ("b".into(), vec![1])])
}

#[derive(Debug, Clone)]
enum Offsets {
    /// Contiguous offsets computed from the shape and dtype, as a real writer would.
    Contiguous,
    /// Whatever JSON text.
    Given(String, String),
}

#[derive(Debug, Clone)]
struct EntryText {
    name: String,
    dtype: String,
    shape: Vec<String>,
    offsets: Offsets,
}

#[derive(Debug, Clone)]
enum Prefix {
    Exact,
    Off(i64),
    Raw(u64),
}

#[derive(Debug, Clone)]
enum HeaderDamage {
    None,
    Cut(Index),
    Insert(Index, char),
}

#[derive(Debug, Clone)]
enum Data {
    /// As long as the contiguous offsets say, filled cyclically with these words.
    Exact(Vec<u32>),
    Raw(Vec<u8>),
}

#[derive(Debug, Clone)]
struct HostileBody {
    prefix: Prefix,
    entries: Vec<EntryText>,
    metadata: Option<Vec<(String, String)>>,
    padding: usize,
    damage: HeaderDamage,
    data: Data,
}

/// JSON number-ish text for shapes and offsets, hostile at times.
fn number_text() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => (0u64..=8).prop_map(|n| n.to_string()),
        2 => select(vec![
            "-1", "0.5", "1e3", "18446744073709551615", "18446744073709551616", "4294967296",
            "9223372036854775807", "4611686018427387904", "\"1\"", "null", "[]", "01",
        ])
        .prop_map(String::from),
        1 => any::<u64>().prop_map(|n| n.to_string()),
    ]
}

fn entry_text() -> impl Strategy<Value = EntryText> {
    let dtypes = vec![
        "F32", "F32", "F32", "F16", "BF16", "F64", "I8", "U8", "I64", "BOOL", "F8_E4M3", "F4",
        "F6_E2M3", "F8_E8M0", "f32", "",
    ];
    prop_oneof![
        // One of the layout's tensors, right but for the dtype at times.
        3 => (
            select(vec![("W", vec!["2", "1"]), ("b", vec!["1"])]),
            prop_oneof![5 => Just("F32"), 1 => select(dtypes.clone())],
        )
            .prop_map(|((name, shape), dtype)| EntryText {
                name: name.into(),
                dtype: dtype.into(),
                shape: shape.into_iter().map(String::from).collect(),
                offsets: Offsets::Contiguous,
            }),
        // Anything.
        2 => (
            prop_oneof![
                select(vec!["W", "b", "x", "", "__metadata__", "W\\u0000", "\\\"", "é"])
                    .prop_map(String::from),
                "[A-Za-z]{1,4}",
            ],
            select(dtypes),
            prop::collection::vec(number_text(), 0..=3),
            prop_oneof![
                Just(Offsets::Contiguous),
                (number_text(), number_text()).prop_map(|(a, b)| Offsets::Given(a, b)),
            ],
        )
            .prop_map(|(name, dtype, shape, offsets)| EntryText {
                name,
                dtype: dtype.into(),
                shape,
                offsets,
            }),
    ]
}

fn metadata_text() -> impl Strategy<Value = Option<Vec<(String, String)>>> {
    let key = select(vec![
        "base_version",
        "examples",
        "token",
        "loss",
        "accuracy",
        "x",
        "",
        "__metadata__",
    ])
    .prop_map(String::from);
    let value = select(vec![
        "\"0\"",
        "\"1\"",
        "\"3\"",
        "\"+3\"",
        "\"03\"",
        "\"-1\"",
        "\"-0\"",
        "\"0.5\"",
        "\"1.5\"",
        "\"NaN\"",
        "\"inf\"",
        "\"-inf\"",
        "\"t\"",
        "\"\"",
        "3",
        "null",
        "{}",
        "[\"1\"]",
        "\"1000000000\"",
        "\"1000000001\"",
        "\"18446744073709551615\"",
        "\"1e3\"",
        "\" 1\"",
    ])
    .prop_map(String::from);
    let valid = || {
        vec![
            ("base_version".to_string(), "\"0\"".to_string()),
            ("examples".to_string(), "\"3\"".to_string()),
            ("token".to_string(), "\"t\"".to_string()),
        ]
    };
    prop_oneof![
        1 => Just(None),
        2 => Just(Some(valid())),
        3 => prop::collection::vec((key.clone(), value.clone()), 0..=3).prop_map(move |extra| {
            let mut m = valid();
            m.extend(extra);
            Some(m)
        }),
        1 => prop::collection::vec((key, value), 0..=6).prop_map(Some),
    ]
}

fn word() -> impl Strategy<Value = u32> {
    prop_oneof![
        4 => finite_f32().prop_map(f32::to_bits),
        1 => select(vec![0x7fc0_0000u32, 0xffc0_0000, 0x7f80_0001, 0x7f80_0000, 0xff80_0000]),
        1 => any::<u32>(),
    ]
}

fn hostile_body() -> impl Strategy<Value = HostileBody> {
    let prefix = prop_oneof![
        6 => Just(Prefix::Exact),
        1 => (-4i64..=4).prop_map(Prefix::Off),
        1 => any::<u64>().prop_map(Prefix::Raw),
    ];
    let damage = prop_oneof![
        6 => Just(HeaderDamage::None),
        1 => any::<Index>().prop_map(HeaderDamage::Cut),
        1 => (any::<Index>(), any::<char>()).prop_map(|(i, c)| HeaderDamage::Insert(i, c)),
    ];
    let data = prop_oneof![
        4 => prop::collection::vec(word(), 1..=8).prop_map(Data::Exact),
        1 => prop::collection::vec(any::<u8>(), 0..64).prop_map(Data::Raw),
    ];
    let wild = (
        prefix,
        prop::collection::vec(entry_text(), 0..=3),
        metadata_text(),
        0usize..8,
        damage,
        data,
    )
        .prop_map(
            |(prefix, entries, metadata, padding, damage, data)| HostileBody {
                prefix,
                entries,
                metadata,
                padding,
                damage,
                data,
            },
        );
    // The layout's tensors in any order, a true prefix and whole data, so that the metadata,
    // the values and the norm are reached; at times one stray tensor more.
    let layout_entry = |name: &str, shape: &[&str]| EntryText {
        name: name.into(),
        dtype: "F32".into(),
        shape: shape.iter().map(|d| d.to_string()).collect(),
        offsets: Offsets::Contiguous,
    };
    let tensors = vec![layout_entry("W", &["2", "1"]), layout_entry("b", &["1"])];
    let near_valid = (
        Just(tensors).prop_shuffle(),
        proptest::option::weighted(0.2, entry_text()),
        metadata_text(),
        0usize..8,
        prop::collection::vec(word(), 1..=8),
    )
        .prop_map(|(mut entries, stray, metadata, padding, words)| {
            entries.extend(stray);
            HostileBody {
                prefix: Prefix::Exact,
                entries,
                metadata,
                padding,
                damage: HeaderDamage::None,
                data: Data::Exact(words),
            }
        });
    prop_oneof![wild, near_valid]
}

fn dtype_bytes(dtype: &str) -> u64 {
    match dtype {
        "F64" | "I64" => 8,
        "F32" | "f32" => 4,
        "F16" | "BF16" => 2,
        _ => 1,
    }
}

impl HostileBody {
    fn to_bytes(&self) -> Vec<u8> {
        let mut cursor = 0u64;
        let mut parts = Vec::new();
        for e in &self.entries {
            let (start, end) = match &e.offsets {
                Offsets::Contiguous => {
                    let n = e
                        .shape
                        .iter()
                        .map(|d| d.parse::<u64>().unwrap_or(1))
                        .fold(1u64, u64::saturating_mul);
                    let end = cursor.saturating_add(n.saturating_mul(dtype_bytes(&e.dtype)));
                    let range = (cursor.to_string(), end.to_string());
                    cursor = end;
                    range
                }
                Offsets::Given(a, b) => (a.clone(), b.clone()),
            };
            parts.push(format!(
                "\"{}\":{{\"dtype\":\"{}\",\"shape\":[{}],\"data_offsets\":[{start},{end}]}}",
                e.name,
                e.dtype,
                e.shape.join(",")
            ));
        }
        if let Some(m) = &self.metadata {
            let fields: Vec<String> = m.iter().map(|(k, v)| format!("\"{k}\":{v}")).collect();
            parts.push(format!("\"__metadata__\":{{{}}}", fields.join(",")));
        }
        let mut header =
            format!("{{{}}}{}", parts.join(","), " ".repeat(self.padding)).into_bytes();
        match &self.damage {
            HeaderDamage::None => {}
            HeaderDamage::Cut(i) => header.truncate(i.index(header.len() + 1)),
            HeaderDamage::Insert(i, c) => {
                let at = i.index(header.len() + 1);
                let mut buf = [0u8; 4];
                header.splice(at..at, c.encode_utf8(&mut buf).bytes());
            }
        }
        let prefix = match self.prefix {
            Prefix::Exact => header.len() as u64,
            Prefix::Off(d) => (header.len() as u64).wrapping_add_signed(d),
            Prefix::Raw(n) => n,
        };
        let mut body = prefix.to_le_bytes().to_vec();
        body.extend_from_slice(&header);
        match &self.data {
            Data::Exact(words) if cursor <= 4096 => {
                let bytes = words.iter().flat_map(|w| w.to_le_bytes()).cycle();
                body.extend(bytes.take(cursor as usize));
            }
            Data::Exact(words) => body.extend(words.iter().flat_map(|w| w.to_le_bytes())),
            Data::Raw(bytes) => body.extend_from_slice(bytes),
        }
        body
    }
}

// ---------------------------------------------------------------------------------------------
// Mutations of a valid body.
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
enum Mutation {
    /// XOR one byte (anywhere: prefix, header or data) with a non-zero mask.
    Flip(Index, u8),
    /// Cut the body shorter.
    Truncate(Index),
    /// Append bytes.
    Extend(Vec<u8>),
    /// Overwrite one value of the data with a NaN or an infinity.
    NonFinite(Index, u32),
    /// Set `base_version` or `examples` to text that is not a canonical decimal in range.
    IntField(&'static str, &'static str),
    /// Set `loss` or `accuracy` to text that is unparsable or out of range.
    FloatField(&'static str, &'static str),
    /// Add a field the protocol does not define.
    UnknownField(String, String),
    /// Remove a field.
    Remove(&'static str),
}

/// Non-canonical integers, or beyond u64 (`-…` is refused as an example count).
const BAD_INTEGERS: [&str; 21] = [
    "+5",
    "05",
    "-1",
    "1e3",
    " 1",
    "1 ",
    "0x10",
    "",
    "1.0",
    "5.",
    "١",
    "１",
    "-0",
    "00",
    "+0",
    "1_000",
    "−1",
    "18446744073709551616",
    "99999999999999999999999",
    "NaN",
    "five",
];

/// Canonical example counts out of range.
const BAD_EXAMPLES: [&str; 4] = ["0", "1000000001", "18446744073709551615", "-5"];

const BAD_LOSSES: [&str; 12] = [
    "-1", "-0.5", "NaN", "inf", "-inf", "infinity", "1e39", "", "abc", "0x1", "1,5", "0.5 ",
];

const BAD_ACCURACIES: [&str; 10] = [
    "1.0000001",
    "-0.1",
    "2",
    "NaN",
    "inf",
    "-inf",
    "",
    "50%",
    "1e1",
    "0,5",
];

fn nan_or_inf() -> impl Strategy<Value = u32> {
    prop_oneof![
        select(vec![
            0x7fc0_0000u32,
            0xffc0_0000,
            0x7f80_0000,
            0xff80_0000,
            0x7fff_ffff
        ]),
        (any::<bool>(), 1u32..=0x007f_ffff)
            .prop_map(|(neg, m)| (u32::from(neg) << 31) | 0x7f80_0000 | m),
    ]
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let int_field = select(vec!["base_version", "examples"]);
    prop_oneof![
        4 => (any::<Index>(), 1u8..=255).prop_map(|(i, m)| Mutation::Flip(i, m)),
        1 => any::<Index>().prop_map(Mutation::Truncate),
        1 => prop::collection::vec(any::<u8>(), 1..16).prop_map(Mutation::Extend),
        2 => (any::<Index>(), nan_or_inf()).prop_map(|(i, b)| Mutation::NonFinite(i, b)),
        2 => (int_field, select(BAD_INTEGERS.to_vec())).prop_map(|(f, v)| Mutation::IntField(f, v)),
        1 => select(BAD_EXAMPLES.to_vec()).prop_map(|v| Mutation::IntField("examples", v)),
        1 => select(BAD_LOSSES.to_vec()).prop_map(|v| Mutation::FloatField("loss", v)),
        1 => select(BAD_ACCURACIES.to_vec()).prop_map(|v| Mutation::FloatField("accuracy", v)),
        1 => (
            "\\PC{0,50}".prop_filter("an unknown field", |k| !FIELDS.contains(&k.as_str())),
            "\\PC{0,10}",
        )
            .prop_map(|(k, v)| Mutation::UnknownField(k, v)),
        1 => select(FIELDS.to_vec()).prop_map(Mutation::Remove),
    ]
}

/// Applies a metadata mutation by re-encoding with the changed map.
fn with_meta(
    delta: &Parameters,
    m: &UpdateMeta,
    change: impl FnOnce(&mut HashMap<String, String>),
) -> Vec<u8> {
    let mut map = meta_map(m);
    change(&mut map);
    delta.to_safetensors(Some(map))
}

/// Whether `e` refuses `field` as invalid.
fn invalid_field(e: &UpdateError, field: &str) -> bool {
    matches!(e, UpdateError::InvalidField { field: f, .. } if *f == field)
}

/// How many metadata fields differ.
fn fields_differing(a: &UpdateMeta, b: &UpdateMeta) -> usize {
    usize::from(a.base_version != b.base_version)
        + usize::from(a.examples != b.examples)
        + usize::from(a.loss.map(f32::to_bits) != b.loss.map(f32::to_bits))
        + usize::from(a.accuracy.map(f32::to_bits) != b.accuracy.map(f32::to_bits))
        + usize::from(a.token != b.token)
}

// ---------------------------------------------------------------------------------------------
// The properties.
// ---------------------------------------------------------------------------------------------

proptest! {
    // Integration tests have no `lib.rs` beside them for proptest's regression files: a
    // failure prints its minimal input instead.
    #![proptest_config(ProptestConfig {
        failure_persistence: None,
        // `PROPTEST_CASES` runs a longer fuzz.
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(256),
        ..ProptestConfig::default()
    })]

    /// Arbitrary bytes: no panic, `decode` and `check` refuse alike (or, in the unlikely case,
    /// accept a sound update alike).
    #[test]
    fn arbitrary_bytes_never_panic(
        bytes in prop::collection::vec(any::<u8>(), 0..512),
        max_norm in proptest::option::of(0.0f64..100.0),
        weighting in weighting(),
    ) {
        let _ = outcome(&bytes, &rules(&fuzz_layout(), max_norm, weighting))?;
    }

    /// Arbitrary header bytes behind a length prefix that matches them, then arbitrary data.
    #[test]
    fn arbitrary_header_behind_a_true_prefix_never_panics(
        header in prop::collection::vec(any::<u8>(), 0..256),
        data in prop::collection::vec(any::<u8>(), 0..64),
    ) {
        let mut body = (header.len() as u64).to_le_bytes().to_vec();
        body.extend_from_slice(&header);
        body.extend_from_slice(&data);
        let _ = outcome(&body, &rules(&fuzz_layout(), Some(1e6), Weighting::Uniform))?;
    }

    /// Safetensors-shaped bodies with a hostile header (wrong or huge shapes and offsets,
    /// other dtypes, odd names, bad metadata, a cut or a stray character, a lying prefix) and
    /// data with NaNs and infinities: no panic, and anything accepted is sound.
    #[test]
    fn hostile_safetensors_bodies_never_panic(
        body in hostile_body(),
        max_norm in proptest::option::of(prop_oneof![Just(0.0f64), 0.0f64..1e6, Just(f64::MAX)]),
        weighting in weighting(),
    ) {
        let bytes = body.to_bytes();
        let _ = outcome(&bytes, &rules(&fuzz_layout(), max_norm, weighting))?;
    }

    /// Any valid update round-trips through encode and check: the same metadata, the same
    /// tensor bytes in layout order, and the weight the rules give.
    #[test]
    fn valid_updates_round_trip(
        (delta, slack) in (delta(), prop_oneof![Just(None), Just(Some(0.0f64)), (0.0f64..1e3).prop_map(Some)]),
        meta in meta(),
        weighting in weighting(),
    ) {
        let layout = delta.layout();
        // No bound, or a bound at or above the update's norm (a hair above: the check sums the
        // squares in another order, which may differ in the last bit).
        let max_norm = slack
            .map(|s| norm_of(bytes_of(&delta).iter().map(Vec::as_slice)) * (1.0 + 1e-12) + s);
        let r = rules(&layout, max_norm, weighting);
        let body = update::encode(&delta, &meta);
        let accepted = match outcome(&body, &r)? {
            Ok(a) => a,
            Err(e) => return Err(TestCaseError::fail(format!("a valid update was refused: {e}"))),
        };
        prop_assert_eq!(&accepted.meta, &meta);
        prop_assert_eq!(&accepted.tensors, &bytes_of(&delta));
        let weight = match weighting {
            Weighting::Examples { cap } => meta.examples.min(cap) as f64,
            Weighting::Uniform => 1.0,
        };
        prop_assert_eq!(accepted.weight, weight);
        // The body is within the size the server allows an upload of this layout... when the
        // token is no longer than a real one (the server's tokens are short).
        if meta.token.len() <= 64 {
            prop_assert!(
                body.len() <= update::max_encoded_len(&layout),
                "a valid body of {} bytes exceeds max_encoded_len {}",
                body.len(),
                update::max_encoded_len(&layout)
            );
        }
    }

    /// A mutated valid body is refused, or accepted as exactly what the mutation makes of it;
    /// never a panic, never an accepted non-finite value, never a refusal `check` and `decode`
    /// disagree on.
    #[test]
    fn mutated_bodies_are_refused_or_accepted_exactly(
        delta in delta(),
        meta in meta(),
        weighting in weighting(),
        mutation in mutation(),
    ) {
        let layout = delta.layout();
        let r = rules(&layout, None, weighting);
        let original = update::encode(&delta, &meta);
        let tensors = bytes_of(&delta);
        let (data_start, ranges) = data_ranges(&original);
        let numel = layout.numel();
        match mutation {
            Mutation::Flip(i, mask) => {
                let at = i.index(original.len());
                let mut body = original.clone();
                body[at] ^= mask;
                let result = outcome(&body, &r)?;
                if at < 8 {
                    prop_assert!(result.is_err(), "a changed length prefix was accepted");
                } else if at < data_start {
                    // In the header: a changed name, shape, offset or dtype is refused; a
                    // changed metadata character may give other valid metadata, but never
                    // other values.
                    if let Ok(a) = result {
                        prop_assert_eq!(&a.tensors, &tensors, "a header flip changed the values");
                        prop_assert!(fields_differing(&a.meta, &meta) <= 1, "{:?} vs {:?}", a.meta, meta);
                    }
                } else {
                    // In the data: exactly the flipped value, or NotFinite.
                    let offset = at - data_start;
                    let (name, (s, _)) = ranges.iter().find(|(_, (s, e))| (*s..*e).contains(&offset)).unwrap();
                    let idx = layout.index_of(name).unwrap();
                    let mut expected = tensors.clone();
                    expected[idx][offset - s] ^= mask;
                    let value_at = (offset - s) / 4 * 4;
                    let value = f32::from_le_bytes(expected[idx][value_at..value_at + 4].try_into().unwrap());
                    if value.is_finite() {
                        let a = result.map_err(|e| TestCaseError::fail(format!("a finite flip was refused: {e}")))?;
                        prop_assert_eq!(&a.meta, &meta);
                        prop_assert_eq!(&a.tensors, &expected);
                    } else {
                        prop_assert_eq!(result, Err(UpdateError::NotFinite(name.clone())));
                    }
                }
            }
            Mutation::Truncate(i) => {
                let to = i.index(original.len());
                prop_assert!(outcome(&original[..to], &r)?.is_err(), "a body cut to {} of {} bytes was accepted", to, original.len());
            }
            Mutation::Extend(extra) => {
                let mut body = original.clone();
                body.extend_from_slice(&extra);
                if let Ok(a) = outcome(&body, &r)? {
                    prop_assert_eq!(&a.meta, &meta);
                    prop_assert_eq!(&a.tensors, &tensors);
                }
            }
            Mutation::NonFinite(i, bits) => {
                prop_assume!(numel > 0);
                let slot = i.index(numel) * 4;
                let mut body = original.clone();
                body[data_start + slot..data_start + slot + 4].copy_from_slice(&bits.to_le_bytes());
                let (name, _) = ranges.iter().find(|(_, (s, e))| (*s..*e).contains(&slot)).unwrap();
                prop_assert_eq!(outcome(&body, &r)?, Err(UpdateError::NotFinite(name.clone())));
            }
            Mutation::IntField(field, value) => {
                let body = with_meta(&delta, &meta, |m| { m.insert(field.into(), value.into()); });
                let e = outcome(&body, &r)?.err();
                let expected = e.as_ref().is_some_and(|e| {
                    invalid_field(e, field)
                        || (field == "examples"
                            && matches!(e, UpdateError::NoExamples(n) if !(1..=MAX_EXAMPLES).contains(n)))
                });
                prop_assert!(expected, "{} = {:?} gave {:?}", field, value, e);
            }
            Mutation::FloatField(field, value) => {
                let body = with_meta(&delta, &meta, |m| { m.insert(field.into(), value.into()); });
                let e = outcome(&body, &r)?.err();
                prop_assert!(e.as_ref().is_some_and(|e| invalid_field(e, field)), "{} = {:?} gave {:?}", field, value, e);
            }
            Mutation::UnknownField(key, value) => {
                let body = with_meta(&delta, &meta, |m| { m.insert(key.clone(), value); });
                let shown: String = key.chars().take(40).collect();
                prop_assert_eq!(outcome(&body, &r)?, Err(UpdateError::UnknownField(shown)));
            }
            Mutation::Remove(field) => {
                let body = with_meta(&delta, &meta, |m| { m.remove(field); });
                let result = outcome(&body, &r)?;
                match field {
                    "loss" | "accuracy" => {
                        let mut expected = meta.clone();
                        if field == "loss" { expected.loss = None } else { expected.accuracy = None }
                        let a = result.map_err(|e| TestCaseError::fail(format!("without `{field}`: {e}")))?;
                        prop_assert_eq!(&a.meta, &expected);
                        prop_assert_eq!(&a.tensors, &tensors);
                    }
                    _ => prop_assert_eq!(result, Err(UpdateError::MissingField(field))),
                }
            }
        }
    }

    /// Around the bound: an update whose norm is below `max_norm` is accepted, one above it is
    /// refused with its norm and the bound; within a relative 1e-9 of the bound (where the
    /// order of summation could tip it) either is allowed.
    #[test]
    fn the_norm_bound_refuses_exactly_what_exceeds_it(
        (delta, ratio) in (
            layout().prop_flat_map(|l| params_for(&l, -1e3f32..1e3)),
            prop_oneof![
                0.0f64..1.0,
                1.0f64..10.0,
                (-1e-6f64..1e-6).prop_map(|d| 1.0 + d),
                select(vec![1.0f64, 1.0 - 1e-7, 1.0 + 1e-7, 0.5, 2.0]),
            ],
        ),
        bound in prop_oneof![1e-3f64..1.0, 1.0f64..1e4],
        weighting in weighting(),
    ) {
        // Scale the update so that its norm is about `ratio * bound`.
        let norm = delta.l2_norm();
        prop_assume!(norm > 0.0);
        let scale = (ratio * bound / norm) as f32;
        let mut scaled = delta.clone();
        for t in scaled.tensors_mut() {
            for v in t.data_mut() {
                *v *= scale;
            }
        }
        let actual = norm_of(bytes_of(&scaled).iter().map(Vec::as_slice));
        let body = update::encode(&scaled, &UpdateMeta {
            base_version: 0,
            examples: 1,
            loss: None,
            accuracy: None,
            token: "t".into(),
        });
        let result = outcome(&body, &rules(&scaled.layout(), Some(bound), weighting))?;
        if actual < bound * (1.0 - 1e-9) {
            prop_assert!(result.is_ok(), "norm {} under the bound {} was refused: {:?}", actual, bound, result);
        } else if actual > bound * (1.0 + 1e-9) {
            match result {
                Err(UpdateError::NormTooLarge { norm, bound: b }) => {
                    prop_assert_eq!(b, bound);
                    prop_assert!((norm - actual).abs() <= actual * 1e-12, "reported {} for {}", norm, actual);
                }
                other => return Err(TestCaseError::fail(format!("norm {actual} over the bound {bound} gave {other:?}"))),
            }
        }
    }

    /// The exact edge: with one non-zero value `v` the norm is exactly `|v|`, so a bound of
    /// `|v|` accepts (the bound is inclusive) and the next f64 below refuses.
    #[test]
    fn the_norm_bound_is_inclusive(
        (layout, at) in layout()
            .prop_filter("holds a value", |l| l.numel() > 0)
            .prop_flat_map(|l| { let n = l.numel(); (Just(l), 0..n) }),
        v in finite_f32().prop_filter("non-zero", |v| *v != 0.0),
    ) {
        let mut delta = Parameters::zeros(&layout);
        let mut left = at;
        for t in delta.tensors_mut() {
            if left < t.len() {
                t.data_mut()[left] = v;
                break;
            }
            left -= t.len();
        }
        let body = update::encode(&delta, &UpdateMeta {
            base_version: 0,
            examples: 1,
            loss: None,
            accuracy: None,
            token: "t".into(),
        });
        let edge = f64::from(v).abs();
        let check = |bound: f64| update::check(body.clone(), &rules(&layout, Some(bound), Weighting::Uniform));
        prop_assert!(check(edge).is_ok(), "norm {} refused at the bound {}", edge, edge);
        prop_assert!(check(edge.next_up()).is_ok());
        let below = edge.next_down();
        prop_assert_eq!(
            check(below).err(),
            Some(UpdateError::NormTooLarge { norm: edge, bound: below })
        );
        // All zeros have norm 0, within a bound of 0.
        let zeros = update::encode(&Parameters::zeros(&layout), &UpdateMeta {
            base_version: 0,
            examples: 1,
            loss: None,
            accuracy: None,
            token: "t".into(),
        });
        prop_assert!(update::check(zeros, &rules(&layout, Some(0.0), Weighting::Uniform)).is_ok());
    }
}
