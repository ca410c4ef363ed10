//! The engine: store + index + detector behind one ingest path, used alike by the server, the
//! offline `reindex` and `eval`, so all three give the same verdicts for the same stream.
//!
//! Ingest of a batch (serialised by one lock, in order):
//! 1. for each prompt, its links: neighbours above the threshold among indexed prompts and among
//!    earlier prompts of the same batch (brute force: the batch is not indexed yet), plus the
//!    latest earlier prompt sharing a template key (lexical evidence, see `detect::keys`);
//! 2. the detector observes the prompt with those links → verdict;
//! 3. one store transaction commits the whole batch (durable before any verdict is returned),
//!    on a thread of its own while the vectors go into the index and the parts' into the part
//!    index, on all cores;
//! 4. once both are done, a full segment of either index is sealed and dumped (after the commit,
//!    so a sealed segment never holds a prompt the store lacks), and retention drops old ones.
//!
//! On open, the detector and the key index are restored from the snapshot of the last checkpoint
//! (a clean stop: [`Engine::checkpoint`]) and caught up by replaying the records stored since —
//! the stored links (no searches needed) and the keys of the stored texts; without a usable
//! snapshot the whole store is replayed. The vector and part indexes are reloaded from their
//! dumps (sealed segments, and the checkpoint's) plus the store's newer records.

use std::path::Path;
use std::time::Instant;

use parking_lot::{Mutex, RwLock};
use rayon::prelude::*;

use crate::config::EngineConfig;
use crate::detect::allow::{AllowEntry, AllowList, AllowRule};
use crate::detect::keys::{self, KeyIndex, Source};
use crate::detect::snapshot::{self, SnapshotHeader};
use crate::detect::template::{self, TemplateGroup};
use crate::detect::{AccountSummary, CampaignSummary, Detector, Observation, Verdict};
use crate::embed::{EmbedError, Embedder};
use crate::error::Error;
use crate::index::{
    HnswParams, Neighbour, SegmentedHnsw, SegmentsConfig, VectorSearch, by_similarity, dot, pairs,
};
use crate::store::{PromptRecord, RecordRef, Store, text_hash};

/// A prompt accepted for ingest, already validated and embedded.
#[derive(Debug, Clone)]
pub struct NewPrompt {
    /// Sending account.
    pub account_id: String,
    /// Send time, ms since the epoch.
    pub timestamp_ms: i64,
    /// The text.
    pub text: String,
    /// Its L2-normalised embedding.
    pub embedding: Vec<f32>,
    /// Embeddings of its parts (`detect::keys::parts`, in that order); may be empty.
    pub parts: Vec<Vec<f32>>,
    /// Whether the model reads it ([`crate::embed::readable`]). An unreadable prompt (mostly
    /// tokens the vocabulary lacks: Chinese, for all-MiniLM-L6-v2) embeds alike whatever it
    /// says, so it is linked by its words (template keys) only, never by its vectors.
    pub readable: bool,
}

/// A text's vector and its parts' vectors.
pub type WithPartVectors = (Vec<f32>, Vec<Vec<f32>>);

/// A prompt's id, timestamp and parts' vectors, on their way into the part index.
type PendingParts = Vec<(u64, i64, Vec<Vec<f32>>)>;

/// Embeds `texts` and, when `with_parts`, each text's parts (`keys::parts`) through one call of
/// `embed`, so prompts and parts share forward passes (and a caller's cache). Returns, per text,
/// its vector and its parts' vectors — what [`NewPrompt`] takes. Used alike by the server's
/// batcher and the offline runner.
pub fn embed_with_parts<F>(
    texts: &[&str],
    with_parts: bool,
    embed: F,
) -> Result<Vec<WithPartVectors>, EmbedError>
where
    F: FnOnce(&[&str]) -> Result<Vec<Vec<f32>>, EmbedError>,
{
    let parts: Vec<Vec<&str>> = if with_parts {
        texts.iter().map(|t| keys::parts(t)).collect()
    } else {
        vec![Vec::new(); texts.len()]
    };
    let mut all: Vec<&str> = texts.to_vec();
    all.extend(parts.iter().flatten());
    let mut vectors = embed(&all)?.into_iter();
    let wholes: Vec<Vec<f32>> = vectors.by_ref().take(texts.len()).collect();
    Ok(wholes
        .into_iter()
        .zip(&parts)
        .map(|(v, p)| (v, vectors.by_ref().take(p.len()).collect()))
        .collect())
}

/// Filters of a search.
#[derive(Debug, Clone, Default)]
pub struct SearchFilter {
    /// Only this account's prompts.
    pub account_id: Option<String>,
    /// Only prompts sent at or after this time.
    pub from_ms: Option<i64>,
    /// Only prompts sent at or before this time.
    pub to_ms: Option<i64>,
}

impl SearchFilter {
    /// Whether `r` passes every filter given.
    fn admits(&self, r: &PromptRecord) -> bool {
        self.account_id.as_ref().is_none_or(|a| &r.account_id == a)
            && self.from_ms.is_none_or(|t| r.timestamp_ms >= t)
            && self.to_ms.is_none_or(|t| r.timestamp_ms <= t)
    }
}

/// Search results' order: most similar first, then oldest.
fn nearest_first(a: &Hit, b: &Hit) -> std::cmp::Ordering {
    b.similarity
        .total_cmp(&a.similarity)
        .then(a.record.id.cmp(&b.record.id))
}

/// A search result.
#[derive(Debug, Clone)]
pub struct Hit {
    /// The stored prompt.
    pub record: PromptRecord,
    /// Cosine similarity to the query.
    pub similarity: f32,
    /// Its cluster's current root.
    pub cluster_id: u64,
    /// That root when the cluster scores as a campaign now.
    pub campaign_id: Option<u64>,
}

/// What allow-listing a template did.
#[derive(Debug, Clone)]
pub struct Allowed {
    /// The allow-list entry (an earlier one when the template was already listed).
    pub entry: AllowEntry,
    /// Campaigns that stopped scoring because of it.
    pub cleared: usize,
    /// Campaigns some of whose sampled prompts it matches that still score: prompts the list
    /// does not match follow a template of their own (see [`Engine::allow_template`]).
    pub not_cleared: Vec<u64>,
    /// The template was already on the list; nothing was added.
    pub already_listed: bool,
}

/// What removing an allow-list entry did.
#[derive(Debug, Clone)]
pub struct Removed {
    /// The entry removed.
    pub entry: AllowEntry,
    /// Campaigns the entry kept cleared that score again, ascending (see
    /// [`Engine::remove_allowed`]).
    pub scoring_again: Vec<u64>,
}

/// A campaign with what analysts read: the recovered template and examples.
#[derive(Debug, Clone)]
pub struct CampaignView {
    /// Numbers from the detector.
    pub summary: CampaignSummary,
    /// The words every sampled prompt shares, `<*>` for the rest (what `allow --campaign` lists).
    pub template: String,
    /// The templates the sampled prompts follow, most followed first (see
    /// [`template::groups`]): one for a campaign of one template, several where the cluster
    /// holds several (then [`Self::template`] keeps only the words they all share).
    pub templates: Vec<TemplateGroup>,
    /// Sampled prompts, of `summary.samples`.
    pub sampled: u32,
    /// Of those, the ones that follow no template another sample follows.
    pub sampled_alone: u32,
    /// A few member prompts (a uniform sample, in id order).
    pub examples: Vec<String>,
    /// Whether an analyst's allow-list entry cleared the cluster (it then scores 0).
    pub allow_listed: bool,
    /// The entry that matches most of its sampled prompts, when it is allow-listed.
    pub allowed_by: Option<u64>,
}

/// Counts shown at start-up.
#[derive(Debug, Clone, Copy)]
pub struct OpenStats {
    /// Prompts in the store.
    pub prompts: u64,
    /// Vectors reloaded from sealed segment dumps.
    pub reloaded: usize,
    /// Vectors re-inserted from the store.
    pub rebuilt: usize,
    /// Part vectors reloaded from the part index's checkpoint.
    pub parts_reloaded: usize,
    /// Part vectors re-inserted from the store.
    pub parts_rebuilt: usize,
    /// Prompts the detector (clusters, accounts, template keys) restored from the snapshot of
    /// the last checkpoint.
    pub restored: u64,
    /// Prompts the detector replayed from the store: those stored since that snapshot (all of
    /// them without one).
    pub replayed: u64,
    /// Seconds the open took.
    pub seconds: f64,
}

/// Busy time of each phase of [`Engine::ingest`], summed over every batch since the engine was
/// opened: which one bounds an ingest-bound run (`reindex`, `eval`) and whether it is one that
/// more cores speed up.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct IngestTimes {
    /// Batches ingested.
    pub batches: u64,
    /// Links found on all cores: index and part-index searches, comparisons with the batch's
    /// earlier prompts, template keys.
    pub lookup: std::time::Duration,
    /// In order, on one thread: the key index's links, the detector's clustering and scoring.
    /// It runs while the index inserts do.
    pub cluster: std::time::Duration,
    /// The store transaction (one commit per batch), after `cluster` on the same thread, while
    /// the index inserts run.
    pub store: std::time::Duration,
    /// Index and part-index inserts (on a thread of their own, and on all cores for large
    /// batches) alongside `cluster` and `store`; then sealing full segments. A batch takes the
    /// longer of `index` and `cluster` + `store`, not their sum.
    pub index: std::time::Duration,
}

impl IngestTimes {
    /// The phases by name, in ingest order.
    pub fn phases(&self) -> [(&'static str, std::time::Duration); 4] {
        [
            ("lookup", self.lookup),
            ("cluster", self.cluster),
            ("store", self.store),
            ("index", self.index),
        ]
    }

    /// The time spent since `earlier`, a reading of the same engine.
    pub fn since(&self, earlier: &IngestTimes) -> IngestTimes {
        IngestTimes {
            batches: self.batches.saturating_sub(earlier.batches),
            lookup: self.lookup.saturating_sub(earlier.lookup),
            cluster: self.cluster.saturating_sub(earlier.cluster),
            store: self.store.saturating_sub(earlier.store),
            index: self.index.saturating_sub(earlier.index),
        }
    }
}

/// What only the (serialised) ingest path touches.
struct IngestState {
    next_id: u64,
    /// The last prompt id the usable detector snapshot on disk holds (0: none, or one written
    /// under another allow-list).
    snapshot_last: u64,
    keys: KeyIndex,
    /// The allow-list as stored, and compiled.
    allow: (Vec<AllowEntry>, AllowList),
    times: IngestTimes,
}

/// What [`Engine::checkpoint`] wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckpointStats {
    /// Vectors of the active index segment now on disk (0 when it was empty or already written).
    pub active_vectors: usize,
    /// Vectors of the part index's active segment now on disk (0 likewise).
    pub part_vectors: usize,
    /// Index segments, sealed and active: the graphs every search visits.
    pub segments: usize,
    /// Whether a segment merge was running (it is not saved: the next open starts it again).
    pub merging: bool,
    /// Prompts in the detector snapshot written (0: none written, the store is empty).
    pub detector_prompts: u64,
    /// Its size in bytes.
    pub detector_bytes: u64,
    /// Why no snapshot was written, when writing one failed (the next start replays the store).
    pub detector_error: Option<String>,
    /// Seconds it took.
    pub seconds: f64,
}

/// Directory of the index segments, in the data directory.
const INDEX_DIR: &str = "index";

/// Directory of the part index's segments, in [`INDEX_DIR`].
const PARTS_DIR: &str = "parts";

/// Meta key of the allow-list (JSON array of [`AllowEntry`]).
const ALLOW_META: &str = "allow_list";
/// Store meta key: the last allow-list id given (u64, little-endian), so that an id removed is
/// never given again (an admin script's stale id must not remove another entry).
const ALLOW_LAST_ID_META: &str = "allow_last_id";

/// File of the detector snapshot (see `detect::snapshot`), in the data directory.
pub const SNAPSHOT_FILE: &str = "detector.snapshot";

/// Whether a sealed segment should come with a detector snapshot: when the prompts stored since
/// the last one (`snapshot_last`) are at least a quarter of all (`last_id`). Writing one costs
/// ~0.5 µs per prompt held, so this keeps the cost per stored prompt constant (≤ ~2 µs) while a
/// crash replays at most about a quarter of the store, plus a segment.
fn snapshot_due(last_id: u64, snapshot_last: u64) -> bool {
    last_id.saturating_sub(snapshot_last) >= last_id / 4
}

/// What the template keys depend on in an allow-list: its templates. A snapshot recorded under
/// another list is not used (a start replays the store under the list in force).
fn allow_fingerprint(entries: &[AllowEntry]) -> u64 {
    let mut templates: Vec<&str> = entries.iter().map(|e| e.template.as_str()).collect();
    templates.sort_unstable();
    templates.dedup();
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    for t in templates {
        h.update(t.as_bytes());
        h.update(b"\x1f");
    }
    h.digest()
}

/// The detector and key index of the snapshot in `config`'s data directory, when it is usable:
/// written under the same allow-list, and ending at a prompt this store holds as it knew it.
/// An unusable one is reported and skipped (the caller replays the whole store).
fn load_snapshot(
    config: &EngineConfig,
    store: &Store,
    allow_entries: &[AllowEntry],
) -> Option<(SnapshotHeader, Detector, KeyIndex)> {
    let path = config.data_dir.join(SNAPSHOT_FILE);
    let allow = allow_fingerprint(allow_entries);
    let accept = |h: &SnapshotHeader| {
        let here = store
            .get(h.last_id)
            .map(|r| r.map(|r| r.text_hash))
            .map_err(|e| e.to_string());
        judge_snapshot(h, here, allow)
    };
    let started = Instant::now();
    match snapshot::load(&path, config.detector.clone(), accept) {
        Ok(found) => {
            if let Some((header, ..)) = &found {
                tracing::info!(
                    prompts = header.prompts,
                    seconds = started.elapsed().as_secs_f64(),
                    "detector snapshot restored"
                );
            }
            found
        }
        Err(reason) => {
            tracing::warn!(
                file = %path.display(),
                %reason,
                "detector snapshot not used: replaying the whole store"
            );
            None
        }
    }
}

