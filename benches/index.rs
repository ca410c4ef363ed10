//! Vector index speed at N = 20,000 seeded random unit vectors of dimension 384: HNSW search QPS
//! (one graph, and the same data in time segments), exact brute-force search for comparison, and
//! HNSW insert throughput (serial and parallel batches); and the comparisons of an ingest batch's
//! prompts with the batch's earlier ones (`batch_pairs`: one dot product per pair, as ingest did,
//! against the blocked matrix product it does now).
//!
//! Data: with `CLUSTERS = 0`, normalised standard-normal vectors — the worst case for HNSW (no
//! structure, every distance alike: recall@10 at ef 64 is only ~0.3). By default each vector is a
//! random cluster centre plus normal noise (`NOISE`), normalised, which gives cosines like real
//! sentence embeddings (~0.75 to its centre, ~0.55 within a cluster, ~0 across). The recall
//! printed at start-up is for this data; `tests/it/recall.rs` measures it on real prompts.
//! Run: `cargo bench --bench index` (about two minutes on 2 cores).

#![allow(clippy::unwrap_used)] // benches and tests may panic on setup failures

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use hnsw_rs::prelude::Distance;
use prompt_radar::index::pairs::{BLOCK_ROWS, Rows, even_blocks};
use prompt_radar::index::{
    BruteForceIndex, DistDotClamped, HnswIndex, HnswParams, SegmentedHnsw, SegmentsConfig,
    VectorInsert, VectorSearch,
};
use rayon::prelude::*;

/// Vectors indexed before searching.
const N: usize = 20_000;
/// Dimension (all-MiniLM-L6-v2).
const DIM: usize = 384;
/// Distinct query vectors, cycled through.
const QUERIES: usize = 1_000;
/// Neighbours asked per query.
const K: usize = 10;
/// Vectors per segment in the segmented variant (4 segments at N = 20,000).
const SEGMENT_POINTS: usize = 5_000;
/// Vectors per measured insert: a serial batch and a parallel (`parallel_insert`) batch.
const SERIAL_BATCH: usize = 100;
const PARALLEL_BATCH: usize = 1_000;
/// Criterion settings: its minimum sample count, short warm-up and measurement.
const SAMPLE_SIZE: usize = 10;
const WARM_UP: Duration = Duration::from_secs(1);
const MEASUREMENT: Duration = Duration::from_secs(5);
const SEED: u64 = 0x5EED_1DE5;
/// Cluster centres (0: plain random unit vectors) and the noise added to a centre.
const CLUSTERS: usize = 500;
const NOISE: f32 = 0.9;

/// SplitMix64 + Box–Muller: a seeded source of random unit vectors.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 1.0) / (1u64 << 53) as f64
    }

    fn unit_vector(&mut self) -> Vec<f32> {
        let v: Vec<f32> = (0..DIM)
            .map(|_| {
                let (u1, u2) = (self.uniform(), self.uniform());
                ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
            })
            .collect();
        normalised(v)
    }
}

fn normalised(mut v: Vec<f32>) -> Vec<f32> {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.iter_mut().for_each(|x| *x /= norm);
    v
}

/// The test distribution: see the module documentation.
struct Data {
    rng: Rng,
    centres: Vec<Vec<f32>>,
}

impl Data {
    fn new(seed: u64) -> Self {
        let mut rng = Rng(seed);
        let centres = (0..CLUSTERS).map(|_| rng.unit_vector()).collect();
        Data { rng, centres }
    }

    fn vector(&mut self) -> Vec<f32> {
        let noise = self.rng.unit_vector();
        if self.centres.is_empty() {
            return noise;
        }
        let c = &self.centres[(self.rng.next_u64() % self.centres.len() as u64) as usize];
        normalised(c.iter().zip(noise).map(|(c, n)| c + NOISE * n).collect())
    }
}

