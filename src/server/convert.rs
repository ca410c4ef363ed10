//! Conversions between engine types and protobuf messages.

use crate::detect::scoring::{counted, score_text};
use crate::detect::{AccountSummary, Action, Verdict};
use crate::engine::{CampaignView, Hit};
use crate::proto;

/// Protobuf action of a detector action.
pub fn action(a: Action) -> proto::Action {
    match a {
        Action::Allow => proto::Action::Allow,
        Action::Review => proto::Action::Review,
        Action::Block => proto::Action::Block,
    }
}

/// A check response for a verdict.
pub fn check_response(
    request_id: String,
    account_id: String,
    v: &Verdict,
    micros: u64,
) -> proto::CheckResponse {
    proto::CheckResponse {
        request_id,
        prompt_id: v.prompt_id,
        account_id,
        action: action(v.action) as i32,
        score: v.score,
        campaign_id: v.campaign_id,
        neighbours: v.neighbours,
        campaign_score: v.campaign_score,
        cluster_accounts: v.cluster_accounts,
        error: None,
        server_micros: micros,
    }
}

/// A stream item that failed, carrying its status code and message.
pub fn check_error(
    request_id: String,
    account_id: String,
    status: &tonic::Status,
) -> proto::CheckResponse {
    proto::CheckResponse {
        request_id,
        account_id,
        error: Some(proto::ItemError {
            code: super::code_name(status.code()).to_string(),
            message: status.message().to_string(),
        }),
        ..Default::default()
    }
}

/// A search hit.
pub fn hit(h: Hit) -> proto::SearchHit {
    proto::SearchHit {
        prompt_id: h.record.id,
        account_id: h.record.account_id,
        timestamp_ms: h.record.timestamp_ms,
        // A cosine; f32 rounding can take a prompt's similarity to itself just past 1.
        similarity: h.similarity.clamp(-1.0, 1.0),
        prompt: h.record.text,
        cluster_id: h.cluster_id,
        campaign_id: h.campaign_id,
    }
}

/// A campaign.
pub fn campaign(c: CampaignView) -> proto::Campaign {
    let s = c.summary;
    proto::Campaign {
        campaign_id: s.id,
        score: s.score,
        template: c.template,
        accounts: s.accounts,
        prompts: s.prompts,
        distinct_prompts: s.distinct_prompts,
        first_seen_ms: s.first_seen_ms,
        last_seen_ms: s.last_seen_ms,
        top_accounts: s
            .top_accounts
            .into_iter()
            .map(|t| proto::AccountCount {
                account_id: t.account_id,
                prompts: t.prompts,
                campaign_prompts: t.campaign_prompts,
            })
            .collect(),
        examples: c.examples,
        flagged_accounts: s.flagged_accounts,
        templates: c
            .templates
            .into_iter()
            .map(|t| proto::TemplateShare {
                template: t.template,
                samples: t.samples,
            })
            .collect(),
        sampled: c.sampled,
        sampled_alone: c.sampled_alone,
        is_campaign: s.is_campaign,
        allow_listed: c.allow_listed,
        allowed_by: c.allowed_by.unwrap_or(0),
    }
}

/// What an account's reason adds for its prompts in allow-listed clusters (none: nothing).
fn allow_listed(a: &AccountSummary) -> String {
    match a.allow_listed_prompts {
        0 => String::new(),
        1 => "; 1 prompt is in a cluster the allow-list cleared (`allow list`)".to_string(),
        n => format!("; {n} prompts are in clusters the allow-list cleared (`allow list`)"),
    }
}

/// An account with a plain-language reason.
pub fn account(a: AccountSummary) -> proto::Account {
    let reason = if a.campaign_prompts == 0 {
        format!(
            "{} in a multi-account campaign{}",
            match a.prompts {
                1 => "its one prompt is not".to_string(),
                n => format!("none of its {n} prompts is"),
            },
            if a.score > 0.0 {
                format!(
                    " (score {}: some sit in clusters shared with other accounts that score below a campaign)",
                    score_text(a.score, 2)
                )
            } else {
                String::new()
            }
        ) + &allow_listed(&a)
    } else {
        format!(
            "{} of its {} ({:.0}%) {} campaign traffic in {} shared with other accounts ({} linked directly to other accounts' prompts); score {}",
            a.campaign_prompts,
            counted(a.prompts, "prompt"),
            100.0 * a.campaign_prompts as f64 / a.prompts.max(1) as f64,
            if a.campaign_prompts == 1 { "is" } else { "are" },
            counted(a.campaigns.len() as u64, "campaign"),
            a.cross_account_prompts,
            score_text(a.score, 2)
        ) + &a
            .too_few_to_judge
            .map(|min| {
                format!("; not judged yet: an account needs at least {min} campaign prompts")
            })
            .unwrap_or_default()
            + &allow_listed(&a)
    };
    proto::Account {
        account_id: a.account_id,
        flagged: a.flagged,
        score: a.score,
        action: action(a.action) as i32,
        prompts: a.prompts,
        campaign_prompts: a.campaign_prompts,
        campaigns: a.campaigns,
        first_seen_ms: a.first_seen_ms,
        last_seen_ms: a.last_seen_ms,
        reason,
    }
}

