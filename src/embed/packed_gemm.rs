//! The matmul of small passes (one short request, a few prompts): `dst[m×n] = a[m×k] · wᵀ` with
//! `w` packed once, at load, into panels of [`NR`] output columns stored k-major, so a
//! register-blocked microkernel reads them straight from memory and `a` straight from its rows.
//!
//! Why: `gemm` packs both operands on every call. With a few dozen rows that packing (and its
//! driver) is most of the work, and its threads have too little to share; a profile of one
//! 38-token request put 44 % of the time in gemm's driver. Here nothing is packed per call and the
//! panels split evenly across threads. Measured on the 2-vCPU AVX-512 box with MiniLM's shapes
//! (BENCHMARKS.md, "Small passes"): 1.4–4× gemm's speed at 38–64 rows on two threads, about even
//! at 256 rows; beyond that `gemm`'s cache blocking wins, so [`super::fast_bert`] keeps it for
//! large passes.
//!
//! Kernels: AVX-512F (12 rows × 32 columns in 24 registers) or AVX2+FMA (6 rows × 16 columns,
//! twice per panel), picked once at run time. Other CPUs get no packed copy ([`Packed::new`]
//! returns `None`) and stay on `gemm`.

use rayon::prelude::*;

use super::SharedMut;

/// Output columns per panel (two AVX-512 registers of f32).
pub const NR: usize = 32;

/// Work (m·n·k) under which one thread does the whole matmul: splitting costs more than it saves.
const PARALLEL_WORK: usize = 1 << 20;

/// The instruction set a packed matmul runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// AVX-512F: 12 × 32 register tile.
    Avx512,
    /// AVX2 and FMA: 6 × 16 register tile.
    Avx2,
}

impl Isa {
    /// The best kernel this CPU runs, if any.
    pub fn detect() -> Option<Self> {
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx512f") {
                return Some(Self::Avx512);
            }
            if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                return Some(Self::Avx2);
            }
        }
        None
    }

    /// Whether this CPU runs `self`.
    pub fn supported(self) -> bool {
        match self {
            Self::Avx512 => Self::detect() == Some(Self::Avx512),
            Self::Avx2 => Self::detect().is_some(),
        }
    }
}

/// A weight matrix `w` (`[n, k]` row-major, PyTorch's `[out, in]`) packed for the microkernels:
/// panel `p` holds columns `p·NR ..` of `wᵀ` as `k` rows of [`NR`] values, the last panel padded
/// with zeros.
pub struct Packed {
    data: Vec<f32>,
    n: usize,
    k: usize,
    isa: Isa,
}

impl Packed {
    /// Packs `w` (`[n, k]`) for this CPU's kernel; `None` when it has neither AVX-512F nor
    /// AVX2+FMA.
    pub fn new(w: &[f32], n: usize, k: usize) -> Option<Self> {
        Isa::detect().map(|isa| Self::with_isa(w, n, k, isa))
    }

    /// Packs `w` for `isa` (which the CPU must support before [`Packed::matmul`] runs it).
    ///
    /// # Panics
    /// If `w` is not `n × k` values.
    pub fn with_isa(w: &[f32], n: usize, k: usize, isa: Isa) -> Self {
        assert_eq!(w.len(), n * k, "packed weight shape");
        let panels = n.div_ceil(NR);
        let mut data = vec![0.0; panels * k * NR];
        for (col, row) in w.chunks_exact(k.max(1)).enumerate().take(n) {
            let (p, j) = (col / NR, col % NR);
            let panel = &mut data[p * k * NR..][..k * NR];
            for (kk, &v) in row.iter().enumerate() {
                panel[kk * NR + j] = v;
            }
        }
        Self { data, n, k, isa }
    }

    /// `dst[m×n] = a[m×k] · wᵀ`, rows contiguous (`a` row stride `k`, `dst` row stride `n`), on
    /// up to `threads` rayon threads (each takes a contiguous run of panels).
    ///
    /// # Panics
    /// If `a` or `dst` is shorter than `m` rows, or the CPU lacks the packed kernel's ISA.
    pub fn matmul(&self, dst: &mut [f32], a: &[f32], m: usize, threads: usize) {
        let (n, k) = (self.n, self.k);
        assert!(
            dst.len() >= m * n && a.len() >= m * k,
            "packed matmul shapes"
        );
        assert!(self.isa.supported(), "packed matmul ISA {:?}", self.isa);
        if m == 0 || n == 0 {
            return;
        }
        let panels = n.div_ceil(NR);
        let out = SharedMut(dst.as_mut_ptr());
        let run = |first: usize, end: usize| {
            for p in first..end {
                let cols = NR.min(n - p * NR);
                // SAFETY: the ISA is supported (asserted); panel `p` lies in `data`; the kernel
                // reads rows `0..m` of `a` (`k` apart) and writes columns `p·NR .. p·NR + cols` of
                // rows `0..m` of `dst` (`n` apart), all in bounds by the assert above, and no other
                // task writes those columns.
                unsafe {
                    kernel_panel(
                        self.isa,
                        out.ptr().add(p * NR),
                        n,
                        a.as_ptr(),
                        k,
                        m,
                        self.data.as_ptr().add(p * k * NR),
                        k,
                        cols,
                    );
                }
            }
        };
        let groups = threads.min(panels);
        if groups <= 1 || m * n * k < PARALLEL_WORK {
            run(0, panels);
        } else {
            (0..groups)
                .into_par_iter()
                .for_each(|g| run(panels * g / groups, panels * (g + 1) / groups));
        }
    }
}

