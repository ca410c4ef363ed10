//! `prompt-radar reindex`: the offline batch path. Reads traffic JSONL, embeds it in large
//! batches, and ingests it through the same engine as the server (same store, index, detector).
//! Embedding (this thread) and ingest (a second thread) overlap; the summary gives each stage's
//! busy time and rate, so the bound is visible.

use std::path::PathBuf;
use std::sync::mpsc::sync_channel;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

use prompt_radar::config::Limits;
use prompt_radar::embed::{CandleEmbedder, Embedder};
use prompt_radar::engine::{Engine, NewPrompt};
use prompt_radar::server::validate;
use prompt_radar::traffic;

use super::{EngineArgs, ModelArgs, OnError};

/// Flags of `reindex`.
#[derive(Debug, Clone, Args)]
pub struct ReindexArgs {
    /// Traffic JSONL to embed and index.
    #[arg(long, env = "PROMPT_RADAR_INPUT")]
    pub input: PathBuf,
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub engine: EngineArgs,
    /// Prompts per forward pass.
    #[arg(long, env = "PROMPT_RADAR_BATCH_SIZE", default_value_t = 64)]
    pub batch_size: usize,
    /// On a malformed line: report it with its line number and go on, or stop.
    #[arg(long, env = "PROMPT_RADAR_ON_ERROR", value_enum, default_value_t = OnError::Skip)]
    pub on_error: OnError,
}

/// Runs the batch; returns whether every line was used.
pub fn run(args: ReindexArgs) -> anyhow::Result<bool> {
    anyhow::ensure!(args.batch_size > 0, "--batch-size must be at least 1");
    let total = traffic::count_lines(&args.input).with_context(|| format!("cannot read {}", args.input.display()))?;
    let file = std::fs::File::open(&args.input).with_context(|| format!("cannot open {}", args.input.display()))?;
    let load = Instant::now();
    let mut embedder = CandleEmbedder::load(&args.model.model, args.model.device)?;
    let engine = Engine::open(args.engine.to_config()?, embedder.dim())?;
    let before = engine.len();
    eprintln!(
        "reindex: model on {} and data dir {} ready in {:.1}s ({} prompts already stored)",
        embedder.device_name(),
        engine.data_dir().display(),
        load.elapsed().as_secs_f64(),
        before
    );
    let bar = ProgressBar::new(total).with_style(
        ProgressStyle::with_template("{spinner} reindex [{bar:30}] {pos}/{len} {per_sec} eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let started = Instant::now();
    let limits = Limits::default();
    let (tx, rx) = sync_channel::<Vec<NewPrompt>>(4);
    let ingest_bar = bar.clone();
    let ingest = std::thread::Builder::new().name("ingest".into()).spawn(move || -> anyhow::Result<(Duration, u64)> {
        let mut busy = Duration::ZERO;
        let mut flagged_verdicts = 0;
        for batch in rx {
            let n = batch.len() as u64;
            let t = Instant::now();
            let verdicts = engine.ingest(batch)?;
            busy += t.elapsed();
            flagged_verdicts += verdicts.iter().filter(|v| v.campaign_id.is_some()).count() as u64;
            ingest_bar.inc(n);
        }
        Ok((busy, flagged_verdicts))
    })?;

    let (mut embed_busy, mut parse_busy) = (Duration::ZERO, Duration::ZERO);
    let (mut bad, mut stopped) = (0u64, false);
    let mut pending: Vec<traffic::TrafficLine> = Vec::with_capacity(args.batch_size);
    let mut lines = traffic::lines(std::io::BufReader::new(file));
    loop {
        let t = Instant::now();
        let next = lines.next();
        parse_busy += t.elapsed();
        let done = next.is_none();
        if let Some((line, parsed)) = next {
            let checked = parsed.map_err(|e| e.reason).and_then(|t| {
                validate::prompt(&t.account_id, &t.prompt, t.timestamp_ms, &limits)
                    .map(|v| traffic::TrafficLine { account_id: v.account_id, prompt: v.prompt, timestamp_ms: v.timestamp_ms, label: None })
                    .map_err(|e| e.to_string())
            });
            match checked {
                Ok(t) => pending.push(t),
                Err(reason) => {
                    bad += 1;
                    bar.suspend(|| eprintln!("reindex: line {line}: {reason}"));
                    bar.inc(1);
                    if args.on_error == OnError::Stop {
                        stopped = true;
                    }
                }
            }
        }
        if pending.len() >= args.batch_size || ((done || stopped) && !pending.is_empty()) {
            let t = Instant::now();
            let texts: Vec<&str> = pending.iter().map(|p| p.prompt.as_str()).collect();
            let vectors = embedder.embed(&texts)?;
            embed_busy += t.elapsed();
            let batch = pending
                .drain(..)
                .zip(vectors)
                .map(|(p, embedding)| NewPrompt { account_id: p.account_id, timestamp_ms: p.timestamp_ms, text: p.prompt, embedding })
                .collect();
            if tx.send(batch).is_err() {
                break; // the ingest thread failed; its error is reported below
            }
        }
        if done || stopped {
            break;
        }
    }
    drop(tx);
    let (ingest_busy, in_campaigns) = ingest.join().map_err(|_| anyhow::anyhow!("ingest thread panicked"))??;
    bar.finish_and_clear();
    let secs = started.elapsed().as_secs_f64();
    let good = total.saturating_sub(bad);
    let rate = |n: u64, d: Duration| n as f64 / d.as_secs_f64().max(1e-9);
    eprintln!(
        "reindex: {good} prompts in {secs:.1}s ({:.0} prompts/s end to end), {bad} bad lines{}; stages: parse {:.0}/s, embed {:.0}/s ({:.1}s), ingest {:.0}/s ({:.1}s; search+cluster+store+index); {in_campaigns} prompts landed in campaigns",
        rate(good, started.elapsed()),
        if stopped { " (stopped at the first, --on-error stop)" } else { "" },
        rate(good, parse_busy),
        rate(good, embed_busy),
        embed_busy.as_secs_f64(),
        rate(good, ingest_busy),
        ingest_busy.as_secs_f64(),
    );
    Ok(bad == 0)
}
