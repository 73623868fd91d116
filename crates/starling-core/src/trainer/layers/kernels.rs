//! The trainer's plain loops that the portable x86-64 baseline (SSE2 only) would leave half
//! vectorised, compiled for the best vector instructions the CPU has (chosen at run time, as
//! in `crate::aggregate::kernels`): with this module, that one and [`super::gemm`] are the
//! only places that use `unsafe`.
//!
//! - [`dense_forward_small`]: a dense layer's forward pass at small batches. At the FedAvg
//!   paper's batch of 10 each weight is used ten times, so the cost is moving the matrix
//!   (the CNN's first dense layer is 6.4 MB, beyond a core's L2 cache): this reads the
//!   matrix where it lies, where a GEMM kernel would first copy the whole of it into its
//!   packed layout, and skips the inputs a ReLU zeroed.
//! - `gemm`: the register-blocked product under that kernel, Winograd's transformed GEMMs
//!   and (natively, `small_gemm`) im2col's for a first convolution: products too small or
//!   too thin to pay for packing.
//! - [`sgd_step`]: `p -= lr g` for the layers whose step [`crate::Model::train_step`] takes
//!   right after their backward pass.
//! - [`run_vectorised`]: any [`Vectorised`] work (the Winograd transforms and GEMMs, the
//!   dense layer's small-batch step), compiled for AVX-512, AVX2+FMA and the baseline, and
//!   run on the best the CPU has; the work learns whether it may fuse multiply-adds
//!   ([`madd`]) and how many vector registers it has.

#![allow(unsafe_code)]

/// `y += x W` for a small batch: `x` is `n x inputs`, `W` `inputs x units`, `y` `n x units`
/// (holding the bias already). `W` goes by in slabs of rows that stay in L2; in each, blocks
/// of `y` held in registers take a row block's products, so each weight loaded from the
/// cache serves eight rows of the batch in registers instead of one row in memory.
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
    run_vectorised(DenseForward {
        x,
        n,
        w,
        inputs,
        units,
        y,
    });
}

/// `c += a b` ([`gemm`], then any columns past the last whole lane), compiled for the best
/// vector instructions the CPU has: `a` is `m x k`, `b` row-major `k x n`, `c` row-major
/// `m x n`. For products too small to pay for a GEMM's packing (a first convolution's
/// `[32, 25] x [25, 784]` per example).
#[cfg(not(target_arch = "wasm32"))]
pub(crate) fn small_gemm(a: View<'_>, m: usize, k: usize, b: &[f32], n: usize, c: &mut [f32]) {
    assert!(
        b.len() >= k * n && c.len() >= m * n,
        "small gemm operand lengths"
    );
    run_vectorised(SmallGemm { a, m, k, b, n, c });
}

/// The work of [`small_gemm`].
#[cfg(not(target_arch = "wasm32"))]
struct SmallGemm<'a> {
    a: View<'a>,
    m: usize,
    k: usize,
    b: &'a [f32],
    n: usize,
    c: &'a mut [f32],
}

#[cfg(not(target_arch = "wasm32"))]
impl Vectorised for SmallGemm<'_> {
    #[inline(always)]
    fn run<const FMA: bool, const WIDE: bool>(self) {
        let Self { a, m, k, b, n, c } = self;
        if WIDE {
            gemm::<FMA, 8, 3>(a, m, k, b, n, c, true);
        } else {
            gemm::<FMA, 4, 1>(a, m, k, b, n, c, true);
        }
        for i in 0..m {
            for j in n / L * L..n {
                let mut sum = c[i * n + j];
                for kk in 0..k {
                    sum = madd::<FMA>(a.data[i * a.rs + kk * a.cs], b[kk * n + j], sum);
                }
                c[i * n + j] = sum;
            }
        }
    }
}

/// Rows of `W` in a slab of [`DenseForward`]: 64 rows of a 512-unit layer are 128 KiB,
/// which stay in L2 while every block of columns and rows goes over them.
const SLAB_ROWS: usize = 64;

