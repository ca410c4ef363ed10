//! BERT sentence embeddings (forward, mean pooling, L2 normalisation) in plain Rust f32 on the
//! CPU, faster than candle-transformers' `BertModel` with the same outputs (cosine ≥ 0.99999).
//!
//! Sequences are *packed*: a pass concatenates the token rows of all its sequences with no
//! padding, so the token-wise work (fused QKV projection, output projection, feed-forward,
//! LayerNorms) wastes nothing; attention runs per (sequence, head) over that sequence's own tokens,
//! so no mask is needed. Matmuls of large passes go through `gemm` reading the weights in place,
//! those of small passes (one short request) through weights packed once at load
//! ([`super::packed_gemm`]); biases, GELU, residuals and LayerNorms are fused into single passes
//! ([`super::fast_kernels`]); scratch buffers live across calls. Knows nothing of tokenisation.

use std::path::Path;

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device};
use candle_transformers::models::bert::{Config, HiddenAct};
use gemm::Parallelism;
use rayon::prelude::*;

use super::fast_kernels::{add_bias, add_bias_gelu, add_layer_norm, softmax_rows};
use super::packed_gemm::Packed;
use super::{EmbedError, SharedMut};
use crate::matmul::matmul;

/// Most tokens (rows) in one packed pass: bounds the scratch memory (about 15 KiB per token for
/// MiniLM, so ~60 MiB at most) while keeping the matmuls large enough to run at full speed.
pub const PASS_TOKENS: usize = 4096;

/// Most tokens in a pass that multiplies by the packed weights ([`super::packed_gemm`]) rather than
/// through `gemm`: below this, packing the operands on every call costs `gemm` more than its cache
/// blocking saves (measured crossover 256–768 rows on AVX-512, ~256 on AVX2).
const SMALL_PASS_ROWS: usize = 256;

/// Rows per rayon task in the elementwise passes.
const ROWS_PER_TASK: usize = 16;

/// Tokens per lane when a large pass is split into independent single-threaded lanes (see
/// [`FastBert::embed`]): enough rows for `gemm` to run at full single-core speed, small enough
/// that work stealing evens out the lanes.
const LANE_TOKENS: usize = 768;

/// The model's shapes.
#[derive(Debug, Clone, Copy)]
pub(super) struct Dims {
    pub(super) hidden: usize,
    pub(super) heads: usize,
    pub(super) inter: usize,
    pub(super) vocab: usize,
    pub(super) positions: usize,
    pub(super) eps: f32,
}

impl Dims {
    pub(super) fn head(&self) -> usize {
        self.hidden / self.heads
    }
}

/// LayerNorm scale and shift.
pub(super) struct Norm {
    pub(super) gamma: Vec<f32>,
    pub(super) beta: Vec<f32>,
}

/// A weight matrix, PyTorch's `[out, in]` row-major, which `gemm` reads as the transposed right
/// operand (measured as fast as or faster than pre-transposed `[in, out]`), plus, once
/// [`FastBert::with_packed_weights`] has run and the CPU has its kernels, a copy packed for
/// [`super::packed_gemm`], used by passes of at most [`SMALL_PASS_ROWS`] tokens.
pub(super) struct Weight {
    pub(super) w: Vec<f32>,
    packed: Option<Packed>,
    /// Output features (rows of `w`).
    n: usize,
    /// Input features (columns of `w`).
    k: usize,
}

impl Weight {
    fn new(w: Vec<f32>, n: usize, k: usize) -> Self {
        Self {
            w,
            packed: None,
            n,
            k,
        }
    }

    fn pack(&mut self) {
        self.packed = Packed::new(&self.w, self.n, self.k);
    }

    /// `dst[m×n] = a[m×k] · wᵀ` (row-major, contiguous) on `threads` threads.
    fn matmul(&self, dst: &mut [f32], a: &[f32], m: usize, threads: usize) {
        match &self.packed {
            Some(p) if m <= SMALL_PASS_ROWS => p.matmul(dst, a, m, threads),
            _ => matmul(dst, a, &self.w, m, self.k, self.n, threads),
        }
    }
}

/// One encoder layer.
pub(super) struct Layer {
    pub(super) qkv_w: Weight,
    pub(super) qkv_b: Vec<f32>,
    pub(super) out_w: Weight,
    pub(super) out_b: Vec<f32>,
    pub(super) attn_norm: Norm,
    pub(super) up_w: Weight,
    pub(super) up_b: Vec<f32>,
    pub(super) down_w: Weight,
    pub(super) down_b: Vec<f32>,
    pub(super) ffn_norm: Norm,
}

