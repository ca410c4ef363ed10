//! Row kernels of the fused BERT forward ([`super::fast_bert`]): bias + GELU, residual + bias +
//! LayerNorm, softmax, each one pass over a row that stays in L1. Plain Rust written so LLVM
//! vectorises it (8-lane accumulators, branch-free polynomials); on x86-64 every kernel is compiled
//! twice and the AVX2+FMA copy is picked at run time, since release builds target baseline SSE2.
//! Owns no state and allocates nothing.

/// Runs `$body` through a copy compiled with AVX2 and FMA when the CPU has them.
macro_rules! multiversion {
    ($(#[$doc:meta])* pub fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $body:block) => {
        $(#[$doc])*
        pub fn $name($($arg: $ty),*) {
            #[inline(always)]
            fn body($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                fn avx2($($arg: $ty),*) {
                    body($($arg),*)
                }
                if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU supports the features `avx2` was compiled with.
                    return unsafe { avx2($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
}

/// Lanes of the accumulators in reductions (one AVX register of f32).
const LANES: usize = 8;

multiversion! {
    /// `rows[i][j] += bias[j]` for every row of `bias.len()` columns.
    pub fn add_bias(rows: &mut [f32], bias: &[f32]) {
        for row in rows.chunks_exact_mut(bias.len()) {
            for (x, b) in row.iter_mut().zip(bias) {
                *x += b;
            }
        }
    }
}

multiversion! {
    /// `rows[i][j] = gelu(rows[i][j] + bias[j])`, GELU with erf (BERT's `gelu`).
    pub fn add_bias_gelu(rows: &mut [f32], bias: &[f32]) {
        for row in rows.chunks_exact_mut(bias.len()) {
            for (x, b) in row.iter_mut().zip(bias) {
                let v = *x + b;
                *x = 0.5 * v * (1.0 + erf(v * std::f32::consts::FRAC_1_SQRT_2));
            }
        }
    }
}

multiversion! {
    /// For each row: `x = LayerNorm(x + a + b) * gamma + beta` (`a` one row per row of `x`, `b`
    /// one row for all), two-pass mean and variance like candle and PyTorch.
    pub fn add_layer_norm(
        x: &mut [f32],
        a: &[f32],
        b: &[f32],
        gamma: &[f32],
        beta: &[f32],
        eps: f32,
    ) {
        let n = b.len();
        for (row, add) in x.chunks_exact_mut(n).zip(a.chunks_exact(n)) {
            for ((v, p), q) in row.iter_mut().zip(add).zip(b) {
                *v += p + q;
            }
            let mean = sum(row) / n as f32;
            let var = sum_sq_dev(row, mean) / n as f32;
            let inv = 1.0 / (var + eps).sqrt();
            for ((v, g), h) in row.iter_mut().zip(gamma).zip(beta) {
                *v = (*v - mean) * inv * g + h;
            }
        }
    }
}

multiversion! {
    /// In-place softmax of each row of `width` values: subtract the max, exponentiate, normalise.
    pub fn softmax_rows(rows: &mut [f32], width: usize) {
        for row in rows.chunks_exact_mut(width.max(1)) {
            let max = max(row);
            let mut acc = [0.0f32; LANES];
            let mut chunks = row.chunks_exact_mut(LANES);
            for chunk in &mut chunks {
                for (v, s) in chunk.iter_mut().zip(&mut acc) {
                    *v = exp(*v - max);
                    *s += *v;
                }
            }
            let mut total = 0.0;
            for v in chunks.into_remainder() {
                *v = exp(*v - max);
                total += *v;
            }
            let inv = 1.0 / (acc.iter().sum::<f32>() + total);
            for v in row.iter_mut() {
                *v *= inv;
            }
        }
    }
}

/// Sum with [`LANES`] partial sums (vectorisable, unlike a sequential fold).
#[inline(always)]
fn sum(row: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let chunks = row.chunks_exact(LANES);
    let tail: f32 = chunks.remainder().iter().sum();
    for chunk in chunks {
        for (s, v) in acc.iter_mut().zip(chunk) {
            *s += v;
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Sum of squared deviations from `mean`, like [`sum`].
#[inline(always)]
fn sum_sq_dev(row: &[f32], mean: f32) -> f32 {
    let mut acc = [0.0f32; LANES];
    let chunks = row.chunks_exact(LANES);
    let tail: f32 = chunks
        .remainder()
        .iter()
        .map(|v| (v - mean) * (v - mean))
        .sum();
    for chunk in chunks {
        for (s, v) in acc.iter_mut().zip(chunk) {
            *s += (v - mean) * (v - mean);
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Largest value (`-inf` for an empty row).
#[inline(always)]
fn max(row: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = row.chunks_exact(LANES);
    let tail = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    for chunk in chunks {
        for (m, &v) in acc.iter_mut().zip(chunk) {
            *m = if v > *m { v } else { *m };
        }
    }
    acc.iter().fold(tail, |m, &v| m.max(v))
}

/// `e^x` in f32, Cephes' `expf` (range reduction to `[-ln2/2, ln2/2]`, degree-6 polynomial),
/// within 2 ulp; inputs are clamped to the finite range, so no NaN from ±inf.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let x = x.clamp(-87.3, 88.37);
    let n = (x * std::f32::consts::LOG2_E + 0.5).floor();
    let r = x - n * 0.693_359_4 + n * 2.121_944_4e-4;
    let p = 1.987_569_1e-4;
    let p = p * r + 1.398_2e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    y * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// `erf(x)` in f32, Eigen's rational approximation on `[-4, 4]` (±1 beyond), within ~1e-7.
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let p = -2.726_142_3e-10;
    let p = p * x2 + 2.770_681_4e-8;
    let p = p * x2 - 2.101_024e-6;
    let p = p * x2 - 5.692_506_4e-5;
    let p = p * x2 - 7.349_906_3e-4;
    let p = p * x2 - 2.954_6e-3;
    let p = p * x2 - 1.609_603_3e-2;
    let q = -1.456_607_2e-5;
    let q = q * x2 - 2.133_740_6e-4;
    let q = q * x2 - 1.682_827e-3;
    let q = q * x2 - 7.373_329e-3;
    let q = q * x2 - 1.426_473_9e-2;
    x * p / q
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_and_erf_are_accurate() {
        let mut worst_exp = 0.0f64;
        let mut worst_erf = 0.0f64;
        for i in -20_000..=20_000 {
            let x = i as f32 * 0.001;
            let want = (x as f64).exp();
            worst_exp = worst_exp.max(((exp(x) as f64) - want).abs() / want);
            let want = candle_core::cpu::erf::erf_f64(x as f64);
            worst_erf = worst_erf.max(((erf(x) as f64) - want).abs());
        }
        assert!(worst_exp < 3e-7, "exp relative error {worst_exp}");
        assert!(worst_erf < 5e-7, "erf absolute error {worst_erf}");
        assert_eq!(exp(f32::NEG_INFINITY).min(1e-30), exp(-1000.0).min(1e-30));
        assert!(exp(f32::INFINITY).is_finite());
        assert!((erf(100.0) - 1.0).abs() < 1e-6 && (erf(-100.0) + 1.0).abs() < 1e-6);
    }

    #[test]
    fn softmax_and_layer_norm_match_naive() {
        // Widths with and without a remainder past the 8 lanes.
        for width in [1, 5, 8, 13, 40] {
            let row: Vec<f32> = (0..width)
                .map(|i| ((i * 7 % 11) as f32) * 0.9 - 3.0)
                .collect();
            let mut got = row.clone();
            softmax_rows(&mut got, width);
            let m = row.iter().cloned().fold(f32::MIN, f32::max);
            let total: f32 = row.iter().map(|v| (v - m).exp()).sum();
            for (g, v) in got.iter().zip(&row) {
                assert!((g - (v - m).exp() / total).abs() < 1e-6);
            }

            let a: Vec<f32> = (0..width).map(|i| i as f32 * 0.1).collect();
            let b: Vec<f32> = (0..width).map(|i| 1.0 - i as f32 * 0.05).collect();
            let gamma: Vec<f32> = (0..width).map(|i| 1.0 + i as f32 * 0.01).collect();
            let beta: Vec<f32> = (0..width).map(|i| i as f32 * -0.02).collect();
            let mut got = row.clone();
            add_layer_norm(&mut got, &a, &b, &gamma, &beta, 1e-12);
            let sum: Vec<f32> = (0..width).map(|i| row[i] + a[i] + b[i]).collect();
            let mean = sum.iter().sum::<f32>() / width as f32;
            let var = sum.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / width as f32;
            for i in 0..width {
                let want = (sum[i] - mean) / (var + 1e-12).sqrt() * gamma[i] + beta[i];
                assert!((got[i] - want).abs() < 1e-4, "width {width} col {i}");
            }
        }
        softmax_rows(&mut [], 0);
    }
}
