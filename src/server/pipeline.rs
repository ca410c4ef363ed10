//! The check pipeline: validated prompts, tokenised on the caller's thread → embedding batcher
//! thread → ingest thread → verdict. Two OS threads so that embedding the next batch overlaps
//! committing the last one; both stages are FIFO, so prompts are ingested in the order they were
//! submitted. The ingest thread coalesces whatever batches are waiting into one engine call (one
//! store commit).
//!
//! Checks are counted in [`ServerStats`] here, where their outcome is known, not by the handler
//! that waits for it: a caller that goes away (a cancel, a deadline) after the model ran still
//! has its prompt stored and counted; one that goes away before is dropped, counted as such.

use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::time::Instant;

use tokio::sync::oneshot;

use super::stats::{Outcome, ServerStats};
use crate::detect::Verdict;
use crate::embed::{BatchConfig, Batcher, BatcherHandle, Embedded, Embedder, Tokenize};
use crate::engine::{Engine, NewPrompt};
use crate::error::Error;

/// A verdict and the time the server spent on it.
pub type Timed<T> = Result<(T, std::time::Duration), Error>;

/// What rides beside each text through the batcher.
pub enum Work {
    /// A prompt to check and record.
    Check {
        text: String,
        account_id: String,
        timestamp_ms: i64,
        /// Whether the model reads it (`embed::readable`).
        readable: bool,
        reply: oneshot::Sender<Timed<Verdict>>,
    },
    /// A text to embed only (search by text).
    Embed {
        reply: oneshot::Sender<Result<Vec<f32>, Error>>,
    },
}

type IngestItem = (NewPrompt, oneshot::Sender<Timed<Verdict>>, Instant);

/// Handle to the running pipeline. Dropping it stops both threads once queues drain.
pub struct CheckPipeline {
    handle: BatcherHandle<Work>,
    tokenizer: Arc<dyn Tokenize>,
    /// Whether prompts' parts (`detect::keys::parts`) are embedded with them.
    parts: bool,
    _batcher: Batcher,
}

impl CheckPipeline {
    /// Starts the batcher thread (owning `embedder`) and the ingest thread (calling `engine`),
    /// counting each check's outcome in `stats`.
    pub fn start<E: Embedder + 'static>(
        embedder: E,
        engine: Arc<Engine>,
        batch: BatchConfig,
        stats: Arc<ServerStats>,
    ) -> std::io::Result<Self> {
        let (ingest_tx, ingest_rx) = sync_channel::<Vec<IngestItem>>(4);
        let (dim, tokenizer, parts) = (embedder.dim(), embedder.tokenizer(), engine.uses_parts());
        let ingest_stats = stats.clone();
        std::thread::Builder::new()
            .name("ingest".into())
            .spawn(move || ingest_loop(&engine, &ingest_rx, &ingest_stats))?;
        // Asked once of each job, as its batch is formed: a dropped check is counted here.
        let cancel_stats = stats.clone();
        let is_cancelled = move |w: &Work| match w {
            Work::Check { reply, .. } => {
                let gone = reply.is_closed();
                if gone {
                    cancel_stats.record(Outcome::Cancelled);
                }
                gone
            }
            Work::Embed { reply } => reply.is_closed(),
        };
        let sink = move |out: Vec<Embedded<Work>>| route(out, dim, &ingest_tx, &stats);
        let (batcher, handle) = Batcher::spawn(embedder, batch, is_cancelled, sink)?;
        Ok(Self {
            handle,
            tokenizer,
            parts,
            _batcher: batcher,
        })
    }

    /// The token sequences of a prompt: its own, then its parts' (which go through the model
    /// with it, sharing forward passes; [`route`] splits the vectors again). Runs on the caller's
    /// thread, so that requests are tokenised in parallel and the batcher only runs the model.
    fn tokenize(&self, text: &str, with_parts: bool) -> Result<Vec<Vec<u32>>, Error> {
        let parts = if with_parts && self.parts {
            crate::detect::keys::parts(text)
        } else {
            Vec::new()
        };
        std::iter::once(text)
            .chain(parts)
            .map(|t| self.tokenizer.ids(t).map_err(Error::Embed))
            .collect()
    }

    /// Whether the model reads the prompt whose sequences (its own first) are `seqs`.
    fn readable(&self, seqs: &[Vec<u32>]) -> bool {
        let own = seqs.first().map_or(&[][..], Vec::as_slice);
        crate::embed::readable(own, self.tokenizer.unknown_id())
    }

    /// Queues a prompt; fails at once with `RESOURCE_EXHAUSTED` when the queue is full.
    pub fn try_check(
        &self,
        text: String,
        account_id: String,
        timestamp_ms: i64,
    ) -> Result<oneshot::Receiver<Timed<Verdict>>, Error> {
        self.handle.has_room()?; // refuse before tokenising
        let seqs = self.tokenize(&text, true)?;
        let readable = self.readable(&seqs);
        let (reply, rx) = oneshot::channel();
        self.handle.try_submit(
            seqs,
            Work::Check {
                text,
                account_id,
                timestamp_ms,
                readable,
                reply,
            },
        )?;
        Ok(rx)
    }

    /// Queues a prompt, waiting for room (streams: their in-flight count is bounded instead).
    pub async fn check(
        &self,
        text: String,
        account_id: String,
        timestamp_ms: i64,
    ) -> Result<oneshot::Receiver<Timed<Verdict>>, Error> {
        let seqs = self.tokenize(&text, true)?;
        let readable = self.readable(&seqs);
        let (reply, rx) = oneshot::channel();
        self.handle
            .submit(
                seqs,
                Work::Check {
                    text,
                    account_id,
                    timestamp_ms,
                    readable,
                    reply,
                },
            )
            .await?;
        Ok(rx)
    }

    /// Embeds a text (for search); fails at once when the queue is full.
    pub async fn embed(&self, text: String) -> Result<Vec<f32>, Error> {
        self.handle.has_room()?; // refuse before tokenising
        let seqs = self.tokenize(&text, false)?;
        let (reply, rx) = oneshot::channel();
        self.handle.try_submit(seqs, Work::Embed { reply })?;
        rx.await
            .map_err(|_| Error::Unavailable("embedding worker stopped".into()))?
    }

    /// Requests waiting for the model now.
    pub fn queued(&self) -> usize {
        self.handle.queued()
    }

    /// The most requests that may wait for the model.
    pub fn queue_capacity(&self) -> usize {
        self.handle.capacity()
    }
}

