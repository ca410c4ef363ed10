//! The offline path shared by `reindex` and `eval`: embeds a traffic stream in large batches on
//! the calling thread and ingests it through the [`Engine`] on a second thread, so embedding
//! overlaps search/cluster/commit. Same engine, same order as the server: the verdicts equal
//! what `serve` + `check` would return for the same stream (`reindex`, which shows none, stores
//! and clusters the same without scoring each prompt).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::sync_channel;
use std::sync::{Arc, Mutex, PoisonError, TryLockError};
use std::time::{Duration, Instant};

use rayon::prelude::*;

use crate::config::Limits;
use crate::detect::Verdict;
use crate::embed::{EmbedError, Embedder};
use crate::engine::{Engine, IngestTimes, NewPrompt, embed_with_parts};
use crate::error::Error;
use crate::server::validate;
use crate::traffic::{LineError, TrafficLine};

/// Busy time per stage and counts, for the summary line.
#[derive(Debug, Clone, Copy, Default)]
pub struct StageTimes {
    /// Prompts ingested.
    pub prompts: u64,
    /// Lines rejected (malformed or invalid).
    pub bad_lines: u64,
    /// Reading, parsing and validating the input; on a pipe, also the time spent waiting for
    /// its writer.
    pub input: Duration,
    /// Tokenising and the forward pass.
    pub embed: Duration,
    /// Search, clustering, store commit and index insert.
    pub ingest: Duration,
    /// Wall time of the whole run.
    pub wall: Duration,
    /// Whether the run stopped at a bad line.
    pub stopped: bool,
    /// Whether the observer asked the run to stop ([`Observer::interrupted`]).
    pub interrupted: bool,
    /// The number of the last line read. When [`run`] returns, every line up to it has been
    /// ingested or reported bad, so a stopped run goes on from the line after it.
    pub last_line: usize,
    /// Texts that went through the model (the rest were repeats served by the [`VectorCache`]).
    pub embedded: u64,
    /// Where the ingest time went.
    pub ingest_phases: IngestTimes,
}

/// Vectors of texts already embedded, keyed by a hash of the exact text: a repeated prompt (a
/// popular one-liner, a batch job's repeated item, a re-run over the same file) is embedded once.
/// Bounded: past `capacity` texts it stops remembering new ones. It can be saved to and loaded from
/// a file, so that repeated evaluations of one traffic file skip the model (`eval --embed-cache`).
pub struct VectorCache {
    map: HashMap<u64, Vec<f32>>,
    capacity: usize,
    dim: usize,
    tag: u64,
}

/// Distinct texts a run remembers for reuse by default (about 150 MB of 384-dim vectors).
pub const DEDUPE_TEXTS: usize = 100_000;

const CACHE_MAGIC: &[u8; 8] = b"PRVCACH1";

impl VectorCache {
    /// An empty cache of at most `capacity` vectors of `dim` values, for the model identified by
    /// `tag` (see [`model_tag`]).
    pub fn new(capacity: usize, dim: usize, tag: u64) -> Self {
        Self {
            map: HashMap::new(),
            capacity,
            dim,
            tag,
        }
    }

