//! The project's BERT forward on CUDA: the algorithm of [`FastBert`] (packed sequences, no padding,
//! no mask) in half precision on the GPU, through cudarc directly rather than candle's tensors.
//!
//! - Weights and activations are f16; LayerNorm, softmax, pooling and normalisation compute in
//!   f32, and the matmuls accumulate in f32.
//! - Every linear layer is one cuBLASLt matmul with its bias fused as the epilogue, and the
//!   feed-forward's up-projection fuses GELU too (cuBLASLt's GELU is the tanh form; BERT's is erf:
//!   the two differ by under 5e-4, far below f16's rounding of the activations).
//! - Attention is one kernel per layer over (sequence, head) pairs with the softmax in shared
//!   memory (`kernels/bert.cu`); residual + LayerNorm is one kernel; the
//!   embedding sum + LayerNorm is one kernel; mean pooling + L2 normalisation is one kernel.
//! - A call uploads its token ids, positions and sequence offsets in one copy, runs its packed
//!   passes, and downloads all pooled vectors in one copy. Device buffers are kept and only grown.
//! - The matmuls run over the pass's token count rounded up to a bucket ([`matmul_rows`]): a
//!   cuBLASLt heuristic query for a shape not seen before costs ~0.4 ms on the host, 24 of them a
//!   pass, and real batches have a new token count nearly every time (measured on an H200: a
//!   10 ms floor under every mixed-length batch, against 0.57 ms for 32 fixed-length
//!   sequences). The rows past the tokens hold stale values; a matmul's output row depends on
//!   its input row only, and no kernel reads those rows back.
//!
//! Knows nothing of tokenisation. Built only with the `cuda` feature; the kernels' PTX is compiled
//! by build.rs from `kernels/bert.cu`.

use std::sync::Arc;

use candle_core::cuda_backend::cudarc::cublaslt::{Activation, CudaBlasLT, Matmul, MatmulConfig};
use candle_core::cuda_backend::cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::cudarc::nvrtc::Ptx;
use half::f16;

use super::EmbedError;
use super::fast_bert::{Dims, FastBert, check_sequences, chunks, matmul_rows};

/// The kernels of `kernels/bert.cu`, compiled to PTX by build.rs.
const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/bert.ptx"));

/// Longest sequence the attention kernel takes (its shared-memory tiles), = the embedder's
/// truncation length.
pub const MAX_SEQ: usize = 256;

/// Head width the attention kernel is written for (one dimension per lane of a warp).
const HEAD_DIM: usize = 32;

/// Widest hidden size of the warp-per-row kernels (32 lanes × 24 values).
const MAX_HIDDEN: usize = 32 * 24;

/// Most tokens in one packed pass: bounds the activations (~8 KiB per token for MiniLM, 256 MiB at
/// most) while keeping every matmul large enough to fill the GPU.
const PASS_TOKENS: usize = 32 * 1024;

/// Warps per block of the warp-per-row kernels, and of the attention kernel (must match
/// `ATT_WARPS` in the kernel source).
const ROW_WARPS: u32 = 8;
const ATT_WARPS: u32 = 4;

fn err(what: &str) -> impl Fn(&dyn std::fmt::Debug) -> EmbedError + '_ {
    move |e| EmbedError::Inference(format!("cuda {what}: {e:?}"))
}

/// LayerNorm scale and shift on the device.
struct DevNorm {
    gamma: CudaSlice<f16>,
    beta: CudaSlice<f16>,
}

/// One encoder layer on the device; matrices are PyTorch's `[out, in]` row-major.
struct DevLayer {
    qkv_w: CudaSlice<f16>,
    qkv_b: CudaSlice<f16>,
    out_w: CudaSlice<f16>,
    out_b: CudaSlice<f16>,
    attn_norm: DevNorm,
    up_w: CudaSlice<f16>,
    up_b: CudaSlice<f16>,
    down_w: CudaSlice<f16>,
    down_b: CudaSlice<f16>,
    ffn_norm: DevNorm,
}

/// The kernels of `kernels/bert.cu`.
struct Kernels {
    embed: CudaFunction,
    attention: CudaFunction,
    residual: CudaFunction,
    pool: CudaFunction,
}

