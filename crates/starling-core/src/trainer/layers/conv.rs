//! Two-dimensional convolution over NCHW batches, as im2col followed by one GEMM per example
//! on the crate's [`sgemm`] wrapper.
//!
//! For one example `x` of shape `[C, H, W]`, im2col writes the matrix `col` of shape
//! `[C k k, OH OW]` (row `(c, i, j)` holds the input pixel that kernel tap `(i, j)` of channel
//! `c` sees at every output position, zero where the window overhangs the padded border), so
//! that the output `[F, OH OW]` is `W col + b` with the weight viewed as `[F, C k k]`. The
//! backward pass uses the same matrix: `dW += dy colᵀ` and `dcol = Wᵀ dy`, which col2im adds
//! back onto the input positions.

use super::gemm::{sgemm, Mat};
#[cfg(not(target_arch = "wasm32"))]
use super::kernels::{lane_sum, small_gemm, View, L};
use crate::trainer::spec::Padding;

/// The output size along one spatial dimension and the zero padding before the input, or
/// `None` when a `valid` kernel is larger than the input. `stride` must be at least 1.
pub fn output_size(
    input: usize,
    kernel: usize,
    stride: usize,
    padding: Padding,
) -> Option<(usize, usize)> {
    match padding {
        Padding::Valid => (input >= kernel).then(|| ((input - kernel) / stride + 1, 0)),
        Padding::Same => {
            let out = input.div_ceil(stride);
            let total = ((out - 1) * stride + kernel).saturating_sub(input);
            Some((out, total / 2))
        }
    }
}

/// The output positions `o` in `lo..hi` whose input coordinate `o stride + offset - pad`
/// lies in `0..size` (the others read the zero padding).
fn valid_range(
    offset: usize,
    pad: usize,
    size: usize,
    stride: usize,
    out: usize,
) -> (usize, usize) {
    let hi = (size + pad)
        .saturating_sub(offset)
        .div_ceil(stride)
        .min(out);
    let lo = pad.saturating_sub(offset).div_ceil(stride).min(hi);
    (lo, hi)
}

/// The geometry of a convolution layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conv2d {
    /// Input channels.
    pub channels: usize,
    /// Input height.
    pub height: usize,
    /// Input width.
    pub width: usize,
    /// Output channels.
    pub filters: usize,
    /// Side of the square kernel.
    pub kernel: usize,
    /// Step between windows.
    pub stride: usize,
    /// Zero rows above the input.
    pub pad_top: usize,
    /// Zero columns left of the input.
    pub pad_left: usize,
    /// Output height.
    pub out_height: usize,
    /// Output width.
    pub out_width: usize,
}

impl Conv2d {
    /// The geometry for an input of shape `[channels, height, width]`; `None` when a
    /// dimension is 0 or a `valid` kernel does not fit.
    pub fn new(
        [channels, height, width]: [usize; 3],
        filters: usize,
        kernel: usize,
        stride: usize,
        padding: Padding,
    ) -> Option<Self> {
        if channels == 0 || height == 0 || width == 0 || filters == 0 || kernel == 0 || stride == 0
        {
            return None;
        }
        let (out_height, pad_top) = output_size(height, kernel, stride, padding)?;
        let (out_width, pad_left) = output_size(width, kernel, stride, padding)?;
        Some(Self {
            channels,
            height,
            width,
            filters,
            kernel,
            stride,
            pad_top,
            pad_left,
            out_height,
            out_width,
        })
    }

    /// Values per input example.
    pub fn input_len(&self) -> usize {
        self.channels * self.height * self.width
    }

    /// Values per output example.
    pub fn output_len(&self) -> usize {
        self.filters * self.positions()
    }

    /// Rows of the im2col matrix: `channels k k`.
    fn patch_len(&self) -> usize {
        self.channels * self.kernel * self.kernel
    }

    /// Columns of the im2col matrix: `out_height out_width`.
    fn positions(&self) -> usize {
        self.out_height * self.out_width
    }

    /// Calls `f(c, i, j, oh_range, ow_range)` for every kernel tap, with the output
    /// positions whose input pixel is inside the image.
    fn for_each_tap(&self, mut f: impl FnMut(usize, usize, usize, (usize, usize), (usize, usize))) {
        let (k, s) = (self.kernel, self.stride);
        for c in 0..self.channels {
            for i in 0..k {
                let rows = valid_range(i, self.pad_top, self.height, s, self.out_height);
                for j in 0..k {
                    let cols = valid_range(j, self.pad_left, self.width, s, self.out_width);
                    f(c, i, j, rows, cols);
                }
            }
        }
    }