/// Buffers reused across passes (grown, never shrunk below the largest pass seen).
#[derive(Default)]
struct Scratch {
    x: Vec<f32>,
    qkv: Vec<f32>,
    ctx: Vec<f32>,
    tmp: Vec<f32>,
    inter: Vec<f32>,
    scores: Vec<f32>,
}

/// A BERT encoder with mean pooling on the CPU; see the module docs.
pub struct FastBert {
    pub(super) dims: Dims,
    pub(super) word: Vec<f32>,
    /// Position embeddings with token type 0's embedding already added, `[positions, hidden]`.
    pub(super) pos_type: Vec<f32>,
    zeros: Vec<f32>,
    pub(super) embed_norm: Norm,
    pub(super) layers: Vec<Layer>,
    /// Scratch buffers, one per pass running at once (lanes run concurrently).
    scratch: std::sync::Mutex<Vec<Scratch>>,
}

/// Reads one tensor by its name (without any `bert.` prefix) as f32 with its shape.
pub type TensorSource<'a> = dyn FnMut(&str) -> Result<(Vec<f32>, Vec<usize>), EmbedError> + 'a;

/// Reads one tensor by name, checked against the expected shape.
type ShapedSource<'a> = dyn FnMut(&str, &[usize]) -> Result<Vec<f32>, EmbedError> + 'a;

impl FastBert {
    /// Adds a copy of every weight packed for the CPU's small-pass kernels (about the model's
    /// size again: 42 MB for MiniLM), so that passes of at most [`SMALL_PASS_ROWS`] tokens skip
    /// gemm's per-call packing. For a model that runs here; one that only feeds the GPU's
    /// upload does without. A CPU without AVX2 gets no copy and stays on gemm.
    pub fn with_packed_weights(mut self) -> Self {
        for l in &mut self.layers {
            for w in [&mut l.qkv_w, &mut l.out_w, &mut l.up_w, &mut l.down_w] {
                w.pack();
            }
        }
        self
    }

    /// Whether this forward implements `config` (GELU with erf, heads dividing the width).
    pub fn supports(config: &Config) -> bool {
        config.hidden_act == HiddenAct::Gelu
            && config.num_attention_heads > 0
            && config
                .hidden_size
                .is_multiple_of(config.num_attention_heads)
    }

    /// Loads the weights from a safetensors file (names as in candle-transformers' BERT, with or
    /// without a `bert.`/`{model_type}.` prefix, LayerNorm as `weight/bias` or `gamma/beta`).
    pub fn load(weights: &Path, config: &Config) -> Result<Self, EmbedError> {
        let bad =
            |e: &dyn std::fmt::Display| EmbedError::Model(format!("{}: {e}", weights.display()));
        // SAFETY: the weights file is mapped read-only and copied out before this returns.
        let st = unsafe { MmapedSafetensors::new(weights) }.map_err(|e| bad(&e))?;
        let mut prefixes = vec![String::new(), "bert.".to_owned()];
        prefixes.extend(config.model_type.as_ref().map(|t| format!("{t}.")));
        let prefix = prefixes
            .into_iter()
            .find(|p| {
                st.get(&format!("{p}embeddings.word_embeddings.weight"))
                    .is_ok()
            })
            .ok_or_else(|| bad(&"no embeddings.word_embeddings.weight tensor"))?;
        let mut read = |name: &str| {
            let mut full = format!("{prefix}{name}");
            if st.get(&full).is_err() {
                if let Some(stem) = full.strip_suffix(".LayerNorm.weight") {
                    full = format!("{stem}.LayerNorm.gamma");
                } else if let Some(stem) = full.strip_suffix(".LayerNorm.bias") {
                    full = format!("{stem}.LayerNorm.beta");
                }
            }
            let t = st
                .load(&full, &Device::Cpu)
                .map_err(|e| bad(&format!("{full}: {e}")))?;
            let shape = t.dims().to_vec();
            let data = t
                .to_dtype(DType::F32)
                .and_then(|t| t.flatten_all())
                .and_then(|t| t.to_vec1::<f32>())
                .map_err(|e| bad(&format!("{full}: {e}")))?;
            Ok((data, shape))
        };
        Self::from_tensors(config, &mut read)
    }