/// Device buffers reused across calls, grown to the largest call seen.
struct Scratch {
    /// Token ids, positions and per-pass sequence offsets of one call (one upload).
    meta: CudaSlice<u32>,
    /// Hidden states `[tokens, hidden]`.
    x: CudaSlice<f16>,
    /// Fused query/key/value projection `[tokens, 3 hidden]`.
    qkv: CudaSlice<f16>,
    /// Attention context `[tokens, hidden]`.
    ctx: CudaSlice<f16>,
    /// Projection outputs before residual + LayerNorm `[tokens, hidden]`.
    tmp: CudaSlice<f16>,
    /// Feed-forward activations `[tokens, intermediate]`.
    inter: CudaSlice<f16>,
    /// Pooled, normalised vectors of one call `[sequences, hidden]` (one download).
    out: CudaSlice<f32>,
}

/// A BERT encoder with mean pooling on one CUDA device; see the module docs.
pub struct CudaBert {
    dims: Dims,
    stream: Arc<CudaStream>,
    blas: CudaBlasLT,
    kernels: Kernels,
    word: CudaSlice<f16>,
    pos_type: CudaSlice<f16>,
    embed_norm: DevNorm,
    layers: Vec<DevLayer>,
    scratch: Scratch,
}

impl CudaBert {
    /// Whether the kernels implement a model of these shapes (heads of 32, width a multiple of 32
    /// up to 768); [`FastBert::supports`] covers the rest of the config.
    pub fn supports_dims(hidden: usize, heads: usize) -> bool {
        heads > 0 && hidden == heads * HEAD_DIM && hidden.is_multiple_of(32) && hidden <= MAX_HIDDEN
    }

    /// Uploads `host`'s weights to CUDA device `ordinal` as f16 and loads the kernels.
    pub fn from_host(host: &FastBert, ordinal: usize) -> Result<Self, EmbedError> {
        let dims = host.dims;
        if !Self::supports_dims(dims.hidden, dims.heads) {
            return Err(EmbedError::Model(format!(
                "the CUDA forward takes heads of {HEAD_DIM} and a width up to {MAX_HIDDEN}, not {} \
                 heads over {}",
                dims.heads, dims.hidden
            )));
        }
        let model = |e: &dyn std::fmt::Debug| EmbedError::Model(format!("cuda:{ordinal}: {e:?}"));
        let ctx = CudaContext::new(ordinal).map_err(|e| model(&e))?;
        // SAFETY: every buffer of this model is used on its one stream only, in issue order, so
        // cross-stream event tracking has nothing to order.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.default_stream();
        let module = ctx.load_module(Ptx::from_src(PTX)).map_err(|e| model(&e))?;
        let function = |name: &str| module.load_function(name).map_err(|e| model(&e));
        let kernels = Kernels {
            embed: function("embed_layer_norm")?,
            attention: function("attention")?,
            residual: function("residual_layer_norm")?,
            pool: function("mean_pool_normalise")?,
        };
        let blas = CudaBlasLT::new(stream.clone()).map_err(|e| model(&e))?;
        let up = |v: &[f32]| -> Result<CudaSlice<f16>, EmbedError> {
            let half: Vec<f16> = v.iter().map(|&x| f16::from_f32(x)).collect();
            stream.clone_htod(&half).map_err(|e| model(&e))
        };
        let norm = |n: &super::fast_bert::Norm| -> Result<DevNorm, EmbedError> {
            Ok(DevNorm {
                gamma: up(&n.gamma)?,
                beta: up(&n.beta)?,
            })
        };
        let mut layers = Vec::with_capacity(host.layers.len());
        for l in &host.layers {
            layers.push(DevLayer {
                qkv_w: up(&l.qkv_w.w)?,
                qkv_b: up(&l.qkv_b)?,
                out_w: up(&l.out_w.w)?,
                out_b: up(&l.out_b)?,
                attn_norm: norm(&l.attn_norm)?,
                up_w: up(&l.up_w.w)?,
                up_b: up(&l.up_b)?,
                down_w: up(&l.down_w.w)?,
                down_b: up(&l.down_b)?,
                ffn_norm: norm(&l.ffn_norm)?,
            });
        }
        let one = |n: usize| -> Result<CudaSlice<f16>, EmbedError> {
            stream.alloc_zeros::<f16>(n.max(1)).map_err(|e| model(&e))
        };
        let scratch = Scratch {
            meta: stream.alloc_zeros::<u32>(1).map_err(|e| model(&e))?,
            x: one(1)?,
            qkv: one(1)?,
            ctx: one(1)?,
            tmp: one(1)?,
            inter: one(1)?,
            out: stream.alloc_zeros::<f32>(1).map_err(|e| model(&e))?,
        };
        Ok(Self {
            dims,
            word: up(&host.word)?,
            pos_type: up(&host.pos_type)?,
            embed_norm: norm(&host.embed_norm)?,
            layers,
            kernels,
            blas,
            stream,
            scratch,
        })
    }

