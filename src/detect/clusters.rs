//! Cluster bookkeeping: a union-find over prompt ids (a prompt that links to earlier prompts of
//! several clusters merges them), per-cluster statistics and per-account statistics.
//!
//! Prompt ids are dense and increasing, so the union-find is a plain `Vec` indexed by id.
//! Accounts are interned to `u32` to keep per-cluster maps small.

use std::collections::{HashMap, HashSet};
use std::io::{self, Write};

use super::scoring::{account_score, campaign_score};
use super::snapshot::{Dec, Enc, invalid};
use super::{Action, DetectorConfig, Verdict};

/// Sample prompt ids kept per cluster: enough for the templates of a cluster that holds several
/// (one campaign rotating templates, or campaigns a few look-alikes chained together; see
/// `template::groups`), a template followed by a tenth of the cluster getting ~3 samples.
const SAMPLES: usize = 32;

/// Of the samples, those shown as examples (see [`examples`]).
pub const EXAMPLES: usize = 8;

/// A sample's rank: the hash of its id (ties: the id).
fn rank(id: &u64) -> (u64, u64) {
    (xxhash_rust::xxh3::xxh3_64(&id.to_le_bytes()), *id)
}

/// The samples of two merged clusters: of both clusters' members, the [`SAMPLES`] whose id has the
/// smallest hash (a bottom-k sketch). Each cluster's samples are its own bottom-k, so this is the
/// merged cluster's: a uniform sample of all its members, the same whatever order they joined
/// in. The first prompts to meet are the most alike (they link first); kept as samples, they made
/// templates keep a slot's value as fixed wording, and allow-listing such a template cleared
/// prompts that did not match it.
fn merge_samples(mut a: Vec<u64>, b: Vec<u64>) -> Vec<u64> {
    a.extend(b);
    a.sort_unstable_by_key(rank);
    a.dedup();
    a.truncate(SAMPLES);
    a.sort_unstable();
    a
}

/// Of a cluster's samples, the [`EXAMPLES`] an analyst reads, in id order: the bottom-k of the
/// bottom-k, so still a uniform sample of the cluster.
pub fn examples(samples: &[u64]) -> Vec<u64> {
    let mut out = samples.to_vec();
    out.sort_unstable_by_key(rank);
    out.truncate(EXAMPLES);
    out.sort_unstable();
    out
}

/// One prompt as the detector sees it: who, when, which text (by hash) and its links.
#[derive(Debug, Clone, Copy)]
pub struct Observation<'a> {
    /// The prompt's id (increasing).
    pub id: u64,
    /// Sending account.
    pub account_id: &'a str,
    /// Send time, ms since the epoch.
    pub timestamp_ms: i64,
    /// Normalised-text hash (verbatim repeats share it).
    pub text_hash: u64,
    /// Earlier prompt ids above the similarity threshold.
    pub links: &'a [u64],
    /// Whether it matched the allow-list as it came in: a known app's prompt, never linked
    /// and never linked to (see [`Detector::closed`]).
    pub allowed: bool,
}

#[derive(Debug, Default)]
struct ClusterStats {
    prompts: u64,
    accounts: HashMap<u32, u64>,
    texts: HashSet<u64>,
    first_seen_ms: i64,
    last_seen_ms: i64,
    /// A uniform sample of the members, up to `SAMPLES` (see [`merge_samples`]), in id order.
    samples: Vec<u64>,
    /// While one account alone has prompts here: the keys of its [`AccountStats::clusters`]
    /// that resolve to this cluster. A merge that brings in another account, or an allow-list
    /// mark, moves them to the account's [`AccountStats::live`] (and empties this).
    solo_keys: Vec<u64>,
}

#[derive(Debug, Default)]
struct AccountStats {
    prompts: u64,
    first_seen_ms: i64,
    last_seen_ms: i64,
    /// Prompt count by the cluster id the prompt joined (resolve with `find`).
    clusters: HashMap<u64, u64>,
    /// Of those, the prompts linked directly to another account's prompt: evidence that the
    /// account shares a template with others, not just that its own prompts resemble each other
    /// (a one-account batch job chained into a big cluster through a few look-alikes).
    shared: HashMap<u64, u64>,
    /// Prompts of other accounts this account's prompts have linked to.
    targets: HashSet<u64>,
    /// The keys of `clusters` whose cluster has held another account's prompts too, or has been
    /// allow-listed; every other key is in its cluster's [`ClusterStats::solo_keys`]. A cluster
    /// of one account scores 0 and is never a campaign, so these are the only clusters an
    /// account's score comes from: scoring it (every verdict does) costs the clusters it shares
    /// with others, not every cluster it ever started. (An account of 100k prompts, most of
    /// them unlike any other account's, would otherwise cost 100k lookups a verdict.)
    live: HashSet<u64>,
}

/// One observed prompt, as cross-account evidence needs it.
#[derive(Debug, Clone, Copy)]
struct PromptSeen {
    /// Interned account (`u32::MAX`: no prompt with this id was observed).
    account: u32,
    /// Normalised-text hash.
    text_hash: u64,
    /// Whether it already counts as shared for its account.
    shared: bool,
    /// Whether it matched the allow-list as it came in.
    allowed: bool,
}

impl PromptSeen {
    const NONE: Self = Self {
        account: u32::MAX,
        text_hash: 0,
        shared: false,
        allowed: false,
    };
}

/// A cluster as analysts see it.
#[derive(Debug, Clone, PartialEq)]
pub struct CampaignSummary {
    /// Root prompt id of the cluster.
    pub id: u64,
    /// Campaign score in [0, 1].
    pub score: f32,
    /// Whether the score reaches the campaign threshold (`DetectorConfig::campaign_score`):
    /// `campaign` looks up any cluster, campaign or not.
    pub is_campaign: bool,
    /// Distinct accounts.
    pub accounts: u32,
    /// Member prompts.
    pub prompts: u64,
    /// Distinct normalised texts among them.
    pub distinct_prompts: u64,
    /// First and last send time.
    pub first_seen_ms: i64,
    /// Last send time.
    pub last_seen_ms: i64,
    /// Of its accounts, those flagged whose prompts here count as campaign traffic (see
    /// [`AccountSummary::campaign_prompts`]): the campaign's members, where `accounts` also counts
    /// everyone a stray link chained in (a batch job with one look-alike, an app's users).
    pub flagged_accounts: u32,
    /// Accounts with the most campaign prompts here, most first (up to 10; ties: more prompts).
    pub top_accounts: Vec<TopAccount>,
    /// Sample member prompt ids: a uniform sample of the cluster, in id order.
    pub samples: Vec<u64>,
}

/// One of a campaign's top accounts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopAccount {
    /// The account id.
    pub account_id: String,
    /// Its prompts in the campaign's cluster.
    pub prompts: u64,
    /// Of those, the ones that count as campaign traffic (see `DetectorConfig::min_cross_account_share`).
    pub campaign_prompts: u64,
}

