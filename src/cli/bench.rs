//! `prompt-radar bench-embed`: throughput of the embedder on real prompts (tokenisation
//! included, text in → normalised vectors on the host, the tokeniser running a batch ahead on its
//! own thread as in a re-indexing job) or, with `--fixed-tokens`, of the model alone on
//! fixed-length batches. Prints one row per batch size: sequences/s, tokens/s and the median time
//! of one batch on its own (a gateway's latency: one `embed` call, tokenisation included);
//! `--json` writes the same rows for `benches/bench_embed_peer.py`,
//! which times sentence-transformers on the same texts and prints both side by side.

use std::io::{BufRead, Write};
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use prompt_radar::config::DeviceKind;
use prompt_radar::embed::{CandleEmbedder, Embedder};

use super::ModelArgs;

/// Flags of `bench-embed`.
#[derive(Debug, Clone, Args)]
pub struct BenchEmbedArgs {
    /// Texts to embed: JSONL with a "prompt" field per line (traffic files, `benches/sample_prompts.py`
    /// output) or plain text, one prompt per line.
    #[arg(long, env = "PROMPT_RADAR_INPUT")]
    pub input: PathBuf,
    #[command(flatten)]
    pub model: ModelArgs,
    /// Use at most this many texts (the first ones of the file).
    #[arg(long, env = "PROMPT_RADAR_TEXTS", default_value_t = 2000, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub texts: usize,
    /// Batch sizes to time, comma-separated.
    #[arg(long, env = "PROMPT_RADAR_BATCH_SIZES", value_delimiter = ',', default_value = "1,32,128,512", value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub batch_sizes: Vec<usize>,
    /// Timed rounds over the texts per batch size (after one warm-up batch); the median round
    /// is reported.
    #[arg(long, env = "PROMPT_RADAR_ROUNDS", default_value_t = 3, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub rounds: usize,
    /// Model only: instead of the texts, time fixed sequences of this many tokens (ids from the
    /// texts' tokens, [CLS] … [SEP]), no tokenisation. 0 = end to end on the texts.
    #[arg(long, env = "PROMPT_RADAR_FIXED_TOKENS", default_value_t = 0)]
    pub fixed_tokens: usize,
    /// Stop a batch size's round after this many seconds (rounds of large files on slow devices).
    #[arg(long, env = "PROMPT_RADAR_MAX_ROUND_SECONDS", default_value_t = 60.0, value_parser = round_seconds)]
    pub max_round_seconds: f64,
    /// On a GPU: first embed this many of the texts on the device and on the CPU (f32) and fail
    /// unless every pair's cosine is at least 0.999. 0 = skip.
    #[arg(long, env = "PROMPT_RADAR_VERIFY", default_value_t = 2000)]
    pub verify: usize,
    /// Also write the rows as JSON to this file.
    #[arg(long, env = "PROMPT_RADAR_JSON")]
    pub json: Option<PathBuf>,
}

/// Batches timed one by one per batch size for the latency column.
const LATENCY_BATCHES: usize = 20;

/// One measured batch size.
#[derive(Debug, Serialize)]
struct Row {
    batch: usize,
    sequences_per_s: f64,
    tokens_per_s: f64,
    batch_ms_p50: f64,
}

/// The whole report, as written by `--json`.
#[derive(Debug, Serialize)]
struct Report {
    system: String,
    device: String,
    mode: String,
    texts: usize,
    mean_tokens: f64,
    rows: Vec<Row>,
}

