//! Winograd's minimal filtering for the 5x5, stride-1 convolutions of the FedAvg paper's
//! CNN: `F(2x2, 5x5)` (Lavin and Gray, "Fast Algorithms for Convolutional Neural Networks",
//! CVPR 2016), which computes each 2x2 block of outputs from a 6x6 input tile with 36
//! multiplications per input and output channel where im2col + GEMM spends 100.
//!
//! With `g` a 5x5 filter, `d` a 6x6 input tile and `y` its 2x2 outputs,
//! `y = Aᵀ [(G g Gᵀ) ⊙ (Bᵀ d B)] A`. Summed over input channels, the element-wise products
//! become 36 independent GEMMs, one per tile position `ξ`: `M_ξ = V_ξ U_ξᵀ`, with `V_ξ` the
//! `[tiles, C]` transformed inputs and `U_ξ` the `[F, C]` transformed filters. The backward
//! pass is the adjoint of each step, so its gradients are exact for the forward it mirrors:
//! `dM = A dy Aᵀ`, then `dU_ξ = dM_ξᵀ V_ξ` (and `dg = Gᵀ dU G`) and `dV_ξ = dM_ξ U_ξ` (and
//! `dd = B dV Bᵀ`, added onto the overlapping input tiles).
//!
//! The input is copied channels-last into a zero-padded buffer, so each transform works on 16
//! channels (or filters) of one tile at once, as arrays the compiler vectorises, compiled
//! for the CPU's best vector instructions ([`run_vectorised`]). The matrices come from the
//! Toom-Cook construction at the points 0, 1, -1, 2, -2 and infinity; the tiles' transforms
//! are written out from them as one-dimensional steps with their common terms shared (the
//! filters', once a step, stay dense products). The tests check the matrices against direct
//! correlation, the written-out steps against the matrices, and every output and gradient
//! against im2col. Examples go through in chunks whose transformed tiles stay in a core's
//! L2 cache. The products are [`super::kernels`]' register-blocked GEMM. The browser build
//! leaves this out (size over speed): there every convolution is im2col.

use super::conv::Conv2d;
use super::kernels::{gemm, run_vectorised, Lane, Vectorised, View, L};

/// Tile side of the transformed domain (`m + r - 1`).
const A: usize = 6;
/// Outputs per tile side.
const M: usize = 2;
/// Filter side.
const R: usize = 5;
/// Tile positions in the transformed domain.
const XI: usize = A * A;
/// Tiles per chunk of examples to aim for: enough rows for the GEMMs to run well, few
/// enough that a chunk's transformed inputs and outputs stay in L2.
const CHUNK_TILES: usize = 96;

#[cfg(test)]
/// `Aᵀ` (`M x A`): from the transformed domain to a tile's outputs.
const AT: [[f32; A]; M] = [
    [1.0, 1.0, 1.0, 1.0, 1.0, 0.0],
    [0.0, 1.0, -1.0, 2.0, -2.0, 1.0],
];
/// `G` (`A x R`): from a filter to the transformed domain.
const G: [[f32; R]; A] = [
    [1.0 / 4.0, 0.0, 0.0, 0.0, 0.0],
    [-1.0 / 6.0, -1.0 / 6.0, -1.0 / 6.0, -1.0 / 6.0, -1.0 / 6.0],
    [-1.0 / 6.0, 1.0 / 6.0, -1.0 / 6.0, 1.0 / 6.0, -1.0 / 6.0],
    [1.0 / 24.0, 1.0 / 12.0, 1.0 / 6.0, 1.0 / 3.0, 2.0 / 3.0],
    [1.0 / 24.0, -1.0 / 12.0, 1.0 / 6.0, -1.0 / 3.0, 2.0 / 3.0],
    [0.0, 0.0, 0.0, 0.0, 1.0],
];
#[cfg(test)]
/// `Bᵀ` (`A x A`): from an input tile to the transformed domain.
const BT: [[f32; A]; A] = [
    [4.0, 0.0, -5.0, 0.0, 1.0, 0.0],
    [0.0, -4.0, -4.0, 1.0, 1.0, 0.0],
    [0.0, 4.0, -4.0, -1.0, 1.0, 0.0],
    [0.0, -2.0, -1.0, 2.0, 1.0, 0.0],
    [0.0, 2.0, -1.0, -2.0, 1.0, 0.0],
    [0.0, 4.0, 0.0, -5.0, 0.0, 1.0],
];

