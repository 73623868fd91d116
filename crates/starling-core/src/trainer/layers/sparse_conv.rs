//! The backward pass of a stride-1 convolution from the entries of its output gradient `dy`
//! that are not zero. Under a 2x2 max-pool at most one output in four has a gradient (the one
//! its window took), and under a ReLU only those that were positive: in the FedAvg CNN's
//! second convolution 10-25% of `dy` is not zero. Over those entries `(f, p, v)` only,
//!
//! - `dW[f][tap] += v x[p + tap]` (all channels of the input pixel at once), and
//! - `dx[q] = Σ_tap Σ_(f, v) at q - tap  v W[f][tap]` (gathered per input pixel, so each is
//!   written once),
//!
//! cost (nonzeros x taps x channels) multiply-adds each, where the dense pass (Winograd's, or
//! im2col's) costs the same for every output. The input is copied channels-last with its
//! zero padding, and the weight transposed to `[F, k, k, C]`, so that every product is a
//! run of whole lanes of channels. [`Conv2d::backward`] runs it where `dy` is at most
//! `MAX_DENSITY` (30%) nonzero, and its dense pass otherwise. The browser build leaves this
//! out (size).

use std::cell::RefCell;

use super::conv::Conv2d;
use super::kernels::{madd, run_vectorised, Lane, Vectorised, L};

/// The largest share of nonzero entries in `dy` for which [`backward`] runs: the cost of the
/// sparse pass grows with the nonzeros, the dense pass's does not. For the CNN's second
/// convolution, per batch of 10 on an AMD EPYC (Zen 3), `cargo bench -p starling-core --bench
/// conv_backward`: 1.9 ms at 5%, 2.4 ms at 15%, 3.4 ms at 25%, 3.8 ms at 30%, against
/// Winograd's 5.0-5.1 ms at 35% and 50% (a scratch timing in the same session: 1.1, 2.1 and
/// 3.9 ms against 4.4). The limit leaves the sparse pass a margin on wider vectors.
pub(crate) const MAX_DENSITY: f32 = 0.3;

thread_local! {
    /// The nonzero entries of `dy`, reused across steps: per example, by filter (input
    /// offsets) and by output position (filters), with their values.
    static ENTRIES: RefCell<Entries> = RefCell::new(Entries::default());
}

#[derive(Default)]
struct Entries {
    /// By filter: `(offset of the output position in the padded input, value)`; only the
    /// first `filter_start[F]` hold entries.
    by_filter: Vec<(u32, f32)>,
    /// The output position of each entry of `by_filter`.
    pos: Vec<u32>,
    /// Where each filter's entries start in `by_filter` (`F + 1` bounds).
    filter_start: Vec<u32>,
    /// By output position: `(filter, value)`.
    by_position: Vec<(u32, f32)>,
    /// Where each position's entries start in `by_position` (`OH OW + 1` bounds).
    position_start: Vec<u32>,
    /// The counting sort's next free slot per position.
    next: Vec<u32>,
}

/// Whether the sparse pass can run this convolution: stride 1, and enough input channels
/// that whole lanes of them are not mostly padding.
pub(crate) fn applies(conv: &Conv2d) -> bool {
    conv.stride == 1 && conv.channels >= L / 2
}

/// The share of `dy`'s entries that are not zero.
pub(crate) fn density(dy: &[f32]) -> f32 {
    let nonzero = dy.iter().filter(|v| **v != 0.0).count();
    nonzero as f32 / dy.len().max(1) as f32
}

/// The backward pass over `n` examples from `dy`'s nonzero entries: writes `dw` (`[F, C, k,
/// k]`) and `db`, and `dx` when asked, as [`Conv2d::backward`] does. `scratch` holds the
/// padded input, the transposed weight and the weight gradient.
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward(
    conv: &Conv2d,
    x: &[f32],
    n: usize,
    w: &[f32],
    dy: &[f32],
    dw: &mut [f32],
    db: &mut [f32],
    dx: Option<&mut [f32]>,
    scratch: &mut Vec<f32>,
) {
    assert!(applies(conv), "the sparse backward pass needs stride 1");
    assert_eq!(x.len(), n * conv.input_len(), "conv2d input length");
    assert_eq!(dy.len(), n * conv.output_len(), "conv2d gradient length");
    assert_eq!(w.len(), dw.len(), "conv2d weight gradient length");
    conv.bias_gradient(dy, db);
    ENTRIES.with(|cell| {
        let mut entries = cell.borrow_mut();
        run_vectorised(Backward {
            conv,
            x,
            n,
            w,
            dy,
            dw,
            dx,
            scratch,
            entries: &mut entries,
        });
    });
}