    /// Loads a cache saved by [`VectorCache::save`]; a missing file gives an empty cache. A file
    /// written for another model or dimension, or damaged, is an error that says so.
    pub fn load(path: &Path, capacity: usize, dim: usize, tag: u64) -> std::io::Result<Self> {
        let mut cache = Self::new(capacity, dim, tag);
        let mut bytes = Vec::new();
        match std::fs::File::open(path) {
            Ok(mut f) => f.read_to_end(&mut bytes)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(cache),
            Err(e) => return Err(e),
        };
        let bad = |why: &str| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("embedding cache {}: {why}", path.display()),
            )
        };
        if bytes.len() < 32 || &bytes[..8] != CACHE_MAGIC {
            return Err(bad("not an embedding cache"));
        }
        let u64_at = |i: usize| u64::from_le_bytes(bytes[i..i + 8].try_into().unwrap_or([0; 8]));
        if u64_at(8) != tag || u64_at(16) != dim as u64 {
            return Err(bad("written for another model; delete it"));
        }
        let count = u64_at(24) as usize;
        let record = 8 + 4 * dim;
        if bytes.len() != 32 + count.saturating_mul(record) {
            return Err(bad("truncated or damaged; delete it"));
        }
        for r in bytes[32..].chunks_exact(record) {
            let key = u64::from_le_bytes(r[..8].try_into().unwrap_or([0; 8]));
            let v = r[8..]
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap_or([0; 4])))
                .collect();
            cache.map.insert(key, v);
        }
        Ok(cache)
    }

    /// A run's cache: the one in `file` (`--embed-cache`; created if missing, refused if made
    /// with another model than the one in `model_dir`), unbounded, or else one in memory that
    /// keeps up to [`DEDUPE_TEXTS`] texts, so a text repeated within a run goes through the
    /// model once (never saved, so it needs no [`model_tag`]).
    pub fn for_run(file: Option<&Path>, dim: usize, model_dir: &Path) -> std::io::Result<Self> {
        match file {
            Some(p) => Self::load(p, usize::MAX, dim, model_tag(model_dir)),
            None => Ok(Self::new(DEDUPE_TEXTS, dim, 0)),
        }
    }

    /// Writes the cache to `path` (through a temporary file and a rename).
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        let tmp = path.with_extension("tmp");
        let mut w = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
        let mut write = || -> std::io::Result<()> {
            w.write_all(CACHE_MAGIC)?;
            w.write_all(&self.tag.to_le_bytes())?;
            w.write_all(&(self.dim as u64).to_le_bytes())?;
            w.write_all(&(self.map.len() as u64).to_le_bytes())?;
            for (k, v) in &self.map {
                w.write_all(&k.to_le_bytes())?;
                for x in v {
                    w.write_all(&x.to_le_bytes())?;
                }
            }
            w.flush()
        };
        write()?;
        drop(w);
        std::fs::rename(&tmp, path)
    }

    /// Every cached vector, in a fixed order (by the hash of its text): real embeddings for
    /// index benchmarks (`benches/hnsw_params.rs`).
    pub fn vectors(&self) -> Vec<&[f32]> {
        let mut all: Vec<(&u64, &Vec<f32>)> = self.map.iter().collect();
        all.sort_unstable_by_key(|(k, _)| **k);
        all.into_iter().map(|(_, v)| v.as_slice()).collect()
    }

    /// Vectors cached.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Vectors for `texts` in order: cached ones from the cache, the rest (each distinct text once)
    /// from `embedder`. Returns the vectors, whether the model reads each of the first `judged`
    /// texts ([`crate::embed::readable`]), and how many texts the model embedded. Each text the
    /// model embeds is tokenised once, for both; a cached one only when it is judged.
    pub fn embed<E: Embedder + ?Sized>(
        &mut self,
        embedder: &mut E,
        texts: &[&str],
        judged: usize,
    ) -> Result<Cached, EmbedError> {
        let keys: Vec<u64> = texts
            .iter()
            .map(|t| xxhash_rust::xxh3::xxh3_64(t.as_bytes()))
            .collect();
        let mut todo: Vec<&str> = Vec::new();
        let mut todo_keys: Vec<u64> = Vec::new();
        let mut queued: std::collections::HashSet<u64> = std::collections::HashSet::new();
        for (t, k) in texts.iter().zip(&keys) {
            if !self.map.contains_key(k) && queued.insert(*k) {
                todo.push(t);
                todo_keys.push(*k);
            }
        }
        let tokenizer = embedder.tokenizer();
        let unknown = tokenizer.unknown_id();
        let todo_ids: Vec<Vec<u32>> = todo
            .par_iter()
            .map(|t| tokenizer.ids(t))
            .collect::<Result<_, _>>()?;
        let fresh = if todo.is_empty() {
            Vec::new()
        } else {
            let refs: Vec<&[u32]> = todo_ids.iter().map(Vec::as_slice).collect();
            embedder.embed_ids(&refs)?
        };
        let read: HashMap<u64, bool> = todo_keys
            .iter()
            .zip(&todo_ids)
            .map(|(k, ids)| (*k, crate::embed::readable(ids, unknown)))
            .collect();
        let readable = texts
            .par_iter()
            .zip(&keys)
            .take(judged)
            .map(|(t, k)| match read.get(k) {
                Some(&r) => r,
                None => crate::embed::readable(&tokenizer.ids(t).unwrap_or_default(), unknown),
            })
            .collect();
        let mut batch: HashMap<u64, Vec<f32>> = todo_keys.iter().copied().zip(fresh).collect();
        let out = keys
            .iter()
            .map(|k| {
                self.map
                    .get(k)
                    .or_else(|| batch.get(k))
                    .cloned()
                    .unwrap_or_default()
            })
            .collect();
        for (k, v) in batch.drain() {
            if self.map.len() >= self.capacity {
                break;
            }
            self.map.insert(k, v);
        }
        Ok(Cached {
            vectors: out,
            readable,
            embedded: todo.len(),
        })
    }
}