const fn transpose<const ROWS: usize, const COLS: usize>(
    m: [[f32; COLS]; ROWS],
) -> [[f32; ROWS]; COLS] {
    let mut t = [[0.0; ROWS]; COLS];
    let mut i = 0;
    while i < ROWS {
        let mut j = 0;
        while j < COLS {
            t[j][i] = m[i][j];
            j += 1;
        }
        i += 1;
    }
    t
}

#[cfg(test)]
/// `A` (`A x M`), the adjoint of the output transform.
const A_MAT: [[f32; M]; A] = transpose(AT);
/// `Gᵀ` (`R x A`), the adjoint of the filter transform.
const GT: [[f32; A]; R] = transpose(G);
#[cfg(test)]
/// `B` (`A x A`), the adjoint of the input transform.
const B_MAT: [[f32; A]; A] = transpose(BT);

/// `mat x matᵀ` for `L` matrices `x` at once: `mat` is `ROWS x K`, `x` is `K x K`.
#[inline(always)]
fn sandwich<const ROWS: usize, const K: usize>(
    mat: &[[f32; K]; ROWS],
    x: &[[Lane; K]; K],
) -> [[Lane; ROWS]; ROWS] {
    let mut tmp = [[[0.0f32; L]; K]; ROWS];
    for (t, row) in tmp.iter_mut().zip(mat) {
        for (&c, xk) in row.iter().zip(x) {
            if c != 0.0 {
                for (acc, v) in t.iter_mut().zip(xk) {
                    for l in 0..L {
                        acc[l] += c * v[l];
                    }
                }
            }
        }
    }
    let mut out = [[[0.0f32; L]; ROWS]; ROWS];
    for (o, t) in out.iter_mut().zip(&tmp) {
        for (acc, row) in o.iter_mut().zip(mat) {
            for (&c, v) in row.iter().zip(t) {
                if c != 0.0 {
                    for l in 0..L {
                        acc[l] += c * v[l];
                    }
                }
            }
        }
    }
    out
}

/// `f x fᵀ` for `L` matrices `x` at once, `f` a one-dimensional transform (`K` values to
/// `R`): `f` on every column, then on every row.
#[inline(always)]
fn sandwich_by<const K: usize, const R: usize>(
    x: &[[Lane; K]; K],
    f: impl Fn(&[Lane; K]) -> [Lane; R],
) -> [[Lane; R]; R] {
    let mut tmp = [[[0.0f32; L]; K]; R];
    for j in 0..K {
        let mut col = [[0.0f32; L]; K];
        for (c, row) in col.iter_mut().zip(x) {
            *c = row[j];
        }
        for (t, v) in tmp.iter_mut().zip(f(&col)) {
            t[j] = v;
        }
    }
    let mut out = [[[0.0f32; L]; R]; R];
    for (o, t) in out.iter_mut().zip(&tmp) {
        *o = f(t);
    }
    out
}

// The one-dimensional transforms of the tiles, written out from the matrices above with
// their common terms shared (about a third of the operations of the dense products); the
// tests check each against its matrix.

/// `Bᵀ x`.
#[inline(always)]
fn bt_1d(x: &[Lane; A]) -> [Lane; A] {
    let mut y = [[0.0f32; L]; A];
    for l in 0..L {
        let [x0, x1, x2, x3, x4, x5] = [x[0][l], x[1][l], x[2][l], x[3][l], x[4][l], x[5][l]];
        let (a, b) = (x4 - 4.0 * x2, x3 - 4.0 * x1);
        let (c, d) = (x4 - x2, 2.0 * (x3 - x1));
        y[0][l] = 4.0 * x0 - 5.0 * x2 + x4;
        y[1][l] = a + b;
        y[2][l] = a - b;
        y[3][l] = c + d;
        y[4][l] = c - d;
        y[5][l] = 4.0 * x1 - 5.0 * x3 + x5;
    }
    y
}

/// `B x`, the adjoint of [`bt_1d`].
#[inline(always)]
fn b_1d(x: &[Lane; A]) -> [Lane; A] {
    let mut y = [[0.0f32; L]; A];
    for l in 0..L {
        let [x0, x1, x2, x3, x4, x5] = [x[0][l], x[1][l], x[2][l], x[3][l], x[4][l], x[5][l]];
        let (u, v) = (x1 - x2, x3 - x4);
        let (s, t) = (x1 + x2, x3 + x4);
        y[0][l] = 4.0 * x0;
        y[1][l] = 4.0 * x5 - 4.0 * u - 2.0 * v;
        y[2][l] = -5.0 * x0 - 4.0 * s - t;
        y[3][l] = u + 2.0 * v - 5.0 * x5;
        y[4][l] = x0 + s + t;
        y[5][l] = x5;
    }
    y
}

