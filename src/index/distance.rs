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

/// Dot product over eight independent lanes, which lets the compiler vectorise the loop (a
/// single sequential sum cannot be reordered).
#[inline]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
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