/// Whether a snapshot with header `h` fits this store, whose prompt `h.last_id` has the text hash
/// `here` (`None`: no such prompt), under an allow-list with fingerprint `allow`. Another store
/// is named first, whatever else differs.
fn judge_snapshot(
    h: &SnapshotHeader,
    here: Result<Option<u64>, String>,
    allow: u64,
) -> Result<(), String> {
    match here? {
        Some(hash) if hash != h.last_text_hash => Err(format!(
            "it was written for another store (prompt {} differs here)",
            h.last_id
        )),
        None => Err(format!(
            "it was written for another store (it ends at prompt {}, which this store lacks)",
            h.last_id
        )),
        Some(_) if h.allow != allow => {
            Err("the allow-list changed after it was written".to_string())
        }
        Some(_) => Ok(()),
    }
}

/// Why an index loaded from disk is not `store`'s (`None`: it is): it covers prompts the store
/// lacks, or the first or last prompt of one of its segments is, in the store, from outside that
/// segment's time span, or its vector is not in the index under its id. `per_prompt` index ids
/// make one prompt id (the part index's [`PART_SLOTS`]: the vector is then the record's part).
fn index_mismatch(
    index: &SegmentedHnsw,
    per_prompt: u64,
    store: &Store,
) -> Result<Option<String>, Error> {
    let last = store.last_id()?;
    let covered = index.covered_up_to() / per_prompt;
    if covered > last {
        return Ok(Some(format!(
            "it holds prompts up to {covered}, and the store only up to {last}"
        )));
    }
    for (index_id, min_ts, max_ts) in index.loaded_ends() {
        let id = index_id / per_prompt;
        let Some(r) = store.get(id)? else {
            // Retention drops whole segments, never a prompt from the store.
            return Ok(Some(format!("it holds prompt {id}, which the store lacks")));
        };
        if !(min_ts..=max_ts).contains(&r.timestamp_ms) {
            return Ok(Some(format!(
                "its prompt {id} was sent between {min_ts} and {max_ts} (ms), the store's at {}",
                r.timestamp_ms
            )));
        }
        // Another store of as many prompts, sent at the same times, differs in its vectors:
        // the index holds the record's own under its id. (Looked up, not searched for: a
        // graph search can miss a point, and a start would then rebuild a sound index.)
        let vector = match per_prompt {
            1 => Some(&r.embedding),
            n => r.parts.get((index_id % n) as usize),
        };
        let Some(vector) = vector else {
            return Ok(Some(format!(
                "it holds a part of prompt {id} the store lacks"
            )));
        };
        let same = index
            .vector_of(index_id)
            .is_some_and(|held| held.len() == vector.len() && dot(&held, vector) > 0.9999);
        if !same {
            return Ok(Some(format!(
                "prompt {id}'s vector in the store is not the index's"
            )));
        }
    }
    Ok(None)
}

/// Store, index and detector, consistent with each other.
pub struct Engine {
    config: EngineConfig,
    store: Store,
    index: RwLock<SegmentedHnsw>,
    /// Part vectors, keyed `prompt id × PART_SLOTS + part number`, in segments like the index's:
    /// retention drops them alike, and a checkpoint writes only the active one.
    parts: RwLock<SegmentedHnsw>,
    detector: RwLock<Detector>,
    /// Serialises ingest; holds the next id and the template keys.
    ingest: Mutex<IngestState>,
    /// Set by a failed store commit (see [`Engine::failure`]).
    poisoned: std::sync::OnceLock<String>,
    /// Turns true when `poisoned` is set (see [`Engine::failure_watch`]).
    poisoned_tx: tokio::sync::watch::Sender<bool>,
    open_stats: OpenStats,
}

