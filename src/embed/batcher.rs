//! Dynamic batching in front of the model. One dedicated OS thread owns the [`Embedder`];
//! requests arrive through a bounded channel, and the thread packs whatever is waiting into one
//! forward pass, capped by padded tokens and by request count, so concurrent requests share
//! forward passes. A full queue is an immediate [`SubmitError::Full`] (→ `RESOURCE_EXHAUSTED`),
//! never an unbounded wait. Requests whose caller has gone away are dropped before embedding.
//! Requests that wait for room (streams, [`BatcherHandle::submit`]) may fill only
//! [`waiting_share`] of the queue: the rest stays free for those that cannot wait (unary calls),
//! which a few busy streams would otherwise refuse for as long as they run.
//!
//! Requests arrive tokenised (by the submitter, on its own thread, with
//! [`Embedder::tokenizer`]), so this thread, the one that drives the GPU when there is one, does
//! nothing but run the model. A request is one or more token sequences (a prompt and its parts);
//! its vectors come back concatenated in the same order.
//!
//! Generic over the payload `T` carried beside each request, handed with its vector to a sink that
//! runs on the batcher thread: the server forwards it to the ingest stage, keeping FIFO order.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};

use super::{EmbedError, Embedder};

/// Limits of the batching queue.
#[derive(Debug, Clone)]
pub struct BatchConfig {
    /// Requests that may wait for the model; one more is refused.
    pub queue_capacity: usize,
    /// Most requests in one forward pass.
    pub max_batch_requests: usize,
    /// Most padded tokens (sequences × longest sequence) in one forward pass.
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

/// One request waiting for the model, with its payload.
pub struct Job<T> {
    /// Its token-id sequences, from [`Embedder::tokenizer`].
    pub seqs: Vec<Vec<u32>>,
    /// Carried through to the sink.
    pub payload: T,
    /// When it was queued (for queue-time metrics).
    pub queued_at: Instant,
    /// A waiting submitter's share of the queue, given back as the batcher takes the job.
    slot: Option<OwnedSemaphorePermit>,
}

/// How many of a queue's `capacity` places requests that wait for room may hold: three
/// quarters (all of a queue of one).
pub fn waiting_share(capacity: usize) -> usize {
    (capacity - capacity / 4).max(1)
}

/// What the sink receives for each request of a batch: its sequences' vectors one after the
/// other (or the batch's error).
pub type Embedded<T> = (Result<Vec<f32>, std::sync::Arc<EmbedError>>, Job<T>);

/// Submits requests to the batcher thread. Cheap to clone.
pub struct BatcherHandle<T> {
    tx: mpsc::Sender<Job<T>>,
    capacity: usize,
    /// The places of the queue that waiting submitters may hold ([`waiting_share`]).
    waiting: Arc<Semaphore>,
}

impl<T> Clone for BatcherHandle<T> {
    fn clone(&self) -> Self {
        Self {
            tx: self.tx.clone(),
            capacity: self.capacity,
            waiting: self.waiting.clone(),
        }
    }
}

impl<T: Send + 'static> BatcherHandle<T> {
    /// Fails as [`BatcherHandle::try_submit`] would on a full queue, so that a caller can refuse
    /// before preparing a request it could not queue.
    pub fn has_room(&self) -> Result<(), SubmitError> {
        if self.tx.is_closed() {
            Err(SubmitError::Closed)
        } else if self.tx.capacity() == 0 {
            Err(SubmitError::Full(self.capacity))
        } else {
            Ok(())
        }
    }

    /// Queues a request, failing at once when the queue is full.
    pub fn try_submit(&self, seqs: Vec<Vec<u32>>, payload: T) -> Result<(), SubmitError> {
        let job = Job {
            seqs,
            payload,
            queued_at: Instant::now(),
            slot: None,
        };
        self.tx.try_send(job).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => SubmitError::Full(self.capacity),
            mpsc::error::TrySendError::Closed(_) => SubmitError::Closed,
        })
    }

    /// Queues a request, waiting for room (back-pressure for streams, whose in-flight count is
    /// bounded), within the waiting submitters' share of the queue.
    pub async fn submit(&self, seqs: Vec<Vec<u32>>, payload: T) -> Result<(), SubmitError> {
        let slot = self
            .waiting
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| SubmitError::Closed)?;
        let job = Job {
            seqs,
            payload,
            queued_at: Instant::now(),
            slot: Some(slot),
        };
        self.tx.send(job).await.map_err(|_| SubmitError::Closed)
    }

    /// Requests waiting now.
    pub fn queued(&self) -> usize {
        self.capacity - self.tx.capacity()
    }

    /// The most requests that may wait.
    pub fn capacity(&self) -> usize {
        self.capacity
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
                            Some(j) => taken(j),
                            None => return, // every handle dropped: shut down
                        },
                    };
                    let mut batch = Vec::with_capacity(config.max_batch_requests);
                    let (mut rows, mut longest) = shape(&first);
                    batch.push(first);
                    while batch.len() < config.max_batch_requests.max(1) {
                        let Ok(job) = rx.try_recv().map(taken) else {
                            break;
                        };
                        let (job_rows, job_longest) = shape(&job);
                        let padded = longest.max(job_longest) * (rows + job_rows);
                        if padded > config.max_batch_tokens {
                            carry = Some(job);
                            break;
                        }
                        (rows, longest) = (rows + job_rows, longest.max(job_longest));
                        batch.push(job);
                    }
                    batch.retain(|j| !is_cancelled(&j.payload));
                    if batch.is_empty() {
                        continue;
                    }
                    sink(run(&mut embedder, batch));
                }
            })?;
        Ok((
            Self {
                thread: Some(thread),
            },
            BatcherHandle {
                tx,
                capacity,
                waiting: Arc::new(Semaphore::new(waiting_share(capacity))),
            },
        ))
    }
}

