//! The one matrix product the crate calls `gemm` for with plain row-major operands: the model's
//! linear layers on the CPU (`embed`) and a batch's similarities (`index::pairs`).

use gemm::Parallelism;

/// `dst[m×n] = a[m×k] · wᵀ` with `w` as `[n, k]`, all row-major and contiguous (the first `m`
/// rows of `dst` and `a`).
pub(crate) fn matmul(
    dst: &mut [f32],
    a: &[f32],
    w: &[f32],
    m: usize,
    k: usize,
    n: usize,
    threads: usize,
) {
    assert!(
        dst.len() >= m * n && a.len() >= m * k && w.len() == k * n,
        "matmul shapes"
    );
    if m == 0 || n == 0 {
        return;
    }
    let par = if threads > 1 && m * n * k >= 1 << 20 {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    };
    // SAFETY: the assert above keeps every access (row-major with these strides) in bounds.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            false,
            a.as_ptr(),
            1,
            k as isize,
            w.as_ptr(),
            k as isize,
            1,
            0.0,
            1.0,
            false,
            false,
            false,
            par,
        );
    }
}
