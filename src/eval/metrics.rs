//! Account-level detection metrics over labelled traffic (DESIGN.md, "Detection quality: how it
//! is measured"): precision, recall and F1 of `flagged`, the false-positive rate among organic
//! accounts, campaign recall (a campaign is found when at least half its accounts are flagged)
//! and, online, the median number of its own prompts an attacking account sends before its
//! verdict first turns `review` or `block`.
//!
//! Pure arithmetic over [`AccountOutcome`]s: it never runs a detector itself. Ratios whose
//! denominator is zero are reported as 0.0 (no flagged accounts → precision 0; no attackers →
//! recall 0; no organic accounts → FPR 0; no campaigns → campaign recall 0).

use std::collections::BTreeMap;

use serde_json::{Value, json};

/// The label of accounts that belong to no campaign.
pub const ORGANIC: &str = "organic";

/// What a detector concluded about one account, next to the account's true label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountOutcome {
    /// The account.
    pub account_id: String,
    /// `"organic"` or the name of the campaign the account belongs to.
    pub label: String,
    /// Whether the detector flagged the account after the whole stream.
    pub flagged: bool,
    /// 1-based index among the account's own prompts at which its verdict first turned
    /// `review`/`block` while it was sending; `None` if that never happened online.
    pub first_flag_prompt: Option<usize>,
}

impl AccountOutcome {
    /// Whether the account's true label is a campaign.
    pub fn is_attacker(&self) -> bool {
        self.label != ORGANIC
    }
}

/// Account-level metrics of one detector on one labelled stream.
#[derive(Debug, Clone, PartialEq)]
pub struct Metrics {
    /// Accounts seen.
    pub accounts: usize,
    /// Accounts labelled organic.
    pub organic_accounts: usize,
    /// Accounts labelled with a campaign.
    pub attacker_accounts: usize,
    /// Attacking accounts flagged.
    pub tp: usize,
    /// Organic accounts flagged.
    pub fp: usize,
    /// Attacking accounts not flagged.
    pub fn_: usize,
    /// Organic accounts not flagged.
    pub tn: usize,
    /// tp / (tp + fp).
    pub precision: f64,
    /// tp / (tp + fn).
    pub recall: f64,
    /// Harmonic mean of precision and recall.
    pub f1: f64,
    /// fp / organic accounts.
    pub organic_fpr: f64,
    /// Campaigns with at least half their accounts flagged.
    pub campaigns_found: usize,
    /// Share of campaigns found.
    pub campaign_recall: f64,
    /// Per campaign, sorted by name: (name, accounts, flagged accounts, recall).
    pub per_campaign: Vec<(String, usize, usize, f64)>,
    /// Median of `first_flag_prompt` over flagged attacking accounts that have one.
    pub median_prompts_to_flag: Option<f64>,
}

/// `num / den`, or 0.0 when `den` is 0.
fn ratio(num: usize, den: usize) -> f64 {
    if den == 0 {
        0.0
    } else {
        num as f64 / den as f64
    }
}

/// Median of a non-empty sorted slice (mean of the two middle values for an even count).
fn median(sorted: &[usize]) -> Option<f64> {
    let n = sorted.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(sorted[n / 2] as f64),
        _ => Some((sorted[n / 2 - 1] + sorted[n / 2]) as f64 / 2.0),
    }
}