    /// Writes the `[C k k, OH OW]` im2col matrix of one example.
    fn im2col(&self, x: &[f32], col: &mut [f32]) {
        let (k, s, p) = (self.kernel, self.stride, self.positions());
        let (w, ow) = (self.width, self.out_width);
        let plane_len = self.height * w;
        self.for_each_tap(|c, i, j, (oh_lo, oh_hi), (ow_lo, ow_hi)| {
            let plane = &x[c * plane_len..(c + 1) * plane_len];
            let row = &mut col[((c * k + i) * k + j) * p..][..p];
            row[..oh_lo * ow].fill(0.0);
            row[oh_hi * ow..].fill(0.0);
            for oh in oh_lo..oh_hi {
                let ih = oh * s + i - self.pad_top;
                let src = &plane[ih * w..(ih + 1) * w];
                let dst = &mut row[oh * ow..(oh + 1) * ow];
                dst[..ow_lo].fill(0.0);
                dst[ow_hi..].fill(0.0);
                let iw0 = ow_lo * s + j - self.pad_left;
                let dst = &mut dst[ow_lo..ow_hi];
                if s == 1 {
                    dst.copy_from_slice(&src[iw0..iw0 + dst.len()]);
                } else {
                    for (d, v) in dst.iter_mut().zip(src[iw0..].iter().step_by(s)) {
                        *d = *v;
                    }
                }
            }
        });
    }

    /// Adds the `[C k k, OH OW]` matrix `col` back onto one example's input positions (the
    /// adjoint of [`Conv2d::im2col`]).
    fn col2im(&self, col: &[f32], dx: &mut [f32]) {
        let (k, s, p) = (self.kernel, self.stride, self.positions());
        let (w, ow) = (self.width, self.out_width);
        let plane_len = self.height * w;
        self.for_each_tap(|c, i, j, (oh_lo, oh_hi), (ow_lo, ow_hi)| {
            let plane = &mut dx[c * plane_len..(c + 1) * plane_len];
            let row = &col[((c * k + i) * k + j) * p..][..p];
            for oh in oh_lo..oh_hi {
                let ih = oh * s + i - self.pad_top;
                let dst = &mut plane[ih * w..(ih + 1) * w];
                let src = &row[oh * ow + ow_lo..oh * ow + ow_hi];
                let iw0 = ow_lo * s + j - self.pad_left;
                if s == 1 {
                    for (d, v) in dst[iw0..iw0 + src.len()].iter_mut().zip(src) {
                        *d += v;
                    }
                } else {
                    for (d, v) in dst[iw0..].iter_mut().step_by(s).zip(src) {
                        *d += v;
                    }
                }
            }
        });
    }

    /// Forward pass over `n` examples: `x` holds `n` inputs, `y` receives `n` outputs
    /// (NCHW); `w` is `[F, C, k, k]`, `b` is `[F]`; `col` is scratch space. 5x5 kernels at
    /// stride 1 over several channels take Winograd's algorithm (natively).
    pub fn forward(
        &self,
        x: &[f32],
        n: usize,
        w: &[f32],
        b: &[f32],
        y: &mut [f32],
        col: &mut Vec<f32>,
    ) {
        #[cfg(not(target_arch = "wasm32"))]
        if super::winograd::applies(self) {
            assert_eq!(x.len(), n * self.input_len(), "conv2d input length");
            assert_eq!(y.len(), n * self.output_len(), "conv2d output length");
            return super::winograd::forward(self, x, n, w, b, y, col);
        }
        self.forward_im2col(x, n, w, b, y, col);
    }

    /// [`Conv2d::forward`] as im2col and one GEMM per example.
    pub(crate) fn forward_im2col(
        &self,
        x: &[f32],
        n: usize,
        w: &[f32],
        b: &[f32],
        y: &mut [f32],
        col: &mut Vec<f32>,
    ) {
        let (p, pl) = (self.positions(), self.patch_len());
        assert_eq!(x.len(), n * self.input_len(), "conv2d input length");
        assert_eq!(y.len(), n * self.output_len(), "conv2d output length");
        let col = super::scratch(col, pl * p);
        for (xn, yn) in x
            .chunks_exact(self.input_len())
            .zip(y.chunks_exact_mut(self.output_len()))
        {
            self.im2col(xn, col);
            for (row, &bias) in yn.chunks_exact_mut(p).zip(b) {
                row.fill(bias);
            }
            // Natively, without a GEMM's packing: the product is small (the CNN's first
            // layer: `[32, 25] x [25, 784]`), so packing its operands would cost as much.
            #[cfg(not(target_arch = "wasm32"))]
            {
                let a = View {
                    data: w,
                    rs: pl,
                    cs: 1,
                };
                small_gemm(a, self.filters, pl, col, p, yn);
            }
            #[cfg(target_arch = "wasm32")]
            sgemm(
                1.0,
                Mat::new(w, self.filters, pl),
                Mat::new(col, pl, p),
                1.0,
                yn,
            );
        }
    }

