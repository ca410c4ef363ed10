//! Dynamic batching in front of the model. One dedicated OS thread owns the [`Embedder`];
//! requests arrive through a bounded channel, and the thread packs whatever is waiting into one
//! forward pass, capped by padded tokens and by request count, so concurrent requests share
//! forward passes. A full queue is an immediate [`SubmitError::Full`] (→ `RESOURCE_EXHAUSTED`),
//! never an unbounded wait. Requests whose caller has gone away are dropped before embedding.
//!
//! Generic over the payload `T` carried beside each text, handed with its vector to a sink that
//! runs on the batcher thread: the server forwards it to the ingest stage, keeping FIFO order.

use std::thread::JoinHandle;
use std::time::Instant;

use tokio::sync::mpsc;

use super::{EmbedError, Embedder};

/// Limits of the batching queue.
#[derive(Debug, Clone)]
pub struct BatchConfig {
    /// Requests that may wait for the model; one more is refused.
    pub queue_capacity: usize,
    /// Most requests in one forward pass.
    pub max_batch_requests: usize,
    /// Most padded tokens (requests × longest) in one forward pass.
    pub max_batch_tokens: usize,
}

impl Default for BatchConfig {
    fn default() -> Self {
        Self {
            queue_capacity: 1024,
            max_batch_requests: 64,
            max_batch_tokens: 16_384,
        }
    }
}

/// Why a request was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    /// The queue is full: the caller should back off (RESOURCE_EXHAUSTED).
    #[error("embedding queue is full ({0} waiting); retry later")]
    Full(usize),
    /// The batcher thread has stopped.
    #[error("embedding worker has stopped")]
    Closed,
}

/// One text waiting for the model, with its payload.
pub struct Job<T> {
    /// The text to embed.
    pub text: String,
    /// Carried through to the sink.
    pub payload: T,
    /// When it was queued (for queue-time metrics).
    pub queued_at: Instant,
}

/// What the sink receives for each request of a batch: its vector (or the batch's error).
pub type Embedded<T> = (Result<Vec<f32>, std::sync::Arc<EmbedError>>, Job<T>);

/// Submits texts to the batcher thread. Cheap to clone.
pub struct BatcherHandle<T> {
    tx: mpsc::Sender<Job<T>>,
    capacity: usize,
}

impl<T> Clone for BatcherHandle<T> {
    fn clone(&self) -> Self {
        Self {
            tx: self.tx.clone(),
            capacity: self.capacity,
        }
    }
}

impl<T: Send + 'static> BatcherHandle<T> {
    /// Queues a text, failing at once when the queue is full.
    pub fn try_submit(&self, text: String, payload: T) -> Result<(), SubmitError> {
        let job = Job {
            text,
            payload,
            queued_at: Instant::now(),
        };
        self.tx.try_send(job).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => SubmitError::Full(self.capacity),
            mpsc::error::TrySendError::Closed(_) => SubmitError::Closed,
        })
    }

    /// Queues a text, waiting for room (back-pressure for streams, whose in-flight count is bounded).
    pub async fn submit(&self, text: String, payload: T) -> Result<(), SubmitError> {
        let job = Job {
            text,
            payload,
            queued_at: Instant::now(),
        };
        self.tx.send(job).await.map_err(|_| SubmitError::Closed)
    }

    /// Requests waiting now.
    pub fn queued(&self) -> usize {
        self.capacity - self.tx.capacity()
    }
}

/// The batcher thread.
pub struct Batcher {
    thread: Option<JoinHandle<()>>,
}

impl Batcher {
    /// Starts the thread that owns `embedder`. `is_cancelled` tells whether a job's caller has
    /// gone; `sink` receives each batch's results in queue order.
    pub fn spawn<E, T, C, S>(
        mut embedder: E,
        config: BatchConfig,
        is_cancelled: C,
        mut sink: S,
    ) -> std::io::Result<(Self, BatcherHandle<T>)>
    where
        E: Embedder + 'static,
        T: Send + 'static,
        C: Fn(&T) -> bool + Send + 'static,
        S: FnMut(Vec<Embedded<T>>) + Send + 'static,
    {
        let capacity = config.queue_capacity.max(1);
        let (tx, mut rx) = mpsc::channel::<Job<T>>(capacity);
        let thread = std::thread::Builder::new()
            .name("embed-batcher".into())
            .spawn(move || {
                let mut carry: Option<Job<T>> = None;
                loop {
                    let first = match carry.take() {
                        Some(j) => j,
                        None => match rx.blocking_recv() {
                            Some(j) => j,
                            None => return, // every handle dropped: shut down
                        },
                    };
                    let mut batch = Vec::with_capacity(config.max_batch_requests);
                    let mut longest = embedder.count_tokens(&first.text);
                    batch.push(first);
                    while batch.len() < config.max_batch_requests.max(1) {
                        let Ok(job) = rx.try_recv() else { break };
                        let tokens = embedder.count_tokens(&job.text);
                        let padded = longest.max(tokens) * (batch.len() + 1);
                        if padded > config.max_batch_tokens {
                            carry = Some(job);
                            break;
                        }
                        longest = longest.max(tokens);
                        batch.push(job);
                    }
                    batch.retain(|j| !is_cancelled(&j.payload));
                    if batch.is_empty() {
                        continue;
                    }
                    let texts: Vec<&str> = batch.iter().map(|j| j.text.as_str()).collect();
                    let out: Vec<Embedded<T>> = match embedder.embed(&texts) {
                        Ok(vectors) if vectors.len() == batch.len() => {
                            vectors.into_iter().map(Ok).zip(batch).collect()
                        }
                        Ok(vectors) => {
                            let err = std::sync::Arc::new(EmbedError::Inference(format!(
                                "model returned {} vectors for {} texts",
                                vectors.len(),
                                batch.len()
                            )));
                            batch.into_iter().map(|j| (Err(err.clone()), j)).collect()
                        }
                        Err(e) => {
                            let err = std::sync::Arc::new(e);
                            batch.into_iter().map(|j| (Err(err.clone()), j)).collect()
                        }
                    };
                    sink(out);
                }
            })?;
        Ok((
            Self {
                thread: Some(thread),
            },
            BatcherHandle { tx, capacity },
        ))
    }
}