/// What [`VectorCache::embed`] returns.
#[derive(Debug)]
pub struct Cached {
    /// One vector per text, in order.
    pub vectors: Vec<Vec<f32>>,
    /// Whether the model reads each judged text.
    pub readable: Vec<bool>,
    /// Texts the model embedded (the rest came from the cache or repeated one).
    pub embedded: usize,
}

/// An identity for the model in `model_dir` (its config and the size and first MiB of its weights),
/// so that a saved [`VectorCache`] is not used with another model.
pub fn model_tag(model_dir: &Path) -> u64 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    if let Ok(c) = std::fs::read(model_dir.join("config.json")) {
        h.update(&c);
    }
    if let Ok(mut f) = std::fs::File::open(model_dir.join("model.safetensors")) {
        let mut head = vec![0u8; 1 << 20];
        let n = f.read(&mut head).unwrap_or(0);
        h.update(&head[..n]);
        h.update(&f.metadata().map(|m| m.len()).unwrap_or(0).to_le_bytes());
    }
    h.digest()
}

/// The last input line whose prompt the store has committed (0: none yet), for a run that is
/// ended abruptly (a second Ctrl-C) to say where to go on. The ingest thread holds its gate
/// while a batch commits, so [`CommittedLine::stop_commits`] answers after the commit in flight,
/// not during it, and no commit starts after it.
#[derive(Debug, Clone, Default)]
pub struct CommittedLine(Arc<(Mutex<()>, AtomicUsize)>);

impl CommittedLine {
    /// Waits for the commit in flight (if any), keeps any other from starting, for good (the
    /// process is about to exit), and returns the last committed line; `Err` with the last line
    /// known committed when the commit in flight takes longer than `patience`.
    pub fn stop_commits(&self, patience: Duration) -> Result<usize, usize> {
        let (gate, line) = &*self.0;
        let until = Instant::now() + patience;
        loop {
            let held = match gate.try_lock() {
                Ok(held) => held,
                Err(TryLockError::Poisoned(p)) => p.into_inner(),
                Err(TryLockError::WouldBlock) if Instant::now() >= until => {
                    return Err(line.load(Ordering::Acquire));
                }
                Err(TryLockError::WouldBlock) => {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                }
            };
            std::mem::forget(held);
            return Ok(line.load(Ordering::Acquire));
        }
    }

    /// Holds the gate while `commit` runs, then moves the mark to `line` if it succeeded.
    fn commit<T, E>(&self, line: usize, commit: impl FnOnce() -> Result<T, E>) -> Result<T, E> {
        let (gate, mark) = &*self.0;
        let _held = gate.lock().unwrap_or_else(PoisonError::into_inner);
        let out = commit()?;
        mark.fetch_max(line, Ordering::AcqRel);
        Ok(out)
    }
}

/// What happens to each input line.
pub trait Observer {
    /// A line that was ingested (stored, indexed, clustered), in input order.
    fn stored(&mut self, _line: usize, _input: &TrafficLine) {}
    /// Its verdict, after [`Self::stored`], when the observer asks for verdicts
    /// ([`Self::scores`]).
    fn verdict(&mut self, _line: usize, _input: &TrafficLine, _verdict: &Verdict) {}
    /// Whether the run scores each prompt's account for [`Self::verdict`]. A run that reads
    /// no verdicts (`reindex`) stores and clusters the same without ([`Engine::ingest_unscored`]).
    fn scores(&self) -> bool {
        true
    }
    /// A line that could not be used. Return `false` to stop the run.
    fn bad_line(&mut self, error: &LineError) -> bool;
    /// Asked before each line is read: `true` stops the run there (the lines read so far are
    /// embedded and ingested first). Ctrl-C on `reindex`.
    fn interrupted(&mut self) -> bool {
        false
    }
    /// Where the run records the last line it has committed, if anyone wants to know.
    fn committed_line(&self) -> Option<CommittedLine> {
        None
    }
}