    /// Builds the model from tensors named as in [`FastBert::load`] (without prefix), checking
    /// every shape against `config`.
    pub fn from_tensors(config: &Config, read: &mut TensorSource<'_>) -> Result<Self, EmbedError> {
        if !Self::supports(config) {
            return Err(EmbedError::Model(format!(
                "fused BERT forward supports gelu with heads dividing the width, not {:?} with {} \
                 heads of {}",
                config.hidden_act, config.num_attention_heads, config.hidden_size
            )));
        }
        let dims = Dims {
            hidden: config.hidden_size,
            heads: config.num_attention_heads,
            inter: config.intermediate_size,
            vocab: config.vocab_size,
            positions: config.max_position_embeddings,
            eps: config.layer_norm_eps as f32,
        };
        let (h, i) = (dims.hidden, dims.inter);
        let mut get = |name: &str, shape: &[usize]| -> Result<Vec<f32>, EmbedError> {
            let (data, got) = read(name)?;
            if got != shape || data.len() != shape.iter().product::<usize>() {
                return Err(EmbedError::Model(format!(
                    "{name}: shape {got:?}, expected {shape:?}"
                )));
            }
            Ok(data)
        };
        let norm = |get: &mut ShapedSource<'_>, stem: &str| -> Result<Norm, EmbedError> {
            Ok(Norm {
                gamma: get(&format!("{stem}.LayerNorm.weight"), &[h])?,
                beta: get(&format!("{stem}.LayerNorm.bias"), &[h])?,
            })
        };
        let embed_norm = norm(&mut get, "embeddings")?;
        let word = get("embeddings.word_embeddings.weight", &[dims.vocab, h])?;
        let mut pos_type = get(
            "embeddings.position_embeddings.weight",
            &[dims.positions, h],
        )?;
        let types = get(
            "embeddings.token_type_embeddings.weight",
            &[config.type_vocab_size, h],
        )?;
        for row in pos_type.chunks_exact_mut(h) {
            for (p, t) in row.iter_mut().zip(&types) {
                *p += t;
            }
        }
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for n in 0..config.num_hidden_layers {
            let p = format!("encoder.layer.{n}");
            let mut qkv = Vec::with_capacity(3 * h * h);
            let mut qkv_b = Vec::with_capacity(3 * h);
            for part in ["query", "key", "value"] {
                qkv.extend(get(&format!("{p}.attention.self.{part}.weight"), &[h, h])?);
                qkv_b.extend(get(&format!("{p}.attention.self.{part}.bias"), &[h])?);
            }
            layers.push(Layer {
                qkv_w: Weight::new(qkv, 3 * h, h),
                qkv_b,
                out_w: Weight::new(
                    get(&format!("{p}.attention.output.dense.weight"), &[h, h])?,
                    h,
                    h,
                ),
                out_b: get(&format!("{p}.attention.output.dense.bias"), &[h])?,
                attn_norm: norm(&mut get, &format!("{p}.attention.output"))?,
                up_w: Weight::new(
                    get(&format!("{p}.intermediate.dense.weight"), &[i, h])?,
                    i,
                    h,
                ),
                up_b: get(&format!("{p}.intermediate.dense.bias"), &[i])?,
                down_w: Weight::new(get(&format!("{p}.output.dense.weight"), &[h, i])?, h, i),
                down_b: get(&format!("{p}.output.dense.bias"), &[h])?,
                ffn_norm: norm(&mut get, &format!("{p}.output"))?,
            });
        }
        Ok(Self {
            dims,
            word,
            pos_type,
            zeros: vec![0.0; h],
            embed_norm,
            layers,
            scratch: std::sync::Mutex::new(Vec::new()),
        })
    }

    /// Embeds token-id sequences (attention over all of each sequence) into mean-pooled,
    /// L2-normalised vectors, in packed passes of at most [`PASS_TOKENS`] tokens. An empty
    /// sequence gives a zero vector; an id past the vocabulary or a sequence longer than the
    /// position embeddings is an [`EmbedError::Inference`].
    pub fn embed(&mut self, seqs: &[&[u32]]) -> Result<Vec<Vec<f32>>, EmbedError> {
        check_sequences(seqs, self.dims.positions, self.dims.vocab)?;
        let threads = rayon::current_num_threads().max(1);
        let total: usize = seqs.iter().map(|s| s.len()).sum();
        if threads > 1 && total >= 2 * LANE_TOKENS {
            // Many tokens: independent single-threaded lanes, balanced by work stealing. Unlike
            // one pass with multi-threaded matmuls, which wait for their slowest thread at every
            // step, a lane stalled by another process (the ingest thread of `eval`) holds up only
            // itself.
            // As many lanes of about LANE_TOKENS as needed, rounded up to a multiple of the
            // threads and sized evenly: 2,048 tokens on two threads make four lanes of 512, not
            // 768 + 768 + 512, which left one thread idle for a third of the time.
            let lanes = total.div_ceil(LANE_TOKENS).next_multiple_of(threads);
            let lanes = chunks(seqs, total.div_ceil(lanes));
            let vectors: Vec<Vec<Vec<f32>>> = lanes
                .into_par_iter()
                .map(|lane| {
                    let mut out = Vec::with_capacity(lane.len());
                    self.with_scratch(|s| self.pass(lane, s, 1, &mut out));
                    out
                })
                .collect();
            return Ok(vectors.into_iter().flatten().collect());
        }
        let mut out = Vec::with_capacity(seqs.len());
        for pass in chunks(seqs, PASS_TOKENS) {
            self.with_scratch(|s| self.pass(pass, s, threads, &mut out));
        }
        Ok(out)
    }

    /// Runs `f` with a scratch set no other pass is using.
    fn with_scratch(&self, f: impl FnOnce(&mut Scratch)) {
        let taken = self.scratch.lock().ok().and_then(|mut pool| pool.pop());
        let mut scratch = taken.unwrap_or_default();
        f(&mut scratch);
        if let Ok(mut pool) = self.scratch.lock() {
            pool.push(scratch);
        }
    }

    /// One packed forward pass over `seqs` (validated), pooled vectors appended to `out`, on
    /// `threads` rayon threads (1: entirely on the calling thread).
    fn pass(&self, seqs: &[&[u32]], s: &mut Scratch, threads: usize, out: &mut Vec<Vec<f32>>) {
        let d = self.dims;
        let h = d.hidden;
        let total: usize = seqs.iter().map(|s| s.len()).sum();
        let longest = seqs.iter().map(|s| s.len()).max().unwrap_or(0);
        let spans: Vec<(usize, usize)> = seqs
            .iter()
            .scan(0, |offset, s| {
                let span = (*offset, s.len());
                *offset += s.len();
                Some(span)
            })
            .collect();
        let par = threads > 1;
        for (buf, len) in [
            (&mut s.x, total * h),
            (&mut s.qkv, total * 3 * h),
            (&mut s.ctx, total * h),
            (&mut s.tmp, total * h),
            (&mut s.inter, total * d.inter),
            (&mut s.scores, threads * longest * longest),
        ] {
            buf.resize(len, 0.0);
        }

        // Embeddings: word + (position + type 0), LayerNorm; positions restart per sequence.
        let mut rest = &mut s.x[..];
        let mut rows = Vec::with_capacity(seqs.len());
        for seq in seqs {
            let (head, tail) = rest.split_at_mut(seq.len() * h);
            rows.push((seq, head));
            rest = tail;
        }
        let embed = |(seq, x): (&&[u32], &mut [f32])| {
            for (row, &id) in x.chunks_exact_mut(h).zip(seq.iter()) {
                row.copy_from_slice(&self.word[id as usize * h..][..h]);
            }
            let n = &self.embed_norm;
            add_layer_norm(
                x,
                &self.pos_type[..seq.len() * h],
                &self.zeros,
                &n.gamma,
                &n.beta,
                d.eps,
            );
        };
        if par {
            rows.into_par_iter().for_each(embed);
        } else {
            rows.into_iter().for_each(embed);
        }

        for layer in &self.layers {
            layer.qkv_w.matmul(&mut s.qkv, &s.x, total, threads);
            par_rows(&mut s.qkv, 3 * h, par, |rows| add_bias(rows, &layer.qkv_b));
            attention(&s.qkv, &mut s.ctx, &mut s.scores, &spans, d, threads);
            layer.out_w.matmul(&mut s.tmp, &s.ctx, total, threads);
            norm_rows(&mut s.x, &s.tmp, &layer.out_b, &layer.attn_norm, d, par);
            layer.up_w.matmul(&mut s.inter, &s.x, total, threads);
            par_rows(&mut s.inter, d.inter, par, |rows| {
                add_bias_gelu(rows, &layer.up_b)
            });
            layer.down_w.matmul(&mut s.tmp, &s.inter, total, threads);
            norm_rows(&mut s.x, &s.tmp, &layer.down_b, &layer.ffn_norm, d, par);
        }

        for &(offset, len) in &spans {
            let mut mean = vec![0.0f32; h];
            for row in s.x[offset * h..(offset + len) * h].chunks_exact(h) {
                for (m, v) in mean.iter_mut().zip(row) {
                    *m += v;
                }
            }
            let count = (len as f32).max(1e-9);
            mean.iter_mut().for_each(|m| *m /= count);
            let norm = mean.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
            mean.iter_mut().for_each(|m| *m /= norm);
            out.push(mean);
        }
    }
}