/// An allow-list entry.
pub fn allowed(e: crate::detect::allow::AllowEntry) -> proto::AllowedTemplate {
    proto::AllowedTemplate {
        id: e.id,
        template: e.template,
        note: e.note,
        created_ms: e.created_ms,
    }
}

/// A removed allow-list entry, with the campaigns that score again.
pub fn removed(r: crate::engine::Removed) -> proto::RemoveAllowedTemplateResponse {
    proto::RemoveAllowedTemplateResponse {
        id: r.entry.id,
        template: r.entry.template,
        note: r.entry.note,
        created_ms: r.entry.created_ms,
        campaigns_scoring_again: r.scoring_again,
    }
}

fn latency(l: &super::stats::Latency) -> proto::Latency {
    proto::Latency {
        count: l.count,
        p50_us: l.p50_us,
        p90_us: l.p90_us,
        p99_us: l.p99_us,
        max_us: l.max_us,
    }
}

/// `GetStats`' answer: the server's counters, its queue (waiting, capacity) and the engine's
/// census.
pub fn stats(
    r: &super::stats::StatsReading,
    (queued, capacity): (usize, usize),
    census: &crate::engine::Census,
) -> proto::Stats {
    let n32 = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
    proto::Stats {
        uptime_ms: u64::try_from(r.uptime.as_millis()).unwrap_or(u64::MAX),
        allowed: r.allowed,
        reviewed: r.reviewed,
        blocked: r.blocked,
        refused_invalid: r.invalid,
        refused_overload: r.overloaded,
        failed: r.failed,
        cancelled: r.cancelled,
        latency: Some(latency(&r.latency)),
        latency_last_minute: Some(latency(&r.latency_last_minute)),
        queued: n32(queued),
        queue_capacity: n32(capacity),
        prompts: census.prompts,
        accounts: census.accounts,
        index_segments: n32(census.index.0),
        index_vectors: census.index.1,
        part_index_segments: n32(census.part_index.0),
        part_index_vectors: census.part_index.1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::detect::Action;

    #[test]
    fn the_reason_says_when_an_account_has_too_few_campaign_prompts_to_be_judged() {
        let summary = AccountSummary {
            account_id: "newcomer".into(),
            score: 0.78,
            action: Action::Allow,
            flagged: false,
            prompts: 1,
            campaign_prompts: 1,
            too_few_to_judge: Some(2),
            cross_account_prompts: 1,
            campaigns: vec![7],
            allow_listed_prompts: 0,
            first_seen_ms: 0,
            last_seen_ms: 0,
        };
        let reason = account(summary.clone()).reason;
        assert!(
            reason.starts_with("1 of its 1 prompt (100%) is campaign traffic in 1 campaign shared"),
            "{reason}"
        );
        assert!(
            reason.ends_with(
                "score 0.78; not judged yet: an account needs at least 2 campaign prompts"
            ),
            "{reason}"
        );
        let judged = AccountSummary {
            too_few_to_judge: None,
            campaign_prompts: 3,
            prompts: 3,
            ..summary
        };
        let reason = account(judged.clone()).reason;
        assert!(reason.ends_with("score 0.78"), "{reason}");
        assert!(
            reason
                .starts_with("3 of its 3 prompts (100%) are campaign traffic in 1 campaign shared"),
            "{reason}"
        );

        // No campaign prompts: a score above 0 says where it comes from, a 0 says nothing.
        let below = AccountSummary {
            campaign_prompts: 0,
            campaigns: vec![],
            score: 0.16,
            ..judged
        };
        assert_eq!(
            account(below.clone()).reason,
            "none of its 3 prompts is in a multi-account campaign (score 0.16: some sit in clusters shared with other accounts that score below a campaign)"
        );
        let clean = AccountSummary {
            score: 0.0,
            ..below
        };
        assert_eq!(
            account(clean.clone()).reason,
            "none of its 3 prompts is in a multi-account campaign"
        );
        let one = AccountSummary {
            prompts: 1,
            ..clean.clone()
        };
        assert_eq!(
            account(one).reason,
            "its one prompt is not in a multi-account campaign"
        );
        // A cleared campaign's member says why it is no longer flagged.
        let cleared = AccountSummary {
            allow_listed_prompts: 3,
            ..clean
        };
        assert_eq!(
            account(cleared).reason,
            "none of its 3 prompts is in a multi-account campaign; 3 prompts are in clusters the allow-list cleared (`allow list`)"
        );
    }
}