/// `Aᵀ x`.
#[inline(always)]
fn at_1d(x: &[Lane; A]) -> [Lane; M] {
    let mut y = [[0.0f32; L]; M];
    for l in 0..L {
        let [x0, x1, x2, x3, x4, x5] = [x[0][l], x[1][l], x[2][l], x[3][l], x[4][l], x[5][l]];
        y[0][l] = x0 + (x1 + x2) + (x3 + x4);
        y[1][l] = (x1 - x2) + 2.0 * (x3 - x4) + x5;
    }
    y
}

/// `A x`, the adjoint of [`at_1d`].
#[inline(always)]
fn a_1d(x: &[Lane; M]) -> [Lane; A] {
    let mut y = [[0.0f32; L]; A];
    for l in 0..L {
        let [g0, g1] = [x[0][l], x[1][l]];
        y[0][l] = g0;
        y[1][l] = g0 + g1;
        y[2][l] = g0 - g1;
        y[3][l] = g0 + 2.0 * g1;
        y[4][l] = g0 - 2.0 * g1;
        y[5][l] = g1;
    }
    y
}

/// Whether the layer is one this module computes: a 5x5 kernel at stride 1 over enough
/// input channels for the transformed GEMMs to pay (the CNN's first layer, over one
/// channel, stays on im2col).
pub fn applies(conv: &Conv2d) -> bool {
    conv.kernel == R && conv.stride == 1 && conv.channels >= 8
}

/// The shapes of the work. Channels and filters are padded to whole lane groups (`cp`, `fp`)
/// with zeros, so every transform works on full groups; the CNN's 32 and 64 need none.
struct Plan {
    c: usize,
    f: usize,
    cp: usize,
    fp: usize,
    tw: usize,
    /// Tiles per example.
    per_example: usize,
    /// Padded input height and width (every tile inside).
    hp: usize,
    wp: usize,
    /// Examples per chunk.
    chunk: usize,
}

impl Plan {
    fn new(conv: &Conv2d, n: usize) -> Self {
        let th = conv.out_height.div_ceil(M);
        let tw = conv.out_width.div_ceil(M);
        let per_example = th * tw;
        Self {
            c: conv.channels,
            f: conv.filters,
            cp: conv.channels.div_ceil(L) * L,
            fp: conv.filters.div_ceil(L) * L,
            tw,
            per_example,
            hp: (th - 1) * M + A,
            wp: (tw - 1) * M + A,
            chunk: CHUNK_TILES.div_ceil(per_example).clamp(1, n.max(1)),
        }
    }

    /// Values of one padded input example, `[hp, wp, cp]` (channels last).
    fn padded_len(&self) -> usize {
        self.hp * self.wp * self.cp
    }

    /// Tiles in a chunk.
    fn tiles(&self) -> usize {
        self.chunk * self.per_example
    }

    /// The example of tile `t` of a chunk and the output row and column of its corner.
    fn tile(&self, t: usize) -> (usize, usize, usize) {
        let (e, rest) = (t / self.per_example, t % self.per_example);
        (e, rest / self.tw * M, rest % self.tw * M)
    }

    /// Where tile `t` of a chunk starts in the padded input.
    fn tile_origin(&self, t: usize) -> usize {
        let (e, y, x) = self.tile(t);
        e * self.padded_len() + (y * self.wp + x) * self.cp
    }

    /// The rows and columns of the input that some kept output reads, and so are copied
    /// into the padded buffer.
    fn copied(&self, conv: &Conv2d) -> (usize, usize) {
        (
            (conv.height + conv.pad_top).min(self.hp) - conv.pad_top,
            (conv.width + conv.pad_left).min(self.wp) - conv.pad_left,
        )
    }
}

/// Copies examples of `x` (NCHW) into the zero-padded, channels-last buffer `xp`.
#[inline(always)]
fn pad_input(conv: &Conv2d, plan: &Plan, x: &[f32], xp: &mut [f32]) {
    let (h, w) = (conv.height, conv.width);
    let (rows, cols) = plan.copied(conv);
    let line = plan.wp * plan.cp;
    for (src, dst) in x
        .chunks_exact(plan.c * h * w)
        .zip(xp.chunks_exact_mut(plan.padded_len()))
    {
        // Zeros where no input is copied: everything when channels are padded, else the
        // border (the buffer is reused, so its inside holds the last chunk's input).
        if plan.cp != plan.c {
            dst.fill(0.0);
        } else {
            dst[..conv.pad_top * line].fill(0.0);
            dst[(conv.pad_top + rows) * line..].fill(0.0);
            for r in 0..rows {
                let l = &mut dst[(conv.pad_top + r) * line..][..line];
                l[..conv.pad_left * plan.cp].fill(0.0);
                l[(conv.pad_left + cols) * plan.cp..].fill(0.0);
            }
        }
        for (c, plane) in src.chunks_exact(h * w).enumerate() {
            for r in 0..rows {
                let d = ((r + conv.pad_top) * plan.wp + conv.pad_left) * plan.cp + c;
                for (k, &v) in plane[r * w..r * w + cols].iter().enumerate() {
                    dst[d + k * plan.cp] = v;
                }
            }
        }
    }
}

