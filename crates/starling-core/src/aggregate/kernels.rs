//! The aggregation hot path, `sums += w * values`, compiled for the best vector instructions
//! the CPU has (chosen at run time) — the portable x86-64 baseline only has SSE2, which
//! leaves half of the memory bandwidth unused. This module, [`crate::trainer::layers::gemm`] and
//! [`crate::trainer::layers::kernels`] are the only places that use `unsafe`.
#![allow(unsafe_code)]

/// `sums[i] += w * values[i]`, accumulating in f64.
pub fn axpy_f32_into_f64(sums: &mut [f64], values: &[f32], w: f64) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports AVX-512F, checked just above.
            return unsafe { axpy_avx512(sums, values, w) };
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2, checked just above.
            return unsafe { axpy_avx2(sums, values, w) };
        }
    }
    axpy_portable(sums, values, w);
}

/// `sum(values[i]^2)`, accumulated in f64: an update's squared L2 norm.
pub fn sum_squares(values: &[f32]) -> f64 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports AVX-512F, checked just above.
            return unsafe { sum_squares_avx512(values) };
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2, checked just above.
            return unsafe { sum_squares_avx2(values) };
        }
    }
    sum_squares_portable(values)
}

/// Eight independent partial sums, so that the loop vectorises (one f64 sum would be a chain
/// the compiler may not reorder).
#[inline(always)]
fn sum_squares_portable(values: &[f32]) -> f64 {
    let mut acc = [0.0f64; 8];
    let chunks = values.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            let x = f64::from(x);
            *a += x * x;
        }
    }
    let tail: f64 = rest.iter().map(|&x| f64::from(x) * f64::from(x)).sum();
    acc.iter().sum::<f64>() + tail
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn sum_squares_avx2(values: &[f32]) -> f64 {
    sum_squares_portable(values)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn sum_squares_avx512(values: &[f32]) -> f64 {
    sum_squares_portable(values)
}

/// Whether every value is finite (no NaN, no infinity).
pub fn all_finite(values: &[f32]) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2, checked just above.
            return unsafe { all_finite_avx2(values) };
        }
    }
    all_finite_portable(values)
}

/// Branch-free over blocks, so that it vectorises; stops at the first bad block.
#[inline(always)]
fn all_finite_portable(values: &[f32]) -> bool {
    const EXP: u32 = 0x7f80_0000;
    values.chunks(1024).all(|block| {
        block
            .iter()
            .fold(true, |ok, v| ok & (v.to_bits() & EXP != EXP))
    })
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn all_finite_avx2(values: &[f32]) -> bool {
    all_finite_portable(values)
}

#[inline(always)]
fn axpy_portable(sums: &mut [f64], values: &[f32], w: f64) {
    for (acc, &x) in sums.iter_mut().zip(values) {
        *acc += w * f64::from(x);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn axpy_avx2(sums: &mut [f64], values: &[f32], w: f64) {
    axpy_portable(sums, values, w);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn axpy_avx512(sums: &mut [f64], values: &[f32], w: f64) {
    axpy_portable(sums, values, w);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_path_gives_the_portable_result() {
        let values: Vec<f32> = (0..1003).map(|i| (i as f32 * 0.37).sin()).collect();
        let mut want = vec![0.5f64; values.len()];
        axpy_portable(&mut want, &values, 3.0);
        let mut got = vec![0.5f64; values.len()];
        axpy_f32_into_f64(&mut got, &values, 3.0);
        assert_eq!(got, want);
        let mut v = values.clone();
        assert!(all_finite(&v));
        v[1001] = f32::NAN;
        assert!(!all_finite(&v));
        v[1001] = f32::NEG_INFINITY;
        assert!(!all_finite(&v));
        v[1001] = f32::MAX;
        assert!(all_finite(&v));
        let naive: f64 = values.iter().map(|&x| f64::from(x) * f64::from(x)).sum();
        let fast = sum_squares(&values);
        assert!((fast - naive).abs() <= 1e-12 * naive, "{fast} vs {naive}");
        assert_eq!(
            sum_squares_portable(&values[..5]),
            sum_squares(&values[..5])
        );
    }

    /// `#[target_feature(enable = "avx512f")]` above is stable only since Rust 1.89: the
    /// workspace must not promise an older compiler (issue point 11).
    #[test]
    fn the_declared_minimum_rust_builds_the_avx512_kernel() {
        let manifest = include_str!("../../../../Cargo.toml");
        let declared = manifest
            .lines()
            .find_map(|l| l.trim().strip_prefix("rust-version = "))
            .expect("the workspace declares a rust-version")
            .trim_matches('"');
        let mut parts = declared.split('.').map(|p| p.parse::<u32>().unwrap());
        let (major, minor) = (parts.next().unwrap(), parts.next().unwrap_or(0));
        assert!(
            (major, minor) >= (1, 89),
            "rust-version {declared} is older than 1.89, which avx512f target features need"
        );
    }
}