/// An [`EmbedError::Inference`] for the first sequence longer than `max_len` tokens or holding an
/// id outside a vocabulary of `vocab`.
pub(super) fn check_sequences(
    seqs: &[&[u32]],
    max_len: usize,
    vocab: usize,
) -> Result<(), EmbedError> {
    for s in seqs {
        if s.len() > max_len {
            return Err(EmbedError::Inference(format!(
                "sequence of {} tokens, the model takes at most {max_len}",
                s.len()
            )));
        }
        if let Some(id) = s.iter().find(|&&id| id as usize >= vocab) {
            return Err(EmbedError::Inference(format!(
                "token id {id} outside the vocabulary of {vocab}"
            )));
        }
    }
    Ok(())
}

/// Splits `seqs` into runs of consecutive sequences of at most `tokens` tokens each (a longer
/// sequence is a run of its own).
pub(super) fn chunks<'a, 'b>(seqs: &'a [&'b [u32]], tokens: usize) -> Vec<&'a [&'b [u32]]> {
    let mut out = Vec::new();
    let mut start = 0;
    while start < seqs.len() {
        let mut end = start + 1;
        let mut sum = seqs[start].len();
        while end < seqs.len() && sum + seqs[end].len() <= tokens {
            sum += seqs[end].len();
            end += 1;
        }
        out.push(&seqs[start..end]);
        start = end;
    }
    out
}