    /// Embeds token-id sequences into mean-pooled, L2-normalised vectors (see the module docs). A
    /// sequence longer than [`MAX_SEQ`] or with an id past the vocabulary is an
    /// [`EmbedError::Inference`]; an empty one gives a zero vector.
    pub fn embed(&mut self, seqs: &[&[u32]]) -> Result<Vec<Vec<f32>>, EmbedError> {
        check_sequences(seqs, MAX_SEQ.min(self.dims.positions), self.dims.vocab)?;
        if seqs.is_empty() {
            return Ok(Vec::new());
        }
        let passes = chunks(seqs, PASS_TOKENS);
        let total: usize = seqs.iter().map(|s| s.len()).sum();
        // meta = ids (all tokens) | positions (all tokens) | per pass: offsets (sequences + 1).
        let mut meta = Vec::with_capacity(2 * total + seqs.len() + passes.len());
        meta.extend(seqs.iter().flat_map(|s| s.iter().copied()));
        meta.extend(seqs.iter().flat_map(|s| 0..s.len() as u32));
        for pass in &passes {
            let mut offset = 0u32;
            meta.push(0);
            for s in pass.iter() {
                offset += s.len() as u32;
                meta.push(offset);
            }
        }
        let largest = passes
            .iter()
            .map(|p| matmul_rows(p.iter().map(|s| s.len()).sum::<usize>()))
            .max()
            .unwrap_or(0);
        self.reserve(meta.len(), largest, seqs.len())?;
        self.stream
            .memcpy_htod(&meta, &mut self.scratch.meta)
            .map_err(|e| err("upload")(&e))?;

        let (mut token, mut seq, mut offsets_at) = (0usize, 0usize, 2 * total);
        for pass in &passes {
            let tokens: usize = pass.iter().map(|s| s.len()).sum();
            self.pass(token, total, offsets_at, pass.len(), tokens, seq)?;
            token += tokens;
            seq += pass.len();
            offsets_at += pass.len() + 1;
        }
        let h = self.dims.hidden;
        let mut flat = vec![0f32; seqs.len() * h];
        self.stream
            .memcpy_dtoh(&self.scratch.out.slice(..seqs.len() * h), &mut flat)
            .map_err(|e| err("download")(&e))?;
        // Surfaces any error of this call's kernels here rather than in the next call.
        self.stream.synchronize().map_err(|e| err("stream")(&e))?;
        Ok(flat.chunks_exact(h).map(<[f32]>::to_vec).collect())
    }

    /// Grows the scratch buffers to hold `meta` u32s, a pass of `tokens` matmul rows and `seqs`
    /// pooled vectors.
    fn reserve(&mut self, meta: usize, tokens: usize, seqs: usize) -> Result<(), EmbedError> {
        let d = self.dims;
        let s = &mut self.scratch;
        let stream = &self.stream;
        let alloc = err("alloc");
        fn grow<T: candle_core::cuda_backend::cudarc::driver::DeviceRepr>(
            stream: &Arc<CudaStream>,
            buf: &mut CudaSlice<T>,
            len: usize,
        ) -> Result<(), candle_core::cuda_backend::cudarc::driver::DriverError> {
            if buf.len() < len {
                // SAFETY: every kernel writes the part of a buffer it later reads.
                *buf = unsafe { stream.alloc::<T>(len + len / 4) }?;
            }
            Ok(())
        }
        grow(stream, &mut s.meta, meta).map_err(|e| alloc(&e))?;
        grow(stream, &mut s.x, tokens * d.hidden).map_err(|e| alloc(&e))?;
        grow(stream, &mut s.qkv, tokens * 3 * d.hidden).map_err(|e| alloc(&e))?;
        grow(stream, &mut s.ctx, tokens * d.hidden).map_err(|e| alloc(&e))?;
        grow(stream, &mut s.tmp, tokens * d.hidden).map_err(|e| alloc(&e))?;
        grow(stream, &mut s.inter, tokens * d.inter).map_err(|e| alloc(&e))?;
        grow(stream, &mut s.out, seqs * d.hidden).map_err(|e| alloc(&e))?;
        Ok(())
    }