/// A job the batcher took from the queue: its place there is free again, for waiting
/// submitters too.
fn taken<T>(mut job: Job<T>) -> Job<T> {
    job.slot = None;
    job
}

/// Sequences and longest sequence of a request.
fn shape<T>(job: &Job<T>) -> (usize, usize) {
    let longest = job.seqs.iter().map(Vec::len).max().unwrap_or(0);
    (job.seqs.len(), longest)
}

/// One forward pass over every sequence of `batch`; each request gets its sequences' vectors
/// concatenated, or the pass's error.
fn run<E: Embedder, T>(embedder: &mut E, batch: Vec<Job<T>>) -> Vec<Embedded<T>> {
    let ids: Vec<&[u32]> = batch
        .iter()
        .flat_map(|j| j.seqs.iter().map(Vec::as_slice))
        .collect();
    let fail = |e: EmbedError, batch: Vec<Job<T>>| {
        let err = std::sync::Arc::new(e);
        batch.into_iter().map(|j| (Err(err.clone()), j)).collect()
    };
    let vectors = match embedder.embed_ids(&ids) {
        Ok(v) if v.len() == ids.len() => v,
        Ok(v) => {
            let msg = format!(
                "model returned {} vectors for {} inputs",
                v.len(),
                ids.len()
            );
            return fail(EmbedError::Inference(msg), batch);
        }
        Err(e) => return fail(e, batch),
    };
    let mut vectors = vectors.into_iter();
    batch
        .into_iter()
        .map(|job| {
            let parts: Vec<Vec<f32>> = vectors.by_ref().take(job.seqs.len()).collect();
            (Ok(parts.concat()), job)
        })
        .collect()
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

    /// One id per word.
    struct Words;

    impl super::super::Tokenize for Words {
        fn ids(&self, text: &str) -> Result<Vec<u32>, EmbedError> {
            Ok(text.split_whitespace().map(|w| w.len() as u32).collect())
        }
    }

    impl Embedder for GatedEmbedder {
        /// One vector per sequence: its length, then its first id.
        fn embed_ids(&mut self, ids: &[&[u32]]) -> Result<super::super::Embeddings, EmbedError> {
            self.entered.send(()).unwrap();
            self.gate.wait();
            self.batches.lock().unwrap().push(ids.len());
            Ok(ids
                .iter()
                .map(|s| vec![s.len() as f32, s.first().map_or(-1.0, |&x| x as f32)])
                .collect())
        }
        fn tokenizer(&self) -> Arc<dyn super::super::Tokenize> {
            Arc::new(Words)
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
        std::sync::mpsc::Receiver<(Vec<f32>, usize)>,
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
                    out_tx.send((v.unwrap(), j.payload)).unwrap();
                }
            },
        )
        .unwrap();
        (entered_rx, gate, batches, h, out_rx, b)
    }

    /// A request of one sequence of `len` tokens.
    fn one(len: usize) -> Vec<Vec<u32>> {
        vec![vec![7; len]]
    }

    #[test]
    fn full_queue_is_refused_and_nothing_is_lost() {
        let cfg = BatchConfig {
            queue_capacity: 4,
            max_batch_requests: 64,
            max_batch_tokens: 10_000,
        };
        let (entered, gate, batches, h, out, _b) = setup(cfg);
        assert_eq!(h.has_room(), Ok(()));
        h.try_submit(one(3), 0).unwrap();
        entered.recv().unwrap(); // the thread is inside the forward pass of batch [0]
        for i in 1..=4 {
            h.try_submit(one(3), i).unwrap();
        }
        assert_eq!(h.has_room(), Err(SubmitError::Full(4)));
        assert_eq!(h.try_submit(one(3), 99), Err(SubmitError::Full(4)));
        gate.wait(); // batch [0]
        gate.wait(); // batch [1..=4], shared forward pass
        let got: Vec<usize> = (0..5).map(|_| out.recv().unwrap().1).collect();
        assert_eq!(got, vec![0, 1, 2, 3, 4], "FIFO and complete");
        assert_eq!(*batches.lock().unwrap(), vec![1, 4]);
    }

    #[test]
    fn waiting_submitters_leave_a_quarter_of_the_queue_to_those_that_cannot_wait() {
        let cfg = BatchConfig {
            queue_capacity: 8,
            max_batch_requests: 64,
            max_batch_tokens: 10_000,
        };
        let (entered, gate, _batches, h, out, _b) = setup(cfg);
        h.try_submit(one(3), 0).unwrap();
        entered.recv().unwrap(); // the thread is inside the forward pass of batch [0]
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .build()
            .unwrap();
        // Ten streams' requests wait for room: six of them are queued, four wait.
        for i in 1..=10 {
            let h = h.clone();
            rt.spawn(async move { h.submit(one(3), i).await.unwrap() });
        }
        let started = Instant::now();
        while h.queued() < waiting_share(8) {
            assert!(started.elapsed().as_secs() < 30, "{} queued", h.queued());
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert_eq!(h.queued(), 6, "no more than their share");
        // A unary call still finds room, twice; then the queue is full.
        assert_eq!(h.has_room(), Ok(()));
        h.try_submit(one(3), 100).unwrap();
        h.try_submit(one(3), 101).unwrap();
        assert_eq!(h.try_submit(one(3), 102), Err(SubmitError::Full(8)));
        // Passes run from now on; each frees places: every request gets through, none lost.
        std::thread::spawn(move || {
            loop {
                gate.wait();
            }
        });
        let mut got: Vec<usize> = (0..13)
            .map(|_| {
                out.recv_timeout(std::time::Duration::from_secs(30))
                    .unwrap()
                    .1
            })
            .collect();
        got.sort_unstable();
        let mut want: Vec<usize> = (0..=10).collect();
        want.extend([100, 101]);
        assert_eq!(got, want);
    }

    #[test]
    fn batches_are_capped_by_padded_tokens() {
        // A cap of 10 padded tokens holds two requests of 5 tokens, or one of 5 and one of 4
        // padded to 5; a request of two sequences counts both rows.
        let cfg = BatchConfig {
            queue_capacity: 16,
            max_batch_requests: 64,
            max_batch_tokens: 10,
        };
        let (entered, gate, batches, h, out, _b) = setup(cfg);
        h.try_submit(one(5), 0).unwrap();
        entered.recv().unwrap();
        h.try_submit(one(5), 1).unwrap();
        h.try_submit(one(4), 2).unwrap();
        h.try_submit(vec![vec![1; 3], vec![2; 5]], 3).unwrap();
        h.try_submit(one(2), 4).unwrap();
        for _ in 0..4 {
            gate.wait();
        }
        let got: Vec<usize> = (0..5).map(|_| out.recv().unwrap().1).collect();
        assert_eq!(got, vec![0, 1, 2, 3, 4]);
        // [0] alone (the pass was already running), [1, 2] = 2 × 5, [3] = 2 × 5, [4].
        assert_eq!(*batches.lock().unwrap(), vec![1, 2, 2, 1]);
    }

    #[test]
    fn a_request_gets_its_sequences_vectors_in_order() {
        let cfg = BatchConfig {
            queue_capacity: 16,
            max_batch_requests: 64,
            max_batch_tokens: 10_000,
        };
        let (entered, gate, _batches, h, out, _b) = setup(cfg);
        h.try_submit(one(1), 0).unwrap();
        entered.recv().unwrap();
        h.try_submit(vec![vec![1, 2], vec![3], vec![4, 1, 1]], 1)
            .unwrap();
        h.try_submit(vec![vec![9, 9]], 2).unwrap();
        h.try_submit(Vec::new(), 3).unwrap();
        gate.wait();
        gate.wait();
        let got: Vec<(Vec<f32>, usize)> = (0..4).map(|_| out.recv().unwrap()).collect();
        assert_eq!(got[0], (vec![1.0, 7.0], 0));
        // [length, first id] per sequence, concatenated.
        assert_eq!(got[1], (vec![2.0, 1.0, 1.0, 3.0, 3.0, 4.0], 1));
        assert_eq!(got[2], (vec![2.0, 9.0], 2));
        assert_eq!(
            got[3],
            (Vec::new(), 3),
            "no sequences, no vectors, no panic"
        );
    }
}
