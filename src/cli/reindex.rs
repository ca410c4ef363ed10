//! `prompt-radar reindex`: the offline batch path. Reads traffic JSONL, embeds it in large
//! batches and ingests it through the same engine as the server (see `prompt_radar::offline`),
//! with a progress bar and a summary line giving each stage's rate, so the bound is visible.

use std::time::Instant;

use anyhow::Context;
use clap::Args;

use prompt_radar::detect::Verdict;
use prompt_radar::embed::{CandleEmbedder, Embedder};
use prompt_radar::engine::Engine;
use prompt_radar::offline::{self, Observer};
use prompt_radar::traffic::{self, LineError, TrafficLine};

use super::{OfflineArgs, OnError, progress};

/// Flags of `reindex`.
#[derive(Debug, Clone, Args)]
pub struct ReindexArgs {
    #[command(flatten)]
    pub offline: OfflineArgs,
    /// On a malformed line: report it with its line number and go on, or stop.
    #[arg(long, env = "PROMPT_RADAR_ON_ERROR", value_enum, default_value_t = OnError::Skip)]
    pub on_error: OnError,
}

/// A progress display fed by the offline run; prints bad lines above it.
pub struct Progress {
    /// The bar (or plain lines, without a terminal).
    pub display: progress::Progress,
    /// Whether to go on after a bad line.
    pub keep_going: bool,
}

impl Progress {
    /// Progress over `total` lines labelled `verb`.
    pub fn new(verb: &str, total: u64, on_error: OnError) -> Self {
        Self {
            display: progress::Progress::new(verb, total),
            keep_going: on_error == OnError::Skip,
        }
    }
}

impl Observer for Progress {
    fn verdict(&mut self, _line: usize, _input: &TrafficLine, _verdict: &Verdict) {
        self.display.inc(1);
    }
    fn bad_line(&mut self, error: &LineError) -> bool {
        self.display
            .suspend(|| eprintln!("line {}: {}", error.line, error.reason));
        self.display.inc(1);
        self.keep_going
    }
}

/// Runs the batch; returns whether every line was used.
pub fn run(args: ReindexArgs) -> anyhow::Result<bool> {
    let total = traffic::count_lines(&args.offline.input)
        .with_context(|| format!("cannot read {}", args.offline.input.display()))?;
    let file = std::fs::File::open(&args.offline.input)
        .with_context(|| format!("cannot open {}", args.offline.input.display()))?;
    let load = Instant::now();
    let mut embedder = CandleEmbedder::load(&args.offline.model.model, args.offline.model.device)?;
    let engine = Engine::open(args.offline.engine.to_config()?, embedder.dim())?;
    eprintln!(
        "reindex: model on {} and data dir {} ready in {:.1}s ({} prompts already stored)",
        embedder.device_name(),
        engine.data_dir().display(),
        load.elapsed().as_secs_f64(),
        engine.len()
    );
    let mut progress = Progress::new("reindex", total, args.on_error);
    let lines = traffic::lines(std::io::BufReader::new(file));
    let mut cache = offline::VectorCache::new(offline::DEDUPE_TEXTS, embedder.dim(), 0);
    let times = offline::run(
        &mut embedder,
        &mut cache,
        &engine,
        lines,
        args.offline.batch_size,
        &mut progress,
    )?;
    progress.display.finish();
    eprintln!("{}", times.summary("reindex"));
    // So that `serve` reloads the index instead of rebuilding what the last segment holds.
    let saved = engine.checkpoint()?;
    eprintln!(
        "reindex: index checkpoint written in {:.1}s ({} active-segment vectors, {} of the part index's; `serve` reloads them); {} index segments{}",
        saved.seconds,
        saved.active_vectors,
        saved.part_vectors,
        saved.segments,
        if saved.merging {
            " (a merge was running: `serve` starts it again)"
        } else {
            ""
        }
    );
    Ok(times.bad_lines == 0)
}
