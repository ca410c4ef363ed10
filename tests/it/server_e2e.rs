//! End to end through a real gRPC server on 127.0.0.1:0 with the real model and store.

use prompt_radar::proto::{self, radar_client::RadarClient, search_request::Query};
use tonic::Code;
use tonic::transport::Channel;

use crate::common::{ORGANIC, TestServer, all_accounts, config, nearest, templated};

fn req(account: &str, prompt: &str) -> proto::CheckRequest {
    proto::CheckRequest {
        account_id: account.into(),
        prompt: prompt.into(),
        timestamp_ms: 1_750_000_000_000,
        request_id: String::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn campaign_across_accounts_is_found_and_organic_traffic_is_not() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(config(dir.path())).await;
    let mut c = server.client().await;

    // An organic user first: nothing to match, so allow.
    for p in ORGANIC {
        let v = c.check(req("organic-1", p)).await.unwrap().into_inner();
        assert_eq!(v.action(), proto::Action::Allow, "{p}");
        assert_eq!(v.campaign_id, None);
    }
    // Twelve accounts, one template, a different slot each time.
    let mut last = None;
    for i in 0..24 {
        let v = c
            .check(req(&format!("harvester-{}", i % 12), &templated(i)))
            .await
            .unwrap()
            .into_inner();
        assert!(v.prompt_id > 0);
        last = Some(v);
    }
    let last = last.unwrap();
    assert!(last.neighbours > 0, "{last:?}");
    assert_eq!(last.cluster_accounts, 12, "{last:?}");
    let campaign_id = last
        .campaign_id
        .expect("the template cluster is a campaign");
    assert_eq!(last.action(), proto::Action::Block, "{last:?}");

    let list = c
        .list_campaigns(proto::ListCampaignsRequest {
            top: 10,
            min_score: 0.0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.campaigns.len(), 1, "{list:?}");
    let camp = &list.campaigns[0];
    assert_eq!(
        (camp.campaign_id, camp.accounts, camp.prompts),
        (campaign_id, 12, 24)
    );
    assert!(
        camp.template
            .starts_with("You are an expert competitive programmer."),
        "{}",
        camp.template
    );
    assert!(camp.template.contains("<*>"), "{}", camp.template);
    assert!(!camp.examples.is_empty());
    assert!(camp.is_campaign);
    // One template, followed by every sampled prompt.
    assert_eq!((camp.sampled, camp.sampled_alone), (24, 0), "{camp:?}");
    assert_eq!(camp.templates.len(), 1, "{:?}", camp.templates);
    assert_eq!(camp.templates[0].samples, 24);
    assert!(
        camp.templates[0]
            .template
            .starts_with("You are an expert competitive programmer."),
        "{:?}",
        camp.templates
    );

    // Any member prompt id resolves to the campaign.
    let got = c
        .get_campaign(proto::GetCampaignRequest {
            campaign_id: last.prompt_id,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.campaign_id, campaign_id);
    let err = c
        .get_campaign(proto::GetCampaignRequest {
            campaign_id: 999_999,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);

    let flagged = c
        .list_accounts(proto::ListAccountsRequest {
            flagged_only: true,
            limit: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let mut names: Vec<_> = flagged
        .accounts
        .iter()
        .map(|a| a.account_id.clone())
        .collect();
    names.sort();
    let mut want: Vec<_> = (0..12).map(|i| format!("harvester-{i}")).collect();
    want.sort();
    assert_eq!(names, want);
    // StreamAccounts sends the same listing, in the same order, an account a message.
    for flagged_only in [true, false] {
        let request = proto::ListAccountsRequest {
            flagged_only,
            limit: 0,
        };
        let listed = c
            .list_accounts(request)
            .await
            .unwrap()
            .into_inner()
            .accounts;
        let mut stream = c.stream_accounts(request).await.unwrap().into_inner();
        let mut streamed = Vec::new();
        while let Some(a) = stream.message().await.unwrap() {
            streamed.push(a);
        }
        assert_eq!(streamed, listed, "flagged_only {flagged_only}");
        assert_eq!(listed.len(), if flagged_only { 12 } else { 13 });
    }
    let organic = account(&mut c, "organic-1").await;
    assert!(!organic.flagged && organic.prompts == 8, "{organic:?}");
    let h = account(&mut c, "harvester-3").await;
    assert!(
        h.flagged && h.campaigns == vec![campaign_id] && h.reason.contains("campaign"),
        "{h:?}"
    );
    let err = c
        .get_account(proto::GetAccountRequest {
            account_id: "nobody".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_campaign_rotating_two_templates_lists_each() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(config(dir.path())).await;
    let mut c = server.client().await;
    // Two templates that open alike (their first words are one template key, so the cluster
    // holds both) and then ask for different work.
    const OPENING: &str =
        "You are a senior engineer at a large software company, working on our internal tools.";
    const SNIPPETS: [&str; 8] = [
        "def add(a, b): return a - b",
        "for i in range(len(xs)): print(xs[i+1])",
        "password = input(); os.system('login ' + password)",
        "while True: data.append(read())",
        "if x = 3: return None",
        "def mean(xs): return sum(xs) / len(xs)",
        "cursor.execute('SELECT * FROM users WHERE id = ' + uid)",
        "with open(path) as f: text = f.read().decode()",
    ];
    let prompt = |i: usize| {
        if i.is_multiple_of(2) {
            format!(
                "{OPENING} Think step by step, explain your reasoning in detail, then give a complete, \
                 well-commented Python solution with unit tests and complexity analysis. Task: {}",
                SNIPPETS[i / 2 % 8]
            )
        } else {
            format!(
                "{OPENING} Review the code below for bugs, security holes and style problems, list every \
                 finding with a suggested fix, and rate the code from one to ten. Code: {}",
                SNIPPETS[i / 2 % 8]
            )
        }
    };
    for i in 0..40 {
        c.check(req(&format!("rotator-{}", i % 10), &prompt(i)))
            .await
            .unwrap();
    }
    let list = every_campaign(&mut c).await;
    assert_eq!(list.len(), 1, "{list:?}");
    let camp = &list[0];
    assert_eq!((camp.accounts, camp.prompts), (10, 40), "{camp:?}");
    // The words both share make the one template; each template is listed whole.
    assert!(
        camp.template.starts_with(OPENING) && !camp.template.contains("step by step"),
        "{}",
        camp.template
    );
    assert_eq!((camp.sampled, camp.sampled_alone), (32, 0), "{camp:?}");
    let mut found: Vec<(&str, u32)> = camp
        .templates
        .iter()
        .map(|t| (t.template.as_str(), t.samples))
        .collect();
    found.sort();
    assert_eq!(found.len(), 2, "{found:?}");
    assert_eq!(found[0].1 + found[1].1, 32, "{found:?}");
    assert!(
        found[0].0.starts_with(OPENING)
            && found[0].0.contains("Review the code below for bugs")
            && found[0].0.ends_with("Code: <*>"),
        "{found:?}"
    );
    assert!(
        found[1].0.starts_with(OPENING)
            && found[1].0.contains("Think step by step")
            && found[1].0.ends_with("Task: <*>"),
        "{found:?}"
    );
    // GetCampaign says the same.
    let got = c
        .get_campaign(proto::GetCampaignRequest {
            campaign_id: camp.campaign_id,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.templates, camp.templates);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_of_two_templates_is_not_allow_listed_by_its_id_and_says_why() {
    use proto::allow_template_request::Source;
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(config(dir.path())).await;
    let mut c = server.client().await;
    const SUMMARY: &str = "Summarise the following customer review in exactly three bullet points for our product team:";
    const TRANSLATION: &str = "Translate this support ticket into formal German and keep every product name unchanged, please:";
    const SLOTS: [&str; 8] = [
        "the battery lasts two days and the screen is bright",
        "shipping took three weeks and the box was damaged",
        "the app crashes whenever I open the settings page",
        "great value, although the manual is hard to follow",
        "the headphones stopped charging after one month",
        "customer service answered within an hour, very helpful",
        "the colour in the photos does not match the real thing",
        "installation was easy but the fan is loud at night",
    ];
    // Two templates with no three words in a row in common, eight accounts each...
    for i in 0..32 {
        // Every text its own: the same text from several accounts is no template evidence.
        let text = if i % 4 < 2 {
            format!("{SUMMARY} {} (order {i})", SLOTS[i % 8])
        } else {
            format!("{TRANSLATION} {} (ticket {i})", SLOTS[(i + 3) % 8])
        };
        c.check(req(&format!("ops-{}", i % 8), &text))
            .await
            .unwrap();
    }
    // ...and one prompt of both, which links them into one cluster.
    let bridge = c
        .check(req(
            "ops-8",
            &format!("{SUMMARY} {}. {TRANSLATION} {}", SLOTS[0], SLOTS[1]),
        ))
        .await
        .unwrap()
        .into_inner();
    let camp = c
        .get_campaign(proto::GetCampaignRequest {
            campaign_id: bridge.prompt_id,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((camp.accounts, camp.prompts), (9, 33), "{camp:?}");
    assert!(camp.is_campaign, "{camp:?}");
    assert_eq!(camp.templates.len(), 2, "{:?}", camp.templates);
    // A search hit in it names the campaign, as ListCampaigns does.
    let by_id = |k| proto::SearchRequest {
        query: Some(Query::PromptId(bridge.prompt_id)),
        k,
        ..Default::default()
    };
    let hits = c.search(by_id(5)).await.unwrap().into_inner().hits;
    assert_eq!(hits.len(), 5);
    assert!(
        hits.iter()
            .all(|h| h.cluster_id == camp.campaign_id && h.campaign_id == Some(camp.campaign_id)),
        "{hits:?}"
    );
    assert!(
        camp.templates
            .iter()
            .any(|t| t.template.starts_with(SUMMARY))
            && camp
                .templates
                .iter()
                .any(|t| t.template.starts_with(TRANSLATION)),
        "{:?}",
        camp.templates
    );
    // Allow-listing by the campaign's id would list the words both share: refused, naming the
    // way out.
    let err = allow(&mut c, Source::CampaignId(camp.campaign_id))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("its prompts follow 2 templates")
            && err
                .message()
                .contains(&format!("campaigns --id {}", camp.campaign_id)),
        "{err:?}"
    );
    // One of them, by its text, is allowed; it matches half the cluster's prompts, but the
    // others follow a template of their own, so the cluster (one unit) still scores, and the
    // answer says so.
    let r = allow(&mut c, Source::Template(format!("{SUMMARY} <*>")))
        .await
        .unwrap();
    assert!(!r.already_listed, "{r:?}");
    assert_eq!(r.campaigns_cleared, 0, "{r:?}");
    assert_eq!(r.campaigns_not_cleared, vec![camp.campaign_id], "{r:?}");
    let list = every_campaign(&mut c).await;
    assert!(
        list.iter().any(|l| l.campaign_id == camp.campaign_id),
        "{list:?}"
    );
    // Both templates allowed: nothing of it follows another template, and it is cleared.
    let r = allow(&mut c, Source::Template(format!("{TRANSLATION} <*>")))
        .await
        .unwrap();
    assert_eq!(
        (r.campaigns_cleared, r.campaigns_not_cleared.len()),
        (1, 0),
        "{r:?}"
    );
    assert!(every_campaign(&mut c).await.is_empty());
    // Cleared, its prompts are still a cluster, but no campaign.
    let hits = c.search(by_id(5)).await.unwrap().into_inner().hits;
    assert!(
        hits.iter()
            .all(|h| h.cluster_id == camp.campaign_id && h.campaign_id.is_none()),
        "{hits:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_input_is_invalid_argument_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(config(dir.path())).await;
    let mut c = server.client().await;
    let big = "x ".repeat(20_000);
    let cases = [
        (req("", "hello"), "account_id"),
        (req("a", ""), "prompt"),
        (req("a", "   \n "), "prompt"),
        (req("a", &big), "prompt"),
        (
            proto::CheckRequest {
                timestamp_ms: -5,
                ..req("a", "hi")
            },
            "timestamp_ms",
        ),
        // Seconds where milliseconds are meant.
        (
            proto::CheckRequest {
                timestamp_ms: 1_750_000_000,
                ..req("a", "hi")
            },
            "timestamp_ms",
        ),
    ];
    for (r, field) in cases {
        let e = c.check(r).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(e.message().starts_with(field), "{field}: {}", e.message());
    }
    let e = c
        .search(proto::SearchRequest {
            query: None,
            k: 5,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), e.message().starts_with("query")),
        (Code::InvalidArgument, true)
    );
    let e = c
        .search(proto::SearchRequest {
            query: Some(Query::Text("x".into())),
            k: 100_000,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), e.message().starts_with("k")),
        (Code::InvalidArgument, true)
    );
    let e = c
        .search(proto::SearchRequest {
            query: Some(Query::PromptId(77)),
            k: 5,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    // Id 0 is proto3's unset number: a missing id, as GetCampaign has it, not an unknown one.
    let e = c
        .search(proto::SearchRequest {
            query: Some(Query::PromptId(0)),
            k: 5,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), e.message().starts_with("prompt_id")),
        (Code::InvalidArgument, true),
        "{e:?}"
    );
    // A wrong time bound is named: the one that is wrong.
    for (from_ms, to_ms, said) in [
        (-5, 0, "from_ms: must not be negative"),
        (0, -5, "to_ms: must not be negative"),
        (9, 8, "from_ms: must not be after to_ms"),
    ] {
        let e = c
            .search(proto::SearchRequest {
                query: Some(Query::Text("x".into())),
                from_ms,
                to_ms,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(e.message().starts_with(said), "{said}: {e:?}");
    }
    let e = c
        .get_account(proto::GetAccountRequest {
            account_id: " ".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    // An id longer than any account's is refused as Check refuses it; echoed whole in a
    // NOT_FOUND, it overflowed the status header into a transport error.
    let e = c
        .get_account(proto::GetAccountRequest {
            account_id: "q".repeat(20_000),
        })
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), e.message()),
        (
            Code::InvalidArgument,
            "account_id: 20000 bytes exceeds the limit of 256"
        )
    );
    // Nothing was stored by any of it, and the server still works.
    let ok = c.check(req("a", "hello there")).await.unwrap().into_inner();
    assert_eq!(ok.prompt_id, 1);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_stream_answers_in_order_and_reports_bad_items_without_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(config(dir.path())).await;
    let mut c = server.client().await;
    let mut reqs: Vec<proto::CheckRequest> = (0..40)
        .map(|i| proto::CheckRequest {
            request_id: format!("r{i}"),
            ..req(&format!("acct-{}", i % 7), &templated(i))
        })
        .collect();
    reqs[17].prompt.clear();
    reqs[17].account_id = format!("  {}  ", reqs[17].account_id);
    reqs[23].account_id.clear();
    let out = c
        .check_stream(tokio_stream::iter(reqs))
        .await
        .unwrap()
        .into_inner();
    let got: Vec<proto::CheckResponse> =
        tokio_stream::StreamExt::collect::<Vec<_>>(tokio_stream::StreamExt::map(out, |r| {
            r.unwrap()
        }))
        .await;
    assert_eq!(got.len(), 40);
    for (i, r) in got.iter().enumerate() {
        assert_eq!(r.request_id, format!("r{i}"));
        if i == 17 || i == 23 {
            let e = r.error.as_ref().expect("bad item carries an error");
            assert_eq!(e.code, "INVALID_ARGUMENT", "the name the proto documents");
            assert_eq!(r.prompt_id, 0);
            assert_eq!(
                r.account_id.trim(),
                r.account_id,
                "echoed trimmed, as accepted ones"
            );
        } else {
            assert!(r.error.is_none(), "{r:?}");
        }
    }
    // Ingested in stream order: ids increase along the stream.
    let ids: Vec<u64> = got
        .iter()
        .filter(|r| r.error.is_none())
        .map(|r| r.prompt_id)
        .collect();
    assert!(ids.windows(2).all(|w| w[1] == w[0] + 1), "{ids:?}");
    server.stop().await;
}

/// Search hits for `text` with the given filters.
async fn text_hits(
    c: &mut proto::radar_client::RadarClient<tonic::transport::Channel>,
    text: &str,
    k: u32,
    account: &str,
    from_ms: i64,
    to_ms: i64,
) -> Vec<proto::SearchHit> {
    let r = proto::SearchRequest {
        query: Some(Query::Text(text.into())),
        k,
        account_id: account.into(),
        from_ms,
        to_ms,
    };
    c.search(r).await.unwrap().into_inner().hits
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn search_by_text_and_id_with_account_and_time_filters() {
    const T0: i64 = 1_750_000_000_000;
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(config(dir.path())).await;
    let mut c = server.client().await;
    for (i, p) in ORGANIC.iter().enumerate() {
        let r = proto::CheckRequest {
            timestamp_ms: T0 + 1_000 + i as i64,
            ..req(if i % 2 == 0 { "even" } else { "odd" }, p)
        };
        c.check(r).await.unwrap();
    }
    let hits = text_hits(&mut c, "egg-free banana bread recipe", 3, "", 0, 0).await;
    assert_eq!(hits.len(), 3);
    assert_eq!(hits[0].prompt, ORGANIC[0]);
    assert!(hits[0].similarity > hits[1].similarity);
    let by_id = proto::SearchRequest {
        query: Some(Query::PromptId(2)),
        k: 1,
        ..Default::default()
    };
    let hits = c.search(by_id).await.unwrap().into_inner().hits;
    assert_eq!((hits[0].prompt_id, hits[0].similarity > 0.999), (2, true));
    assert!(
        hits[0].similarity <= 1.0,
        "a cosine: {}",
        hits[0].similarity
    );
    // A text sent again and again: every copy has the very same vector. Each copy, searched
    // by its id, still comes first, at 1, whatever k is (the index returned other copies,
    // or put it after them).
    let mut copies = Vec::new();
    for i in 0..8 {
        let r = proto::CheckRequest {
            timestamp_ms: T0 + 2_000 + i,
            ..req(&format!("greeter-{i}"), "hi!!")
        };
        copies.push(c.check(r).await.unwrap().into_inner().prompt_id);
    }
    for &id in &copies {
        for k in [1, 2, 5] {
            let r = proto::SearchRequest {
                query: Some(Query::PromptId(id)),
                k,
                ..Default::default()
            };
            let hits = c.search(r).await.unwrap().into_inner().hits;
            assert_eq!(hits.len(), k as usize);
            assert_eq!(
                (hits[0].prompt_id, hits[0].similarity),
                (id, 1.0),
                "{hits:?}"
            );
            assert!(
                hits[1..]
                    .iter()
                    .all(|h| h.prompt_id != id && copies.contains(&h.prompt_id)),
                "{hits:?}"
            );
        }
    }
    let hits = text_hits(&mut c, "banana bread", 10, "odd", 0, 0).await;
    assert_eq!(hits.len(), 4);
    assert!(hits.iter().all(|h| h.account_id == "odd"));
    assert!(hits.windows(2).all(|w| w[0].similarity >= w[1].similarity));
    let hits = text_hits(&mut c, "banana bread", 10, "odd", T0 + 1_002, T0 + 1_005).await;
    let mut ts: Vec<i64> = hits.iter().map(|h| h.timestamp_ms).collect();
    ts.sort();
    assert_eq!(
        ts,
        vec![T0 + 1_003, T0 + 1_005],
        "the account's prompts in the window"
    );
    let hits = text_hits(&mut c, "banana bread", 10, "nobody", 0, 0).await;
    assert!(hits.is_empty());
    let hits = text_hits(&mut c, "banana bread", 10, "", T0 + 1_002, T0 + 1_004).await;
    let mut ts: Vec<i64> = hits.iter().map(|h| h.timestamp_ms).collect();
    ts.sort();
    assert_eq!(ts, vec![T0 + 1_002, T0 + 1_003, T0 + 1_004]);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_is_resource_exhausted_and_nothing_accepted_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.batch.queue_capacity = 1;
    cfg.batch.max_batch_requests = 1;
    let server = TestServer::start(cfg).await;
    let c = server.client().await;
    let long =
        "Summarise the following report in detail and list every risk it mentions. ".repeat(12);
    let calls = (0..48).map(|i| {
        let mut c = c.clone();
        let p = format!("{long} Report number {i}.");
        tokio::spawn(async move { c.check(req(&format!("a{i}"), &p)).await })
    });
    let mut ok = 0;
    let mut exhausted = 0;
    for call in calls.collect::<Vec<_>>() {
        match call.await.unwrap() {
            Ok(_) => ok += 1,
            Err(e) if e.code() == Code::ResourceExhausted => exhausted += 1,
            Err(e) => panic!("unexpected status {e:?}"),
        }
    }
    assert!(
        exhausted > 0,
        "48 concurrent checks against a queue of 1 must overflow"
    );
    assert_eq!(ok + exhausted, 48);
    // Exactly the accepted prompts are stored: the listing counts them.
    let mut c = server.client().await;
    let accounts = all_accounts(&mut c).await;
    assert_eq!(accounts.iter().map(|a| a.prompts).sum::<u64>(), ok);
    // And the operators' counters say the same.
    let stats = c.get_stats(proto::GetStatsRequest {}).await.unwrap();
    let stats = stats.into_inner();
    assert_eq!(
        (
            stats.allowed + stats.reviewed + stats.blocked,
            stats.refused_overload
        ),
        (ok, exhausted),
        "{stats:?}"
    );
    assert_eq!((stats.queue_capacity, stats.prompts), (1, ok), "{stats:?}");
    server.stop().await;
}

/// GetStats: what Check and CheckStream answered (by action), refused (by kind) and how fast, the
/// queue, and what the server holds, as the calls before it left them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_count_answers_refusals_and_what_the_server_holds() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(config(dir.path())).await;
    let mut c = server.client().await;
    let stats = |mut c: RadarClient<Channel>| async move {
        c.get_stats(proto::GetStatsRequest {})
            .await
            .unwrap()
            .into_inner()
    };
    let fresh = stats(c.clone()).await;
    assert_eq!(
        (
            fresh.allowed,
            fresh.blocked,
            fresh.prompts,
            fresh.index_vectors
        ),
        (0, 0, 0, 0)
    );
    assert_eq!(fresh.latency.unwrap().count, 0);
    assert_eq!(fresh.queue_capacity, 1024);
    // Twelve accounts, one template: allowed at first, blocked once it is a campaign.
    let mut actions = [0u64; 4];
    for i in 0..24 {
        let v = c
            .check(req(&format!("harvester-{}", i % 12), &templated(i)))
            .await
            .unwrap()
            .into_inner();
        actions[v.action() as usize] += 1;
    }
    assert!(actions[proto::Action::Block as usize] > 0, "{actions:?}");
    // Two refused: an empty prompt, a missing account id.
    for (account, prompt) in [("a", ""), ("", "hello")] {
        let e = c.check(req(account, prompt)).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
    }
    // A stream: one answered, one refused item.
    let items = vec![
        req("streamer", "What is the capital of France?"),
        req("", "x"),
    ];
    let mut answers = c
        .check_stream(tokio_stream::iter(items))
        .await
        .unwrap()
        .into_inner();
    while let Some(a) = answers.message().await.unwrap() {
        if a.error.is_none() {
            actions[a.action() as usize] += 1;
        }
    }
    let s = stats(c.clone()).await;
    let by_action = [s.allowed, s.reviewed, s.blocked];
    let order = [
        proto::Action::Allow,
        proto::Action::Review,
        proto::Action::Block,
    ];
    assert_eq!(by_action, order.map(|a| actions[a as usize]), "{s:?}");
    assert_eq!((s.refused_invalid, s.refused_overload, s.failed), (3, 0, 0));
    for l in [s.latency.unwrap(), s.latency_last_minute.unwrap()] {
        assert_eq!(l.count, 25, "{l:?}");
        assert!(
            l.p50_us > 0 && l.p50_us <= l.p90_us && l.p90_us <= l.p99_us && l.p99_us <= l.max_us
        );
    }
    assert_eq!((s.prompts, s.accounts, s.queued), (25, 13, 0), "{s:?}");
    // Every stored prompt is in the vector index; the template's sentences in the part index.
    assert_eq!((s.index_segments, s.index_vectors), (1, 25), "{s:?}");
    assert!(s.part_index_vectors > 0, "{s:?}");
    assert!(s.uptime_ms >= fresh.uptime_ms, "{s:?}");
    server.stop().await;
}

/// A caller that leaves (its deadline passed, it cancelled) does not unbalance GetStats: a
/// prompt the model ran on is stored and counted by its verdict whether or not anyone waits for
/// it, and one dropped before is counted as cancelled. So the verdicts counted equal the prompts
/// stored, once the server has caught up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_that_leave_are_counted_as_answered_or_cancelled() {
    const CALLS: u64 = 24;
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(config(dir.path())).await;
    let c = server.client().await;
    // Long prompts of many sentences (each one also embedded as a part): tens of ms of model
    // time each, so that deadlines from 5 ms to 120 ms pass while calls wait and while the
    // model runs on them.
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..CALLS {
        let mut c = c.clone();
        let text = (0..30)
            .map(|j| {
                format!("Sentence {j} of request {i} says something about tides and the moon.")
            })
            .collect::<Vec<_>>()
            .join(" ");
        calls.spawn(async move {
            let mut r = tonic::Request::new(req(&format!("leaver-{i}"), &text));
            r.set_timeout(std::time::Duration::from_millis(5 * (i + 1)));
            c.check(r).await.map(|_| ()).map_err(|e| e.code())
        });
    }
    let mut gave_up = 0;
    while let Some(r) = calls.join_next().await {
        if let Err(code) = r.unwrap() {
            assert!(
                [Code::DeadlineExceeded, Code::Cancelled].contains(&code),
                "{code:?}"
            );
            gave_up += 1;
        }
    }
    assert!(
        gave_up > 0,
        "no deadline passed: the test needs slower calls"
    );
    // A stream cancelled after its first answer, with requests still waiting.
    let mut sc = c.clone();
    let (tx, rx) = tokio::sync::mpsc::channel(32);
    for i in 0..20 {
        tx.send(req(
            "stream-leaver",
            &format!("Question {i}: why is the sky blue at noon?"),
        ))
        .await
        .unwrap();
    }
    let mut answers = sc
        .check_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    answers.message().await.unwrap().unwrap();
    drop(answers);
    // Once the server has caught up, every stored prompt was counted by its verdict.
    let mut s = proto::Stats::default();
    for _ in 0..600 {
        s = c
            .clone()
            .get_stats(proto::GetStatsRequest {})
            .await
            .unwrap()
            .into_inner();
        if s.queued == 0 && s.allowed + s.reviewed + s.blocked == s.prompts && s.prompts > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            let again = c
                .clone()
                .get_stats(proto::GetStatsRequest {})
                .await
                .unwrap()
                .into_inner();
            if again.prompts == s.prompts {
                break;
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    drop(tx);
    let answered = s.allowed + s.reviewed + s.blocked;
    assert_eq!(answered, s.prompts, "every stored prompt counted: {s:?}");
    assert_eq!(
        (s.refused_invalid, s.refused_overload, s.failed),
        (0, 0, 0),
        "{s:?}"
    );
    assert!(
        answered + s.cancelled <= CALLS + 20 && answered > 1,
        "{s:?}"
    );
    assert_eq!(s.latency.unwrap().count, answered, "{s:?}");
    server.stop().await;
}

/// A cancelled CheckStream's requests that still wait for the model are dropped, not stored,
/// and counted as cancelled, as a cancelled unary Check's are.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_stream_drops_what_waits_for_the_model() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(config(dir.path())).await;
    let c = server.client().await;
    let stats = |mut c: RadarClient<Channel>| async move {
        c.get_stats(proto::GetStatsRequest {})
            .await
            .unwrap()
            .into_inner()
    };
    // Another client keeps the model busy with 60 long prompts.
    let long: Vec<proto::CheckRequest> = (0..60)
        .map(|i| {
            let text = (0..12)
                .map(|j| {
                    format!("Part {j} of long request {i} is about rivers, tides and the moon.")
                })
                .collect::<Vec<_>>()
                .join(" ");
            req(&format!("busy-{i}"), &text)
        })
        .collect();
    let mut busy = c.clone();
    let background = tokio::spawn(async move {
        let mut answers = busy
            .check_stream(tokio_stream::iter(long))
            .await
            .unwrap()
            .into_inner();
        let mut n = 0;
        while answers.message().await.unwrap().is_some() {
            n += 1;
        }
        n
    });
    while stats(c.clone()).await.queued < 10 {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // Twenty short ones queue behind them, each after one without an account; the client
    // cancels before any is answered.
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    for i in 0..20 {
        let question = format!("Short question {i}: what is a tide?");
        tx.send(req("", &question)).await.unwrap();
        tx.send(req("canceller", &question)).await.unwrap();
    }
    let mut sc = c.clone();
    let answers = sc
        .check_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    // Still busy with the long prompts (a machine fast enough to be done cannot tell).
    let busy = stats(c.clone()).await.prompts < 40;
    drop(answers);
    drop(tx);
    assert_eq!(background.await.unwrap(), 60);
    let mut s = stats(c.clone()).await;
    for _ in 0..300 {
        if s.queued == 0 && s.prompts + s.cancelled == 80 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        s = stats(c.clone()).await;
    }
    assert_eq!(s.prompts + s.cancelled, 80, "{s:?}");
    assert_eq!(s.allowed + s.reviewed + s.blocked, s.prompts, "{s:?}");
    // The server read every one (it took all 20 valid ones in), so it refused the 20 invalid ones
    // before them: counted, though the client never read the refusals.
    assert_eq!(s.refused_invalid, 20, "{s:?}");
    if busy {
        assert!(s.cancelled > 0, "the waiting requests are dropped: {s:?}");
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_reflection_and_auth() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.auth_token = Some("s3cret".into());
    let server = TestServer::start(cfg).await;
    let channel = server.channel().await;

    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    for service in ["", "promptradar.v1.Radar"] {
        let r = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap();
        assert_eq!(
            r.into_inner().status(),
            tonic_health::pb::health_check_response::ServingStatus::Serving
        );
    }

    // Reflection, in both versions (older tools ask v1alpha only), lists the service.
    macro_rules! listed_services {
        ($v:ident) => {{
            use tonic_reflection::pb::$v::{
                ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
                server_reflection_request::MessageRequest,
                server_reflection_response::MessageResponse,
            };
            let ask = ServerReflectionRequest {
                host: String::new(),
                message_request: Some(MessageRequest::ListServices(String::new())),
            };
            let msg = ServerReflectionClient::new(channel.clone())
                .server_reflection_info(tokio_stream::iter([ask]))
                .await
                .unwrap()
                .into_inner()
                .message()
                .await
                .unwrap()
                .unwrap();
            let Some(MessageResponse::ListServicesResponse(list)) = msg.message_response else {
                panic!("{msg:?}")
            };
            list.service
                .into_iter()
                .map(|s| s.name)
                .collect::<Vec<String>>()
        }};
    }
    for names in [listed_services!(v1), listed_services!(v1alpha)] {
        assert!(
            names.contains(&"promptradar.v1.Radar".to_string()),
            "{names:?}"
        );
    }

    // Radar RPCs need the token.
    let mut c = server.client().await;
    let e = c.check(req("a", "hi")).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    let mut r = tonic::Request::new(req("a", "hi"));
    r.metadata_mut()
        .insert("authorization", "Bearer s3cret".parse().unwrap());
    assert_eq!(c.check(r).await.unwrap().into_inner().prompt_id, 1);

    // A load balancer watches the health of the server ("") and of the service for as long as
    // it runs. At shutdown both turn NOT_SERVING, the watches end, and the graceful shutdown
    // does not wait on them (before, it waited until the watcher went away).
    use tonic_health::pb::health_check_response::ServingStatus;
    let mut watches = Vec::new();
    for service in ["", "promptradar.v1.Radar"] {
        let mut w = health
            .watch(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        let first = w.message().await.unwrap().unwrap().status();
        assert_eq!(first, ServingStatus::Serving, "{service:?}");
        watches.push((service, w));
    }
    let stopped =
        tokio::time::timeout(prompt_radar::server::SHUTDOWN_GRACE / 2, server.stop()).await;
    assert!(stopped.is_ok(), "shutdown waited for the health watches");
    for (service, mut w) in watches {
        let mut seen = Vec::new();
        while let Ok(Some(m)) = w.message().await {
            seen.push(m.status());
        }
        assert_eq!(seen, [ServingStatus::NotServing], "{service:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keeps_prompts_campaigns_and_index() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.engine.segments.max_points_per_segment = 10; // seal, dump and reload several segments
    let server = TestServer::start(cfg.clone()).await;
    let mut c = server.client().await;
    for i in 0..30 {
        c.check(req(&format!("h{}", i % 6), &templated(i)))
            .await
            .unwrap();
    }
    c.check(req("solo", ORGANIC[3])).await.unwrap();
    let before = c
        .list_campaigns(proto::ListCampaignsRequest::default())
        .await
        .unwrap()
        .into_inner();
    server.stop().await;
    assert!(
        dir.path().join("index").read_dir().unwrap().count() > 1,
        "sealed segments were dumped"
    );

    let server = TestServer::start(cfg).await;
    let mut c = server.client().await;
    let after = c
        .list_campaigns(proto::ListCampaignsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(before, after);
    let hit = nearest(&mut c, Query::Text(ORGANIC[3].into()))
        .await
        .unwrap();
    assert_eq!((hit.prompt_id, hit.account_id.as_str()), (31, "solo"));
    // New prompts continue the id sequence and still join the campaign.
    let v = c
        .check(req("h-new", &templated(31)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(v.prompt_id, 32);
    assert_eq!(v.campaign_id, Some(before.campaigns[0].campaign_id));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_list_clears_a_known_app_and_survives_a_restart() {
    use proto::allow_template_request::Source;
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(config(dir.path())).await;
    let mut c = server.client().await;
    for i in 0..24 {
        c.check(req(&format!("app-user-{}", i % 12), &templated(i)))
            .await
            .unwrap();
    }
    let list = every_campaign(&mut c).await;
    assert_eq!(list.len(), 1, "{list:?}");

    // Bad requests first: nothing is added.
    let allow = |source: Option<Source>| proto::AllowTemplateRequest {
        source,
        note: "our own code tutor".into(),
    };
    let err = c.allow_template(allow(None)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = c
        .allow_template(allow(Some(Source::Template("what is <*>".into()))))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("template"), "{err:?}");
    let err = c
        .allow_template(allow(Some(Source::CampaignId(999_999))))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = c
        .allow_template(allow(Some(Source::CampaignId(0))))
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), err.message()),
        (
            Code::InvalidArgument,
            "campaign_id: required (ids start at 1)"
        )
    );

    // Allow the campaign's own template: it stops scoring and its accounts are cleared.
    let r = c
        .allow_template(allow(Some(Source::CampaignId(list[0].campaign_id))))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.campaigns_cleared, 1, "{r:?}");
    assert!(!r.already_listed);
    let entry = r.entry.unwrap();
    // Again: the same one entry, nothing added; by campaign id (a retry) as by template.
    let again = c
        .allow_template(allow(Some(Source::CampaignId(list[0].campaign_id))))
        .await
        .unwrap()
        .into_inner();
    assert!(again.already_listed, "{again:?}");
    assert_eq!(
        (again.entry.as_ref(), again.campaigns_cleared),
        (Some(&entry), 0)
    );
    let again = c
        .allow_template(allow(Some(Source::Template(format!(
            " {} ",
            entry.template
        )))))
        .await
        .unwrap()
        .into_inner();
    assert!(again.already_listed, "{again:?}");
    assert_eq!(again.entry.as_ref(), Some(&entry));
    // The same words in other case and spacing match the same prompts: the same entry.
    let shouted = entry.template.to_uppercase().replace(' ', "  ");
    let again = c
        .allow_template(allow(Some(Source::Template(shouted))))
        .await
        .unwrap()
        .into_inner();
    assert!(again.already_listed, "{again:?}");
    assert_eq!(again.entry.as_ref(), Some(&entry));
    // One user's question is no campaign: its id (a typo for a campaign's) is refused, and
    // the question stays off the allow-list.
    let lone = c
        .check(req(
            "someone",
            "How do I keep the crust of a sourdough loaf from going soft overnight?",
        ))
        .await
        .unwrap()
        .into_inner();
    let err = c
        .allow_template(allow(Some(Source::CampaignId(lone.prompt_id))))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message()
            .contains("which is not a campaign (score 0.000, 1 account)"),
        "{err:?}"
    );
    assert!(
        entry
            .template
            .starts_with("You are an expert competitive programmer."),
        "{entry:?}"
    );
    let flagged = c
        .list_accounts(proto::ListAccountsRequest {
            flagged_only: true,
            limit: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(flagged.accounts.is_empty(), "{flagged:?}");
    // The cleared cluster, and its accounts, say what cleared them.
    let cleared = c
        .get_campaign(proto::GetCampaignRequest {
            campaign_id: list[0].campaign_id,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (
            cleared.is_campaign,
            cleared.allow_listed,
            cleared.allowed_by
        ),
        (false, true, entry.id),
        "{cleared:?}"
    );
    let member = &list[0].top_accounts[0].account_id;
    let member = c
        .get_account(proto::GetAccountRequest {
            account_id: member.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        member.reason.contains("in clusters the allow-list cleared")
            || member
                .reason
                .contains("in a cluster the allow-list cleared"),
        "{member:?}"
    );

    // New prompts of the template are stored but never linked.
    for i in 24..30 {
        let v = c
            .check(req(&format!("app-user-new-{i}"), &templated(i)))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            (v.neighbours, v.action(), v.campaign_id),
            (0, proto::Action::Allow, None),
            "{v:?}"
        );
    }
    // A look-alike campaign from other accounts, worded differently enough not to match the
    // allow-listed template, with the same slots: its prompts are near the allowed ones, but an
    // allow-listed cluster takes no one in, so it is a campaign of its own and flagged.
    let look_alike = |i: usize| {
        templated(i).replace(
            "You are an expert competitive programmer.",
            "Act as a senior competitive programming coach.",
        )
    };
    for i in 0..24 {
        c.check(req(&format!("copycat-{}", i % 8), &look_alike(i)))
            .await
            .unwrap();
    }
    let copycats = |accounts: Vec<proto::Account>| {
        let mut names: Vec<String> = accounts
            .into_iter()
            .filter(|a| a.flagged)
            .map(|a| a.account_id)
            .collect();
        names.sort();
        names
    };
    let want: Vec<String> = (0..8).map(|i| format!("copycat-{i}")).collect();
    assert_eq!(copycats(all_accounts(&mut c).await), want);
    let list = every_campaign(&mut c).await;
    assert_eq!(list.len(), 1, "{list:?}");
    assert!(list[0].template.starts_with("Act as a senior"), "{list:?}");
    assert_eq!(list[0].accounts, 8, "{list:?}");
    server.stop().await;

    // After a restart the entry and its effect are still there.
    let server = TestServer::start(config(dir.path())).await;
    let mut c = server.client().await;
    let listed = c
        .list_allowed_templates(proto::ListAllowedTemplatesRequest {})
        .await
        .unwrap()
        .into_inner()
        .templates;
    assert_eq!(listed, vec![entry.clone()]);
    // The allowed campaign is still cleared, the look-alike still its own campaign.
    assert_eq!(copycats(all_accounts(&mut c).await), want);
    let list = every_campaign(&mut c).await;
    assert_eq!(list.len(), 1, "{list:?}");
    assert!(list[0].template.starts_with("Act as a senior"), "{list:?}");

    let gone = c
        .remove_allowed_template(proto::RemoveAllowedTemplateRequest { id: entry.id })
        .await
        .unwrap()
        .into_inner();
    // The response is AllowedTemplate on the wire, and more: what the call returned before.
    use prost::Message;
    assert_eq!(
        proto::AllowedTemplate::decode(gone.encode_to_vec().as_slice()).unwrap(),
        entry
    );
    // The campaign it cleared scores again, as a restart would have it, and is named.
    let list = every_campaign(&mut c).await;
    let back: Vec<u64> = list
        .iter()
        .filter(|c| {
            c.template
                .starts_with("You are an expert competitive programmer.")
        })
        .map(|c| c.campaign_id)
        .collect();
    assert_eq!(back.len(), 1, "{list:?}");
    assert_eq!(gone.campaigns_scoring_again, back, "{list:?}");
    let err = c
        .remove_allowed_template(proto::RemoveAllowedTemplateRequest { id: entry.id })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    server.stop().await;
}

/// A harvesting template in Chinese, which puts no spaces between words: found across accounts,
/// shown to analysts as it is written (each character a word for alignment, no spaces added), and
/// allow-listed by its template text; organic Chinese prompts stay allowed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chinese_template_is_found_written_back_and_allow_listed() {
    use proto::allow_template_request::Source;
    const HEAD: &str = "请你作为一名经验丰富的数学老师，用通俗易懂的语言一步一步地解答下面的题目，并在最后单独给出答案：";
    const SLOTS: [&str; 16] = [
        "一个长方形的长是8厘米，宽是5厘米，它的面积是多少？",
        "小明有12个苹果，给了小红三分之一，还剩几个？",
        "一辆汽车每小时行驶60公里，3.5小时能行驶多远？",
        "求方程2x+7=19的解。",
        "一个圆的半径是3米，它的周长是多少？",
        "甲乙两人同时从两地相向而行，速度分别是每分钟50米和70米，两地相距1200米，几分钟后相遇？",
        "把一根24米长的绳子平均分成6段，每段长多少米？",
        "一件衣服原价200元，打八折后的价格是多少？",
        "计算1到100所有整数的和。",
        "一个三角形的三个内角之比是1:2:3，最大的角是多少度？",
        "水池有两个进水管，单开甲管6小时注满，单开乙管4小时注满，同时开需要几小时？",
        "一个数的百分之二十是15，这个数是多少？",
        "某班有45名学生，男生比女生多5人，男生有多少人？",
        "求函数y=x²-4x+3的最小值。",
        "掷两枚骰子，点数之和为7的概率是多少？",
        "一个正方体的棱长是4分米，它的体积是多少？",
    ];
    // Everyday questions, three from each of ten people. all-MiniLM-L6-v2 lacks most of these
    // characters: as strings of unknown tokens they embed alike ("如何投资股票？" and
    // "如何做红烧肉？" at cosine 1.0), so only their words may link them, and they share none.
    const ORGANIC_ZH: [&str; 30] = [
        "怎么做蛋糕？",
        "牙齿敏感怎么办？",
        "狗狗掉毛严重怎么办？",
        "怎么煮饺子？",
        "怎么戒烟最有效？",
        "怎么缓解焦虑？",
        "怎么去除衣服油渍？",
        "怎么练腹肌？",
        "怎么泡绿茶？",
        "怎么清洗油烟机？",
        "如何做红烧肉？",
        "怎么养多肉植物？",
        "电脑开机很慢怎么解决？",
        "如何学好数学？",
        "如何挑选西瓜？",
        "如何写简历？",
        "如何办理护照？",
        "如何种西红柿？",
        "如何选购冰箱？",
        "如何预防近视？",
        "如何投资股票？",
        "怎么看懂财务报表？",
        "感冒了吃什么药好得快？",
        "膝盖疼怎么办？",
        "头发干枯怎么护理？",
        "鱼缸水变绿怎么办？",
        "空调不制冷怎么办？",
        "嗓子疼吃什么好？",
        "车胎漏气怎么办？",
        "失眠多梦怎么调理？",
    ];
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(config(dir.path())).await;
    let mut c = server.client().await;
    for (i, p) in ORGANIC_ZH.iter().enumerate() {
        let v = c
            .check(req(&format!("zh-user-{}", i % 10), p))
            .await
            .unwrap();
        assert_eq!(v.into_inner().action(), proto::Action::Allow, "{p}");
    }
    assert!(every_campaign(&mut c).await.is_empty());
    let mut last = None;
    for (i, slot) in SLOTS.iter().enumerate() {
        let account = format!("zh-harvester-{}", i % 8);
        let v = c
            .check(req(&account, &format!("{HEAD}{slot}")))
            .await
            .unwrap();
        last = Some(v.into_inner());
    }
    let last = last.unwrap();
    assert_eq!(last.cluster_accounts, 8, "{last:?}");
    assert_eq!(last.action(), proto::Action::Block, "{last:?}");
    let list = every_campaign(&mut c).await;
    assert_eq!(list.len(), 1, "{list:?}");
    let camp = &list[0];
    assert_eq!((camp.accounts, camp.prompts), (8, 16), "{camp:?}");
    // Every slot differs from its first character and ends in "？" or "。": what stays is the
    // head, as written.
    assert!(
        camp.template.starts_with(&format!("{HEAD}<*>")),
        "{}",
        camp.template
    );

    // The analyst allow-lists the template as shown: new prompts of it are never linked.
    let r = c
        .allow_template(proto::AllowTemplateRequest {
            source: Some(Source::Template(format!("{HEAD}<*>"))),
            note: "our own maths tutor".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.campaigns_cleared, 1, "{r:?}");
    let v = c
        .check(req(
            "zh-new",
            &format!("{HEAD}一个梯形上底3米，下底5米，高4米，面积是多少？"),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (v.neighbours, v.action()),
        (0, proto::Action::Allow),
        "{v:?}"
    );
    server.stop().await;
}

/// A campaign whose accounts send their prompts one account after another, in a language the
/// model cannot read, so only the template's words link them. QA found that each account's burst
/// linked to the one last prompt of the account before: two cross-account prompts an account,
/// under the share that credits its whole burst, and none of these eight accounts was flagged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_campaign_whose_accounts_send_one_after_another_is_found_whole() {
    const HEAD: &str = "请你作为一名知识渊博的大学教授，用通俗易懂的语言详细地讲解下面这个主题，并举出具体的例子：";
    const SUBJECTS: [&str; 10] = [
        "量子计算",
        "区块链网",
        "机器学习",
        "光合作用",
        "狭义相对",
        "基因编辑",
        "云端存储",
        "神经网络",
        "板块构造",
        "温室效应",
    ];
    const ASPECTS: [&str; 8] = [
        "的基本原理",
        "的发展历史",
        "的主要应用",
        "的优点缺点",
        "的未来趋势",
        "的常见误解",
        "的核心概念",
        "的实际案例",
    ];
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(config(dir.path())).await;
    let mut c = server.client().await;
    // Eight accounts, ten prompts each, every slot different; account 0 sends all of its prompts
    // first, then account 1, and so on.
    for n in 0..80 {
        let slot = format!("{}{}", SUBJECTS[n % 10], ASPECTS[n / 10]);
        c.check(req(&format!("seq-{}", n / 10), &format!("{HEAD}{slot}")))
            .await
            .unwrap();
    }
    let mut unflagged = Vec::new();
    for i in 0..8 {
        let a = account(&mut c, format!("seq-{i}")).await;
        if !a.flagged || a.campaign_prompts != 10 {
            unflagged.push(a);
        }
    }
    assert!(unflagged.is_empty(), "{unflagged:#?}");
    let list = every_campaign(&mut c).await;
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(
        (list[0].accounts, list[0].flagged_accounts, list[0].prompts),
        (8, 8, 80),
        "{list:?}"
    );
    server.stop().await;
}

/// One look-alike sent by a campaign account: the campaign's opener before a batch job's
/// template. Its near neighbours are many of the batch job's prompts; QA found each of them
/// credited to the batch job as cross-account evidence, and the whole job (24 prompts, one
/// account) flagged with the campaign.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_look_alike_from_a_campaign_account_does_not_sweep_a_batch_job_in() {
    const OPENER: &str = "Please act as a careful senior math tutor today.";
    const ITEMS: [&str; 6] = [
        "apples",
        "pencils",
        "notebooks",
        "tickets",
        "cookies",
        "marbles",
    ];
    const PRODUCTS: [&str; 8] = [
        "blender",
        "jacket",
        "phone case",
        "desk lamp",
        "backpack",
        "coffee maker",
        "headset",
        "water bottle",
    ];
    const ARRIVALS: [&str; 3] = ["on time", "two days late", "in a dented box"];
    const VERDICTS: [&str; 4] = [
        "It broke after a week and support never answered.",
        "Works exactly as described, I would buy it again.",
        "It is fine for the price, nothing special.",
        "The colour was off but it does the job.",
    ];
    let maths = |a: usize, k: usize| {
        let (n, p, m) = (3 + a * 7 + k * 5, 2 + (a + k) % 5, 4 + k);
        format!(
            "{OPENER} Solve the following problem and show every step clearly: A shop sells {} for \
             {p} dollars each. Maria buys {n} of them and pays with {} dollars. How much change \
             does she get? Give the final answer on its own line at the very end.",
            ITEMS[k],
            n * p + m * 10
        )
    };
    let review = |i: usize| {
        format!(
            "Read this customer review and classify its sentiment: The {} arrived {}. {} Reply \
             with exactly one word: positive, negative or neutral.",
            PRODUCTS[i % 8],
            ARRIVALS[i % 3],
            VERDICTS[(i / 3) % 4]
        )
    };
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(config(dir.path())).await;
    let mut c = server.client().await;
    let mut send = async |account: &str, prompt: String| {
        c.check(req(account, &prompt)).await.unwrap();
    };
    // Half the campaign (6 accounts × 6 prompts, interleaved), the batch job, the look-alike, the
    // rest of the campaign.
    let campaign: Vec<(String, String)> = (0..6)
        .flat_map(|k| (0..6).map(move |a| (format!("camp-{a}"), (a, k))))
        .map(|(acct, (a, k))| (acct, maths(a, k)))
        .collect();
    for (acct, p) in &campaign[..18] {
        send(acct, p.clone()).await;
    }
    for i in 0..24 {
        send("batch", review(i)).await;
    }
    send("camp-0", format!("{OPENER} {}", review(24))).await;
    for (acct, p) in &campaign[18..] {
        send(acct, p.clone()).await;
    }
    let batch = account(&mut c, "batch").await;
    assert!(!batch.flagged && batch.campaign_prompts <= 2, "{batch:?}");
    for a in 0..6 {
        let acct = account(&mut c, format!("camp-{a}")).await;
        assert!(acct.flagged, "{acct:?}");
    }
    let list = every_campaign(&mut c).await;
    let camp = list
        .iter()
        .find(|l| l.flagged_accounts == 6)
        .unwrap_or_else(|| panic!("the campaign with its 6 members: {list:?}"));
    assert!(
        camp.top_accounts[..6]
            .iter()
            .all(|t| t.account_id.starts_with("camp-")),
        "{camp:?}"
    );
    server.stop().await;
}

/// A campaign's slot is often a public question that ordinary users ask too. QA found users who
/// sent such a question on its own pulled into the campaign and blocked: their prompt and the
/// campaign's end in the same words, so they shared template keys. Here each question goes out
/// from three campaign accounts, as when a harvester reuses its list across accounts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_asking_a_campaigns_slot_question_is_not_pulled_into_it() {
    const EN_HEAD: &str = "Translate this text to Italian and keep the same tone please. ";
    const EN: [&str; 10] = [
        "What is the best way to learn to play the guitar as an adult?",
        "How can I improve the quality of my sleep at night?",
        "Why does the sky look blue during the day but red at sunset?",
        "What should I do when my phone battery drains very fast?",
        "How do I relieve neck pain after working long hours at a desk?",
        "What is the healthiest way to lose weight without a strict diet?",
        "How do I train my puppy to use the same spot for the toilet?",
        "What are the most effective ways to stop procrastinating every day?",
        "What time of day is best to drink milk for good sleep?",
        "How can I keep my houseplants alive while I am away on holiday?",
    ];
    const ZH_HEAD: &str = "请把下面这段话翻译成日文：";
    const ZH: [&str; 10] = [
        "光合作用的过程是怎样的",
        "为什么天空看起来是蓝色的",
        "怎样提高睡眠质量",
        "电脑开不了机怎么办",
        "地球为什么会有四季",
        "咖啡喝多了有什么影响",
        "孩子不爱吃饭怎么办",
        "如何养好多肉植物",
        "牛奶在一天中什么时候喝最好",
        "怎么选择合适的跑鞋",
    ];
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(config(dir.path())).await;
    let mut c = server.client().await;
    for (lang, head, questions) in [("en", EN_HEAD, EN), ("zh", ZH_HEAD, ZH)] {
        // Ten accounts, three prompts each: account i asks questions i, i + 1 and i + 2.
        for i in 0..10 {
            for j in 0..3 {
                let q = questions[(i + j) % 10];
                c.check(req(&format!("{lang}-harvester-{i}"), &format!("{head}{q}")))
                    .await
                    .unwrap();
            }
        }
        // Two people ask two of the questions, as they are and as people type them (another
        // case, no question mark, a full-width one): still two texts of each question.
        let asked = [
            ("user-1", questions[0].to_string()),
            (
                "user-1",
                format!("{}？", questions[4].trim_end_matches('?')),
            ),
            ("user-2", questions[0].to_lowercase().replace('?', "")),
            (
                "user-2",
                format!("{}？", questions[0].trim_end_matches('?')),
            ),
            ("user-2", questions[4].to_uppercase()),
        ];
        for (user, q) in asked {
            let user = format!("{lang}-{user}");
            let v = c.check(req(&user, &q)).await.unwrap().into_inner();
            assert_eq!(
                (v.action(), v.campaign_id),
                (proto::Action::Allow, None),
                "{user}: {q}: {v:?}"
            );
        }
        for user in ["user-1", "user-2"] {
            let a = account(&mut c, format!("{lang}-{user}")).await;
            assert!(!a.flagged && a.campaigns.is_empty(), "{a:?}");
        }
    }
    // The campaigns themselves are found as before.
    let list = every_campaign(&mut c).await;
    assert_eq!(list.len(), 2, "{list:?}");
    for head in [EN_HEAD, ZH_HEAD] {
        let template = format!("{head}<*>");
        let camp = list.iter().find(|c| c.template == template);
        let camp = camp.unwrap_or_else(|| panic!("a campaign of {template}: {list:?}"));
        assert_eq!((camp.accounts, camp.prompts), (10, 30), "{camp:?}");
    }
    // The top one, and how many there are.
    let top = c
        .list_campaigns(proto::ListCampaignsRequest {
            top: 1,
            min_score: 0.0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((top.campaigns.len(), top.total), (1, 2), "{top:?}");
    assert_eq!(top.campaigns[0], list[0]);
    server.stop().await;
}

/// A gateway's CheckStream stays open as long as the gateway runs. At shutdown the server answers
/// what the stream has sent, ends it with UNAVAILABLE saying how many requests are in, and the
/// graceful shutdown finishes instead of waiting for the stream for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_an_open_stream_after_answering_what_it_sent() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(config(dir.path())).await;
    let mut c = server.client().await;
    let (tx, rx) = tokio::sync::mpsc::channel::<proto::CheckRequest>(16);
    let mut out = c
        .check_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    for i in 0..10 {
        tx.send(req(&format!("gw-{}", i % 3), &templated(i)))
            .await
            .unwrap();
    }
    for _ in 0..10 {
        let r = out.message().await.unwrap().expect("a verdict");
        assert!(r.error.is_none() && r.prompt_id > 0, "{r:?}");
    }
    // The gateway keeps `tx` open: the stream is idle, not finished.
    let stopped = tokio::time::timeout(std::time::Duration::from_secs(60), server.stop()).await;
    assert!(stopped.is_ok(), "shutdown waited for the open stream");
    let end = out
        .message()
        .await
        .expect_err("the stream ends with a status");
    assert_eq!(end.code(), Code::Unavailable, "{end:?}");
    assert!(
        end.message().contains("first 10 requests are answered"),
        "{end:?}"
    );
    drop(tx);

    let server = TestServer::start(config(dir.path())).await;
    let mut c = server.client().await;
    let stored: u64 = all_accounts(&mut c).await.iter().map(|a| a.prompts).sum();
    assert_eq!(stored, 10, "every answered request is stored");
    server.stop().await;
}

/// GetAccount of `account_id`, which must be known.
async fn account(c: &mut RadarClient<Channel>, account_id: impl Into<String>) -> proto::Account {
    c.get_account(proto::GetAccountRequest {
        account_id: account_id.into(),
    })
    .await
    .expect("GetAccount")
    .into_inner()
}

/// The campaigns listed with no score threshold (up to 10).
async fn every_campaign(c: &mut RadarClient<Channel>) -> Vec<proto::Campaign> {
    c.list_campaigns(proto::ListCampaignsRequest {
        top: 10,
        min_score: 0.0,
    })
    .await
    .expect("ListCampaigns")
    .into_inner()
    .campaigns
}

/// Allow-lists `source` (note "support tooling").
async fn allow(
    c: &mut RadarClient<Channel>,
    source: proto::allow_template_request::Source,
) -> Result<proto::AllowTemplateResponse, tonic::Status> {
    c.allow_template(proto::AllowTemplateRequest {
        source: Some(source),
        note: "support tooling".into(),
    })
    .await
    .map(tonic::Response::into_inner)
}