impl Engine {
    /// Opens the data directory: the store, the index (reloaded, then caught up from the
    /// store) and the detector (replayed from the store).
    ///
    /// A panic while reading (redb's, on a damaged store file) is an error naming the store.
    pub fn open(config: EngineConfig, dim: usize) -> Result<Self, Error> {
        let store = config.data_dir.join(crate::store::DB_FILE);
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| Self::open_unguarded(config, dim)))
            .unwrap_or_else(|panic| {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                Err(Error::Unavailable(format!(
                    "reading {} failed ({what}): the store file looks damaged; restore it from a backup (the index and snapshot beside it are rebuilt from it)",
                    store.display()
                )))
            })
    }

    fn open_unguarded(config: EngineConfig, dim: usize) -> Result<Self, Error> {
        let started = Instant::now();
        let store = Store::open(&config.data_dir)?;
        let index_dir = config.data_dir.join(INDEX_DIR);
        let segments = index_segments(&config);
        remove_legacy_part_dumps(&index_dir);
        // The two indexes load side by side: each reads its dumps on its own threads (a sealed
        // segment a thread), but a directory with few segments would leave cores idle.
        let (index, parts) = std::thread::scope(|scope| {
            let parts = scope.spawn(|| SegmentedHnsw::open(part_segments(&config), dim));
            let index = SegmentedHnsw::open(segments, dim);
            let parts = parts
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            (index, parts)
        });
        let (mut index, mut parts) = (index?, parts?);
        // An index on disk that is not this store's (a store restored from a backup, or copied
        // in from elsewhere, beside the index it replaced) would link new prompts to vectors of
        // prompts the store does not hold: it is rebuilt from the store instead.
        let mismatch = match index_mismatch(&index, 1, &store)? {
            Some(reason) => Some(reason),
            None => index_mismatch(&parts, PART_SLOTS, &store)?,
        };
        if let Some(reason) = mismatch {
            tracing::warn!(
                dir = %index_dir.display(),
                %reason,
                "index on disk not used: rebuilding it from the store"
            );
            drop((index, parts));
            std::fs::remove_dir_all(&index_dir).map_err(|e| {
                Error::Unavailable(format!("cannot remove {}: {e}", index_dir.display()))
            })?;
            parts = SegmentedHnsw::open(part_segments(&config), dim)?;
            index = SegmentedHnsw::open(index_segments(&config), dim)?;
        }
        let reloaded = index.len();
        let (index_from, needs_index) = not_on_disk(index.covered_up_to(), index.missing_ranges());
        let parts_reloaded = parts.len();
        // Part ids are `prompt id × PART_SLOTS + j`, and a prompt's parts are inserted together.
        let (parts_from, needs_parts) = not_on_disk(
            parts.covered_up_to() / PART_SLOTS,
            (parts.missing_ranges().into_iter())
                .map(|(a, b)| (a / PART_SLOTS, b / PART_SLOTS))
                .collect(),
        );
        let mut parts_rebuilt = 0;
        let mut pending_parts: PendingParts = Vec::new();
        let allow_entries: Vec<AllowEntry> = match store.meta(ALLOW_META)? {
            Some(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| Error::Unavailable(format!("store: allow-list is unreadable: {e}")))?,
            None => Vec::new(),
        };
        let allow_list = AllowList::new(&allow_entries);
        // The detector starts from its snapshot, when there is a usable one, and replays only
        // what was stored after it; the store is read from the first prompt either index or the
        // detector lacks.
        let (mut detector, mut key_index, restored, snapshot_last) =
            match load_snapshot(&config, &store, &allow_entries) {
                Some((header, detector, keys)) => (detector, keys, header.prompts, header.last_id),
                None => (
                    Detector::new(config.detector.clone()),
                    KeyIndex::default(),
                    0,
                    0,
                ),
            };
        let from = (snapshot_last + 1).min(index_from).min(parts_from);
        let mut replayed = 0;
        let mut pending: Vec<(u64, i64, Vec<f32>)> = Vec::new();
        let mut rebuilt = 0;
        let mut last_id = snapshot_last;
        let mut flush = |index: &mut SegmentedHnsw,
                         pending: &mut Vec<(u64, i64, Vec<f32>)>|
         -> Result<(), Error> {
            index.insert_bulk(pending)?;
            rebuilt += pending.len();
            pending.clear();
            Ok(())
        };
        let mut index_err = None;
        // The store is read, and each chunk's template keys computed (on all cores), ahead of
        // the one thread that applies records in id order: the detector's state depends on it.
        replay_store(&store, &allow_list, from, snapshot_last + 1, |r, keys| {
            if r.id > snapshot_last {
                detector.replay(Observation {
                    id: r.id,
                    account_id: &r.account_id,
                    timestamp_ms: r.timestamp_ms,
                    text_hash: r.text_hash,
                    links: &r.links,
                    allowed: keys.is_none(),
                });
                if let Some((account, keys)) = keys {
                    key_index.record(r.id, account, &keys);
                }
                replayed += 1;
                last_id = r.id;
            }
            if needs_parts(r.id) && !r.parts.is_empty() {
                parts_rebuilt += r.parts.len().min(PART_SLOTS as usize);
                pending_parts.push((r.id, r.timestamp_ms, r.parts));
            }
            if pending_parts.len() >= 10_000
                && let Err(e) = flush_parts(&mut parts, &mut pending_parts)
            {
                index_err.get_or_insert(e.into());
            }
            if needs_index(r.id) {
                pending.push((r.id, r.timestamp_ms, r.embedding));
                if pending.len() >= 10_000
                    && let Err(e) = flush(&mut index, &mut pending)
                {
                    index_err.get_or_insert(e);
                }
            }
        })?;
        if let Some(e) = index_err {
            return Err(e);
        }
        flush(&mut index, &mut pending)?;
        flush_parts(&mut parts, &mut pending_parts)?;
        // Retention expires sealed segments as the data's clock passes them, at seals; a start
        // (with a shorter --retention-days than before, say) applies it at once.
        if let Some(now) = index.newest_ms() {
            index.drop_expired(now);
            parts.drop_expired(now);
        }
        index.merge_step();
        parts.merge_step();
        let open_stats = OpenStats {
            prompts: restored + replayed,
            reloaded,
            rebuilt,
            parts_reloaded,
            parts_rebuilt,
            restored,
            replayed,
            seconds: started.elapsed().as_secs_f64(),
        };
        tracing::info!(?open_stats, "engine opened");
        let engine = Self {
            config,
            store,
            index: RwLock::new(index),
            parts: RwLock::new(parts),
            detector: RwLock::new(detector),
            ingest: Mutex::new(IngestState {
                next_id: last_id + 1,
                snapshot_last,
                keys: key_index,
                allow: (allow_entries, allow_list),
                times: IngestTimes::default(),
            }),
            poisoned: std::sync::OnceLock::new(),
            poisoned_tx: tokio::sync::watch::Sender::new(false),
            open_stats,
        };
        // Cluster marks are not stored: re-derive them from the allow-list.
        let list = engine.ingest.lock().allow.1.clone();
        engine.allow_matching_clusters(&list, None)?;
        Ok(engine)
    }

    /// Allow-lists `template` (fixed words with `<*>` slots, as `campaigns` shows them): its
    /// future prompts are never linked into campaigns, and current campaigns most of whose sample
    /// prompts the allow-list matches stop scoring — unless the prompts it does not match follow
    /// a template of their own: a cluster is one unit, and clearing it would clear a campaign a
    /// few look-alikes chained to an app's prompts (those are `not_cleared`). Durable before it
    /// returns. A template already listed (one
    /// that matches the same prompts: the same words, whatever the spacing, case or punctuation
    /// at their edges) keeps its one entry, which is returned with `already_listed` set.
    pub fn allow_template(
        &self,
        template: &str,
        note: &str,
        now_ms: i64,
    ) -> Result<Allowed, Error> {
        let rule = AllowRule::compile_new(template).map_err(|r| Error::invalid("template", r))?;
        let template = template.trim();
        let (entry, already_listed) = {
            let mut state = self.ingest.lock();
            let listed = state.allow.1.listed(&rule);
            match state.allow.0.iter().find(|e| Some(e.id) == listed) {
                // The same template twice is one entry: the list stays the set an admin reads.
                Some(e) => (e.clone(), true),
                None => {
                    let last_given = self
                        .store
                        .meta(ALLOW_LAST_ID_META)?
                        .and_then(|b| <[u8; 8]>::try_from(b.as_slice()).ok())
                        .map_or(0, u64::from_le_bytes);
                    let listed = state.allow.0.iter().map(|e| e.id).max().unwrap_or(0);
                    let id = last_given.max(listed) + 1;
                    // Given before it is listed: a crash between the two skips an id, never
                    // gives one twice.
                    self.store.set_meta(ALLOW_LAST_ID_META, &id.to_le_bytes())?;
                    let entry = AllowEntry {
                        id,
                        template: template.to_string(),
                        note: note.to_string(),
                        created_ms: now_ms,
                    };
                    let mut entries = state.allow.0.clone();
                    entries.push(entry.clone());
                    self.set_allow(&mut state, entries)?;
                    (entry, false)
                }
            }
        };
        let list = self.ingest.lock().allow.1.clone();
        let (cleared, not_cleared) = self.allow_matching_clusters(&list, Some(&rule))?;
        Ok(Allowed {
            entry,
            cleared,
            not_cleared,
            already_listed,
        })
    }

    /// Allow-lists the template recovered from campaign `campaign_id` (see [`Engine::campaign`]).
    pub fn allow_campaign(
        &self,
        campaign_id: u64,
        note: &str,
        now_ms: i64,
    ) -> Result<Allowed, Error> {
        let view = self.campaign(campaign_id)?;
        if !view.summary.is_campaign {
            // Asked again (a retry after a lost answer): its entry, nothing added, as a template
            // asked again gets.
            // (The detector's lock is let go before the allow-list's is taken.)
            let allowed = self.detector.read().cluster_allowed(view.summary.id);
            let listed = allowed
                .then(|| self.allowed_templates())
                .and_then(|list| list.into_iter().find(|e| e.template == view.template));
            if let Some(entry) = listed {
                return Ok(Allowed {
                    entry,
                    cleared: 0,
                    not_cleared: Vec::new(),
                    already_listed: true,
                });
            }
            // A typo'd id (1 for 12) would put one user's question on the admin's list.
            return Err(Error::invalid(
                "campaign_id",
                format!(
                    "{campaign_id} is in cluster {}, which is not a campaign (score {}, {}), or is allow-listed already (`allow list`); an app's template that is not yet a campaign is allow-listed with a template",
                    view.summary.id,
                    crate::detect::scoring::score_text(view.summary.score, 3),
                    crate::detect::scoring::counted(view.summary.accounts, "account")
                ),
            ));
        }
        if let Err(reason) = AllowRule::compile_new(&view.template) {
            // A cluster of several templates shares few words; the admin wants one of them.
            let several = if view.templates.len() > 1 {
                format!(
                    "; its prompts follow {} templates (`campaigns --id {campaign_id}` lists them): \
                     allow-list the app's own with a template instead",
                    view.templates.len()
                )
            } else {
                String::new()
            };
            return Err(Error::invalid(
                "campaign_id",
                format!(
                    "the template recovered from {campaign_id}, {:?}, cannot be allow-listed: {reason}{several}",
                    view.template
                ),
            ));
        }
        let mut allowed = self.allow_template(&view.template, note, now_ms)?;
        // Every sampled prompt follows the template recovered from them all: the cluster goes.
        if self.detector.write().allow_cluster(view.summary.id) {
            allowed.cleared = allowed.cleared.max(1);
        }
        allowed.not_cleared.retain(|&c| c != view.summary.id);
        Ok(allowed)
    }

    /// The allow-list, oldest first.
    pub fn allowed_templates(&self) -> Vec<AllowEntry> {
        self.ingest.lock().allow.0.clone()
    }

    /// Removes allow-list entry `id`: later prompts of that template are judged again, and the
    /// campaigns it cleared score again. The clusters' marks are derived afresh from the entries
    /// left, as a start derives them, so the live state is what a restart would give.
    pub fn remove_allowed(&self, id: u64) -> Result<Removed, Error> {
        // Ingest waits meanwhile, so no prompt is judged between clearing and re-marking.
        let mut state = self.ingest.lock();
        let Some(pos) = state.allow.0.iter().position(|e| e.id == id) else {
            return Err(Error::NotFound(format!("id: no allow-list entry {id}")));
        };
        let mut entries = state.allow.0.clone();
        let gone = entries.remove(pos);
        self.set_allow(&mut state, entries)?;
        let cleared = {
            let mut d = self.detector.write();
            let cleared = d.allowed_roots();
            d.clear_allowed();
            cleared
        };
        self.allow_matching_clusters(&state.allow.1, None)?;
        let d = self.detector.read();
        let mut scoring_again: Vec<u64> = cleared
            .into_iter()
            .filter_map(|root| d.campaign_of(root))
            .collect();
        scoring_again.sort_unstable();
        scoring_again.dedup();
        Ok(Removed {
            entry: gone,
            scoring_again,
        })
    }

    /// Makes `entries` the allow-list: durable, then in force. The detector snapshot on disk
    /// was written under the old list, so the next start would not use it: the next checkpoint
    /// or seal writes one again.
    fn set_allow(&self, state: &mut IngestState, entries: Vec<AllowEntry>) -> Result<(), Error> {
        let bytes = serde_json::to_vec(&entries)
            .map_err(|e| Error::Unavailable(format!("allow-list: {e}")))?;
        self.store.set_meta(ALLOW_META, &bytes)?;
        let list = AllowList::new(&entries);
        state.allow = (entries, list);
        state.snapshot_last = 0;
        Ok(())
    }

    /// Marks as allowed the campaigns at least half of whose sampled prompts `list` matches,
    /// and whose other sampled prompts follow no template of their own (see
    /// [`template::groups`]): an app's cluster with a few organic look-alikes goes, a campaign
    /// chained to an app's prompts stays. Returns how many it marked, and the campaigns `focus`
    /// (a rule just added) matches a sampled prompt of that it left.
    fn allow_matching_clusters(
        &self,
        list: &AllowList,
        focus: Option<&AllowRule>,
    ) -> Result<(usize, Vec<u64>), Error> {
        if list.is_empty() {
            return Ok((0, Vec::new()));
        }
        let campaigns = {
            let d = self.detector.read();
            d.campaign_samples(d.config().campaign_score)
        };
        let (mut hit, mut left) = (Vec::new(), Vec::new());
        for (root, ids) in campaigns {
            let samples = self.store.get_many(&ids)?;
            let (matched, rest): (Vec<&PromptRecord>, Vec<&PromptRecord>) = samples
                .iter()
                .partition(|r| list.matching(&r.text).is_some());
            if matched.is_empty() {
                continue;
            }
            let rest: Vec<&str> = rest.iter().map(|r| r.text.as_str()).collect();
            if 2 * matched.len() >= samples.len() && template::groups(&rest).0.is_empty() {
                hit.push(root);
            } else if focus.is_some_and(|f| matched.iter().any(|r| f.matches(&r.text))) {
                left.push(root);
            }
        }
        let mut d = self.detector.write();
        let cleared = hit.into_iter().filter(|&id| d.allow_cluster(id)).count();
        Ok((cleared, left))
    }

    /// Whether prompts should come with part embeddings (`NewPrompt::parts`): part links are on.
    pub fn uses_parts(&self) -> bool {
        self.config.detector.part_matches > 0
    }

    /// What opening found and did.
    pub fn open_stats(&self) -> OpenStats {
        self.open_stats
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        &self.config.data_dir
    }

    /// Checks that `embedder` is the model whose vectors this data directory holds, and records
    /// it (as `model`, for messages) in a directory that has no record yet.
    ///
    /// Two models' vectors cannot be compared: served with another model (even of the same
    /// dimension), new prompts would never match stored ones and campaigns would go unseen,
    /// silently. The record is a probe sentence's embedding; the same model on another device
    /// or in half precision gives it back at a cosine above 0.999, another model far lower.
    pub fn check_model<E: Embedder + ?Sized>(
        &self,
        embedder: &mut E,
        model: &str,
    ) -> Result<(), Error> {
        let probe = embedder.embed(&[MODEL_PROBE])?.pop().unwrap_or_default();
        match self
            .store
            .meta(MODEL_META)?
            .as_deref()
            .and_then(decode_model)
        {
            None => {
                let mut bytes = (probe.len() as u32).to_le_bytes().to_vec();
                probe
                    .iter()
                    .for_each(|x| bytes.extend_from_slice(&x.to_le_bytes()));
                bytes.extend_from_slice(model.as_bytes());
                self.store.set_meta(MODEL_META, &bytes)?;
                Ok(())
            }
            Some((stored, name)) => {
                let cosine = if stored.len() == probe.len() {
                    dot(&stored, &probe)
                } else {
                    0.0
                };
                if cosine >= SAME_MODEL_COSINE {
                    return Ok(());
                }
                Err(Error::OtherModel(format!(
                    "data directory {} holds the vectors of another model ({name}: a probe sentence embeds at cosine {cosine:.3} to its vector there, not >= {SAME_MODEL_COSINE}), and two models' vectors cannot be compared: run with the model that wrote it, or with a new --data-dir",
                    self.config.data_dir.display()
                )))
            }
        }
    }

    /// Ingests a batch in order and returns one verdict per prompt, after the batch is durable.
    pub fn ingest(&self, batch: Vec<NewPrompt>) -> Result<Vec<Verdict>, Error> {
        self.ingest_scoring(batch, true)
    }

    /// [`Self::ingest`] for a run that reads no verdicts (`reindex`): the same links, clusters
    /// and store, without scoring each prompt's account, which is most of the serial part of
    /// ingest for accounts of many prompts (as a start's replay does, see `Detector::replay`).
    pub fn ingest_unscored(&self, batch: Vec<NewPrompt>) -> Result<(), Error> {
        self.ingest_scoring(batch, false).map(|_| ())
    }

    /// [`Self::ingest`]; no verdicts (an empty list) unless `score`.
    fn ingest_scoring(&self, batch: Vec<NewPrompt>, score: bool) -> Result<Vec<Verdict>, Error> {
        if let Some(failure) = self.failure() {
            return Err(Error::Unavailable(failure));
        }
        let mut state = self.ingest.lock();
        let mut clock = Instant::now();
        let mut lap = || {
            let now = Instant::now();
            let took = now - clock;
            clock = now;
            took
        };
        let mut times = state.times;
        times.batches += 1;
        let cfg = &self.config.detector;
        let first_id = state.next_id;
        let n = batch.len();
        // Per prompt, its text hash and links (`None`: an allow-listed template matched it).
        let (hashes, found): (Vec<u64>, Vec<Option<Found>>) = {
            let index = self.index.read();
            let part_index = self.parts.read();
            // Everything a prompt's links need but the key index, which changes as the batch goes
            // in: index and part-index searches and the batch's earlier prompts (all pairs at
            // once, by matrix products: `in_batch`), read-only, so the batch's prompts are looked
            // up on all cores with the results of one by one; and the prompt's template keys,
            // which the key index then takes in order.
            let allow = &state.allow.1;
            // A small batch (a gateway's few requests) stays on this thread: handing it to the
            // pool would queue it behind the embedder's work there.
            let parallel = n >= PARALLEL_LOOKUPS;
            let within = in_batch(&batch, first_id, index.dim(), cfg, parallel);
            let lookup = |(i, p): (usize, &NewPrompt)| {
                let hash = text_hash(&p.text);
                let Some(keys) = template_keys(allow, &p.account_id, &p.text) else {
                    return (hash, None);
                };
                if !p.readable {
                    let (near, parts) = (Vec::new(), Vec::new());
                    return (hash, Some(Found { near, parts, keys }));
                }
                let mut near: Vec<Neighbour> = index.search(&p.embedding, cfg.neighbours_k);
                near.retain(|n| n.similarity >= cfg.similarity_threshold);
                // The batch's unreadable prompts are no one's neighbours either.
                let in_batch = within.near[i].iter();
                near.extend(in_batch.filter(|n| batch[(n.id - first_id) as usize].readable));
                near.sort_by(by_similarity);
                near.truncate(cfg.neighbours_k);
                let near = near.iter().map(|n| n.id).collect();
                let parts = part_links(&part_index, &p.parts, &within.parts[i], cfg);
                (hash, Some(Found { near, parts, keys }))
            };
            if parallel {
                batch.par_iter().enumerate().map(lookup).unzip()
            } else {
                batch.iter().enumerate().map(lookup).unzip()
            }
        };
        times.lookup += lap();
        // A batch after a gap in traffic (days later) starts a time slice of its own: sealed
        // with the prompts from before the gap, it would keep them from retention for as long
        // as its own. (Those prompts are committed; this batch's are not yet in the index.)
        let times_of = || batch.iter().map(|p| p.timestamp_ms);
        if let (Some(oldest), Some(newest)) = (times_of().min(), times_of().max()) {
            for (index, name) in [(&self.parts, "part index"), (&self.index, "index")] {
                let mut index = index.write();
                match index.seal_before(oldest) {
                    Ok(true) => {
                        let dropped = index.drop_expired(newest);
                        tracing::info!(
                            index = name,
                            dropped,
                            "sealed a segment before a gap in traffic"
                        );
                    }
                    Ok(false) => {}
                    Err(e) => {
                        tracing::warn!(index = name, error = %e, "segment not sealed before a gap in traffic");
                    }
                }
            }
        }
        times.index += lap();
        // The vectors go into the index and the part index on a thread of their own (on all
        // cores for a large batch), as they need nothing from the detector: meanwhile this
        // thread clusters the batch in order and then commits it to the store. Only sealing,
        // which puts a segment on disk, waits for both, so a sealed segment never holds a
        // prompt the store lacks. If the commit fails, the engine is poisoned and writes no
        // checkpoint: what the active segments hold beyond the store never reaches disk.
        let mut links_of: Vec<Vec<u64>> = Vec::with_capacity(n);
        let mut verdicts: Vec<Verdict> = Vec::with_capacity(if score { n } else { 0 });
        let mut cluster_ids: Vec<u64> = Vec::with_capacity(n);
        let (committed, inserted) = std::thread::scope(|s| {
            let inserter = s.spawn(|| {
                let started = Instant::now();
                (self.insert_vectors(first_id, &batch), started.elapsed())
            });
            let mut detector = self.detector.write();
            for (i, ((p, &hash), found)) in batch.iter().zip(&hashes).zip(found).enumerate() {
                let id = first_id + i as u64;
                let mut links: Vec<u64> = Vec::new();
                let allowed = found.is_none();
                if let Some(Found { near, parts, keys }) = found {
                    links = near;
                    let more = parts
                        .into_iter()
                        .chain(state.keys.link(id, keys.0, &keys.1));
                    for l in more {
                        if !links.contains(&l) {
                            links.push(l);
                        }
                    }
                    // Never to a known app's prompt (see `Detector::closed`). Dropped before the
                    // links are stored, so a start's replay unions the same clusters.
                    links.retain(|&l| !detector.closed(l));
                }
                let observation = Observation {
                    id,
                    account_id: &p.account_id,
                    timestamp_ms: p.timestamp_ms,
                    text_hash: hash,
                    links: &links,
                    allowed,
                };
                if score {
                    let verdict = detector.observe(observation);
                    cluster_ids.push(verdict.cluster_id);
                    verdicts.push(verdict);
                } else {
                    cluster_ids.push(detector.replay(observation));
                }
                links_of.push(links);
            }
            drop(detector);
            state.next_id += n as u64;
            times.cluster += lap();
            let records = batch.iter().enumerate().map(|(i, p)| RecordRef {
                id: first_id + i as u64,
                account_id: &p.account_id,
                timestamp_ms: p.timestamp_ms,
                text: &p.text,
                text_hash: hashes[i],
                embedding: &p.embedding,
                cluster_id: cluster_ids[i],
                links: &links_of[i],
                parts: &p.parts,
            });
            let committed = self.store.append_refs(records);
            times.store += lap();
            match inserter.join() {
                Ok((inserted, took)) => {
                    times.index += took;
                    (committed, inserted)
                }
                Err(panic) => std::panic::resume_unwind(panic),
            }
        });
        let _ = lap();
        if let Err(e) = committed {
            return Err(self.poison(e.into()));
        }
        inserted?;
        // A late prompt last in the batch must not turn retention's clock back.
        let now = batch.iter().map(|p| p.timestamp_ms).max().unwrap_or(0);
        // The batch is stored: a seal that fails (an unwritable or full index directory) must
        // not fail it, or a client's retry would store it twice. The active segment stays in
        // memory, searched as before, and the seal is tried again later.
        let seal = |index: &RwLock<SegmentedHnsw>, name: &str| {
            seal_and_merge(&mut index.write(), now, name).unwrap_or_else(|e| {
                tracing::warn!(
                    index = name,
                    error = %e,
                    retry_seconds = crate::index::SEAL_RETRY.as_secs(),
                    "segment not sealed (the prompts are stored; the next start re-indexes them if it never is)"
                );
                false
            })
        };
        seal(&self.parts, "part index");
        let sealed = seal(&self.index, "index");
        times.index += lap();
        // Once a segment is sealed, the index on disk holds every prompt so far; a snapshot
        // now means a start after a crash reads only the active segment's prompts back from
        // the store. Written at a seal only when the prompts since the last one are at least a
        // quarter of all, so its cost per prompt stays constant as the store grows; a failed
        // one (a full disk) costs only start time, so it does not fail the batch.
        let last = state.next_id - 1;
        if sealed && snapshot_due(last, state.snapshot_last) {
            let started = Instant::now();
            match self.save_snapshot(&mut state) {
                Ok((prompts, bytes)) => tracing::info!(
                    prompts,
                    bytes,
                    seconds = started.elapsed().as_secs_f64(),
                    "detector snapshot written at a sealed segment"
                ),
                Err(e) => tracing::warn!(error = %e, "detector snapshot not written"),
            }
            times.index += lap();
        }
        state.times = times;
        Ok(verdicts)
    }

    /// Refuses further writes after a failed store commit, until a restart rebuilds memory from
    /// what the store really has: the detector (and the active index segments) already hold the
    /// batch. Returns `e`.
    fn poison(&self, e: Error) -> Error {
        let cause = e.cause();
        let _ = self.poisoned.set(format!(
            "a store commit failed ({cause}): restart the server; the store holds every prompt answered before, and until a restart this process's counts would include prompts it did not store"
        ));
        self.poisoned_tx.send_replace(true);
        e
    }

    /// Turns true when a store commit fails (see [`Self::failure`]), for a server to stop
    /// reporting itself healthy at once; it ends (the sender gone) with the engine.
    pub fn failure_watch(&self) -> tokio::sync::watch::Receiver<bool> {
        self.poisoned_tx.subscribe()
    }

    /// Why the engine refuses all work since a store commit failed (`None`: it has not). Its
    /// memory then holds a batch the store lacks, so counts and verdicts would be wrong until a
    /// restart rebuilds it from the store.
    pub fn failure(&self) -> Option<String> {
        self.poisoned.get().cloned()
    }

    /// Inserts the vectors of `batch`, whose ids start at `first_id`, into the active segments
    /// of the index and the part index.
    fn insert_vectors(&self, first_id: u64, batch: &[NewPrompt]) -> Result<(), Error> {
        let id = |i: usize| first_id + i as u64;
        let parts = part_items(
            (batch.iter().enumerate()).map(|(i, p)| (id(i), p.timestamp_ms, &p.parts[..])),
        );
        insert_batch(&mut self.parts.write(), &parts)?;
        let items: Vec<(u64, i64, &[f32])> = (batch.iter().enumerate())
            .map(|(i, p)| (id(i), p.timestamp_ms, &p.embedding[..]))
            .collect();
        insert_batch(&mut self.index.write(), &items)?;
        Ok(())
    }

    /// Writes what the next open would otherwise rebuild from the store: the active index
    /// segment, the part index's, and the detector snapshot (clusters, accounts and template
    /// keys). Call it at a clean shutdown and at the end of a batch run; ingest waits meanwhile.
    /// Prompts ingested afterwards are safe in the store and replayed by the next open on top of
    /// what was written, so skipping it (a crash) costs only time.
    pub fn checkpoint(&self) -> Result<CheckpointStats, Error> {
        let started = Instant::now();
        let mut ingest = self.ingest.lock();
        if self.poisoned.get().is_some() {
            return Err(Error::Unavailable(
                "index checkpoint not written: an earlier store commit failed".into(),
            ));
        }
        let index_on_disk = (|| -> Result<_, Error> {
            let mut index = self.index.write();
            // What the last seal left past retention (the data's clock went on since).
            if let Some(now) = index.newest_ms() {
                index.drop_expired(now);
                self.parts.write().drop_expired(now);
            }
            let active_vectors = index.checkpoint()?;
            let (segments, mut merging) = (index.segments().len(), index.is_merging());
            drop(index);
            let mut parts = self.parts.write();
            let part_vectors = parts.checkpoint()?;
            merging |= parts.is_merging();
            Ok((active_vectors, part_vectors, segments, merging))
        })();
        // The snapshot is judged against the store alone, so it is written whether or not the
        // index could be. One that cannot be written (a full disk) costs only the next start's
        // replay, so it is reported, not an error.
        let (detector_prompts, detector_bytes, detector_error) =
            match self.save_snapshot(&mut ingest) {
                Ok((prompts, bytes)) => (prompts, bytes, None),
                Err(e) => (0, 0, Some(e)),
            };
        let (active_vectors, part_vectors, segments, merging) = index_on_disk.map_err(|e| {
            let snapshot = if detector_error.is_none() {
                "the detector snapshot was written"
            } else {
                "nor the detector snapshot"
            };
            Error::Unavailable(format!(
                "index checkpoint not written ({e}); {snapshot}; the store holds every prompt and the next start re-indexes what the index on disk lacks"
            ))
        })?;
        Ok(CheckpointStats {
            active_vectors,
            part_vectors,
            segments,
            merging,
            detector_prompts,
            detector_bytes,
            detector_error,
            seconds: started.elapsed().as_secs_f64(),
        })
    }

    /// Writes the detector snapshot as of the last stored prompt; returns its prompts and bytes
    /// ((0, 0) when nothing is stored). Ingest must be held, so no batch is half applied. When
    /// the snapshot on disk already holds exactly this state (a stop after a start with nothing
    /// ingested, a checkpoint right after a seal wrote one), it is left as it is: rewriting it
    /// would cost ~0.5 µs per prompt held for nothing.
    fn save_snapshot(&self, ingest: &mut IngestState) -> Result<(u64, u64), String> {
        let detector = self.detector.read();
        let last_id = ingest.next_id - 1;
        let Some(last_text_hash) = detector.text_hash(last_id) else {
            return Ok((0, 0));
        };
        let path = self.config.data_dir.join(SNAPSHOT_FILE);
        if ingest.snapshot_last == last_id
            && let Ok(on_disk) = std::fs::metadata(&path)
        {
            return Ok((detector.prompts(), on_disk.len()));
        }
        let header = SnapshotHeader {
            last_id,
            last_text_hash,
            prompts: detector.prompts(),
            allow: allow_fingerprint(&ingest.allow.0),
        };
        let bytes = snapshot::save(&path, &header, &detector, &ingest.keys)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        ingest.snapshot_last = last_id;
        Ok((header.prompts, bytes))
    }

    /// Busy time of each ingest phase since the engine was opened.
    pub fn ingest_times(&self) -> IngestTimes {
        self.ingest.lock().times
    }

    /// Stored prompts nearest to stored prompt `id`, filtered: that prompt first, at similarity
    /// 1 (unless the filter leaves it out), then the others, most similar first. Prompts with the
    /// very same vector (a text sent again) tie with it; the index need not return it among
    /// them at all, so it is put first here.
    pub fn search_like(&self, id: u64, k: usize, filter: &SearchFilter) -> Result<Vec<Hit>, Error> {
        let record = self.record(id)?;
        let mut hits = self.search(&record.embedding, k, filter)?;
        if filter.admits(&record) {
            hits.retain(|h| h.record.id != id);
            let (cluster_id, campaign_id) = {
                let detector = self.detector.read();
                (detector.cluster_of(id), detector.campaign_of(id))
            };
            hits.insert(
                0,
                Hit {
                    record,
                    similarity: 1.0,
                    cluster_id,
                    campaign_id,
                },
            );
            hits.truncate(k);
        }
        Ok(hits)
    }

    /// Nearest stored prompts to `query`, filtered; most similar first.
    pub fn search(
        &self,
        query: &[f32],
        k: usize,
        filter: &SearchFilter,
    ) -> Result<Vec<Hit>, Error> {
        if let Some(account) = &filter.account_id {
            // An account's own prompts, when they are few, are compared one by one: exact, and
            // an account with few (or no) prompts among millions would otherwise widen the
            // graph search below to the whole index before it finds k of them.
            let ids = self.detector.read().prompts_of(account).unwrap_or_default();
            if ids.len() <= EXACT_ACCOUNT_SEARCH {
                return self.search_among(query, k, &ids, filter);
            }
        }
        let total = self.index.read().len();
        let filtered =
            filter.account_id.is_some() || filter.from_ms.is_some() || filter.to_ms.is_some();
        // Filters are applied after the graph search: oversample, and widen until enough match.
        let mut want = if filtered { (k * 8).max(64) } else { k };
        loop {
            let near = self.index.read().search_range(
                query,
                want.min(total.max(1)),
                filter.from_ms,
                filter.to_ms,
            );
            let ids: Vec<u64> = near.iter().map(|n| n.id).collect();
            let mut records: std::collections::HashMap<u64, PromptRecord> = self
                .store
                .get_many(&ids)?
                .into_iter()
                .map(|r| (r.id, r))
                .collect();
            let detector = self.detector.read();
            let mut hits: Vec<Hit> = ids
                .iter()
                .filter_map(|id| records.remove(id))
                .filter(|r| filter.admits(r))
                .map(|record| Hit {
                    // Exact, from the stored vector, independent of the index's distance.
                    similarity: dot(query, &record.embedding),
                    cluster_id: detector.cluster_of(record.id),
                    campaign_id: detector.campaign_of(record.id),
                    record,
                })
                .collect();
            hits.sort_by(nearest_first);
            if hits.len() >= k || want >= total {
                hits.truncate(k);
                return Ok(hits);
            }
            want = (want * 8).min(total);
        }
    }

    /// The `k` prompts among `ids` nearest to `query` that pass `filter`, exactly: read from
    /// the store in chunks, compared with their stored vectors.
    fn search_among(
        &self,
        query: &[f32],
        k: usize,
        ids: &[u64],
        filter: &SearchFilter,
    ) -> Result<Vec<Hit>, Error> {
        let mut hits: Vec<Hit> = Vec::new();
        for chunk in ids.chunks(4096) {
            for record in self.store.get_many(chunk)? {
                if filter.admits(&record) {
                    hits.push(Hit {
                        similarity: dot(query, &record.embedding),
                        // Set below, for the k kept.
                        cluster_id: 0,
                        campaign_id: None,
                        record,
                    });
                }
            }
            // Keep the k best so far: memory stays O(k + chunk).
            if hits.len() > 4 * k.max(1024) {
                hits.select_nth_unstable_by(k, nearest_first);
                hits.truncate(k);
            }
        }
        hits.sort_by(nearest_first);
        hits.truncate(k);
        let detector = self.detector.read();
        for h in &mut hits {
            h.cluster_id = detector.cluster_of(h.record.id);
            h.campaign_id = detector.campaign_of(h.record.id);
        }
        Ok(hits)
    }

    /// A stored prompt by id.
    pub fn record(&self, id: u64) -> Result<PromptRecord, Error> {
        self.store
            .get(id)?
            .ok_or_else(|| Error::NotFound(format!("prompt_id: no prompt {id}")))
    }

    /// The first stored prompt of `account_id` with exactly this text (and this time, when
    /// given), if any. A scan of the detector's one small entry per prompt (~1 ms per 100k), then
    /// the store for the account's prompts with the same words.
    pub fn find_stored(
        &self,
        account_id: &str,
        text: &str,
        timestamp_ms: Option<i64>,
    ) -> Result<Option<u64>, Error> {
        let hash = crate::store::text_hash(text);
        let candidates: Vec<u64> = {
            let d = self.detector.read();
            let Some(ids) = d.prompts_of(account_id) else {
                return Ok(None);
            };
            ids.into_iter()
                .filter(|&id| d.text_hash(id) == Some(hash))
                .collect()
        };
        for id in candidates {
            let r = self.record(id)?;
            if r.text == text && timestamp_ms.is_none_or(|t| t == r.timestamp_ms) {
                return Ok(Some(id));
            }
        }
        Ok(None)
    }

    /// Campaigns scoring at least `min_score`, highest first, at most `top`; and how many there
    /// are in all.
    pub fn campaigns(
        &self,
        top: usize,
        min_score: f32,
    ) -> Result<(Vec<CampaignView>, usize), Error> {
        // Summaries (a walk over each account of the cluster) of the `top` only; the rest are
        // counted.
        let (summaries, total): (Vec<CampaignSummary>, usize) = {
            let d = self.detector.read();
            let min = min_score.max(d.config().campaign_score);
            let roots = d.campaign_roots(min);
            let total = roots.len();
            let top = roots.into_iter().take(top);
            (top.filter_map(|root| d.campaign(root)).collect(), total)
        };
        let views = summaries
            .into_iter()
            .map(|s| self.campaign_view(s))
            .collect::<Result<_, _>>()?;
        Ok((views, total))
    }

    /// One campaign by any prompt id of its cluster.
    pub fn campaign(&self, id: u64) -> Result<CampaignView, Error> {
        let s = self.detector.read().campaign(id);
        match s {
            Some(s) => self.campaign_view(s),
            None => Err(Error::NotFound(format!(
                "campaign_id: no campaign or prompt {id}"
            ))),
        }
    }

    fn campaign_view(&self, summary: CampaignSummary) -> Result<CampaignView, Error> {
        let texts: Vec<(u64, String)> = self
            .store
            .get_many(&summary.samples)?
            .into_iter()
            .map(|r| (r.id, r.text))
            .collect();
        let refs: Vec<&str> = texts.iter().map(|(_, t)| t.as_str()).collect();
        let template = template::extract(&refs);
        let (templates, sampled_alone) = template::groups(&refs);
        let shown = crate::detect::examples(&summary.samples);
        let examples = texts
            .iter()
            .filter(|(id, _)| shown.binary_search(id).is_ok())
            .map(|(_, t)| t.clone())
            .collect();
        // (The detector's lock is let go before the allow-list's is taken.)
        let allow_listed = self.detector.read().cluster_allowed(summary.id);
        let allowed_by = if allow_listed {
            let list = self.ingest.lock().allow.1.clone();
            let mut votes: std::collections::HashMap<u64, usize> = Default::default();
            for text in &refs {
                if let Some(entry) = list.matching(text) {
                    *votes.entry(entry).or_default() += 1;
                }
            }
            // Most matches, then the oldest entry.
            votes
                .into_iter()
                .max_by_key(|&(entry, n)| (n, std::cmp::Reverse(entry)))
                .map(|(entry, _)| entry)
        } else {
            None
        };
        Ok(CampaignView {
            summary,
            template,
            templates,
            sampled: refs.len() as u32,
            sampled_alone,
            examples,
            allow_listed,
            allowed_by,
        })
    }

    /// Every account's verdict, highest score first; `flagged_only` keeps flagged ones.
    pub fn accounts(&self, flagged_only: bool, limit: usize) -> Vec<AccountSummary> {
        let mut all = self.detector.read().accounts();
        if flagged_only {
            all.retain(|a| a.flagged);
        }
        if limit > 0 {
            all.truncate(limit);
        }
        all
    }

    /// One account's verdict.
    pub fn account(&self, account_id: &str) -> Result<AccountSummary, Error> {
        self.detector
            .read()
            .account(account_id)
            .ok_or_else(|| Error::NotFound(format!("account_id: no account {account_id:?}")))
    }

    /// How much the engine holds: prompts, accounts, and both indexes' segments and vectors.
    /// Cheap (a sum over accounts and segments), for a dashboard that polls.
    pub fn census(&self) -> Census {
        let (prompts, accounts) = {
            let d = self.detector.read();
            (d.prompts(), d.account_count())
        };
        let sizes = |index: &RwLock<SegmentedHnsw>| {
            let segments = index.read().segments();
            (
                segments.len(),
                segments.iter().map(|s| s.count as u64).sum(),
            )
        };
        Census {
            prompts,
            accounts,
            index: sizes(&self.index),
            part_index: sizes(&self.parts),
        }
    }

    /// How long prompts stay in the index (`--retention-days`; `None`: for ever).
    pub fn retention_ms(&self) -> Option<i64> {
        self.config.segments.retention_ms
    }

    /// Prompts stored.
    pub fn len(&self) -> u64 {
        self.detector.read().prompts()
    }

    /// True when nothing is stored.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What [`Engine::census`] counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Census {
    /// Prompts stored.
    pub prompts: u64,
    /// Accounts that sent a prompt.
    pub accounts: u64,
    /// The vector index's segments and vectors.
    pub index: (usize, u64),
    /// The part index's segments and vectors.
    pub part_index: (usize, u64),
}

