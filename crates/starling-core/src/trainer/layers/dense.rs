//! The fully connected layer `y = x W + b` (`W`: `[inputs, units]`, as in TensorFlow's
//! `matmul(x, W) + b`): on the GEMM kernel, or for training batches of up to
//! [`SMALL_BATCH`] rows on the small-batch kernel of [`super::kernels`]. With plain SGD the
//! backward pass also steps the weight ([`backward_sgd`]).

use super::gemm::{sgemm, sgemm_strided, Mat};
// `LANE`: the floats of a row of `W` worked on at once by `SmallStep`, one vector register.
#[cfg(not(target_arch = "wasm32"))]
use super::kernels::{dense_forward_small, lane_sum, madd, run_vectorised, Vectorised, L as LANE};

/// The largest batch the forward pass gives the small-batch kernel (its output stays in L1).
pub const SMALL_BATCH: usize = 16;

/// The fewest units for which the forward pass uses the small-batch kernel: it pays off where
/// the weight is big; narrower layers (a regression's single output) keep the GEMM, whose
/// sums round the same natively and in the browser.
#[cfg(not(target_arch = "wasm32"))]
const SMALL_KERNEL_MIN_UNITS: usize = 16;

/// Forward pass: `x` is `n x inputs`; `y` is resized to `n x units` and overwritten.
pub fn forward(
    x: &[f32],
    n: usize,
    w: &[f32],
    b: &[f32],
    inputs: usize,
    units: usize,
    y: &mut Vec<f32>,
) {
    y.clear();
    for _ in 0..n {
        y.extend_from_slice(b);
    }
    // Not in the browser's device app, which stays under 100 KB: there the GEMM serves.
    #[cfg(not(target_arch = "wasm32"))]
    if n <= SMALL_BATCH && units >= SMALL_KERNEL_MIN_UNITS {
        return dense_forward_small(x, n, w, inputs, units, y);
    }
    sgemm(
        1.0,
        Mat::new(x, n, inputs),
        Mat::new(w, inputs, units),
        1.0,
        y,
    );
}

/// Backward pass: given `dy` (`n x units`), writes `dW = xᵀ dy` and `db = Σ_rows dy`, and
/// `dx = dy Wᵀ` (`n x inputs`) when given a buffer for it.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    x: &[f32],
    n: usize,
    w: &[f32],
    dy: &[f32],
    inputs: usize,
    units: usize,
    dw: &mut [f32],
    db: &mut [f32],
    dx: Option<&mut [f32]>,
) {
    sgemm(
        1.0,
        Mat::new(x, n, inputs).t(),
        Mat::new(dy, n, units),
        0.0,
        dw,
    );
    bias_gradient(dy, units, db);
    if let Some(dx) = dx {
        sgemm(
            1.0,
            Mat::new(dy, n, units),
            Mat::new(w, inputs, units).t(),
            0.0,
            dx,
        );
    }
}

/// Rows of the weight [`backward_sgd`] handles at a time: 128 KiB of a 256-unit layer,
/// 512 KiB of the CNN's 512-unit one, so the block stays in L2 between its two GEMMs.
const STEP_BLOCK_ROWS: usize = 256;

