//! The offline path shared by `reindex` and `eval`: embeds a traffic stream in large batches on
//! the calling thread and ingests it through the [`Engine`] on a second thread, so embedding
//! overlaps search/cluster/commit. Same engine, same order as the server: the verdicts equal
//! what `serve` + `check` would return for the same stream.

use std::sync::mpsc::sync_channel;
use std::time::{Duration, Instant};

use crate::config::Limits;
use crate::detect::Verdict;
use crate::embed::Embedder;
use crate::engine::{Engine, NewPrompt};
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
    /// Reading, parsing and validating.
    pub parse: Duration,
    /// Tokenising and the forward pass.
    pub embed: Duration,
    /// Search, clustering, store commit and index insert.
    pub ingest: Duration,
    /// Wall time of the whole run.
    pub wall: Duration,
    /// Whether the run stopped at a bad line.
    pub stopped: bool,
}

/// What happens to each input line.
pub trait Observer {
    /// A line that was ingested, with its verdict (in input order).
    fn verdict(&mut self, line: usize, input: &TrafficLine, verdict: &Verdict);
    /// A line that could not be used. Return `false` to stop the run.
    fn bad_line(&mut self, error: &LineError) -> bool;
}

/// Runs `lines` through `embedder` and `engine` in batches of `batch_size`.
pub fn run<E, I, O>(
    embedder: &mut E,
    engine: &Engine,
    lines: I,
    batch_size: usize,
    observer: &mut O,
) -> Result<StageTimes, Error>
where
    E: Embedder,
    I: Iterator<Item = (usize, Result<TrafficLine, LineError>)>,
    O: Observer,
{
    let started = Instant::now();
    let limits = Limits::default();
    let batch_size = batch_size.max(1);
    let mut times = StageTimes::default();
    let (tx, rx) = sync_channel::<Vec<(usize, TrafficLine, Vec<f32>)>>(4);
    let (verdict_tx, verdict_rx) = std::sync::mpsc::channel::<Vec<(usize, TrafficLine, Verdict)>>();
    std::thread::scope(|scope| -> Result<(), Error> {
        let ingest = scope.spawn(move || -> Result<Duration, Error> {
            let mut busy = Duration::ZERO;
            for batch in rx {
                let t = Instant::now();
                let (meta, prompts): (Vec<(usize, TrafficLine)>, Vec<NewPrompt>) = batch
                    .into_iter()
                    .map(|(line, t, embedding)| {
                        let p = NewPrompt {
                            account_id: t.account_id.clone(),
                            timestamp_ms: t.timestamp_ms,
                            text: t.prompt.clone(),
                            embedding,
                        };
                        ((line, t), p)
                    })
                    .unzip();
                let verdicts = engine.ingest(prompts)?;
                busy += t.elapsed();
                let out = meta
                    .into_iter()
                    .zip(verdicts)
                    .map(|((l, t), v)| (l, t, v))
                    .collect();
                if verdict_tx.send(out).is_err() {
                    break;
                }
            }
            Ok(busy)
        });

        let mut pending: Vec<(usize, TrafficLine)> = Vec::with_capacity(batch_size);
        let mut lines = lines;
        let mut send_failed = false;
        loop {
            let t = Instant::now();
            let next = lines.next();
            let done = next.is_none();
            if let Some((line, parsed)) = next {
                let checked = parsed.and_then(|t| {
                    validate::prompt(&t.account_id, &t.prompt, t.timestamp_ms, &limits)
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
                    Ok(t) => pending.push((line, t)),
                    Err(e) => {
                        times.bad_lines += 1;
                        if !observer.bad_line(&e) {
                            times.stopped = true;
                        }
                    }
                }
            }
            times.parse += t.elapsed();
            if pending.len() >= batch_size || ((done || times.stopped) && !pending.is_empty()) {
                let t = Instant::now();
                let texts: Vec<&str> = pending.iter().map(|(_, p)| p.prompt.as_str()).collect();
                let vectors = embedder.embed(&texts)?;
                times.embed += t.elapsed();
                let batch: Vec<_> = pending
                    .drain(..)
                    .zip(vectors)
                    .map(|((l, t), v)| (l, t, v))
                    .collect();
                if tx.send(batch).is_err() {
                    send_failed = true;
                }
            }
            // Hand finished verdicts to the observer in order, without waiting.
            while let Ok(out) = verdict_rx.try_recv() {
                for (line, t, v) in out {
                    times.prompts += 1;
                    observer.verdict(line, &t, &v);
                }
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
            for (line, t, v) in out {
                times.prompts += 1;
                observer.verdict(line, &t, &v);
            }
        }
        times.ingest = ingest_result?;
        Ok(())
    })?;
    times.wall = started.elapsed();
    Ok(times)
}

impl StageTimes {
    /// One line: count, time, throughput end to end and per stage.
    pub fn summary(&self, verb: &str) -> String {
        let rate = |d: Duration| self.prompts as f64 / d.as_secs_f64().max(1e-9);
        format!(
            "{verb}: {} prompts in {:.1}s ({:.0} prompts/s end to end), {} bad lines{}; stages: parse {:.0}/s, embed {:.0}/s ({:.1}s busy), ingest {:.0}/s ({:.1}s busy: search+cluster+store+index)",
            self.prompts,
            self.wall.as_secs_f64(),
            rate(self.wall),
            self.bad_lines,
            if self.stopped {
                " (stopped at the first, --on-error stop)"
            } else {
                ""
            },
            rate(self.parse),
            rate(self.embed),
            self.embed.as_secs_f64(),
            rate(self.ingest),
            self.ingest.as_secs_f64(),
        )
    }
}
