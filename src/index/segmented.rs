//! Time-segmented HNSW: hnsw_rs cannot delete, so the index is a list of HNSW graphs, one per
//! slice of traffic. Inserts go to the one *active* segment; when it is full or spans too much
//! time it is *sealed* (dumped to disk when a directory is configured) and a new one starts.
//! Queries fan out over every segment; retention drops whole sealed segments. Because every
//! query visits every segment, adjacent sealed segments are *merged* in the background (a new
//! graph built from both on a thread of its own, then swapped in through the manifest), by
//! tiers, up to [`SegmentsConfig::merge_max_points`] vectors.
//!
//! On disk (`dir`): each sealed segment's dump (`seg-NNNNNN.hnsw.*`, see [`HnswIndex::dump`]) and
//! `manifest.json`, rewritten atomically after every seal, drop or checkpoint: the list of sealed
//! segments with their id and time ranges, and the active segment's checkpoint if there is one.
//! The active segment is written only by [`SegmentedHnsw::checkpoint`] (a clean shutdown, the end
//! of a `reindex`), and reloaded on open to go on growing; the store is the source of truth, and
//! the engine re-inserts the prompts after [`SegmentedHnsw::covered_up_to`] (after a crash: all
//! those since the last checkpoint or seal).

use std::collections::HashSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::brute::by_similarity;
use super::hnsw::{io_err, sync_dir, write_atomic};
use super::{HnswIndex, HnswParams, IndexError, Neighbour, VectorInsert, VectorSearch};

const MANIFEST: &str = "manifest.json";
const MANIFEST_FORMAT: u32 = 1;

/// Settings of a [`SegmentedHnsw`].
#[derive(Debug, Clone)]
pub struct SegmentsConfig {
    /// HNSW parameters of every segment.
    pub params: HnswParams,
    /// The active segment is sealed once it holds this many vectors.
    pub max_points_per_segment: usize,
    /// ... or once its timestamps span more than this many milliseconds (`None`: by size
    /// alone). Time slices are what retention drops; without retention each one is only one
    /// more graph that every search visits.
    pub segment_span_ms: Option<i64>,
    /// Sealed segments whose newest prompt is older than this are dropped; `None` keeps all.
    pub retention_ms: Option<i64>,
    /// Where sealed segments and the manifest live; `None` keeps everything in memory.
    pub dir: Option<PathBuf>,
    /// Two adjacent sealed segments are merged, in the background, into one of at most this
    /// many vectors (0: never). Every search visits every segment, so fewer, larger graphs
    /// answer faster; with retention, a merged segment spans at most a quarter of it.
    pub merge_max_points: usize,
    /// Threads a merge inserts with.
    pub merge_threads: usize,
}

impl Default for SegmentsConfig {
    fn default() -> Self {
        SegmentsConfig {
            params: HnswParams::default(),
            max_points_per_segment: 200_000,
            segment_span_ms: None,
            retention_ms: None,
            dir: None,
            merge_max_points: 1_000_000,
            merge_threads: std::thread::available_parallelism().map_or(1, |n| (n.get() / 4).max(1)),
        }
    }
}

/// What one segment holds. Ranges are meaningless while `count` is 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentInfo {
    /// Smallest prompt id in the segment.
    pub first_id: u64,
    /// Largest prompt id in the segment.
    pub last_id: u64,
    /// Earliest prompt timestamp (ms since the epoch).
    pub min_ts: i64,
    /// Latest prompt timestamp (ms since the epoch).
    pub max_ts: i64,
    /// Number of vectors.
    pub count: usize,
    /// False for the active segment.
    pub sealed: bool,
}

impl SegmentInfo {
    fn note(&mut self, id: u64, ts: i64) {
        if self.count == 0 {
            (self.first_id, self.last_id, self.min_ts, self.max_ts) = (id, id, ts, ts);
        } else {
            self.first_id = self.first_id.min(id);
            self.last_id = self.last_id.max(id);
            self.min_ts = self.min_ts.min(ts);
            self.max_ts = self.max_ts.max(ts);
        }
        self.count += 1;
    }

    fn overlaps_time(&self, from_ms: Option<i64>, to_ms: Option<i64>) -> bool {
        self.count > 0
            && from_ms.is_none_or(|from| self.max_ts >= from)
            && to_ms.is_none_or(|to| self.min_ts <= to)
    }
}

/// When an active segment sliced by time is due to seal, from its prompts' times alone: ingest
/// and `reindex`'s look at its input share it.
///
/// A slice starts at the newest time seen before it (the first slice at its first prompt's) and
/// is due once its newest prompt is more than the span past that start. A prompt more than the
/// span older than the start is *late*: it goes into the slice being filled, and retention keeps
/// it until that slice's newest prompt expires. Late prompts among current ones (a gateway
/// draining a backlog while it serves, a client clock days behind) therefore never seal a
/// segment of a batch or so each, as a rule on the segment's own oldest and newest time would:
/// every segment holding both would span too long at once. Only a run of late prompts in a row
/// (a second shard of a file, a backlog replayed on its own) means the traffic went back in time:
/// the segment seals, and the next slice starts at that run's newest time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SliceClock {
    span_ms: i64,
    /// Late prompts in a row that mean the traffic went back in time.
    went_back: u64,
    /// Where the slice being filled starts; `None` until the first slice's first prompt.
    start: Option<i64>,
    /// Newest time in the slice being filled.
    newest: Option<i64>,
    /// Late prompts in a row at the end of the slice, and the newest of them.
    run: u64,
    run_newest: i64,
}

impl SliceClock {
    /// A clock for `config`'s time slices (`None` without them), its slice starting at `start`.
    /// A run of a sixty-fourth of a segment's size, up to 4,096, means the traffic went back.
    pub fn for_config(config: &SegmentsConfig, start: Option<i64>) -> Option<Self> {
        let went_back = (config.max_points_per_segment / 64).clamp(1, 4_096) as u64;
        config.segment_span_ms.map(|span_ms| SliceClock {
            span_ms,
            went_back,
            start,
            newest: None,
            run: 0,
            run_newest: 0,
        })
    }

    /// Notes the time of a prompt put in the slice.
    pub fn note(&mut self, ts: i64) {
        let start = *self.start.get_or_insert(ts);
        self.newest = Some(self.newest.map_or(ts, |n| n.max(ts)));
        let late = ts < start.saturating_sub(self.span_ms);
        if !late {
            self.run = 0;
        } else if self.run == 0 {
            (self.run, self.run_newest) = (1, ts);
        } else {
            (self.run, self.run_newest) = (self.run + 1, self.run_newest.max(ts));
        }
    }

    /// Whether the slice is due to seal: it spans past its start, or the traffic went back.
    pub fn due(&self) -> bool {
        let aged = match (self.start, self.newest) {
            (Some(start), Some(newest)) => newest.saturating_sub(start) > self.span_ms,
            _ => false,
        };
        aged || self.went_back()
    }

    /// Whether a prompt sent at `ts` would take the slice being filled past its span: a batch
    /// that comes after a gap in traffic then starts a slice of its own, rather than sealing
    /// with (and keeping from retention) the prompts from before the gap.
    pub fn due_before(&self, ts: i64) -> bool {
        self.newest.is_some()
            && self
                .start
                .is_some_and(|start| ts.saturating_sub(start) > self.span_ms)
    }

    fn went_back(&self) -> bool {
        self.run >= self.went_back
    }

    /// Starts the next slice, once the segment is sealed (for its time or its size).
    pub fn sealed(&mut self) {
        let next = if self.went_back() {
            Some(self.run_newest)
        } else {
            self.newest.max(self.start)
        };
        (self.start, self.newest, self.run) = (next, None, 0);
    }

    /// The longest a slice spans.
    pub fn span_ms(&self) -> i64 {
        self.span_ms
    }

    /// Where the slice being filled starts.
    pub fn start(&self) -> Option<i64> {
        self.start
    }

    /// The newest time in the slice being filled.
    pub fn newest(&self) -> Option<i64> {
        self.newest
    }

    /// The clock [`SegmentedHnsw::open`] resumes from `m`: the manifest's slice, or the newest
    /// sealed time in manifests from before it was kept.
    fn from_manifest(config: &SegmentsConfig, m: &Manifest) -> Option<Self> {
        let newest_sealed = m.segments.iter().map(|e| e.info.max_ts).max();
        SliceClock::for_config(config, m.slice_start_ms.or(newest_sealed))
    }

    /// Takes up a reloaded active segment's slice: its prompts' times are not noted again.
    fn resume(&mut self, active: &SegmentInfo) {
        if active.count > 0 {
            self.start = self.start.or(Some(active.min_ts));
            self.newest = Some(active.max_ts);
        }
    }
}

