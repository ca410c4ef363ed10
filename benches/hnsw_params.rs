//! HNSW settings (`--hnsw-ef-construction`, `--hnsw-ef-search`) against build speed, search
//! speed and recall, on *real* embeddings: the vectors an `eval --embed-cache FILE` run saved
//! (prompts and their parts). What the engine needs from a search is a prompt's near duplicates
//! (cosine ≥ `--similarity-threshold`, 0.85), so besides recall@10 it reports, for the queries
//! that have one, how often the search finds one at all.
//!
//! It also prints what the first graph costs in memory: the process's resident set before and
//! after its inserts, per vector (Linux). `PROMPT_RADAR_BENCH_M` sets `--hnsw-m` (default 16), to
//! weigh memory against recall.
//!
//! Run: `PROMPT_RADAR_BENCH_VECTORS=FILE cargo bench --bench hnsw_params` (a few minutes on 2
//! cores for the ~47,000 vectors of the evaluation set). Without the variable it says how to
//! make the file and exits.

#![allow(clippy::unwrap_used)] // benches may panic on setup failures

use std::path::Path;
use std::time::Instant;

use prompt_radar::index::{BruteForceIndex, HnswIndex, HnswParams, VectorInsert, VectorSearch};
use prompt_radar::offline::{VectorCache, model_tag};

/// Queries held out of the index: every `QUERY_EVERY`-th vector.
const QUERY_EVERY: usize = 8;
/// Neighbours asked per search: the engine's default `--neighbours`.
const K: usize = 16;
/// Cosine of a near duplicate: the default `--similarity-threshold`.
const NEAR: f32 = 0.85;
const EF_CONSTRUCTION: [usize; 3] = [100, 64, 48];
const EF_SEARCH: [usize; 3] = [64, 48, 32];

fn main() {
    let Some(file) = std::env::var_os("PROMPT_RADAR_BENCH_VECTORS") else {
        eprintln!(
            "hnsw_params: set PROMPT_RADAR_BENCH_VECTORS to a file written by \
             `prompt-radar eval --input DATA.jsonl --embed-cache FILE`"
        );
        return;
    };
    let m = match std::env::var("PROMPT_RADAR_BENCH_M") {
        Ok(v) => v
            .parse::<usize>()
            .ok()
            .filter(|m| (2..=255).contains(m))
            .unwrap_or_else(|| panic!("PROMPT_RADAR_BENCH_M={v}: want a number within [2, 255]")),
        Err(_) => HnswParams::default().m,
    };
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/all-MiniLM-L6-v2");
    let dim = prompt_radar::EMBEDDING_DIM;
    let cache = VectorCache::load(Path::new(&file), usize::MAX, dim, model_tag(&model))
        .unwrap_or_else(|e| panic!("{e}"));
    let all = cache.vectors();
    let (mut queries, mut items) = (Vec::new(), Vec::new());
    for (i, v) in all.iter().enumerate() {
        if i % QUERY_EVERY == 0 {
            queries.push(*v);
        } else {
            items.push((items.len() as u64 + 1, *v));
        }
    }
    let mut brute = BruteForceIndex::new(dim);
    for &(id, v) in &items {
        brute.insert(id, v).unwrap();
    }
    let exact: Vec<Vec<(u64, f32)>> = queries
        .iter()
        .map(|q| {
            brute
                .search(q, K)
                .iter()
                .map(|n| (n.id, n.similarity))
                .collect()
        })
        .collect();
    let with_near = exact
        .iter()
        .filter(|e| e.first().is_some_and(|n| n.1 >= NEAR))
        .count();
    println!(
        "hnsw_params: {} vectors indexed, {} queries ({with_near} with a neighbour at cosine >= {NEAR}), k = {K}, M = {m}",
        items.len(),
        queries.len(),
    );
    let mut memory = None;
    println!(
        "| ef_construction | build (inserts/s) | ef_search | search (ms/query) | recall@10 | near duplicate found | nearest found (of those) |"
    );
    println!("|---|---|---|---|---|---|---|");
    for efc in EF_CONSTRUCTION {
        let params = HnswParams {
            ef_construction: efc,
            max_elements: items.len(),
            m,
            ..HnswParams::default()
        };
        let rss_before = resident_bytes();
        let mut index = HnswIndex::new(params, dim);
        let started = Instant::now();
        index.parallel_insert(&items).unwrap();
        if memory.is_none() {
            // The first graph only: later ones reuse memory the allocator kept from earlier ones.
            memory = rss_before
                .zip(resident_bytes())
                .map(|(before, after)| after.saturating_sub(before) as f64 / items.len() as f64);
        }
        let rate = items.len() as f64 / started.elapsed().as_secs_f64();
        for ef in EF_SEARCH {
            index.set_ef_search(ef);
            let started = Instant::now();
            let found: Vec<Vec<(u64, f32)>> = queries
                .iter()
                .map(|q| {
                    index
                        .search(q, K)
                        .iter()
                        .map(|n| (n.id, n.similarity))
                        .collect()
                })
                .collect();
            let ms = 1e3 * started.elapsed().as_secs_f64() / queries.len() as f64;
            let (mut top10, mut near, mut nearest) = (0, 0, 0);
            for (want, got) in exact.iter().zip(&found) {
                let has = |id: u64| got.iter().any(|n| n.0 == id);
                top10 += want.iter().take(10).filter(|n| has(n.0)).count();
                if want.first().is_some_and(|n| n.1 >= NEAR) {
                    near += usize::from(got.iter().any(|n| n.1 >= NEAR));
                    nearest += usize::from(has(want[0].0));
                }
            }
            let tens = exact.iter().map(|e| e.len().min(10)).sum::<usize>();
            println!(
                "| {efc} | {rate:.0} | {ef} | {ms:.3} | {:.4} | {:.4} | {:.4} |",
                top10 as f64 / tens as f64,
                near as f64 / with_near.max(1) as f64,
                nearest as f64 / with_near.max(1) as f64,
            );
        }
    }
    match memory {
        Some(per_vector) => println!(
            "hnsw_params: the first graph (M = {m}) grew the resident set by {per_vector:.0} bytes per vector (the vector itself is {} bytes)",
            4 * dim
        ),
        None => println!("hnsw_params: resident set size unavailable (not Linux)"),
    }
}

/// The process's resident set (`VmRSS` of /proc/self/status), where there is one.
fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse::<u64>()
        .ok()?;
    Some(kb * 1024)
}