/// Store meta key of the model record (see [`Engine::check_model`]).
const MODEL_META: &str = "model_probe";

/// The sentence whose embedding identifies a model.
const MODEL_PROBE: &str =
    "Summarise the following customer review in one sentence, then rate its tone from 1 to 5.";

/// The least cosine between a probe's stored and fresh embeddings for the same model.
const SAME_MODEL_COSINE: f32 = 0.99;

/// A model record: the probe's vector (dimension, then f32s) and the model's name.
fn decode_model(bytes: &[u8]) -> Option<(Vec<f32>, String)> {
    let dim = u32::from_le_bytes(bytes.get(..4)?.try_into().ok()?) as usize;
    let vector = bytes.get(4..4 + 4 * dim)?;
    let vector = vector
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let name = String::from_utf8_lossy(&bytes[4 + 4 * dim..]).into_owned();
    Some((vector, name))
}

/// Accounts with at most this many prompts are searched exactly, prompt by prompt (at most
/// ~40 MB read from the store); larger ones through the graph, where they are dense enough.
const EXACT_ACCOUNT_SEARCH: usize = 20_000;

/// Prompts in a batch from which [`Engine::ingest`] looks them up on all cores.
const PARALLEL_LOOKUPS: usize = 32;

/// The part index trades a little recall for insert speed: it takes 1–4 vectors per prompt, and
/// a part match needs only one of several near-identical template sentences to be found.
const PART_HNSW: HnswParams = HnswParams {
    m: 12,
    ef_construction: 48,
    ef_search: 32,
    max_elements: 200_000,
};

