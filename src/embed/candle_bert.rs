//! all-MiniLM-L6-v2 through candle, the sentence-transformers recipe: tokenise (truncating at
//! [`MAX_TOKENS`]), run BERT, mean-pool over the attention mask, L2-normalise.
//!
//! The shipped tokenizer.json pads every input to a fixed 128 tokens and truncates at 128; both are
//! overridden here. On the CPU the forward pass is the project's own fused BERT ([`FastBert`]),
//! which packs a batch without padding; candle-transformers' `BertModel` remains for CUDA (and on
//! request for the CPU, as the reference). Its inputs are padded per forward pass to the longest
//! input of that pass (what `BatchLongest` does), after sorting a batch by length so short prompts
//! are not padded to long ones.

use std::ops::{ControlFlow, Range};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::sync_channel;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config};
use rayon::prelude::*;
use tokenizers::{Tokenizer, TruncationParams};

#[cfg(feature = "cuda")]
use super::cuda_bert::CudaBert;
use super::fast_bert::FastBert;
use super::wordpiece::FastWordPiece;
use super::{EmbedError, Embedder, Embeddings, Tokenize};
use crate::config::DeviceKind;

/// Most tokens the model sees of one input, special tokens included (sentence-transformers'
/// `max_seq_length` for all-MiniLM-L6-v2); longer inputs are truncated.
pub const MAX_TOKENS: usize = 256;

/// Bytes of a long text tokenised first: when they already fill [`MAX_TOKENS`] the rest is skipped.
const PREFIX_BYTES: usize = 16 * MAX_TOKENS;

/// Limits of one forward pass: padded tokens (rows × longest row), which bound the attention's
/// memory, and padding as a fraction of real tokens. On the CPU a batched pass costs about what its
/// rows cost one by one, so padding is pure loss and kept small; a GPU pays little for padding.
const CPU_PASS: PassLimits = PassLimits::new(8 * 1024, 0.15);
const CUDA_PASS: PassLimits = PassLimits::new(64 * 1024, 1.0);

/// See [`CPU_PASS`].
#[derive(Debug, Clone, Copy)]
struct PassLimits {
    tokens: usize,
    waste: f64,
}

impl PassLimits {
    const fn new(tokens: usize, waste: f64) -> Self {
        Self { tokens, waste }
    }
}

/// Which implementation runs BERT's forward pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BertForward {
    /// The project's own forward on packed tokens: [`FastBert`] (f32) on the CPU, about twice
    /// candle's speed; [`CudaBert`] (f16, cuBLASLt with fused epilogues and its own kernels) on
    /// CUDA.
    #[default]
    Own,
    /// candle-transformers' `BertModel` in f32 on padded passes (the reference).
    Candle,
}

/// The loaded forward pass.
enum Forward {
    Candle {
        model: BertModel,
        device: Device,
    },
    Fused(FastBert),
    #[cfg(feature = "cuda")]
    Cuda(Box<CudaBert>),
}

impl Forward {
    /// Embeds token-id sequences, in passes within `limits` where the forward pads.
    fn run(&mut self, ids: &[&[u32]], limits: PassLimits) -> Result<Embeddings, EmbedError> {
        let (model, device) = match self {
            Forward::Fused(bert) => return bert.embed(ids),
            #[cfg(feature = "cuda")]
            Forward::Cuda(bert) => return bert.embed(ids),
            Forward::Candle { model, device } => (&*model, &*device),
        };
        let mut order: Vec<usize> = (0..ids.len()).collect();
        order.sort_by_key(|&i| ids[i].len());
        let lens: Vec<usize> = order.iter().map(|&i| ids[i].len()).collect();
        let mut out = vec![Vec::new(); ids.len()];
        for pass in passes(&lens, limits) {
            let rows: Vec<&[u32]> = order[pass.clone()].iter().map(|&i| ids[i]).collect();
            let vectors = candle_forward(model, device, &rows)
                .map_err(|e| EmbedError::Inference(e.to_string()))?;
            for (&i, vector) in order[pass].iter().zip(vectors) {
                out[i] = vector;
            }
        }
        if out.iter().any(Vec::is_empty) {
            return Err(EmbedError::Inference("fewer vectors than inputs".into()));
        }
        Ok(out)
    }
}