    /// One packed pass: `n` sequences of `tokens` tokens in all, whose ids start at `meta[token]`,
    /// positions at `meta[total + token]` and offsets at `meta[offsets_at]`; pooled vectors go to
    /// rows `seq..seq + n` of the output.
    fn pass(
        &mut self,
        token: usize,
        total: usize,
        offsets_at: usize,
        n: usize,
        tokens: usize,
        seq: usize,
    ) -> Result<(), EmbedError> {
        let d = self.dims;
        let (h, i) = (d.hidden, d.inter);
        let m = matmul_rows(tokens);
        let s = &mut self.scratch;
        let ids = s.meta.slice(token..token + tokens);
        let pos = s.meta.slice(total + token..total + token + tokens);
        let offsets = s.meta.slice(offsets_at..offsets_at + n + 1);
        let (tokens_i, hidden_i) = (tokens as i32, h as i32);
        let rows = LaunchConfig {
            grid_dim: ((tokens as u32).div_ceil(ROW_WARPS), 1, 1),
            block_dim: (32 * ROW_WARPS, 1, 1),
            shared_mem_bytes: 0,
        };
        let launch = err("kernel");
        if tokens == 0 {
            // Only empty sequences: nothing to run but the pooling, which writes zeros.
            return self.pool(offsets_at, n, seq);
        }

        let mut b = self.stream.launch_builder(&self.kernels.embed);
        b.arg(&ids).arg(&pos).arg(&tokens_i).arg(&hidden_i);
        b.arg(&self.word).arg(&self.pos_type);
        b.arg(&self.embed_norm.gamma)
            .arg(&self.embed_norm.beta)
            .arg(&d.eps);
        b.arg(&mut s.x);
        // SAFETY: the arguments match the kernel's signature; ids < vocab and positions < the
        // table's rows were checked, and every buffer holds `tokens` rows.
        unsafe { b.launch(rows) }.map_err(|e| launch(&e))?;

        let scale = 1.0 / (d.head() as f32).sqrt();
        let attention = LaunchConfig {
            grid_dim: (n as u32, d.heads as u32, 1),
            block_dim: (32 * ATT_WARPS, 1, 1),
            shared_mem_bytes: 0,
        };
        for l in &self.layers {
            linear(
                &self.blas,
                &l.qkv_w,
                &l.qkv_b,
                &s.x,
                &mut s.qkv,
                m,
                h,
                3 * h,
                false,
            )?;
            let mut b = self.stream.launch_builder(&self.kernels.attention);
            b.arg(&s.qkv)
                .arg(&offsets)
                .arg(&hidden_i)
                .arg(&scale)
                .arg(&mut s.ctx);
            // SAFETY: qkv holds `tokens` rows of 3 hidden, the offsets are within them, and no
            // sequence is longer than MAX_SEQ (checked).
            unsafe { b.launch(attention) }.map_err(|e| launch(&e))?;
            linear(
                &self.blas, &l.out_w, &l.out_b, &s.ctx, &mut s.tmp, m, h, h, false,
            )?;
            residual_norm(
                &self.stream,
                &self.kernels,
                &s.tmp,
                &l.attn_norm,
                d,
                tokens,
                &mut s.x,
                rows,
            )?;
            linear(
                &self.blas,
                &l.up_w,
                &l.up_b,
                &s.x,
                &mut s.inter,
                m,
                h,
                i,
                true,
            )?;
            linear(
                &self.blas, &l.down_w, &l.down_b, &s.inter, &mut s.tmp, m, i, h, false,
            )?;
            residual_norm(
                &self.stream,
                &self.kernels,
                &s.tmp,
                &l.ffn_norm,
                d,
                tokens,
                &mut s.x,
                rows,
            )?;
        }

        self.pool(offsets_at, n, seq)
    }