/// Ids per prompt in the part index (a prompt has at most `keys::MAX_PARTS` parts).
const PART_SLOTS: u64 = 8;

/// The slice clock of the index in `config`'s data directory, and the vectors of its active
/// segment's checkpoint (see [`SegmentedHnsw::clock_on_disk`]); `None` without time slices.
pub fn slice_clock_on_disk(config: &EngineConfig) -> Option<(crate::index::SliceClock, usize)> {
    SegmentedHnsw::clock_on_disk(&index_segments(config))
}

/// The vector index's segments: the index's settings, in their directory.
fn index_segments(config: &EngineConfig) -> SegmentsConfig {
    SegmentsConfig {
        dir: Some(config.data_dir.join(INDEX_DIR)),
        ..config.segments.clone()
    }
}

/// The part index's segments: the index's settings (size, time span, retention, merges) with
/// [`PART_HNSW`], in their own directory.
fn part_segments(config: &EngineConfig) -> SegmentsConfig {
    SegmentsConfig {
        params: PART_HNSW,
        dir: Some(config.data_dir.join(INDEX_DIR).join(PARTS_DIR)),
        ..config.segments.clone()
    }
}

/// Removes the one-file part-index checkpoints (`parts-<id>.hnsw.*`) earlier versions wrote in
/// `dir`: the part index now lives in segments of its own, rebuilt from the store once.
fn remove_legacy_part_dumps(dir: &Path) {
    let Ok(read) = std::fs::read_dir(dir) else {
        return;
    };
    for e in read.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("parts-") && name.contains(".hnsw.") {
            tracing::info!(file = %name, "removing an old part index checkpoint");
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// What [`Engine::ingest`] looks up for a prompt on all cores.
struct Found {
    /// Neighbours above the similarity threshold.
    near: Vec<u64>,
    /// Prompts sharing enough parts.
    parts: Vec<u64>,
    /// Who sent the prompt and its template keys.
    keys: (Source, Vec<u64>),
}

/// The part-index entries of `(prompt id, timestamp, parts)`: each part under
/// `id × PART_SLOTS + part number`.
fn part_items<'a>(
    prompts: impl Iterator<Item = (u64, i64, &'a [Vec<f32>])>,
) -> Vec<(u64, i64, &'a [f32])> {
    prompts
        .flat_map(|(id, ts, parts)| {
            parts
                .iter()
                .take(PART_SLOTS as usize)
                .enumerate()
                .map(move |(j, v)| (id * PART_SLOTS + j as u64, ts, v.as_slice()))
        })
        .collect()
}

/// A prompt's template keys, with who sent it (see `keys::Source`); `None` when an allow-listed template
/// matches it: a known legitimate app's prompt is stored and searchable but never linked.
/// Ingest and a start's replay both ask here, so a start rebuilds the key index ingest built.
fn template_keys(allow: &AllowList, account_id: &str, text: &str) -> Option<(Source, Vec<u64>)> {
    allow.matching(text).is_none().then(|| {
        let from = Source {
            account: keys::account_hash(account_id),
            text: keys::text_identity(text),
        };
        (from, keys::keys(text))
    })
}

/// Records a start's replay reads ahead per chunk.
const REPLAY_CHUNK: usize = 2048;

/// Every stored record from id `from` on, in id order, to `apply`, with its [`template_keys`]
/// from id `keys_from` on (`None` before). A thread reads and decodes the store a chunk ahead and
/// the keys of each chunk are computed on all cores, while `apply` runs on this thread: a start
/// spends its time in the store, the keys and the detector about equally.
fn replay_store(
    store: &Store,
    allow_list: &AllowList,
    from: u64,
    keys_from: u64,
    mut apply: impl FnMut(PromptRecord, Option<(Source, Vec<u64>)>),
) -> Result<(), Error> {
    std::thread::scope(|scope| {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<PromptRecord>>(2);
        let reader = scope.spawn(move || {
            let mut chunk = Vec::with_capacity(REPLAY_CHUNK);
            let n = store.for_each_from(from, |r| {
                chunk.push(r);
                if chunk.len() == REPLAY_CHUNK {
                    let full = std::mem::replace(&mut chunk, Vec::with_capacity(REPLAY_CHUNK));
                    // Only a panic on the applying side closes the channel. This side then reads
                    // on without handing records over, and the scope re-raises the panic.
                    let _ = tx.send(full);
                }
                Ok(())
            });
            if !chunk.is_empty() {
                let _ = tx.send(chunk);
            }
            n
        });
        for chunk in rx {
            let keys: Vec<Option<(Source, Vec<u64>)>> = chunk
                .par_iter()
                .map(|r| {
                    (r.id >= keys_from)
                        .then(|| template_keys(allow_list, &r.account_id, &r.text))
                        .flatten()
                })
                .collect();
            for (r, k) in chunk.into_iter().zip(keys) {
                apply(r, k);
            }
        }
        match reader.join() {
            Ok(read) => {
                read?;
                Ok(())
            }
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// Inserts the parts of `pending` on all cores, and empties it.
fn flush_parts(
    index: &mut SegmentedHnsw,
    pending: &mut PendingParts,
) -> Result<(), crate::index::IndexError> {
    let items = part_items(pending.iter().map(|(id, ts, p)| (*id, *ts, &p[..])));
    let inserted = index.insert_bulk(&items);
    pending.clear();
    inserted
}

/// Inserts an ingest batch's entries into `index`: from 32 on all cores, fewer (a gateway's few
/// requests) in order on this thread.
fn insert_batch(
    index: &mut SegmentedHnsw,
    items: &[(u64, i64, &[f32])],
) -> Result<(), crate::index::IndexError> {
    if items.len() >= 32 {
        index.insert_bulk(items)
    } else {
        items
            .iter()
            .try_for_each(|(id, ts, v)| index.insert(*id, *ts, v))
    }
}

/// After a batch is committed and inserted: seals `index`'s active segment when due (then drops
/// what retention no longer keeps, as of `now`), and installs or starts a background merge.
/// Returns whether it sealed.
fn seal_and_merge(
    index: &mut SegmentedHnsw,
    now: i64,
    name: &str,
) -> Result<bool, crate::index::IndexError> {
    let started = Instant::now();
    let sealed = index.seal_if_due()?;
    if sealed {
        let dropped = index.drop_expired(now);
        let seconds = started.elapsed().as_secs_f64();
        tracing::info!(index = name, dropped, seconds, "sealed a segment");
    }
    if index.merge_step() {
        let segments = index.segments().len();
        tracing::info!(index = name, segments, "merged two segments");
    }
    Ok(sealed)
}

/// The first prompt id that must be re-inserted on open, and whether a given one must: past what
/// the dumps on disk cover, or in a range whose dump failed to load.
fn not_on_disk(covered: u64, missing: Vec<(u64, u64)>) -> (u64, impl Fn(u64) -> bool) {
    let first = missing.iter().map(|&(a, _)| a).fold(covered + 1, u64::min);
    (first, move |id| {
        id > covered || missing.iter().any(|&(a, b)| (a..=b).contains(&id))
    })
}

/// Earlier prompts that share at least `part_matches` of this prompt's `parts` (each part matched
/// by cosine ≥ `part_similarity`): indexed prompts, and the batch's earlier prompts as counted by
/// [`in_batch`] (`within`: id and parts shared). Most matched parts first, at most
/// `neighbours_k`. One shared sentence proves little ("Thanks in advance!"); two — an
/// instruction and its closing, say — are a reworded template's footprint.
fn part_links(
    index: &SegmentedHnsw,
    parts: &[Vec<f32>],
    within: &[(u64, u32)],
    cfg: &crate::detect::DetectorConfig,
) -> Vec<u64> {
    if cfg.part_matches == 0 {
        return Vec::new();
    }
    let mut matched: std::collections::HashMap<u64, u32> = std::collections::HashMap::new();
    for part in parts {
        let mut hits: Vec<u64> = index
            .search(part, cfg.neighbours_k)
            .into_iter()
            .filter(|n| n.similarity >= cfg.part_similarity)
            .map(|n| n.id / PART_SLOTS)
            .collect();
        hits.sort_unstable();
        hits.dedup();
        for h in hits {
            *matched.entry(h).or_default() += 1;
        }
    }
    // Indexed prompts have ids below the batch's, so the counts never mix.
    let out = most_shared(matched, within.iter().copied(), cfg);
    out.into_iter().map(|(id, _)| id).collect()
}

/// The prompts of `counted` (id, parts shared) and `more` (already filtered) sharing at least
/// `part_matches` parts: most shared first (ties: the later prompt), at most `neighbours_k`.
fn most_shared(
    counted: std::collections::HashMap<u64, u32>,
    more: impl Iterator<Item = (u64, u32)>,
    cfg: &crate::detect::DetectorConfig,
) -> Vec<(u64, u32)> {
    let mut out: Vec<(u64, u32)> = counted
        .into_iter()
        .filter(|&(_, n)| n >= cfg.part_matches)
        .chain(more)
        .collect();
    out.sort_by(|a, b| b.1.cmp(&a.1).then(b.0.cmp(&a.0)));
    out.truncate(cfg.neighbours_k);
    out
}

/// What each prompt of a batch links to among the batch's earlier prompts, which the indexes do
/// not hold yet; exact, from matrix products of the batch's vectors ([`pairs`]).
struct InBatch {
    /// Per prompt: earlier prompts with similarity ≥ the threshold; the `neighbours_k` first by
    /// [`by_similarity`].
    near: Vec<Vec<Neighbour>>,
    /// Per prompt: earlier prompts (id, parts shared) sharing at least `part_matches` of its
    /// parts, as [`most_shared`] orders and cuts them. Empty when part matching is off.
    parts: Vec<Vec<(u64, u32)>>,
}

/// Compares every prompt of `batch` (ids from `first_id`, vectors of dimension `dim`) and its
/// parts with the batch's earlier prompts; see [`InBatch`]. Blocks of rows run on the rayon pool
/// when `parallel`.
fn in_batch(
    batch: &[NewPrompt],
    first_id: u64,
    dim: usize,
    cfg: &crate::detect::DetectorConfig,
    parallel: bool,
) -> InBatch {
    let id = |j: usize| first_id + j as u64;
    let rows = pairs::Rows::new(dim, batch.iter().map(|p| p.embedding.as_slice()));
    let blocks = pairs::even_blocks(batch.len(), pairs::BLOCK_ROWS);
    let near = rows.earlier_similarities(&blocks, parallel, |_, block| {
        (block.rows.clone())
            .map(|r| {
                let row = &block.row(r)[..r];
                let mut near: Vec<Neighbour> = (0..r)
                    .filter(|&c| row[c] >= cfg.similarity_threshold)
                    .map(|c| Neighbour {
                        id: id(c),
                        similarity: row[c],
                    })
                    .collect();
                near.sort_by(by_similarity);
                near.truncate(cfg.neighbours_k);
                near
            })
            .collect()
    });
    if cfg.part_matches == 0 {
        return InBatch {
            near,
            parts: vec![Vec::new(); batch.len()],
        };
    }
    // Part rows grouped by prompt: prompt g's parts are rows starts[g]..starts[g + 1].
    let mut starts = Vec::with_capacity(batch.len() + 1);
    starts.push(0);
    for p in batch {
        starts.push(starts[starts.len() - 1] + p.parts.len());
    }
    let owner: Vec<usize> = (0..batch.len())
        .flat_map(|g| std::iter::repeat_n(g, batch[g].parts.len()))
        .collect();
    let part_rows = pairs::Rows::new(
        dim,
        batch.iter().flat_map(|p| p.parts.iter().map(Vec::as_slice)),
    );
    let blocks = pairs::group_blocks(&starts, pairs::BLOCK_ROWS);
    let row_blocks: Vec<_> = blocks.iter().map(|(rows, _)| rows.clone()).collect();
    let parts = part_rows.earlier_similarities(&row_blocks, parallel, |b, block| {
        (blocks[b].1.clone())
            .map(|g| {
                let mut shared = std::collections::HashMap::new();
                for r in starts[g]..starts[g + 1] {
                    // Earlier prompts' parts only; owners ascend, so dedup leaves each once.
                    let row = &block.row(r)[..starts[g]];
                    let mut hits: Vec<usize> = (0..starts[g])
                        .filter(|&c| row[c] >= cfg.part_similarity)
                        .map(|c| owner[c])
                        .collect();
                    hits.dedup();
                    for h in hits {
                        *shared.entry(id(h)).or_default() += 1;
                    }
                }
                most_shared(shared, std::iter::empty(), cfg)
            })
            .collect()
    });
    InBatch { near, parts }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::index::testdata::unit_vectors;

    /// A "model" that embeds every text as the same unit vector.
    struct Constant(Vec<f32>);

    struct NoTokens;

    impl crate::embed::Tokenize for NoTokens {
        fn ids(&self, _text: &str) -> Result<Vec<u32>, EmbedError> {
            Ok(vec![0])
        }
    }

    impl Embedder for Constant {
        fn embed_ids(&mut self, ids: &[&[u32]]) -> Result<crate::embed::Embeddings, EmbedError> {
            Ok(ids.iter().map(|_| self.0.clone()).collect())
        }
        fn tokenizer(&self) -> std::sync::Arc<dyn crate::embed::Tokenize> {
            std::sync::Arc::new(NoTokens)
        }
        fn dim(&self) -> usize {
            self.0.len()
        }
        fn device_name(&self) -> String {
            "test".into()
        }
    }

    #[test]
    fn a_data_dir_keeps_to_the_model_that_wrote_it() {
        let dir = tempfile::tempdir().unwrap();
        let open = || Engine::open(config(dir.path(), 100, None), 2).unwrap();
        let engine = open();
        engine
            .check_model(&mut Constant(vec![1.0, 0.0]), "model-a")
            .unwrap();
        drop(engine);
        let engine = open();
        // The same model, a little off (another device, half precision): taken.
        let near = Constant(vec![0.9999, 0.0141]);
        engine
            .check_model(&mut { near }, "model-a on cuda")
            .unwrap();
        let e = engine
            .check_model(&mut Constant(vec![0.6, 0.8]), "model-b")
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::FailedPrecondition);
        let e = e.to_string();
        assert!(
            e.contains(&dir.path().display().to_string()) && e.contains("(model-a: "),
            "{e}"
        );
        // Another dimension is another model too.
        assert!(
            engine
                .check_model(&mut Constant(vec![1.0, 0.0, 0.0]), "model-c")
                .is_err()
        );
    }

    const DIM: usize = 32;

    /// Small segments (`max_points` vectors), no merges, optional retention.
    fn config(dir: &Path, max_points: usize, retention_ms: Option<i64>) -> EngineConfig {
        EngineConfig {
            data_dir: dir.to_path_buf(),
            detector: crate::detect::DetectorConfig::default(),
            segments: SegmentsConfig {
                params: HnswParams {
                    max_elements: 1_000,
                    ..HnswParams::default()
                },
                max_points_per_segment: max_points,
                retention_ms,
                merge_max_points: 0,
                ..SegmentsConfig::default()
            },
        }
    }

    /// A prompt whose own vector and text share nothing with any other (`n` picks them), with
    /// two given part vectors.
    fn prompt(n: usize, ts: i64, parts: &[Vec<f32>]) -> NewPrompt {
        let word = |k: usize| {
            format!(
                "q{}{}",
                (b'a' + (k % 26) as u8) as char,
                (b'a' + (k / 26 % 26) as u8) as char
            )
        };
        NewPrompt {
            account_id: format!("acct-{n}"),
            timestamp_ms: ts,
            text: format!("{} {}", word(2 * n), word(2 * n + 1)),
            embedding: unit_vectors(1_000 + n as u64, 1, DIM).remove(0),
            parts: parts.to_vec(),
            readable: true,
        }
    }

    /// Two part vectors no other pair shares.
    fn pair(seed: u64) -> Vec<Vec<f32>> {
        unit_vectors(seed, 2, DIM)
    }

    fn links(engine: &Engine, id: u64) -> Vec<u64> {
        engine.record(id).unwrap().links
    }

    /// A unit vector near `centre` (cosine about 1 − `noise`²/2 in expectation).
    fn near(centre: &[f32], noise: f32, rng: &mut crate::index::testdata::Rng) -> Vec<f32> {
        let mut v: Vec<f32> = centre.iter().map(|x| x + noise * rng.normal()).collect();
        let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.iter_mut().for_each(|x| *x /= norm);
        v
    }

    #[test]
    fn in_batch_links_match_comparing_each_prompt_with_every_earlier_one() {
        // 300 prompts (five blocks of rows) drawn around 12 centres, with 0–4 parts drawn around
        // 20 part centres, at noise levels on both sides of the thresholds (0.85 and 0.8 on
        // vectors of 32 dimensions), so that many pairs are linked, many are not, and more
        // than k = 16 earlier prompts qualify for some.
        let mut rng = crate::index::testdata::Rng::new(11);
        let centres = unit_vectors(5, 12, DIM);
        let part_centres = unit_vectors(6, 20, DIM);
        let batch: Vec<NewPrompt> = (0..300)
            .map(|n| {
                let noise = [0.05, 0.08, 0.12][n % 3];
                let parts = (0..(n * 7) % 5)
                    .map(|j| near(&part_centres[(n / 3 + j * 5) % 20], noise, &mut rng))
                    .collect::<Vec<_>>();
                NewPrompt {
                    embedding: near(&centres[n % 12], noise, &mut rng),
                    ..prompt(n, 0, &parts)
                }
            })
            .collect();
        let cfg = crate::detect::DetectorConfig::default();
        let (k, first_id) = (cfg.neighbours_k, 1_000);
        let id = |j: usize| first_id + j as u64;
        let mut linked = (0, 0, false);
        for parallel in [false, true] {
            let within = in_batch(&batch, first_id, DIM, &cfg, parallel);
            for (i, p) in batch.iter().enumerate() {
                // The reference: each earlier prompt compared one dot product at a time.
                let mut want: Vec<(usize, f32)> = (0..i)
                    .map(|j| (j, dot(&p.embedding, &batch[j].embedding)))
                    .filter(|&(_, s)| s >= cfg.similarity_threshold)
                    .collect();
                want.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
                linked.2 |= want.len() > k;
                want.truncate(k);
                let got = &within.near[i];
                assert_eq!(
                    got.iter().map(|n| n.id).collect::<Vec<_>>(),
                    want.iter().map(|n| id(n.0)).collect::<Vec<_>>(),
                    "prompt {i}: similar earlier prompts"
                );
                for (g, w) in got.iter().zip(&want) {
                    assert!((g.similarity - w.1).abs() < 1e-5, "prompt {i}: similarity");
                }
                let mut shared: Vec<(u64, u32)> = (0..i)
                    .map(|j| {
                        let n = p.parts.iter().filter(|a| {
                            batch[j]
                                .parts
                                .iter()
                                .any(|b| dot(a, b) >= cfg.part_similarity)
                        });
                        (id(j), n.count() as u32)
                    })
                    .filter(|&(_, n)| n >= cfg.part_matches)
                    .collect();
                shared.sort_by(|a, b| b.1.cmp(&a.1).then(b.0.cmp(&a.0)));
                shared.truncate(k);
                assert_eq!(
                    within.parts[i], shared,
                    "prompt {i}: earlier prompts sharing parts"
                );
                linked.0 += want.len();
                linked.1 += shared.len();
            }
        }
        assert!(
            linked.0 > 1_000 && linked.1 > 200 && linked.2,
            "links found: {linked:?}"
        );
        let off = crate::detect::DetectorConfig {
            part_matches: 0,
            ..cfg
        };
        assert!(
            in_batch(&batch, first_id, DIM, &off, true)
                .parts
                .iter()
                .all(Vec::is_empty)
        );
    }

    #[test]
    fn the_part_index_is_sealed_checkpointed_and_reloaded_in_segments() {
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::open(config(dir.path(), 8, None), DIM).unwrap();
        // 3 batches: 10 + 10 part vectors seal two part segments, 4 stay in the active one.
        for (batch, n) in [(0, 5), (1, 5), (2, 2)] {
            let prompts = (0..n)
                .map(|i| {
                    prompt(
                        10 * batch + i,
                        1_000 * batch as i64,
                        &pair(10 * batch as u64 + i as u64),
                    )
                })
                .collect();
            engine.ingest(prompts).unwrap();
        }
        let sizes: Vec<usize> = engine
            .parts
            .read()
            .segments()
            .iter()
            .map(|s| s.count)
            .collect();
        assert_eq!(sizes, [10, 10, 4]);
        let saved = engine.checkpoint().unwrap();
        assert_eq!((saved.active_vectors, saved.part_vectors), (2, 4));
        drop(engine);

        // Earlier versions kept the part index in one file per checkpoint: removed on open.
        let legacy = dir
            .path()
            .join(INDEX_DIR)
            .join("parts-000000000012.hnsw.data");
        std::fs::write(&legacy, b"old").unwrap();
        let parts_dir = dir.path().join(INDEX_DIR).join(PARTS_DIR);
        assert!(parts_dir.join("manifest.json").exists());
        // The active part segment's checkpoint, under its checkpoint's name.
        assert!(parts_dir.join("seg-000003.c1.hnsw.data").exists());
        let engine = Engine::open(config(dir.path(), 8, None), DIM).unwrap();
        let opened = engine.open_stats();
        assert_eq!((opened.parts_reloaded, opened.parts_rebuilt), (24, 0));
        assert!(!legacy.exists());
        // A reworded prompt sharing both parts of the first batch's second prompt (id 2) is
        // linked to it through the reloaded part index, and to nothing else.
        let verdicts = engine.ingest(vec![prompt(99, 5_000, &pair(1))]).unwrap();
        assert_eq!(links(&engine, verdicts[0].prompt_id), [2]);
    }

    #[test]
    fn a_crash_re_inserts_only_the_parts_stored_since_the_last_seal() {
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::open(config(dir.path(), 8, None), DIM).unwrap();
        engine
            .ingest((0..5).map(|i| prompt(i, 0, &pair(i as u64))).collect())
            .unwrap();
        engine
            .ingest(vec![prompt(5, 1, &pair(5)), prompt(6, 1, &[])])
            .unwrap();
        drop(engine); // no checkpoint: as after a crash
        let engine = Engine::open(config(dir.path(), 8, None), DIM).unwrap();
        let opened = engine.open_stats();
        assert_eq!((opened.parts_reloaded, opened.parts_rebuilt), (10, 2));
        assert_eq!(engine.parts.read().len(), 12);
    }

    /// Prompt `i` of a stream: one template (fixed words, a changing slot) from 40 accounts
    /// (`camp-*`), between organic one-offs (`organic-*`). No two vectors are alike, so only the
    /// template keys, which a start recomputes from the texts, link the template's prompts.
    fn stream_prompt(i: usize, account: Option<String>) -> NewPrompt {
        let word = |k: usize| -> String {
            [k % 26, k / 26 % 26, k / 676 % 26]
                .iter()
                .map(|&c| (b'a' + c as u8) as char)
                .collect()
        };
        let text = if i.is_multiple_of(3) {
            format!("{} {}", word(i), word(i + 1))
        } else {
            format!(
                "Answer step by step and explain every part of your reasoning: {} {} {}",
                word(i),
                word(i + 7),
                word(i + 13)
            )
        };
        let account = account.unwrap_or_else(|| match i % 3 {
            0 => format!("organic-{i}"),
            _ => format!("camp-{}", i % 40),
        });
        NewPrompt {
            account_id: account,
            timestamp_ms: i as i64,
            text,
            embedding: unit_vectors(5_000_000 + i as u64, 1, DIM).remove(0),
            parts: Vec::new(),
            readable: true,
        }
    }

    /// Ingests prompts `range` of [`stream_prompt`]'s stream in batches of 500.
    fn ingest_stream(engine: &Engine, range: std::ops::Range<usize>) {
        let ids: Vec<usize> = range.collect();
        for batch in ids.chunks(500) {
            let batch = batch.iter().map(|&i| stream_prompt(i, None)).collect();
            engine.ingest(batch).unwrap();
        }
    }

    fn campaign_summaries(engine: &Engine) -> Vec<CampaignSummary> {
        (engine.campaigns(10, 0.0).unwrap().0)
            .into_iter()
            .map(|c| c.summary)
            .collect()
    }

    #[test]
    fn a_start_replays_every_chunk_of_the_store_into_the_same_state() {
        let dir = tempfile::tempdir().unwrap();
        let open = || open_one_segment(dir.path());
        let engine = open();
        // More prompts than two replay chunks.
        let total = 2 * REPLAY_CHUNK + 100;
        ingest_stream(&engine, 0..total);
        let accounts = engine.accounts(false, usize::MAX);
        let campaigns = campaign_summaries(&engine);
        assert_eq!(campaigns.len(), 1, "{campaigns:?}");
        assert_eq!(campaigns[0].accounts, 40);
        drop(engine); // no checkpoint: the whole store is replayed

        let engine = open();
        let stats = engine.open_stats();
        assert_eq!((stats.prompts, stats.restored), (total as u64, 0));
        assert_eq!(engine.accounts(false, usize::MAX), accounts);
        assert_eq!(campaign_summaries(&engine), campaigns);
        // The keys came back with the texts: a new account's prompt of the template joins it.
        let v = engine.ingest(vec![stream_prompt(total, Some("camp-new".into()))]);
        let v = &v.unwrap()[0];
        assert!(v.neighbours > 0, "{v:?}");
        assert_eq!(v.campaign_id, Some(campaigns[0].id));
    }

    #[test]
    fn a_run_without_verdicts_stores_and_clusters_as_one_with() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (scored, unscored) = (open_one_segment(a.path()), open_one_segment(b.path()));
        let ids: Vec<usize> = (0..1500).collect();
        for batch in ids.chunks(500) {
            let batch = || batch.iter().map(|&i| stream_prompt(i, None)).collect();
            assert_eq!(scored.ingest(batch()).unwrap().len(), 500);
            unscored.ingest_unscored(batch()).unwrap();
        }
        let campaigns = campaign_summaries(&scored);
        assert_eq!(campaigns.len(), 1, "{campaigns:?}");
        assert_eq!(campaign_summaries(&unscored), campaigns);
        assert_eq!(
            unscored.accounts(false, usize::MAX),
            scored.accounts(false, usize::MAX)
        );
        for id in 1..=1500 {
            let (x, y) = (scored.record(id).unwrap(), unscored.record(id).unwrap());
            assert_eq!(
                (x.links, x.cluster_id),
                (y.links, y.cluster_id),
                "prompt {id}"
            );
        }
        // And the next verdict is the same.
        let next = || vec![stream_prompt(1500, Some("camp-new".into()))];
        assert_eq!(
            unscored.ingest(next()).unwrap(),
            scored.ingest(next()).unwrap()
        );
    }

    /// Copies a data directory (a store and its index dumps) file by file.
    fn copy_dir(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            let target = to.join(entry.file_name());
            if entry.file_type().unwrap().is_dir() {
                copy_dir(&entry.path(), &target);
            } else {
                std::fs::copy(entry.path(), target).unwrap();
            }
        }
    }

    /// A copy of data directory `dir` without its detector snapshot: a start there replays the
    /// whole store, the state a restored start must match.
    fn without_snapshot(dir: &Path) -> tempfile::TempDir {
        let full = tempfile::tempdir().unwrap();
        copy_dir(dir, full.path());
        std::fs::remove_file(full.path().join(SNAPSHOT_FILE)).unwrap();
        full
    }

    /// An engine on `dir` whose index fits one segment, without retention.
    fn open_one_segment(dir: &Path) -> Engine {
        Engine::open(config(dir, 100_000, None), DIM).unwrap()
    }

    #[test]
    fn unreadable_prompts_are_linked_by_their_words_only() {
        let dir = tempfile::tempdir().unwrap();
        let engine = open_one_segment(dir.path());
        // Texts the model cannot read embed alike, whatever they say: one vector for all.
        let v = unit_vectors(77, 1, DIM).remove(0);
        let p = |n: usize, text: &str, readable: bool| NewPrompt {
            account_id: format!("acct-{n}"),
            timestamp_ms: 1_750_000_000_000,
            text: text.into(),
            embedding: v.clone(),
            parts: Vec::new(),
            readable,
        };
        let got = engine
            .ingest(vec![
                p(1, "如何投资股票？", false),
                p(2, "怎么做蛋糕？", false),
            ])
            .unwrap();
        assert_eq!(got[1].neighbours, 0, "not by their vectors, in a batch");
        let got = engine.ingest(vec![p(3, "如何做红烧肉？", false)]).unwrap();
        assert_eq!(got[0].neighbours, 0, "nor through the index");
        // A template's fixed words still link them (each character a word: see `keys`).
        let head = "请你作为一名经验丰富的数学老师，一步一步地解答下面的题目：";
        let got = engine
            .ingest(vec![p(4, &format!("{head}求方程2x+7=19的解。"), false)])
            .unwrap();
        assert_eq!(got[0].neighbours, 0);
        let got = engine
            .ingest(vec![p(
                5,
                &format!("{head}掷两枚骰子，点数之和为7的概率是多少？"),
                false,
            )])
            .unwrap();
        assert_eq!(got[0].neighbours, 0, "a key of two texts links no one yet");
        let got = engine
            .ingest(vec![p(
                6,
                &format!("{head}一个圆的半径是3米，它的周长是多少？"),
                false,
            )])
            .unwrap();
        assert_eq!(
            got[0].neighbours, 2,
            "the head key, now of three texts, links all three"
        );
        assert_eq!(got[0].cluster_accounts, 3);
        // The control: readable prompts with that vector link to every one before.
        let got = engine.ingest(vec![p(7, "What is up?", true)]).unwrap();
        let k = crate::detect::DetectorConfig::default().neighbours_k as u32;
        assert_eq!(got[0].neighbours, 6.min(k));
    }

    #[test]
    fn a_start_restores_the_checkpointed_detector_and_replays_only_what_came_after() {
        let dir = tempfile::tempdir().unwrap();
        let engine = open_one_segment(dir.path());
        ingest_stream(&engine, 0..1_200);
        let saved = engine.checkpoint().unwrap();
        assert_eq!(saved.detector_prompts, 1_200);
        assert!(dir.path().join(SNAPSHOT_FILE).exists());
        ingest_stream(&engine, 1_200..1_800);
        drop(engine); // a crash: the last 600 prompts are only in the store

        let full = without_snapshot(dir.path());

        let restored = open_one_segment(dir.path());
        let replayed = open_one_segment(full.path());
        let (r, f) = (restored.open_stats(), replayed.open_stats());
        assert_eq!((r.prompts, r.restored, r.replayed), (1_800, 1_200, 600));
        assert_eq!((f.prompts, f.restored, f.replayed), (1_800, 0, 1_800));
        assert_eq!(
            restored.accounts(false, usize::MAX),
            replayed.accounts(false, usize::MAX)
        );
        let campaigns = campaign_summaries(&restored);
        assert_eq!(campaigns.len(), 1, "{campaigns:?}");
        assert_eq!(campaigns[0].accounts, 40);
        assert_eq!(campaigns, campaign_summaries(&replayed));
        // Both go on alike: the template keys, cluster ids and scores were restored too.
        let next = |i: usize| {
            (i..i + 30)
                .map(|i| stream_prompt(i, Some(format!("late-{}", i % 4))))
                .collect::<Vec<_>>()
        };
        let (a, b) = (restored.ingest(next(1_800)), replayed.ingest(next(1_800)));
        let (a, b) = (a.unwrap(), b.unwrap());
        assert_eq!(a, b);
        assert!(a.iter().any(|v| v.campaign_id == Some(campaigns[0].id)));

        // A clean stop writes a snapshot holding everything: the next start replays nothing.
        restored.checkpoint().unwrap();
        drop(restored);
        let again = open_one_segment(dir.path());
        let s = again.open_stats();
        assert_eq!((s.prompts, s.restored, s.replayed), (1_830, 1_830, 0));
        // A checkpoint with nothing new leaves that snapshot as it is (not rewritten).
        let file = |d: &Path| {
            use std::os::unix::fs::MetadataExt;
            std::fs::metadata(d.join(SNAPSHOT_FILE)).unwrap().ino()
        };
        let before = file(dir.path());
        assert_eq!(again.checkpoint().unwrap().detector_prompts, 1_830);
        assert_eq!(file(dir.path()), before, "rewritten with nothing new");
        assert_eq!(
            again.accounts(false, usize::MAX),
            replayed.accounts(false, usize::MAX)
        );
        // Nothing replayed: the links of what follows come from the restored template keys.
        let (a, b) = (again.ingest(next(1_830)), replayed.ingest(next(1_830)));
        let (a, b) = (a.unwrap(), b.unwrap());
        assert_eq!(a, b);
        // (Prompt `i` of the stream is stored as id `i + 1`; every third is organic.)
        assert!(
            a.iter()
                .all(|v| v.neighbours > 0 || (v.prompt_id - 1) % 3 == 0)
        );

        // An allow-list changed after the snapshot (and no checkpoint since) voids it: its
        // template keys were recorded under the old list.
        again
            .allow_template("Answer step by step <*>", "test", 0)
            .unwrap();
        drop(again);
        let s = open_one_segment(dir.path()).open_stats();
        assert_eq!((s.prompts, s.restored, s.replayed), (1_860, 0, 1_860));
        // A checkpoint after an allow-list change writes it again, though nothing was ingested.
        let engine = open_one_segment(dir.path());
        engine.checkpoint().unwrap();
        drop(engine);
        let engine = open_one_segment(dir.path());
        assert_eq!(engine.open_stats().restored, 1_860);
        engine
            .allow_template("Summarise this text for a child <*>", "test", 0)
            .unwrap();
        engine.checkpoint().unwrap();
        drop(engine);
        let s = open_one_segment(dir.path()).open_stats();
        assert_eq!((s.prompts, s.restored, s.replayed), (1_860, 1_860, 0));
    }

    #[test]
    fn allow_list_ids_are_never_given_twice() {
        let dir = tempfile::tempdir().unwrap();
        let open = |d: &Path| Engine::open(config(d, 100, None), DIM).unwrap();
        let engine = open(dir.path());
        let add = |e: &Engine, t: &str| e.allow_template(t, "test", 0).unwrap().entry.id;
        assert_eq!(add(&engine, "Answer step by step <*>"), 1);
        assert_eq!(add(&engine, "Summarise this text for a child <*>"), 2);
        engine.remove_allowed(2).unwrap();
        assert_eq!(add(&engine, "Translate the following into French <*>"), 3);
        engine.remove_allowed(3).unwrap();
        drop(engine);
        // Nor after a restart.
        let engine = open(dir.path());
        assert_eq!(add(&engine, "Write a haiku about the sea <*>"), 4);
        let ids: Vec<u64> = engine.allowed_templates().iter().map(|e| e.id).collect();
        assert_eq!(ids, [1, 4]);
    }

    #[test]
    fn a_sealed_segment_brings_a_snapshot_so_a_crash_replays_only_the_rest() {
        // Snapshots at seals are due while the prompts since the last are a quarter of all.
        assert!(snapshot_due(100, 0) && snapshot_due(400, 300) && snapshot_due(800, 600));
        assert!(!snapshot_due(1_000, 800) && snapshot_due(1_200, 800));

        let dir = tempfile::tempdir().unwrap();
        let open = |d: &Path| Engine::open(config(d, 100, None), DIM).unwrap();
        let engine = open(dir.path());
        // Batches of 50 into segments of 100: seals after prompts 100, 200, 300, 400, 500; the
        // snapshot is due at 100, 200, 300 and 400, not at 500 (100 since 400 < 500 / 4).
        let ids: Vec<usize> = (0..530).collect();
        for batch in ids.chunks(50) {
            let batch = batch.iter().map(|&i| stream_prompt(i, None)).collect();
            engine.ingest(batch).unwrap();
        }
        drop(engine); // a crash: no checkpoint

        let full = without_snapshot(dir.path());
        let (restored, replayed) = (open(dir.path()), open(full.path()));
        let s = restored.open_stats();
        assert_eq!((s.prompts, s.restored, s.replayed), (530, 400, 130));
        // The sealed segments are on disk: only the active segment's 30 are re-indexed.
        assert_eq!((s.reloaded, s.rebuilt), (500, 30));
        assert_eq!(
            restored.accounts(false, usize::MAX),
            replayed.accounts(false, usize::MAX)
        );
        assert_eq!(campaign_summaries(&restored), campaign_summaries(&replayed));
    }

    #[test]
    fn a_snapshot_that_cannot_be_written_is_reported_and_the_checkpoint_stands() {
        let dir = tempfile::tempdir().unwrap();
        let engine = open_one_segment(dir.path());
        ingest_stream(&engine, 0..60);
        // Something that is not a file where the snapshot goes.
        std::fs::create_dir(dir.path().join(SNAPSHOT_FILE)).unwrap();
        let saved = engine.checkpoint().unwrap();
        assert_eq!((saved.active_vectors, saved.detector_prompts), (60, 0));
        let why = saved.detector_error.unwrap();
        assert!(why.contains(SNAPSHOT_FILE), "{why}");
        assert!(
            !dir.path().join("detector.tmp").exists(),
            "no half-written file is left"
        );
        drop(engine);
        // The next start reloads the index and replays the detector.
        let s = open_one_segment(dir.path()).open_stats();
        assert_eq!(
            (s.reloaded, s.rebuilt, s.restored, s.replayed),
            (60, 0, 0, 60)
        );
    }

    #[test]
    fn a_snapshot_is_judged_for_its_store_before_its_allow_list() {
        let h = SnapshotHeader {
            last_id: 9,
            last_text_hash: 77,
            prompts: 9,
            allow: 5,
        };
        assert_eq!(judge_snapshot(&h, Ok(Some(77)), 5), Ok(()));
        let another = "it was written for another store (prompt 9 differs here)";
        assert_eq!(judge_snapshot(&h, Ok(Some(78)), 5).unwrap_err(), another);
        assert_eq!(
            judge_snapshot(&h, Ok(Some(78)), 6).unwrap_err(),
            another,
            "another store and another allow-list: the store is what is said"
        );
        assert!(
            judge_snapshot(&h, Ok(None), 6)
                .unwrap_err()
                .contains("which this store lacks")
        );
        assert_eq!(
            judge_snapshot(&h, Ok(Some(77)), 6).unwrap_err(),
            "the allow-list changed after it was written"
        );
        assert_eq!(
            judge_snapshot(&h, Err("disk".into()), 5).unwrap_err(),
            "disk"
        );
    }

    #[test]
    fn a_snapshot_of_another_store_is_not_used() {
        let dir = tempfile::tempdir().unwrap();
        let other = tempfile::tempdir().unwrap();
        let engine = open_one_segment(dir.path());
        ingest_stream(&engine, 0..90);
        engine.checkpoint().unwrap();
        drop(engine);
        // Another directory with as many prompts, but other ones, and this one's snapshot.
        let engine = open_one_segment(other.path());
        ingest_stream(&engine, 100..190);
        drop(engine);
        std::fs::copy(
            dir.path().join(SNAPSHOT_FILE),
            other.path().join(SNAPSHOT_FILE),
        )
        .unwrap();
        let engine = open_one_segment(other.path());
        let s = engine.open_stats();
        assert_eq!((s.prompts, s.restored, s.replayed), (90, 0, 90));
        assert!(
            engine.account("organic-102").is_ok() && engine.account("organic-0").is_err(),
            "the state is this store's"
        );
    }

    #[test]
    fn an_index_that_is_not_the_stores_is_rebuilt_from_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("prompts.redb");
        let backup = dir.path().join("backup.redb");
        // Segments of 8 vectors: 2 sealed and a checkpointed active one for 20 prompts.
        let engine = Engine::open(config(dir.path(), 8, None), DIM).unwrap();
        engine
            .ingest((0..10).map(|i| prompt(i, 1_000, &pair(i as u64))).collect())
            .unwrap();
        drop(engine);
        std::fs::copy(&store, &backup).unwrap();
        let engine = Engine::open(config(dir.path(), 8, None), DIM).unwrap();
        engine
            .ingest(
                (10..20)
                    .map(|i| prompt(i, 2_000, &pair(i as u64)))
                    .collect(),
            )
            .unwrap();
        engine.checkpoint().unwrap();
        drop(engine);

        // The store restored from its backup (10 prompts) beside the index of 20.
        std::fs::copy(&backup, &store).unwrap();
        let engine = Engine::open(config(dir.path(), 8, None), DIM).unwrap();
        let opened = engine.open_stats();
        assert_eq!(
            (opened.prompts, opened.reloaded, opened.rebuilt),
            (10, 0, 10)
        );
        assert_eq!(engine.index.read().len(), 10);
        // Prompt 15 of the lost history is not linked to: the new prompt 11 repeats it.
        let verdicts = engine.ingest(vec![prompt(15, 3_000, &pair(15))]).unwrap();
        assert_eq!(verdicts[0].prompt_id, 11);
        assert!(links(&engine, 11).is_empty(), "{:?}", links(&engine, 11));
        engine.checkpoint().unwrap();
        drop(engine);
        // Rebuilt, it is the store's again: the next start reloads it.
        let engine = Engine::open(config(dir.path(), 8, None), DIM).unwrap();
        let opened = engine.open_stats();
        assert_eq!((opened.reloaded, opened.rebuilt), (11, 0));
        drop(engine);

        // Another store of as many prompts, sent at other times, beside this index.
        let other = tempfile::tempdir().unwrap();
        let engine = Engine::open(config(other.path(), 8, None), DIM).unwrap();
        engine
            .ingest(
                (30..41)
                    .map(|i| prompt(i, 9_000, &pair(i as u64)))
                    .collect(),
            )
            .unwrap();
        drop(engine);
        std::fs::copy(other.path().join("prompts.redb"), &store).unwrap();
        let engine = Engine::open(config(dir.path(), 8, None), DIM).unwrap();
        let opened = engine.open_stats();
        assert_eq!(
            (opened.prompts, opened.reloaded, opened.rebuilt),
            (11, 0, 11)
        );
        engine.checkpoint().unwrap();
        drop(engine);

        // And one sent at the same times, but other prompts: told by their vectors.
        let same_times = tempfile::tempdir().unwrap();
        let engine = Engine::open(config(same_times.path(), 8, None), DIM).unwrap();
        let batch = |range: std::ops::Range<usize>, t| {
            range
                .map(move |i| prompt(i, t, &pair(i as u64)))
                .collect::<Vec<_>>()
        };
        engine.ingest(batch(50..60, 9_000)).unwrap();
        engine.ingest(batch(60..61, 9_000)).unwrap();
        drop(engine);
        std::fs::copy(same_times.path().join("prompts.redb"), &store).unwrap();
        let engine = Engine::open(config(dir.path(), 8, None), DIM).unwrap();
        let opened = engine.open_stats();
        assert_eq!(
            (opened.prompts, opened.reloaded, opened.rebuilt),
            (11, 0, 11)
        );
    }

    #[test]
    fn a_damaged_store_file_is_an_error_that_names_it() {
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::open(config(dir.path(), 1_000, None), DIM).unwrap();
        engine
            .ingest((0..200).map(|i| prompt(i, 1_000, &[])).collect())
            .unwrap();
        drop(engine);
        // 2,000 noise bytes over the start of the file's pages (QA's damage).
        let path = dir.path().join(crate::store::DB_FILE);
        let mut bytes = std::fs::read(&path).unwrap();
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for b in &mut bytes[4096..6096] {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        std::fs::write(&path, bytes).unwrap();
        match Engine::open(config(dir.path(), 1_000, None), DIM) {
            Ok(_) => panic!("a damaged store opened"),
            Err(e) => {
                let e = e.to_string();
                assert!(e.contains(&path.display().to_string()), "{e}");
            }
        }
    }

    #[test]
    fn a_seal_that_fails_does_not_fail_the_stored_batch() {
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::open(config(dir.path(), 4, None), DIM).unwrap();
        // Where the first segment's dump goes, a directory: the seal cannot write it.
        let blocker = dir.path().join(INDEX_DIR).join("seg-000001.hnsw.graph");
        std::fs::create_dir_all(blocker.join("x")).unwrap();
        let verdicts = engine
            .ingest((0..5).map(|i| prompt(i, 1_000, &[])).collect())
            .unwrap();
        assert_eq!(verdicts.len(), 5, "stored, so answered");
        assert_eq!(engine.len(), 5);
        assert_eq!(engine.index.read().segments().len(), 1, "not sealed");
        // The unsealed segment is searched as before.
        let hits = engine
            .search(&prompt(3, 0, &[]).embedding, 1, &SearchFilter::default())
            .unwrap();
        assert_eq!(hits[0].record.id, 4);
        // The next batch does not try again at once (one warning a minute, not one a batch).
        std::fs::remove_dir_all(&blocker).unwrap();
        engine
            .ingest((5..7).map(|i| prompt(i, 1_000, &[])).collect())
            .unwrap();
        assert_eq!(engine.index.read().segments().len(), 1);
        // A checkpoint writes the active segment (the blocker is gone); a restart reloads it.
        engine.checkpoint().unwrap();
        drop(engine);
        let engine = Engine::open(config(dir.path(), 4, None), DIM).unwrap();
        let opened = engine.open_stats();
        assert_eq!((opened.prompts, opened.reloaded, opened.rebuilt), (7, 7, 0));
    }

    #[test]
    fn retention_is_applied_at_a_checkpoint_and_at_a_start() {
        let day = 86_400_000;
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::open(config(dir.path(), 2, Some(day)), DIM).unwrap();
        engine
            .ingest(vec![prompt(0, 0, &[]), prompt(1, 0, &[])])
            .unwrap();
        // Day 2's one prompt does not fill a segment, so no seal expires day 0's.
        engine.ingest(vec![prompt(2, 2 * day, &[])]).unwrap();
        assert_eq!(engine.index.read().len(), 3);
        // The checkpoint at the end of a run does.
        engine.checkpoint().unwrap();
        assert_eq!(engine.index.read().len(), 1);
        drop(engine);

        // Without retention, then started with it.
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::open(config(dir.path(), 2, None), DIM).unwrap();
        for (i, t) in [(0, 0), (1, 0), (2, day), (3, day), (4, 3 * day)] {
            engine.ingest(vec![prompt(i, t, &[])]).unwrap();
        }
        drop(engine);
        let engine = Engine::open(config(dir.path(), 2, Some(day)), DIM).unwrap();
        assert_eq!(engine.index.read().len(), 1, "days 0 and 1 expired");
        assert_eq!(engine.len(), 5, "still stored");
    }

    #[test]
    fn traffic_after_a_gap_starts_a_segment_and_the_one_before_expires() {
        let day = 86_400_000;
        let dir = tempfile::tempdir().unwrap();
        // Segments of up to 100 prompts, sliced by day (--retention-days' default).
        let mut sliced = config(dir.path(), 100, Some(day));
        sliced.segments.segment_span_ms = Some(day);
        let engine = Engine::open(sliced, DIM).unwrap();
        engine
            .ingest((0..3).map(|i| prompt(i, 0, &[])).collect())
            .unwrap();
        // A year later: day 0's prompts are sealed on their own, then expire at once.
        let later = 365 * day;
        engine
            .ingest((3..5).map(|i| prompt(i, later, &[])).collect())
            .unwrap();
        let index = engine.index.read();
        let segments = index.segments();
        assert_eq!(segments.len(), 1, "{segments:?}");
        assert_eq!((segments[0].min_ts, segments[0].count), (later, 2));
    }

    #[test]
    fn retention_drops_expired_part_segments_and_their_links() {
        let dir = tempfile::tempdir().unwrap();
        let day = 86_400_000;
        let engine = Engine::open(config(dir.path(), 2, Some(day)), DIM).unwrap();
        let shared = pair(7);
        // Two prompts (4 part vectors) fill and seal a segment of each index on day 0.
        let old = engine
            .ingest(vec![prompt(0, 0, &shared), prompt(1, 0, &pair(8))])
            .unwrap();
        // On day 2 a prompt sharing the old one's parts is still linked to it: the drop comes
        // after its batch goes in, with the day-0 segment past retention.
        let then = engine
            .ingest(vec![
                prompt(2, 2 * day, &shared),
                prompt(3, 2 * day, &pair(9)),
            ])
            .unwrap();
        assert_eq!(links(&engine, then[0].prompt_id), [old[0].prompt_id]);
        assert_eq!(engine.parts.read().len(), 4);
        assert_eq!(engine.index.read().len(), 2);
        // Now only the day-2 prompt is there to link to.
        let now = engine
            .ingest(vec![prompt(4, 2 * day + 1, &shared)])
            .unwrap();
        assert_eq!(links(&engine, now[0].prompt_id), [then[0].prompt_id]);
    }
}