/// Rows of the CUDA forward's matmuls for a pass of `tokens` tokens: `tokens` rounded up to a
/// multiple of a sixteenth of the largest power of two not above it, and of 128. A pass pads by
/// at most 127 rows, or 1/16 of its tokens past 2,048, and token counts up to the pass limit
/// (32,768) fall into 80 shapes, whose cuBLASLt heuristics are cached after first use (see
/// `cuda_bert`'s module docs).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(super) fn matmul_rows(tokens: usize) -> usize {
    if tokens == 0 {
        return 0;
    }
    let floor_pow2 = 1usize << (usize::BITS - 1 - tokens.leading_zeros());
    let step = (floor_pow2 / 16).max(128);
    tokens.div_ceil(step) * step
}

/// Runs `f` on blocks of [`ROWS_PER_TASK`] rows of `width`, in parallel when `par`.
fn par_rows(buf: &mut [f32], width: usize, par: bool, f: impl Fn(&mut [f32]) + Sync + Send) {
    if par {
        buf.par_chunks_mut(ROWS_PER_TASK * width).for_each(f);
    } else {
        f(buf);
    }
}

/// `x = LayerNorm(x + a + bias)` row by row, in parallel when `par`.
fn norm_rows(x: &mut [f32], a: &[f32], bias: &[f32], norm: &Norm, d: Dims, par: bool) {
    if !par {
        add_layer_norm(x, a, bias, &norm.gamma, &norm.beta, d.eps);
        return;
    }
    let block = ROWS_PER_TASK * d.hidden;
    x.par_chunks_mut(block)
        .zip(a.par_chunks(block))
        .for_each(|(x, a)| add_layer_norm(x, a, bias, &norm.gamma, &norm.beta, d.eps));
}

