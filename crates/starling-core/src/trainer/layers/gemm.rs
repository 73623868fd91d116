//! A safe wrapper around `matrixmultiply::sgemm`; with `crate::aggregate::kernels` and
//! [`super::kernels`], one of the three places the crate uses `unsafe`.
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

    /// A `rows x cols` matrix whose rows start `row_stride` values apart (`row_stride` at
    /// least `cols`): a block of columns of a wider row-major matrix, starting at `data[0]`.
    pub fn strided(data: &'a [f32], rows: usize, cols: usize, row_stride: usize) -> Self {
        assert!(row_stride >= cols, "row stride shorter than a row");
        let needed = if rows == 0 || cols == 0 {
            0
        } else {
            (rows - 1) * row_stride + cols
        };
        assert!(data.len() >= needed, "matrix data length");
        Self {
            data,
            rows,
            cols,
            row_stride: row_stride as isize,
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
    assert_eq!(c.len(), a.rows * b.cols, "output length");
    sgemm_strided(alpha, a, b, beta, c, b.cols);
}

/// [`sgemm`] into a block of columns of a wider row-major matrix: row `i` of the
/// `a.rows x b.cols` result starts at `c[i * c_row_stride]`.
pub fn sgemm_strided(
    alpha: f32,
    a: Mat<'_>,
    b: Mat<'_>,
    beta: f32,
    c: &mut [f32],
    c_row_stride: usize,
) {
    assert_eq!(a.cols, b.rows, "inner dimensions");
    let (m, k, n) = (a.rows, a.cols, b.cols);
    if m == 0 || n == 0 {
        return;
    }
    assert!(c_row_stride >= n, "output row stride shorter than a row");
    assert!(c.len() >= (m - 1) * c_row_stride + n, "output length");
    // SAFETY: `Mat::new` and `Mat::strided` checked that each buffer holds every element of
    // its rows x cols layout, transposition only swaps strides, and `c` was checked above
    // for m rows of n values `c_row_stride` apart, so every index the kernel forms from
    // (m, k, n) and the strides lies inside its slice.
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
            c_row_stride as isize,
            1,
        );
    }
}