/// `V[ξ][t][c] = (Bᵀ d B)[ξ]` for the chunk's `tiles` tiles and every channel.
#[inline(always)]
fn transform_input<const FMA: bool>(plan: &Plan, xp: &[f32], tiles: usize, v: &mut [f32]) {
    let cp = plan.cp;
    // Every tile overwrites all of `d`: zeroed once here, not per tile (a `memset` call).
    let mut d = [[[0.0f32; L]; A]; A];
    for t in 0..tiles {
        let o = plan.tile_origin(t);
        for c0 in (0..cp).step_by(L) {
            for (i, row) in d.iter_mut().enumerate() {
                for (j, lane) in row.iter_mut().enumerate() {
                    lane.copy_from_slice(&xp[o + (i * plan.wp + j) * cp + c0..][..L]);
                }
            }
            let out = sandwich_by(&d, bt_1d);
            for (xi, lane) in out.iter().flatten().enumerate() {
                v[(xi * tiles + t) * cp + c0..][..L].copy_from_slice(lane);
            }
        }
    }
}

/// `U[ξ][f][c] = (G g Gᵀ)[ξ]` for every filter `g = w[f][c]` (zero for padding), or with
/// `CHANNEL_MAJOR` `Uᵀ[ξ][c][f]`, as the forward product reads it. Lanes run along the last
/// index: 16 channels of a filter, or 16 filters of a channel.
#[inline(always)]
fn transform_filters<const CHANNEL_MAJOR: bool>(plan: &Plan, w: &[f32], u: &mut [f32]) {
    let (c, f) = (plan.c, plan.f);
    let (outer, lanes) = if CHANNEL_MAJOR {
        (plan.cp, plan.fp)
    } else {
        (plan.fp, plan.cp)
    };
    for o in 0..outer {
        for l0 in (0..lanes).step_by(L) {
            let mut g = [[[0.0f32; L]; R]; R];
            for l in 0..L {
                let (fi, ci) = if CHANNEL_MAJOR {
                    (l0 + l, o)
                } else {
                    (o, l0 + l)
                };
                if fi < f && ci < c {
                    let src = &w[(fi * c + ci) * R * R..][..R * R];
                    for (i, row) in g.iter_mut().enumerate() {
                        for (j, gij) in row.iter_mut().enumerate() {
                            gij[l] = src[i * R + j];
                        }
                    }
                }
            }
            let out = sandwich::<A, R>(&G, &g);
            for (xi, lane) in out.iter().flatten().enumerate() {
                u[(xi * outer + o) * lanes + l0..][..L].copy_from_slice(lane);
            }
        }
    }
}

struct Forward<'a> {
    conv: &'a Conv2d,
    x: &'a [f32],
    n: usize,
    w: &'a [f32],
    b: &'a [f32],
    y: &'a mut [f32],
    scratch: &'a mut Vec<f32>,
}