/// One sealed segment as listed in the manifest.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct SegmentEntry {
    basename: String,
    #[serde(flatten)]
    info: SegmentInfo,
    /// The active segment's checkpoint: the name of its dump, `{basename}.cN`, a new one at each
    /// checkpoint, so that the manifest, written after it, is the one commit point (absent:
    /// the dump is under `basename`, as earlier versions wrote it, and as a sealed one is).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    dump: Option<String>,
}

impl SegmentEntry {
    /// The basename of its dump's files.
    fn dump_name(&self) -> &str {
        self.dump.as_deref().unwrap_or(&self.basename)
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Manifest {
    format: u32,
    dim: usize,
    /// Number of the next segment to seal (names are never reused).
    next_segment: u64,
    /// Highest id ever sealed, including segments since dropped by retention.
    sealed_up_to: u64,
    segments: Vec<SegmentEntry>,
    /// The active segment as of its last checkpoint (its dump holds exactly `count` vectors).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    active: Option<SegmentEntry>,
    /// Where the active segment's time slice starts (see [`SliceClock`]); absent in manifests
    /// written before it was kept, where the newest sealed time stands in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    slice_start_ms: Option<i64>,
}

#[derive(Debug)]
struct Segment {
    /// Shared only by a sealed segment with a merge that reads it.
    index: Arc<HnswIndex>,
    entry: SegmentEntry,
}

/// A merge running on its own thread: the names of its two inputs, and the merged segment it
/// returns (dumped when there is a directory).
#[derive(Debug)]
struct Merge {
    inputs: [String; 2],
    output: String,
    thread: JoinHandle<Result<Segment, IndexError>>,
}

/// HNSW split into time segments; see the module documentation.
#[derive(Debug)]
pub struct SegmentedHnsw {
    config: SegmentsConfig,
    dim: usize,
    active: Segment,
    sealed: Vec<Segment>,
    /// Listed in the manifest but failed to load: kept there until re-covered by a new seal.
    lost: Vec<SegmentEntry>,
    next_segment: u64,
    sealed_up_to: u64,
    /// The manifest's checkpoint of the active segment, while that dump is a prefix of it.
    checkpointed: Option<SegmentEntry>,
    merging: Option<Merge>,
    /// When the active segment is due for its time span (`None`: sealed by size alone).
    clock: Option<SliceClock>,
    /// After a seal failed (an unwritable or full disk), when the next may be tried.
    seal_retry_at: Option<Instant>,
}

/// How long after a failed seal the next is tried: the active segment meanwhile grows past its
/// size (searches stay right), and a disk that stays unwritable costs one attempt, and one
/// warning, a minute rather than one a batch.
pub const SEAL_RETRY: Duration = Duration::from_secs(60);

impl SegmentedHnsw {
    /// Opens the index: with `config.dir` holding a manifest, reloads every sealed segment in it.
    /// A segment whose files are missing or damaged is skipped with a warning and reported by
    /// [`missing_ranges`](Self::missing_ranges); an unreadable manifest means starting empty
    /// (the caller then re-inserts everything from the store). Only creating `dir` can fail.
    pub fn open(config: SegmentsConfig, dim: usize) -> Result<Self, IndexError> {
        let clock = SliceClock::for_config(&config, None);
        let mut me = SegmentedHnsw {
            active: Segment::empty(&config, dim, 1),
            config,
            dim,
            sealed: Vec::new(),
            lost: Vec::new(),
            next_segment: 1,
            sealed_up_to: 0,
            checkpointed: None,
            merging: None,
            clock,
            seal_retry_at: None,
        };
        let Some(dir) = me.config.dir.clone() else {
            return Ok(me);
        };
        fs::create_dir_all(&dir).map_err(|e| io_err(&dir, e))?;
        let manifest = match read_manifest(&dir, dim) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "index manifest unreadable: starting with an empty index");
                return Ok(me);
            }
        };
        if let Some(m) = manifest {
            me.next_segment = m.next_segment;
            me.sealed_up_to = m.sealed_up_to;
            me.clock = SliceClock::from_manifest(&me.config, &m);
            let loaded: Vec<(SegmentEntry, Result<HnswIndex, IndexError>)> = m
                .segments
                .into_par_iter()
                .map(|entry| {
                    let index = HnswIndex::load(&dir, &entry.basename);
                    (entry, index)
                })
                .collect();
            for (entry, index) in loaded {
                match index {
                    Ok(mut index) if index.dim() == dim && index.len() == entry.info.count => {
                        // Searches use today's setting, whatever the graph was built with.
                        index.set_ef_search(me.config.params.ef_search);
                        let index = Arc::new(index);
                        me.sealed.push(Segment { index, entry });
                    }
                    Ok(_) => {
                        tracing::warn!(segment = %entry.basename, "segment does not match the manifest; to be rebuilt");
                        me.lost.push(entry);
                    }
                    Err(e) => {
                        tracing::warn!(segment = %entry.basename, error = %e, "segment failed to load; to be rebuilt");
                        me.lost.push(entry);
                    }
                }
            }
            me.active = Segment::empty(&me.config, dim, me.next_segment);
            if let Some(entry) = m.active {
                match HnswIndex::load(&dir, entry.dump_name()) {
                    Ok(mut index)
                        if index.dim() == dim
                            && index.len() == entry.info.count
                            && entry.basename == me.active.entry.basename =>
                    {
                        index.set_ef_search(me.config.params.ef_search);
                        if let Some(clock) = &mut me.clock {
                            clock.resume(&entry.info);
                        }
                        me.active = Segment {
                            index: Arc::new(index),
                            entry: entry.clone(),
                        };
                        me.checkpointed = Some(entry);
                    }
                    // A dump that is not the one the manifest counted (a checkpoint of an
                    // earlier version, under the segment's own name, that a seal overwrote
                    // before crashing): the store re-inserts those prompts instead.
                    Ok(_) => {
                        tracing::warn!(segment = %entry.basename, "active checkpoint does not match the manifest; to be rebuilt");
                    }
                    Err(e) => {
                        tracing::warn!(segment = %entry.basename, error = %e, "active checkpoint failed to load; to be rebuilt");
                    }
                }
            }
        }
        remove_orphans(&dir, &me.listed());
        Ok(me)
    }

    /// The slice clock [`open`](Self::open) would resume, and the vectors of the active
    /// segment's checkpoint, read from `config.dir`'s manifest alone (no graph is loaded): for a
    /// look at an input before a run. `None` without time slices; a fresh clock without a
    /// readable manifest.
    pub fn clock_on_disk(config: &SegmentsConfig) -> Option<(SliceClock, usize)> {
        let fresh = SliceClock::for_config(config, None)?;
        let manifest = config.dir.as_ref().and_then(|dir| {
            let raw = fs::read(dir.join(MANIFEST)).ok()?;
            serde_json::from_slice::<Manifest>(&raw).ok()
        });
        let Some(m) = manifest else {
            return Some((fresh, 0));
        };
        let mut clock = SliceClock::from_manifest(config, &m)?;
        let active = m.active.map(|e| e.info);
        if let Some(info) = &active {
            clock.resume(info);
        }
        Some((clock, active.map_or(0, |i| i.count)))
    }

    /// Highest prompt id on disk, in sealed segments (loaded or since dropped by retention) or
    /// in the active segment's checkpoint (0 if none). After [`open`](Self::open), prompts with
    /// larger ids must be re-inserted, and those in [`missing_ranges`](Self::missing_ranges)
    /// despite being lower.
    pub fn covered_up_to(&self) -> u64 {
        let checkpoint = self.checkpointed.as_ref().map_or(0, |e| e.info.last_id);
        self.sealed_coverage().max(checkpoint)
    }

    /// Like [`covered_up_to`](Self::covered_up_to), for the sealed segments alone: what the
    /// manifest may promise without a checkpoint.
    fn sealed_coverage(&self) -> u64 {
        let loaded = self.sealed.iter().map(|s| s.entry.info.last_id);
        loaded.fold(self.sealed_up_to, u64::max)
    }

    /// The newest prompt time in the index (any segment's; `None` when empty): the data's
    /// clock, by which retention expires segments.
    pub fn newest_ms(&self) -> Option<i64> {
        let entries = self.sealed.iter().map(|s| &s.entry);
        entries
            .chain(std::iter::once(&self.active.entry))
            .filter(|e| e.info.count > 0)
            .map(|e| e.info.max_ts)
            .max()
    }

    /// The first and last id of every segment loaded from disk (the sealed ones and the active
    /// segment's checkpoint), each with its segment's time span `(id, min_ts, max_ts)`: for the
    /// caller to check that the index on disk is its store's.
    pub fn loaded_ends(&self) -> Vec<(u64, i64, i64)> {
        let entries = self.sealed.iter().map(|s| &s.entry);
        entries
            .chain(self.checkpointed.iter())
            .filter(|e| e.info.count > 0)
            .flat_map(|e| {
                let i = &e.info;
                [
                    (i.first_id, i.min_ts, i.max_ts),
                    (i.last_id, i.min_ts, i.max_ts),
                ]
            })
            .collect()
    }

    /// The vector held under `id`, from the segment whose id range holds it (looked up, not
    /// searched for; linear in that segment's size).
    pub fn vector_of(&self, id: u64) -> Option<Vec<f32>> {
        std::iter::once(&self.active)
            .chain(&self.sealed)
            .filter(|s| (s.entry.info.first_id..=s.entry.info.last_id).contains(&id))
            .find_map(|s| s.index.vector_of(id))
    }

    /// Inclusive id ranges of sealed segments that failed to load. Re-insert their prompts
    /// before the next seal, which forgets the ranges it overlaps.
    pub fn missing_ranges(&self) -> Vec<(u64, u64)> {
        let ranges = self.lost.iter().map(|e| (e.info.first_id, e.info.last_id));
        ranges.collect()
    }

    /// The active segment's graph, to insert into (merges only ever share sealed ones).
    fn active_mut(&mut self) -> Result<&mut HnswIndex, IndexError> {
        Arc::get_mut(&mut self.active.index)
            .ok_or_else(|| IndexError::Io("the active segment is shared".into()))
    }

    /// Inserts a vector into the active segment.
    pub fn insert(&mut self, id: u64, timestamp_ms: i64, vector: &[f32]) -> Result<(), IndexError> {
        self.active_mut()?.insert(id, vector)?;
        self.active.entry.info.note(id, timestamp_ms);
        if let Some(clock) = &mut self.clock {
            clock.note(timestamp_ms);
        }
        Ok(())
    }

    /// Inserts many vectors into the active segment on all cores (restart rebuilds, reindex).
    /// Nothing is inserted unless every vector is valid.
    pub fn insert_bulk<V: AsRef<[f32]>>(
        &mut self,
        items: &[(u64, i64, V)],
    ) -> Result<(), IndexError> {
        let refs: Vec<(u64, &[f32])> = items.iter().map(|(id, _, v)| (*id, v.as_ref())).collect();
        self.active_mut()?.parallel_insert(&refs)?;
        for (id, ts, _) in items {
            self.active.entry.info.note(*id, *ts);
            if let Some(clock) = &mut self.clock {
                clock.note(*ts);
            }
        }
        Ok(())
    }

    /// Seals the active segment when it is full or spans more than `segment_span_ms`: dumps it
    /// (with `dir` set), rewrites the manifest, then starts an empty active segment. Call only
    /// after the store has committed the inserted prompts. On error nothing changes but that
    /// the next seal waits [`SEAL_RETRY`].
    pub fn seal_if_due(&mut self) -> Result<bool, IndexError> {
        let info = self.active.entry.info;
        let full = info.count >= self.config.max_points_per_segment.max(1);
        let long = self.clock.is_some_and(|c| c.due());
        if info.count == 0 || !(full || long) {
            return Ok(false);
        }
        self.seal_now()
    }

    /// Seals the active segment before prompts sent at `oldest_ms` and after go in, when its time
    /// slice would not hold them (see [`SliceClock::due_before`]). Same terms as
    /// [`seal_if_due`](Self::seal_if_due).
    pub fn seal_before(&mut self, oldest_ms: i64) -> Result<bool, IndexError> {
        let due = self.clock.is_some_and(|c| c.due_before(oldest_ms));
        if self.active.entry.info.count == 0 || !due {
            return Ok(false);
        }
        self.seal_now()
    }

    /// Seals the active segment unless a failed seal is waiting to be retried.
    fn seal_now(&mut self) -> Result<bool, IndexError> {
        if self.seal_retry_at.is_some_and(|at| Instant::now() < at) {
            return Ok(false);
        }
        let sealed = self.seal();
        self.seal_retry_at = sealed.is_err().then(|| Instant::now() + SEAL_RETRY);
        sealed.map(|()| true)
    }

    /// [`seal_if_due`](Self::seal_if_due)'s seal.
    fn seal(&mut self) -> Result<(), IndexError> {
        let mut clock = self.clock;
        if let Some(clock) = &mut clock {
            clock.sealed();
        }
        let mut entry = self.active.entry.clone();
        entry.info.sealed = true;
        entry.dump = None;
        let sealed_up_to = self.sealed_up_to.max(entry.info.last_id);
        let (forgotten, kept): (Vec<SegmentEntry>, Vec<SegmentEntry>) =
            self.lost.iter().cloned().partition(|l| {
                l.info.first_id <= entry.info.last_id && entry.info.first_id <= l.info.last_id
            });
        if let Some(dir) = &self.config.dir {
            self.active.index.dump(dir, &entry.basename)?;
            let mut segments = self.listed_entries(&kept);
            segments.push(entry.clone());
            let next = self.next_segment + 1;
            let slice_start = clock.and_then(|c| c.start());
            write_manifest(
                dir,
                self.dim,
                next,
                sealed_up_to,
                segments,
                None,
                slice_start,
            )?;
            remove_segment_files(dir, forgotten.iter().map(|e| e.basename.as_str()));
            // The last checkpoint's dump is no longer listed (one of an earlier version was
            // under the segment's own name: the sealed dump replaced it).
            if let Some(dump) = self.checkpointed.as_ref().and_then(|e| e.dump.as_deref()) {
                remove_segment_files(dir, [dump]);
            }
        }
        self.checkpointed = None;
        self.clock = clock;
        self.lost = kept;
        self.next_segment += 1;
        self.sealed_up_to = sealed_up_to;
        let fresh = Segment::empty(&self.config, self.dim, self.next_segment);
        let old = std::mem::replace(&mut self.active, fresh);
        self.sealed.push(Segment {
            index: old.index,
            entry,
        });
        Ok(())
    }

    /// Background merging of sealed segments, one merge at a time: installs a finished merge
    /// (the manifest names the merged segment, then the inputs' files go) and starts the next
    /// one that [`SegmentsConfig::merge_max_points`] allows. Returns whether a merge was
    /// installed. Cheap when there is nothing to do; the engine calls it after every batch.
    /// A failed merge, or one whose inputs were dropped meanwhile, is discarded with a warning.
    pub fn merge_step(&mut self) -> bool {
        let installed = match self.merging.take() {
            Some(m) if !m.thread.is_finished() => {
                self.merging = Some(m);
                return false;
            }
            Some(m) => self.install(m),
            None => false,
        };
        self.start_merge();
        installed
    }

    /// Waits for the running merge, and for every merge it makes possible (tests, benches).
    pub fn merge_all(&mut self) -> usize {
        let mut installed = 0;
        self.start_merge();
        while let Some(m) = self.merging.take() {
            installed += usize::from(self.install(m));
            self.start_merge();
        }
        installed
    }

    /// Whether a merge is running.
    pub fn is_merging(&self) -> bool {
        self.merging.is_some()
    }

    /// Installs the result of `m` (waiting for it); false when it failed or is stale.
    fn install(&mut self, m: Merge) -> bool {
        let merged = match m.thread.join() {
            Ok(Ok(merged)) => merged,
            Ok(Err(e)) => {
                tracing::warn!(segment = %m.output, error = %e, "segment merge failed; inputs kept");
                self.discard(&m.output);
                return false;
            }
            Err(_) => {
                tracing::warn!(segment = %m.output, "segment merge panicked; inputs kept");
                self.discard(&m.output);
                return false;
            }
        };
        let names: Vec<&str> = self
            .sealed
            .iter()
            .map(|s| s.entry.basename.as_str())
            .collect();
        let Some(at) = names.windows(2).position(|w| w == m.inputs) else {
            tracing::info!(segment = %m.output, "an input was dropped while merging; merge discarded");
            self.discard(&m.output);
            return false;
        };
        if let Some(dir) = &self.config.dir {
            let mut segments = self.listed_entries(&self.lost);
            segments.splice(at..at + 2, [merged.entry.clone()]);
            if let Err(e) = self.rewrite_manifest(dir, segments, self.checkpointed.clone()) {
                tracing::warn!(error = %e, "cannot rewrite the index manifest; merge discarded");
                self.discard(&m.output);
                return false;
            }
        }
        let inputs: Vec<Segment> = self.sealed.splice(at..at + 2, [merged]).collect();
        if let Some(dir) = &self.config.dir {
            remove_segment_files(dir, inputs.iter().map(|s| s.entry.basename.as_str()));
        }
        true
    }

    /// Removes what a discarded merge wrote.
    fn discard(&self, basename: &str) {
        if let Some(dir) = &self.config.dir {
            remove_segment_files(dir, [basename]);
        }
    }

    /// The adjacent sealed pair to merge next: both together within `merge_max_points` (and a
    /// quarter of the retention), the older at most twice the newer (so merges go by tiers and
    /// each vector is re-inserted a few times at most), the smallest such pair first.
    fn merge_candidate(&self) -> Option<usize> {
        let cap = self.config.merge_max_points;
        let max_span = self.config.retention_ms.map(|r| r / 4);
        (0..self.sealed.len().saturating_sub(1))
            .filter(|&i| {
                let (a, b) = (self.sealed[i].entry.info, self.sealed[i + 1].entry.info);
                let span = a
                    .max_ts
                    .max(b.max_ts)
                    .saturating_sub(a.min_ts.min(b.min_ts));
                a.count + b.count <= cap
                    && a.count <= 2 * b.count
                    && max_span.is_none_or(|m| span <= m)
            })
            .min_by_key(|&i| self.sealed[i].entry.info.count + self.sealed[i + 1].entry.info.count)
    }

    /// Starts merging the next candidate pair on a thread of its own, unless a merge runs.
    fn start_merge(&mut self) {
        if self.merging.is_some() || self.config.merge_max_points == 0 {
            return;
        }
        let Some(i) = self.merge_candidate() else {
            return;
        };
        let (a, b) = (&self.sealed[i], &self.sealed[i + 1]);
        let mut info = a.entry.info;
        info.first_id = info.first_id.min(b.entry.info.first_id);
        info.last_id = info.last_id.max(b.entry.info.last_id);
        info.min_ts = info.min_ts.min(b.entry.info.min_ts);
        info.max_ts = info.max_ts.max(b.entry.info.max_ts);
        info.count += b.entry.info.count;
        let entry = SegmentEntry {
            basename: merged_name(&a.entry.basename, &b.entry.basename),
            info,
            dump: None,
        };
        let inputs = [a.entry.basename.clone(), b.entry.basename.clone()];
        let graphs = [a.index.clone(), b.index.clone()];
        let params = HnswParams {
            max_elements: info.count,
            ..self.config.params
        };
        let (dim, dir, threads) = (self.dim, self.config.dir.clone(), self.config.merge_threads);
        let output = entry.basename.clone();
        let spawned = std::thread::Builder::new()
            .name("index-merge".into())
            .spawn(move || merge(graphs, entry, params, dim, dir, threads));
        match spawned {
            Ok(thread) => {
                tracing::info!(segment = %output, vectors = info.count, "merging index segments");
                self.merging = Some(Merge {
                    inputs,
                    output,
                    thread,
                });
            }
            Err(e) => tracing::warn!(error = %e, "cannot start a segment merge"),
        }
    }

    /// Dumps the active segment and records it in the manifest, so that the next
    /// [`open`](Self::open) reloads it and goes on inserting into it instead of rebuilding it
    /// from the store. Returns the vectors written: 0 without `dir`, for an empty active
    /// segment, or when it has not changed since its last checkpoint. Call only after the store
    /// has committed the inserted prompts. On error the previous checkpoint stays valid.
    pub fn checkpoint(&mut self) -> Result<usize, IndexError> {
        let Some(dir) = &self.config.dir else {
            return Ok(0);
        };
        let info = self.active.entry.info;
        if info.count == 0 || self.checkpointed.as_ref().map(|e| e.info) == Some(info) {
            return Ok(0);
        }
        // Under a new name: a crash before the manifest names it leaves the last checkpoint
        // listed and whole, and the next start re-inserts from the store only what came after.
        let previous = self
            .checkpointed
            .as_ref()
            .map(|e| e.dump_name().to_string());
        let number = previous
            .as_deref()
            .and_then(|d| d.rsplit_once(".c"))
            .and_then(|(_, n)| n.parse::<u64>().ok())
            .unwrap_or(0)
            + 1;
        let mut entry = self.active.entry.clone();
        entry.dump = Some(format!("{}.c{number}", entry.basename));
        self.active.index.dump(dir, entry.dump_name())?;
        self.rewrite_manifest(dir, self.listed_entries(&self.lost), Some(entry.clone()))?;
        if let Some(previous) = previous {
            remove_segment_files(dir, [previous.as_str()]);
        }
        self.checkpointed = Some(entry);
        Ok(info.count)
    }

    /// Drops the sealed segments (and lost ones) whose newest prompt is older than
    /// `now_ms − retention_ms`: rewrites the manifest, then deletes their files. Returns how
    /// many were dropped; 0 without retention or when the manifest cannot be written (logged).
    pub fn drop_expired(&mut self, now_ms: i64) -> usize {
        let Some(retention) = self.config.retention_ms else {
            return 0;
        };
        let cutoff = now_ms.saturating_sub(retention);
        let expired = |e: &SegmentEntry| e.info.max_ts < cutoff;
        let n_sealed = self.sealed.iter().filter(|s| expired(&s.entry)).count();
        let n_lost = self.lost.iter().filter(|e| expired(e)).count();
        if n_sealed + n_lost == 0 {
            return 0;
        }
        let lost: Vec<SegmentEntry> = self.lost.iter().filter(|e| !expired(e)).cloned().collect();
        if let Some(dir) = &self.config.dir {
            let mut segments = self.listed_entries(&lost);
            segments.retain(|e| !expired(e));
            if let Err(e) = self.rewrite_manifest(dir, segments, self.checkpointed.clone()) {
                tracing::warn!(error = %e, "cannot rewrite the index manifest; expired segments kept");
                return 0;
            }
        }
        self.sealed_up_to = self.sealed_coverage();
        let (gone, kept): (Vec<Segment>, Vec<Segment>) = std::mem::take(&mut self.sealed)
            .into_iter()
            .partition(|s| expired(&s.entry));
        let mut gone: Vec<SegmentEntry> = gone.into_iter().map(|s| s.entry).collect();
        gone.extend(self.lost.iter().filter(|e| expired(e)).cloned());
        self.sealed = kept;
        self.lost = lost;
        if let Some(dir) = &self.config.dir {
            remove_segment_files(dir, gone.iter().map(|e| e.basename.as_str()));
        }
        gone.len()
    }

    /// Like [`search`](VectorSearch::search), but only over segments whose time range overlaps
    /// `[from_ms, to_ms]` (either bound optional). Prompts are not filtered one by one.
    pub fn search_range(
        &self,
        query: &[f32],
        k: usize,
        from_ms: Option<i64>,
        to_ms: Option<i64>,
    ) -> Vec<Neighbour> {
        let mut all: Vec<Neighbour> = std::iter::once(&self.active)
            .chain(&self.sealed)
            .filter(|s| s.entry.info.overlaps_time(from_ms, to_ms))
            .flat_map(|s| s.index.search(query, k))
            .collect();
        all.sort_unstable_by(by_similarity);
        let mut seen = HashSet::with_capacity(all.len());
        all.retain(|n| seen.insert(n.id));
        all.truncate(k);
        all
    }

    /// Sealed segments in sealing order, then the active one if it holds anything.
    pub fn segments(&self) -> Vec<SegmentInfo> {
        let active = Some(self.active.entry.info).filter(|i| i.count > 0);
        let sealed = self.sealed.iter().map(|s| s.entry.info);
        sealed.chain(active).collect()
    }

    /// The vector dimension this index accepts.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Number of vectors over all segments.
    pub fn len(&self) -> usize {
        self.sealed.iter().map(|s| s.index.len()).sum::<usize>() + self.active.index.len()
    }

    /// True when no segment holds anything.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Writes the manifest listing `segments` as sealed and `active` as the active segment's
    /// checkpoint, with this index's numbering, coverage and time slice as they are.
    fn rewrite_manifest(
        &self,
        dir: &Path,
        segments: Vec<SegmentEntry>,
        active: Option<SegmentEntry>,
    ) -> Result<(), IndexError> {
        let (next, up_to) = (self.next_segment, self.sealed_coverage());
        let slice_start = self.slice_start();
        write_manifest(dir, self.dim, next, up_to, segments, active, slice_start)
    }

    /// Where the active segment's time slice starts, when segments are sliced by time.
    fn slice_start(&self) -> Option<i64> {
        self.clock.and_then(|c| c.start())
    }

    /// Manifest entries of the loaded sealed segments followed by `lost`.
    fn listed_entries(&self, lost: &[SegmentEntry]) -> Vec<SegmentEntry> {
        let sealed = self.sealed.iter().map(|s| s.entry.clone());
        sealed.chain(lost.iter().cloned()).collect()
    }

    /// Basenames the manifest references.
    fn listed(&self) -> HashSet<String> {
        let entries = self.listed_entries(&self.lost);
        let active = self.checkpointed.iter().map(|e| e.dump_name().to_string());
        entries
            .into_iter()
            .map(|e| e.basename)
            .chain(active)
            .collect()
    }
}

