//! Sentence embeddings. Owns the model (all-MiniLM-L6-v2: the project's fused BERT forward on the
//! CPU, candle on CUDA) and the dynamic batcher that serialises access to it. Knows nothing of
//! prompts, accounts or detection.

mod batcher;
mod candle_bert;
#[cfg(feature = "cuda")]
mod cuda_bert;
mod fast_bert;
mod fast_kernels;
mod packed_gemm;
mod wordpiece;

pub use batcher::{BatchConfig, Batcher, BatcherHandle, Embedded, Job, SubmitError};
pub use candle_bert::{BertForward, CandleEmbedder};

/// Errors of the embedding layer.
#[derive(Debug, thiserror::Error)]
pub enum EmbedError {
    /// The model directory lacks a file or a file cannot be read or parsed.
    #[error("model: {0}")]
    Model(String),
    /// Tokenisation failed for an input.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The forward pass failed (device error, shape mismatch).
    #[error("inference: {0}")]
    Inference(String),
}

/// A raw pointer into a buffer shared by parallel tasks that each write a disjoint part of it
/// (attention's per-(sequence, head) blocks, the packed matmul's column panels).
#[derive(Clone, Copy)]
struct SharedMut(*mut f32);
// SAFETY: every user hands it only to tasks that write disjoint regions (see `fast_bert::attention`
// and `packed_gemm::Packed::matmul`).
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}

impl SharedMut {
    /// The pointer (a method, so closures capture the whole `Send` wrapper, not its field).
    fn ptr(self) -> *mut f32 {
        self.0
    }
}

/// One L2-normalised vector per input text, in input order.
pub type Embeddings = Vec<Vec<f32>>;

/// Turns a text into the token ids an [`Embedder`] takes (truncated at the model's maximum,
/// special tokens included). Shared by any number of threads, so that requests are tokenised
/// where they arrive, in parallel, and the thread that owns the model only runs the model.
pub trait Tokenize: Send + Sync {
    /// The ids of one text, tokenised on the calling thread.
    fn ids(&self, text: &str) -> Result<Vec<u32>, EmbedError>;

    /// The id of the token that stands for text the vocabulary lacks, if the model has one.
    fn unknown_id(&self) -> Option<u32> {
        None
    }
}

/// The largest share of a text's tokens that may be unknown to the model for its embedding to
/// mean anything. all-MiniLM-L6-v2's vocabulary has 244 of the ~21,000 CJK ideographs: a
/// Chinese question is mostly `[UNK]` tokens, and two unrelated ones embed alike ("如何投资股票？"
/// and "如何做红烧肉？" at cosine 1.0). Japanese (kana are in the vocabulary) stays below it.
pub const MAX_UNKNOWN_SHARE: f32 = 0.25;

/// Whether the model reads `ids` (a text's ids from [`Tokenize::ids`], with the two special
/// tokens around it): at most [`MAX_UNKNOWN_SHARE`] of them are `unknown`.
pub fn readable(ids: &[u32], unknown: Option<u32>) -> bool {
    let Some(unknown) = unknown else {
        return true;
    };
    let unknowns = ids.iter().filter(|&&id| id == unknown).count();
    let tokens = ids.len().saturating_sub(2).max(1);
    unknowns as f32 <= MAX_UNKNOWN_SHARE * tokens as f32
}

/// A synchronous sentence embedder. Implementations are driven from one dedicated thread (see
/// [`Batcher`]), so `embed` may be slow and need not be `Sync`.
pub trait Embedder: Send {
    /// Embeds `texts` (already validated, non-empty) into L2-normalised vectors, truncating each
    /// input at the model's maximum token count. The default tokenises with [`Embedder::tokenizer`]
    /// one text after the other, then runs [`Embedder::embed_ids`].
    fn embed(&mut self, texts: &[&str]) -> Result<Embeddings, EmbedError> {
        let tokenizer = self.tokenizer();
        let ids = texts
            .iter()
            .map(|t| tokenizer.ids(t))
            .collect::<Result<Vec<_>, _>>()?;
        let refs: Vec<&[u32]> = ids.iter().map(Vec::as_slice).collect();
        self.embed_ids(&refs)
    }
    /// Embeds token-id sequences from [`Embedder::tokenizer`] into L2-normalised vectors, in order.
    fn embed_ids(&mut self, ids: &[&[u32]]) -> Result<Embeddings, EmbedError>;
    /// This model's tokeniser, to use on other threads.
    fn tokenizer(&self) -> std::sync::Arc<dyn Tokenize>;
    /// Vector dimension.
    fn dim(&self) -> usize;
    /// Human-readable device name ("cpu", "cuda:0").
    fn device_name(&self) -> String;
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_text_is_readable_while_at_most_a_quarter_of_its_tokens_are_unknown() {
        use super::readable;
        const UNK: u32 = 100;
        // [CLS] … [SEP]: the two special tokens do not count.
        assert!(readable(&[101, 7, 8, 9, UNK, 102], Some(UNK)));
        assert!(!readable(&[101, 7, 8, UNK, UNK, 102], Some(UNK)));
        assert!(!readable(&[101, UNK, 102], Some(UNK)));
        assert!(readable(&[101, 102], Some(UNK)));
        // A model without an unknown token reads everything.
        assert!(readable(&[101, UNK, UNK, 102], None));
    }
}