    /// Mean-pools and normalises the pass's `n` sequences (offsets at `meta[offsets_at]`) from
    /// the hidden states into rows `seq..seq + n` of the output.
    fn pool(&mut self, offsets_at: usize, n: usize, seq: usize) -> Result<(), EmbedError> {
        let h = self.dims.hidden;
        let s = &mut self.scratch;
        let offsets = s.meta.slice(offsets_at..offsets_at + n + 1);
        let mut out = s.out.slice_mut(seq * h..(seq + n) * h);
        let (n_i, hidden_i) = (n as i32, h as i32);
        let pool = LaunchConfig {
            grid_dim: ((n as u32).div_ceil(ROW_WARPS), 1, 1),
            block_dim: (32 * ROW_WARPS, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = self.stream.launch_builder(&self.kernels.pool);
        b.arg(&s.x)
            .arg(&offsets)
            .arg(&n_i)
            .arg(&hidden_i)
            .arg(&mut out);
        // SAFETY: x holds the pass's rows (none is read for an empty sequence), out has n rows
        // from `seq`.
        unsafe { b.launch(pool) }.map_err(|e| err("kernel")(&e))?;
        Ok(())
    }
}

/// `out[tokens, n] = x[tokens, k] · wᵀ + bias` (then GELU when `gelu`), `w` being `[n, k]`
/// row-major: one cuBLASLt call with the bias (and activation) as its epilogue. In cuBLAS's
/// column-major terms that is `outᵀ (n × tokens) = w (n × k, stored transposed) · xᵀ`.
#[allow(clippy::too_many_arguments)]
fn linear(
    blas: &CudaBlasLT,
    w: &CudaSlice<f16>,
    bias: &CudaSlice<f16>,
    x: &CudaSlice<f16>,
    out: &mut CudaSlice<f16>,
    tokens: usize,
    k: usize,
    n: usize,
    gelu: bool,
) -> Result<(), EmbedError> {
    let cfg = MatmulConfig {
        transa: true,
        transb: false,
        transc: false,
        m: n as u64,
        n: tokens as u64,
        k: k as u64,
        alpha: 1.0,
        lda: k as i64,
        ldb: k as i64,
        beta: 0.0,
        ldc: n as i64,
        stride_a: None,
        stride_b: None,
        stride_c: None,
        stride_bias: None,
        batch_size: None,
    };
    let (w, bias, x) = (w.slice(..), bias.slice(..), x.slice(..tokens * k));
    let mut out = out.slice_mut(..tokens * n);
    let act = gelu.then_some(Activation::Gelu);
    // SAFETY: w is n × k, x holds tokens × k, out holds tokens × n, bias n: the shapes given.
    unsafe { blas.matmul(cfg, &w, &x, &mut out, Some(&bias), act.as_ref()) }
        .map_err(|e| err("matmul")(&e))
}

/// `x = LayerNorm(y + x)` over `tokens` rows.
#[allow(clippy::too_many_arguments)]
fn residual_norm(
    stream: &Arc<CudaStream>,
    kernels: &Kernels,
    y: &CudaSlice<f16>,
    norm: &DevNorm,
    d: Dims,
    tokens: usize,
    x: &mut CudaSlice<f16>,
    rows: LaunchConfig,
) -> Result<(), EmbedError> {
    let (tokens_i, hidden_i) = (tokens as i32, d.hidden as i32);
    let mut b = stream.launch_builder(&kernels.residual);
    b.arg(y).arg(&tokens_i).arg(&hidden_i);
    b.arg(&norm.gamma).arg(&norm.beta).arg(&d.eps).arg(x);
    // SAFETY: x and y hold `tokens` rows of `hidden`, gamma and beta `hidden`.
    unsafe { b.launch(rows) }
        .map(drop)
        .map_err(|e| err("kernel")(&e))
}