/// A BERT sentence embedder (all-MiniLM-L6-v2) on the CPU (f32) or a CUDA GPU (f16).
pub struct CandleEmbedder {
    forward: Forward,
    tokenizer: Arc<BertTokenizer>,
    kind: DeviceKind,
    dim: usize,
    pass: PassLimits,
}

impl CandleEmbedder {
    /// Loads `config.json`, `tokenizer.json` and `model.safetensors` (memory-mapped) from
    /// `model_dir` onto `device`, with the project's own forward. Errors
    /// ([`EmbedError::Model`]) name the file or device at fault.
    pub fn load(model_dir: &Path, device: DeviceKind) -> Result<Self, EmbedError> {
        Self::load_with(model_dir, device, BertForward::default())
    }

    /// [`CandleEmbedder::load`] with a choice of forward pass. [`BertForward::Own`] falls back to
    /// candle for a config it does not implement.
    pub fn load_with(
        model_dir: &Path,
        device: DeviceKind,
        forward: BertForward,
    ) -> Result<Self, EmbedError> {
        let file = |name: &str| -> Result<PathBuf, EmbedError> {
            let path = model_dir.join(name);
            if path.is_file() {
                Ok(path)
            } else {
                Err(EmbedError::Model(format!(
                    "{} not found (the model directory {} needs config.json, tokenizer.json and \
                     model.safetensors)",
                    path.display(),
                    model_dir.display()
                )))
            }
        };
        let (config_path, tokenizer_path, weights_path) = (
            file("config.json")?,
            file("tokenizer.json")?,
            file("model.safetensors")?,
        );
        let bad = |path: &Path, e: &dyn std::fmt::Display| {
            EmbedError::Model(format!("{}: {e}", path.display()))
        };

        let text = std::fs::read_to_string(&config_path).map_err(|e| bad(&config_path, &e))?;
        let config: Config = serde_json::from_str(&text).map_err(|e| bad(&config_path, &e))?;

        let tokenizer = full_tokenizer(&tokenizer_path).map_err(|e| bad(&tokenizer_path, &e))?;
        let tokenizer = BertTokenizer::new(tokenizer);

        let own = forward == BertForward::Own && FastBert::supports(&config);
        let candle = |dev: Device| -> Result<Forward, EmbedError> {
            // SAFETY: the weights file is mapped read-only; it must not be modified while the
            // model lives (the model directory is treated as immutable).
            let vb =
                unsafe { VarBuilder::from_mmaped_safetensors(&[&weights_path], DType::F32, &dev) }
                    .map_err(|e| bad(&weights_path, &e))?;
            let model = BertModel::load(vb, &config).map_err(|e| bad(&weights_path, &e))?;
            Ok(Forward::Candle { model, device: dev })
        };
        let (forward, pass) = match device {
            DeviceKind::Cpu if own => (
                Forward::Fused(FastBert::load(&weights_path, &config)?.with_packed_weights()),
                CPU_PASS,
            ),
            DeviceKind::Cpu => (candle(Device::Cpu)?, CPU_PASS),
            DeviceKind::Cuda(n) if !cfg!(feature = "cuda") => {
                return Err(EmbedError::Model(format!(
                    "device cuda:{n}: this binary was built without the cuda feature (rebuild \
                     with `--features cuda`, or `make cuda`)"
                )));
            }
            #[cfg(feature = "cuda")]
            DeviceKind::Cuda(n)
                if own
                    && CudaBert::supports_dims(config.hidden_size, config.num_attention_heads) =>
            {
                let host = FastBert::load(&weights_path, &config)?;
                (
                    Forward::Cuda(Box::new(CudaBert::from_host(&host, n)?)),
                    CUDA_PASS,
                )
            }
            DeviceKind::Cuda(n) => match Device::new_cuda(n) {
                Ok(dev) => (candle(dev)?, CUDA_PASS),
                Err(e) => return Err(EmbedError::Model(format!("device cuda:{n}: {e}"))),
            },
        };
        Ok(Self {
            forward,
            tokenizer: Arc::new(tokenizer),
            kind: device,
            dim: config.hidden_size,
            pass,
        })
    }