/// A slab of [`DenseForward`]'s weight: rows `k0..k0 + k` of `W` (`b`) and columns
/// `k0..k0 + k` of `x` (`a`).
struct Slab<'a> {
    a: View<'a>,
    k: usize,
    b: &'a [f32],
    units: usize,
    /// Columns in whole lanes.
    full: usize,
    /// The next slab's rows of `W` (empty for the last), fetched into the cache while
    /// this one is worked on.
    next: &'a [f32],
}

impl Slab<'_> {
    /// Adds the slab's products to rows `i0..i0 + R` of `y`, over the inputs that are not
    /// zero in every one of those rows: after a ReLU many are, and their weights need not
    /// even be read.
    #[inline(always)]
    fn rows<const FMA: bool, const R: usize, const NV: usize>(&self, i0: usize, y: &mut [f32]) {
        let mut ks = [0usize; SLAB_ROWS];
        let mut live = 0;
        for kk in 0..self.k {
            if (0..R).any(|r| self.a.data[(i0 + r) * self.a.rs + kk] != 0.0) {
                ks[live] = kk;
                live += 1;
            }
        }
        let ks = &ks[..live];
        let mut j = 0;
        while j + NV * L <= self.full {
            if i0 == 0 {
                for kk in 0..SLAB_ROWS {
                    for v in 0..NV {
                        prefetch(self.next, kk * self.units + j + v * L);
                    }
                }
            }
            gemm_block::<FMA, R, NV>(
                self.a,
                i0,
                ks.iter().copied(),
                self.b,
                self.units,
                j,
                y,
                true,
            );
            j += NV * L;
        }
        while j + L <= self.full {
            gemm_block::<FMA, R, 1>(
                self.a,
                i0,
                ks.iter().copied(),
                self.b,
                self.units,
                j,
                y,
                true,
            );
            j += L;
        }
    }
}

/// The work of [`dense_forward_small`].
struct DenseForward<'a> {
    x: &'a [f32],
    n: usize,
    w: &'a [f32],
    inputs: usize,
    units: usize,
    y: &'a mut [f32],
}

impl Vectorised for DenseForward<'_> {
    #[inline(always)]
    fn run<const FMA: bool, const WIDE: bool>(self) {
        let Self {
            x,
            n,
            w,
            inputs,
            units,
            y,
        } = self;
        let full = units / L * L;
        // A weight beyond the L2 cache (the CNN's 6.4 MB) is fetched a slab ahead: the
        // slabs are read a few lanes of each row at a time, which the CPU does not foresee.
        // One that fits (the 2NN's) is in the cache already, and fetching it is pure cost.
        let prefetch_next = inputs * units >= super::dense::SMALL_STEP_MIN_WEIGHTS;
        for k0 in (0..inputs).step_by(SLAB_ROWS) {
            let slab = Slab {
                a: View {
                    data: &x[k0..],
                    rs: inputs,
                    cs: 1,
                },
                k: SLAB_ROWS.min(inputs - k0),
                b: &w[k0 * units..],
                units,
                full,
                next: if prefetch_next {
                    w.get((k0 + SLAB_ROWS) * units..).unwrap_or(&[])
                } else {
                    &[]
                },
            };
            let mut i = 0;
            if WIDE {
                while i + 8 <= n {
                    slab.rows::<FMA, 8, 3>(i, y);
                    i += 8;
                }
                while i + 2 <= n {
                    slab.rows::<FMA, 2, 3>(i, y);
                    i += 2;
                }
            } else {
                while i + 4 <= n {
                    slab.rows::<FMA, 4, 1>(i, y);
                    i += 4;
                }
            }
            while i < n {
                slab.rows::<FMA, 1, 1>(i, y);
                i += 1;
            }
        }
        // The columns past the last whole lane.
        if full < units {
            forward_portable::<FMA>(x, n, w, inputs, units, full, y);
        }
    }
}

