//! The backward pass of the FedAvg CNN's second convolution (32 to 64 channels, 5x5, `same`,
//! 14x14) on a batch of 10, for output gradients with 5% to 50% of their entries nonzero (under
//! a max-pool and a ReLU, 10-25% are). At most `MAX_DENSITY` (30%) nonzero
//! `Conv2d::backward` goes over the nonzero entries only (`layers/sparse_conv.rs`); above it,
//! Winograd's dense pass runs, whose time does not depend on the density. Where the two meet is
//! what sets `MAX_DENSITY`.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use starling_core::trainer::layers::conv::Conv2d;
use starling_core::trainer::spec::Padding;

fn conv_backward(c: &mut Criterion) {
    let conv = Conv2d::new([32, 14, 14], 64, 5, 1, Padding::Same).expect("the CNN's shape");
    let n = 10;
    let x: Vec<f32> = (0..n * conv.input_len())
        .map(|i| ((i * 7919) % 1000) as f32 / 1000.0)
        .collect();
    let w: Vec<f32> = (0..64 * 32 * 25)
        .map(|i| ((i * 104_729) % 1000) as f32 / 1000.0 - 0.5)
        .collect();
    let (mut dw, mut db, mut dx) = (vec![0.0; w.len()], vec![0.0; 64], vec![0.0; x.len()]);
    let (mut col, mut dcol) = (Vec::new(), Vec::new());
    let mut group = c.benchmark_group("conv_backward");
    group.sample_size(20);
    for percent in [5usize, 15, 25, 30, 35, 50] {
        // Nonzero entries spread over the batch by a multiplicative hash.
        let dy: Vec<f32> = (0..n * conv.output_len())
            .map(|i| {
                if (i.wrapping_mul(2_654_435_761) >> 7) % 100 < percent {
                    0.5
                } else {
                    0.0
                }
            })
            .collect();
        group.bench_with_input(
            BenchmarkId::new("nonzero_percent", percent),
            &dy,
            |b, dy| {
                b.iter(|| {
                    conv.backward(
                        black_box(&x),
                        n,
                        &w,
                        black_box(dy),
                        &mut dw,
                        &mut db,
                        Some(&mut dx),
                        &mut col,
                        &mut dcol,
                    )
                });
            },
        );
    }
    group.finish();
}

criterion_group!(benches, conv_backward);
criterion_main!(benches);