/// Computes the metrics of a set of account outcomes (one entry per account).
pub fn compute(outcomes: &[AccountOutcome]) -> Metrics {
    let (mut tp, mut fp, mut fn_, mut tn) = (0, 0, 0, 0);
    let mut campaigns: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
    let mut to_flag = Vec::new();
    for o in outcomes {
        match (o.is_attacker(), o.flagged) {
            (true, true) => tp += 1,
            (true, false) => fn_ += 1,
            (false, true) => fp += 1,
            (false, false) => tn += 1,
        }
        if o.is_attacker() {
            let entry = campaigns.entry(o.label.as_str()).or_default();
            entry.0 += 1;
            if o.flagged {
                entry.1 += 1;
                to_flag.extend(o.first_flag_prompt);
            }
        }
    }
    to_flag.sort_unstable();
    let precision = ratio(tp, tp + fp);
    let recall = ratio(tp, tp + fn_);
    let f1 = if precision + recall > 0.0 {
        2.0 * precision * recall / (precision + recall)
    } else {
        0.0
    };
    let per_campaign: Vec<_> = campaigns
        .iter()
        .map(|(name, &(n, f))| (name.to_string(), n, f, ratio(f, n)))
        .collect();
    let campaigns_found = per_campaign
        .iter()
        .filter(|(_, n, f, _)| 2 * f >= *n)
        .count();
    Metrics {
        accounts: outcomes.len(),
        organic_accounts: fp + tn,
        attacker_accounts: tp + fn_,
        tp,
        fp,
        fn_,
        tn,
        precision,
        recall,
        f1,
        organic_fpr: ratio(fp, fp + tn),
        campaigns_found,
        campaign_recall: ratio(campaigns_found, per_campaign.len()),
        per_campaign,
        median_prompts_to_flag: median(&to_flag),
    }
}

impl Metrics {
    /// A compact human-readable block: totals, the headline ratios, then one line per campaign.
    pub fn report(&self, title: &str) -> String {
        let median = self
            .median_prompts_to_flag
            .map_or_else(|| "n/a".to_string(), |m| format!("{m:.1}"));
        let mut out = format!(
            "== {title} ==\n\
             accounts {} (organic {}, attacking {})\n\
             tp {}  fp {}  fn {}  tn {}\n\
             precision {:.3}  recall {:.3}  f1 {:.3}  organic FPR {:.4}\n\
             campaigns found {}/{} (campaign recall {:.3})  median prompts to flag {median}\n",
            self.accounts,
            self.organic_accounts,
            self.attacker_accounts,
            self.tp,
            self.fp,
            self.fn_,
            self.tn,
            self.precision,
            self.recall,
            self.f1,
            self.organic_fpr,
            self.campaigns_found,
            self.per_campaign.len(),
            self.campaign_recall,
        );
        let width = self
            .per_campaign
            .iter()
            .map(|c| c.0.len())
            .max()
            .unwrap_or(0);
        for (name, n, f, r) in &self.per_campaign {
            out.push_str(&format!(
                "  {name:<width$}  accounts {n:>5}  flagged {f:>5}  recall {r:.3}\n"
            ));
        }
        out
    }

    /// All fields as a JSON object (`per_campaign` as a list of objects).
    pub fn to_json(&self) -> Value {
        let per_campaign: Vec<Value> = self
            .per_campaign
            .iter()
            .map(|(name, n, f, r)| json!({"name": name, "accounts": n, "flagged": f, "recall": r}))
            .collect();
        json!({
            "accounts": self.accounts,
            "organic_accounts": self.organic_accounts,
            "attacker_accounts": self.attacker_accounts,
            "tp": self.tp,
            "fp": self.fp,
            "fn": self.fn_,
            "tn": self.tn,
            "precision": self.precision,
            "recall": self.recall,
            "f1": self.f1,
            "organic_fpr": self.organic_fpr,
            "campaigns_found": self.campaigns_found,
            "campaign_recall": self.campaign_recall,
            "per_campaign": per_campaign,
            "median_prompts_to_flag": self.median_prompts_to_flag,
        })
    }
}

/// How the campaigns the detector lists line up with the labels. Account-level metrics do not
/// show it, but an analyst reads campaigns: one that merges several labelled campaigns shows no
/// useful template (and cannot be allow-listed), and an organic account credited in a campaign is
/// a prompt or two away from being flagged.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CampaignMix {
    /// Campaigns that credit at least one account.
    pub listed: usize,
    /// Of those, campaigns whose accounts come from more than one labelled campaign.
    pub merged: usize,
    /// The campaign with the most accounts: its accounts, the labelled campaigns among them and
    /// its organic accounts.
    pub largest: (usize, usize, usize),
    /// Organic accounts credited in any campaign, flagged or not.
    pub organic_credited: usize,
}