impl Vectorised for Forward<'_> {
    #[inline(always)]
    fn run<const FMA: bool, const WIDE: bool>(self) {
        let Self {
            conv,
            x,
            n,
            w,
            b,
            y,
            scratch,
        } = self;
        let plan = Plan::new(conv, n);
        let (cp, fp, tiles_max) = (plan.cp, plan.fp, plan.tiles());
        let xp_len = plan.chunk * plan.padded_len();
        let len = xp_len + XI * tiles_max * (cp + fp) + XI * fp * cp;
        let (xp, rest) = super::scratch(scratch, len).split_at_mut(xp_len);
        let (v, rest) = rest.split_at_mut(XI * tiles_max * cp);
        let (m, ut) = rest.split_at_mut(XI * tiles_max * fp);
        transform_filters::<true>(&plan, w, ut);
        let (il, ol) = (conv.input_len(), conv.output_len());
        let (oh, ow) = (conv.out_height, conv.out_width);
        // Every tile overwrites all of `mt`: zeroed once here, not per tile (a `memset` call).
        let mut mt = [[[0.0f32; L]; A]; A];
        for (xc, yc) in x.chunks(plan.chunk * il).zip(y.chunks_mut(plan.chunk * ol)) {
            let examples = xc.len() / il;
            let tiles = examples * plan.per_example;
            let xp = &mut xp[..examples * plan.padded_len()];
            pad_input(conv, &plan, xc, xp);
            transform_input::<FMA>(&plan, xp, tiles, v);
            for xi in 0..XI {
                let a = View {
                    data: &v[xi * tiles * cp..][..tiles * cp],
                    rs: cp,
                    cs: 1,
                };
                let (b, c) = (
                    &ut[xi * fp * cp..][..fp * cp],
                    &mut m[xi * tiles * fp..][..tiles * fp],
                );
                if WIDE {
                    gemm::<FMA, 6, 4>(a, tiles, cp, b, fp, c, false);
                } else {
                    gemm::<FMA, 4, 1>(a, tiles, cp, b, fp, c, false);
                }
            }
            // `y = Aᵀ M A + b`, written where the tile lies inside the output.
            for t in 0..tiles {
                let (e, ty, tx) = plan.tile(t);
                for f0 in (0..plan.f).step_by(L) {
                    for (xi, lane) in mt.iter_mut().flatten().enumerate() {
                        lane.copy_from_slice(&m[(xi * tiles + t) * fp + f0..][..L]);
                    }
                    let out = sandwich_by(&mt, at_1d);
                    for l in 0..L.min(plan.f - f0) {
                        let plane = &mut yc[e * ol + (f0 + l) * oh * ow..][..oh * ow];
                        for (i, row) in out.iter().enumerate().take(oh - ty) {
                            for (j, v) in row.iter().enumerate().take(ow - tx) {
                                plane[(ty + i) * ow + tx + j] = v[l] + b[f0 + l];
                            }
                        }
                    }
                }
            }
        }
    }
}

/// The forward pass over `n` examples (see [`Conv2d::forward`]); `scratch` is reused.
pub fn forward(
    conv: &Conv2d,
    x: &[f32],
    n: usize,
    w: &[f32],
    b: &[f32],
    y: &mut [f32],
    scratch: &mut Vec<f32>,
) {
    run_vectorised(Forward {
        conv,
        x,
        n,
        w,
        b,
        y,
        scratch,
    });
}

struct Backward<'a> {
    conv: &'a Conv2d,
    x: &'a [f32],
    n: usize,
    w: &'a [f32],
    dy: &'a [f32],
    dw: &'a mut [f32],
    db: &'a mut [f32],
    dx: Option<&'a mut [f32]>,
    scratch: &'a mut Vec<f32>,
    scratch2: &'a mut Vec<f32>,
}

