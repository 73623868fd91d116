//! The aggregator alone: folding an update of P parameters into the running f64 sums,
//! measured side by side with `memcpy` of the update's bytes on the same machine.

use std::hint::black_box;
use std::time::{Duration, Instant};

use serde::Serialize;
use starling_core::wire::params::Layout;
use starling_core::wire::update::{self, UpdateMeta};
use starling_core::{Parameters, Tensor, WeightedSum};

/// One row of the aggregator benchmark.
#[derive(Debug, Clone, Serialize)]
pub struct AggregateRow {
    /// Parameters per update.
    pub params: usize,
    /// Updates folded per second.
    pub updates_per_sec: f64,
    /// Update bytes folded per second, in GB/s.
    pub accumulate_gb_per_sec: f64,
    /// `memcpy` of the same number of bytes, in GB/s.
    pub memcpy_gb_per_sec: f64,
    /// Accumulate throughput over memcpy throughput.
    pub ratio: f64,
}

/// An encoded update of `params` parameters, shaped like the `linear` model with
/// `params - 1` inputs.
pub fn update_body(params: usize, token: &str) -> (Layout, Vec<u8>) {
    let w: Vec<f32> = (0..params - 1)
        .map(|i| ((i % 97) as f32 - 48.0) * 1e-3)
        .collect();
    let delta = Parameters::new(vec![
        (
            "W".into(),
            Tensor::new(vec![params - 1, 1], w).expect("shape"),
        ),
        ("b".into(), Tensor::new(vec![1], vec![0.5]).expect("shape")),
    ])
    .expect("unique names");
    let meta = UpdateMeta {
        base_version: 0,
        examples: 10,
        loss: Some(0.5),
        accuracy: None,
        token: token.into(),
    };
    (delta.layout(), update::encode(&delta, &meta))
}

/// Times `f` for at least `budget`, returning seconds per call (best of several batches).
fn time_per_call(budget: Duration, mut f: impl FnMut()) -> f64 {
    f();
    let mut best = f64::INFINITY;
    let started = Instant::now();
    let mut batch = 1u32;
    while started.elapsed() < budget {
        let t = Instant::now();
        for _ in 0..batch {
            f();
        }
        let per = t.elapsed().as_secs_f64() / f64::from(batch);
        best = best.min(per);
        if t.elapsed() < budget / 20 {
            batch = batch.saturating_mul(2);
        }
    }
    best
}

/// Measures accumulate and memcpy for each parameter count, interleaving the two so both
/// see the same machine conditions.
pub fn run(params: &[usize], budget: Duration) -> Vec<AggregateRow> {
    params
        .iter()
        .map(|&p| {
            let (layout, body) = update_body(p.max(2), "bench");
            let view = update::check(body.clone(), &update::Rules::lenient(&layout))
                .expect("a valid update");
            let mut agg = WeightedSum::new(&layout);
            let src: Vec<u8> = view.tensors().collect::<Vec<_>>().concat();
            let mut dst = vec![0u8; src.len()];
            let bytes = src.len() as f64;
            let (mut acc, mut cpy) = (f64::INFINITY, f64::INFINITY);
            for _ in 0..3 {
                cpy = cpy.min(time_per_call(budget / 6, || {
                    dst.copy_from_slice(black_box(&src));
                    black_box(&mut dst);
                }));
                acc = acc.min(time_per_call(budget / 6, || {
                    agg.accept(black_box(&view));
                }));
            }
            black_box(agg.updates());
            AggregateRow {
                params: p,
                updates_per_sec: 1.0 / acc,
                accumulate_gb_per_sec: bytes / acc / 1e9,
                memcpy_gb_per_sec: bytes / cpy / 1e9,
                ratio: cpy / acc,
            }
        })
        .collect()
}
