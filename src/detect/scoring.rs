//! Campaign and account scores. Kept apart from the cluster bookkeeping so that the formulas are
//! easy to read and to test.
//!
//! - Campaign score = account factor × diversity factor.
//!   - account factor = 1 − exp(−(A − 1) / (C − 1)) for A distinct accounts and C =
//!     `campaign_accounts`: 0 for one account, ≈ 0.63 at C, → 1 as A grows.
//!   - diversity factor = clamp((D/N − 0.1) / 0.3, 0, 1) for D distinct texts among N prompts:
//!     a popular prompt sent verbatim by hundreds of accounts has D/N ≈ 0 and scores 0; a harvester
//!     that varies its slots has D/N ≈ 1.
//!   - repeat factor = clamp((N/A − 1) / (R − 1), 0, 1) for R = `campaign_prompts_per_account`: a
//!     harvester sends its template again and again from each account; a template that lives in
//!     organic data (a recipe-request wording, an "act as" prompt) reaches many users about once each.
//! - Account score = Σ over the account's clusters of (its prompts there × campaign score), divided
//!   by the account's prompts: the share of its traffic that sits in campaigns, weighted by how
//!   sure each campaign is. An account that mostly sends unrelated prompts stays low even if a few
//!   of them land in a campaign cluster.

/// `score` with `decimals` digits, cut rather than rounded: a score just under a threshold
/// (0.49999 under review's 0.5) must not read as the threshold beside a verdict below it.
pub fn score_text(score: f32, decimals: usize) -> String {
    let scale = 10f64.powi(decimals as i32);
    // f32 to f64 adds digits (0.5f32 is exact, 0.7f32 is 0.69999998…): go through f32's text.
    let exact: f64 = score.to_string().parse().unwrap_or(0.0);
    format!("{:.*}", decimals, (exact * scale).floor() / scale)
}

/// `n` and its noun, singular for one: `1 account`, `3 accounts` (nouns whose plural adds an `s`).
pub fn counted(n: impl Into<u64>, noun: &str) -> String {
    match n.into() {
        1 => format!("1 {noun}"),
        n => format!("{n} {noun}s"),
    }
}

/// Campaign score of a cluster with `accounts` distinct accounts, `prompts` members and
/// `distinct_texts` distinct normalised texts.
pub fn campaign_score(
    accounts: u32,
    prompts: u64,
    distinct_texts: u64,
    campaign_accounts: u32,
    per_account: f32,
) -> f32 {
    if accounts <= 1 || prompts == 0 {
        return 0.0;
    }
    let c = campaign_accounts.max(2) as f32;
    let account_factor = 1.0 - (-((accounts - 1) as f32) / (c - 1.0)).exp();
    let ratio = distinct_texts as f32 / prompts as f32;
    let diversity = ((ratio - 0.1) / 0.3).clamp(0.0, 1.0);
    let repeat = if per_account <= 1.0 {
        1.0
    } else {
        ((prompts as f32 / accounts as f32 - 1.0) / (per_account - 1.0)).clamp(0.0, 1.0)
    };
    account_factor * diversity * repeat
}

/// Account score from its per-cluster prompt counts and those clusters' campaign scores.
///
/// The same whatever order the clusters come in: callers gather them from hash maps, whose order
/// differs from one process to the next, and a float sum depends on its order, so the terms are
/// summed in a fixed order. Otherwise a restart could change a score in its last bits, and an
/// account sitting at a threshold could change its verdict.
pub fn account_score(prompts: u64, per_cluster: impl IntoIterator<Item = (u64, f32)>) -> f32 {
    if prompts == 0 {
        return 0.0;
    }
    let mut terms: Vec<(u64, f32)> = per_cluster.into_iter().collect();
    terms.sort_unstable_by(|a, b| a.0.cmp(&b.0).then(a.1.total_cmp(&b.1)));
    let weighted: f32 = terms.iter().map(|&(n, s)| n as f32 * s).sum();
    (weighted / prompts as f32).clamp(0.0, 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_account_is_never_a_campaign() {
        assert_eq!(campaign_score(1, 10_000, 10_000, 5, 1.5), 0.0);
    }

    #[test]
    fn grows_with_accounts() {
        let s2 = campaign_score(2, 10, 10, 5, 1.5);
        let s5 = campaign_score(5, 10, 10, 5, 1.5);
        let s50 = campaign_score(50, 100, 100, 5, 1.5);
        assert!(s2 < s5 && s5 < s50, "{s2} {s5} {s50}");
        assert!((s5 - (1.0 - (-1.0f32).exp())).abs() < 1e-6);
        assert!(s50 > 0.99);
    }

    #[test]
    fn verbatim_popular_prompt_scores_zero() {
        // 300 accounts sending the same 2 texts.
        assert_eq!(campaign_score(300, 300, 2, 5, 1.5), 0.0);
    }

    #[test]
    fn a_template_each_account_sends_once_is_not_a_campaign() {
        // 40 users, 42 prompts of one organic template: about once per user.
        assert!(campaign_score(40, 42, 42, 5, 1.5) < 0.15);
        assert!(campaign_score(40, 80, 80, 5, 1.5) > 0.99);
        assert!(
            campaign_score(40, 42, 42, 5, 1.0) > 0.99,
            "1.0 turns the factor off"
        );
    }

    #[test]
    fn account_score_is_weighted_share() {
        assert_eq!(account_score(0, []), 0.0);
        assert!((account_score(10, [(9, 1.0), (1, 0.0)]) - 0.9).abs() < 1e-6);
        assert!((account_score(10, [(2, 1.0)]) - 0.2).abs() < 1e-6);
    }

    #[test]
    fn account_score_does_not_depend_on_the_order_of_its_clusters() {
        // One big term and many tiny ones: a float sum of these depends on its order.
        let mut terms = vec![(1u64, 1.0f32)];
        terms.extend((0..1000).map(|i| (1u64, 3e-8 * (1.0 + i as f32 / 1000.0))));
        let forward = account_score(2000, terms.iter().copied());
        terms.reverse();
        let backward = account_score(2000, terms.iter().copied());
        assert_eq!(
            forward.to_bits(),
            backward.to_bits(),
            "{forward} {backward}"
        );
    }

    #[test]
    fn scores_are_shown_cut_not_rounded() {
        assert_eq!(super::score_text(0.499_996, 3), "0.499");
        assert_eq!(super::score_text(0.5, 3), "0.500");
        assert_eq!(super::score_text(0.7, 2), "0.70");
        assert_eq!(super::score_text(1.0, 2), "1.00");
        assert_eq!(super::score_text(0.0, 3), "0.000");
    }
}
