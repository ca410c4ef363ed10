//! `prompt-radar eval`: runs labelled traffic through the real pipeline (the same engine and
//! offline path as `reindex`, so the same verdicts as `serve` + `check`) and prints account-level
//! precision, recall, F1, organic false-positive rate, campaign recall, per-campaign recall and
//! the median prompts an attacker sends before it is first flagged — beside the same figures for
//! two baselines on the same stream: exact-text hashing and MinHash-LSH.

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::Args;

use prompt_radar::detect::{Action, Verdict};
use prompt_radar::embed::{CandleEmbedder, Embedder};
use prompt_radar::engine::Engine;
use prompt_radar::eval::metrics::ORGANIC;
use prompt_radar::eval::{
    self, AccountOutcome, ExactHashBaseline, LabelledStream, Metrics, MinHashLshBaseline,
};
use prompt_radar::offline::{self, CommittedLine, Observer};
use prompt_radar::server::validate;
use prompt_radar::traffic::{self, LineError, TrafficLine};

use super::reindex::{AbruptStopNote, Progress};
use super::{OfflineArgs, OnError};

/// Flags of `eval`.
#[derive(Debug, Clone, Args)]
pub struct EvalArgs {
    #[command(flatten)]
    pub offline: OfflineArgs,
    /// Keep the data directory the run wrote, --data-dir (default: a temporary one, removed
    /// afterwards). A --data-dir typed on the command line is kept without it.
    #[arg(long, env = "PROMPT_RADAR_KEEP_DATA", value_parser = clap::builder::BoolishValueParser::new())]
    pub keep_data: bool,
    /// Whether --data-dir was typed on the command line (not only set in the environment, as
    /// for `serve`): the run then writes there and keeps it, as with --keep-data.
    #[arg(skip)]
    pub data_dir_typed: bool,
    /// Also write all metrics as one JSON object to this file.
    #[arg(long, env = "PROMPT_RADAR_JSON")]
    pub json: Option<PathBuf>,
    /// Also write each account's outcome (label, flagged, score, prompts, campaign prompts, first
    /// flagged prompt) as JSONL to this file, for error analysis.
    #[arg(long, env = "PROMPT_RADAR_ACCOUNTS_OUT")]
    pub accounts_out: Option<PathBuf>,
}

/// Counts each account's own prompts and remembers when its verdict first left `allow`.
struct FirstFlag {
    progress: Progress,
    sent: HashMap<String, usize>,
    first: HashMap<String, usize>,
}

impl Observer for FirstFlag {
    fn stored(&mut self, line: usize, input: &TrafficLine) {
        self.progress.stored(line, input);
    }
    fn verdict(&mut self, _line: usize, input: &TrafficLine, verdict: &Verdict) {
        let n = self.sent.entry(input.account_id.clone()).or_default();
        *n += 1;
        if verdict.action != Action::Allow {
            self.first.entry(input.account_id.clone()).or_insert(*n);
        }
    }
    fn bad_line(&mut self, error: &LineError) -> bool {
        self.progress.bad_line(error)
    }
    fn interrupted(&mut self) -> bool {
        self.progress.interrupted()
    }
    fn committed_line(&self) -> Option<CommittedLine> {
        self.progress.committed_line()
    }
}

/// The run's temporary data directory, removed when the run ends, however it ends (an error,
/// Ctrl-C) — a 26k-prompt evaluation writes ~100 MB there.
struct TempDataDir(PathBuf);

impl Drop for TempDataDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The lines of a labelled traffic file (with their line numbers) and each account's label.
type Labelled = (Vec<(usize, TrafficLine)>, HashMap<String, String>);

