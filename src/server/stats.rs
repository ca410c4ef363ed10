//! What the server answered since it started and how fast, for operators (`GetStats`,
//! `prompt-radar stats`): Check and CheckStream answers by action, refusals by kind, and the
//! server-side time of the answers (queue + embed + ingest, as `server_micros` reports it) since
//! the start and over the last minute.
//!
//! Latencies go into log-scale histograms (four buckets per doubling), so a percentile is known
//! to within a bucket: it is reported as the bucket's upper bound (at most ~25% high, never low),
//! capped by the largest time seen. Recording takes one uncontended lock, ~50 ns.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::detect::Action;

/// Buckets: 0–7 µs one each, then four per doubling up to 2^40 µs (12.7 days).
const BUCKETS: usize = 8 + 4 * 38;
/// The last minute is ten slots of six seconds (so it covers 54–60 s).
const SLOTS: usize = 10;
const SLOT_SECS: u64 = 6;

/// The bucket of a time of `us` microseconds.
fn bucket(us: u64) -> usize {
    if us < 8 {
        return us as usize;
    }
    let log = 63 - us.leading_zeros() as usize; // ≥ 3
    let quarter = ((us >> (log - 2)) & 3) as usize;
    (8 + (log - 3) * 4 + quarter).min(BUCKETS - 1)
}

/// The largest time in bucket `b`, in microseconds.
fn bucket_max(b: usize) -> u64 {
    if b < 8 {
        return b as u64;
    }
    let (log, quarter) = (3 + (b - 8) / 4, ((b - 8) % 4) as u64);
    ((5 + quarter) << (log - 2)) - 1
}

/// Counts of answer times.
#[derive(Debug, Clone)]
struct Histogram {
    counts: [u64; BUCKETS],
    max: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            counts: [0; BUCKETS],
            max: 0,
        }
    }
}

impl Histogram {
    fn record(&mut self, us: u64) {
        self.counts[bucket(us)] += 1;
        self.max = self.max.max(us);
    }

    fn add(&mut self, other: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.max = self.max.max(other.max);
    }

    fn summary(&self) -> Latency {
        let count: u64 = self.counts.iter().sum();
        let at = |q: f64| {
            // The smallest time at or above which a `1 - q` share of the answers lies.
            let rank = ((q * count as f64).ceil() as u64).max(1);
            let mut seen = 0;
            for (b, &n) in self.counts.iter().enumerate() {
                seen += n;
                if seen >= rank {
                    return bucket_max(b).min(self.max);
                }
            }
            self.max
        };
        if count == 0 {
            return Latency::default();
        }
        Latency {
            count,
            p50_us: at(0.50),
            p90_us: at(0.90),
            p99_us: at(0.99),
            max_us: self.max,
        }
    }
}

/// Answer times: how many, their percentiles (see the module documentation) and the largest.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Latency {
    /// Answers measured.
    pub count: u64,
    /// Median, microseconds.
    pub p50_us: u64,
    /// 90th percentile, microseconds.
    pub p90_us: u64,
    /// 99th percentile, microseconds.
    pub p99_us: u64,
    /// Largest, microseconds.
    pub max_us: u64,
}

/// How a Check (or one CheckStream item) ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A verdict, and the server-side time it took.
    Answered(Action, Duration),
    /// Refused: INVALID_ARGUMENT (a bad field).
    Invalid,
    /// Refused: RESOURCE_EXHAUSTED (the queue was full).
    Overloaded,
    /// Failed otherwise (the store, the model, shutting down).
    Failed,
    /// Dropped before the model ran: its caller had gone (a cancel, a deadline).
    Cancelled,
}

/// The answer times of the last minute, in slots of [`SLOT_SECS`].
#[derive(Debug, Default)]
struct Times {
    since_start: Histogram,
    /// Each slot with the number of the six-second period it holds.
    slots: Vec<(u64, Histogram)>,
}

/// The counters; shared by every handler.
#[derive(Debug)]
pub struct ServerStats {
    started: Instant,
    allowed: AtomicU64,
    reviewed: AtomicU64,
    blocked: AtomicU64,
    invalid: AtomicU64,
    overloaded: AtomicU64,
    failed: AtomicU64,
    cancelled: AtomicU64,
    times: Mutex<Times>,
}

/// A reading of [`ServerStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatsReading {
    /// Since the server started.
    pub uptime: Duration,
    /// Verdicts by action.
    pub allowed: u64,
    /// Verdicts by action.
    pub reviewed: u64,
    /// Verdicts by action.
    pub blocked: u64,
    /// Requests refused with INVALID_ARGUMENT.
    pub invalid: u64,
    /// Requests refused with RESOURCE_EXHAUSTED.
    pub overloaded: u64,
    /// Requests that failed otherwise.
    pub failed: u64,
    /// Requests dropped before the model ran, their callers gone.
    pub cancelled: u64,
    /// Answer times since the start.
    pub latency: Latency,
    /// Answer times over the last minute.
    pub latency_last_minute: Latency,
}

impl Default for ServerStats {
    fn default() -> Self {
        Self::new()
    }
}

impl ServerStats {
    /// Counters from zero, the uptime from now.
    pub fn new() -> Self {
        ServerStats {
            started: Instant::now(),
            allowed: AtomicU64::new(0),
            reviewed: AtomicU64::new(0),
            blocked: AtomicU64::new(0),
            invalid: AtomicU64::new(0),
            overloaded: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            cancelled: AtomicU64::new(0),
            times: Mutex::new(Times {
                since_start: Histogram::default(),
                slots: vec![(u64::MAX, Histogram::default()); SLOTS],
            }),
        }
    }