/// What the input of a run gives next.
#[derive(Debug)]
pub enum Feed {
    /// A line: its number (1-based) and what it holds.
    Line(usize, Result<TrafficLine, LineError>),
    /// Nothing came for [`QUIET`] (a pipe with no writer writing): the lines read so far are
    /// embedded and stored now rather than when a batch is full, and a stop takes effect.
    Quiet,
}

/// How long a pipe may be silent before the lines read so far are stored ([`Feed::Quiet`]).
pub const QUIET: Duration = Duration::from_millis(200);

/// The longest a line read waits for its batch to fill: a pipe that trickles (a few lines a
/// second, never quiet for [`QUIET`]) has its lines stored within about this.
pub const LINGER: Duration = Duration::from_secs(1);

/// The lines of `reader` from line `first` on, read on a thread of their own: a read that
/// blocks (a pipe with nothing to give) yields [`Feed::Quiet`] every [`QUIET`] instead of
/// blocking the run. The thread reads at most 1,024 lines ahead, and ends when the input does
/// or when the iterator is dropped and it next has a line to hand over.
pub fn read_on_a_thread(
    reader: impl std::io::BufRead + Send + 'static,
    first: usize,
) -> std::io::Result<impl Iterator<Item = Feed>> {
    let (tx, rx) = sync_channel(1024);
    crate::traffic::lines_on_a_thread(reader, first, "input", move |item| tx.send(item).is_ok())?;
    Ok(std::iter::from_fn(move || {
        use std::sync::mpsc::RecvTimeoutError;
        match rx.recv_timeout(QUIET) {
            Ok((line, parsed)) => Some(Feed::Line(line, parsed)),
            Err(RecvTimeoutError::Timeout) => Some(Feed::Quiet),
            Err(RecvTimeoutError::Disconnected) => None,
        }
    }))
}

/// `lines` as a run's input, each a [`Feed::Line`].
pub fn feed(
    lines: impl Iterator<Item = (usize, Result<TrafficLine, LineError>)>,
) -> impl Iterator<Item = Feed> {
    lines.map(|(line, parsed)| Feed::Line(line, parsed))
}

/// Hands a batch's ingested lines (with their verdicts, when scored) to `observer`, in order.
fn hand_over<O: Observer>(
    observer: &mut O,
    times: &mut StageTimes,
    out: Vec<(usize, TrafficLine, Option<Verdict>)>,
) {
    for (line, t, v) in out {
        times.prompts += 1;
        observer.stored(line, &t);
        if let Some(v) = v {
            observer.verdict(line, &t, &v);
        }
    }
}