impl VectorSearch for SegmentedHnsw {
    fn search(&self, query: &[f32], k: usize) -> Vec<Neighbour> {
        self.search_range(query, k, None, None)
    }

    fn len(&self) -> usize {
        SegmentedHnsw::len(self)
    }
}

impl Segment {
    fn empty(config: &SegmentsConfig, dim: usize, number: u64) -> Self {
        let max_elements = config
            .params
            .max_elements
            .min(config.max_points_per_segment);
        let params = HnswParams {
            max_elements,
            ..config.params
        };
        let info = SegmentInfo {
            first_id: 0,
            last_id: 0,
            min_ts: 0,
            max_ts: 0,
            count: 0,
            sealed: false,
        };
        let basename = format!("seg-{number:06}");
        Segment {
            index: Arc::new(HnswIndex::new(params, dim)),
            entry: SegmentEntry {
                basename,
                info,
                dump: None,
            },
        }
    }
}

/// One graph holding the vectors of `graphs`, built on `threads` threads and dumped under
/// `entry`'s name when there is a directory.
fn merge(
    graphs: [Arc<HnswIndex>; 2],
    entry: SegmentEntry,
    params: HnswParams,
    dim: usize,
    dir: Option<PathBuf>,
    threads: usize,
) -> Result<Segment, IndexError> {
    let points: Vec<(u64, Vec<f32>)> = graphs.iter().flat_map(|g| g.points()).collect();
    drop(graphs);
    let refs: Vec<(u64, &[f32])> = points.iter().map(|(id, v)| (*id, v.as_slice())).collect();
    let mut index = HnswIndex::new(params, dim);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads.max(1))
        .thread_name(|i| format!("index-merge-{i}"))
        .build()
        .map_err(|e| IndexError::Io(format!("merge threads: {e}")))?;
    pool.install(|| index.parallel_insert(&refs))?;
    if let Some(dir) = &dir {
        index.dump(dir, &entry.basename)?;
    }
    Ok(Segment {
        index: Arc::new(index),
        entry,
    })
}