impl Vectorised for Backward<'_> {
    #[inline(always)]
    fn run<const FMA: bool, const WIDE: bool>(self) {
        let Self {
            conv,
            x,
            n,
            w,
            dy,
            dw,
            db,
            mut dx,
            scratch,
            scratch2,
        } = self;
        let plan = Plan::new(conv, n);
        let (c, f, cp, fp, tiles_max) = (plan.c, plan.f, plan.cp, plan.fp, plan.tiles());
        let (il, ol) = (conv.input_len(), conv.output_len());
        let (oh, ow) = (conv.out_height, conv.out_width);
        conv.bias_gradient(dy, db);
        let xp_len = plan.chunk * plan.padded_len();
        let len = xp_len + XI * tiles_max * (cp + fp);
        let (xp, rest) = super::scratch(scratch, len).split_at_mut(xp_len);
        let (v, dm) = rest.split_at_mut(XI * tiles_max * cp);
        let want_dx = dx.is_some();
        let dx_len = if want_dx {
            XI * tiles_max * cp + xp_len
        } else {
            0
        };
        let (u, rest) =
            super::scratch(scratch2, 2 * XI * fp * cp + dx_len).split_at_mut(XI * fp * cp);
        let (du, rest) = rest.split_at_mut(XI * fp * cp);
        let (dv, dxp) = rest.split_at_mut(dx_len - if want_dx { xp_len } else { 0 });
        if want_dx {
            transform_filters::<false>(&plan, w, u);
        }
        for (k, (xc, dyc)) in x
            .chunks(plan.chunk * il)
            .zip(dy.chunks(plan.chunk * ol))
            .enumerate()
        {
            let examples = xc.len() / il;
            let tiles = examples * plan.per_example;
            let xp = &mut xp[..examples * plan.padded_len()];
            pad_input(conv, &plan, xc, xp);
            transform_input::<FMA>(&plan, xp, tiles, v);
            // `dM = A dy Aᵀ`, zero for padding filters and outputs past the edge.
            for t in 0..tiles {
                let (e, ty, tx) = plan.tile(t);
                for f0 in (0..fp).step_by(L) {
                    let mut g = [[[0.0f32; L]; M]; M];
                    for l in 0..L.min(f.saturating_sub(f0)) {
                        let plane = &dyc[e * ol + (f0 + l) * oh * ow..][..oh * ow];
                        for (i, row) in g.iter_mut().enumerate().take(oh - ty) {
                            for (j, gij) in row.iter_mut().enumerate().take(ow - tx) {
                                gij[l] = plane[(ty + i) * ow + tx + j];
                            }
                        }
                    }
                    let out = sandwich_by(&g, a_1d);
                    for (xi, lane) in out.iter().flatten().enumerate() {
                        dm[(xi * tiles + t) * fp + f0..][..L].copy_from_slice(lane);
                    }
                }
            }
            for xi in 0..XI {
                let dm_xi = &dm[xi * tiles * fp..][..tiles * fp];
                let v_xi = &v[xi * tiles * cp..][..tiles * cp];
                let du_xi = &mut du[xi * fp * cp..][..fp * cp];
                let dm_t = View {
                    data: dm_xi,
                    rs: 1,
                    cs: fp,
                };
                if WIDE {
                    gemm::<FMA, 8, 2>(dm_t, fp, tiles, v_xi, cp, du_xi, k > 0);
                } else {
                    gemm::<FMA, 4, 1>(dm_t, fp, tiles, v_xi, cp, du_xi, k > 0);
                }
                if want_dx {
                    let a = View {
                        data: dm_xi,
                        rs: fp,
                        cs: 1,
                    };
                    let (u_xi, dv_xi) = (
                        &u[xi * fp * cp..][..fp * cp],
                        &mut dv[xi * tiles * cp..][..tiles * cp],
                    );
                    if WIDE {
                        gemm::<FMA, 12, 2>(a, tiles, fp, u_xi, cp, dv_xi, false);
                    } else {
                        gemm::<FMA, 4, 1>(a, tiles, fp, u_xi, cp, dv_xi, false);
                    }
                }
            }
            if let Some(dx) = dx.as_deref_mut() {
                // `dd = B dV Bᵀ`, added onto the overlapping tiles of the padded input.
                let dxp = &mut dxp[..examples * plan.padded_len()];
                dxp.fill(0.0);
                // Every tile overwrites all of `dvt`: zeroed once here, not per tile.
                let mut dvt = [[[0.0f32; L]; A]; A];
                for t in 0..tiles {
                    let o = plan.tile_origin(t);
                    for c0 in (0..cp).step_by(L) {
                        for (xi, lane) in dvt.iter_mut().flatten().enumerate() {
                            lane.copy_from_slice(&dv[(xi * tiles + t) * cp + c0..][..L]);
                        }
                        let dd = sandwich_by(&dvt, b_1d);
                        for (i, row) in dd.iter().enumerate() {
                            for (j, lane) in row.iter().enumerate() {
                                let dst = &mut dxp[o + (i * plan.wp + j) * cp + c0..][..L];
                                for (d, v) in dst.iter_mut().zip(lane) {
                                    *d += v;
                                }
                            }
                        }
                    }
                }
                let (h, wd) = (conv.height, conv.width);
                let (rows, cols) = plan.copied(conv);
                let first = k * plan.chunk * il;
                let dxc = &mut dx[first..first + examples * il];
                for (dst, src) in dxc
                    .chunks_exact_mut(il)
                    .zip(dxp.chunks_exact(plan.padded_len()))
                {
                    // Input positions no kept output reads get no gradient.
                    if rows < h || cols < wd {
                        dst.fill(0.0);
                    }
                    for (ci, plane) in dst.chunks_exact_mut(h * wd).enumerate() {
                        for r in 0..rows {
                            let s = ((r + conv.pad_top) * plan.wp + conv.pad_left) * cp + ci;
                            for (k, d) in plane[r * wd..r * wd + cols].iter_mut().enumerate() {
                                *d = src[s + k * cp];
                            }
                        }
                    }
                }
            }
        }
        if n == 0 {
            dw.fill(0.0);
            return;
        }
        // `dg = Gᵀ dU G`, for 16 channels of a filter at once. Each overwrites all of `dut`.
        let mut dut = [[[0.0f32; L]; A]; A];
        for fi in 0..f {
            for c0 in (0..c).step_by(L) {
                for (xi, lane) in dut.iter_mut().flatten().enumerate() {
                    lane.copy_from_slice(&du[(xi * fp + fi) * cp + c0..][..L]);
                }
                let dg = sandwich::<R, A>(&GT, &dut);
                for l in 0..L.min(c - c0) {
                    let dst = &mut dw[(fi * c + c0 + l) * R * R..][..R * R];
                    for (i, row) in dg.iter().enumerate() {
                        for (j, v) in row.iter().enumerate() {
                            dst[i * R + j] = v[l];
                        }
                    }
                }
            }
        }
    }
}