/// An account's verdict and the evidence behind it.
#[derive(Debug, Clone, PartialEq)]
pub struct AccountSummary {
    /// The account id.
    pub account_id: String,
    /// Score in [0, 1].
    pub score: f32,
    /// The action for that score (`Allow` whatever the score while `too_few_to_judge`).
    pub action: Action,
    /// Whether the action is `Review` or `Block`.
    pub flagged: bool,
    /// Prompts sent.
    pub prompts: u64,
    /// Prompts that count as campaign traffic (see `DetectorConfig::min_cross_account_share`).
    pub campaign_prompts: u64,
    /// When it has campaign prompts but fewer than an account needs to be judged
    /// (`DetectorConfig::min_campaign_prompts`, so its action is `allow` whatever its score),
    /// that number.
    pub too_few_to_judge: Option<u32>,
    /// Of its prompts in campaigns, those linked directly to another account's prompt.
    pub cross_account_prompts: u64,
    /// The campaigns it takes part in, most prompts first.
    pub campaigns: Vec<u64>,
    /// Its prompts in clusters an analyst allow-listed (they score 0 and are not campaign
    /// traffic): why an account of a cleared campaign is no longer flagged.
    pub allow_listed_prompts: u64,
    /// First send time.
    pub first_seen_ms: i64,
    /// Last send time.
    pub last_seen_ms: i64,
}

/// The detector state: clusters of prompts and the accounts sending them.
pub struct Detector {
    config: DetectorConfig,
    /// parent[id] for union-find; ids never seen point to themselves.
    parent: Vec<u64>,
    clusters: HashMap<u64, ClusterStats>,
    accounts: HashMap<u32, AccountStats>,
    account_ids: HashMap<String, u32>,
    account_names: Vec<String>,
    /// What cross-account evidence needs of each prompt, by id (see `observe`).
    prompts_seen: Vec<PromptSeen>,
    /// Cluster roots an analyst allow-listed (see `allow`): they score 0. A merge keeps the mark
    /// when the surviving (bigger) side had it.
    allowed: HashSet<u64>,
}

impl Detector {
    /// An empty detector.
    pub fn new(config: DetectorConfig) -> Self {
        Self {
            config,
            parent: Vec::new(),
            clusters: HashMap::new(),
            accounts: HashMap::new(),
            account_ids: HashMap::new(),
            account_names: Vec::new(),
            allowed: HashSet::new(),
            prompts_seen: Vec::new(),
        }
    }

    /// Removes every cluster's allow-list mark (to derive them afresh from the allow-list).
    pub fn clear_allowed(&mut self) {
        self.allowed.clear();
    }

    /// The roots of the clusters allow-listed now.
    pub fn allowed_roots(&self) -> Vec<u64> {
        self.allowed.iter().copied().collect()
    }

    /// Marks the cluster holding prompt `id` as allow-listed; returns whether it was a campaign.
    pub fn allow_cluster(&mut self, id: u64) -> bool {
        let root = self.cluster_of(id);
        let was = self.cluster_score(root).0 >= self.config.campaign_score;
        if let Some(c) = self.clusters.get_mut(&root) {
            self.allowed.insert(root);
            // Its prompts now count as allow-listed in its account's summary.
            Self::make_live(&mut self.accounts, c);
        }
        was
    }

    /// Moves the keys of a cluster of one account ([`ClusterStats::solo_keys`]) to that account's
    /// [`AccountStats::live`].
    fn make_live(accounts: &mut HashMap<u32, AccountStats>, c: &mut ClusterStats) {
        if c.solo_keys.is_empty() {
            return;
        }
        if let Some(&acct) = c.accounts.keys().next() {
            let live = &mut accounts.entry(acct).or_default().live;
            live.extend(c.solo_keys.drain(..));
        }
    }

    /// Two clusters as one; keys of a cluster of one account go live when the other side
    /// brings another account.
    fn merge_clusters(&mut self, mut keep: ClusterStats, mut gone: ClusterStats) -> ClusterStats {
        fn alone(c: &ClusterStats) -> Option<u32> {
            (c.accounts.len() == 1).then(|| c.accounts.keys().next().copied())?
        }
        let one_account = match (alone(&keep), alone(&gone)) {
            (Some(a), Some(b)) => a == b,
            _ => false,
        };
        if !one_account {
            Self::make_live(&mut self.accounts, &mut keep);
            Self::make_live(&mut self.accounts, &mut gone);
        }
        merge(keep, gone)
    }

    /// The account's summary scored from all its cluster keys, live or not (what scoring was
    /// before [`AccountStats::live`]): what tests check the live keys against.
    #[cfg(test)]
    fn summary_from_all_keys(&mut self, account_id: &str) -> AccountSummary {
        let acct = self.account_ids[account_id];
        let a = self.accounts.get_mut(&acct).expect("an observed account");
        let all = a.clusters.keys().copied().collect();
        let live = std::mem::replace(&mut a.live, all);
        let summary = self.account_summary(acct);
        self.accounts.get_mut(&acct).expect("still there").live = live;
        summary
    }

    /// Sorts every account's cluster keys into live ones and clusters' solo keys (see
    /// [`AccountStats::live`]), for a state read from a snapshot.
    fn sort_keys(&mut self) {
        for (&acct, a) in self.accounts.iter_mut() {
            for &key in a.clusters.keys() {
                match self.clusters.get_mut(&root_in(&self.parent, key)) {
                    Some(c) if c.accounts.len() == 1 && c.accounts.contains_key(&acct) => {
                        c.solo_keys.push(key);
                    }
                    _ => {
                        a.live.insert(key);
                    }
                }
            }
        }
    }

    /// Whether the cluster of prompt `id` is allow-listed (see [`Self::allow_cluster`]).
    pub fn cluster_allowed(&self, id: u64) -> bool {
        self.allowed.contains(&self.cluster_of(id))
    }

    /// Whether nothing may link to prompt `id`: it matched the allow-list as it came in, or it
    /// is in an allow-listed cluster. A known app's prompts are never linked into campaigns,
    /// whichever way the link would point: a look-alike campaign that linked to them would be
    /// cleared with the app (joining its allowed cluster), or show the app's prompts and users
    /// as its own.
    pub fn closed(&self, id: u64) -> bool {
        self.prompts_seen
            .get(id as usize)
            .is_some_and(|p| p.allowed)
            || (!self.allowed.is_empty() && self.allowed.contains(&self.cluster_of(id)))
    }

    /// The thresholds in force.
    pub fn config(&self) -> &DetectorConfig {
        &self.config
    }

