//! The HNSW distance for L2-normalised vectors: `1 − dot`, clamped at zero.
//!
//! anndists' own `DistDot` asserts `1 − dot >= 0` and so panics on an exact duplicate vector,
//! whose dot product with itself rounds to slightly above 1. Duplicates are normal here (popular
//! prompts are sent verbatim by many accounts), hence this clamped variant. It derives `Default`
//! because `hnsw_rs::HnswIo::load_hnsw` rebuilds the distance with `D::default()`.

use anndists::dist::Distance;

/// Cosine distance of L2-normalised vectors: `(1 − a·b).max(0)`, in `[0, 2]`.
///
/// The similarity reported by the indexes is `1 − distance`.
#[derive(Debug, Default, Clone, Copy)]
pub struct DistDotClamped;

impl Distance<f32> for DistDotClamped {
    fn eval(&self, va: &[f32], vb: &[f32]) -> f32 {
        (1.0 - dot(va, vb)).max(0.0)
    }
}

/// Dot product of two equally long vectors. The HNSW searches and inserts spend most of their
/// time here, so on x86-64 CPUs with AVX2 and FMA (release builds target baseline SSE2) it runs a
/// hand-vectorised loop picked at run time; elsewhere a portable loop the compiler vectorises.
#[inline]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    #[cfg(target_arch = "x86_64")]
    {
        // std caches the detection: each check is one atomic load.
        if std::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F (checked above).
            return unsafe { dot_avx512(a, b) };
        }
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU has AVX2 and FMA (checked above).
            return unsafe { dot_avx2(a, b) };
        }
    }
    dot_portable(a, b)
}

/// AVX2 + FMA dot product: four 8-lane accumulators over 32 values a step, then the rest.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = a.len().min(b.len());
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    // SAFETY (all loads): `i + 32 <= n` / `i + 8 <= n` keep every 8-value load within both slices.
    while i + 32 <= n {
        for (j, acc) in acc.iter_mut().enumerate() {
            let x = unsafe { _mm256_loadu_ps(pa.add(i + 8 * j)) };
            let y = unsafe { _mm256_loadu_ps(pb.add(i + 8 * j)) };
            *acc = _mm256_fmadd_ps(x, y, *acc);
        }
        i += 32;
    }
    while i + 8 <= n {
        let x = unsafe { _mm256_loadu_ps(pa.add(i)) };
        let y = unsafe { _mm256_loadu_ps(pb.add(i)) };
        acc[0] = _mm256_fmadd_ps(x, y, acc[0]);
        i += 8;
    }
    let sum = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
    let half = _mm_add_ps(_mm256_castps256_ps128(sum), _mm256_extractf128_ps(sum, 1));
    let quad = _mm_add_ps(half, _mm_movehl_ps(half, half));
    let one = _mm_add_ss(quad, _mm_shuffle_ps(quad, quad, 1));
    let mut total = _mm_cvtss_f32(one);
    while i < n {
        total += a[i] * b[i];
        i += 1;
    }
    total
}

/// AVX-512F dot product: four 16-lane accumulators over 64 values a step (384 dimensions are six
/// steps), then 16 at a time, then a masked load of the rest.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dot_avx512(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = a.len().min(b.len());
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let mut acc = [_mm512_setzero_ps(); 4];
    let mut i = 0;
    // SAFETY (all loads): `i + 64 <= n` / `i + 16 <= n` keep every 16-value load within both
    // slices; the masked load reads only the `n - i < 16` values left.
    while i + 64 <= n {
        for (j, acc) in acc.iter_mut().enumerate() {
            let x = unsafe { _mm512_loadu_ps(pa.add(i + 16 * j)) };
            let y = unsafe { _mm512_loadu_ps(pb.add(i + 16 * j)) };
            *acc = _mm512_fmadd_ps(x, y, *acc);
        }
        i += 64;
    }
    while i + 16 <= n {
        let x = unsafe { _mm512_loadu_ps(pa.add(i)) };
        let y = unsafe { _mm512_loadu_ps(pb.add(i)) };
        acc[0] = _mm512_fmadd_ps(x, y, acc[0]);
        i += 16;
    }
    if i < n {
        let mask: __mmask16 = (1u16 << (n - i)) - 1;
        let x = unsafe { _mm512_maskz_loadu_ps(mask, pa.add(i)) };
        let y = unsafe { _mm512_maskz_loadu_ps(mask, pb.add(i)) };
        acc[1] = _mm512_fmadd_ps(x, y, acc[1]);
    }
    let sum = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
    _mm512_reduce_add_ps(sum)
}

