//! prompt-radar: catches capability-harvesting campaigns — the same prompt *template*, fixed wording
//! with changing slots, spread across many accounts — as prompts arrive at an LLM API.
//!
//! # Layout
//! - [`embed`]: sentence embeddings (all-MiniLM-L6-v2 through candle) and the dynamic batcher that
//!   owns the model on its own OS thread behind a bounded queue.
//! - [`index`]: vector indexes: an exact brute-force reference and time-segmented HNSW (`hnsw_rs`).
//! - [`store`]: the durable record of every accepted prompt (redb, ACID); the source of truth from
//!   which the index and the detector state are rebuilt on start.
//! - [`detect`]: cluster assignment, template extraction and campaign / account scoring.
//! - [`engine`]: ties store, index and detector together; the one place prompts are ingested, used
//!   alike by the server, `reindex` and `eval`.
//! - [`server`]: thin tonic handlers (validate → engine → convert), health and reflection.
//! - [`offline`]: the batch path of `reindex` and `eval` (embedding overlapped with ingest).
//! - [`eval`]: account-level metrics and the baselines the detector must beat.
//! - [`traffic`]: reading traffic JSONL with per-line errors.
//!
//! The command-line verbs live in the binary (`src/main.rs`, `src/cli/`).
//! - [`config`], [`error`]: the validated settings passed around, and the error type of each layer.

pub mod config;
pub mod detect;
pub mod embed;
pub mod engine;
pub mod error;
pub mod eval;
pub mod index;
mod matmul;
pub mod offline;
pub mod server;
pub mod store;
pub mod traffic;

/// Generated gRPC types and service stubs for `promptradar.v1`.
pub mod proto {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("promptradar.v1");
    /// Encoded file descriptor set of the API, served through gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("promptradar_descriptor");
}

/// Dimension of all-MiniLM-L6-v2 sentence embeddings.
pub const EMBEDDING_DIM: usize = 384;