    /// Records one prompt and returns its verdict (ingest).
    pub fn observe(&mut self, obs: Observation<'_>) -> Verdict {
        let (acct, root) = self.record(obs);
        let summary = self.account_summary(acct);
        let (campaign_score, cluster_accounts) = self.cluster_score(root);
        Verdict {
            prompt_id: obs.id,
            cluster_id: root,
            campaign_id: (campaign_score >= self.config.campaign_score).then_some(root),
            action: summary.action,
            score: summary.score,
            campaign_score,
            cluster_accounts,
            neighbours: obs.links.len() as u32,
        }
    }

    /// Records one prompt without scoring it: a start replaying the store needs the state, not
    /// a verdict for every prompt ever stored (scoring the account was most of the replay's
    /// detector time).
    /// Returns the root of the cluster it joined.
    pub fn replay(&mut self, obs: Observation<'_>) -> u64 {
        self.record(obs).1
    }

    /// Records one prompt; returns its interned account and its cluster's root.
    fn record(&mut self, obs: Observation<'_>) -> (u32, u64) {
        self.ensure(obs.id);
        let acct = self.intern(obs.account_id);
        let mut root = obs.id;
        let mut stats = ClusterStats {
            prompts: 1,
            accounts: HashMap::from([(acct, 1)]),
            texts: HashSet::from([obs.text_hash]),
            first_seen_ms: obs.timestamp_ms,
            last_seen_ms: obs.timestamp_ms,
            samples: vec![obs.id],
            solo_keys: Vec::new(),
        };
        for &link in obs.links {
            if link >= obs.id {
                continue; // links only point back in time; anything else is not ours to trust
            }
            let other = self.find(link);
            if other == root {
                continue;
            }
            let Some(other_stats) = self.clusters.remove(&other) else {
                continue;
            };
            // Union by size: the bigger cluster's root survives.
            let (keep, keep_stats, gone, gone_stats) = if other_stats.prompts >= stats.prompts {
                (other, other_stats, root, stats)
            } else {
                (root, stats, other, other_stats)
            };
            self.parent[gone as usize] = keep;
            self.allowed.remove(&gone);
            root = keep;
            stats = self.merge_clusters(keep_stats, gone_stats);
        }
        self.parent[obs.id as usize] = root;
        self.clusters.insert(root, stats);

        // Cross-account evidence. A prompt counts as shared when it links to a prompt of another
        // account that this account had not linked to before (a batch job that keeps linking to
        // the one look-alike someone else sent gets credit once; it takes one such prompt of each
        // account, and leaves the others it links to for its account's later prompts), and one
        // prompt it links to of each other account counts as shared for that account too (so the
        // first account of a campaign, whose early prompts had nobody to link to yet, gets credit
        // when others follow; and one look-alike credits one prompt of a batch job, not all its
        // neighbours).
        let i = obs.id as usize;
        if self.prompts_seen.len() <= i {
            self.prompts_seen.resize(i + 1, PromptSeen::NONE);
        }
        let mut shared = false;
        // Accounts this prompt has vouched for: it credits one prompt of each account it links
        // to. One look-alike that another account sends sits next to many prompts of a batch job
        // (a dozen near neighbours of one template); crediting them all swept a whole batch job
        // into the campaign the look-alike came from.
        let mut vouched: Vec<u32> = Vec::new();
        // Accounts of which this prompt has taken a new target (see below).
        let mut used: Vec<u32> = Vec::new();
        for &l in obs.links {
            if l >= obs.id {
                continue;
            }
            let Some(&seen) = self.prompts_seen.get(l as usize) else {
                continue;
            };
            // The same text sent by two accounts is a popular prompt, not a template with a
            // changing slot: it proves nothing about sharing a template.
            if seen.account == acct || seen.account == u32::MAX || seen.text_hash == obs.text_hash {
                continue;
            }
            // One new target per other account, the first not linked before: a prompt that links
            // to many of another account's prompts at once (a template's fixed sentences match
            // every earlier prompt's) leaves the rest for the account's later prompts, so the
            // evidence does not depend on how many prompts one lookup saw (a big batch's prompts
            // see all the batch's earlier ones).
            if !used.contains(&seen.account) {
                let targets = &mut self.accounts.entry(acct).or_default().targets;
                if targets.insert(l) {
                    used.push(seen.account);
                    shared = true;
                }
            }
            let target = &mut self.prompts_seen[l as usize];
            if !target.shared && !vouched.contains(&seen.account) {
                vouched.push(seen.account);
                target.shared = true;
                if let Some(o) = self.accounts.get_mut(&seen.account) {
                    *o.shared.entry(root).or_default() += 1;
                }
            }
        }
        self.prompts_seen[i] = PromptSeen {
            account: acct,
            text_hash: obs.text_hash,
            shared,
            allowed: obs.allowed,
        };
        let a = self.accounts.entry(acct).or_default();
        if a.prompts == 0 {
            a.first_seen_ms = obs.timestamp_ms;
        }
        a.prompts += 1;
        a.first_seen_ms = a.first_seen_ms.min(obs.timestamp_ms);
        a.last_seen_ms = a.last_seen_ms.max(obs.timestamp_ms);
        let joined = a.clusters.entry(root).or_default();
        *joined += 1;
        if *joined == 1 {
            // A new key: live, or kept by its cluster of one account until that changes.
            match self.clusters.get_mut(&root) {
                Some(c) if c.accounts.len() == 1 && !self.allowed.contains(&root) => {
                    c.solo_keys.push(root);
                }
                _ => {
                    a.live.insert(root);
                }
            }
        }
        if shared {
            *a.shared.entry(root).or_default() += 1;
        }
        (acct, root)
    }

    /// The cluster root of a prompt id (the id itself if unknown). Does not compress paths, so
    /// it works on a shared reference.
    pub fn cluster_of(&self, id: u64) -> u64 {
        root_in(&self.parent, id)
    }

    /// The root of prompt `id`'s cluster when that cluster scores as a campaign (as a verdict's
    /// `campaign_id` says), else `None`.
    pub fn campaign_of(&self, id: u64) -> Option<u64> {
        let root = self.cluster_of(id);
        let score = self.cluster_score(root).0;
        (score >= self.config.campaign_score && score > 0.0).then_some(root)
    }

    /// Clusters scoring at least `min_score` as campaigns, highest score first (ties: more accounts).
    pub fn campaigns(&self, min_score: f32) -> Vec<CampaignSummary> {
        self.campaign_roots(min_score)
            .into_iter()
            .filter_map(|root| self.campaign(root))
            .collect()
    }

    /// The root and sampled prompt ids of each cluster [`Self::campaigns`] lists, in its order:
    /// what the allow-list needs, without the per-account evidence a summary adds up.
    pub fn campaign_samples(&self, min_score: f32) -> Vec<(u64, Vec<u64>)> {
        self.campaign_roots(min_score)
            .into_iter()
            .filter_map(|root| Some((root, self.clusters.get(&root)?.samples.clone())))
            .collect()
    }