fn bench_index(c: &mut Criterion) {
    let mut rng = Data::new(SEED);
    let data: Vec<Vec<f32>> = (0..N).map(|_| rng.vector()).collect();
    let queries: Vec<Vec<f32>> = (0..QUERIES).map(|_| rng.vector()).collect();
    let items: Vec<(u64, &[f32])> = (1..).zip(data.iter().map(Vec::as_slice)).collect();

    let mut brute = BruteForceIndex::new(DIM);
    for &(id, v) in &items {
        brute.insert(id, v).expect("brute insert");
    }
    let params = HnswParams {
        max_elements: N * 2,
        ..HnswParams::default()
    };
    let mut hnsw = HnswIndex::new(params, DIM);
    let started = Instant::now();
    hnsw.parallel_insert(&items).expect("parallel insert");
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "index bench: built HNSW over {N} vectors in {secs:.1} s ({:.0} inserts/s, parallel)",
        N as f64 / secs
    );

    let config_for = |params| SegmentsConfig {
        params,
        max_points_per_segment: SEGMENT_POINTS,
        ..SegmentsConfig::default()
    };
    let mut segmented = SegmentedHnsw::open(config_for(params), DIM).expect("open");
    let bulk: Vec<(u64, i64, Vec<f32>)> = (1..)
        .zip(data.iter().cloned())
        .map(|(id, v)| (id, 0, v))
        .collect();
    for chunk in bulk.chunks(SEGMENT_POINTS) {
        segmented.insert_bulk(chunk).expect("bulk insert");
        segmented.seal_if_due().expect("seal");
    }
    // The same segments after the background merges the engine runs (here waited for).
    let mut merged = SegmentedHnsw::open(
        SegmentsConfig {
            merge_max_points: N,
            merge_threads: 2,
            ..config_for(params)
        },
        DIM,
    )
    .expect("open");
    for chunk in bulk.chunks(SEGMENT_POINTS) {
        merged.insert_bulk(chunk).expect("bulk insert");
        merged.seal_if_due().expect("seal");
    }
    let started = Instant::now();
    let merges = merged.merge_all();
    eprintln!(
        "index bench: {merges} merges of {} segments into {} in {:.1} s",
        segmented.segments().len(),
        merged.segments().len(),
        started.elapsed().as_secs_f64()
    );

    let recall = |index: &dyn VectorSearch| {
        let mut hits = 0;
        for q in queries.iter().take(200) {
            let want: Vec<u64> = brute.search(q, K).iter().map(|n| n.id).collect();
            hits += index
                .search(q, K)
                .iter()
                .filter(|n| want.contains(&n.id))
                .count();
        }
        hits as f64 / (200 * K) as f64
    };
    eprintln!(
        "index bench: recall@{K} on this data: one graph {:.3}, {} segments {:.3}, merged {:.3}",
        recall(&hnsw),
        segmented.segments().len(),
        recall(&segmented),
        recall(&merged)
    );

    let mut group = c.benchmark_group("index");
    group
        .sample_size(SAMPLE_SIZE)
        .warm_up_time(WARM_UP)
        .measurement_time(MEASUREMENT);

    group.throughput(Throughput::Elements(1));
    let searchers: [(&str, &dyn VectorSearch); 4] = [
        ("search_hnsw_k10", &hnsw),
        ("search_segmented_k10", &segmented),
        ("search_merged_k10", &merged),
        ("search_brute_k10", &brute),
    ];
    for (name, index) in searchers {
        let mut i = 0;
        group.bench_function(name, |b| {
            b.iter(|| {
                i = (i + 1) % QUERIES;
                black_box(index.search(black_box(&queries[i]), K))
            })
        });
    }

    // Inserts grow the 20k graph further (hnsw_rs cannot delete): each batch is fresh vectors.
    let mut next_id = N as u64 + 1;
    for (name, batch, parallel) in [
        ("insert_hnsw_serial", SERIAL_BATCH, false),
        ("insert_hnsw_parallel", PARALLEL_BATCH, true),
    ] {
        group.throughput(Throughput::Elements(batch as u64));
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let vs: Vec<Vec<f32>> = (0..batch).map(|_| rng.vector()).collect();
                    let items: Vec<(u64, &[f32])> =
                        (next_id..).zip(vs.iter().map(Vec::as_slice)).collect();
                    next_id += batch as u64;
                    let started = Instant::now();
                    if parallel {
                        hnsw.parallel_insert(&items).expect("parallel insert");
                    } else {
                        for &(id, v) in &items {
                            hnsw.insert(id, v).expect("insert");
                        }
                    }
                    total += started.elapsed();
                }
                total
            })
        });
    }
    group.finish();
    eprintln!("index bench: HNSW holds {} vectors at the end", hnsw.len());
}

/// Prompts in an ingest batch (what `reindex` on a GPU node uses), and a similarity threshold
/// low enough that this data has pairs above it (the engine links at 0.85 on real vectors).
const PAIRS_BATCH: usize = 4_096;
const PAIRS_THRESHOLD: f32 = 0.5;

/// Each of a batch's vectors against every earlier one, counting the pairs at or above the
/// threshold, on all cores: one dot product per pair (ingest until this bench was added) and
/// blocked matrix products (`index::pairs`, what ingest does now).
fn bench_batch_pairs(c: &mut Criterion) {
    let mut rng = Data::new(SEED ^ 1);
    let batch: Vec<Vec<f32>> = (0..PAIRS_BATCH).map(|_| rng.vector()).collect();
    let by_dot = || -> usize {
        (0..batch.len())
            .into_par_iter()
            .map(|i| {
                (0..i)
                    .filter(|&j| 1.0 - DistDotClamped.eval(&batch[i], &batch[j]) >= PAIRS_THRESHOLD)
                    .count()
            })
            .sum()
    };
    let by_gemm = || -> usize {
        let rows = Rows::new(DIM, batch.iter().map(Vec::as_slice));
        let blocks = even_blocks(batch.len(), BLOCK_ROWS);
        let per_row = rows.earlier_similarities(&blocks, true, |_, block| {
            (block.rows.clone())
                .map(|r| {
                    block.row(r)[..r]
                        .iter()
                        .filter(|&&s| s >= PAIRS_THRESHOLD)
                        .count()
                })
                .collect()
        });
        per_row.into_iter().sum()
    };
    eprintln!(
        "index bench: {PAIRS_BATCH} vectors, pairs at cosine >= {PAIRS_THRESHOLD}: {} by dot \
         products, {} by matrix products",
        by_dot(),
        by_gemm()
    );
    let mut group = c.benchmark_group("batch_pairs");
    group
        .sample_size(SAMPLE_SIZE)
        .warm_up_time(WARM_UP)
        .measurement_time(MEASUREMENT)
        .throughput(Throughput::Elements(PAIRS_BATCH as u64));
    group.bench_function("dot_per_pair_4096", |b| b.iter(|| black_box(by_dot())));
    group.bench_function("blocked_gemm_4096", |b| b.iter(|| black_box(by_gemm())));
    group.finish();
}

criterion_group!(benches, bench_batch_pairs, bench_index);
criterion_main!(benches);
