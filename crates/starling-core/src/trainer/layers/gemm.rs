//! A safe wrapper around `matrixmultiply::sgemm`; with `crate::aggregate::kernels`, one of the two places
//! the crate uses `unsafe`.
//!
//! The wrapper checks every slice against the dimensions and strides it is given, so the
//! kernel never reads or writes out of bounds.
#![allow(unsafe_code)]

/// A row-major or transposed view of a matrix stored in a slice.
#[derive(Clone, Copy, Debug)]
pub struct Mat<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    row_stride: isize,
    col_stride: isize,
}

impl<'a> Mat<'a> {
    /// A `rows x cols` row-major matrix.
    pub fn new(data: &'a [f32], rows: usize, cols: usize) -> Self {
        assert_eq!(data.len(), rows * cols, "matrix data length");
        Self {
            data,
            rows,
            cols,
            row_stride: cols as isize,
            col_stride: 1,
        }
    }

    /// The transpose (no copy).
    pub fn t(self) -> Self {
        Self {
            data: self.data,
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
        }
    }
}

/// `c = alpha * a b + beta * c`, with `c` a row-major `a.rows x b.cols` matrix.
pub fn sgemm(alpha: f32, a: Mat<'_>, b: Mat<'_>, beta: f32, c: &mut [f32]) {
    assert_eq!(a.cols, b.rows, "inner dimensions");
    assert_eq!(c.len(), a.rows * b.cols, "output length");
    let (m, k, n) = (a.rows, a.cols, b.cols);
    if m == 0 || n == 0 {
        return;
    }
    // SAFETY: `Mat::new` checked that each buffer holds exactly rows*cols elements for its
    // row-major layout, transposition only swaps strides, and `c` was checked above, so every
    // index the kernel forms from (m, k, n) and the strides lies inside its slice.
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            alpha,
            a.data.as_ptr(),
            a.row_stride,
            a.col_stride,
            b.data.as_ptr(),
            b.row_stride,
            b.col_stride,
            beta,
            c.as_mut_ptr(),
            n as isize,
            1,
        );
    }
}