/// Runs on the batcher thread: answers embed-only work, forwards checks to the ingest thread.
fn route(
    out: Vec<Embedded<Work>>,
    dim: usize,
    ingest_tx: &SyncSender<Vec<IngestItem>>,
    stats: &ServerStats,
) {
    let mut checks = Vec::with_capacity(out.len());
    for (vector, job) in out {
        match (job.payload, vector) {
            (Work::Embed { reply }, v) => {
                let v = v.map(|mut v| {
                    v.truncate(dim);
                    v
                });
                let _ = reply.send(v.map_err(|e| Error::Embed(clone_embed_error(&e))));
            }
            (Work::Check { reply, .. }, Err(e)) => {
                stats.record(Outcome::Failed);
                let _ = reply.send(Err(Error::Embed(clone_embed_error(&e))));
            }
            (
                Work::Check {
                    text,
                    account_id,
                    timestamp_ms,
                    readable,
                    reply,
                },
                Ok(mut embedding),
            ) => {
                let parts = embedding
                    .get(dim..)
                    .unwrap_or_default()
                    .chunks_exact(dim.max(1))
                    .map(<[f32]>::to_vec)
                    .collect();
                embedding.truncate(dim);
                let p = NewPrompt {
                    account_id,
                    timestamp_ms,
                    text,
                    embedding,
                    parts,
                    readable,
                };
                checks.push((p, reply, job.queued_at));
            }
        }
    }
    if !checks.is_empty() {
        // Blocking send: a slow store pushes back on the batcher, which pushes back on callers.
        if let Err(e) = ingest_tx.send(checks) {
            for (_, reply, _) in e.0 {
                stats.record(Outcome::Failed);
                let _ = reply.send(Err(Error::Unavailable("ingest worker stopped".into())));
            }
        }
    }
}

fn ingest_loop(engine: &Engine, rx: &Receiver<Vec<IngestItem>>, stats: &ServerStats) {
    while let Ok(mut items) = rx.recv() {
        while let Ok(more) = rx.try_recv() {
            items.extend(more);
        }
        let (prompts, rest): (Vec<NewPrompt>, Vec<_>) =
            items.into_iter().map(|(p, r, t)| (p, (r, t))).unzip();
        match engine.ingest(prompts) {
            Ok(verdicts) => {
                for (v, (reply, t)) in verdicts.into_iter().zip(rest) {
                    let took = t.elapsed();
                    stats.record(Outcome::Answered(v.action, took));
                    let _ = reply.send(Ok((v, took)));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "ingest failed");
                let msg = e.cause();
                for (reply, _) in rest {
                    stats.record(Outcome::Failed);
                    let _ = reply.send(Err(Error::Unavailable(msg.clone())));
                }
            }
        }
    }
}

fn clone_embed_error(e: &crate::embed::EmbedError) -> crate::embed::EmbedError {
    crate::embed::EmbedError::Inference(e.to_string())
}
