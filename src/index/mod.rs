//! Vector indexes over L2-normalised embeddings: an exact brute-force index (the reference in
//! recall tests) and HNSW (`hnsw_rs`) split into time segments, because hnsw_rs cannot delete:
//! a segment past retention is dropped whole; sealed segments are dumped to disk and reloaded.
//! Indexes are derived data — the store is the truth and can always rebuild them.

mod brute;
mod distance;
mod hnsw;
pub mod pairs;
mod segmented;

pub(crate) use brute::by_similarity;
pub(crate) use distance::dot;
#[cfg(test)]
pub(crate) use distance::testdata;

pub use brute::BruteForceIndex;
pub use distance::DistDotClamped;
pub use hnsw::{HnswIndex, HnswParams};
pub use segmented::{SEAL_RETRY, SegmentInfo, SegmentedHnsw, SegmentsConfig, SliceClock};

/// A neighbour found by a search: the prompt id and its cosine similarity to the query.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Neighbour {
    /// Prompt id (as given to `insert`).
    pub id: u64,
    /// Cosine similarity (dot product of normalised vectors), in [-1, 1].
    pub similarity: f32,
}

/// Errors of the index layer.
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    /// A vector of the wrong dimension was given.
    #[error("vector has dimension {got}, index expects {want}")]
    Dimension { got: usize, want: usize },
    /// Dumping or reloading a segment failed.
    #[error("segment io: {0}")]
    Io(String),
    /// A vector holds a NaN or an infinity (hnsw_rs panics on a NaN distance).
    #[error("vector of id {id} has a non-finite component")]
    NonFinite { id: u64 },
}

/// Read side of an index.
pub trait VectorSearch {
    /// The `k` nearest stored vectors to `query`, most similar first.
    fn search(&self, query: &[f32], k: usize) -> Vec<Neighbour>;
    /// Number of vectors stored.
    fn len(&self) -> usize;
    /// True when nothing is stored.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Write side of an index.
pub trait VectorInsert {
    /// Adds `vector` under `id`. Ids are unique and increasing.
    fn insert(&mut self, id: u64, vector: &[f32]) -> Result<(), IndexError>;
}