/// The backward pass over `n` examples (see [`Conv2d::backward`]): writes `dw` and `db`, and
/// `dx` when asked. `scratch` and `scratch2` are reused.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    conv: &Conv2d,
    x: &[f32],
    n: usize,
    w: &[f32],
    dy: &[f32],
    dw: &mut [f32],
    db: &mut [f32],
    dx: Option<&mut [f32]>,
    scratch: &mut Vec<f32>,
    scratch2: &mut Vec<f32>,
) {
    run_vectorised(Backward {
        conv,
        x,
        n,
        w,
        dy,
        dw,
        db,
        dx,
        scratch,
        scratch2,
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trainer::spec::Padding;

    /// One dimension of the algorithm: `Aᵀ [(G g) ⊙ (Bᵀ d)]` is the correlation of `d` with
    /// `g`, for filters and inputs with every entry different.
    #[test]
    fn the_matrices_compute_a_correlation() {
        let g: Vec<f64> = (0..R)
            .map(|k| 0.3 + 0.7 * k as f64 - 0.05 * (k * k) as f64)
            .collect();
        let d: Vec<f64> = (0..A)
            .map(|j| 1.1 - 0.4 * j as f64 + 0.03 * (j * j) as f64)
            .collect();
        let gg: Vec<f64> = (0..A)
            .map(|a| (0..R).map(|k| f64::from(G[a][k]) * g[k]).sum())
            .collect();
        let bd: Vec<f64> = (0..A)
            .map(|a| (0..A).map(|j| f64::from(BT[a][j]) * d[j]).sum())
            .collect();
        for (i, at) in AT.iter().enumerate() {
            let y: f64 = (0..A).map(|a| f64::from(at[a]) * gg[a] * bd[a]).sum();
            let direct: f64 = (0..R).map(|k| g[k] * d[i + k]).sum();
            assert!(
                (y - direct).abs() < 1e-5 * direct.abs().max(1.0),
                "{y} vs {direct}"
            );
        }
    }

    /// Each written-out transform equals its matrix's product.
    #[test]
    fn the_written_out_transforms_equal_their_matrices() {
        fn dense<const R: usize, const K: usize>(mat: &[[f32; K]; R], x: &[Lane; K]) -> [Lane; R] {
            std::array::from_fn(|r| {
                std::array::from_fn(|l| (0..K).map(|k| mat[r][k] * x[k][l]).sum())
            })
        }
        fn check<const R: usize, const K: usize>(
            what: &str,
            mat: &[[f32; K]; R],
            f: fn(&[Lane; K]) -> [Lane; R],
        ) {
            let v = random(K * L, K as u64 * 31 + R as u64);
            let x: [Lane; K] = std::array::from_fn(|k| std::array::from_fn(|l| v[k * L + l]));
            let (got, want) = (f(&x), dense(mat, &x));
            for (g, w) in got.iter().flatten().zip(want.iter().flatten()) {
                assert!(
                    (g - w).abs() <= 1e-5 * (1.0 + w.abs()),
                    "{what}: {g} vs {w}"
                );
            }
        }
        check("Bᵀ", &BT, bt_1d);
        check("B", &B_MAT, b_1d);
        check("Aᵀ", &AT, at_1d);
        check("A", &A_MAT, a_1d);
    }

    fn random(len: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect()
    }

    fn close(a: &[f32], b: &[f32], what: &str) {
        assert_eq!(a.len(), b.len(), "{what} length");
        let scale = b.iter().fold(1.0f32, |m, v| m.max(v.abs()));
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!(
                (x - y).abs() <= 4e-5 * scale,
                "{what}[{i}]: {x} vs {y} (scale {scale})"
            );
        }
    }

    /// Forward outputs and every gradient equal im2col's, at odd and even sizes, both
    /// paddings, chunks that split the batch and lane groups cut short.
    #[test]
    fn winograd_equals_im2col() {
        for (i, &(c, h, w, f, padding, n)) in [
            (8, 14, 14, 64, Padding::Same, 10),
            (8, 7, 9, 5, Padding::Same, 3),
            (9, 11, 8, 3, Padding::Valid, 2),
            (8, 5, 6, 17, Padding::Valid, 1),
            (12, 3, 2, 4, Padding::Same, 4),
            // Channels in whole lanes: only the padded input's border is zeroed.
            (16, 9, 10, 5, Padding::Same, 3),
            (32, 8, 7, 6, Padding::Valid, 2),
        ]
        .iter()
        .enumerate()
        {
            let conv = Conv2d::new([c, h, w], f, R, 1, padding).expect("geometry");
            assert!(applies(&conv));
            let seed = i as u64 * 10;
            let x = random(n * conv.input_len(), seed + 1);
            let wt = random(f * c * R * R, seed + 2);
            let b = random(f, seed + 3);
            let dy = random(n * conv.output_len(), seed + 4);
            // Scratch holding garbage (as a shared buffer does after another layer): nothing
            // may read what it did not write.
            let (mut s1, mut s2) = (vec![f32::NAN; 1 << 20], vec![f32::NAN; 1 << 20]);
            let mut y = vec![0.0; n * conv.output_len()];
            let mut y_ref = y.clone();
            forward(&conv, &x, n, &wt, &b, &mut y, &mut s1);
            conv.forward_im2col(&x, n, &wt, &b, &mut y_ref, &mut s2);
            close(&y, &y_ref, "y");
            let (mut dw, mut db, mut dx) = (vec![9.0; wt.len()], vec![9.0; f], vec![9.0; x.len()]);
            let (mut dw_ref, mut db_ref, mut dx_ref) = (dw.clone(), db.clone(), dx.clone());
            backward(
                &conv,
                &x,
                n,
                &wt,
                &dy,
                &mut dw,
                &mut db,
                Some(&mut dx),
                &mut s1,
                &mut s2,
            );
            let (mut c1, mut c2) = (vec![f32::NAN; 1 << 20], vec![f32::NAN; 1 << 20]);
            conv.backward_im2col(
                &x,
                n,
                &wt,
                &dy,
                &mut dw_ref,
                &mut db_ref,
                Some(&mut dx_ref),
                &mut c1,
                &mut c2,
            );
            close(&dw, &dw_ref, "dw");
            close(&db, &db_ref, "db");
            close(&dx, &dx_ref, "dx");
            let mut dw2 = vec![9.0; wt.len()];
            backward(
                &conv, &x, n, &wt, &dy, &mut dw2, &mut db, None, &mut s1, &mut s2,
            );
            assert_eq!(
                dw2, dw,
                "the weight gradient does not depend on dx being asked"
            );
            // The register blocks of AVX2 and of the baseline sum in the same order as
            // AVX-512's, so with fused multiply-adds they give the same numbers; without
            // them (the baseline), numbers within rounding.
            let (mut dw_fma, mut dx_fma) = (vec![0.0; dw.len()], vec![0.0; dx.len()]);
            let (mut dw_wide, mut dx_wide) = (vec![0.0; dw.len()], vec![0.0; dx.len()]);
            let (mut dw_base, mut dx_base) = (vec![0.0; dw.len()], vec![0.0; dx.len()]);
            let mut s3 = Vec::new();
            let (mut y_fma, mut y_wide, mut y_base) =
                (vec![0.0; y.len()], vec![0.0; y.len()], vec![0.0; y.len()]);
            for (fma, wide, y_out, dw_out, dx_out) in [
                (true, false, &mut y_fma, &mut dw_fma, &mut dx_fma),
                (true, true, &mut y_wide, &mut dw_wide, &mut dx_wide),
                (false, false, &mut y_base, &mut dw_base, &mut dx_base),
            ] {
                let fw = Forward {
                    conv: &conv,
                    x: &x,
                    n,
                    w: &wt,
                    b: &b,
                    y: y_out,
                    scratch: &mut s3,
                };
                let bw = Backward {
                    conv: &conv,
                    x: &x,
                    n,
                    w: &wt,
                    dy: &dy,
                    dw: dw_out,
                    db: &mut db,
                    dx: Some(dx_out),
                    scratch: &mut s1,
                    scratch2: &mut s2,
                };
                match (fma, wide) {
                    (true, false) => {
                        fw.run::<true, false>();
                        bw.run::<true, false>();
                    }
                    (true, true) => {
                        fw.run::<true, true>();
                        bw.run::<true, true>();
                    }
                    _ => {
                        fw.run::<false, false>();
                        bw.run::<false, false>();
                    }
                }
            }
            assert_eq!(y_fma, y_wide, "forward, narrow and wide blocks");
            assert_eq!(dw_fma, dw_wide, "weight gradient, narrow and wide blocks");
            assert_eq!(dx_fma, dx_wide, "input gradient, narrow and wide blocks");
            close(&y_base, &y, "baseline y");
            close(&dw_base, &dw, "baseline dw");
            close(&dx_base, &dx, "baseline dx");
        }
    }
}