/// Multi-head self-attention of each packed sequence `(offset, len)` over its own rows of `qkv`
/// (`[tokens, 3 × hidden]`, query | key | value), written to `ctx` (`[tokens, hidden]`). One task
/// per (sequence, head); each rayon worker owns a `longest²` slice of `scores`.
fn attention(
    qkv: &[f32],
    ctx: &mut [f32],
    scores: &mut [f32],
    spans: &[(usize, usize)],
    d: Dims,
    threads: usize,
) {
    let (h, dh) = (d.hidden, d.head());
    let longest = spans.iter().map(|s| s.1).max().unwrap_or(0);
    let total = spans.last().map_or(0, |(o, l)| o + l);
    assert!(
        qkv.len() >= total * 3 * h && ctx.len() >= total * h,
        "attention shapes"
    );
    assert!(
        scores.len() >= threads * longest * longest,
        "attention scratch"
    );
    let ctx_ptr = SharedMut(ctx.as_mut_ptr());
    let scale = 1.0 / (dh as f32).sqrt();
    let run = |task: usize, slot: &mut [f32]| {
        let (offset, len) = spans[task / d.heads];
        let head = task % d.heads;
        if len == 0 {
            return;
        }
        let slot = &mut slot[..len * len];
        let row = 3 * h as isize;
        // SAFETY: the offsets stay within the sequence's rows of `qkv` and `ctx` (asserted above);
        // the context written is this (sequence, head)'s own block, disjoint from other tasks'.
        unsafe {
            let q = qkv.as_ptr().add(offset * 3 * h + head * dh);
            let k = q.add(h);
            let v = q.add(2 * h);
            // scores[len×len] = scale · Q[len×dh] · Kᵀ[dh×len]
            gemm::gemm(
                len,
                len,
                dh,
                slot.as_mut_ptr(),
                1,
                len as isize,
                false,
                q,
                1,
                row,
                k,
                row,
                1,
                0.0,
                scale,
                false,
                false,
                false,
                Parallelism::None,
            );
            softmax_rows(slot, len);
            // ctx[len×dh] = P[len×len] · V[len×dh]
            gemm::gemm(
                len,
                dh,
                len,
                ctx_ptr.ptr().add(offset * h + head * dh),
                1,
                h as isize,
                false,
                slot.as_ptr(),
                1,
                len as isize,
                v,
                1,
                row,
                0.0,
                1.0,
                false,
                false,
                false,
                Parallelism::None,
            );
        }
    };
    let tasks = spans.len() * d.heads;
    if threads <= 1 {
        let slot = &mut scores[..longest * longest];
        (0..tasks).for_each(|task| run(task, slot));
        return;
    }
    let scores_ptr = SharedMut(scores.as_mut_ptr());
    (0..tasks).into_par_iter().for_each(|task| {
        let mut own = Vec::new();
        let slot = match rayon::current_thread_index().filter(|&i| i < threads) {
            // SAFETY: one worker runs one task at a time, so slot `i` is used by one task at once.
            Some(i) => unsafe {
                std::slice::from_raw_parts_mut(
                    scores_ptr.ptr().add(i * longest * longest),
                    longest * longest,
                )
            },
            None => {
                own.resize(longest * longest, 0.0);
                &mut own[..]
            }
        };
        run(task, slot);
    });
}

#[cfg(test)]
mod tests {
    /// The CUDA forward's matmul rows cover the tokens, pad little, and take few values.
    #[test]
    fn matmul_rows_round_up_into_few_shapes() {
        use super::matmul_rows;
        assert_eq!(matmul_rows(0), 0);
        assert_eq!(matmul_rows(1), 128);
        assert_eq!(matmul_rows(128), 128);
        assert_eq!(matmul_rows(129), 256);
        assert_eq!(matmul_rows(2048), 2048);
        assert_eq!(matmul_rows(2049), 2176);
        assert_eq!(matmul_rows(32 * 1024), 32 * 1024);
        let mut shapes = std::collections::BTreeSet::new();
        for tokens in 1..=32 * 1024 {
            let rows = matmul_rows(tokens);
            assert!(
                rows >= tokens && rows - tokens < 128.max(tokens / 16 + 1),
                "{tokens}: {rows}"
            );
            assert!(rows <= 32 * 1024, "{tokens}: {rows}");
            shapes.insert(rows);
        }
        assert_eq!(shapes.len(), 80);
    }

    use std::collections::HashMap;

    use candle_core::Tensor;
    use candle_nn::VarBuilder;
    use candle_transformers::models::bert::BertModel;

    use super::*;