    /// Embeds `texts` in batches of `batch`, tokenising the next batch on another thread while
    /// the model runs the current one (what a re-indexing job wants: the GPU never waits for
    /// the tokeniser). `sink` gets each batch's range of `texts` and its vectors, in order, and
    /// may stop the run early with [`ControlFlow::Break`].
    pub fn embed_pipelined(
        &mut self,
        texts: &[&str],
        batch: usize,
        mut sink: impl FnMut(Range<usize>, Embeddings) -> ControlFlow<()>,
    ) -> Result<(), EmbedError> {
        let batch = batch.max(1);
        let (tokenizer, forward, pass) = (&*self.tokenizer, &mut self.forward, self.pass);
        std::thread::scope(|scope| {
            // Two batches ahead at most: bounded memory, and the model always has one waiting.
            let (tx, rx) = sync_channel::<Result<(Range<usize>, Vec<Vec<u32>>), EmbedError>>(2);
            scope.spawn(move || {
                for lo in (0..texts.len()).step_by(batch) {
                    let range = lo..(lo + batch).min(texts.len());
                    let encoded = encode(tokenizer, &texts[range.clone()]).map(|e| (range, e));
                    if tx.send(encoded).is_err() {
                        break;
                    }
                }
            });
            for encoded in rx {
                let (range, encodings) = encoded?;
                let ids: Vec<&[u32]> = encodings.iter().map(Vec::as_slice).collect();
                let vectors = forward.run(&ids, pass)?;
                if sink(range, vectors).is_break() {
                    break;
                }
            }
            Ok(())
        })
    }

    /// Tokenises `texts` as [`Embedder::embed`] does: the ids the model sees.
    pub fn token_ids(&self, texts: &[&str]) -> Result<Vec<Vec<u32>>, EmbedError> {
        encode(&self.tokenizer, texts)
    }
}

/// One candle forward pass over `rows` (right-padded to the longest), mean-pooled and
/// normalised.
fn candle_forward(
    model: &BertModel,
    device: &Device,
    rows: &[&[u32]],
) -> candle_core::Result<Vec<Vec<f32>>> {
    let width = rows.iter().map(|r| r.len()).max().unwrap_or(0);
    let mut ids = vec![0u32; rows.len() * width];
    let mut mask = vec![0u32; rows.len() * width];
    for (r, row) in rows.iter().enumerate() {
        ids[r * width..r * width + row.len()].copy_from_slice(row);
        mask[r * width..r * width + row.len()].fill(1);
    }
    let ids = Tensor::from_vec(ids, (rows.len(), width), device)?;
    let mask = Tensor::from_vec(mask, (rows.len(), width), device)?;
    let hidden = model.forward(&ids, &ids.zeros_like()?, Some(&mask))?;
    let mask = mask.to_dtype(DType::F32)?.unsqueeze(2)?;
    let counts = mask.sum(1)?.maximum(1e-9f32)?;
    let mean = hidden
        .broadcast_mul(&mask)?
        .sum(1)?
        .broadcast_div(&counts)?;
    let norm = mean.sqr()?.sum_keepdim(1)?.sqrt()?.maximum(1e-12f32)?;
    mean.broadcast_div(&norm)?.to_vec2::<f32>()
}

