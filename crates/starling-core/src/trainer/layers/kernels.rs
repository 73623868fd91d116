//! The trainer's plain loops that the portable x86-64 baseline (SSE2 only) would leave half
//! vectorised, compiled for the best vector instructions the CPU has (chosen at run time, as
//! in `crate::aggregate::kernels`): with this module, that one and [`super::gemm`] are the
//! only places that use `unsafe`.
//!
//! - [`dense_forward_small`]: a dense layer's forward pass at small batches. At the FedAvg
//!   paper's batch of 10 each weight is used ten times, so the cost is moving the matrix
//!   (the CNN's first dense layer is 6.4 MB, beyond a core's L2 cache): this reads each row
//!   once from where it lies, where a GEMM kernel would first copy the whole matrix into its
//!   packed layout.
//! - [`sgd_step`]: `p -= lr g` for the layers whose step [`crate::Model::train_step`] takes
//!   right after their backward pass.
//! - [`run_vectorised`]: any [`Vectorised`] work (the Winograd transforms and GEMMs, the
//!   dense layer's small-batch step), compiled for AVX-512, AVX2+FMA and the baseline, and
//!   run on the best the CPU has; the work learns whether it may fuse multiply-adds
//!   ([`madd`]) and how many vector registers it has.

#![allow(unsafe_code)]

/// `y += x W` for a small batch: `x` is `n x inputs`, `W` `inputs x units`, `y` `n x units`
/// (holding the bias already). Each row of `W` is read once; `y` should fit in L1 (as it
/// does for batches of tens and layers of hundreds of units).
pub fn dense_forward_small(
    x: &[f32],
    n: usize,
    w: &[f32],
    inputs: usize,
    units: usize,
    y: &mut [f32],
) {
    assert_eq!(x.len(), n * inputs, "dense input length");
    assert_eq!(w.len(), inputs * units, "dense weight length");
    assert_eq!(y.len(), n * units, "dense output length");
    #[cfg(target_arch = "x86_64")]
    {
        let fma = std::arch::is_x86_feature_detected!("fma");
        if fma && std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports AVX-512F and FMA, checked just above.
            return unsafe { forward_avx512(x, n, w, inputs, units, y) };
        }
        if fma && std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2 and FMA, checked just above.
            return unsafe { forward_avx2(x, n, w, inputs, units, y) };
        }
    }
    forward_portable::<false>(x, n, w, inputs, units, y);
}

/// `p -= lr g`: the plain SGD step of one tensor.
pub fn sgd_step(p: &mut [f32], g: &[f32], learning_rate: f32) {
    assert_eq!(p.len(), g.len(), "parameter and gradient lengths");
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports AVX-512F, checked just above.
            return unsafe { sgd_avx512(p, g, learning_rate) };
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2, checked just above.
            return unsafe { sgd_avx2(p, g, learning_rate) };
        }
    }
    sgd_portable(p, g, learning_rate);
}

/// Work whose loops should be compiled for the best vector instructions the CPU has. `run`
/// must be `#[inline(always)]`, as must what it calls that holds the loops, so that they are
/// compiled inside [`run_vectorised`]'s per-CPU copies.
pub trait Vectorised {
    /// Does the work. `FMA`: the build has fused multiply-add (use [`madd`]). `WIDE`: it
    /// has 32 vector registers of 16 floats (AVX-512), so register blocks may be large.
    fn run<const FMA: bool, const WIDE: bool>(self);
}