    /// A tiny BERT (2 layers, width 16, 4 heads) with deterministic pseudo-random weights.
    fn tiny() -> (Config, HashMap<String, Tensor>) {
        let config = Config {
            vocab_size: 50,
            hidden_size: 16,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            intermediate_size: 40,
            max_position_embeddings: 64,
            layer_norm_eps: 1e-12,
            ..Config::default()
        };
        let mut seed = 0x2545_f491_u64;
        let mut rand = move |n: usize, scale: f32, center: f32| -> Vec<f32> {
            (0..n)
                .map(|_| {
                    seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                    center + scale * (((seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5)
                })
                .collect()
        };
        let (h, i) = (16, 40);
        let mut shapes: Vec<(String, Vec<usize>, f32, f32)> = vec![
            (
                "embeddings.word_embeddings.weight".into(),
                vec![50, h],
                2.0,
                0.0,
            ),
            (
                "embeddings.position_embeddings.weight".into(),
                vec![64, h],
                1.0,
                0.0,
            ),
            (
                "embeddings.token_type_embeddings.weight".into(),
                vec![2, h],
                1.0,
                0.0,
            ),
        ];
        let norm = |stem: String| {
            [
                (format!("{stem}.LayerNorm.weight"), vec![h], 0.5, 1.0),
                (format!("{stem}.LayerNorm.bias"), vec![h], 0.2, 0.0),
            ]
        };
        shapes.extend(norm("embeddings".into()));
        for n in 0..2 {
            let p = format!("encoder.layer.{n}");
            for part in ["query", "key", "value"] {
                shapes.push((
                    format!("{p}.attention.self.{part}.weight"),
                    vec![h, h],
                    1.0,
                    0.0,
                ));
                shapes.push((format!("{p}.attention.self.{part}.bias"), vec![h], 0.2, 0.0));
            }
            shapes.push((
                format!("{p}.attention.output.dense.weight"),
                vec![h, h],
                0.6,
                0.0,
            ));
            shapes.push((
                format!("{p}.attention.output.dense.bias"),
                vec![h],
                0.2,
                0.0,
            ));
            shapes.extend(norm(format!("{p}.attention.output")));
            shapes.push((
                format!("{p}.intermediate.dense.weight"),
                vec![i, h],
                0.6,
                0.0,
            ));
            shapes.push((format!("{p}.intermediate.dense.bias"), vec![i], 0.2, 0.0));
            shapes.push((format!("{p}.output.dense.weight"), vec![h, i], 0.4, 0.0));
            shapes.push((format!("{p}.output.dense.bias"), vec![h], 0.2, 0.0));
            shapes.extend(norm(format!("{p}.output")));
        }
        let tensors = shapes
            .into_iter()
            .map(|(name, shape, scale, center)| {
                let data = rand(shape.iter().product(), scale, center);
                let t = Tensor::from_vec(data, shape, &Device::Cpu).expect("tensor");
                (name, t)
            })
            .collect();
        (config, tensors)
    }

    fn fast(config: &Config, tensors: &HashMap<String, Tensor>) -> FastBert {
        unpacked(config, tensors).with_packed_weights()
    }

    /// The model without the packed copy: small passes go through gemm too.
    fn unpacked(config: &Config, tensors: &HashMap<String, Tensor>) -> FastBert {
        let mut read = |name: &str| {
            let t = tensors
                .get(name)
                .ok_or_else(|| EmbedError::Model(format!("no {name}")))?;
            let data = t.flatten_all().and_then(|t| t.to_vec1::<f32>());
            Ok((data.expect("f32 tensor"), t.dims().to_vec()))
        };
        FastBert::from_tensors(config, &mut read).expect("tiny model")
    }

    /// candle-transformers' BERT on one unpadded sequence, mean-pooled and normalised.
    fn reference(model: &BertModel, ids: &[u32]) -> Vec<f32> {
        let ids = Tensor::new(ids, &Device::Cpu)
            .and_then(|t| t.unsqueeze(0))
            .expect("ids");
        let hidden = model
            .forward(&ids, &ids.zeros_like().expect("zeros"), None)
            .expect("candle forward");
        let mean = hidden.mean(1).and_then(|m| m.squeeze(0)).expect("mean");
        let v = mean.to_vec1::<f32>().expect("vec");
        let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.iter().map(|x| x / norm).collect()
    }

    fn cosine(a: &[f32], b: &[f32]) -> f32 {
        let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
        dot / (a.iter().map(|x| x * x).sum::<f32>() * b.iter().map(|x| x * x).sum::<f32>()).sqrt()
    }

    fn seqs() -> Vec<Vec<u32>> {
        [1usize, 2, 7, 8, 9, 33, 64, 3]
            .iter()
            .enumerate()
            .map(|(s, &len)| (0..len).map(|t| ((t * 7 + s * 13) % 50) as u32).collect())
            .collect()
    }

    #[test]
    fn packed_batch_matches_candle_transformers_per_sequence() {
        let (config, tensors) = tiny();
        let vb = VarBuilder::from_tensors(tensors.clone(), DType::F32, &Device::Cpu);
        let model = BertModel::load(vb, &config).expect("candle tiny model");
        let mut bert = fast(&config, &tensors);
        let mut plain = unpacked(&config, &tensors);
        let seqs = seqs();
        let refs: Vec<&[u32]> = seqs.iter().map(Vec::as_slice).collect();
        let batched = bert.embed(&refs).expect("batched");
        assert_eq!(batched.len(), seqs.len());
        for (seq, got) in refs.iter().zip(&batched) {
            let want = reference(&model, seq);
            let cos = cosine(&want, got);
            assert!(cos >= 0.99999, "cosine {cos} for {} tokens", seq.len());
            let max_diff = want
                .iter()
                .zip(got)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f32::max);
            assert!(
                max_diff < 1e-4,
                "max diff {max_diff} for {} tokens",
                seq.len()
            );
            let single = bert.embed(&[seq]).expect("single");
            assert!(
                cosine(&single[0], got) >= 0.999_999,
                "packing changes nothing"
            );
            let via_gemm = plain.embed(&[seq]).expect("single, unpacked");
            assert!(
                cosine(&single[0], &via_gemm[0]) >= 0.999_999,
                "packed weights and gemm agree for {} tokens",
                seq.len()
            );
        }
    }

    #[test]
    fn lanes_give_the_vectors_of_one_pass_in_input_order() {
        let (config, tensors) = tiny();
        let mut bert = fast(&config, &tensors);
        // Enough tokens for several lanes, with lengths that do not split evenly.
        let seqs: Vec<Vec<u32>> = (0..120)
            .map(|s| {
                let len = 1 + (s * 37) % 64;
                (0..len).map(|t| ((t * 11 + s * 5) % 50) as u32).collect()
            })
            .collect();
        let refs: Vec<&[u32]> = seqs.iter().map(Vec::as_slice).collect();
        assert!(refs.iter().map(|s| s.len()).sum::<usize>() >= 3 * LANE_TOKENS);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .expect("pool");
        let laned = pool.install(|| bert.embed(&refs)).expect("lanes");
        assert_eq!(laned.len(), refs.len());
        for (seq, got) in refs.iter().zip(&laned) {
            let single = bert.embed(&[seq]).expect("single");
            assert!(
                cosine(&single[0], got) >= 0.999_999,
                "lane result differs for {} tokens",
                seq.len()
            );
        }
    }

    #[test]
    fn edge_cases_do_not_panic() {
        let (config, tensors) = tiny();
        let mut bert = fast(&config, &tensors);
        assert!(bert.embed(&[]).expect("empty batch").is_empty());
        let v = bert.embed(&[&[], &[1, 2]]).expect("empty sequence");
        assert!(
            v[0].iter().all(|&x| x == 0.0),
            "an empty sequence pools to zeros"
        );
        assert!((v[1].iter().map(|x| x * x).sum::<f32>() - 1.0).abs() < 1e-5);
        assert!(matches!(
            bert.embed(&[&[50]]),
            Err(EmbedError::Inference(_))
        ));
        assert!(matches!(
            bert.embed(&[&[1; 65]]),
            Err(EmbedError::Inference(_))
        ));
        assert_eq!(bert.embed(&[&[1; 64]]).expect("longest").len(), 1);
        // More tokens than one pass holds: split into several passes, same vectors.
        let long: Vec<u32> = (0..60).map(|t| t % 50).collect();
        let many: Vec<&[u32]> = (0..PASS_TOKENS / 60 + 10)
            .map(|_| long.as_slice())
            .collect();
        let all = bert.embed(&many).expect("several passes");
        assert_eq!(all.len(), many.len());
        assert!(all.iter().all(|v| cosine(v, &all[0]) >= 0.999_999));
    }

    #[test]
    fn shape_errors_name_the_tensor() {
        let (config, mut tensors) = tiny();
        let bad = Tensor::zeros((3, 16), DType::F32, &Device::Cpu).expect("tensor");
        tensors.insert("encoder.layer.1.output.dense.weight".into(), bad);
        let mut read = |name: &str| {
            let t = &tensors[name];
            let data = t.flatten_all().and_then(|t| t.to_vec1::<f32>());
            Ok((data.expect("f32 tensor"), t.dims().to_vec()))
        };
        let err = FastBert::from_tensors(&config, &mut read)
            .err()
            .expect("shape error");
        assert!(
            err.to_string()
                .contains("encoder.layer.1.output.dense.weight"),
            "{err}"
        );
    }
}