impl Embedder for CandleEmbedder {
    fn embed(&mut self, texts: &[&str]) -> Result<Embeddings, EmbedError> {
        let encodings = self.token_ids(texts)?;
        let ids: Vec<&[u32]> = encodings.iter().map(Vec::as_slice).collect();
        self.embed_ids(&ids)
    }

    /// Token-id sequences (each already truncated, special tokens included) through the model
    /// without tokenising: also the model-only part of [`Embedder::embed`], for benchmarks.
    fn embed_ids(&mut self, ids: &[&[u32]]) -> Result<Embeddings, EmbedError> {
        self.forward.run(ids, self.pass)
    }

    fn tokenizer(&self) -> Arc<dyn Tokenize> {
        self.tokenizer.clone()
    }

    fn dim(&self) -> usize {
        self.dim
    }

    fn device_name(&self) -> String {
        self.kind.to_string()
    }
}

/// The `tokenizers` crate's tokenizer of `tokenizer.json` as the embedder uses it: no padding (the
/// shipped file pads to 128), truncation at [`MAX_TOKENS`] (it ships 128).
pub(super) fn full_tokenizer(path: &Path) -> Result<Tokenizer, tokenizers::Error> {
    let mut tokenizer = Tokenizer::from_file(path)?;
    tokenizer.with_padding(None);
    tokenizer.with_truncation(Some(TruncationParams {
        max_length: MAX_TOKENS,
        ..Default::default()
    }))?;
    Ok(tokenizer)
}

/// Tokenises `texts` in parallel (see [`BertTokenizer`]), truncated at [`MAX_TOKENS`], unpadded.
fn encode(tokenizer: &BertTokenizer, texts: &[&str]) -> Result<Vec<Vec<u32>>, EmbedError> {
    texts
        .par_iter()
        .with_min_len(16)
        .map(|t| tokenizer.ids(t))
        .collect()
}

/// The model's tokenizer: [`FastWordPiece`] for the texts it takes (ASCII, the bulk of
/// prompts), the `tokenizers` crate's full tokenizer for the rest. Both give the same ids.
pub struct BertTokenizer {
    full: Tokenizer,
    fast: Option<FastWordPiece>,
}

impl BertTokenizer {
    /// Wraps `full` (padding off, truncation at [`MAX_TOKENS`] set), with the fast path when
    /// `full` is a BERT WordPiece tokenizer it reproduces.
    fn new(full: Tokenizer) -> Self {
        let fast = match FastWordPiece::from_tokenizer(&full, MAX_TOKENS) {
            Ok(fast) => Some(fast),
            Err(why) => {
                tracing::warn!("tokenizer: every text goes through the full tokenizer ({why})");
                None
            }
        };
        Self { full, fast }
    }

    /// The full tokenizer's ids of `text`. A long text is first tokenised by a prefix cut at
    /// whitespace; when that prefix fills [`MAX_TOKENS`] its tokens are exactly the truncated
    /// tokens of the whole text, otherwise the whole text is tokenised.
    fn full_ids(&self, text: &str) -> Result<Vec<u32>, EmbedError> {
        let prefix = word_prefix(text, PREFIX_BYTES);
        let mut encoding = self.full.encode(prefix, true).map_err(tok_err)?;
        if prefix.len() < text.len() && encoding.len() < MAX_TOKENS {
            encoding = self.full.encode(text, true).map_err(tok_err)?;
        }
        Ok(encoding.get_ids().to_vec())
    }
}

fn tok_err(e: tokenizers::Error) -> EmbedError {
    EmbedError::Tokenizer(e.to_string())
}

impl Tokenize for BertTokenizer {
    /// One text, on the calling thread: a request is tokenised on the thread it arrived on,
    /// while the pool runs the model.
    fn ids(&self, text: &str) -> Result<Vec<u32>, EmbedError> {
        match self.fast.as_ref().and_then(|fast| fast.ids(text)) {
            Some(ids) => Ok(ids),
            None => self.full_ids(text),
        }
    }

    fn unknown_id(&self) -> Option<u32> {
        self.full.token_to_id("[UNK]")
    }
}