/// Runs `lines` through `embedder` and `engine` in batches of `batch_size` (a partial batch
/// when the input goes quiet, or after [`LINGER`]); a line whose prompt breaks `limits` is a
/// bad line.
pub fn run<E, I, O>(
    embedder: &mut E,
    cache: &mut VectorCache,
    engine: &Engine,
    lines: I,
    batch_size: usize,
    limits: &Limits,
    observer: &mut O,
) -> Result<StageTimes, Error>
where
    E: Embedder,
    I: Iterator<Item = Feed>,
    O: Observer,
{
    let started = Instant::now();
    let phases_before = engine.ingest_times();
    let batch_size = batch_size.max(1);
    let mut times = StageTimes::default();
    let (tx, rx) = sync_channel::<Vec<(usize, TrafficLine, (Vec<f32>, Vec<Vec<f32>>), bool)>>(4);
    let with_parts = engine.uses_parts();
    let scores = observer.scores();
    type Ingested = Vec<(usize, TrafficLine, Option<Verdict>)>;
    let (verdict_tx, verdict_rx) = std::sync::mpsc::channel::<Ingested>();
    let committed = observer.committed_line().unwrap_or_default();
    std::thread::scope(|scope| -> Result<(), Error> {
        let ingest = scope.spawn(move || -> Result<Duration, Error> {
            let mut busy = Duration::ZERO;
            for batch in rx {
                let t = Instant::now();
                let last_line = batch.last().map_or(0, |(line, ..)| *line);
                let (meta, prompts): (Vec<(usize, TrafficLine)>, Vec<NewPrompt>) = batch
                    .into_iter()
                    .map(|(line, t, (embedding, parts), readable)| {
                        let p = NewPrompt {
                            account_id: t.account_id.clone(),
                            timestamp_ms: t.timestamp_ms,
                            text: t.prompt.clone(),
                            embedding,
                            parts,
                            readable,
                        };
                        ((line, t), p)
                    })
                    .unzip();
                let out: Ingested = if scores {
                    let verdicts = committed.commit(last_line, || engine.ingest(prompts))?;
                    (meta.into_iter().zip(verdicts))
                        .map(|((l, t), v)| (l, t, Some(v)))
                        .collect()
                } else {
                    committed.commit(last_line, || engine.ingest_unscored(prompts))?;
                    meta.into_iter().map(|(l, t)| (l, t, None)).collect()
                };
                busy += t.elapsed();
                if verdict_tx.send(out).is_err() {
                    break;
                }
            }
            Ok(busy)
        });

        let mut pending: Vec<(usize, TrafficLine)> = Vec::with_capacity(batch_size);
        let mut lines = lines;
        let mut send_failed = false;
        // When the first line of `pending` was read.
        let mut pending_since = Instant::now();
        loop {
            let t = Instant::now();
            times.interrupted = observer.interrupted();
            let next = if times.interrupted {
                None
            } else {
                lines.next()
            };
            let done = next.is_none();
            let quiet = matches!(next, Some(Feed::Quiet));
            if let Some(Feed::Line(line, parsed)) = next {
                times.last_line = line;
                let checked = parsed.and_then(|t| {
                    validate::prompt(&t.account_id, &t.prompt, t.timestamp_ms, limits)
                        .map(|v| TrafficLine {
                            account_id: v.account_id,
                            prompt: v.prompt,
                            timestamp_ms: v.timestamp_ms,
                            label: t.label,
                        })
                        .map_err(|e| LineError {
                            line,
                            reason: e.to_string(),
                        })
                });
                match checked {
                    Ok(t) => {
                        if pending.is_empty() {
                            pending_since = Instant::now();
                        }
                        pending.push((line, t));
                    }
                    Err(e) => {
                        times.bad_lines += 1;
                        if !observer.bad_line(&e) {
                            times.stopped = true;
                        }
                    }
                }
            }
            times.input += t.elapsed();
            let partial = done || times.stopped || quiet || pending_since.elapsed() >= LINGER;
            if pending.len() >= batch_size || (partial && !pending.is_empty()) {
                let t = Instant::now();
                let texts: Vec<&str> = pending.iter().map(|(_, p)| p.prompt.as_str()).collect();
                let (mut embedded, mut readable) = (0, Vec::new());
                // The whole prompts come first in `all`: their readability is wanted.
                let vectors = embed_with_parts(&texts, with_parts, |all| {
                    let got = cache.embed(embedder, all, texts.len())?;
                    (embedded, readable) = (got.embedded, got.readable);
                    Ok(got.vectors)
                })?;
                times.embedded += embedded as u64;
                times.embed += t.elapsed();
                let batch: Vec<_> = pending
                    .drain(..)
                    .zip(vectors)
                    .zip(readable)
                    .map(|(((l, t), v), readable)| (l, t, v, readable))
                    .collect();
                if tx.send(batch).is_err() {
                    send_failed = true;
                }
            }
            // Hand finished verdicts to the observer in order, without waiting.
            while let Ok(out) = verdict_rx.try_recv() {
                hand_over(observer, &mut times, out);
            }
            if done || times.stopped || send_failed {
                break;
            }
        }
        drop(tx);
        let ingest_result = ingest
            .join()
            .map_err(|_| Error::Unavailable("ingest thread panicked".into()))?;
        for out in verdict_rx.try_iter() {
            hand_over(observer, &mut times, out);
        }
        times.ingest = ingest_result?;
        Ok(())
    })?;
    times.wall = started.elapsed();
    times.ingest_phases = engine.ingest_times().since(&phases_before);
    Ok(times)
}

