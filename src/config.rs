//! The validated settings passed around the service: one [`Config`] built from the CLI/env flags
//! (see `cli`), never long argument lists. Defaults are the embedded defaults `serve` runs on.

use std::net::SocketAddr;
use std::path::PathBuf;

use crate::detect::DetectorConfig;
use crate::embed::BatchConfig;
use crate::index::SegmentsConfig;

/// Where the model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceKind {
    /// The host CPU, f32.
    #[default]
    Cpu,
    /// A CUDA GPU by ordinal (needs the `cuda` feature).
    Cuda(usize),
}

impl std::str::FromStr for DeviceKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(0)),
            other => match other.strip_prefix("cuda:").map(str::parse) {
                Some(Ok(n)) => Ok(Self::Cuda(n)),
                _ => Err(format!(
                    "unknown device {other:?}: expected cpu, cuda or cuda:N"
                )),
            },
        }
    }
}

impl std::fmt::Display for DeviceKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// Limits on what a single request may carry.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest prompt accepted, in bytes of UTF-8.
    pub max_prompt_bytes: usize,
    /// Largest account id accepted, in bytes.
    pub max_account_bytes: usize,
    /// Largest `k` a search may ask for.
    pub max_search_k: usize,
    /// How many prompts of one `CheckStream` may be in flight at once (back-pressure, not a queue).
    pub stream_in_flight: usize,
    /// How far ahead of the server's clock a `timestamp_ms` may be (clock skew), in ms. Beyond
    /// it the time is wrong (most often microseconds sent as milliseconds): it would show as a
    /// date thousands of years away and keep its index segment from ever expiring.
    pub max_future_ms: i64,
}

impl Limits {
    /// The largest `max_prompt_bytes` there may be: a request stays well within gRPC's 4 MiB
    /// message limit, and a JSONL line with such a prompt within [`crate::traffic::MAX_LINE_BYTES`].
    pub const MAX_PROMPT_BYTES: usize = 1 << 20;
}
const _: () = assert!(Limits::MAX_PROMPT_BYTES + 4096 < 4 << 20);

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_prompt_bytes: 32 * 1024,
            max_account_bytes: 256,
            max_search_k: 1000,
            stream_in_flight: 64,
            max_future_ms: 24 * 3_600_000,
        }
    }
}

/// Everything the engine (store + index + detector) needs.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Directory of the store and the sealed index segments.
    pub data_dir: PathBuf,
    /// Detector thresholds and weights.
    pub detector: DetectorConfig,
    /// HNSW segment settings (their `dir` is derived from `data_dir`).
    pub segments: SegmentsConfig,
}

impl EngineConfig {
    /// Engine settings with the defaults, storing under `data_dir`.
    pub fn with_data_dir(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            detector: DetectorConfig::default(),
            segments: SegmentsConfig::default(),
        }
    }
}

/// The whole server configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Address the gRPC server binds.
    pub listen: SocketAddr,
    /// Directory with config.json, tokenizer.json and model.safetensors.
    pub model_dir: PathBuf,
    /// Where the model runs.
    pub device: DeviceKind,
    /// Store, index and detector settings.
    pub engine: EngineConfig,
    /// Dynamic batching of embeddings.
    pub batch: BatchConfig,
    /// Per-request limits.
    pub limits: Limits,
    /// When set, every RPC but health must carry `authorization: Bearer <token>`.
    pub auth_token: Option<String>,
}
