//! Recall@10 of the segmented HNSW index against exact search, on real embeddings of 20,000 real
//! prompts (`tests/data/recall_prompts.txt`): 500 held-out prompts are the queries, the other
//! 19,500 are indexed in segments of 6,000 so the fan-out over several graphs is exercised; then
//! again after the sealed segments are dumped and reloaded.
#![allow(clippy::unwrap_used)]

use std::time::Instant;

use prompt_radar::config::DeviceKind;
use prompt_radar::embed::{CandleEmbedder, Embedder};
use prompt_radar::index::{
    BruteForceIndex, HnswParams, Neighbour, SegmentedHnsw, SegmentsConfig, VectorInsert,
    VectorSearch,
};

use crate::common;

const PROMPTS: usize = 20_000;
/// Every `QUERY_EVERY`-th prompt is a query (500 in all) and is not indexed.
const QUERY_EVERY: usize = 40;
const BATCH: usize = 64;
const K: usize = 10;
const SEGMENT_POINTS: usize = 6_000;
const MIN_RECALL: f64 = 0.95;

/// Embeds `texts` in batches of `BATCH`, shortest texts first so that each batch pads little
/// (the embedder pads a batch to its longest input); returns the vectors in input order.
fn embed_all(texts: &[&str]) -> Vec<Vec<f32>> {
    let dir = common::model_dir();
    let mut embedder = CandleEmbedder::load(&dir, DeviceKind::Cpu)
        .unwrap_or_else(|e| panic!("load {}: {e}", dir.display()));
    let mut order: Vec<usize> = (0..texts.len()).collect();
    order.sort_by_key(|&i| (texts[i].len(), i));
    let started = Instant::now();
    let mut out = vec![Vec::new(); texts.len()];
    for (n, batch) in order.chunks(BATCH).enumerate() {
        let inputs: Vec<&str> = batch.iter().map(|&i| texts[i]).collect();
        let vectors = embedder.embed(&inputs).unwrap();
        assert_eq!(vectors.len(), inputs.len());
        for (&i, v) in batch.iter().zip(vectors) {
            out[i] = v;
        }
        if (n + 1) % 50 == 0 {
            let secs = started.elapsed().as_secs_f64();
            eprintln!(
                "  embedded {} / {} ({secs:.0} s)",
                (n + 1) * BATCH,
                texts.len()
            );
        }
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "embedded {} prompts in {secs:.1} s ({:.0}/s)",
        texts.len(),
        texts.len() as f64 / secs
    );
    out
}

fn ids(found: &[Neighbour]) -> Vec<u64> {
    found.iter().map(|n| n.id).collect()
}

/// Mean fraction of the exact top-K that `index` also returns.
fn recall_at_k(index: &SegmentedHnsw, exact: &[Vec<u64>], queries: &[&Vec<f32>]) -> f64 {
    let mut hits = 0;
    for (want, q) in exact.iter().zip(queries) {
        let got = ids(&index.search(q, K));
        hits += want.iter().filter(|id| got.contains(id)).count();
    }
    hits as f64 / (exact.len() * K) as f64
}

#[test]
fn segmented_hnsw_recall_at_10_on_real_prompts() {
    let path = common::data_file("recall_prompts.txt");
    let text = std::fs::read_to_string(&path).unwrap();
    let prompts: Vec<&str> = text.lines().collect();
    assert_eq!(prompts.len(), PROMPTS, "{}", path.display());
    let vectors = embed_all(&prompts);
    assert!(
        vectors
            .iter()
            .all(|v| v.len() == prompt_radar::EMBEDDING_DIM)
    );
    let dim = prompt_radar::EMBEDDING_DIM;

    let (queries, items): (Vec<_>, Vec<_>) = vectors
        .into_iter()
        .enumerate()
        .map(|(i, v)| (i as u64 + 1, 1_000 * i as i64, v))
        .partition(|(id, _, _)| (*id as usize - 1).is_multiple_of(QUERY_EVERY));
    let queries: Vec<&Vec<f32>> = queries.iter().map(|(_, _, v)| v).collect();
    assert_eq!(queries.len(), PROMPTS / QUERY_EVERY);

    let dir = tempfile::tempdir().unwrap();
    let config = SegmentsConfig {
        params: HnswParams::default(),
        max_points_per_segment: SEGMENT_POINTS,
        dir: Some(dir.path().to_path_buf()),
        ..SegmentsConfig::default()
    };
    let mut brute = BruteForceIndex::new(dim);
    let mut hnsw = SegmentedHnsw::open(config.clone(), dim).unwrap();
    let started = Instant::now();
    for chunk in items.chunks(1_000) {
        hnsw.insert_bulk(chunk).unwrap();
        hnsw.seal_if_due().unwrap();
    }
    println!(
        "indexed {} vectors in {:.1} s; segments: {:?}",
        items.len(),
        started.elapsed().as_secs_f64(),
        hnsw.segments()
            .iter()
            .map(|s| (s.count, s.sealed))
            .collect::<Vec<_>>()
    );
    for (id, _, v) in &items {
        brute.insert(*id, v).unwrap();
    }
    assert_eq!(hnsw.len(), items.len());
    assert!(hnsw.segments().len() >= 3, "several segments expected");

    let exact: Vec<Vec<u64>> = queries.iter().map(|q| ids(&brute.search(q, K))).collect();
    let started = Instant::now();
    let recall = recall_at_k(&hnsw, &exact, &queries);
    let qps = queries.len() as f64 / started.elapsed().as_secs_f64();
    println!(
        "recall@{K} (segmented HNSW vs brute force, {} queries): {recall:.4}",
        queries.len()
    );
    println!(
        "search: {qps:.0} queries/s over {} segments",
        hnsw.segments().len()
    );

    // Reload the sealed segments, re-insert what they do not cover, measure again.
    drop(hnsw);
    let mut reloaded = SegmentedHnsw::open(config, dim).unwrap();
    assert!(reloaded.missing_ranges().is_empty());
    let covered = reloaded.covered_up_to();
    let rest: Vec<_> = items
        .iter()
        .filter(|(id, _, _)| *id > covered)
        .cloned()
        .collect();
    reloaded.insert_bulk(&rest).unwrap();
    assert_eq!(reloaded.len(), items.len());
    let recall_reloaded = recall_at_k(&reloaded, &exact, &queries);
    println!("recall@{K} after dump + reload: {recall_reloaded:.4}");

    assert!(
        recall >= MIN_RECALL,
        "recall@{K} {recall:.4} < {MIN_RECALL}"
    );
    assert!(
        recall_reloaded >= MIN_RECALL,
        "recall@{K} after reload {recall_reloaded:.4}"
    );
}