/// The backward pass fused with a plain SGD step on the weight: writes `dx = dy Wᵀ` (when
/// given a buffer) from the weight as it was, and applies `W -= lr xᵀ dy` as a GEMM into
/// `W`, block of rows by block of rows: each block is read from memory once for both
/// (instead of `W` read for `dx`, `dW` written, then `W` and `dW` read and `W` written by a
/// separate step), and the weight gradient is never stored. The bias is the caller's
/// ([`bias_gradient`]).
#[allow(clippy::too_many_arguments)]
pub fn backward_sgd(
    x: &[f32],
    n: usize,
    w: &mut [f32],
    dy: &[f32],
    inputs: usize,
    units: usize,
    learning_rate: f32,
    mut dx: Option<&mut [f32]>,
) {
    assert_eq!(x.len(), n * inputs, "dense input length");
    assert_eq!(w.len(), inputs * units, "dense weight length");
    assert_eq!(dy.len(), n * units, "dense gradient length");
    if n == 0 {
        if let Some(dx) = dx {
            dx.fill(0.0);
        }
        return;
    }
    // Not in the browser's device app (size), as for the forward pass.
    #[cfg(not(target_arch = "wasm32"))]
    if n <= SMALL_BATCH
        && units >= SMALL_KERNEL_MIN_UNITS
        && inputs * units >= SMALL_STEP_MIN_WEIGHTS
    {
        return run_vectorised(SmallStep {
            x,
            n,
            w,
            dy,
            inputs,
            units,
            learning_rate,
            dx,
        });
    }
    for (block, wb) in w.chunks_mut(STEP_BLOCK_ROWS * units).enumerate() {
        let (k0, rows) = (block * STEP_BLOCK_ROWS, wb.len() / units);
        if let Some(dx) = dx.as_deref_mut() {
            // dx[:, k0..k0 + rows] = dy W[k0..k0 + rows]ᵀ
            sgemm_strided(
                1.0,
                Mat::new(dy, n, units),
                Mat::new(wb, rows, units).t(),
                0.0,
                &mut dx[k0..],
                inputs,
            );
        }
        // W[k0..k0 + rows] -= lr x[:, k0..k0 + rows]ᵀ dy
        sgemm(
            -learning_rate,
            Mat::strided(&x[k0..], n, rows, inputs).t(),
            Mat::new(dy, n, units),
            1.0,
            wb,
        );
    }
}

/// The fewest weights for which a small batch's step goes row by row ([`SmallStep`]): where
/// the weight is beyond half a core's L2 cache (1 MB; the CNN's first dense layer is 6.4 MB)
/// moving it is the cost. A weight that fits (the 2NN's 0.6 MB) is faster on the GEMMs:
/// row by row, the 2NN trained at 0.65x. The small-batch forward pass fetches a weight this
/// large a slab ahead.
pub(crate) const SMALL_STEP_MIN_WEIGHTS: usize = 1 << 18;

/// [`backward_sgd`] for a small batch, row by row of `W`: each row is read from memory once,
/// and while it is in L1 gives its column of `dx` (dot products with the rows of `dy`, which
/// stay in L1) and takes its update `-lr Σ_n x[n][i] dy[n]`. A GEMM would first copy all of
/// `W` into its packed layout (the CNN's first dense layer is 6.4 MB) for `dx`, then read
/// and write it again for the step.
#[cfg(not(target_arch = "wasm32"))]
struct SmallStep<'a> {
    x: &'a [f32],
    n: usize,
    w: &'a mut [f32],
    dy: &'a [f32],
    inputs: usize,
    units: usize,
    learning_rate: f32,
    dx: Option<&'a mut [f32]>,
}

#[cfg(not(target_arch = "wasm32"))]
impl Vectorised for SmallStep<'_> {
    #[inline(always)]
    fn run<const FMA: bool, const WIDE: bool>(self) {
        if WIDE {
            // The whole batch in one pass over each row: `dy`'s rows are loaded once, for
            // both `dx` and the update (which needs the old row for `dx` first).
            macro_rules! by_batch {
                ($($g:literal)*) => {
                    match self.n {
                        $($g => return self.whole_batch::<FMA, $g>(),)*
                        _ => {}
                    }
                };
            }
            by_batch!(1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16);
        }
        let Self {
            x,
            n,
            w,
            dy,
            inputs,
            units,
            learning_rate,
            mut dx,
        } = self;
        for (i, row) in w.chunks_exact_mut(units).enumerate() {
            // `dx[:, i] = dy W[i]ᵀ`, from the row as it was.
            if let Some(dx) = dx.as_deref_mut() {
                let mut b = 0;
                while b < n {
                    let take = n - b;
                    if take >= 8 {
                        let d = small_dots::<FMA, 8>(row, dy, b, units);
                        for (g, v) in d.into_iter().enumerate() {
                            dx[(b + g) * inputs + i] = v;
                        }
                        b += 8;
                    } else if take >= 2 {
                        let d = small_dots::<FMA, 2>(row, dy, b, units);
                        for (g, v) in d.into_iter().enumerate() {
                            dx[(b + g) * inputs + i] = v;
                        }
                        b += 2;
                    } else {
                        dx[b * inputs + i] = small_dots::<FMA, 1>(row, dy, b, units)[0];
                        b += 1;
                    }
                }
            }
            // `W[i] -= lr Σ_n x[n][i] dy[n]`.
            let scale = |b: usize| -learning_rate * x[b * inputs + i];
            let mut b = 0;
            while b < n {
                let take = n - b;
                if take >= 8 {
                    small_update::<FMA, 8>(
                        row,
                        dy,
                        std::array::from_fn(|g| scale(b + g)),
                        b,
                        units,
                    );
                    b += 8;
                } else if take >= 2 {
                    small_update::<FMA, 2>(
                        row,
                        dy,
                        std::array::from_fn(|g| scale(b + g)),
                        b,
                        units,
                    );
                    b += 2;
                } else {
                    small_update::<FMA, 1>(row, dy, [scale(b)], b, units);
                    b += 1;
                }
            }
        }
    }
}