/// Runs `task` compiled for AVX-512, AVX2 with FMA, or the baseline, whichever is the best
/// the CPU has.
pub fn run_vectorised<T: Vectorised>(task: T) {
    #[cfg(target_arch = "x86_64")]
    {
        let fma = std::arch::is_x86_feature_detected!("fma");
        if fma && std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports AVX-512F and FMA, checked just above.
            return unsafe { run_avx512(task) };
        }
        if fma && std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2 and FMA, checked just above.
            return unsafe { run_avx2(task) };
        }
    }
    task.run::<false, false>();
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
unsafe fn run_avx512<T: Vectorised>(task: T) {
    task.run::<true, true>();
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn run_avx2<T: Vectorised>(task: T) {
    task.run::<true, false>();
}

#[inline(always)]
fn sgd_portable(p: &mut [f32], g: &[f32], lr: f32) {
    for (pv, gv) in p.iter_mut().zip(g) {
        *pv -= lr * gv;
    }
}

/// Columns of `y` and `W` handled together: a block of `y` for a batch of ten (10 KiB) and
/// of four rows of `W` (4 KiB) stay in L1 while the block is worked on.
const UNIT_BLOCK: usize = 256;

/// `a b + c`: fused where the CPU has FMA (`FMA` true: the caller's target features
/// include it), else a product and a sum (`mul_add` without FMA would be a library call).
#[inline(always)]
pub fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// Four rows of `W` at a time, so that each pass over a block of a row of `y` adds four
/// products.
#[inline(always)]
fn forward_portable<const FMA: bool>(
    x: &[f32],
    n: usize,
    w: &[f32],
    inputs: usize,
    units: usize,
    y: &mut [f32],
) {
    for j0 in (0..units).step_by(UNIT_BLOCK) {
        let j1 = (j0 + UNIT_BLOCK).min(units);
        let row = |k: usize| &w[k * units + j0..k * units + j1];
        let mut k = 0;
        while k + 4 <= inputs {
            let (w0, w1, w2, w3) = (row(k), row(k + 1), row(k + 2), row(k + 3));
            for (xr, yr) in x
                .chunks_exact(inputs)
                .zip(y.chunks_exact_mut(units))
                .take(n)
            {
                let (a0, a1, a2, a3) = (xr[k], xr[k + 1], xr[k + 2], xr[k + 3]);
                if a0 == 0.0 && a1 == 0.0 && a2 == 0.0 && a3 == 0.0 {
                    // Inputs after a ReLU are often zero: nothing to add.
                    continue;
                }
                let yb = &mut yr[j0..j1];
                for ((((yv, v0), v1), v2), v3) in yb.iter_mut().zip(w0).zip(w1).zip(w2).zip(w3) {
                    let t = madd::<FMA>(a0, *v0, *yv);
                    let t = madd::<FMA>(a1, *v1, t);
                    let t = madd::<FMA>(a2, *v2, t);
                    *yv = madd::<FMA>(a3, *v3, t);
                }
            }
            k += 4;
        }
        for k in k..inputs {
            let wr = row(k);
            for (xr, yr) in x.chunks_exact(inputs).zip(y.chunks_exact_mut(units)) {
                let a = xr[k];
                if a != 0.0 {
                    for (yv, v) in yr[j0..j1].iter_mut().zip(wr) {
                        *yv = madd::<FMA>(a, *v, *yv);
                    }
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn forward_avx2(x: &[f32], n: usize, w: &[f32], inputs: usize, units: usize, y: &mut [f32]) {
    forward_portable::<true>(x, n, w, inputs, units, y);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
unsafe fn forward_avx512(
    x: &[f32],
    n: usize,
    w: &[f32],
    inputs: usize,
    units: usize,
    y: &mut [f32],
) {
    forward_portable::<true>(x, n, w, inputs, units, y);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn sgd_avx2(p: &mut [f32], g: &[f32], lr: f32) {
    sgd_portable(p, g, lr);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn sgd_avx512(p: &mut [f32], g: &[f32], lr: f32) {
    sgd_portable(p, g, lr);
}

#[cfg(test)]
mod tests {
    use super::super::gemm::{sgemm, Mat};
    use super::*;

    fn values(len: usize, seed: usize, zero_every: usize) -> Vec<f32> {
        (0..len)
            .map(|i| {
                if zero_every > 0 && (i * 7 + seed).is_multiple_of(zero_every) {
                    0.0
                } else {
                    (((i * 7919 + seed * 104_729) % 1000) as f32 / 500.0 - 1.0) * 0.7
                }
            })
            .collect()
    }

    fn close(got: &[f32], want: &[f32], what: &str) {
        assert_eq!(got.len(), want.len(), "{what}: lengths");
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                (g - w).abs() <= 1e-4 * (1.0 + w.abs()),
                "{what}[{i}]: {g} against {w}"
            );
        }
    }

    /// Shapes around the kernels' edges: one sample, more samples than a group, inputs not
    /// a multiple of four, units not a multiple of the lanes, ReLU-like zeros in the input.
    const SHAPES: [(usize, usize, usize); 6] = [
        (1, 5, 3),
        (3, 4, 16),
        (10, 37, 33),
        (10, 64, 512),
        (17, 9, 47),
        (8, 130, 200),
    ];

    #[test]
    fn the_forward_kernel_matches_the_gemm() {
        for (n, inputs, units) in SHAPES {
            let x = values(n * inputs, 1, 3);
            let w = values(inputs * units, 2, 0);
            let bias = values(n * units, 3, 0);
            let mut want = bias.clone();
            sgemm(
                1.0,
                Mat::new(&x, n, inputs),
                Mat::new(&w, inputs, units),
                1.0,
                &mut want,
            );
            let mut got = bias.clone();
            dense_forward_small(&x, n, &w, inputs, units, &mut got);
            close(&got, &want, &format!("y ({n}, {inputs}, {units})"));
            let mut portable = bias.clone();
            forward_portable::<false>(&x, n, &w, inputs, units, &mut portable);
            close(&portable, &want, "portable y");
        }
    }

    #[test]
    fn the_sgd_step_subtracts_the_scaled_gradient() {
        let mut p = values(1003, 7, 0);
        let g = values(1003, 8, 0);
        let want: Vec<f32> = p.iter().zip(&g).map(|(a, b)| a - 0.1 * b).collect();
        sgd_step(&mut p, &g, 0.1);
        assert_eq!(p, want);
    }
}
