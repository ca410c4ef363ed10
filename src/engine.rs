//! The engine: store + index + detector behind one ingest path, used alike by the server, the
//! offline `reindex` and `eval`, so all three give the same verdicts for the same stream.
//!
//! Ingest of a batch (serialised by one lock, in order):
//! 1. for each prompt, its links: neighbours above the threshold among indexed prompts and among
//!    earlier prompts of the same batch (brute force: the batch is not indexed yet), plus the
//!    latest earlier prompt sharing a template key (lexical evidence, see `detect::keys`);
//! 2. the detector observes the prompt with those links → verdict;
//! 3. one store transaction commits the whole batch (durable before any verdict is returned);
//! 4. the vectors go into the index (after the commit, so a sealed segment never holds a prompt
//!    the store lacks), and a full segment is sealed and dumped.
//!
//! On open, the detector is rebuilt by replaying the stored links (no searches needed), the key
//! index from the stored texts, and the vector index is reloaded from its sealed segments plus
//! the store's newer records.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::{Mutex, RwLock};

use crate::config::EngineConfig;
use crate::detect::keys::{self, KeyIndex};
use crate::detect::{AccountSummary, CampaignSummary, Detector, Observation, Verdict, template};
use crate::error::Error;
use crate::index::{Neighbour, SegmentedHnsw, SegmentsConfig, VectorSearch};
use crate::store::{PromptRecord, Store};

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

/// A search result.
#[derive(Debug, Clone)]
pub struct Hit {
    /// The stored prompt.
    pub record: PromptRecord,
    /// Cosine similarity to the query.
    pub similarity: f32,
    /// Its cluster's current root.
    pub cluster_id: u64,
}

/// A campaign with what analysts read: the recovered template and examples.
#[derive(Debug, Clone)]
pub struct CampaignView {
    /// Numbers from the detector.
    pub summary: CampaignSummary,
    /// Fixed words with `<*>` slots.
    pub template: String,
    /// Sample member prompts.
    pub examples: Vec<String>,
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
    /// Seconds the open took.
    pub seconds: f64,
}

/// What only the (serialised) ingest path touches.
struct IngestState {
    next_id: u64,
    keys: KeyIndex,
}

/// Store, index and detector, consistent with each other.
pub struct Engine {
    config: EngineConfig,
    store: Store,
    index: RwLock<SegmentedHnsw>,
    detector: RwLock<Detector>,
    /// Serialises ingest; holds the next id and the template keys.
    ingest: Mutex<IngestState>,
    poisoned: AtomicBool,
    open_stats: OpenStats,
}

impl Engine {
    /// Opens the data directory: the store, the index (reloaded, then caught up from the
    /// store) and the detector (replayed from the store).
    pub fn open(config: EngineConfig, dim: usize) -> Result<Self, Error> {
        let started = std::time::Instant::now();
        let store = Store::open(&config.data_dir)?;
        let segments = SegmentsConfig {
            dir: Some(config.data_dir.join("index")),
            ..config.segments.clone()
        };
        let mut index = SegmentedHnsw::open(segments, dim)?;
        let reloaded = index.len();
        let covered = index.covered_up_to();
        let missing = index.missing_ranges();
        let needs_index =
            |id: u64| id > covered || missing.iter().any(|&(a, b)| (a..=b).contains(&id));

        let mut detector = Detector::new(config.detector.clone());
        let mut key_index = KeyIndex::default();
        let mut pending: Vec<(u64, i64, Vec<f32>)> = Vec::new();
        let mut rebuilt = 0;
        let mut last_id = 0;
        let mut flush = |index: &mut SegmentedHnsw,
                         pending: &mut Vec<(u64, i64, Vec<f32>)>|
         -> Result<(), Error> {
            index.insert_bulk(pending)?;
            rebuilt += pending.len();
            pending.clear();
            Ok(())
        };
        let mut index_err = None;
        let prompts = store.for_each_from(0, |r| {
            detector.observe(Observation {
                id: r.id,
                account_id: &r.account_id,
                timestamp_ms: r.timestamp_ms,
                text_hash: r.text_hash,
                links: &r.links,
            });
            key_index.record(r.id, &keys::keys(&r.text));
            last_id = r.id;
            if needs_index(r.id) {
                pending.push((r.id, r.timestamp_ms, r.embedding));
                if pending.len() >= 10_000
                    && let Err(e) = flush(&mut index, &mut pending)
                {
                    index_err.get_or_insert(e);
                }
            }
            Ok(())
        })?;
        if let Some(e) = index_err {
            return Err(e);
        }
        flush(&mut index, &mut pending)?;
        let open_stats = OpenStats {
            prompts,
            reloaded,
            rebuilt,
            seconds: started.elapsed().as_secs_f64(),
        };
        tracing::info!(?open_stats, "engine opened");
        Ok(Self {
            config,
            store,
            index: RwLock::new(index),
            detector: RwLock::new(detector),
            ingest: Mutex::new(IngestState {
                next_id: last_id + 1,
                keys: key_index,
            }),
            poisoned: AtomicBool::new(false),
            open_stats,
        })
    }

    /// What opening found and did.
    pub fn open_stats(&self) -> OpenStats {
        self.open_stats
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        &self.config.data_dir
    }

