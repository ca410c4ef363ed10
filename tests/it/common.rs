//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

/// The repository root: `PROMPT_RADAR_REPO`, or where the tests were built. A test binary carried
/// to another machine (the GPU test, `make cuda-test`) is told where its checkout is.
pub fn repo_dir() -> PathBuf {
    std::env::var_os("PROMPT_RADAR_REPO")
        .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from)
}

/// The model directory: `PROMPT_RADAR_MODEL` or `models/all-MiniLM-L6-v2` in the repo.
pub fn model_dir() -> PathBuf {
    match std::env::var_os("PROMPT_RADAR_MODEL") {
        Some(p) => PathBuf::from(p),
        None => repo_dir().join("models/all-MiniLM-L6-v2"),
    }
}

/// A file under `tests/data/`.
pub fn data_file(name: &str) -> PathBuf {
    repo_dir().join("tests/data").join(name)
}

/// The text of a file under `tests/data/`; panics naming the path when it cannot be read.
pub fn read_data(name: &str) -> String {
    let path = data_file(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

use std::net::SocketAddr;

use prompt_radar::config::{Config, DeviceKind, EngineConfig, Limits};
use prompt_radar::embed::BatchConfig;
use prompt_radar::proto::radar_client::RadarClient;
use prompt_radar::proto::search_request::Query;
use prompt_radar::proto::{self, SearchHit, SearchRequest};
use prompt_radar::server::{Prepared, bind};
use tokio::sync::oneshot;
use tonic::transport::Channel;

/// A server config on `data_dir` with the embedded defaults and a free port.
pub fn config(data_dir: &std::path::Path) -> Config {
    Config {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        model_dir: model_dir(),
        device: DeviceKind::Cpu,
        engine: EngineConfig::with_data_dir(data_dir),
        batch: BatchConfig::default(),
        limits: Limits::default(),
        auth_token: None,
    }
}

/// A real server running in this process on 127.0.0.1:0.
pub struct TestServer {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl TestServer {
    /// Loads the model, opens `config.engine.data_dir` and serves.
    pub async fn start(config: Config) -> Self {
        let prepared =
            tokio::task::spawn_blocking(move || Prepared::load(&config).expect("server loads"))
                .await
                .unwrap();
        let (listener, addr) = bind(SocketAddr::from(([127, 0, 0, 1], 0))).await.unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            prepared
                .serve(listener, async {
                    let _ = stopped.await;
                })
                .await
                .expect("server runs");
        });
        Self {
            addr,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// A connected client.
    pub async fn client(&self) -> RadarClient<Channel> {
        RadarClient::connect(format!("http://{}", self.addr))
            .await
            .unwrap()
    }

    /// A connected channel (for health and reflection clients).
    pub async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    /// Graceful shutdown; waits for the server task.
    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            t.await.unwrap();
        }
    }
}

/// A fixed-wording harvesting template with a changing slot: prompt `i` of it.
pub fn templated(i: usize) -> String {
    const SLOTS: [&str; 12] = [
        "a function that reverses a linked list",
        "a parser for ISO 8601 dates",
        "binary search over a sorted array",
        "an LRU cache with O(1) operations",
        "merging two sorted arrays",
        "detecting a cycle in a directed graph",
        "computing the edit distance of two strings",
        "a thread-safe bounded queue",
        "serialising a binary tree to a string",
        "the longest increasing subsequence",
        "a trie with prefix search",
        "topological sorting of tasks",
    ];
    format!(
        "You are an expert competitive programmer. Think step by step, explain your reasoning in detail, \
         then give a complete, well-commented Python solution with unit tests and complexity analysis. \
         Task {i}: implement {}.",
        SLOTS[i % SLOTS.len()]
    )
}

/// Unrelated organic prompts.
pub const ORGANIC: [&str; 8] = [
    "what's a good recipe for banana bread without eggs?",
    "How do I politely decline a wedding invitation from a coworker?",
    "translate 'where is the train station' into German",
    "Why is the sky blue during the day but red at sunset?",
    "suggest three names for a grey kitten",
    "What are the main causes of the French Revolution?",
    "help me write a haiku about autumn rain",
    "how many grams of protein are in a boiled egg",
];

/// The stored prompt nearest to `query` (a `Search` with k = 1), or the server's error.
pub async fn nearest(
    c: &mut RadarClient<Channel>,
    query: Query,
) -> Result<SearchHit, tonic::Status> {
    let request = SearchRequest {
        query: Some(query),
        k: 1,
        ..Default::default()
    };
    let hits = c.search(request).await?.into_inner().hits;
    hits.into_iter()
        .next()
        .ok_or_else(|| tonic::Status::not_found("search returned no hit"))
}

/// Every account the server lists (`ListAccounts`, no filter, no limit).
pub async fn all_accounts(c: &mut RadarClient<Channel>) -> Vec<proto::Account> {
    c.list_accounts(proto::ListAccountsRequest::default())
        .await
        .expect("ListAccounts")
        .into_inner()
        .accounts
}