/// [`CampaignMix`] of `members`: each account's label with a campaign it is credited in, one
/// pair per (account, campaign).
pub fn campaign_mix<'a>(members: impl IntoIterator<Item = (&'a str, &'a str, u64)>) -> CampaignMix {
    // Per campaign: its organic accounts and its accounts per labelled campaign.
    let mut by: BTreeMap<u64, (usize, BTreeMap<&str, usize>)> = BTreeMap::new();
    let mut organic = std::collections::BTreeSet::new();
    for (account, label, campaign) in members {
        let entry = by.entry(campaign).or_default();
        if label == ORGANIC {
            entry.0 += 1;
            organic.insert(account);
        } else {
            *entry.1.entry(label).or_default() += 1;
        }
    }
    let size = |c: &(usize, BTreeMap<&str, usize>)| c.0 + c.1.values().sum::<usize>();
    let largest = by
        .values()
        .max_by_key(|c| size(c))
        .map_or((0, 0, 0), |c| (size(c), c.1.len(), c.0));
    CampaignMix {
        listed: by.len(),
        merged: by.values().filter(|c| c.1.len() > 1).count(),
        largest,
        organic_credited: organic.len(),
    }
}

impl CampaignMix {
    /// One line for the report.
    pub fn report(&self) -> String {
        let (n, labelled, organic) = self.largest;
        format!(
            "campaigns listed {}, {} of them merging labelled campaigns; the largest: {n} accounts \
             ({labelled} labelled campaigns, {organic} organic); organic accounts credited in a \
             campaign {}",
            self.listed, self.merged, self.organic_credited
        )
    }