    /// Ingests a batch in order and returns one verdict per prompt, after the batch is durable.
    pub fn ingest(&self, batch: Vec<NewPrompt>) -> Result<Vec<Verdict>, Error> {
        if self.poisoned.load(Ordering::Acquire) {
            return Err(Error::Unavailable(
                "an earlier store commit failed; restart the server".into(),
            ));
        }
        let mut state = self.ingest.lock();
        let cfg = &self.config.detector;
        let mut records = Vec::with_capacity(batch.len());
        let mut verdicts = Vec::with_capacity(batch.len());
        {
            let index = self.index.read();
            let mut detector = self.detector.write();
            for p in batch {
                let id = state.next_id;
                state.next_id += 1;
                let mut near: Vec<Neighbour> = index.search(&p.embedding, cfg.neighbours_k);
                for (r, earlier) in records.iter().map(|r: &PromptRecord| (r, &r.embedding)) {
                    near.push(Neighbour {
                        id: r.id,
                        similarity: dot(&p.embedding, earlier),
                    });
                }
                near.retain(|n| n.similarity >= cfg.similarity_threshold);
                near.sort_by(|a, b| b.similarity.total_cmp(&a.similarity).then(a.id.cmp(&b.id)));
                near.truncate(cfg.neighbours_k);
                let mut links: Vec<u64> = near.iter().map(|n| n.id).collect();
                for l in state.keys.link(id, &keys::keys(&p.text)) {
                    if !links.contains(&l) {
                        links.push(l);
                    }
                }
                let record = PromptRecord::new(
                    id,
                    p.account_id,
                    p.timestamp_ms,
                    p.text,
                    p.embedding,
                    0,
                    links,
                );
                let verdict = detector.observe(Observation {
                    id,
                    account_id: &record.account_id,
                    timestamp_ms: record.timestamp_ms,
                    text_hash: record.text_hash,
                    links: &record.links,
                });
                records.push(PromptRecord {
                    cluster_id: verdict.cluster_id,
                    ..record
                });
                verdicts.push(verdict);
            }
        }
        if let Err(e) = self.store.append(&records) {
            // The detector already holds these prompts: refuse further writes until a restart
            // rebuilds memory from what the store really has.
            self.poisoned.store(true, Ordering::Release);
            return Err(e.into());
        }
        let items: Vec<(u64, i64, Vec<f32>)> = records
            .into_iter()
            .map(|r| (r.id, r.timestamp_ms, r.embedding))
            .collect();
        let mut index = self.index.write();
        if items.len() >= 32 {
            index.insert_bulk(&items)?;
        } else {
            for (id, ts, v) in &items {
                index.insert(*id, *ts, v)?;
            }
        }
        if index.seal_if_due()? {
            let now = items.last().map(|i| i.1).unwrap_or(0);
            let dropped = index.drop_expired(now);
            tracing::info!(dropped, "sealed an index segment");
        }
        Ok(verdicts)
    }

    /// Nearest stored prompts to `query`, filtered; most similar first.
    pub fn search(
        &self,
        query: &[f32],
        k: usize,
        filter: &SearchFilter,
    ) -> Result<Vec<Hit>, Error> {
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
                .filter(|r| {
                    filter
                        .account_id
                        .as_ref()
                        .is_none_or(|a| &r.account_id == a)
                })
                .filter(|r| filter.from_ms.is_none_or(|t| r.timestamp_ms >= t))
                .filter(|r| filter.to_ms.is_none_or(|t| r.timestamp_ms <= t))
                .map(|record| Hit {
                    // Exact, from the stored vector, independent of the index's distance.
                    similarity: dot(query, &record.embedding),
                    cluster_id: detector.cluster_of(record.id),
                    record,
                })
                .collect();
            hits.sort_by(|a, b| {
                b.similarity
                    .total_cmp(&a.similarity)
                    .then(a.record.id.cmp(&b.record.id))
            });
            if hits.len() >= k || want >= total {
                hits.truncate(k);
                return Ok(hits);
            }
            want = (want * 8).min(total);
        }
    }

    /// A stored prompt by id.
    pub fn record(&self, id: u64) -> Result<PromptRecord, Error> {
        self.store
            .get(id)?
            .ok_or_else(|| Error::NotFound(format!("prompt_id: no prompt {id}")))
    }

    /// Campaigns scoring at least `min_score`, highest first, at most `top`.
    pub fn campaigns(&self, top: usize, min_score: f32) -> Result<Vec<CampaignView>, Error> {
        let summaries: Vec<CampaignSummary> = {
            let d = self.detector.read();
            let min = min_score.max(d.config().campaign_score);
            d.campaigns(min).into_iter().take(top).collect()
        };
        summaries
            .into_iter()
            .map(|s| self.campaign_view(s))
            .collect()
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
        let examples: Vec<String> = self
            .store
            .get_many(&summary.samples)?
            .into_iter()
            .map(|r| r.text)
            .collect();
        let refs: Vec<&str> = examples.iter().map(String::as_str).collect();
        let template = template::extract(&refs);
        Ok(CampaignView {
            summary,
            template,
            examples,
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

    /// Prompts stored.
    pub fn len(&self) -> u64 {
        self.detector.read().prompts()
    }

    /// True when nothing is stored.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}