impl StageTimes {
    /// The busiest stage, which bounds the run (the stages overlap), and the share of the run's
    /// wall time it was busy.
    pub fn bound(&self) -> (&'static str, f64) {
        let wall = self.wall.as_secs_f64().max(1e-9);
        [
            ("input", self.input),
            ("embed", self.embed),
            ("ingest", self.ingest),
        ]
        .into_iter()
        .max_by_key(|&(_, busy)| busy)
        .map_or(("input", 0.0), |(name, busy)| {
            (name, busy.as_secs_f64() / wall)
        })
    }

    /// One line: count, time, throughput end to end and per stage, where the ingest time went,
    /// and the stage that bounds the run.
    pub fn summary(&self, verb: &str) -> String {
        let rate = |d: Duration| self.prompts as f64 / d.as_secs_f64().max(1e-9);
        let (bound, share) = self.bound();
        let phases = self
            .ingest_phases
            .phases()
            .iter()
            .map(|(name, d)| format!("{name} {:.1}s", d.as_secs_f64()))
            .collect::<Vec<_>>()
            .join(", ");
        // Within ingest, the phase that took longest: lookup and index run on all cores,
        // cluster and store on one, alongside index.
        let ingest_bound = if bound == "ingest" {
            self.ingest_phases
                .phases()
                .into_iter()
                .max_by_key(|&(_, d)| d)
                .map(|(name, d)| {
                    let of = d.as_secs_f64() / self.ingest.as_secs_f64().max(1e-9);
                    format!(", most of it in {name} ({:.0}% of ingest)", of * 100.0)
                })
                .unwrap_or_default()
        } else if bound == "input" {
            // A pipe's writer that is slower than the run shows here: the run waited for it.
            ", reading the input or waiting for more of it".to_string()
        } else {
            String::new()
        };
        format!(
            "{verb}: {} prompts in {:.1}s ({:.0} prompts/s end to end), {} bad lines{}; stages: input {:.0}/s (read and parse), embed {:.0}/s ({:.1}s busy, {} distinct texts through the model), ingest {:.0}/s ({:.1}s busy: {phases}); bound by {bound} (busy {:.0}% of the run{ingest_bound})",
            self.prompts,
            self.wall.as_secs_f64(),
            rate(self.wall),
            self.bad_lines,
            if self.stopped {
                " (stopped at the first, --on-error stop)"
            } else {
                ""
            },
            rate(self.input),
            rate(self.embed),
            self.embed.as_secs_f64(),
            self.embedded,
            rate(self.ingest),
            self.ingest.as_secs_f64(),
            share * 100.0,
        )
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// A unit-test embedder that records what reaches it. (The real model is exercised by the
    /// integration tests.)
    #[derive(Default)]
    struct Counting {
        seen: Vec<String>,
    }

    /// One id per byte.
    struct Bytes;

    impl crate::embed::Tokenize for Bytes {
        fn ids(&self, text: &str) -> Result<Vec<u32>, EmbedError> {
            Ok(text.bytes().map(u32::from).collect())
        }

        fn unknown_id(&self) -> Option<u32> {
            Some(u32::from(b'?'))
        }
    }

    impl Embedder for Counting {
        /// The vector of a text: its length and first byte.
        fn embed_ids(&mut self, ids: &[&[u32]]) -> Result<crate::embed::Embeddings, EmbedError> {
            self.seen.extend(
                ids.iter()
                    .map(|s| s.iter().map(|&b| char::from(b as u8)).collect::<String>()),
            );
            Ok(ids
                .iter()
                .map(|s| vec![s.len() as f32, s.first().map_or(0.0, |&b| b as f32)])
                .collect())
        }
        fn tokenizer(&self) -> std::sync::Arc<dyn crate::embed::Tokenize> {
            std::sync::Arc::new(Bytes)
        }
        fn dim(&self) -> usize {
            2
        }
        fn device_name(&self) -> String {
            "test".into()
        }
    }

    #[test]
    fn the_cache_embeds_each_distinct_text_once_and_keeps_order() {
        let mut model = Counting::default();
        let mut cache = VectorCache::new(3, 2, 7);
        let got = cache
            .embed(&mut model, &["ab", "c", "ab", "dddd", "c"], 0)
            .unwrap();
        let (v, n) = (got.vectors, got.embedded);
        assert_eq!(n, 3);
        assert_eq!(model.seen, ["ab", "c", "dddd"]);
        let want = |t: &str| vec![t.len() as f32, f32::from(t.as_bytes()[0])];
        assert_eq!(v, ["ab", "c", "ab", "dddd", "c"].map(want));
        // Cached now: only the new text reaches the model; past capacity nothing more is kept.
        let got = cache.embed(&mut model, &["eee", "dddd", "ab"], 0).unwrap();
        assert_eq!((got.embedded, cache.len()), (1, 3));
        assert_eq!(got.vectors, ["eee", "dddd", "ab"].map(want));
        let got = cache.embed(&mut model, &["eee"], 0).unwrap();
        assert_eq!(got.embedded, 1, "over capacity: not remembered");
        // Readability of the first texts asked for, embedded ones and cached ones alike ('?' is
        // the unknown byte).
        let got = cache
            .embed(&mut model, &["ab", "cdefg?", "??x?", "dddd"], 3)
            .unwrap();
        assert_eq!(got.readable, [true, true, false]);
        assert_eq!(got.embedded, 2);
        // Saved and loaded for the same model only.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cache.bin");
        cache.save(&path).unwrap();
        let loaded = VectorCache::load(&path, 10, 2, 7).unwrap();
        assert_eq!(loaded.len(), 3);
        let other = VectorCache::load(&path, 10, 2, 8).err().unwrap();
        assert!(other.to_string().contains("another model"), "{other}");
    }

    #[test]
    fn stopping_commits_waits_for_the_one_in_flight_and_lets_no_other_start() {
        let c = CommittedLine::default();
        assert_eq!(c.commit(40, || Ok::<_, ()>(())), Ok(()));
        // A commit that fails does not move the mark.
        assert_eq!(c.commit(99, || Err::<(), _>("disk full")), Err("disk full"));
        let (started, is_started) = std::sync::mpsc::channel();
        let (finish, may_finish) = std::sync::mpsc::channel::<()>();
        let committing = c.clone();
        let commit = std::thread::spawn(move || {
            committing.commit(50, || {
                started.send(()).unwrap();
                may_finish.recv().unwrap();
                Ok::<_, ()>(())
            })
        });
        is_started.recv().unwrap();
        // Out of patience while a batch commits: the last line known, at once.
        assert_eq!(c.stop_commits(Duration::from_millis(20)), Err(40));
        let stopping = c.clone();
        let stop = std::thread::spawn(move || stopping.stop_commits(Duration::from_secs(60)));
        std::thread::sleep(Duration::from_millis(50));
        finish.send(()).unwrap();
        assert_eq!(
            stop.join().unwrap(),
            Ok(50),
            "after the commit, not during it"
        );
        commit.join().unwrap().unwrap();
        // No commit starts after that (this thread stays blocked: the process would exit).
        let (done, is_done) = std::sync::mpsc::channel();
        let late = c.clone();
        std::thread::spawn(move || {
            let _ = late.commit(60, || Ok::<_, ()>(()));
            let _ = done.send(());
        });
        assert!(is_done.recv_timeout(Duration::from_millis(100)).is_err());
    }

    /// Counts verdicts as they reach the observer.
    struct Seen(Arc<AtomicUsize>);

    impl Observer for Seen {
        fn verdict(&mut self, _line: usize, _input: &TrafficLine, _verdict: &Verdict) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
        fn bad_line(&mut self, _error: &LineError) -> bool {
            true
        }
    }

    fn traffic_line(n: usize) -> TrafficLine {
        TrafficLine {
            account_id: format!("a{n}"),
            prompt: format!("prompt number {n}"),
            timestamp_ms: 1_750_000_000_000 + n as i64,
            label: None,
        }
    }

    /// A quiet input has the lines read so far stored and answered at once, not when a batch
    /// fills or the input ends: a pipe fed now and then (a log tail) is indexed as it comes.
    #[test]
    fn a_quiet_input_has_its_partial_batch_stored() {
        let dir = tempfile::tempdir().unwrap();
        let engine =
            Engine::open(crate::config::EngineConfig::with_data_dir(dir.path()), 2).unwrap();
        let seen = Arc::new(AtomicUsize::new(0));
        let watched = seen.clone();
        let (mut n, started) = (0, Instant::now());
        let mut answered_before_the_end = None;
        let input = std::iter::from_fn(|| {
            n += 1;
            if n <= 3 {
                return Some(Feed::Line(n, Ok(traffic_line(n))));
            }
            // Quiet until the three are answered (or long enough to tell they never are).
            let answered = watched.load(Ordering::SeqCst);
            if answered < 3 && started.elapsed() < Duration::from_secs(20) {
                std::thread::sleep(Duration::from_millis(5));
                return Some(Feed::Quiet);
            }
            answered_before_the_end = Some(answered);
            None
        });
        let mut cache = VectorCache::new(16, 2, 0);
        let times = run(
            &mut Counting::default(),
            &mut cache,
            &engine,
            input,
            256,
            &Limits::default(),
            &mut Seen(seen.clone()),
        )
        .unwrap();
        assert_eq!(answered_before_the_end, Some(3));
        assert_eq!((times.prompts, engine.len()), (3, 3));
    }

    /// A blocked read (a pipe with nothing to give) is reported as quiet, not waited on.
    #[cfg(unix)]
    #[test]
    fn a_blocked_read_is_quiet_and_the_end_of_the_input_ends_it() {
        use std::io::Write as _;
        let (reader, mut writer) = std::os::unix::net::UnixStream::pair().unwrap();
        let line = r#"{"account_id": "a", "prompt": "hi", "timestamp_ms": 1750000000000}"#;
        writeln!(writer, "{line}").unwrap();
        let mut feed = read_on_a_thread(std::io::BufReader::new(reader), 1).unwrap();
        assert!(matches!(feed.next(), Some(Feed::Line(1, Ok(t))) if t.prompt == "hi"));
        let t = Instant::now();
        assert!(matches!(feed.next(), Some(Feed::Quiet)));
        assert!(t.elapsed() >= QUIET);
        writeln!(writer, "not json").unwrap();
        assert!(matches!(feed.next(), Some(Feed::Line(2, Err(_)))));
        drop(writer);
        assert!(feed.next().is_none());
    }

    #[test]
    fn the_busiest_stage_bounds_the_run() {
        let times = StageTimes {
            prompts: 1000,
            wall: Duration::from_secs(10),
            input: Duration::from_millis(200),
            embed: Duration::from_secs(4),
            ingest: Duration::from_secs(9),
            ingest_phases: IngestTimes {
                batches: 4,
                lookup: Duration::from_secs(3),
                cluster: Duration::from_millis(500),
                store: Duration::from_millis(1500),
                index: Duration::from_secs(4),
            },
            ..StageTimes::default()
        };
        let (stage, share) = times.bound();
        assert_eq!(stage, "ingest");
        assert!((share - 0.9).abs() < 1e-9, "{share}");
        let line = times.summary("reindex");
        assert!(
            line.contains("lookup 3.0s, cluster 0.5s, store 1.5s, index 4.0s"),
            "{line}"
        );
        assert!(
            line.contains(
                "bound by ingest (busy 90% of the run, most of it in index (44% of ingest))"
            ),
            "{line}"
        );
        assert!(line.contains("100 prompts/s end to end"), "{line}");
    }

    #[test]
    fn a_run_that_waited_for_its_input_is_bound_by_input() {
        let times = StageTimes {
            prompts: 100,
            wall: Duration::from_secs(10),
            input: Duration::from_secs(9),
            embed: Duration::from_secs(1),
            ingest: Duration::from_millis(500),
            ..StageTimes::default()
        };
        let line = times.summary("reindex");
        assert!(
            line.contains(
                "bound by input (busy 90% of the run, reading the input or waiting for more of it)"
            ),
            "{line}"
        );
        assert!(
            line.contains("stages: input 11/s (read and parse)"),
            "{line}"
        );
    }
}