/// Reads prompts from JSONL ("prompt" field) or plain lines; empty ones are skipped.
fn read_texts(path: &PathBuf, limit: usize) -> anyhow::Result<Vec<String>> {
    let f = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut out = Vec::new();
    for (n, line) in std::io::BufReader::new(f).lines().enumerate() {
        if out.len() >= limit {
            break;
        }
        let line = line.with_context(|| format!("{}: line {}", path.display(), n + 1))?;
        let text = if line.trim_start().starts_with('{') {
            let v: serde_json::Value = serde_json::from_str(&line)
                .with_context(|| format!("{}: line {}: not JSON", path.display(), n + 1))?;
            match v.get("prompt").and_then(|p| p.as_str()) {
                Some(p) => p.to_owned(),
                None => anyhow::bail!("{}: line {}: no \"prompt\" string", path.display(), n + 1),
            }
        } else {
            line
        };
        if !text.trim().is_empty() {
            out.push(text);
        }
    }
    anyhow::ensure!(!out.is_empty(), "{}: no prompts", path.display());
    Ok(out)
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The longest --max-round-seconds: a week.
const MAX_ROUND_SECONDS: f64 = 7.0 * 86_400.0;

/// A --max-round-seconds: seconds within [0.001, a week] (not NaN, infinite or negative, which
/// no round could be timed against).
fn round_seconds(text: &str) -> Result<f64, String> {
    let s: f64 = text.parse().map_err(|e| format!("{e}"))?;
    if (0.001..=MAX_ROUND_SECONDS).contains(&s) {
        Ok(s)
    } else {
        Err(format!("seconds within [0.001, {MAX_ROUND_SECONDS}]"))
    }
}

/// Runs the benchmark; prints the table.
pub fn run(args: BenchEmbedArgs) -> anyhow::Result<bool> {
    anyhow::ensure!(args.rounds > 0, "--rounds must be at least 1");
    anyhow::ensure!(
        args.batch_sizes.iter().all(|&b| b > 0),
        "--batch-sizes must be positive"
    );
    let texts = read_texts(&args.input, args.texts)?;
    let mut embedder = CandleEmbedder::load(&args.model.model, args.model.device)
        .with_context(|| format!("loading the model from {}", args.model.model.display()))?;
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    if args.model.device != DeviceKind::Cpu && args.verify > 0 {
        let n = args.verify.min(refs.len());
        let mut cpu = CandleEmbedder::load(&args.model.model, DeviceKind::Cpu)?;
        let want = cpu.embed(&refs[..n])?;
        let got = embedder.embed(&refs[..n])?;
        let cosines: Vec<f64> = got
            .iter()
            .zip(&want)
            .map(|(g, w)| g.iter().zip(w).map(|(a, b)| f64::from(a * b)).sum::<f64>())
            .collect();
        let min = cosines.iter().copied().fold(f64::INFINITY, f64::min);
        let mean = cosines.iter().sum::<f64>() / n.max(1) as f64;
        writeln!(
            std::io::stdout(),
            "bench-embed: {} vs cpu f32 on {n} texts: min cosine {min:.6}, mean {mean:.7}",
            embedder.device_name()
        )?;
        if min.is_nan() || min < 0.999 {
            eprintln!("bench-embed: the device's vectors differ from the CPU's (cosine < 0.999)");
            return Ok(false);
        }
    }
    let ids = embedder.token_ids(&refs)?;
    let fixed: Vec<Vec<u32>> = if args.fixed_tokens > 0 {
        anyhow::ensure!(
            args.fixed_tokens >= 2,
            "--fixed-tokens needs room for [CLS] and [SEP]"
        );
        let pool: Vec<u32> = ids
            .iter()
            .flat_map(|s| s[1..s.len().saturating_sub(1)].iter().copied())
            .collect();
        let (cls, sep) = (ids[0][0], *ids[0].last().unwrap_or(&ids[0][0]));
        let body = args.fixed_tokens - 2;
        (0..texts.len())
            .map(|i| {
                let mut s = Vec::with_capacity(args.fixed_tokens);
                s.push(cls);
                s.extend((0..body).map(|j| pool[(i * body + j) % pool.len().max(1)]));
                s.push(sep);
                s
            })
            .collect()
    } else {
        Vec::new()
    };
    let lens: Vec<usize> = if fixed.is_empty() {
        ids.iter().map(Vec::len).collect()
    } else {
        vec![args.fixed_tokens; texts.len()]
    };
    let mean_tokens = lens.iter().sum::<usize>() as f64 / lens.len() as f64;
    let mode = if fixed.is_empty() {
        "end to end (tokenise, forward, pool, normalise; vectors on the host)".to_owned()
    } else {
        format!("model only, fixed {} tokens", args.fixed_tokens)
    };
    writeln!(
        std::io::stdout(),
        "bench-embed: prompt-radar on {} ({} rayon threads), {} texts from {} (mean {:.1} tokens), {}",
        embedder.device_name(),
        rayon::current_num_threads(),
        texts.len(),
        args.input.display(),
        mean_tokens,
        mode
    )?;
    let run_batch = |embedder: &mut CandleEmbedder, lo: usize, hi: usize| -> anyhow::Result<()> {
        if fixed.is_empty() {
            embedder.embed(&refs[lo..hi])?;
        } else {
            let seqs: Vec<&[u32]> = fixed[lo..hi].iter().map(Vec::as_slice).collect();
            embedder.embed_ids(&seqs)?;
        }
        Ok(())
    };

    let bar = ProgressBar::new((args.batch_sizes.len() * args.rounds) as u64).with_style(
        ProgressStyle::with_template("{spinner} bench-embed [{bar:30}] {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let budget = Duration::from_secs_f64(args.max_round_seconds);
    let mut rows = Vec::new();
    for &batch in &args.batch_sizes {
        bar.set_message(format!("batch {batch}"));
        run_batch(&mut embedder, 0, batch.min(texts.len()))?; // warm-up: buffers, caches, kernels
        let mut batch_ms = Vec::new();
        let started = Instant::now();
        for k in 0..LATENCY_BATCHES {
            let lo = (k * batch) % texts.len();
            let hi = (lo + batch).min(texts.len());
            let t = Instant::now();
            run_batch(&mut embedder, lo, hi)?;
            batch_ms.push(t.elapsed().as_secs_f64() * 1e3);
            if started.elapsed() >= budget {
                break;
            }
        }
        let mut rates = Vec::new();
        let mut token_rates = Vec::new();
        for _ in 0..args.rounds {
            let (mut seqs, mut tokens) = (0usize, 0usize);
            let started = Instant::now();
            let mut count = |range: std::ops::Range<usize>| {
                seqs += range.len();
                tokens += lens[range].iter().sum::<usize>();
                if started.elapsed() < budget {
                    ControlFlow::Continue(())
                } else {
                    ControlFlow::Break(())
                }
            };
            if fixed.is_empty() {
                embedder.embed_pipelined(&refs, batch, |range, _| count(range))?;
            } else {
                for lo in (0..texts.len()).step_by(batch) {
                    let hi = (lo + batch).min(texts.len());
                    run_batch(&mut embedder, lo, hi)?;
                    if count(lo..hi).is_break() {
                        break;
                    }
                }
            }
            let secs = started.elapsed().as_secs_f64();
            rates.push(seqs as f64 / secs);
            token_rates.push(tokens as f64 / secs);
            bar.inc(1);
        }
        rows.push(Row {
            batch,
            sequences_per_s: median(rates),
            tokens_per_s: median(token_rates),
            batch_ms_p50: median(batch_ms),
        });
    }
    bar.finish_and_clear();
    let mut table = format!(
        "{:>6} {:>12} {:>12} {:>12}\n",
        "batch", "seqs/s", "tokens/s", "p50 ms"
    );
    for r in &rows {
        table.push_str(&format!(
            "{:>6} {:>12.1} {:>12.0} {:>12.2}\n",
            r.batch, r.sequences_per_s, r.tokens_per_s, r.batch_ms_p50
        ));
    }
    if let Some(path) = &args.json {
        let report = Report {
            system: "prompt-radar".into(),
            device: embedder.device_name(),
            mode,
            texts: texts.len(),
            mean_tokens,
            rows,
        };
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    // After the --json file: a closed stdout (`bench-embed … | head`) must not cost it.
    std::io::stdout().lock().write_all(table.as_bytes())?;
    Ok(true)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    /// A round's time limit is a number of seconds a round can be timed against; anything else
    /// is refused by name, not turned into 1 ms or a panic.
    #[test]
    fn the_round_time_limit_is_checked() {
        use super::super::{Cli, Command};
        let parse = |seconds: &str| {
            let args = ["prompt-radar", "bench-embed", "--input", "x"];
            let mut args: Vec<std::ffi::OsString> = args.into_iter().map(Into::into).collect();
            args.extend(["--max-round-seconds".into(), seconds.into()]);
            Cli::try_parse_from_args(args)
        };
        match parse("2.5") {
            Ok(Cli {
                command: Command::BenchEmbed(a),
            }) => assert_eq!(a.max_round_seconds, 2.5),
            other => panic!("{other:?}"),
        }
        for bad in ["inf", "1e300", "NaN", "-1", "0", "ten"] {
            let e = parse(bad).unwrap_err();
            assert_eq!(e.kind(), clap::error::ErrorKind::ValueValidation, "{bad}");
            assert!(e.to_string().contains("--max-round-seconds"), "{bad}: {e}");
        }
    }
}