    /// Counts one request's outcome.
    pub fn record(&self, outcome: Outcome) {
        self.record_at(outcome, self.started.elapsed());
    }

    /// [`record`](Self::record), `at` after the start (tests give the clock).
    fn record_at(&self, outcome: Outcome, at: Duration) {
        let counter = match outcome {
            Outcome::Answered(Action::Allow, _) => &self.allowed,
            Outcome::Answered(Action::Review, _) => &self.reviewed,
            Outcome::Answered(Action::Block, _) => &self.blocked,
            Outcome::Invalid => &self.invalid,
            Outcome::Overloaded => &self.overloaded,
            Outcome::Failed => &self.failed,
            Outcome::Cancelled => &self.cancelled,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        if let Outcome::Answered(_, took) = outcome {
            let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
            let period = at.as_secs() / SLOT_SECS;
            let mut times = self.times.lock();
            times.since_start.record(us);
            let slot = &mut times.slots[(period % SLOTS as u64) as usize];
            if slot.0 != period {
                *slot = (period, Histogram::default());
            }
            slot.1.record(us);
        }
    }

    /// The counters now.
    pub fn read(&self) -> StatsReading {
        self.read_at(self.started.elapsed())
    }

    fn read_at(&self, at: Duration) -> StatsReading {
        let period = at.as_secs() / SLOT_SECS;
        let (latency, latency_last_minute) = {
            let times = self.times.lock();
            let mut minute = Histogram::default();
            for (p, h) in &times.slots {
                if *p <= period && period - p < SLOTS as u64 {
                    minute.add(h);
                }
            }
            (times.since_start.summary(), minute.summary())
        };
        let n = |c: &AtomicU64| c.load(Ordering::Relaxed);
        StatsReading {
            uptime: at,
            allowed: n(&self.allowed),
            reviewed: n(&self.reviewed),
            blocked: n(&self.blocked),
            invalid: n(&self.invalid),
            overloaded: n(&self.overloaded),
            failed: n(&self.failed),
            cancelled: n(&self.cancelled),
            latency,
            latency_last_minute,
        }
    }
}

/// The outcome a refusal's status code stands for.
pub fn refusal(code: tonic::Code) -> Outcome {
    match code {
        tonic::Code::InvalidArgument => Outcome::Invalid,
        tonic::Code::ResourceExhausted => Outcome::Overloaded,
        _ => Outcome::Failed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_contiguous_and_a_quarter_wide_at_most() {
        let mut last_max = None;
        for b in 0..BUCKETS {
            let max = bucket_max(b);
            if let Some(prev) = last_max {
                assert!(max > prev, "bucket {b}");
                assert_eq!(bucket(prev + 1), b, "the first time of bucket {b}");
                // Relative width: (max − lowest) / lowest ≤ 1/4.
                assert!(
                    (max - prev - 1) * 4 <= prev + 1,
                    "bucket {b}: {prev}..{max}"
                );
            }
            assert_eq!(bucket(max), b);
            last_max = Some(max);
        }
        assert_eq!(bucket(u64::MAX), BUCKETS - 1);
        assert_eq!(bucket(0), 0);
    }

    #[test]
    fn percentiles_are_never_low_and_at_most_a_quarter_high() {
        let stats = ServerStats::new();
        let at = Duration::from_secs(1);
        // 1..=1000 ms, once each.
        for ms in 1..=1000u64 {
            let took = Duration::from_millis(ms);
            stats.record_at(Outcome::Answered(Action::Allow, took), at);
        }
        let l = stats.read_at(at).latency;
        assert_eq!((l.count, l.max_us), (1000, 1_000_000));
        for (got, want) in [
            (l.p50_us, 500_000),
            (l.p90_us, 900_000),
            (l.p99_us, 990_000),
        ] {
            assert!(got >= want && got <= want + want / 4, "{got} for {want}");
        }
        assert_eq!(ServerStats::new().read().latency, Latency::default());
    }

    #[test]
    fn outcomes_are_counted_and_the_last_minute_forgets() {
        let stats = ServerStats::new();
        let ms = Duration::from_millis;
        let s = Duration::from_secs;
        stats.record_at(Outcome::Answered(Action::Block, ms(900)), s(0));
        stats.record_at(Outcome::Answered(Action::Allow, ms(2)), s(30));
        stats.record_at(Outcome::Answered(Action::Review, ms(3)), s(61));
        stats.record_at(Outcome::Invalid, s(61));
        stats.record_at(Outcome::Overloaded, s(62));
        stats.record_at(refusal(tonic::Code::Unavailable), s(62));
        let r = stats.read_at(s(65));
        assert_eq!(
            (r.allowed, r.reviewed, r.blocked),
            (1, 1, 1),
            "answers by action"
        );
        assert_eq!((r.invalid, r.overloaded, r.failed), (1, 1, 1));
        assert_eq!(r.latency.count, 3);
        assert_eq!(r.latency.max_us, 900_000);
        // At 65 s the last minute holds the answers of 30 s and 61 s, not the one at 0 s.
        let m = r.latency_last_minute;
        assert_eq!((m.count, m.max_us), (2, 3_000));
        // Two minutes later it is empty; since the start, nothing is forgotten.
        let r = stats.read_at(s(185));
        assert_eq!(r.latency_last_minute, Latency::default());
        assert_eq!(r.latency.count, 3);
        // A slot reused a minute later holds only the new period's answers: at 90 s, the slot of
        // 30 s; the last minute of 91 s is the answers of 61 s and 90 s.
        stats.record_at(Outcome::Answered(Action::Allow, ms(5)), s(90));
        let m = stats.read_at(s(91)).latency_last_minute;
        assert_eq!((m.count, m.max_us), (2, 5_000));
    }
}