    /// Backward pass over `n` examples: given the forward input `x` and `dy` (the loss
    /// gradient at the output), writes `dw` and `db`, and `dx` when asked. `col` and `dcol`
    /// are scratch space.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &self,
        x: &[f32],
        n: usize,
        w: &[f32],
        dy: &[f32],
        dw: &mut [f32],
        db: &mut [f32],
        dx: Option<&mut [f32]>,
        col: &mut Vec<f32>,
        dcol: &mut Vec<f32>,
    ) {
        #[cfg(not(target_arch = "wasm32"))]
        {
            use super::sparse_conv;
            // Under a max-pool and a ReLU most of `dy` is zero: go over the rest only.
            if sparse_conv::applies(self) && sparse_conv::density(dy) <= sparse_conv::MAX_DENSITY {
                return sparse_conv::backward(self, x, n, w, dy, dw, db, dx, col);
            }
            if super::winograd::applies(self) {
                assert_eq!(x.len(), n * self.input_len(), "conv2d input length");
                assert_eq!(dy.len(), n * self.output_len(), "conv2d gradient length");
                return super::winograd::backward(self, x, n, w, dy, dw, db, dx, col, dcol);
            }
        }
        self.backward_im2col(x, n, w, dy, dw, db, dx, col, dcol);
    }

    /// `db[f]`: the sum of filter `f`'s outputs' gradients `dy` over the batch. Natively each
    /// plane is summed in 16 interleaved partial sums, then those as a tree: a plain sum is
    /// one long chain of dependent additions (the first layer's planes are 784 long). The
    /// browser's module keeps the plain sum (size).
    pub(crate) fn bias_gradient(&self, dy: &[f32], db: &mut [f32]) {
        let p = self.positions();
        db.fill(0.0);
        for dy_n in dy.chunks_exact(self.output_len()) {
            for (acc, plane) in db.iter_mut().zip(dy_n.chunks_exact(p)) {
                *acc += plane_sum(plane);
            }
        }
    }

    /// [`Conv2d::backward`] as im2col and GEMMs per example.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn backward_im2col(
        &self,
        x: &[f32],
        n: usize,
        w: &[f32],
        dy: &[f32],
        dw: &mut [f32],
        db: &mut [f32],
        mut dx: Option<&mut [f32]>,
        col: &mut Vec<f32>,
        dcol: &mut Vec<f32>,
    ) {
        let (p, pl) = (self.positions(), self.patch_len());
        let (il, ol) = (self.input_len(), self.output_len());
        assert_eq!(x.len(), n * il, "conv2d input length");
        assert_eq!(dy.len(), n * ol, "conv2d gradient length");
        self.bias_gradient(dy, db);
        if n == 0 {
            dw.fill(0.0);
            return;
        }
        let col = super::scratch(col, pl * p);
        let dcol = super::scratch(dcol, if dx.is_some() { pl * p } else { 0 });
        for (e, (xn, dy_n)) in x.chunks_exact(il).zip(dy.chunks_exact(ol)).enumerate() {
            self.im2col(xn, col);
            let beta = if e == 0 { 0.0 } else { 1.0 };
            sgemm(
                1.0,
                Mat::new(dy_n, self.filters, p),
                Mat::new(col, pl, p).t(),
                beta,
                dw,
            );
            if let Some(dx) = dx.as_deref_mut() {
                sgemm(
                    1.0,
                    Mat::new(w, self.filters, pl).t(),
                    Mat::new(dy_n, self.filters, p),
                    0.0,
                    dcol,
                );
                let dxn = &mut dx[e * il..(e + 1) * il];
                dxn.fill(0.0);
                self.col2im(dcol, dxn);
            }
        }
    }
}

/// The sum of `v`: natively in 16 interleaved partial sums, then those as a tree.
#[cfg(not(target_arch = "wasm32"))]
fn plane_sum(v: &[f32]) -> f32 {
    let mut part = [0.0f32; L];
    let mut chunks = v.chunks_exact(L);
    for c in &mut chunks {
        for (s, x) in part.iter_mut().zip(c) {
            *s += x;
        }
    }
    for (s, x) in part.iter_mut().zip(chunks.remainder()) {
        *s += x;
    }
    lane_sum(&part)
}

/// The sum of `v`, in order (the browser's module: size over speed).
#[cfg(target_arch = "wasm32")]
fn plane_sum(v: &[f32]) -> f32 {
    v.iter().sum()
}
