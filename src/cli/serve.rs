//! `prompt-radar serve`: loads the model, opens the data directory, serves until Ctrl-C/SIGTERM.

use std::net::SocketAddr;
use std::time::Instant;

use anyhow::Context;
use clap::Args;

use prompt_radar::config::Config;
use prompt_radar::embed::BatchConfig;
use prompt_radar::server::{Prepared, bind};

use super::{EngineArgs, ModelArgs, PromptLimitArgs, default_listen};

/// Flags of `serve`.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address to listen on (port 0 picks a free port; the chosen address is printed).
    #[arg(long, env = "PROMPT_RADAR_LISTEN", default_value_t = default_listen())]
    pub listen: SocketAddr,
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub engine: EngineArgs,
    /// Requests that may wait for the model; beyond that unary Check answers RESOURCE_EXHAUSTED.
    /// CheckStreams wait for room instead, and together hold at most three quarters of it.
    #[arg(long, env = "PROMPT_RADAR_QUEUE_CAPACITY", default_value_t = BatchConfig::default().queue_capacity)]
    pub queue_capacity: usize,
    /// Most prompts in one forward pass.
    #[arg(long, env = "PROMPT_RADAR_MAX_BATCH", default_value_t = BatchConfig::default().max_batch_requests)]
    pub max_batch: usize,
    /// Most padded tokens in one forward pass.
    #[arg(long, env = "PROMPT_RADAR_MAX_BATCH_TOKENS", default_value_t = BatchConfig::default().max_batch_tokens, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub max_batch_tokens: usize,
    #[command(flatten)]
    pub prompt_limit: PromptLimitArgs,
    /// Require `authorization: Bearer <token>` on every Radar RPC (health stays open).
    #[arg(long, env = "PROMPT_RADAR_AUTH_TOKEN", hide_env_values = true)]
    pub auth_token: Option<String>,
}

impl ServeArgs {
    fn to_config(&self) -> anyhow::Result<Config> {
        anyhow::ensure!(
            self.queue_capacity > 0,
            "--queue-capacity must be at least 1"
        );
        anyhow::ensure!(self.max_batch > 0, "--max-batch must be at least 1");
        // An empty token is most often a secret that did not resolve: running without
        // authentication then would be silent and open, so it is refused.
        anyhow::ensure!(
            self.auth_token
                .as_deref()
                .is_none_or(|t| !t.trim().is_empty()),
            "--auth-token (PROMPT_RADAR_AUTH_TOKEN) is empty: give the token, or leave both unset to run without authentication"
        );
        let limits = self.prompt_limit.limits();
        Ok(Config {
            listen: self.listen,
            model_dir: self.model.model.clone(),
            device: self.model.device,
            engine: self.engine.to_config()?,
            batch: BatchConfig {
                queue_capacity: self.queue_capacity,
                max_batch_requests: self.max_batch,
                max_batch_tokens: self.max_batch_tokens.max(256),
            },
            limits,
            auth_token: self.auth_token.clone(),
        })
    }
}

/// Runs the server.
pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let config = args.to_config()?;
    let started = Instant::now();
    // A port that is taken is said at once, before minutes of loading and before the data
    // directory is created. The port is let go again while loading, so that clients are
    // refused (not left waiting) until the server answers; the bind below says it if another
    // process took it meanwhile.
    if config.listen.port() != 0 {
        drop(
            bind(config.listen)
                .await
                .with_context(|| format!("cannot listen on {}", config.listen))?,
        );
    }
    let prepared = tokio::task::spawn_blocking({
        let config = config.clone();
        move || Prepared::load(&config)
    })
    .await??;
    let stats = prepared.service.engine().open_stats();
    let past = super::past_retention(prepared.service.engine());
    let (listener, addr) = bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    // One line people and scripts read: where it listens and what it loaded.
    if let Some(note) = past {
        eprintln!("prompt-radar: {note}");
    }
    println!(
        "prompt-radar listening on {addr} (model {}, device {}, data {}, {} prompts: {} reloaded from segments, {} re-indexed, part vectors {} reloaded, {} re-indexed, clusters of {} restored from the snapshot, {} replayed; ready in {:.1}s)",
        config.model_dir.display(),
        config.device,
        config.engine.data_dir.display(),
        stats.prompts,
        stats.reloaded,
        stats.rebuilt,
        stats.parts_reloaded,
        stats.parts_rebuilt,
        stats.restored,
        stats.replayed,
        started.elapsed().as_secs_f64()
    );
    let engine = prepared.service.engine().clone();
    prepared.serve(listener, shutdown_signal()).await?;
    // What the next start would otherwise rebuild from the store.
    let saved = tokio::task::spawn_blocking(move || engine.checkpoint()).await??;
    println!(
        "prompt-radar: shut down (index checkpoint: {} active-segment vectors, {} of the part index's, {}, {:.1}s; {}{})",
        saved.active_vectors,
        saved.part_vectors,
        super::snapshot_note(&saved),
        saved.seconds,
        prompt_radar::detect::scoring::counted(saved.segments as u64, "index segment"),
        if saved.merging {
            ", a merge left for the next start"
        } else {
            ""
        }
    );
    Ok(())
}

/// Resolves at the first Ctrl-C or SIGTERM. Open CheckStreams are then ended (see
/// `Drainer`) and the server shuts down gracefully; a second signal quits at once.
async fn shutdown_signal() {
    signal().await;
    eprintln!(
        "prompt-radar: shutting down: finishing the calls in flight (open streams end after the requests they have read); a second Ctrl-C quits at once"
    );
    tokio::spawn(async {
        signal().await;
        eprintln!(
            "prompt-radar: stopped at once; the store is consistent, and the next start re-indexes what the index checkpoint lacks"
        );
        std::process::exit(130);
    });
}

/// The next Ctrl-C or SIGTERM.
async fn signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}