/// One panel for all `m` rows: `c[r][0..cols] = Σ_kk a[r][kk] · b[kk][0..cols]`.
///
/// # Safety
/// The CPU supports `isa`; `a` has `m` rows of `k` values `lda` apart, `b` is `k × NR` values,
/// `c` has `m` rows of at least `cols ≤ NR` writable values `ldc` apart.
#[allow(clippy::too_many_arguments)]
#[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
unsafe fn kernel_panel(
    isa: Isa,
    c: *mut f32,
    ldc: usize,
    a: *const f32,
    lda: usize,
    m: usize,
    b: *const f32,
    k: usize,
    cols: usize,
) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: forwarded from the caller.
    unsafe {
        match isa {
            Isa::Avx512 => avx512::panel(c, ldc, a, lda, m, b, k, cols),
            Isa::Avx2 => avx2::panel(c, ldc, a, lda, m, b, k, cols),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("no packed kernel on this architecture")
}

/// Runs `$kernel::<R>` over the rows `0..$m` in tiles of `$mr` rows, then one tile of the rest
/// (`R` must be a constant, hence the match).
#[cfg(target_arch = "x86_64")]
macro_rules! row_tiles {
    ($kernel:ident, $mr:expr, $m:expr, $c:expr, $ldc:expr, $a:expr, $lda:expr, $b:expr, $k:expr,
     $cols:expr; $($r:literal)*) => {{
        let mut r = 0;
        while r + $mr <= $m {
            $kernel::<{ $mr }>($c.add(r * $ldc), $ldc, $a.add(r * $lda), $lda, $b, $k, $cols);
            r += $mr;
        }
        match $m - r {
            $($r => $kernel::<$r>($c.add(r * $ldc), $ldc, $a.add(r * $lda), $lda, $b, $k, $cols),)*
            _ => {}
        }
    }};
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    /// Rows per register tile (2 × 12 accumulators, 2 panel registers, 1 broadcast).
    const MR: usize = 12;

    /// See [`super::kernel_panel`].
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn panel(
        c: *mut f32,
        ldc: usize,
        a: *const f32,
        lda: usize,
        m: usize,
        b: *const f32,
        k: usize,
        cols: usize,
    ) {
        // SAFETY: forwarded from the caller; each tile stays within rows `0..m`.
        unsafe { row_tiles!(tile, MR, m, c, ldc, a, lda, b, k, cols; 1 2 3 4 5 6 7 8 9 10 11) }
    }

    /// `R` rows × 32 columns, accumulated over all of `k` in registers, then stored (masked when
    /// `cols < 32`).
    #[allow(clippy::too_many_arguments)]
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn tile<const R: usize>(
        c: *mut f32,
        ldc: usize,
        a: *const f32,
        lda: usize,
        b: *const f32,
        k: usize,
        cols: usize,
    ) {
        // SAFETY: the caller keeps `a` (R rows × k), `b` (k × 32) and `c` (R rows × cols) valid.
        unsafe {
            let mut lo = [_mm512_setzero_ps(); R];
            let mut hi = [_mm512_setzero_ps(); R];
            for kk in 0..k {
                let b0 = _mm512_loadu_ps(b.add(kk * super::NR));
                let b1 = _mm512_loadu_ps(b.add(kk * super::NR + 16));
                for r in 0..R {
                    let av = _mm512_set1_ps(*a.add(r * lda + kk));
                    lo[r] = _mm512_fmadd_ps(av, b0, lo[r]);
                    hi[r] = _mm512_fmadd_ps(av, b1, hi[r]);
                }
            }
            if cols == super::NR {
                for r in 0..R {
                    _mm512_storeu_ps(c.add(r * ldc), lo[r]);
                    _mm512_storeu_ps(c.add(r * ldc + 16), hi[r]);
                }
            } else {
                let mask = |n: usize| -> __mmask16 { ((1u32 << n.min(16)) - 1) as u16 };
                let (m0, m1) = (mask(cols), mask(cols.saturating_sub(16)));
                for r in 0..R {
                    _mm512_mask_storeu_ps(c.add(r * ldc), m0, lo[r]);
                    _mm512_mask_storeu_ps(c.add(r * ldc + 16), m1, hi[r]);
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// Rows per register tile (2 × 6 accumulators, 2 panel registers, 1 broadcast of 16).
    const MR: usize = 6;

    /// See [`super::kernel_panel`]; the 32-column panel runs as two halves of 16.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn panel(
        c: *mut f32,
        ldc: usize,
        a: *const f32,
        lda: usize,
        m: usize,
        b: *const f32,
        k: usize,
        cols: usize,
    ) {
        for half in [0, 16] {
            if half >= cols {
                break;
            }
            let width = (cols - half).min(16);
            // SAFETY: forwarded from the caller; the half stays within the panel and `cols`.
            unsafe {
                let (c, b) = (c.add(half), b.add(half));
                row_tiles!(tile, MR, m, c, ldc, a, lda, b, k, width; 1 2 3 4 5);
            }
        }
    }

    /// `R` rows × 16 columns (of a 32-wide panel row), accumulated over all of `k` in registers.
    #[allow(clippy::too_many_arguments)]
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn tile<const R: usize>(
        c: *mut f32,
        ldc: usize,
        a: *const f32,
        lda: usize,
        b: *const f32,
        k: usize,
        cols: usize,
    ) {
        // SAFETY: the caller keeps `a` (R rows × k), `b` (k rows 32 apart) and `c` (R rows ×
        // cols) valid.
        unsafe {
            let mut lo = [_mm256_setzero_ps(); R];
            let mut hi = [_mm256_setzero_ps(); R];
            for kk in 0..k {
                let b0 = _mm256_loadu_ps(b.add(kk * super::NR));
                let b1 = _mm256_loadu_ps(b.add(kk * super::NR + 8));
                for r in 0..R {
                    let av = _mm256_set1_ps(*a.add(r * lda + kk));
                    lo[r] = _mm256_fmadd_ps(av, b0, lo[r]);
                    hi[r] = _mm256_fmadd_ps(av, b1, hi[r]);
                }
            }
            if cols == 16 {
                for r in 0..R {
                    _mm256_storeu_ps(c.add(r * ldc), lo[r]);
                    _mm256_storeu_ps(c.add(r * ldc + 8), hi[r]);
                }
            } else {
                let mut row = [0.0f32; 16];
                for r in 0..R {
                    _mm256_storeu_ps(row.as_mut_ptr(), lo[r]);
                    _mm256_storeu_ps(row.as_mut_ptr().add(8), hi[r]);
                    std::ptr::copy_nonoverlapping(row.as_ptr(), c.add(r * ldc), cols);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: &[f32], w: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
        let mut out = vec![0.0f32; m * n];
        for r in 0..m {
            for j in 0..n {
                out[r * n + j] = (0..k).map(|kk| a[r * k + kk] * w[j * k + kk]).sum();
            }
        }
        out
    }

    #[test]
    fn every_kernel_matches_a_naive_matmul_on_ragged_shapes() {
        let isas: Vec<Isa> = [Isa::Avx512, Isa::Avx2]
            .into_iter()
            .filter(|i| i.supported())
            .collect();
        if isas.is_empty() {
            assert!(Packed::new(&[0.0; 4], 2, 2).is_none());
            return;
        }
        // Rows: every tile remainder of both kernels, and more than one tile; columns: a partial
        // half-panel, a partial second half, exactly one and several panels; one large enough
        // to split across threads.
        for &(m, k, n) in &[
            (1, 1, 1),
            (5, 3, 7),
            (13, 17, 20),
            (25, 33, 32),
            (7, 64, 45),
            (38, 384, 96),
            (64, 300, 70),
        ] {
            let a: Vec<f32> = (0..m * k)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0)
                .collect();
            let w: Vec<f32> = (0..n * k)
                .map(|i| ((i * 53 % 89) as f32 - 44.0) / 30.0)
                .collect();
            let want = naive(&a, &w, m, k, n);
            for &isa in &isas {
                for threads in [1, 2, 3] {
                    // A guard value after the last row catches writes past the output's end.
                    let mut got = vec![f32::NAN; m * n + 1];
                    Packed::with_isa(&w, n, k, isa).matmul(&mut got, &a, m, threads);
                    for (i, (g, e)) in got.iter().zip(&want).enumerate() {
                        let tol = 1e-4 * (1.0 + e.abs()) * (k as f32).sqrt();
                        assert!(
                            (g - e).abs() <= tol,
                            "{isa:?} m={m} k={k} n={n} threads={threads}: [{i}] {g} vs {e}"
                        );
                    }
                    assert!(got[m * n].is_nan(), "{isa:?} wrote past the output");
                }
            }
        }
    }

    #[test]
    fn empty_shapes_do_nothing() {
        let Some(isa) = Isa::detect() else { return };
        let p = Packed::with_isa(&[], 0, 4, isa);
        p.matmul(&mut [], &[1.0; 4], 1, 2);
        let p = Packed::with_isa(&[1.0; 8], 2, 4, isa);
        p.matmul(&mut [], &[], 0, 2);
    }
}