/// The longest prefix of `text` of at most `max_bytes` bytes that ends just before an ASCII space,
/// tab or line break, or all of `text` when it fits or has no such break. BERT's normaliser keeps
/// these characters as word breaks, so the prefix's tokens are the first tokens of the text.
/// (Other Unicode whitespace is not used: BERT deletes some of it, e.g. U+0085, as control.)
fn word_prefix(text: &str, max_bytes: usize) -> &str {
    if text.len() <= max_bytes {
        return text;
    }
    text.char_indices()
        .take_while(|&(i, _)| i <= max_bytes)
        .filter(|&(_, c)| matches!(c, ' ' | '\t' | '\n' | '\r'))
        .last()
        .map_or(text, |(i, _)| &text[..i])
}

/// Splits lengths sorted ascending into consecutive ranges (forward passes) whose padded size
/// (rows × the last, longest, length) stays within `limits`; every range holds at least one row.
fn passes(sorted_lens: &[usize], limits: PassLimits) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    let (mut start, mut real) = (0, 0);
    for (i, &len) in sorted_lens.iter().enumerate() {
        let padded = (i + 1 - start) * len;
        if i > start
            && (padded > limits.tokens
                || padded as f64 > (real + len) as f64 * (1.0 + limits.waste))
        {
            out.push(start..i);
            (start, real) = (i, 0);
        }
        real += len;
    }
    if start < sorted_lens.len() {
        out.push(start..sorted_lens.len());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn word_prefix_cuts_before_a_break_and_never_inside_a_char() {
        assert_eq!(word_prefix("short text", 100), "short text");
        assert_eq!(word_prefix("aaa bbb ccc", 6), "aaa");
        assert_eq!(word_prefix("aaa bbb ccc", 7), "aaa bbb");
        assert_eq!(word_prefix("aaa\nbbb\tccc", 9), "aaa\nbbb");
        assert_eq!(word_prefix("nobreakshere", 4), "nobreakshere");
        assert_eq!(word_prefix("ab\u{85}cd ef", 6), "ab\u{85}cd");
        assert_eq!(word_prefix("🚀🚀 🚀🚀 🚀", 9), "🚀🚀");
        for max in 0..20 {
            let p = word_prefix("é é é é 请 请 请", max);
            assert!("é é é é 请 请 请".starts_with(p));
        }
    }

    #[test]
    fn passes_cover_everything_within_limits() {
        let loose = |tokens| PassLimits::new(tokens, f64::INFINITY);
        assert!(passes(&[], loose(100)).is_empty());
        assert_eq!(passes(&[5, 5, 5], loose(100)), vec![0..3]);
        assert_eq!(passes(&[10, 10, 20, 20, 50], loose(40)), [0..2, 2..4, 4..5]);
        // A row longer than the budget still gets a pass of its own.
        assert_eq!(passes(&[300, 300], loose(100)), vec![0..1, 1..2]);
        // Padding beyond 25 % of the real tokens starts a new pass.
        let tight = PassLimits::new(10_000, 0.25);
        assert_eq!(passes(&[10, 11, 12, 20, 21, 60], tight), [0..3, 3..5, 5..6]);
        let lens: Vec<usize> = (1..=200).collect();
        for limits in [loose(1000), PassLimits::new(1000, 0.1)] {
            let ranges = passes(&lens, limits);
            let rows: Vec<usize> = ranges.iter().flat_map(Clone::clone).collect();
            assert_eq!(
                rows,
                (0..200).collect::<Vec<_>>(),
                "every row once, in order"
            );
            for r in ranges.iter().filter(|r| r.len() > 1) {
                let padded = (r.len() * lens[r.end - 1]) as f64;
                let real = lens[r.clone()].iter().sum::<usize>() as f64;
                assert!(
                    padded <= 1000.0 && padded <= real * (1.0 + limits.waste),
                    "{r:?}"
                );
            }
        }
    }
}