/// Asks the CPU to bring `v[at]` into its L2 cache (if `at` is inside `v`).
#[inline(always)]
fn prefetch(v: &[f32], at: usize) {
    if at < v.len() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the address is inside `v`; a prefetch is only a hint, which changes
        // nothing the program sees and never faults.
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T1 }>(
                v.as_ptr().add(at).cast(),
            );
        }
    }
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

/// Floats in a lane: one AVX-512 register, two AVX2 ones.
pub(crate) const L: usize = 16;

/// A lane of floats, which the compiler keeps in vector registers.
pub(crate) type Lane = [f32; L];

/// A matrix read element by element: `(i, k)` is `data[i * rs + k * cs]`, so a row-major
/// matrix or the transpose of one.
#[derive(Clone, Copy)]
pub(crate) struct View<'a> {
    pub(crate) data: &'a [f32],
    pub(crate) rs: usize,
    pub(crate) cs: usize,
}

/// The sum of a lane's values, as a tree (`(l, l + 8)`, then `(l, l + 4)`, ...): a plain
/// sum would be one chain of dependent additions.
#[cfg(not(target_arch = "wasm32"))]
#[inline(always)]
pub(crate) fn lane_sum(a: &Lane) -> f32 {
    let h: [f32; 8] = std::array::from_fn(|l| a[l] + a[l + 8]);
    let q: [f32; 4] = std::array::from_fn(|l| h[l] + h[l + 4]);
    (q[0] + q[2]) + (q[1] + q[3])
}

/// `c = a b`, or `c += a b` when `accumulate`, for `a` an `m x k` [`View`], `b` a row-major
/// `k x n` matrix and `c` a row-major `m x n` one: the columns in whole lanes of `L` (the
/// caller does any past them). Made for products too small, or too thin, to pay for packing
/// (Winograd's transformed domain, where `k` is 32 or 64; a dense layer's forward pass at a
/// batch of ten): this reads `b`'s rows as whole lanes where they lie and broadcasts `a`'s
/// elements, with `R x NV` lanes of `c` held in registers.
#[cfg(not(target_arch = "wasm32"))]
#[inline(always)]
pub(crate) fn gemm<const FMA: bool, const R: usize, const NV: usize>(
    a: View<'_>,
    m: usize,
    k: usize,
    b: &[f32],
    n: usize,
    c: &mut [f32],
    accumulate: bool,
) {
    let mut j = 0;
    while j + NV * L <= n {
        gemm_columns::<FMA, R, NV>(a, m, k, b, n, j, c, accumulate);
        j += NV * L;
    }
    while j + L <= n {
        gemm_columns::<FMA, R, 1>(a, m, k, b, n, j, c, accumulate);
        j += L;
    }
}

/// [`gemm`] for the `NV` lanes of columns from `j`: blocks of `R` rows, then of two, then
/// one (a batch of ten is eight and two).
#[cfg(not(target_arch = "wasm32"))]
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn gemm_columns<const FMA: bool, const R: usize, const NV: usize>(
    a: View<'_>,
    m: usize,
    k: usize,
    b: &[f32],
    n: usize,
    j: usize,
    c: &mut [f32],
    accumulate: bool,
) {
    let mut i = 0;
    while i + R <= m {
        gemm_block::<FMA, R, NV>(a, i, 0..k, b, n, j, c, accumulate);
        i += R;
    }
    while R > 2 && i + 2 <= m {
        gemm_block::<FMA, 2, NV>(a, i, 0..k, b, n, j, c, accumulate);
        i += 2;
    }
    while i < m {
        gemm_block::<FMA, 1, NV>(a, i, 0..k, b, n, j, c, accumulate);
        i += 1;
    }
}

