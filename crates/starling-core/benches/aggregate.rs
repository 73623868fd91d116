//! The aggregator alone: folding one update of P parameters into the running f64 sums, for
//! P = 1e4, 1e6 and 1e7, next to `memcpy` of the same bytes in the same group (criterion
//! prints both throughputs in GB/s; `starling bench aggregate` prints their ratio).

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use starling_core::wire::update::{self, UpdateMeta};
use starling_core::{Parameters, Tensor, WeightedSum};

fn body(params: usize) -> (starling_core::Layout, Vec<u8>) {
    let w: Vec<f32> = (0..params - 1)
        .map(|i| ((i % 97) as f32 - 48.0) * 1e-3)
        .collect();
    let delta = Parameters::new(vec![
        ("W".into(), Tensor::new(vec![params - 1, 1], w).unwrap()),
        ("b".into(), Tensor::new(vec![1], vec![0.5]).unwrap()),
    ])
    .unwrap();
    let meta = UpdateMeta {
        base_version: 0,
        examples: 10,
        loss: Some(0.5),
        accuracy: None,
        token: "bench".into(),
    };
    (delta.layout(), update::encode(&delta, &meta))
}

fn aggregate(c: &mut Criterion) {
    let mut group = c.benchmark_group("aggregate");
    for params in [10_000usize, 1_000_000, 10_000_000] {
        let (layout, bytes) = body(params);
        group.throughput(Throughput::Bytes(4 * params as u64));
        group.sample_size(if params >= 10_000_000 { 10 } else { 50 });
        let view = update::check(bytes.clone(), &update::Rules::lenient(&layout)).unwrap();
        let mut agg = WeightedSum::new(&layout);
        group.bench_with_input(BenchmarkId::new("accept", params), &params, |b, _| {
            b.iter(|| agg.accept(black_box(&view)));
        });
        group.bench_with_input(
            BenchmarkId::new("decode_and_check", params),
            &params,
            |b, _| {
                b.iter(|| update::decode(black_box(&bytes), &layout, None).unwrap());
            },
        );
        let src: Vec<u8> = view.tensors().collect::<Vec<_>>().concat();
        let mut dst = vec![0u8; src.len()];
        group.bench_with_input(BenchmarkId::new("memcpy", params), &params, |b, _| {
            b.iter(|| dst.copy_from_slice(black_box(&src)));
        });
    }
    group.finish();
}

criterion_group!(benches, aggregate);
criterion_main!(benches);
