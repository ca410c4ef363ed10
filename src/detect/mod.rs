//! Campaign detection: turns each prompt's links to similar earlier prompts into clusters, and
//! clusters into campaign and account scores. In-memory state, restored on start from the
//! [`snapshot`] a checkpoint wrote and caught up by replaying the prompts' links stored since (see
//! `store`); it never touches the index itself.
//!
//! The signal is a cluster of similar prompts that *many distinct accounts* share, whose texts
//! vary (harvesters vary slots; popular one-liners repeat verbatim), and that makes up most of an
//! account's traffic. See [`scoring`] for the formulas.

pub mod allow;
mod clusters;
pub mod keys;
pub mod scoring;
pub mod snapshot;
pub mod template;

pub use clusters::{
    AccountSummary, CampaignSummary, Detector, EXAMPLES, Observation, TopAccount, examples,
};

/// What the gateway should do with an account's traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Action {
    /// Nothing suspicious.
    Allow,
    /// Suspicious: worth an analyst's look.
    Review,
    /// Confidently part of a campaign.
    Block,
}

impl Action {
    /// The lower-case name used in JSONL (`allow`, `review`, `block`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Allow => "allow",
            Self::Review => "review",
            Self::Block => "block",
        }
    }
}

/// Detector thresholds. The defaults are meant to generalise, not to fit one data set.
#[derive(Debug, Clone)]
pub struct DetectorConfig {
    /// Two prompts are linked when the cosine of their embeddings is at least this.
    pub similarity_threshold: f32,
    /// Neighbours looked up per prompt (and per part).
    pub neighbours_k: usize,
    /// Two prompt parts (sentences, lines) match when the cosine of their embeddings is at least
    /// this; paraphrases of one instruction sit around 0.7–0.9.
    pub part_similarity: f32,
    /// Matched parts two prompts must share to be linked by their parts.
    pub part_matches: u32,
    /// Distinct accounts at which a cluster's account factor reaches 1 − 1/e (≈ 0.63).
    pub campaign_accounts: u32,
    /// Prompts per account at which a cluster's repeat factor reaches 1 (see `scoring`); 1.0 turns
    /// the factor off.
    pub campaign_prompts_per_account: f32,
    /// Account score at or above which the action is `review` (and the account is flagged).
    pub review_score: f32,
    /// Account score at or above which the action is `block`.
    pub block_score: f32,
    /// A cluster counts as a campaign at or above this campaign score.
    pub campaign_score: f32,
    /// Prompts an account must have in campaigns before it is flagged at all.
    pub min_campaign_prompts: u32,
    /// Share of an account's prompts in a cluster that must link directly to other accounts'
    /// prompts for all of them to count as campaign traffic; below it only those linked ones count.
    pub min_cross_account_share: f32,
}

impl Default for DetectorConfig {
    fn default() -> Self {
        Self {
            similarity_threshold: 0.85,
            neighbours_k: 16,
            part_similarity: 0.8,
            part_matches: 2,
            campaign_accounts: 5,
            campaign_prompts_per_account: 1.5,
            review_score: 0.5,
            block_score: 0.8,
            campaign_score: 0.5,
            min_campaign_prompts: 2,
            min_cross_account_share: 0.25,
        }
    }
}

impl DetectorConfig {
    /// The action for an account score.
    pub fn action(&self, score: f32) -> Action {
        if score >= self.block_score {
            Action::Block
        } else if score >= self.review_score {
            Action::Review
        } else {
            Action::Allow
        }
    }
}

/// The detector's answer for one prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    /// Id the prompt was stored under.
    pub prompt_id: u64,
    /// Root id of the cluster the prompt is in now.
    pub cluster_id: u64,
    /// The cluster's id when it scores as a campaign.
    pub campaign_id: Option<u64>,
    /// The account's action after this prompt.
    pub action: Action,
    /// The account's score after this prompt, in [0, 1].
    pub score: f32,
    /// The cluster's campaign score, in [0, 1].
    pub campaign_score: f32,
    /// Distinct accounts in the cluster.
    pub cluster_accounts: u32,
    /// Earlier prompts it was linked to: embedding cosine at or above the threshold, or the
    /// same template key (see [`keys`]).
    pub neighbours: u32,
}
