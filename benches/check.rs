//! The gateway's path: unary `Check` through a real gRPC server on 127.0.0.1:0 (validate →
//! embed queue → model → search → cluster → store commit → verdict), one client at a time and
//! 8 concurrent clients (which share forward passes and store commits); and what operators'
//! counters cost: recording an answer (on every Check) and a `GetStats` call (a dashboard's poll).

#![allow(clippy::unwrap_used)] // benches and tests may panic on setup failures

use std::net::SocketAddr;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use prompt_radar::config::{Config, DeviceKind, EngineConfig, Limits};
use prompt_radar::detect::Action;
use prompt_radar::embed::BatchConfig;
use prompt_radar::proto::{CheckRequest, GetStatsRequest, radar_client::RadarClient};
use prompt_radar::server::stats::{Outcome, ServerStats};
use prompt_radar::server::{Prepared, bind};

const CONCURRENCY: usize = 8;
const LATENCY_CALLS: usize = 300;

fn model_dir() -> std::path::PathBuf {
    std::env::var_os("PROMPT_RADAR_MODEL")
        .map(Into::into)
        .unwrap_or_else(|| {
            std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/all-MiniLM-L6-v2")
        })
}

fn prompts() -> Vec<String> {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/recall_prompts.txt");
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut v: Vec<String> = text.lines().take(5_000).map(str::to_string).collect();
    if v.is_empty() {
        v = (0..1000)
            .map(|i| format!("What is {i} times {}?", i + 7))
            .collect();
    }
    v
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = Config {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        model_dir: model_dir(),
        device: DeviceKind::Cpu,
        engine: EngineConfig::with_data_dir(dir.path()),
        batch: BatchConfig::default(),
        limits: Limits::default(),
        auth_token: None,
    };
    let prepared = Prepared::load(&config).expect("model loads");
    let addr = rt.block_on(async {
        let (listener, addr) = bind(config.listen).await.unwrap();
        tokio::spawn(prepared.serve(listener, std::future::pending()));
        addr
    });
    let client = rt
        .block_on(RadarClient::connect(format!("http://{addr}")))
        .unwrap();
    let texts = prompts();
    let mut i = 0usize;
    let mut next = move || {
        i += 1;
        CheckRequest {
            account_id: format!("acct-{}", i % 97),
            prompt: texts[i % texts.len()].clone(),
            timestamp_ms: 1_750_000_000_000 + i as i64,
            request_id: String::new(),
        }
    };

    // Percentiles of single unary calls (criterion reports means and medians; p99 matters to a
    // gateway), printed before the criterion groups.
    let calls = if std::env::args().any(|a| a == "--bench") {
        LATENCY_CALLS
    } else {
        3
    }; // 3 under `cargo test`
    let mut lat: Vec<Duration> = (0..calls)
        .map(|_| {
            let r = next();
            let t = std::time::Instant::now();
            rt.block_on(client.clone().check(r)).unwrap();
            t.elapsed()
        })
        .collect();
    lat.sort();
    let pct = |p: f64| lat[((lat.len() - 1) as f64 * p).round() as usize].as_secs_f64() * 1e3;
    eprintln!(
        "check/unary latency over {calls} sequential calls: p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        pct(0.5),
        pct(0.9),
        pct(0.99),
        pct(1.0)
    );
    // The server's own account of the same calls (its time excludes the network and tonic).
    let s = rt
        .block_on(client.clone().get_stats(GetStatsRequest {}))
        .unwrap()
        .into_inner();
    let l = s.latency.unwrap_or_default();
    eprintln!(
        "check/unary GetStats: {} answers, server-side p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        l.count,
        l.p50_us as f64 / 1e3,
        l.p90_us as f64 / 1e3,
        l.p99_us as f64 / 1e3,
        l.max_us as f64 / 1e3
    );

    let mut g = c.benchmark_group("check");
    g.sample_size(20).measurement_time(Duration::from_secs(10));
    g.throughput(Throughput::Elements(1));
    g.bench_function("unary_sequential", |b| {
        b.iter(|| rt.block_on(client.clone().check(next())).unwrap());
    });
    g.throughput(Throughput::Elements(CONCURRENCY as u64));
    g.bench_function(format!("unary_{CONCURRENCY}_concurrent"), |b| {
        b.iter(|| {
            let reqs: Vec<CheckRequest> = (0..CONCURRENCY).map(|_| next()).collect();
            rt.block_on(async {
                let calls: Vec<_> = reqs
                    .into_iter()
                    .map(|r| {
                        let mut c = client.clone();
                        tokio::spawn(async move { c.check(r).await })
                    })
                    .collect();
                for call in calls {
                    call.await.unwrap().unwrap();
                }
            })
        });
    });
    g.finish();

    let mut g = c.benchmark_group("stats");
    g.throughput(Throughput::Elements(1));
    let stats = ServerStats::new();
    let mut us = 0u64;
    g.bench_function("record_an_answer", |b| {
        b.iter(|| {
            us = (us + 997) % 50_000;
            stats.record(Outcome::Answered(Action::Allow, Duration::from_micros(us)));
        });
    });
    g.bench_function("get_stats_rpc", |b| {
        b.iter(|| {
            rt.block_on(client.clone().get_stats(GetStatsRequest {}))
                .unwrap()
        });
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