    /// The roots of clusters scoring at least `min_score` (and above 0), highest score first
    /// (ties: more accounts, then the lower root).
    pub fn campaign_roots(&self, min_score: f32) -> Vec<u64> {
        let mut roots: Vec<(u64, f32, u32)> = self
            .clusters
            .keys()
            .map(|&root| {
                let (score, accounts) = self.cluster_score(root);
                (root, score, accounts)
            })
            .filter(|&(_, score, _)| score >= min_score && score > 0.0)
            .collect();
        roots.sort_by(|a, b| b.1.total_cmp(&a.1).then(b.2.cmp(&a.2)).then(a.0.cmp(&b.0)));
        roots.into_iter().map(|(root, _, _)| root).collect()
    }

    /// The cluster containing prompt `id`, if that prompt is known.
    pub fn campaign(&self, id: u64) -> Option<CampaignSummary> {
        let root = self.cluster_of(id);
        let c = self.clusters.get(&root)?;
        let score = self.cluster_score(root).0;
        let is_campaign = score >= self.config.campaign_score;
        // Per account: its prompts here, those that count as campaign traffic, and whether it is
        // a flagged member. A member's traffic counts only where the cluster is a campaign.
        let mut top: Vec<(u32, u64, u64)> = Vec::with_capacity(c.accounts.len());
        let mut flagged = 0;
        for (&a, &n) in &c.accounts {
            let credited = if is_campaign {
                self.credited(a, root)
            } else {
                0
            };
            if credited > 0 && self.account_summary(a).flagged {
                flagged += 1;
            }
            top.push((a, n, credited));
        }
        top.sort_by(|x, y| y.2.cmp(&x.2).then(y.1.cmp(&x.1)).then(x.0.cmp(&y.0)));
        top.truncate(10);
        Some(CampaignSummary {
            id: root,
            score,
            is_campaign,
            accounts: c.accounts.len() as u32,
            flagged_accounts: flagged,
            prompts: c.prompts,
            distinct_prompts: c.texts.len() as u64,
            first_seen_ms: c.first_seen_ms,
            last_seen_ms: c.last_seen_ms,
            top_accounts: top
                .into_iter()
                .map(|(a, prompts, campaign_prompts)| TopAccount {
                    account_id: self.account_names[a as usize].clone(),
                    prompts,
                    campaign_prompts,
                })
                .collect(),
            samples: c.samples.clone(),
        })
    }

    /// The account's summary, if it has sent anything.
    pub fn account(&self, account_id: &str) -> Option<AccountSummary> {
        self.account_ids
            .get(account_id)
            .map(|&a| self.account_summary(a))
    }

    /// The ids of every prompt `account_id` sent, oldest first; `None` for an unknown account.
    /// A scan of one small entry per prompt: ~1 ms per 100k stored prompts.
    pub fn prompts_of(&self, account_id: &str) -> Option<Vec<u64>> {
        let &a = self.account_ids.get(account_id)?;
        Some(
            self.prompts_seen
                .iter()
                .enumerate()
                .filter(|(_, p)| p.account == a)
                .map(|(id, _)| id as u64)
                .collect(),
        )
    }

    /// Every account's summary, highest score first (ties: account id).
    pub fn accounts(&self) -> Vec<AccountSummary> {
        let mut out: Vec<AccountSummary> = self
            .accounts
            .keys()
            .map(|&a| self.account_summary(a))
            .collect();
        out.sort_by(|a, b| {
            b.score
                .total_cmp(&a.score)
                .then_with(|| a.account_id.cmp(&b.account_id))
        });
        out
    }

    /// Number of prompts observed.
    pub fn prompts(&self) -> u64 {
        self.accounts.values().map(|a| a.prompts).sum()
    }

    /// Number of accounts that sent a prompt.
    pub fn account_count(&self) -> u64 {
        self.accounts.len() as u64
    }

    fn cluster_score(&self, root: u64) -> (f32, u32) {
        match self.clusters.get(&root) {
            Some(c) if self.allowed.contains(&root) => (0.0, c.accounts.len() as u32),
            Some(c) => {
                let accounts = c.accounts.len() as u32;
                (
                    campaign_score(
                        accounts,
                        c.prompts,
                        c.texts.len() as u64,
                        self.config.campaign_accounts,
                        self.config.campaign_prompts_per_account,
                    ),
                    accounts,
                )
            }
            None => (0.0, 0),
        }
    }

    /// Of `n` prompts of an account in one cluster, `m` of them linked across accounts, those
    /// that count as campaign traffic: all of them when the linked share reaches
    /// `min_cross_account_share`, else the linked ones.
    fn credit(&self, n: u64, m: u64) -> u64 {
        if m as f32 >= self.config.min_cross_account_share * n as f32 {
            n
        } else {
            m
        }
    }

    /// [`Self::credit`] of account `acct` in the cluster whose root is `root`.
    fn credited(&self, acct: u32, root: u64) -> u64 {
        let Some(a) = self.accounts.get(&acct) else {
            return 0;
        };
        let in_root = |map: &HashMap<u64, u64>| -> u64 {
            map.iter()
                .filter(|&(&c, _)| self.cluster_of(c) == root)
                .map(|(_, &n)| n)
                .sum()
        };
        self.credit(in_root(&a.clusters), in_root(&a.shared))
    }

    fn account_summary(&self, acct: u32) -> AccountSummary {
        let a = &self.accounts[&acct];
        // Per cluster: the account's prompts there, and those linked directly to another
        // account's prompt. A cluster counts in full when enough of the account's prompts there
        // are linked across accounts (a campaign member, whose own bursts may link to itself);
        // otherwise only the cross-account ones count (a one-account batch job that a few
        // look-alikes chained into a big cluster).
        // Only live keys: the others' clusters hold this account alone, score 0 and are not
        // allow-listed, so they would add nothing below.
        let mut by_root: HashMap<u64, (u64, u64)> = HashMap::new();
        for c in &a.live {
            if let Some(&n) = a.clusters.get(c) {
                by_root.entry(self.cluster_of(*c)).or_default().0 += n;
            }
        }
        for (&c, &m) in &a.shared {
            by_root.entry(self.cluster_of(c)).or_default().1 += m;
        }
        let mut campaigns = Vec::new();
        let mut campaign_prompts = 0;
        let mut cross_account_prompts = 0;
        let mut weighted = Vec::with_capacity(by_root.len());
        let mut allow_listed_prompts = 0;
        for (&root, &(n, m)) in &by_root {
            if self.allowed.contains(&root) {
                allow_listed_prompts += n;
            }
            let s = self.cluster_score(root).0;
            let credited = self.credit(n, m);
            weighted.push((credited, s));
            if s >= self.config.campaign_score && credited > 0 {
                campaigns.push((root, credited));
                campaign_prompts += credited;
                cross_account_prompts += m;
            }
        }
        campaigns.sort_by(|x, y| y.1.cmp(&x.1).then(x.0.cmp(&y.0)));
        let score = account_score(a.prompts, weighted);
        // One prompt that lands in a campaign is weak evidence (an ordinary question can sit next
        // to a campaign's slot); an account is judged on at least `min_campaign_prompts`.
        let enough = campaign_prompts >= u64::from(self.config.min_campaign_prompts);
        let action = if enough {
            self.config.action(score)
        } else {
            Action::Allow
        };
        AccountSummary {
            account_id: self.account_names[acct as usize].clone(),
            score,
            action,
            flagged: action != Action::Allow,
            prompts: a.prompts,
            campaign_prompts,
            too_few_to_judge: (campaign_prompts > 0 && !enough)
                .then_some(self.config.min_campaign_prompts),
            cross_account_prompts,
            campaigns: campaigns.into_iter().map(|(r, _)| r).collect(),
            allow_listed_prompts,
            first_seen_ms: a.first_seen_ms,
            last_seen_ms: a.last_seen_ms,
        }
    }