/// The name of the merge of segments `a` and `b` (in that order): `a`'s number with a merge
/// generation one above either input's (`seg-000003` + `seg-000004` → `seg-000003-1`), unique
/// because an input's name is gone once its merge is installed.
fn merged_name(a: &str, b: &str) -> String {
    let generation = |n: &str| {
        n.rsplit_once('-')
            .filter(|(head, _)| head.contains('-'))
            .and_then(|(_, g)| g.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let number = a
        .strip_prefix("seg-")
        .and_then(|rest| rest.split('-').next())
        .unwrap_or("000000");
    format!("seg-{number}-{}", generation(a).max(generation(b)) + 1)
}

/// The manifest in `dir`: `Ok(None)` when there is none yet.
fn read_manifest(dir: &Path, dim: usize) -> Result<Option<Manifest>, IndexError> {
    let path = dir.join(MANIFEST);
    let raw = match fs::read(&path) {
        Ok(raw) => raw,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(&path, e)),
    };
    let m: Manifest = serde_json::from_slice(&raw)
        .map_err(|e| IndexError::Io(format!("{}: {e}", path.display())))?;
    if m.format != MANIFEST_FORMAT || m.dim != dim {
        let why = format!(
            "format {} dim {}, expected {MANIFEST_FORMAT} / {dim}",
            m.format, m.dim
        );
        return Err(IndexError::Io(format!("{}: {why}", path.display())));
    }
    // Names come from this module; anything else (a path, say) must never reach `remove_file`.
    let valid = |b: &str| {
        b.strip_prefix("seg-").is_some_and(|n| {
            let mut parts = n.split('-');
            let digits = |p: &str| !p.is_empty() && p.bytes().all(|c| c.is_ascii_digit());
            parts.next().is_some_and(digits)
                && parts.next().is_none_or(digits)
                && parts.next().is_none()
        })
    };
    // A checkpoint's dump is `{basename}.cN`.
    let valid_dump = |e: &SegmentEntry| {
        e.dump.as_deref().is_none_or(|d| {
            d.strip_prefix(e.basename.as_str())
                .and_then(|n| n.strip_prefix(".c"))
                .is_some_and(|n| !n.is_empty() && n.bytes().all(|c| c.is_ascii_digit()))
        })
    };
    if let Some(bad) = m
        .segments
        .iter()
        .chain(&m.active)
        .find(|e| !valid(&e.basename) || !valid_dump(e))
    {
        let why = format!("bad segment name {:?}", bad.basename);
        return Err(IndexError::Io(format!("{}: {why}", path.display())));
    }
    Ok(Some(m))
}

fn write_manifest(
    dir: &Path,
    dim: usize,
    next_segment: u64,
    sealed_up_to: u64,
    segments: Vec<SegmentEntry>,
    active: Option<SegmentEntry>,
    slice_start_ms: Option<i64>,
) -> Result<(), IndexError> {
    let m = Manifest {
        format: MANIFEST_FORMAT,
        dim,
        next_segment,
        sealed_up_to,
        segments,
        active,
        slice_start_ms,
    };
    let json = serde_json::to_vec_pretty(&m).map_err(|e| IndexError::Io(e.to_string()))?;
    write_atomic(&dir.join(MANIFEST), &json)
}

/// Best-effort removal of the dump files of the segments named `basenames`.
fn remove_segment_files<'a>(dir: &Path, basenames: impl IntoIterator<Item = &'a str>) {
    for basename in basenames {
        for ext in ["meta.json", "graph", "data"] {
            let path = dir.join(format!("{basename}.hnsw.{ext}"));
            if let Err(err) = fs::remove_file(&path)
                && err.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!(path = %path.display(), error = %err, "cannot remove segment file");
            }
        }
    }
    sync_dir(dir);
}