/// Dot product over eight independent lanes, which lets the compiler vectorise the loop (a
/// single sequential sum cannot be reordered).
#[inline]
fn dot_portable(a: &[f32], b: &[f32]) -> f32 {
    let (chunks_a, tail_a) = a.as_chunks::<8>();
    let (chunks_b, tail_b) = b.as_chunks::<8>();
    let mut lanes = [0.0f32; 8];
    for (ca, cb) in chunks_a.iter().zip(chunks_b) {
        for ((lane, x), y) in lanes.iter_mut().zip(ca).zip(cb) {
            *lane += x * y;
        }
    }
    let tail: f32 = tail_a.iter().zip(tail_b).map(|(x, y)| x * y).sum();
    lanes.iter().sum::<f32>() + tail
}

/// Deterministic test data shared by the index unit tests (no `rand` dependency needed).
#[cfg(test)]
pub(crate) mod testdata {
    /// SplitMix64: tiny, seeded, good enough for test vectors.
    pub(crate) struct Rng(u64);

    impl Rng {
        pub(crate) fn new(seed: u64) -> Self {
            Rng(seed)
        }

        pub(crate) fn next_u64(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }

        /// Uniform in (0, 1].
        fn uniform(&mut self) -> f64 {
            ((self.next_u64() >> 11) as f64 + 1.0) / (1u64 << 53) as f64
        }

        /// Standard normal (Box–Muller).
        pub(crate) fn normal(&mut self) -> f32 {
            let (u1, u2) = (self.uniform(), self.uniform());
            ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
        }

        /// A random L2-normalised vector.
        pub(crate) fn unit_vector(&mut self, dim: usize) -> Vec<f32> {
            let mut v: Vec<f32> = (0..dim).map(|_| self.normal()).collect();
            let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
            v.iter_mut().for_each(|x| *x /= norm);
            v
        }
    }

    /// `n` random unit vectors of dimension `dim` from `seed`.
    pub(crate) fn unit_vectors(seed: u64, n: usize, dim: usize) -> Vec<Vec<f32>> {
        let mut rng = Rng::new(seed);
        (0..n).map(|_| rng.unit_vector(dim)).collect()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::testdata::unit_vectors;
    use super::*;
    use hnsw_rs::hnsw::Hnsw;

    #[test]
    fn distance_of_identical_unit_vectors_is_clamped_to_zero() {
        for v in unit_vectors(1, 200, 384) {
            let d = DistDotClamped.eval(&v, &v);
            assert!((0.0..1e-5).contains(&d), "{d}");
        }
    }

    #[test]
    fn dot_matches_naive_sum() {
        let vs = unit_vectors(2, 3, 383);
        let naive: f32 = vs[0].iter().zip(&vs[1]).map(|(a, b)| a * b).sum();
        assert!((dot(&vs[0], &vs[1]) - naive).abs() < 1e-5);
        let opposite: Vec<f32> = vs[2].iter().map(|x| -x).collect();
        assert!((DistDotClamped.eval(&vs[2], &opposite) - 2.0).abs() < 1e-5);
    }

    #[test]
    fn dispatched_dot_matches_the_portable_loop_at_every_length() {
        let lens = [
            0, 1, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 100, 127, 128, 129, 384, 385,
        ];
        for len in lens {
            let vs = unit_vectors(len as u64 + 10, 2, len.max(1));
            let (a, b) = (&vs[0][..len], &vs[1][..len]);
            let naive: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
            assert!((dot(a, b) as f64 - naive).abs() < 1e-5, "len {len}");
            assert!(
                (dot_portable(a, b) as f64 - naive).abs() < 1e-5,
                "len {len}"
            );
            // Every kernel this CPU can run, not only the one dispatch picks.
            #[cfg(target_arch = "x86_64")]
            {
                if std::is_x86_feature_detected!("avx512f") {
                    // SAFETY: checked above.
                    let got = unsafe { dot_avx512(a, b) };
                    assert!((got as f64 - naive).abs() < 1e-5, "avx512, len {len}");
                }
                if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                    // SAFETY: checked above.
                    let got = unsafe { dot_avx2(a, b) };
                    assert!((got as f64 - naive).abs() < 1e-5, "avx2, len {len}");
                }
            }
        }
    }

    #[test]
    fn duplicate_vectors_in_hnsw_do_not_panic() {
        let vs = unit_vectors(3, 50, 384);
        let hnsw: Hnsw<f32, DistDotClamped> = Hnsw::new(16, 1000, 16, 100, DistDotClamped);
        for round in 0..3 {
            for (i, v) in vs.iter().enumerate() {
                hnsw.insert_slice((v, round * 1000 + i));
            }
        }
        let found = hnsw.search(&vs[7], 3, 64);
        assert_eq!(found.len(), 3);
        for n in &found {
            assert_eq!(n.d_id % 1000, 7);
            assert!(n.distance >= 0.0 && n.distance < 1e-5);
        }
    }
}