    /// Writes the state a start would otherwise replay (see `snapshot`). Allow-list marks are
    /// left out: a start derives them from the allow-list again.
    pub(super) fn encode<W: Write>(&self, e: &mut Enc<W>) {
        e.len(self.account_names.len());
        for name in &self.account_names {
            e.str(name);
        }
        e.len(self.parent.len());
        for &p in &self.parent {
            e.u64(p);
        }
        e.len(self.prompts_seen.len());
        for p in &self.prompts_seen {
            e.u32(p.account);
            e.u64(p.text_hash);
            e.u8(u8::from(p.shared) | u8::from(p.allowed) << 1);
        }
        e.len(self.clusters.len());
        for (&root, c) in &self.clusters {
            e.u64(root);
            e.u64(c.prompts);
            e.i64(c.first_seen_ms);
            e.i64(c.last_seen_ms);
            e.len(c.accounts.len());
            for (&a, &n) in &c.accounts {
                e.u32(a);
                e.u64(n);
            }
            e.len(c.texts.len());
            for &t in &c.texts {
                e.u64(t);
            }
            e.len(c.samples.len());
            for &id in &c.samples {
                e.u64(id);
            }
        }
        e.len(self.accounts.len());
        for (&acct, a) in &self.accounts {
            e.u32(acct);
            e.u64(a.prompts);
            e.i64(a.first_seen_ms);
            e.i64(a.last_seen_ms);
            for map in [&a.clusters, &a.shared] {
                e.len(map.len());
                for (&c, &n) in map {
                    e.u64(c);
                    e.u64(n);
                }
            }
            e.len(a.targets.len());
            for &t in &a.targets {
                e.u64(t);
            }
        }
    }

    /// Reads what [`Detector::encode`] wrote; refuses ids that would point outside the state.
    pub(super) fn decode(d: &mut Dec, config: DetectorConfig) -> io::Result<Self> {
        let n = d.len(8)?;
        let mut account_names = Vec::with_capacity(n);
        let mut account_ids = HashMap::with_capacity(n);
        for a in 0..n {
            let name = d.str()?;
            if account_ids.insert(name.clone(), a as u32).is_some() {
                return Err(invalid("corrupt (an account twice)"));
            }
            account_names.push(name);
        }
        let accounts_known = account_names.len() as u64;
        let account = |a: u32| {
            if u64::from(a) < accounts_known {
                Ok(a)
            } else {
                Err(invalid("corrupt (an unknown account)"))
            }
        };
        let n = d.len(8)?;
        let ids = n as u64;
        let id = |x: u64| {
            if x < ids {
                Ok(x)
            } else {
                Err(invalid("corrupt (a prompt id beyond the last)"))
            }
        };
        let mut parent = Vec::with_capacity(n);
        for _ in 0..n {
            parent.push(id(d.u64()?)?);
        }
        let n = d.len(13)?;
        let mut prompts_seen = Vec::with_capacity(n);
        for _ in 0..n {
            let a = d.u32()?;
            let text_hash = d.u64()?;
            let flags = d.u8()?;
            prompts_seen.push(PromptSeen {
                account: if a == u32::MAX { a } else { account(a)? },
                text_hash,
                shared: flags & 1 != 0,
                allowed: flags & 2 != 0,
            });
        }
        let n = d.len(56)?;
        let mut clusters = HashMap::with_capacity(n);
        for _ in 0..n {
            let root = id(d.u64()?)?;
            let mut c = ClusterStats {
                prompts: d.u64()?,
                first_seen_ms: d.i64()?,
                last_seen_ms: d.i64()?,
                ..ClusterStats::default()
            };
            let m = d.len(12)?;
            c.accounts.reserve(m);
            for _ in 0..m {
                let a = account(d.u32()?)?;
                c.accounts.insert(a, d.u64()?);
            }
            let m = d.len(8)?;
            c.texts.reserve(m);
            for _ in 0..m {
                c.texts.insert(d.u64()?);
            }
            let m = d.len(8)?;
            for _ in 0..m {
                c.samples.push(id(d.u64()?)?);
            }
            clusters.insert(root, c);
        }
        let n = d.len(52)?;
        let mut accounts = HashMap::with_capacity(n);
        for _ in 0..n {
            let acct = account(d.u32()?)?;
            let mut a = AccountStats {
                prompts: d.u64()?,
                first_seen_ms: d.i64()?,
                last_seen_ms: d.i64()?,
                ..AccountStats::default()
            };
            for map in [&mut a.clusters, &mut a.shared] {
                let m = d.len(16)?;
                map.reserve(m);
                for _ in 0..m {
                    let c = id(d.u64()?)?;
                    map.insert(c, d.u64()?);
                }
            }
            let m = d.len(8)?;
            a.targets.reserve(m);
            for _ in 0..m {
                a.targets.insert(id(d.u64()?)?);
            }
            accounts.insert(acct, a);
        }
        let mut detector = Self {
            config,
            parent,
            clusters,
            accounts,
            account_ids,
            account_names,
            prompts_seen,
            allowed: HashSet::new(),
        };
        detector.sort_keys();
        Ok(detector)
    }

    /// The normalised-text hash of prompt `id`, if it was observed.
    pub fn text_hash(&self, id: u64) -> Option<u64> {
        self.prompts_seen
            .get(id as usize)
            .filter(|p| p.account != u32::MAX)
            .map(|p| p.text_hash)
    }

    fn ensure(&mut self, id: u64) {
        let want = id as usize + 1;
        if self.parent.len() < want {
            let start = self.parent.len() as u64;
            self.parent.extend(start..want as u64);
        }
    }

    fn find(&mut self, id: u64) -> u64 {
        self.ensure(id);
        let mut x = id;
        while self.parent[x as usize] != x {
            let grand = self.parent[self.parent[x as usize] as usize];
            self.parent[x as usize] = grand; // path halving
            x = grand;
        }
        x
    }