    /// All fields as a JSON object.
    pub fn to_json(&self) -> Value {
        let (accounts, labelled, organic) = self.largest;
        json!({
            "listed": self.listed,
            "merged": self.merged,
            "largest": {"accounts": accounts, "labelled_campaigns": labelled, "organic": organic},
            "organic_credited": self.organic_credited,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn o(id: &str, label: &str, flagged: bool, first: Option<usize>) -> AccountOutcome {
        AccountOutcome {
            account_id: id.into(),
            label: label.into(),
            flagged,
            first_flag_prompt: first,
        }
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn hand_computed_example() {
        // camp-a: 4 accounts, 3 flagged (found); camp-b: 3 accounts, 1 flagged (not found);
        // organic: 5 accounts, 1 flagged.
        let outcomes = vec![
            o("a1", "camp-a", true, Some(3)),
            o("a2", "camp-a", true, Some(5)),
            o("a3", "camp-a", true, None), // flagged only after it stopped sending
            o("a4", "camp-a", false, Some(2)), // flagged online, cleared by the end
            o("b1", "camp-b", true, Some(10)),
            o("b2", "camp-b", false, None),
            o("b3", "camp-b", false, None),
            o("o1", ORGANIC, true, Some(1)),
            o("o2", ORGANIC, false, None),
            o("o3", ORGANIC, false, None),
            o("o4", ORGANIC, false, None),
            o("o5", ORGANIC, false, None),
        ];
        let m = compute(&outcomes);
        assert_eq!(
            (m.accounts, m.organic_accounts, m.attacker_accounts),
            (12, 5, 7)
        );
        assert_eq!((m.tp, m.fp, m.fn_, m.tn), (4, 1, 3, 4));
        assert!(close(m.precision, 4.0 / 5.0));
        assert!(close(m.recall, 4.0 / 7.0));
        // f1 = 2·0.8·(4/7) / (0.8 + 4/7) = 2/3
        assert!(close(m.f1, 2.0 / 3.0));
        assert!(close(m.organic_fpr, 0.2));
        assert_eq!(m.campaigns_found, 1);
        assert!(close(m.campaign_recall, 0.5));
        assert_eq!(m.per_campaign.len(), 2);
        assert_eq!(
            (
                m.per_campaign[0].0.as_str(),
                m.per_campaign[0].1,
                m.per_campaign[0].2
            ),
            ("camp-a", 4, 3)
        );
        assert!(close(m.per_campaign[0].3, 0.75));
        assert_eq!(
            (
                m.per_campaign[1].0.as_str(),
                m.per_campaign[1].1,
                m.per_campaign[1].2
            ),
            ("camp-b", 3, 1)
        );
        // flagged attackers with an online flag: 3, 5, 10 → median 5
        assert_eq!(m.median_prompts_to_flag, Some(5.0));
    }

    #[test]
    fn half_the_accounts_is_enough_and_even_medians_average() {
        let outcomes = vec![
            o("a1", "c", true, Some(2)),
            o("a2", "c", false, None),
            o("b1", "d", true, Some(7)),
            o("b2", "d", true, Some(4)),
            o("b3", "d", true, Some(1)),
        ];
        let m = compute(&outcomes);
        assert_eq!(m.campaigns_found, 2);
        assert!(close(m.campaign_recall, 1.0));
        // 1, 2, 4, 7 → (2 + 4) / 2
        assert_eq!(m.median_prompts_to_flag, Some(3.0));
        assert!(close(m.precision, 1.0));
        assert!(close(m.organic_fpr, 0.0));
    }

    #[test]
    fn campaign_mix_counts_merged_campaigns_and_organic_accounts() {
        let members = [
            ("a1", "camp-a", 1),
            ("a2", "camp-a", 1),
            ("b1", "camp-b", 1),
            ("o1", ORGANIC, 1),
            ("o1", ORGANIC, 2),
            ("a3", "camp-a", 2),
            ("o2", ORGANIC, 3),
            ("b2", "camp-b", 4),
        ];
        let m = campaign_mix(members);
        assert_eq!(
            m,
            CampaignMix {
                listed: 4,
                merged: 1,
                largest: (4, 2, 1),
                organic_credited: 2,
            }
        );
        assert!(
            m.report().contains("campaigns listed 4, 1 of them merging"),
            "{}",
            m.report()
        );
        assert_eq!(m.to_json()["largest"]["accounts"], 4);
        assert_eq!(campaign_mix([]), CampaignMix::default());
    }

    #[test]
    fn zero_divisions_are_zero() {
        let m = compute(&[]);
        assert_eq!(m.accounts, 0);
        assert_eq!(
            (
                m.precision,
                m.recall,
                m.f1,
                m.organic_fpr,
                m.campaign_recall
            ),
            (0.0, 0.0, 0.0, 0.0, 0.0)
        );
        assert_eq!(m.median_prompts_to_flag, None);
        assert!(m.per_campaign.is_empty());

        // nothing flagged: precision and f1 are 0, not NaN
        let m = compute(&[o("o", ORGANIC, false, None), o("a", "c", false, None)]);
        assert_eq!((m.precision, m.recall, m.f1), (0.0, 0.0, 0.0));
        assert_eq!(m.campaigns_found, 0);

        // only organic accounts, all flagged
        let m = compute(&[o("o", ORGANIC, true, Some(1))]);
        assert_eq!((m.tp, m.fp), (0, 1));
        assert_eq!((m.precision, m.recall, m.organic_fpr), (0.0, 0.0, 1.0));
        assert_eq!(m.median_prompts_to_flag, None);
    }

    #[test]
    fn report_and_json_carry_the_numbers() {
        let m = compute(&[
            o("a", "camp-x", true, Some(4)),
            o("o", ORGANIC, false, None),
        ]);
        let r = m.report("exact hash");
        assert!(r.starts_with("== exact hash ==\n"));
        assert!(r.contains("precision 1.000  recall 1.000  f1 1.000"));
        assert!(r.contains("camp-x"));
        assert!(r.contains("median prompts to flag 4.0"));
        let j = m.to_json();
        assert_eq!(j["tp"], 1);
        assert_eq!(j["fn"], 0);
        assert_eq!(j["per_campaign"][0]["name"], "camp-x");
        assert_eq!(j["median_prompts_to_flag"], 4.0);
        assert!(compute(&[]).to_json()["median_prompts_to_flag"].is_null());
    }
}