/// The shapes: channels padded to whole lanes (`cp`), the padded input (`hp x wp`).
struct Shape {
    c: usize,
    cp: usize,
    f: usize,
    k: usize,
    hp: usize,
    wp: usize,
}

impl Shape {
    fn new(conv: &Conv2d) -> Self {
        let cp = conv.channels.div_ceil(L) * L;
        Self {
            c: conv.channels,
            cp,
            f: conv.filters,
            k: conv.kernel,
            // Every tap of every output inside (stride 1).
            hp: conv.out_height + conv.kernel - 1,
            wp: conv.out_width + conv.kernel - 1,
        }
    }

    /// Floats of one padded, channels-last input.
    fn padded_len(&self) -> usize {
        self.hp * self.wp * self.cp
    }

    /// Floats of the transposed weight (and of its gradient): `[F, k, k, cp]`.
    fn weight_len(&self) -> usize {
        self.f * self.k * self.k * self.cp
    }
}

struct Backward<'a> {
    conv: &'a Conv2d,
    x: &'a [f32],
    n: usize,
    w: &'a [f32],
    dy: &'a [f32],
    dw: &'a mut [f32],
    dx: Option<&'a mut [f32]>,
    scratch: &'a mut Vec<f32>,
    entries: &'a mut Entries,
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
            mut dx,
            scratch,
            entries,
        } = self;
        let s = Shape::new(conv);
        let (c, cp, f, k, wp) = (s.c, s.cp, s.f, s.k, s.wp);
        let (il, ol) = (conv.input_len(), conv.output_len());
        let (h, wd) = (conv.height, conv.width);
        let (oh, ow) = (conv.out_height, conv.out_width);
        let positions = oh * ow;
        let taps = k * k;
        let want_dx = dx.is_some();
        let (xp, rest) = super::scratch(scratch, s.padded_len() + 2 * s.weight_len())
            .split_at_mut(s.padded_len());
        let (wt, dwt) = rest.split_at_mut(s.weight_len());
        dwt.fill(0.0);
        if want_dx {
            // `wt[f][tap][c] = w[f][c][tap]`, zero for padding channels.
            wt.fill(0.0);
            for fi in 0..f {
                for ci in 0..c {
                    for tap in 0..taps {
                        wt[(fi * taps + tap) * cp + ci] = w[(fi * c + ci) * taps + tap];
                    }
                }
            }
        }
        // Padding stays zero: only the image's pixels are written below.
        xp.fill(0.0);
        for e in 0..n {
            let (xe, dye) = (&x[e * il..][..il], &dy[e * ol..][..ol]);
            // The padded, channels-last input.
            for ci in 0..c {
                for y in 0..h {
                    let row = ((y + conv.pad_top) * wp + conv.pad_left) * cp + ci;
                    for (xi, &v) in xe[(ci * h + y) * wd..][..wd].iter().enumerate() {
                        xp[row + xi * cp] = v;
                    }
                }
            }
            entries.collect(dye, f, positions, ow, wp, cp, want_dx);
            // `dW[f][tap] += Σ v x[p + tap]`, lanes of channels at a time.
            for fi in 0..f {
                let list = entries.filter(fi);
                if list.is_empty() {
                    continue;
                }
                for ky in 0..k {
                    for kx in 0..k {
                        let tap_off = (ky * wp + kx) * cp;
                        let out = &mut dwt[(fi * taps + ky * k + kx) * cp..][..cp];
                        let mut c0 = 0;
                        while c0 < cp {
                            if cp - c0 >= 2 * L {
                                gather_sum::<FMA, 2>(list, xp, tap_off + c0, &mut out[c0..]);
                                c0 += 2 * L;
                            } else {
                                gather_sum::<FMA, 1>(list, xp, tap_off + c0, &mut out[c0..]);
                                c0 += L;
                            }
                        }
                    }
                }
            }
            // `dx[q] = Σ_tap Σ_(f, v) at q - tap  v W[f][tap]`, over the image's pixels.
            if let Some(dx) = dx.as_deref_mut() {
                let dxe = &mut dx[e * il..][..il];
                let at = Pixels {
                    entries,
                    wt,
                    k,
                    cp,
                    oh,
                    ow,
                };
                for y in 0..h {
                    for xq in 0..wd {
                        let (qy, qx) = (y + conv.pad_top, xq + conv.pad_left);
                        let mut put = |c0: usize, lanes: &[Lane]| {
                            for (l, &v) in lanes.iter().flatten().enumerate() {
                                if c0 + l < c {
                                    dxe[((c0 + l) * h + y) * wd + xq] = v;
                                }
                            }
                        };
                        let mut c0 = 0;
                        while c0 < cp {
                            if cp - c0 >= 2 * L {
                                put(c0, &at.dx::<FMA, 2>(qy, qx, c0));
                                c0 += 2 * L;
                            } else {
                                put(c0, &at.dx::<FMA, 1>(qy, qx, c0));
                                c0 += L;
                            }
                        }
                    }
                }
            }
        }
        // Back to `[F, C, k, k]`.
        for fi in 0..f {
            for ci in 0..c {
                for tap in 0..taps {
                    dw[(fi * c + ci) * taps + tap] = dwt[(fi * taps + tap) * cp + ci];
                }
            }
        }
    }
}