/// Deletes leftovers of interrupted seals and drops: temporary files, and segment files the
/// manifest does not list. Only names this module writes are touched.
fn remove_orphans(dir: &Path, listed: &HashSet<String>) {
    let Ok(read) = fs::read_dir(dir) else { return };
    for entry in read.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let ours = name.starts_with("seg-") || name.starts_with(MANIFEST);
        let orphan = match name.split_once(".hnsw.") {
            _ if name.ends_with(".tmp") => true,
            Some((base, _)) => !listed.contains(base),
            None => false,
        };
        if ours && orphan {
            tracing::info!(file = %name, "removing leftover index file");
            let _ = fs::remove_file(entry.path());
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::super::distance::testdata::unit_vectors;
    use super::*;

    const DIM: usize = 24;

    fn config(dir: Option<&Path>, max_points: usize) -> SegmentsConfig {
        SegmentsConfig {
            params: HnswParams {
                max_elements: 1_000,
                ..HnswParams::default()
            },
            max_points_per_segment: max_points,
            dir: dir.map(Path::to_path_buf),
            ..SegmentsConfig::default()
        }
    }

    /// Inserts `vs` with ids `first_id..` at one second apart from `t0`, sealing when due.
    fn feed(idx: &mut SegmentedHnsw, vs: &[Vec<f32>], first_id: u64, t0: i64) -> usize {
        let mut seals = 0;
        for (i, v) in vs.iter().enumerate() {
            idx.insert(first_id + i as u64, t0 + 1_000 * i as i64, v)
                .unwrap();
            seals += usize::from(idx.seal_if_due().unwrap());
        }
        seals
    }

    fn top1(idx: &SegmentedHnsw, v: &[f32]) -> u64 {
        idx.search(v, 1)[0].id
    }

    #[test]
    fn seals_by_size_and_searches_every_segment() {
        let vs = unit_vectors(30, 250, DIM);
        let mut idx = SegmentedHnsw::open(config(None, 100), DIM).unwrap();
        assert_eq!(feed(&mut idx, &vs, 1, 0), 2);
        let segs = idx.segments();
        assert_eq!(segs.len(), 3);
        assert_eq!(
            (
                segs[0].first_id,
                segs[0].last_id,
                segs[0].count,
                segs[0].sealed
            ),
            (1, 100, 100, true)
        );
        assert_eq!((segs[1].min_ts, segs[1].max_ts), (100_000, 199_000));
        assert_eq!((segs[2].count, segs[2].sealed), (50, false));
        assert_eq!((idx.len(), idx.covered_up_to()), (250, 200));
        for (i, v) in vs.iter().enumerate() {
            assert_eq!(top1(&idx, v), i as u64 + 1);
        }
        let found = idx.search(&vs[0], 30);
        assert_eq!(found.len(), 30);
        assert!(
            found
                .windows(2)
                .all(|w| by_similarity(&w[0], &w[1]).is_le())
        );
        // Time filtering skips whole segments.
        let late = idx.search_range(&vs[0], 5, Some(200_000), None);
        assert!(late.iter().all(|n| n.id > 200));
        assert!(idx.search_range(&vs[0], 5, None, Some(-1)).is_empty());
    }

    #[test]
    fn seals_by_time_span() {
        let vs = unit_vectors(31, 40, DIM);
        let cfg = SegmentsConfig {
            segment_span_ms: Some(9_500),
            ..config(None, 1_000)
        };
        let mut idx = SegmentedHnsw::open(cfg, DIM).unwrap();
        assert_eq!(feed(&mut idx, &vs, 1, 0), 3);
        let counts: Vec<usize> = idx.segments().iter().map(|s| s.count).collect();
        // The first slice starts at its first prompt (0–10 s), each next one at the newest time
        // before it (10 s: 11–20 s).
        assert_eq!(counts, vec![11, 10, 10, 9]);
    }

    /// Time-sliced segments of 10 s; a run of 15 late prompts means the traffic went back.
    fn sliced(dir: Option<&Path>) -> SegmentsConfig {
        SegmentsConfig {
            segment_span_ms: Some(10_000),
            ..config(dir, 1_000)
        }
    }

    #[test]
    fn late_prompts_among_current_ones_do_not_seal_a_segment_each() {
        let vs = unit_vectors(37, 160, DIM);
        let mut idx = SegmentedHnsw::open(sliced(None), DIM).unwrap();
        let t0 = 1_000_000;
        // 40 s in order: sealed at 11 s, 22 s and 33 s (a slice starts at the newest time
        // before it).
        assert_eq!(feed(&mut idx, &vs[..40], 1, t0), 3);
        // Then a prompt a second, each followed by one from two minutes before (a backlog
        // drained while serving), a seal check after each as a gateway's batches of one get.
        // A rule on each segment's own oldest and newest time sealed after every late one.
        let mut seals = 0;
        for (i, pair) in vs[40..].chunks(2).enumerate() {
            let now = t0 + 40_000 + 1_000 * i as i64;
            for (j, (ts, v)) in [now, now - 120_000].into_iter().zip(pair).enumerate() {
                idx.insert(41 + 2 * i as u64 + j as u64, ts, v).unwrap();
                seals += usize::from(idx.seal_if_due().unwrap());
            }
        }
        // 60 s more of current traffic: its slices alone.
        assert!((5..=6).contains(&seals), "{seals} seals");
        assert_eq!(idx.len(), 160);
        // The late prompts are found, and a search of their time finds their segments.
        assert_eq!(top1(&idx, &vs[41]), 42);
        let then = idx.search_range(&vs[41], 1, Some(t0 - 80_000), Some(t0 - 80_000));
        assert_eq!(then[0].id, 42);
    }

    #[test]
    fn traffic_that_goes_back_in_time_is_sliced_on_its_own() {
        let vs = unit_vectors(38, 100, DIM);
        let mut idx = SegmentedHnsw::open(sliced(None), DIM).unwrap();
        let t0 = 1_000_000;
        assert_eq!(feed(&mut idx, &vs[..40], 1, t0), 3);
        // A second shard, from 5 minutes before: the first 15 go into the slice being filled,
        // which then seals; the rest is sliced by its own times.
        let seals = feed(&mut idx, &vs[40..], 41, t0 - 300_000);
        assert_eq!(seals, 1 + 4);
        let segs = idx.segments();
        let back = &segs[3];
        assert_eq!((back.first_id, back.last_id), (35, 55));
        assert_eq!(back.min_ts, t0 - 300_000);
        for s in &segs[4..] {
            assert!(s.max_ts - s.min_ts <= 10_000, "{s:?}");
        }
    }

    #[test]
    fn the_time_slice_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let vs = unit_vectors(39, 60, DIM);
        let t0 = 1_000_000;
        // Sealed at 11 s and 22 s: the active slice starts at 22 s.
        let fill = |idx: &mut SegmentedHnsw| assert_eq!(feed(idx, &vs[..23], 1, t0), 2);
        let mut idx = SegmentedHnsw::open(sliced(Some(dir.path())), DIM).unwrap();
        fill(&mut idx);
        drop(idx);
        // Reopened without a checkpoint (a crash) or with one, the slice still starts at 22 s:
        // a late prompt there and a current one after do not seal; 11 s past 22 s does.
        for checkpoint in [false, true] {
            let mut idx = SegmentedHnsw::open(sliced(Some(dir.path())), DIM).unwrap();
            assert_eq!(idx.covered_up_to(), 23);
            idx.insert_bulk(&[(24, t0 + 23_000, &vs[23]), (25, t0 + 24_000, &vs[24])])
                .unwrap();
            idx.insert(26, t0 - 120_000, &vs[25]).unwrap();
            if checkpoint {
                assert_eq!(idx.checkpoint().unwrap(), 3);
                drop(idx);
                idx = SegmentedHnsw::open(sliced(Some(dir.path())), DIM).unwrap();
                assert_eq!(idx.covered_up_to(), 26);
            }
            idx.insert(27, t0 + 26_000, &vs[26]).unwrap();
            assert!(!idx.seal_if_due().unwrap(), "checkpoint: {checkpoint}");
            idx.insert(28, t0 + 33_000, &vs[27]).unwrap();
            assert!(idx.seal_if_due().unwrap(), "checkpoint: {checkpoint}");
            drop(idx);
            if !checkpoint {
                // Back to what was on disk before this round.
                std::fs::remove_dir_all(dir.path()).unwrap();
                let mut idx = SegmentedHnsw::open(sliced(Some(dir.path())), DIM).unwrap();
                fill(&mut idx);
            }
        }
    }

    #[test]
    fn dump_reload_is_identical_and_accepts_inserts() {
        let dir = tempfile::tempdir().unwrap();
        let vs = unit_vectors(32, 900, DIM);
        let queries = unit_vectors(33, 20, DIM);
        let mut idx = SegmentedHnsw::open(config(Some(dir.path()), 300), DIM).unwrap();
        assert_eq!(feed(&mut idx, &vs, 1, 0), 3);
        let before: Vec<_> = queries.iter().map(|q| idx.search(q, 10)).collect();
        drop(idx);
        let mut idx = SegmentedHnsw::open(config(Some(dir.path()), 300), DIM).unwrap();
        assert_eq!(
            (idx.len(), idx.covered_up_to(), idx.missing_ranges()),
            (900, 900, vec![])
        );
        assert_eq!(idx.segments().len(), 3);
        let after: Vec<_> = queries.iter().map(|q| idx.search(q, 10)).collect();
        assert_eq!(before, after);
        // Every reloaded vector is found under its id, looked up, not searched for.
        for (id, v) in [
            (1u64, &vs[0]),
            (300, &vs[299]),
            (301, &vs[300]),
            (900, &vs[899]),
        ] {
            assert_eq!(idx.vector_of(id).as_ref(), Some(v), "{id}");
        }
        assert_eq!(idx.vector_of(901), None);
        // New inserts land in a fresh active segment; the next seal gets a new name.
        let more = unit_vectors(34, 300, DIM);
        let items: Vec<(u64, i64, Vec<f32>)> = more
            .iter()
            .enumerate()
            .map(|(i, v)| (901 + i as u64, 900_000, v.clone()))
            .collect();
        idx.insert_bulk(&items).unwrap();
        assert_eq!(top1(&idx, &more[7]), 908);
        assert!(idx.seal_if_due().unwrap());
        drop(idx);
        let idx = SegmentedHnsw::open(config(Some(dir.path()), 300), DIM).unwrap();
        assert_eq!(
            (idx.len(), idx.covered_up_to(), idx.segments().len()),
            (1_200, 1_200, 4)
        );
        assert_eq!(top1(&idx, &more[7]), 908);
        assert_eq!(top1(&idx, &vs[7]), 8);
    }

    #[test]
    fn a_checkpointed_active_segment_is_reloaded_and_goes_on_growing() {
        let dir = tempfile::tempdir().unwrap();
        let vs = unit_vectors(36, 500, DIM);
        let queries = unit_vectors(37, 20, DIM);
        let mut idx = SegmentedHnsw::open(config(Some(dir.path()), 300), DIM).unwrap();
        feed(&mut idx, &vs[..400], 1, 0);
        assert_eq!(
            idx.covered_up_to(),
            300,
            "the active segment is not on disk yet"
        );
        assert_eq!(idx.checkpoint().unwrap(), 100);
        assert_eq!(idx.checkpoint().unwrap(), 0, "unchanged: nothing to write");
        assert_eq!(idx.covered_up_to(), 400);
        let before: Vec<_> = queries.iter().map(|q| idx.search(q, 10)).collect();
        // Inserted after the checkpoint: not on disk, so not covered after a restart.
        idx.insert(401, 400_000, &vs[400]).unwrap();
        drop(idx);

        let mut idx = SegmentedHnsw::open(config(Some(dir.path()), 300), DIM).unwrap();
        assert_eq!((idx.len(), idx.covered_up_to()), (400, 400));
        let segs = idx.segments();
        assert_eq!(segs.len(), 2);
        assert_eq!(
            (
                segs[1].first_id,
                segs[1].last_id,
                segs[1].min_ts,
                segs[1].count,
                segs[1].sealed
            ),
            (301, 400, 300_000, 100, false)
        );
        let after: Vec<_> = queries.iter().map(|q| idx.search(q, 10)).collect();
        assert_eq!(
            before, after,
            "the reloaded active segment answers as before"
        );
        // It goes on growing, then seals under its own name, replacing the checkpoint.
        for (i, v) in vs.iter().enumerate().skip(400) {
            idx.insert(i as u64 + 1, 1_000 * i as i64, v).unwrap();
        }
        assert_eq!(top1(&idx, &vs[450]), 451);
        assert_eq!(top1(&idx, &vs[350]), 351);
        assert!(!idx.seal_if_due().unwrap(), "200 of 300: not full");
        assert_eq!(idx.checkpoint().unwrap(), 200);
        feed(&mut idx, &unit_vectors(38, 100, DIM), 501, 500_000);
        let segs = idx.segments();
        assert_eq!(segs.len(), 2, "the reloaded active segment was sealed");
        assert_eq!(
            (segs[1].first_id, segs[1].last_id, segs[1].sealed),
            (301, 600, true)
        );
        drop(idx);

        let idx = SegmentedHnsw::open(config(Some(dir.path()), 300), DIM).unwrap();
        assert_eq!((idx.len(), idx.covered_up_to()), (600, 600));
        assert!(idx.segments().iter().all(|s| s.sealed));
        assert_eq!(top1(&idx, &vs[450]), 451);
        let files = std::fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(files, 1 + 2 * 3, "a manifest and two dumps, no leftovers");
    }

    #[test]
    fn reloaded_segments_search_with_the_configured_ef() {
        let dir = tempfile::tempdir().unwrap();
        let mut idx = SegmentedHnsw::open(config(Some(dir.path()), 100), DIM).unwrap();
        feed(&mut idx, &unit_vectors(39, 150, DIM), 1, 0);
        idx.checkpoint().unwrap();
        drop(idx);
        let mut narrow = config(Some(dir.path()), 100);
        narrow.params.ef_search = 7;
        let idx = SegmentedHnsw::open(narrow, DIM).unwrap();
        let efs: Vec<usize> = std::iter::once(&idx.active)
            .chain(&idx.sealed)
            .map(|s| s.index.params().ef_search)
            .collect();
        assert_eq!(
            efs,
            [7, 7],
            "the checkpointed active segment and the sealed one"
        );
    }

    /// A checkpoint that stops before its manifest is written (a kill -9 during a clean stop's
    /// checkpoint, a full disk) leaves the last one listed and whole: it is reloaded, and only
    /// what came after it is missing (the store re-inserts it).
    #[test]
    fn an_interrupted_checkpoint_leaves_the_last_one_whole() {
        let dir = tempfile::tempdir().unwrap();
        let vs = unit_vectors(40, 190, DIM);
        let mut idx = SegmentedHnsw::open(config(Some(dir.path()), 200), DIM).unwrap();
        feed(&mut idx, &vs[..150], 1, 0);
        assert_eq!(idx.checkpoint().unwrap(), 150);
        feed(&mut idx, &vs[150..170], 151, 150_000);
        assert_eq!(idx.checkpoint().unwrap(), 170);
        feed(&mut idx, &vs[170..], 171, 170_000);
        // The manifest cannot be written: its temporary file's place is a directory.
        let blocker = dir.path().join(format!("{MANIFEST}.tmp"));
        fs::create_dir(&blocker).unwrap();
        assert!(idx.checkpoint().is_err());
        drop(idx);
        fs::remove_dir(&blocker).unwrap();
        let idx = SegmentedHnsw::open(config(Some(dir.path()), 200), DIM).unwrap();
        assert_eq!((idx.len(), idx.covered_up_to()), (170, 170));
        assert_eq!(top1(&idx, &vs[160]), 161);
        // Only the listed checkpoint's files are left: the first one's and the unlisted third
        // one's are gone.
        let mut names: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("seg-"))
            .collect();
        names.sort();
        assert_eq!(
            names,
            [
                "seg-000001.c2.hnsw.data",
                "seg-000001.c2.hnsw.graph",
                "seg-000001.c2.hnsw.meta.json"
            ]
        );
    }

    /// A checkpoint of an earlier version (under the segment's own name) reloads, and the next
    /// checkpoint replaces it.
    #[test]
    fn a_checkpoint_of_the_earlier_layout_reloads_and_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let vs = unit_vectors(41, 180, DIM);
        let mut idx = SegmentedHnsw::open(config(Some(dir.path()), 200), DIM).unwrap();
        feed(&mut idx, &vs[..150], 1, 0);
        assert_eq!(idx.checkpoint().unwrap(), 150);
        drop(idx);
        for ext in ["graph", "data", "meta.json"] {
            let from = dir.path().join(format!("seg-000001.c1.hnsw.{ext}"));
            fs::rename(from, dir.path().join(format!("seg-000001.hnsw.{ext}"))).unwrap();
        }
        let path = dir.path().join(MANIFEST);
        let mut m: serde_json::Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
        m["active"].as_object_mut().unwrap().remove("dump").unwrap();
        fs::write(&path, serde_json::to_vec(&m).unwrap()).unwrap();
        let mut idx = SegmentedHnsw::open(config(Some(dir.path()), 200), DIM).unwrap();
        assert_eq!((idx.len(), idx.covered_up_to()), (150, 150));
        feed(&mut idx, &vs[150..], 151, 150_000);
        assert_eq!(idx.checkpoint().unwrap(), 180);
        assert!(!dir.path().join("seg-000001.hnsw.graph").exists());
        drop(idx);
        let idx = SegmentedHnsw::open(config(Some(dir.path()), 200), DIM).unwrap();
        assert_eq!((idx.len(), idx.covered_up_to()), (180, 180));
    }

    #[test]
    fn a_checkpoint_of_another_size_is_rebuilt_not_trusted() {
        // A seal that crashed after dumping but before rewriting the manifest.
        let dir = tempfile::tempdir().unwrap();
        let vs = unit_vectors(39, 250, DIM);
        let mut idx = SegmentedHnsw::open(config(Some(dir.path()), 200), DIM).unwrap();
        feed(&mut idx, &vs[..150], 1, 0);
        assert_eq!(idx.checkpoint().unwrap(), 150);
        let manifest = std::fs::read(dir.path().join(MANIFEST)).unwrap();
        feed(&mut idx, &vs[150..], 151, 150_000);
        assert_eq!(idx.segments().len(), 2);
        drop(idx);
        std::fs::write(dir.path().join(MANIFEST), manifest).unwrap();

        let idx = SegmentedHnsw::open(config(Some(dir.path()), 200), DIM).unwrap();
        assert_eq!((idx.len(), idx.covered_up_to()), (0, 0), "nothing trusted");
        assert!(
            !dir.path().join("seg-000001.hnsw.graph").exists(),
            "leftover removed"
        );
    }

    #[test]
    fn sealed_segments_merge_by_tiers_and_reload_merged() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = SegmentsConfig {
            merge_max_points: 400,
            ..config(Some(dir.path()), 100)
        };
        let vs = unit_vectors(40, 700, DIM);
        let mut idx = SegmentedHnsw::open(cfg.clone(), DIM).unwrap();
        assert_eq!(feed(&mut idx, &vs, 1, 0), 7);
        // 7 × 100 → (100+100), (100+100), (100+100), then (200+100), then (200+200).
        assert_eq!(idx.merge_all(), 5);
        assert!(!idx.is_merging());
        let segs = idx.segments();
        let shape: Vec<(u64, u64, usize)> = segs
            .iter()
            .map(|s| (s.first_id, s.last_id, s.count))
            .collect();
        assert_eq!(shape, vec![(1, 400, 400), (401, 700, 300)]);
        assert_eq!((idx.len(), idx.covered_up_to()), (700, 700));
        for (i, v) in vs.iter().enumerate() {
            assert_eq!(top1(&idx, v), i as u64 + 1);
        }
        let mut names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".meta.json"))
            .collect();
        names.sort();
        assert_eq!(
            names,
            ["seg-000001-2.hnsw.meta.json", "seg-000005-2.hnsw.meta.json"],
            "merged dumps only: the inputs' files are gone"
        );
        drop(idx);

        let idx = SegmentedHnsw::open(cfg, DIM).unwrap();
        assert_eq!((idx.len(), idx.covered_up_to()), (700, 700));
        assert_eq!(idx.segments().len(), 2);
        assert_eq!(top1(&idx, &vs[650]), 651);
    }

    #[test]
    fn a_merge_whose_input_was_dropped_is_discarded() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = SegmentsConfig {
            retention_ms: Some(200_000),
            merge_max_points: 1_000,
            ..config(Some(dir.path()), 20)
        };
        let vs = unit_vectors(41, 100, DIM);
        let mut idx = SegmentedHnsw::open(cfg, DIM).unwrap();
        assert_eq!(feed(&mut idx, &vs, 1, 0), 5);
        assert!(!idx.merge_step(), "started, not finished");
        assert!(idx.is_merging());
        // Retention drops the first input (newest prompt at 19 s) before the merge is installed.
        assert_eq!(idx.drop_expired(19_001 + 200_000), 1);
        idx.merge_all();
        assert!(!dir.path().join("seg-000001-1.hnsw.graph").exists());
        assert_eq!(idx.len(), 80);
        assert!(
            idx.search(&vs[5], 10).iter().all(|n| n.id > 20),
            "dropped stays dropped"
        );
        assert_eq!(top1(&idx, &vs[50]), 51);
        // Merged segments span at most a quarter of the retention: 50 s here.
        assert!(idx.segments().iter().all(|s| s.max_ts - s.min_ts <= 50_000));
    }

    #[test]
    fn merged_names_are_unique_and_valid_in_a_manifest() {
        assert_eq!(merged_name("seg-000003", "seg-000004"), "seg-000003-1");
        assert_eq!(merged_name("seg-000003-1", "seg-000005"), "seg-000003-2");
        assert_eq!(merged_name("seg-000003-2", "seg-000007-4"), "seg-000003-5");
        let dir = tempfile::tempdir().unwrap();
        for (name, ok) in [
            ("seg-000003-2", true),
            ("seg-000003", true),
            ("seg-1-2-3", false),
            ("seg--1", false),
            ("seg-1-", false),
            ("../seg-1", false),
        ] {
            let entry = SegmentEntry {
                basename: name.into(),
                info: SegmentInfo {
                    first_id: 1,
                    last_id: 1,
                    min_ts: 0,
                    max_ts: 0,
                    count: 1,
                    sealed: true,
                },
                dump: None,
            };
            write_manifest(dir.path(), DIM, 2, 1, vec![entry.clone()], None, None).unwrap();
            assert_eq!(read_manifest(dir.path(), DIM).is_ok(), ok, "{name}");
            // A checkpoint's dump name is the segment's and `.cN`, nothing else (no path).
            let dump = |d: &str| SegmentEntry {
                dump: Some(d.into()),
                ..entry.clone()
            };
            let good = dump(&format!("{name}.c12"));
            write_manifest(dir.path(), DIM, 2, 1, vec![], Some(good), None).unwrap();
            assert_eq!(read_manifest(dir.path(), DIM).is_ok(), ok, "{name}");
            for bad in [
                format!("{name}.c"),
                format!("{name}.c1/../x"),
                "../x.c1".into(),
            ] {
                write_manifest(dir.path(), DIM, 2, 1, vec![], Some(dump(&bad)), None).unwrap();
                assert!(read_manifest(dir.path(), DIM).is_err(), "{bad}");
            }
        }
    }

    #[test]
    fn retention_drops_whole_segments_and_their_files() {
        let dir = tempfile::tempdir().unwrap();
        let vs = unit_vectors(35, 100, DIM);
        let cfg = SegmentsConfig {
            retention_ms: Some(50_000),
            ..config(Some(dir.path()), 20)
        };
        let mut idx = SegmentedHnsw::open(cfg.clone(), DIM).unwrap();
        assert_eq!(feed(&mut idx, &vs, 1, 0), 5);
        assert_eq!(idx.drop_expired(10_000), 0);
        // Cutoff 50_000: segments with max_ts 19_000 and 39_000 go.
        assert_eq!(idx.drop_expired(100_000), 2);
        assert_eq!(idx.len(), 60);
        assert!(!dir.path().join("seg-000001.hnsw.graph").exists());
        assert!(dir.path().join("seg-000003.hnsw.graph").exists());
        drop(idx);
        let idx = SegmentedHnsw::open(cfg, DIM).unwrap();
        assert_eq!((idx.len(), idx.covered_up_to()), (60, 100));
        assert_eq!(idx.segments()[0].first_id, 41);
    }

    #[test]
    fn damaged_segments_are_reported_then_rebuilt() {
        let dir = tempfile::tempdir().unwrap();
        let vs = unit_vectors(36, 90, DIM);
        let cfg = config(Some(dir.path()), 30);
        let mut idx = SegmentedHnsw::open(cfg.clone(), DIM).unwrap();
        assert_eq!(feed(&mut idx, &vs, 1, 0), 3);
        drop(idx);
        let path = |n: u32, ext: &str| dir.path().join(format!("seg-{n:06}.hnsw.{ext}"));
        let mut data = fs::read(path(2, "data")).unwrap();
        data.truncate(data.len() - 7);
        fs::write(path(2, "data"), data).unwrap();
        fs::remove_file(path(3, "graph")).unwrap();
        let idx = SegmentedHnsw::open(cfg.clone(), DIM).unwrap();
        assert_eq!(idx.missing_ranges(), vec![(31, 60), (61, 90)]);
        assert_eq!((idx.len(), idx.covered_up_to()), (30, 90));
        assert_eq!(top1(&idx, &vs[3]), 4);
        // Still missing after a restart without a rebuild.
        drop(idx);
        let mut idx = SegmentedHnsw::open(cfg.clone(), DIM).unwrap();
        assert_eq!(idx.missing_ranges().len(), 2);
        let rebuild: Vec<(u64, i64, Vec<f32>)> = (30..90)
            .map(|i| (i as u64 + 1, 1_000 * i as i64, vs[i].clone()))
            .collect();
        idx.insert_bulk(&rebuild).unwrap();
        assert!(idx.seal_if_due().unwrap());
        assert!(idx.missing_ranges().is_empty());
        drop(idx);
        let idx = SegmentedHnsw::open(cfg.clone(), DIM).unwrap();
        assert_eq!((idx.len(), idx.missing_ranges()), (90, vec![]));
        assert_eq!(top1(&idx, &vs[50]), 51);
        assert!(!path(2, "data").exists());
        // A garbled manifest means an empty index (rebuilt from the store), not a panic.
        let evil = r#"{"format":1,"dim":24,"next_segment":2,"sealed_up_to":5,"segments":[
            {"basename":"../x","first_id":1,"last_id":5,"min_ts":0,"max_ts":0,"count":5,"sealed":true}]}"#;
        for manifest in [&b"\x00garbage"[..], evil.as_bytes()] {
            fs::write(dir.path().join(MANIFEST), manifest).unwrap();
            let idx = SegmentedHnsw::open(cfg.clone(), DIM).unwrap();
            assert_eq!((idx.len(), idx.covered_up_to()), (0, 0));
        }
    }

    #[test]
    fn is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<SegmentedHnsw>();
    }

    #[test]
    fn duplicate_vectors_do_not_panic() {
        let v = unit_vectors(37, 1, DIM).remove(0);
        let mut idx = SegmentedHnsw::open(config(None, 40), DIM).unwrap();
        for id in 1..=100u64 {
            idx.insert(id, 0, &v).unwrap();
            idx.seal_if_due().unwrap();
        }
        let bulk: Vec<(u64, i64, Vec<f32>)> = (101..=200).map(|id| (id, 0, v.clone())).collect();
        idx.insert_bulk(&bulk).unwrap();
        let found = idx.search(&v, 10);
        assert_eq!(found.len(), 10);
        assert!(found.iter().all(|n| (n.similarity - 1.0).abs() < 1e-5));
    }
}