/// Runs the evaluation; prints the report.
pub fn run(args: EvalArgs) -> anyhow::Result<bool> {
    let input = &args.offline.input;
    let outputs: Vec<(&PathBuf, &str)> = [
        (&args.json, "--json"),
        (&args.accounts_out, "--accounts-out"),
        (&args.offline.embed_cache, "--embed-cache"),
    ]
    .into_iter()
    .filter_map(|(p, flag)| p.as_ref().map(|p| (p, flag)))
    .collect();
    for (i, &(out, flag)) in outputs.iter().enumerate() {
        // The metrics table is what goes to standard output; `-` would be a file named `-`.
        anyhow::ensure!(
            out.as_os_str() != "-",
            "eval: {flag} takes a file path, not - (the metrics table goes to standard output)"
        );
        traffic::refuse_input_as_output(input, out, flag)?;
        // Two outputs on one file: the last written would be all it holds.
        for &(other, other_flag) in &outputs[..i] {
            anyhow::ensure!(
                !traffic::same_file(out, other) && out != other,
                "{flag} and {other_flag} name the same file ({}): give each its own",
                out.display()
            );
        }
    }
    // Every line is read and checked first: metrics of part of the stream would be wrong, not
    // partial.
    let read = |p: &PathBuf| -> anyhow::Result<Labelled> {
        let f = std::fs::File::open(p).with_context(|| format!("cannot open {}", p.display()))?;
        let limits = args.offline.prompt_limit.limits();
        let mut out = Vec::new();
        // Each account's label and the line that gave it.
        let mut labels: HashMap<String, (String, usize)> = HashMap::new();
        for (line, parsed) in traffic::lines(std::io::BufReader::new(f)) {
            let t = parsed.map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?;
            let v = validate::prompt(&t.account_id, &t.prompt, t.timestamp_ms, &limits)
                .map_err(|e| anyhow::anyhow!("{}: line {line}: {e}", p.display()))?;
            let label = match t.label {
                Some(l) if !l.trim().is_empty() => l,
                _ => anyhow::bail!(
                    "{}: line {line}: `label` must be \"organic\" or a campaign's name",
                    p.display()
                ),
            };
            let (known, at) = labels
                .entry(v.account_id.clone())
                .or_insert_with(|| (label.clone(), line));
            anyhow::ensure!(
                *known == label,
                "{}: line {line}: account {:?} is labelled {label:?} here and {known:?} on line {at}: one label an account",
                p.display(),
                v.account_id
            );
            out.push((
                line,
                TrafficLine {
                    account_id: v.account_id,
                    prompt: v.prompt,
                    timestamp_ms: v.timestamp_ms,
                    label: Some(label),
                },
            ));
        }
        let labels = labels.into_iter().map(|(a, (l, _))| (a, l)).collect();
        Ok((out, labels))
    };
    let (lines, labels) = read(&traffic::input_path(input))?;
    anyhow::ensure!(
        !lines.is_empty(),
        "{}: no traffic lines to evaluate",
        args.offline.input.display()
    );

    let mut engine_args = args.offline.engine.clone();
    let temp = !(args.keep_data || args.data_dir_typed);
    let mut temp_dir_guard = None;
    if temp {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        engine_args.data_dir =
            std::env::temp_dir().join(format!("prompt-radar-eval-{}-{nanos}", std::process::id()));
        temp_dir_guard = Some(TempDataDir(engine_args.data_dir.clone()));
    } else {
        anyhow::ensure!(
            !engine_args
                .data_dir
                .join(prompt_radar::store::DB_FILE)
                .exists(),
            "eval: --data-dir {} already holds a store: a kept run needs an empty or new directory (or none: without --data-dir and --keep-data, eval uses a temporary one)",
            engine_args.data_dir.display()
        );
    }
    let load = Instant::now();
    let mut obs = FirstFlag {
        progress: Progress::new("eval", Some(lines.len() as u64), OnError::Stop),
        sent: HashMap::new(),
        first: HashMap::new(),
    };
    obs.progress.stop_on_signal(
        "eval",
        "eval: stopping: no metrics without the whole stream (a second Ctrl-C quits at once)",
        temp.then(|| engine_args.data_dir.clone()),
        (!temp).then(|| -> AbruptStopNote {
            let dir = engine_args.data_dir.display().to_string();
            Box::new(move |committed| match committed {
                Ok(0) | Err(0) => format!("; {dir} keeps no prompt"),
                Ok(last) => format!(
                    "; {dir} keeps the prompts of the lines before line {} (the next start indexes them)",
                    last + 1
                ),
                Err(last) => format!(
                    "; {dir} keeps the prompts of the lines up to line {last}, and perhaps of the batch after it"
                ),
            })
        }),
    )?;
    let mut embedder = CandleEmbedder::load(&args.offline.model.model, args.offline.model.device)?;
    let engine = Engine::open(engine_args.to_offline_config()?, embedder.dim())?;
    engine.check_model(
        &mut embedder,
        &args.offline.model.model.display().to_string(),
    )?;
    obs.progress.display.suspend(|| {
        eprintln!(
            "eval: model on {} and data dir {} ready in {:.1}s ({} labelled prompts of {} accounts)",
            embedder.device_name(),
            engine.data_dir().display(),
            load.elapsed().as_secs_f64(),
            lines.len(),
            labels.len()
        )
    });
    let stream = offline::feed(lines.iter().map(|(l, t)| (*l, Ok(t.clone()))));
    let mut cache = offline::VectorCache::for_run(
        args.offline.embed_cache.as_deref(),
        embedder.dim(),
        &args.offline.model.model,
    )?;
    let times = offline::run(
        &mut embedder,
        &mut cache,
        &engine,
        stream,
        args.offline.batch_size,
        &args.offline.prompt_limit.limits(),
        &mut obs,
    )?;
    obs.progress.display.finish();
    eprintln!("{}", times.summary("eval"));
    if !temp {
        // The kept data directory opens in `serve` without rebuilding the index or replaying
        // the store, interrupted or not.
        engine.checkpoint()?;
    }
    // What was embedded is valid either way: a rerun after an interruption starts warm.
    if let Some(p) = &args.offline.embed_cache {
        cache
            .save(p)
            .with_context(|| format!("cannot write {}", p.display()))?;
    }
    anyhow::ensure!(
        !times.interrupted,
        "eval: interrupted; the metrics need the whole stream{}",
        if temp {
            " (the temporary data directory is removed)".to_string()
        } else {
            format!(
                " ({} keeps the {} prompts ingested, checkpointed: `serve` opens it; another eval needs an empty --data-dir)",
                engine.data_dir().display(),
                engine.len()
            )
        }
    );
    // Every line was checked before the run; one the run still refused would leave metrics of
    // part of the stream.
    anyhow::ensure!(
        times.bad_lines == 0,
        "eval: {} lines were refused; the metrics need the whole stream",
        times.bad_lines
    );

    let summaries = engine.accounts(false, 0);
    if let Some(p) = &args.accounts_out {
        let mut out = String::new();
        for a in &summaries {
            let v = serde_json::json!({
                "account_id": a.account_id,
                "label": labels.get(&a.account_id),
                "flagged": a.flagged,
                "score": a.score,
                "prompts": a.prompts,
                "campaign_prompts": a.campaign_prompts,
                "cross_account_prompts": a.cross_account_prompts,
                "campaigns": a.campaigns.iter().map(u64::to_string).collect::<Vec<_>>(),
                "first_flag_prompt": obs.first.get(&a.account_id),
            });
            out.push_str(&format!("{v}\n"));
        }
        std::fs::write(p, out).with_context(|| format!("cannot write {}", p.display()))?;
    }
    let mix = eval::campaign_mix(summaries.iter().flat_map(|a| {
        let label = labels.get(&a.account_id).map_or(ORGANIC, String::as_str);
        a.campaigns
            .iter()
            .map(move |&c| (a.account_id.as_str(), label, c))
    }));
    let final_flags: HashMap<String, bool> = summaries
        .into_iter()
        .map(|a| (a.account_id, a.flagged))
        .collect();
    let detector: Vec<AccountOutcome> = labels
        .iter()
        .map(|(account, label)| AccountOutcome {
            account_id: account.clone(),
            label: label.clone(),
            flagged: final_flags.get(account).copied().unwrap_or(false),
            first_flag_prompt: obs.first.get(account).copied(),
        })
        .collect();
    drop(engine);
    drop(temp_dir_guard);

    let labelled = LabelledStream {
        prompts: lines
            .iter()
            .map(|(_, t)| (t.account_id.clone(), t.prompt.clone()))
            .collect(),
        labels: labels.clone(),
    };
    let timed = |f: &mut dyn FnMut() -> Vec<AccountOutcome>| {
        let t = Instant::now();
        let out = f();
        (eval::compute(&out), t.elapsed().as_secs_f64())
    };
    let (exact, exact_s) =
        timed(&mut || eval::run_baseline(&mut ExactHashBaseline::new(5), &labelled));
    let (minhash, minhash_s) =
        timed(&mut || eval::run_baseline(&mut MinHashLshBaseline::new(5), &labelled));
    let ours = eval::compute(&detector);

    if let Some(path) = &args.json {
        let v = serde_json::json!({
            "input": args.offline.input.display().to_string(),
            "prompts": lines.len(),
            "seconds": times.wall.as_secs_f64(),
            "prompt_radar": ours.to_json(),
            "prompt_radar_campaigns": mix.to_json(),
            "exact_hash": exact.to_json(),
            "minhash_lsh": minhash.to_json(),
        });
        std::fs::write(path, format!("{v:#}\n"))
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    // After the --json file: a closed stdout (`eval … | head`) must not cost it.
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{}{}\n",
        ours.report(&format!(
            "prompt-radar on {} ({:.1}s)",
            args.offline.input.display(),
            times.wall.as_secs_f64()
        )),
        mix.report()
    )?;
    writeln!(
        out,
        "{}",
        exact.report(&format!("baseline: exact-text hashing ({exact_s:.1}s)"))
    )?;
    writeln!(
        out,
        "{}",
        minhash.report(&format!(
            "baseline: MinHash-LSH on word shingles ({minhash_s:.1}s)"
        ))
    )?;
    writeln!(
        out,
        "{}",
        comparison(&[
            ("prompt-radar", &ours),
            ("exact-hash", &exact),
            ("minhash-lsh", &minhash)
        ])
    )?;
    Ok(true)
}

fn comparison(rows: &[(&str, &Metrics)]) -> String {
    let mut s = format!(
        "{:<14} {:>9} {:>7} {:>7} {:>10} {:>10} {:>10}\n",
        "system", "precision", "recall", "F1", "organic FPR", "campaigns", "to-flag"
    );
    for (name, m) in rows {
        s.push_str(&format!(
            "{:<14} {:>9.4} {:>7.4} {:>7.4} {:>10.4}% {:>10} {:>10}\n",
            name,
            m.precision,
            m.recall,
            m.f1,
            100.0 * m.organic_fpr,
            format!("{}/{}", m.campaigns_found, m.per_campaign.len()),
            m.median_prompts_to_flag
                .map_or("-".to_string(), |x| format!("{x:.1}")),
        ));
    }
    s
}