impl Entries {
    /// Lists one example's nonzero `dy` entries by filter (as offsets into the padded input
    /// of the output position's window) and, for `dx`, by output position. Without branches
    /// on the values (a fifth of them nonzero would mispredict often): every entry is
    /// written, and kept by moving on when it is not zero.
    #[allow(clippy::too_many_arguments)]
    fn collect(
        &mut self,
        dy: &[f32],
        f: usize,
        positions: usize,
        ow: usize,
        wp: usize,
        cp: usize,
        by_position: bool,
    ) {
        let total = f * positions;
        if self.by_filter.len() < total {
            self.by_filter.resize(total, (0, 0.0));
            self.pos.resize(total, 0);
        }
        self.filter_start.clear();
        let mut len = 0;
        for plane in dy.chunks_exact(positions).take(f) {
            self.filter_start.push(len as u32);
            for (oy, row) in plane.chunks_exact(ow).enumerate() {
                for (ox, &v) in row.iter().enumerate() {
                    self.by_filter[len] = (((oy * wp + ox) * cp) as u32, v);
                    self.pos[len] = (oy * ow + ox) as u32;
                    len += usize::from(v != 0.0);
                }
            }
        }
        self.filter_start.push(len as u32);
        if !by_position {
            return;
        }
        // A counting sort of the same entries by position.
        self.position_start.clear();
        self.position_start.resize(positions + 1, 0);
        for &p in &self.pos[..len] {
            self.position_start[p as usize + 1] += 1;
        }
        for p in 0..positions {
            self.position_start[p + 1] += self.position_start[p];
        }
        self.by_position.resize(len, (0, 0.0));
        self.next.clear();
        self.next
            .extend_from_slice(&self.position_start[..positions]);
        for fi in 0..f {
            let (lo, hi) = (
                self.filter_start[fi] as usize,
                self.filter_start[fi + 1] as usize,
            );
            for i in lo..hi {
                let p = self.pos[i] as usize;
                self.by_position[self.next[p] as usize] = (fi as u32, self.by_filter[i].1);
                self.next[p] += 1;
            }
        }
    }

    fn filter(&self, f: usize) -> &[(u32, f32)] {
        &self.by_filter[self.filter_start[f] as usize..self.filter_start[f + 1] as usize]
    }

    fn position(&self, p: usize) -> &[(u32, f32)] {
        &self.by_position[self.position_start[p] as usize..self.position_start[p + 1] as usize]
    }
}

/// Adds `Σ v xp[offset + base ..][..G L]` over the entries `(offset, v)` to `out[..G L]`,
/// summed in `G` lanes held in registers.
#[inline(always)]
fn gather_sum<const FMA: bool, const G: usize>(
    list: &[(u32, f32)],
    xp: &[f32],
    base: usize,
    out: &mut [f32],
) {
    let out = &mut out[..G * L];
    let mut acc: [Lane; G] = std::array::from_fn(|g| {
        let mut lane = [0.0f32; L];
        lane.copy_from_slice(&out[g * L..][..L]);
        lane
    });
    for &(off, v) in list {
        let src = &xp[off as usize + base..][..G * L];
        for (g, a) in acc.iter_mut().enumerate() {
            for l in 0..L {
                a[l] = madd::<FMA>(v, src[g * L + l], a[l]);
            }
        }
    }
    for (o, a) in out.chunks_exact_mut(L).zip(&acc) {
        o.copy_from_slice(a);
    }
}