impl Drop for Batcher {
    fn drop(&mut self) {
        // The thread ends once every handle is dropped; do not block here on it.
        drop(self.thread.take());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Barrier, Mutex};

    /// A unit-test embedder whose forward pass waits on a barrier, so the queue state is exact.
    /// (The real model is exercised by the integration tests.)
    struct GatedEmbedder {
        entered: std::sync::mpsc::Sender<()>,
        gate: Arc<Barrier>,
        batches: Arc<Mutex<Vec<usize>>>,
    }

    impl Embedder for GatedEmbedder {
        fn embed(&mut self, texts: &[&str]) -> Result<super::super::Embeddings, EmbedError> {
            self.entered.send(()).unwrap();
            self.gate.wait();
            self.batches.lock().unwrap().push(texts.len());
            Ok(texts.iter().map(|t| vec![t.len() as f32]).collect())
        }
        fn count_tokens(&self, text: &str) -> usize {
            text.split_whitespace().count() + 2
        }
        fn dim(&self) -> usize {
            1
        }
        fn device_name(&self) -> String {
            "test".into()
        }
    }

    type Setup = (
        std::sync::mpsc::Receiver<()>,
        Arc<Barrier>,
        Arc<Mutex<Vec<usize>>>,
        BatcherHandle<usize>,
        std::sync::mpsc::Receiver<(f32, usize)>,
        Batcher,
    );

    fn setup(config: BatchConfig) -> Setup {
        let gate = Arc::new(Barrier::new(2));
        let batches = Arc::new(Mutex::new(vec![]));
        let (out_tx, out_rx) = std::sync::mpsc::channel();
        let (entered_tx, entered_rx) = std::sync::mpsc::channel();
        let e = GatedEmbedder {
            entered: entered_tx,
            gate: gate.clone(),
            batches: batches.clone(),
        };
        let (b, h) = Batcher::spawn(
            e,
            config,
            |_: &usize| false,
            move |out: Vec<Embedded<usize>>| {
                for (v, j) in out {
                    out_tx.send((v.unwrap()[0], j.payload)).unwrap();
                }
            },
        )
        .unwrap();
        (entered_rx, gate, batches, h, out_rx, b)
    }

    #[test]
    fn full_queue_is_refused_and_nothing_is_lost() {
        let cfg = BatchConfig {
            queue_capacity: 4,
            max_batch_requests: 64,
            max_batch_tokens: 10_000,
        };
        let (entered, gate, batches, h, out, _b) = setup(cfg);
        h.try_submit("first".into(), 0).unwrap();
        entered.recv().unwrap(); // the thread is inside the forward pass of batch [0]
        for i in 1..=4 {
            h.try_submit(format!("t{i}"), i).unwrap();
        }
        assert_eq!(
            h.try_submit("overflow".into(), 99),
            Err(SubmitError::Full(4))
        );
        gate.wait(); // batch [0]
        gate.wait(); // batch [1..=4], shared forward pass
        let got: Vec<usize> = (0..5).map(|_| out.recv().unwrap().1).collect();
        assert_eq!(got, vec![0, 1, 2, 3, 4], "FIFO and complete");
        assert_eq!(*batches.lock().unwrap(), vec![1, 4]);
    }

    #[test]
    fn batches_are_capped_by_padded_tokens() {
        // Each text is 3 words + 2 = 5 tokens; a cap of 10 tokens allows 2 per batch.
        let cfg = BatchConfig {
            queue_capacity: 16,
            max_batch_requests: 64,
            max_batch_tokens: 10,
        };
        let (entered, gate, batches, h, out, _b) = setup(cfg);
        h.try_submit("a b c".into(), 0).unwrap();
        entered.recv().unwrap();
        for i in 1..=4 {
            h.try_submit("a b c".into(), i).unwrap();
        }
        for _ in 0..3 {
            gate.wait();
        }
        let got: Vec<usize> = (0..5).map(|_| out.recv().unwrap().1).collect();
        assert_eq!(got, vec![0, 1, 2, 3, 4]);
        assert_eq!(*batches.lock().unwrap(), vec![1, 2, 2]);
    }
}