#[cfg(not(target_arch = "wasm32"))]
impl SmallStep<'_> {
    /// The step for a batch of `G` (with 32 vector registers): each row of `W` is read and
    /// written once, and each lane of it meets each of `dy`'s rows once, taking that row's
    /// product for `dx` (with the old weights) and its share of the update together. Row
    /// by row in groups (the other path) the rows of `dy` are read twice, once for `dx` and
    /// once for the update, and the loads, not the multiply-adds, set the pace.
    #[inline(always)]
    fn whole_batch<const FMA: bool, const G: usize>(self) {
        let (x, dy, inputs, units) = (self.x, self.dy, self.inputs, self.units);
        let (w, mut dx, learning_rate) = (self.w, self.dx, self.learning_rate);
        let dys: [&[f32]; G] = std::array::from_fn(|g| &dy[g * units..][..units]);
        let full = units / LANE * LANE;
        for (i, row) in w.chunks_exact_mut(units).enumerate() {
            let s: [f32; G] = std::array::from_fn(|g| -learning_rate * x[g * inputs + i]);
            // Nothing to add where every input is zero (inputs after a ReLU often are).
            let update = s.iter().any(|&v| v != 0.0);
            let mut acc = [[0.0f32; LANE]; G];
            for u in (0..full).step_by(LANE) {
                let old = lane_at(row, u);
                let mut new = old;
                for (g, a) in acc.iter_mut().enumerate() {
                    let d = lane_at(dys[g], u);
                    for l in 0..LANE {
                        a[l] = madd::<FMA>(d[l], old[l], a[l]);
                        new[l] = madd::<FMA>(s[g], d[l], new[l]);
                    }
                }
                if update {
                    row[u..u + LANE].copy_from_slice(&new);
                }
            }
            if let Some(dx) = dx.as_deref_mut() {
                for (g, a) in acc.iter().enumerate() {
                    let mut sum = lane_sum(a);
                    for u in full..units {
                        sum = madd::<FMA>(dys[g][u], row[u], sum);
                    }
                    dx[g * inputs + i] = sum;
                }
            }
            if update {
                for u in full..units {
                    for (&sg, d) in s.iter().zip(&dys) {
                        row[u] = madd::<FMA>(sg, d[u], row[u]);
                    }
                }
            }
        }
    }
}

/// The lane of `v` from `u`, as a value.
#[cfg(not(target_arch = "wasm32"))]
#[inline(always)]
fn lane_at(v: &[f32], u: usize) -> [f32; LANE] {
    let mut lane = [0.0f32; LANE];
    lane.copy_from_slice(&v[u..u + LANE]);
    lane
}

/// `row · dy[b0 + g]` for `G` rows of `dy`.
#[cfg(not(target_arch = "wasm32"))]
#[inline(always)]
fn small_dots<const FMA: bool, const G: usize>(
    row: &[f32],
    dy: &[f32],
    b0: usize,
    units: usize,
) -> [f32; G] {
    let dys: [&[f32]; G] = std::array::from_fn(|g| &dy[(b0 + g) * units..][..units]);
    let mut acc = [[0.0f32; LANE]; G];
    let full = units / LANE * LANE;
    for u in (0..full).step_by(LANE) {
        let wv = lane_at(row, u);
        for (a, d) in acc.iter_mut().zip(&dys) {
            let d = lane_at(d, u);
            for l in 0..LANE {
                a[l] = madd::<FMA>(d[l], wv[l], a[l]);
            }
        }
    }
    std::array::from_fn(|g| {
        let mut sum = lane_sum(&acc[g]);
        for u in full..units {
            sum = madd::<FMA>(dys[g][u], row[u], sum);
        }
        sum
    })
}

