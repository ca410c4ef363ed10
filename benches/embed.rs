//! Embedding throughput of the embedder on real prompts, by batch size, with the fused CPU forward
//! (the default) and with candle-transformers' forward (`embed/fused/N`, `embed/candle/N`).
//!
//! Prompts come from `tests/data/recall_prompts.txt` (one a line) when it exists, else from the
//! texts of `tests/data/minilm-reference.jsonl`. The model directory is `PROMPT_RADAR_MODEL` or
//! `models/all-MiniLM-L6-v2`. Run: `cargo bench --bench embed` (add `-- --quick` for a fast pass,
//! `-- fused` for one forward only, `-- tokenize` for the tokeniser alone).
//!
//! `tokenize/request/N` tokenises N prompts one after the other on one thread, as the server does
//! per request on the thread it arrived on; `tokenize/pooled/N` tokenises them as one batch on the
//! thread pool, as `embed` and `reindex` do; `tokenize/full-tokenizer/N` tokenises them one after
//! the other with the `tokenizers` crate alone (what every text went through before the
//! project's WordPiece, and what non-ASCII texts still go through).

#![allow(clippy::unwrap_used)] // benches and tests may panic on setup failures

use std::path::PathBuf;
use std::time::Duration;

use criterion::{
    BenchmarkId, Criterion, SamplingMode, Throughput, criterion_group, criterion_main,
};
use prompt_radar::config::DeviceKind;
use prompt_radar::embed::{BertForward, CandleEmbedder, Embedder};

/// Batch sizes measured.
const BATCH_SIZES: [usize; 4] = [1, 8, 32, 128];
/// Samples per batch size (criterion's minimum is 10).
const SAMPLE_SIZE: usize = 10;
/// Warm-up and measurement time per batch size: the whole bench stays within ~3 minutes on 2 cores.
const WARM_UP: Duration = Duration::from_secs(2);
const MEASUREMENT: Duration = Duration::from_secs(6);
/// The CPU forward passes compared.
const FORWARDS: [(&str, BertForward); 2] =
    [("fused", BertForward::Own), ("candle", BertForward::Candle)];
/// Prompts file (one a line) and the fallback fixture, under `tests/data/`.
const PROMPTS_FILE: &str = "recall_prompts.txt";
const FALLBACK_FILE: &str = "minilm-reference.jsonl";

fn data_file(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name)
}

fn model_dir() -> PathBuf {
    std::env::var_os("PROMPT_RADAR_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/all-MiniLM-L6-v2")
        })
}

/// Real prompts: the recall prompts when present, else the reference fixture's texts.
fn prompts() -> Vec<String> {
    if let Ok(data) = std::fs::read_to_string(data_file(PROMPTS_FILE)) {
        let lines: Vec<String> = data
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(str::to_owned)
            .collect();
        if !lines.is_empty() {
            eprintln!("embed bench: {} prompts from {PROMPTS_FILE}", lines.len());
            return lines;
        }
    }
    let path = data_file(FALLBACK_FILE);
    let data = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let texts: Vec<String> = data
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v.get("text").and_then(|t| t.as_str()).map(str::to_owned))
        .collect();
    eprintln!("embed bench: {} texts from {FALLBACK_FILE}", texts.len());
    texts
}

/// `n` consecutive prompts, wrapping around when there are fewer.
fn first(prompts: &[String], n: usize) -> Vec<&str> {
    prompts.iter().cycle().take(n).map(String::as_str).collect()
}

fn bench_embed(c: &mut Criterion) {
    let dir = model_dir();
    let prompts = prompts();
    assert!(!prompts.is_empty(), "no prompts to embed");

    let mut group = c.benchmark_group("embed");
    group
        .sample_size(SAMPLE_SIZE)
        .warm_up_time(WARM_UP)
        .measurement_time(MEASUREMENT)
        .sampling_mode(SamplingMode::Flat);
    for (name, forward) in FORWARDS {
        let mut embedder = CandleEmbedder::load_with(&dir, DeviceKind::Cpu, forward)
            .unwrap_or_else(|e| panic!("load {}: {e}", dir.display()));
        for batch in BATCH_SIZES {
            let texts = first(&prompts, batch);
            let tokens: usize = embedder
                .token_ids(&texts)
                .expect("tokenize")
                .iter()
                .map(Vec::len)
                .sum();
            eprintln!(
                "embed bench: {name} batch {batch}: {tokens} tokens, {:.1} per prompt",
                tokens as f64 / batch as f64
            );
            group.throughput(Throughput::Elements(batch as u64));
            let id = BenchmarkId::new(name, batch);
            group.bench_with_input(id, &texts, |b, texts| {
                b.iter(|| embedder.embed(std::hint::black_box(texts)).expect("embed"));
            });
        }
    }
    group.finish();
}

/// Prompts tokenised per measured iteration.
const TOKENIZE_PROMPTS: usize = 512;

fn bench_tokenize(c: &mut Criterion) {
    let dir = model_dir();
    let prompts = prompts();
    let embedder = CandleEmbedder::load(&dir, DeviceKind::Cpu)
        .unwrap_or_else(|e| panic!("load {}: {e}", dir.display()));
    let texts = first(&prompts, TOKENIZE_PROMPTS);
    let tokenizer = embedder.tokenizer();
    let mut group = c.benchmark_group("tokenize");
    group
        .sample_size(SAMPLE_SIZE)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .throughput(Throughput::Elements(texts.len() as u64));
    group.bench_with_input(
        BenchmarkId::new("request", texts.len()),
        &texts,
        |b, texts| {
            b.iter(|| {
                for t in texts {
                    std::hint::black_box(tokenizer.ids(t).expect("tokenize"));
                }
            });
        },
    );
    let mut full = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    full.with_padding(None);
    full.with_truncation(Some(tokenizers::TruncationParams {
        max_length: 256, // the embedder's truncation
        ..Default::default()
    }))
    .unwrap();
    group.bench_with_input(
        BenchmarkId::new("full-tokenizer", texts.len()),
        &texts,
        |b, texts| {
            b.iter(|| {
                for t in texts {
                    std::hint::black_box(full.encode(*t, true).unwrap());
                }
            });
        },
    );
    group.bench_with_input(
        BenchmarkId::new("pooled", texts.len()),
        &texts,
        |b, texts| {
            b.iter(|| std::hint::black_box(embedder.token_ids(texts).expect("tokenize")));
        },
    );
    group.finish();
}

criterion_group!(benches, bench_tokenize, bench_embed);
criterion_main!(benches);