    fn intern(&mut self, account_id: &str) -> u32 {
        if let Some(&a) = self.account_ids.get(account_id) {
            return a;
        }
        let a = self.account_names.len() as u32;
        self.account_names.push(account_id.to_string());
        self.account_ids.insert(account_id.to_string(), a);
        a
    }
}

/// The root of `id` in the union-find forest `parent` (the id itself if unknown), without
/// compressing paths: [`Detector::cluster_of`], for callers that hold other fields mutably.
fn root_in(parent: &[u64], id: u64) -> u64 {
    let mut x = id;
    while let Some(&p) = parent.get(x as usize) {
        if p == x {
            break;
        }
        x = p;
    }
    x
}

fn merge(mut keep: ClusterStats, gone: ClusterStats) -> ClusterStats {
    keep.prompts += gone.prompts;
    for (a, n) in gone.accounts {
        *keep.accounts.entry(a).or_default() += n;
    }
    keep.texts.extend(gone.texts);
    keep.first_seen_ms = keep.first_seen_ms.min(gone.first_seen_ms);
    keep.last_seen_ms = keep.last_seen_ms.max(gone.last_seen_ms);
    keep.samples = merge_samples(std::mem::take(&mut keep.samples), gone.samples);
    keep.solo_keys.extend(gone.solo_keys);
    keep
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obs<'a>(id: u64, account: &'a str, hash: u64, links: &'a [u64]) -> Observation<'a> {
        Observation {
            id,
            account_id: account,
            timestamp_ms: id as i64 * 1000,
            text_hash: hash,
            links,
            allowed: false,
        }
    }

    #[test]
    fn samples_are_uniform_over_the_cluster_whatever_order_it_grew_in() {
        let bottom = |ids: std::ops::RangeInclusive<u64>| merge_samples(ids.collect(), Vec::new());
        let account = |id: u64| format!("a{}", id % 20);
        // One prompt at a time, each linking to the one before.
        let mut one = Detector::new(DetectorConfig::default());
        for id in 1..=201u64 {
            let links: Vec<u64> = (id > 1).then_some(id - 1).into_iter().collect();
            one.observe(obs(id, &account(id), id, &links));
        }
        // Two halves growing apart, then a prompt that joins them.
        let mut two = Detector::new(DetectorConfig::default());
        for id in 1..=200u64 {
            let links: Vec<u64> = (id != 1 && id != 101)
                .then_some(id - 1)
                .into_iter()
                .collect();
            two.observe(obs(id, &account(id), id, &links));
        }
        two.observe(obs(201, &account(201), 201, &[100, 200]));
        let want = bottom(1..=201);
        assert_eq!(want.len(), SAMPLES);
        assert_eq!(one.campaign(1).unwrap().samples, want);
        assert_eq!(two.campaign(1).unwrap().samples, want);
        // Not the first prompts: those link first, being the most alike.
        assert!(want.iter().any(|&id| id > 100), "{want:?}");
        // The examples are the samples' own bottom-k: the cluster's, had it kept fewer.
        let shown = examples(&want);
        assert_eq!(shown.len(), EXAMPLES);
        assert_eq!(shown, {
            let mut all: Vec<u64> = (1..=201).collect();
            all.sort_unstable_by_key(rank);
            all.truncate(EXAMPLES);
            all.sort_unstable();
            all
        });
    }

    #[test]
    fn a_known_apps_prompts_and_allow_listed_clusters_are_closed() {
        let mut d = Detector::new(DetectorConfig::default());
        d.observe(obs(1, "a", 1, &[]));
        d.observe(obs(2, "b", 2, &[1]));
        d.observe(Observation {
            allowed: true,
            ..obs(3, "c", 3, &[])
        });
        d.observe(obs(4, "d", 4, &[]));
        assert!(d.closed(3) && !d.closed(1) && !d.closed(4));
        d.allow_cluster(2); // the cluster of 1 and 2
        assert!(
            d.closed(1) && d.closed(2),
            "the allowed cluster, every member"
        );
        assert!(
            !d.closed(4) && !d.closed(99),
            "others and unknown ids stay open"
        );
    }

    #[test]
    fn unlinked_prompts_stay_alone_and_allowed() {
        let mut d = Detector::new(DetectorConfig::default());
        let v = d.observe(obs(1, "a", 1, &[]));
        assert_eq!(
            (v.cluster_id, v.campaign_id, v.action, v.neighbours),
            (1, None, Action::Allow, 0)
        );
        let v = d.observe(obs(2, "b", 2, &[]));
        assert_eq!(v.cluster_id, 2);
        assert!(d.campaigns(0.0).is_empty());
    }

    #[test]
    fn template_across_many_accounts_becomes_a_campaign_and_flags_them() {
        let mut d = Detector::new(DetectorConfig::default());
        let mut last = None;
        for i in 1..=36u64 {
            let links: Vec<u64> = if i == 1 { vec![] } else { vec![i - 1] };
            let acct = format!("acct-{}", (i - 1) % 12);
            last = Some(d.observe(obs(i, &acct, 100 + i, &links)));
            if i == 12 {
                // One prompt each so far: not yet a campaign (a template every user sends once is
                // ordinary), and one prompt is not enough evidence to flag anyway.
                let v = last.clone().unwrap();
                assert_eq!(v.campaign_id, None);
                assert_eq!(v.action, Action::Allow, "{v:?}");
                assert!(d.accounts().iter().all(|a| !a.flagged));
            }
        }
        let v = last.unwrap();
        assert_eq!(v.cluster_accounts, 12);
        assert!(v.campaign_score > 0.9, "{}", v.campaign_score);
        assert_eq!(v.campaign_id, Some(v.cluster_id));
        assert_eq!(v.action, Action::Block);
        let c = d.campaigns(0.5);
        assert_eq!(c.len(), 1);
        assert_eq!(
            (c[0].accounts, c[0].prompts, c[0].distinct_prompts),
            (12, 36, 36)
        );
        assert!(
            d.accounts()
                .iter()
                .all(|a| a.flagged && a.too_few_to_judge.is_none())
        );

        // A newcomer's one prompt in it scores high but is not judged on one prompt, and the
        // summary says why (the reason an analyst reads is built from it).
        d.observe(obs(37, "newcomer", 999, &[36]));
        let n = d.account("newcomer").unwrap();
        assert_eq!(
            (n.campaign_prompts, n.action, n.too_few_to_judge),
            (1, Action::Allow, Some(2))
        );
        assert!(n.score >= 0.5, "{n:?}");

        // An analyst allow-lists it: the cluster stops scoring and nobody stays flagged.
        assert!(
            d.accounts().iter().all(|a| a.allow_listed_prompts == 0),
            "nothing allow-listed yet"
        );
        assert!(d.allow_cluster(5));
        assert!(d.campaigns(0.5).is_empty());
        assert!(d.accounts().iter().all(|a| !a.flagged));
        // Each says where its prompts went: 3 each, the newcomer's 1.
        let cleared: u64 = d.accounts().iter().map(|a| a.allow_listed_prompts).sum();
        assert_eq!(cleared, 37);
    }

    #[test]
    fn an_account_scores_from_its_live_clusters_as_from_all_of_them() {
        // Random traffic: 10 campaign accounts whose prompts link to recent ones of the
        // campaign, 30 organic accounts whose prompts mostly stand alone, texts that repeat,
        // links across the whole history (merges of clusters of one account and of several),
        // clusters allow-listed on the way; then the state through a snapshot, and more traffic
        // on top of it.
        let mut rng = crate::index::testdata::Rng::new(11);
        let mut d = Detector::new(DetectorConfig::default());
        let (mut campaign, mut organic): (Vec<u64>, Vec<u64>) = (Vec::new(), Vec::new());
        let mut step = |d: &mut Detector, id: u64, rng: &mut crate::index::testdata::Rng| {
            let n = rng.next_u64() % 40;
            let account = format!("a{n}");
            let mut links: Vec<u64> = Vec::new();
            let hash = if n < 10 {
                for _ in 0..1 + rng.next_u64() % 2 {
                    if !campaign.is_empty() {
                        let back = (rng.next_u64() % 20) as usize;
                        links.push(campaign[campaign.len().saturating_sub(1 + back)]);
                    }
                }
                campaign.push(id);
                1_000_000 + id
            } else {
                if !organic.is_empty() && rng.next_u64().is_multiple_of(5) {
                    links.push(organic[(rng.next_u64() % organic.len() as u64) as usize]);
                }
                organic.push(id);
                rng.next_u64() % 400
            };
            let verdict = d.observe(obs(id, &account, hash, &links));
            let all = d.summary_from_all_keys(&account);
            assert_eq!(
                (verdict.score, verdict.action),
                (all.score, all.action),
                "prompt {id}"
            );
            assert_eq!(d.account(&account).as_ref(), Some(&all), "prompt {id}");
            if id.is_multiple_of(250) {
                d.allow_cluster(organic[(rng.next_u64() % organic.len() as u64) as usize]);
            }
        };
        for id in 1..=3000 {
            step(&mut d, id, &mut rng);
        }
        let flagged = d.accounts().iter().filter(|a| a.flagged).count();
        assert!(flagged > 0 && flagged < 40, "{flagged} accounts flagged");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("snap");
        let header = super::super::snapshot::SnapshotHeader {
            last_id: 3000,
            last_text_hash: 0,
            prompts: d.prompts(),
            allow: 0,
        };
        let keys = super::super::keys::KeyIndex::default();
        super::super::snapshot::save(&path, &header, &d, &keys).unwrap();
        let (_, mut back, _) =
            super::super::snapshot::load(&path, DetectorConfig::default(), |_| Ok(()))
                .unwrap()
                .unwrap();
        // Allow-list marks are not in a snapshot: a start marks the same clusters again.
        for root in d.allowed_roots() {
            back.allow_cluster(root);
        }
        assert_eq!(back.accounts(), d.accounts());
        for id in 3001..=4000 {
            step(&mut back, id, &mut rng);
        }
    }

    #[test]
    fn replaying_builds_the_state_that_observing_built() {
        // A start replays the store without scoring; what analysts and the next verdict see must
        // not depend on whether the prompts went through `observe` or `replay`.
        let (mut live, mut replayed) = (
            Detector::new(DetectorConfig::default()),
            Detector::new(DetectorConfig::default()),
        );
        let mut history: Vec<(u64, String, u64, Vec<u64>)> = Vec::new();
        for i in 1..=120u64 {
            // Campaign accounts chain their prompts, organic ones stay alone; some texts repeat
            // (a pasted prompt), some prompts link to several clusters (merges).
            let account = match i % 4 {
                0 => format!("organic-{}", i % 7),
                _ => format!("camp-{}", i % 9),
            };
            let links: Vec<u64> = match i % 4 {
                0 => vec![],
                _ if i > 10 => vec![i - 1, i - 9],
                _ if i > 1 => vec![i - 1],
                _ => vec![],
            };
            history.push((i, account, 1000 + i % 50, links));
        }
        for (id, account, hash, links) in &history {
            live.observe(obs(*id, account, *hash, links));
            replayed.replay(obs(*id, account, *hash, links));
        }
        assert!(!live.campaigns(0.0).is_empty());
        assert_eq!(live.campaigns(0.0), replayed.campaigns(0.0));
        assert_eq!(live.accounts(), replayed.accounts());
        assert_eq!(
            live.observe(obs(121, "camp-1", 7, &[120])),
            replayed.observe(obs(121, "camp-1", 7, &[120]))
        );
    }

    /// Observes prompts `ids` in order, each of text `id` and linked to the prompt before it
    /// (the first to nothing), sent by `account(id)`.
    fn chain(
        d: &mut Detector,
        ids: std::ops::RangeInclusive<u64>,
        account: impl Fn(u64) -> String,
    ) {
        let first = *ids.start();
        for i in ids {
            let links: Vec<u64> = if i == first { vec![] } else { vec![i - 1] };
            d.observe(obs(i, &account(i), i, &links));
        }
    }

    /// A campaign of 10 accounts × 3 prompts chained one to the next (1..=30), then a one-account
    /// batch job of 200 prompts (31..=230), each linked to its previous prompt and, through a key
    /// someone else once used, to the same campaign prompt 30.
    fn campaign_and_chained_batch_job(config: DetectorConfig) -> Detector {
        let mut d = Detector::new(config);
        chain(&mut d, 1..=30, |i| format!("camp-{}", i % 10));
        for i in 31..=230u64 {
            let links: Vec<u64> = if i == 31 { vec![30] } else { vec![i - 1, 30] };
            d.observe(obs(i, "batch", i, &links));
        }
        d
    }

    #[test]
    fn a_batch_job_chained_to_a_campaign_by_one_look_alike_is_not_flagged() {
        let d = campaign_and_chained_batch_job(DetectorConfig::default());
        let batch = d.account("batch").unwrap();
        assert!(d.campaign(31).unwrap().accounts == 11);
        assert!(!batch.flagged, "{batch:?}");
        assert_eq!(batch.cross_account_prompts, 1);
        assert!(
            d.accounts()
                .iter()
                .filter(|a| a.account_id.starts_with("camp-"))
                .all(|a| a.flagged)
        );
        // The listing says so too: 11 accounts, of them 10 flagged members, and the members
        // first among its top accounts, though the batch job sent the most prompts.
        let listed = d.campaigns(0.0);
        assert_eq!(listed.len(), 1);
        let c = &listed[0];
        assert_eq!((c.accounts, c.flagged_accounts), (11, 10), "{c:?}");
        assert_eq!(c.top_accounts.len(), 10);
        assert!(
            c.top_accounts
                .iter()
                .all(|t| t.account_id.starts_with("camp-")
                    && (t.prompts, t.campaign_prompts) == (3, 3)),
            "{c:?}"
        );
        assert_eq!(d.campaign(31).unwrap(), *c);
        // Under a campaign score no cluster reaches, nothing counts as campaign traffic: the
        // listing ranks by prompts, the batch job first.
        let e = campaign_and_chained_batch_job(DetectorConfig {
            campaign_score: 1.1,
            ..DetectorConfig::default()
        });
        let c = &e.campaigns(0.0)[0];
        assert_eq!(c.flagged_accounts, 0);
        assert_eq!(
            (
                c.top_accounts[0].account_id.as_str(),
                c.top_accounts[0].prompts,
                c.top_accounts[0].campaign_prompts
            ),
            ("batch", 200, 0)
        );
    }

    #[test]
    fn one_look_alike_from_another_account_credits_one_prompt_of_a_batch_job() {
        let mut d = Detector::new(DetectorConfig::default());
        // A campaign: 6 accounts × 6 prompts, each linked to the previous prompt.
        chain(&mut d, 1..=36, |i| format!("camp-{}", i % 6));
        // A one-account batch job of 24 prompts of its own template, each linked to the one
        // before.
        chain(&mut d, 37..=60, |_| "batch".into());
        // A campaign account sends a look-alike of the batch template: its near neighbours are
        // 16 of the batch's prompts, and it also links into the campaign.
        let mut links: Vec<u64> = (45..=60).rev().collect();
        links.push(36);
        d.observe(obs(61, "camp-1", 61, &links));
        let batch = d.account("batch").unwrap();
        assert_eq!(batch.cross_account_prompts, 1, "{batch:?}");
        assert!(!batch.flagged, "{batch:?}");
        // Later campaign prompts each credit one more prompt of the accounts they link to.
        d.observe(obs(62, "camp-2", 62, &[61, 60, 59]));
        let batch = d.account("batch").unwrap();
        assert_eq!(batch.cross_account_prompts, 2, "{batch:?}");
        assert!(!batch.flagged, "{batch:?}");
    }

    #[test]
    fn a_prompt_linked_to_many_prompts_of_one_account_leaves_targets_for_its_next() {
        // Account a sends 10 prompts; account b's 5 prompts each link to all of them at once (as
        // a big batch's lookups do, where every earlier prompt of the template is a match). Two
        // accounts make a weak campaign: count it as one to see the evidence.
        let mut d = Detector::new(DetectorConfig {
            campaign_score: 0.1,
            ..DetectorConfig::default()
        });
        for i in 1..=10u64 {
            let links: Vec<u64> = (1..i).collect();
            d.observe(obs(i, "a", i, &links));
        }
        for i in 11..=15u64 {
            let links: Vec<u64> = (1..i).collect();
            d.observe(obs(i, "b", i, &links));
        }
        let b = d.account("b").unwrap();
        assert_eq!(b.cross_account_prompts, 5, "{b:?}");
        // Each of b's prompts vouched for one of a's.
        assert_eq!(d.account("a").unwrap().cross_account_prompts, 5);
    }

    #[test]
    fn the_same_text_from_several_accounts_is_no_template_evidence() {
        let mut d = Detector::new(DetectorConfig::default());
        // Account k repeats the text account k-1 sent last (a pasted prompt), then sends a new
        // one: one chained cluster of 10 accounts and 11 distinct texts, linked only through
        // verbatim repeats across accounts.
        let mut id = 0;
        for k in 0..10u64 {
            id += 1;
            let links = if id == 1 { vec![] } else { vec![id - 1] };
            d.observe(obs(id, &format!("person-{k}"), 100 + k, &links));
            id += 1;
            d.observe(obs(id, &format!("person-{k}"), 101 + k, &[id - 1]));
        }
        assert!(
            d.campaign(1).unwrap().score > 0.85,
            "looks like a campaign by its numbers"
        );
        assert!(
            d.accounts()
                .iter()
                .all(|a| !a.flagged && a.cross_account_prompts == 0)
        );
    }

    #[test]
    fn the_first_account_of_a_campaign_gets_credit_when_others_follow() {
        let mut d = Detector::new(DetectorConfig::default());
        // "first" sends a burst of 4 linked only to itself; then 8 accounts link to its prompts.
        chain(&mut d, 1..=4, |_| "first".into());
        assert!(!d.account("first").unwrap().flagged);
        for i in 5..=20u64 {
            d.observe(obs(
                i,
                &format!("later-{}", i % 8),
                i,
                &[(i % 4) + 1, i - 1],
            ));
        }
        let first = d.account("first").unwrap();
        assert!(first.flagged, "{first:?}");
        assert_eq!(first.campaign_prompts, 4);
    }

    #[test]
    fn verbatim_popular_prompt_is_not_a_campaign() {
        let mut d = Detector::new(DetectorConfig::default());
        for i in 1..=50u64 {
            let links: Vec<u64> = if i == 1 { vec![] } else { vec![1] };
            d.observe(obs(i, &format!("user-{i}"), 7, &links)); // same text hash
        }
        assert!(d.campaigns(0.01).is_empty());
        assert!(d.accounts().iter().all(|a| !a.flagged));
    }

    #[test]
    fn one_account_batch_job_is_not_a_campaign() {
        let mut d = Detector::new(DetectorConfig::default());
        chain(&mut d, 1..=200, |_| "batch-job".into());
        assert!(!d.account("batch-job").unwrap().flagged);
    }

    #[test]
    fn bridge_merges_clusters_and_old_ids_resolve() {
        let mut d = Detector::new(DetectorConfig::default());
        d.observe(obs(1, "a", 1, &[]));
        d.observe(obs(2, "b", 2, &[1]));
        d.observe(obs(3, "c", 3, &[]));
        d.observe(obs(4, "d", 4, &[3]));
        let v = d.observe(obs(5, "e", 5, &[2, 4]));
        assert_eq!(v.cluster_accounts, 5);
        for id in 1..=5 {
            assert_eq!(d.cluster_of(id), v.cluster_id);
        }
        assert_eq!(d.campaign(3).unwrap().prompts, 5);
    }

    #[test]
    fn account_mostly_organic_stays_low() {
        let mut d = Detector::new(DetectorConfig::default());
        chain(&mut d, 1..=20, |i| format!("bot-{}", i % 10));
        // "mixed" sends one prompt into the campaign and nine unrelated ones.
        d.observe(obs(21, "mixed", 21, &[20]));
        for i in 22..=30u64 {
            d.observe(obs(i, "mixed", i, &[]));
        }
        let m = d.account("mixed").unwrap();
        assert_eq!(m.campaign_prompts, 1);
        assert!(!m.flagged, "{m:?}");
    }

    #[test]
    fn bogus_links_are_ignored() {
        let mut d = Detector::new(DetectorConfig::default());
        let v = d.observe(obs(1, "a", 1, &[1, 5, 99]));
        assert_eq!(v.cluster_id, 1);
    }
}