/// `row += Σ_g s[g] dy[b0 + g]`; nothing to do where every `s` is zero (inputs after a ReLU
/// often are).
#[cfg(not(target_arch = "wasm32"))]
#[inline(always)]
fn small_update<const FMA: bool, const G: usize>(
    row: &mut [f32],
    dy: &[f32],
    s: [f32; G],
    b0: usize,
    units: usize,
) {
    if s.iter().all(|&v| v == 0.0) {
        return;
    }
    let dys: [&[f32]; G] = std::array::from_fn(|g| &dy[(b0 + g) * units..][..units]);
    let full = units / LANE * LANE;
    for u in (0..full).step_by(LANE) {
        let mut acc = lane_at(row, u);
        for (&sg, d) in s.iter().zip(&dys) {
            let d = lane_at(d, u);
            for l in 0..LANE {
                acc[l] = madd::<FMA>(sg, d[l], acc[l]);
            }
        }
        row[u..u + LANE].copy_from_slice(&acc);
    }
    for u in full..units {
        for (&sg, d) in s.iter().zip(&dys) {
            row[u] = madd::<FMA>(sg, d[u], row[u]);
        }
    }
}

/// `db = Σ_rows dy`.
pub fn bias_gradient(dy: &[f32], units: usize, db: &mut [f32]) {
    db.fill(0.0);
    for row in dy.chunks_exact(units) {
        for (acc, v) in db.iter_mut().zip(row) {
            *acc += v;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(len: usize, seed: usize) -> Vec<f32> {
        (0..len)
            .map(|i| (((i * 7919 + seed * 104_729) % 1000) as f32 / 500.0 - 1.0) * 0.7)
            .collect()
    }

    /// The fused step equals the backward pass followed by `W -= lr dW`, over shapes with one
    /// block, several, and a last partial one.
    #[test]
    fn the_fused_step_equals_the_gradient_then_the_step() {
        let lr = 0.05;
        for (n, inputs, units) in [
            (1, 3, 2),
            (10, 37, 33),
            (10, 600, 40),
            (17, 513, 9),
            // Past SMALL_STEP_MIN_WEIGHTS: the row-by-row step, at every group size and
            // with units that end in a partial lane.
            (16, 16_400, 16),
            (3, 520, 512),
            (10, 513, 520),
        ]
        .into_iter()
        // With AVX-512, every batch up to SMALL_BATCH has its own whole-batch step.
        .chain((1..=SMALL_BATCH).map(|n| (n, 513, 520)))
        {
            // Whole columns of zeros, as after a ReLU, for the step to skip.
            let mut x = values(n * inputs, 1);
            for (k, v) in x.iter_mut().enumerate() {
                if (k % inputs) % 4 == 0 {
                    *v = 0.0;
                }
            }
            let w = values(inputs * units, 2);
            let dy = values(n * units, 3);
            let (mut dw, mut db) = (vec![0.0; inputs * units], vec![0.0; units]);
            let mut dx_want = vec![0.0; n * inputs];
            backward(
                &x,
                n,
                &w,
                &dy,
                inputs,
                units,
                &mut dw,
                &mut db,
                Some(&mut dx_want),
            );
            let w_want: Vec<f32> = w.iter().zip(&dw).map(|(p, g)| p - lr * g).collect();
            let mut w_got = w.clone();
            let mut dx_got = vec![f32::NAN; n * inputs];
            backward_sgd(&x, n, &mut w_got, &dy, inputs, units, lr, Some(&mut dx_got));
            for (what, got, want) in [("dx", &dx_got, &dx_want), ("W", &w_got, &w_want)] {
                for (i, (g, e)) in got.iter().zip(want.iter()).enumerate() {
                    assert!(
                        (g - e).abs() <= 1e-5 * (1.0 + e.abs()),
                        "{what}[{i}] of ({n}, {inputs}, {units}): {g} against {e}"
                    );
                }
            }
            let mut w_alone = w.clone();
            backward_sgd(&x, n, &mut w_alone, &dy, inputs, units, lr, None);
            assert_eq!(w_alone, w_got, "the step does not depend on dx");
        }
    }
}