/// Rows `i0..i0 + R` and lanes `j..j + NV L` of [`gemm`]'s `c`, summing over the `ks` of `a`'s
/// columns and `b`'s rows (`0..k` but for any the caller knows add nothing).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn gemm_block<const FMA: bool, const R: usize, const NV: usize>(
    a: View<'_>,
    i0: usize,
    ks: impl IntoIterator<Item = usize>,
    b: &[f32],
    n: usize,
    j: usize,
    c: &mut [f32],
    accumulate: bool,
) {
    let mut acc = [[[0.0f32; L]; NV]; R];
    if accumulate {
        for (r, row) in acc.iter_mut().enumerate() {
            for (v, lane) in row.iter_mut().enumerate() {
                lane.copy_from_slice(&c[(i0 + r) * n + j + v * L..][..L]);
            }
        }
    }
    let rows: [usize; R] = std::array::from_fn(|r| (i0 + r) * a.rs);
    for kk in ks {
        let brow = &b[kk * n + j..][..NV * L];
        let bv: [Lane; NV] = std::array::from_fn(|v| {
            let mut lane = [0.0f32; L];
            lane.copy_from_slice(&brow[v * L..][..L]);
            lane
        });
        let ak = kk * a.cs;
        for (row, &ar) in acc.iter_mut().zip(&rows) {
            let s = a.data[ar + ak];
            for (lane, bl) in row.iter_mut().zip(&bv) {
                for l in 0..L {
                    lane[l] = madd::<FMA>(s, bl[l], lane[l]);
                }
            }
        }
    }
    for (r, row) in acc.iter().enumerate() {
        for (v, lane) in row.iter().enumerate() {
            c[(i0 + r) * n + j + v * L..][..L].copy_from_slice(lane);
        }
    }
}

/// `y += x W` for the columns of `y` from `from` on, four rows of `W` at a time, so that
/// each pass over a block of a row of `y` adds four products.
#[inline(always)]
fn forward_portable<const FMA: bool>(
    x: &[f32],
    n: usize,
    w: &[f32],
    inputs: usize,
    units: usize,
    from: usize,
    y: &mut [f32],
) {
    for j0 in (from..units).step_by(UNIT_BLOCK) {
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

    /// The forward kernel gives the GEMM's products, on the CPU's best instructions and on
    /// every other path. Each register block sums a row's products in the same order, so
    /// AVX2's blocks (four rows by one lane) give AVX-512's (eight by three) bit for bit; the
    /// baseline, without fused multiply-adds, and the row-by-row loop for the columns past
    /// the last lane agree within rounding. Inputs zero in every row of a block are skipped.
    #[test]
    fn the_forward_kernel_matches_the_gemm_on_every_path() {
        for (n, inputs, units) in SHAPES {
            let mut x = values(n * inputs, 4, 3);
            // Whole input columns zero (as after a ReLU), which the blocks skip.
            for row in x.chunks_exact_mut(inputs) {
                for v in row.iter_mut().step_by(5) {
                    *v = 0.0;
                }
            }
            let w = values(inputs * units, 5, 0);
            let bias = values(n * units, 6, 0);
            let mut want = bias.clone();
            sgemm(
                1.0,
                Mat::new(&x, n, inputs),
                Mat::new(&w, inputs, units),
                1.0,
                &mut want,
            );
            let run = |fma: bool, wide: bool| {
                let mut y = bias.clone();
                let task = DenseForward {
                    x: &x,
                    n,
                    w: &w,
                    inputs,
                    units,
                    y: &mut y,
                };
                match (fma, wide) {
                    (true, true) => task.run::<true, true>(),
                    (true, false) => task.run::<true, false>(),
                    _ => task.run::<false, false>(),
                }
                y
            };
            let shape = format!("({n}, {inputs}, {units})");
            let mut got = bias.clone();
            dense_forward_small(&x, n, &w, inputs, units, &mut got);
            close(&got, &want, &format!("y {shape}"));
            let wide = run(true, true);
            close(&wide, &want, &format!("wide {shape}"));
            assert_eq!(run(true, false), wide, "narrow and wide blocks {shape}");
            close(&run(false, false), &wide, &format!("baseline {shape}"));
            let mut portable = bias.clone();
            forward_portable::<false>(&x, n, &w, inputs, units, 0, &mut portable);
            close(&portable, &want, &format!("row by row {shape}"));
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