/// What `dx` at a pixel is gathered from: the entries by position and the transposed weight.
struct Pixels<'a> {
    entries: &'a Entries,
    wt: &'a [f32],
    k: usize,
    cp: usize,
    oh: usize,
    ow: usize,
}

impl Pixels<'_> {
    /// Lanes `c0..c0 + G L` of `dx` at the padded input position `(qy, qx)`: `Σ v W[f][tap]`
    /// over the taps whose output `(qy, qx) - tap` has entries `(f, v)`.
    #[inline(always)]
    fn dx<const FMA: bool, const G: usize>(&self, qy: usize, qx: usize, c0: usize) -> [Lane; G] {
        let (k, cp, taps) = (self.k, self.cp, self.k * self.k);
        let mut acc = [[0.0f32; L]; G];
        for ky in 0..k.min(qy + 1) {
            let oy = qy - ky;
            if oy >= self.oh {
                continue;
            }
            for kx in 0..k.min(qx + 1) {
                let ox = qx - kx;
                if ox >= self.ow {
                    continue;
                }
                let tap = ky * k + kx;
                for &(fi, v) in self.entries.position(oy * self.ow + ox) {
                    let src = &self.wt[(fi as usize * taps + tap) * cp + c0..][..G * L];
                    for (g, a) in acc.iter_mut().enumerate() {
                        for l in 0..L {
                            a[l] = madd::<FMA>(v, src[g * L + l], a[l]);
                        }
                    }
                }
            }
        }
        acc
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_values as values;
    use super::*;
    use crate::trainer::spec::Padding;

    /// The sparse pass gives im2col's gradients, for shapes with and without padding,
    /// channels that fill no whole lane, non-square inputs, and gradients as sparse as under
    /// a max-pool and a ReLU, or not sparse at all.
    #[test]
    fn the_sparse_pass_equals_im2col() {
        for (channels, h, w, filters, kernel, padding) in [
            (32, 14, 14, 64, 5, Padding::Same),
            (8, 9, 7, 5, 3, Padding::Same),
            (20, 10, 12, 3, 5, Padding::Valid),
            (40, 6, 5, 2, 5, Padding::Same),
        ] {
            let conv = Conv2d::new([channels, h, w], filters, kernel, 1, padding).unwrap();
            assert!(applies(&conv));
            let n = 3;
            let x = values(n * conv.input_len(), 1);
            let wt = values(filters * channels * kernel * kernel, 2);
            for keep in [1, 4, 9] {
                // One entry in `keep` left (every one for 1).
                let dy: Vec<f32> = values(n * conv.output_len(), 3)
                    .into_iter()
                    .enumerate()
                    .map(|(i, v)| if (i * 31 + i / 7) % keep == 0 { v } else { 0.0 })
                    .collect();
                let mut want = (vec![0.0; wt.len()], vec![0.0; filters], vec![0.0; x.len()]);
                let (mut col, mut dcol) = (Vec::new(), Vec::new());
                conv.backward_im2col(
                    &x,
                    n,
                    &wt,
                    &dy,
                    &mut want.0,
                    &mut want.1,
                    Some(&mut want.2),
                    &mut col,
                    &mut dcol,
                );
                let mut got = (
                    vec![f32::NAN; wt.len()],
                    vec![f32::NAN; filters],
                    vec![f32::NAN; x.len()],
                );
                let mut scratch = vec![f32::NAN; 7];
                backward(
                    &conv,
                    &x,
                    n,
                    &wt,
                    &dy,
                    &mut got.0,
                    &mut got.1,
                    Some(&mut got.2),
                    &mut scratch,
                );
                let what = format!("{conv:?}, one in {keep}");
                for (name, g, e) in [
                    ("dw", &got.0, &want.0),
                    ("db", &got.1, &want.1),
                    ("dx", &got.2, &want.2),
                ] {
                    for (i, (a, b)) in g.iter().zip(e.iter()).enumerate() {
                        assert!(
                            (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                            "{what}: {name}[{i}] {a} against {b}"
                        );
                    }
                }
                // Without dx, the same weight gradient.
                let mut alone = vec![0.0; wt.len()];
                backward(
                    &conv,
                    &x,
                    n,
                    &wt,
                    &dy,
                    &mut alone,
                    &mut got.1,
                    None,
                    &mut scratch,
                );
                assert!(alone == got.0, "{what}: dw depends on dx");
            }
        }
    }

    #[test]
    fn density_counts_the_nonzero_share() {
        assert_eq!(density(&[0.0, 1.0, -0.0, 2.0]), 0.5);
        assert_eq!(density(&[]), 0.0);
    }
}
