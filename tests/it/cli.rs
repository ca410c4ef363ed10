//! The command-line verbs as users run them: real `prompt-radar` processes against a real server.

use std::io::Write;
use std::process::{Command, Output};

use serde_json::Value;

use crate::common::{ORGANIC, TestServer, config, model_dir, templated};

fn bin(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_prompt-radar"))
        .args(args)
        .output()
        .expect("run prompt-radar")
}

async fn run(args: Vec<String>) -> Output {
    tokio::task::spawn_blocking(move || bin(&args.iter().map(String::as_str).collect::<Vec<_>>()))
        .await
        .unwrap()
}

/// `prompt-radar check` of `input` against the server at `url`, verdicts written to `output`.
async fn check_to_file(url: &str, input: &std::path::Path, output: &std::path::Path) -> Output {
    run(vec![
        "check".into(),
        "--server".into(),
        url.into(),
        "--input".into(),
        input.display().to_string(),
        "--output".into(),
        output.display().to_string(),
    ])
    .await
}

fn jsonl(bytes: &[u8]) -> Vec<Value> {
    String::from_utf8_lossy(bytes)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Traffic with a campaign (8 accounts), an organic account and two bad lines (3 and 6).
fn traffic_file(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("traffic.jsonl");
    let mut f = std::fs::File::create(&path).unwrap();
    let mut n = 0;
    let mut line = |f: &mut std::fs::File, s: String| {
        writeln!(f, "{s}").unwrap();
        n += 1;
    };
    for i in 0..24 {
        if i == 2 {
            line(&mut f, "{not json".into());
        }
        if i == 4 {
            line(
                &mut f,
                serde_json::json!({"prompt": "no account here"}).to_string(),
            );
        }
        let v = serde_json::json!({"account_id": format!("bot-{}", i % 8), "prompt": templated(i), "timestamp_ms": 1_750_000_001_000i64 + i as i64});
        line(&mut f, v.to_string());
    }
    for (i, p) in ORGANIC.iter().enumerate() {
        line(
            &mut f,
            serde_json::json!({"account_id": "person", "prompt": p, "timestamp_ms": 1_750_000_002_000i64 + i as i64})
                .to_string(),
        );
    }
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_accounts_campaigns_search_through_the_binary() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(config(&dir.path().join("data"))).await;
    let url = format!("http://{}", server.addr);
    let input = traffic_file(dir.path());
    let output = dir.path().join("verdicts.jsonl");
    // A longer output of an earlier run: replaced whole, not overwritten in part.
    std::fs::write(&output, "{\"line\": 0}\n".repeat(500)).unwrap();

    let o = check_to_file(&url, &input, &output).await;
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(
        o.status.code(),
        Some(1),
        "bad lines make the exit status 1: {stderr}"
    );
    assert!(stderr.contains("line 3: malformed JSON"), "{stderr}");
    assert!(
        stderr.contains("line 6:") && stderr.contains("account_id"),
        "{stderr}"
    );
    assert!(
        stderr.contains("check: 34 lines")
            && stderr.contains("32 verdicts")
            && stderr.contains("2 errors"),
        "{stderr}"
    );
    let verdicts = jsonl(&std::fs::read(&output).unwrap());
    assert_eq!(verdicts.len(), 34, "one output line per input line");
    for (i, v) in verdicts.iter().enumerate() {
        assert_eq!(v["line"], i + 1, "file order");
    }
    assert!(verdicts[2]["error"].is_string() && verdicts[5]["error"].is_string());
    let last_bot = &verdicts[25];
    assert_eq!(last_bot["account_id"], "bot-7");
    assert!(
        ["review", "block"].contains(&last_bot["action"].as_str().unwrap()),
        "{last_bot}"
    );
    // Campaign ids are strings in every JSONL output, so that lines of `check`, `accounts` and
    // `campaigns` join on them.
    assert!(
        last_bot["campaign_id"].is_string() && last_bot["neighbours"].as_u64().unwrap() > 0,
        "{last_bot}"
    );
    assert_eq!(verdicts[33]["action"], "allow");
    assert!(verdicts[33]["campaign_id"].is_null());

    // The operators' view: the 32 verdicts, split by action as `check` wrote them.
    let o = run(vec![
        "stats".into(),
        "--server".into(),
        url.clone(),
        "--format".into(),
        "jsonl".into(),
    ])
    .await;
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stats = jsonl(&o.stdout);
    assert_eq!(stats.len(), 1, "one reading without --watch");
    let count = |action: &str| verdicts.iter().filter(|v| v["action"] == action).count();
    let by_action =
        ["allowed", "reviewed", "blocked"].map(|k| stats[0][k].as_u64().unwrap() as usize);
    assert_eq!(
        by_action,
        [count("allow"), count("review"), count("block")],
        "{stats:?}"
    );
    assert_eq!(
        (
            stats[0]["prompts"].as_u64(),
            stats[0]["latency"]["count"].as_u64()
        ),
        (Some(32), Some(32))
    );
    let o = run(vec!["stats".into(), "--server".into(), url.clone()]).await;
    let table = String::from_utf8_lossy(&o.stdout);
    assert!(
        table.contains("checks        32 answered: ")
            && table.contains("stored        32 prompts from"),
        "{table}"
    );

    let o = run(vec![
        "accounts".into(),
        "--server".into(),
        url.clone(),
        "--flagged".into(),
        "--format".into(),
        "jsonl".into(),
    ])
    .await;
    assert!(o.status.success());
    let accounts = jsonl(&o.stdout);
    assert_eq!(accounts.len(), 8, "{accounts:?}");
    for a in &accounts {
        assert!(a["account_id"].as_str().unwrap().starts_with("bot-"));
        assert_eq!(a["flagged"], true);
        assert!(a["score"].as_f64().unwrap() >= 0.5 && a["prompts"] == 3);
        assert_eq!(a["campaigns"].as_array().unwrap().len(), 1);
    }
    let o = run(vec!["accounts".into(), "--server".into(), url.clone()]).await;
    let table = String::from_utf8_lossy(&o.stdout);
    assert!(
        table.contains("person") && table.contains("allow"),
        "{table}"
    );

    let o = run(vec![
        "campaigns".into(),
        "--server".into(),
        url.clone(),
        "--format".into(),
        "jsonl".into(),
    ])
    .await;
    let campaigns = jsonl(&o.stdout);
    assert_eq!(campaigns.len(), 1);
    assert_eq!(
        String::from_utf8_lossy(&o.stderr),
        "campaigns: 1 listed of 1\n"
    );
    assert_eq!(
        (
            campaigns[0]["accounts"].as_u64(),
            campaigns[0]["prompts"].as_u64()
        ),
        (Some(8), Some(24))
    );
    assert!(campaigns[0]["template"].as_str().unwrap().contains("<*>"));
    assert_eq!(campaigns[0]["flagged_accounts"], 8, "{:?}", campaigns[0]);
    let campaign_id = campaigns[0]["campaign_id"].as_str().unwrap().to_string();
    // The accounts table names each account's campaigns, as the JSONL does.
    let o = run(vec!["accounts".into(), "--server".into(), url.clone()]).await;
    let table = String::from_utf8_lossy(&o.stdout);
    assert!(
        table.lines().next().unwrap().contains(" campaigns ")
            && table
                .lines()
                .filter(|l| l.starts_with("bot-"))
                .all(|l| l.contains(&format!(" {campaign_id} "))),
        "{table}"
    );
    assert_eq!(last_bot["campaign_id"], campaign_id.as_str());
    assert_eq!(accounts[0]["campaigns"][0], campaign_id.as_str());

    // One account in full (GetAccount): the same object as its line in the listing.
    let server_args = || vec!["--server".to_string(), url.clone()];
    let jsonl_args = || vec!["--format".to_string(), "jsonl".to_string()];
    let one = |id: &str| {
        [
            vec!["accounts".into(), "--id".into(), id.to_string()],
            server_args(),
        ]
        .concat()
    };
    let o = run([one("bot-3"), jsonl_args()].concat()).await;
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let listed = accounts
        .iter()
        .find(|a| a["account_id"] == "bot-3")
        .unwrap();
    assert_eq!(jsonl(&o.stdout), vec![listed.clone()]);
    let o = run(one("bot-3")).await;
    let table = String::from_utf8_lossy(&o.stdout);
    assert!(
        table.contains("account    bot-3")
            && table.contains(&format!("campaigns  {campaign_id}  "))
            && table.contains("prompts    3 (3 in campaigns)")
            && table.contains("reason     "),
        "{table}"
    );
    let o = run(one("nobody")).await;
    assert_eq!(o.status.code(), Some(2));
    assert_eq!(
        String::from_utf8_lossy(&o.stderr),
        "prompt-radar: error: NOT_FOUND: account_id: no account \"nobody\"\n",
        "one line, the status by its gRPC name"
    );

    // One campaign in full (GetCampaign), by its id or by any prompt id of its cluster.
    let full = |id: &str| {
        [
            vec!["campaigns".into(), "--id".into(), id.to_string()],
            server_args(),
        ]
        .concat()
    };
    let member = last_bot["prompt_id"].as_u64().unwrap().to_string();
    let o = run([full(&member), jsonl_args()].concat()).await;
    assert_eq!(
        jsonl(&o.stdout),
        vec![campaigns[0].clone()],
        "a member's prompt id"
    );
    let o = run(full(&campaign_id)).await;
    let table = String::from_utf8_lossy(&o.stdout);
    assert!(
        table.contains("top accounts (8 of 8, 8 flagged): campaign prompts, prompts here, account"),
        "{table}"
    );
    for b in 0..8 {
        assert!(
            table.contains(&format!("      3        3  bot-{b}\n")),
            "{table}"
        );
    }
    let examples = table
        .split("examples (")
        .nth(1)
        .expect("an examples section");
    assert!(
        examples.lines().skip(1).all(|l| l.starts_with("    ")) && examples.lines().count() > 1,
        "{table}"
    );
    // A prompt that is in no campaign: its cluster, said to be none.
    let person = verdicts[33]["prompt_id"].as_u64().unwrap().to_string();
    let o = run(full(&person)).await;
    let table = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success()
            && table.starts_with("cluster ")
            && table.contains(" (not a campaign)  score "),
        "{table}"
    );
    let o = run([full(&person), jsonl_args()].concat()).await;
    assert_eq!(jsonl(&o.stdout)[0]["is_campaign"], false);
    assert_eq!(campaigns[0]["is_campaign"], true);
    let o = run(full("999999")).await;
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("NOT_FOUND: campaign_id"));
    let min_score = |score: String| {
        [
            vec!["campaigns".into(), "--min-score".into(), score],
            server_args(),
            jsonl_args(),
        ]
        .concat()
    };
    let o = run(min_score(campaigns[0]["score"].to_string())).await;
    assert_eq!(
        jsonl(&o.stdout),
        vec![campaigns[0].clone()],
        "its own score keeps it"
    );
    let o = run(min_score("1.01".into())).await;
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("INVALID_ARGUMENT: min_score"));
    let o = run([
        vec!["campaigns".into(), "--top".into(), "0".into()],
        server_args(),
    ]
    .concat())
    .await;
    assert_eq!(
        o.status.code(),
        Some(2),
        "--top 0 is refused, not read as 1"
    );
    let o = run([
        vec![
            "search".into(),
            "--text".into(),
            "x".into(),
            "-k".into(),
            "0".into(),
        ],
        server_args(),
    ]
    .concat())
    .await;
    assert_eq!(o.status.code(), Some(2), "-k 0 is refused, not read as 10");
    // Without a query, the error names both ways to give one.
    let o = run([vec!["search".into()], server_args()].concat()).await;
    let said = String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.code() == Some(2) && said.contains("--text") && said.contains("--id"),
        "{said}"
    );

    // `accounts | head`: a reader that goes away ends the verb quietly, with status 0.
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let accounts_url = url.clone();
    let o = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_prompt-radar"))
            .args(["accounts", "--server", &accounts_url])
            .stdout(writer)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert_eq!(
        (o.status.code(), String::from_utf8_lossy(&o.stderr).as_ref()),
        (Some(0), ""),
        "a closed stdout is no error"
    );

    let o = run(vec![
        "search".into(),
        "--server".into(),
        url.clone(),
        "--text".into(),
        "banana bread".into(),
        "-k".into(),
        "3".into(),
        "--format".into(),
        "jsonl".into(),
    ])
    .await;
    let hits = jsonl(&o.stdout);
    assert_eq!(hits.len(), 3);
    assert_eq!(hits[0]["prompt"], ORGANIC[0]);
    assert!(hits[0]["campaign_id"].is_null(), "{:?}", hits[0]);
    // A bot's prompt: the hit names its campaign, as `campaigns` and `check` write it.
    let o = run(vec![
        "search".into(),
        "--server".into(),
        url.clone(),
        "--id".into(),
        last_bot["prompt_id"].to_string(),
        "-k".into(),
        "1".into(),
        "--format".into(),
        "jsonl".into(),
    ])
    .await;
    let hits = jsonl(&o.stdout);
    assert_eq!(hits[0]["prompt_id"], last_bot["prompt_id"]);
    assert_eq!(
        hits[0]["campaign_id"],
        campaign_id.as_str(),
        "{:?}",
        hits[0]
    );

    // --start-line: the lines before it are skipped; verdicts keep the file's line numbers.
    let check = |flag: &str, value: &str| {
        let args = [
            "check",
            "--server",
            &url,
            "--input",
            &input.display().to_string(),
            flag,
            value,
        ];
        run(args.map(String::from).to_vec())
    };
    let o = check("--start-line", "30").await;
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let lines: Vec<u64> = jsonl(&o.stdout)
        .iter()
        .map(|v| v["line"].as_u64().unwrap())
        .collect();
    assert_eq!(lines, (30..=34).collect::<Vec<u64>>());

    // --on-error stop: stops at line 3.
    let o = check("--on-error", "stop").await;
    assert_eq!(o.status.code(), Some(1));
    let lines = jsonl(&o.stdout);
    assert_eq!(lines.len(), 3);
    assert!(lines[2]["error"].is_string());
    let said = String::from_utf8_lossy(&o.stderr);
    assert!(
        said.contains("fix it and go on with --start-line 3"),
        "{said}"
    );

    // An error only the server sees (a prompt over its size limit): the lines sent after it
    // before the stop took effect are stored, so each has its verdict written, and the resume
    // line starts after them.
    let late = dir.path().join("late-error.jsonl");
    let mut f = std::fs::File::create(&late).unwrap();
    for i in 0..40 {
        let prompt = if i == 3 {
            "x".repeat(40_000)
        } else {
            format!("Stopping test prompt {i}: how do glaciers carve valleys?")
        };
        let v = serde_json::json!({"account_id": format!("stop-{i}"), "prompt": prompt});
        writeln!(f, "{v}").unwrap();
    }
    drop(f);
    let o = run([
        "check",
        "--server",
        &url,
        "--input",
        &late.display().to_string(),
        "--on-error",
        "stop",
    ]
    .map(String::from)
    .to_vec())
    .await;
    assert_eq!(o.status.code(), Some(1));
    let said = String::from_utf8_lossy(&o.stderr);
    let lines = jsonl(&o.stdout);
    assert!(
        lines[3]["error"].as_str().unwrap().contains("prompt"),
        "{lines:?}"
    );
    let answered: Vec<&serde_json::Value> =
        lines.iter().filter(|v| v["prompt_id"].is_u64()).collect();
    let last = lines.last().unwrap()["line"].as_u64().unwrap();
    assert_eq!(
        answered.len() as u64,
        last - 1,
        "every line but the bad one: {said}"
    );
    if last > 4 {
        assert!(
            said.contains(&format!(
                "fix line 4 and send it alone, then go on with --start-line {}",
                last + 1
            )),
            "{said}"
        );
    }
    // Nothing is stored without its verdict written.
    let o = run(vec![
        "accounts".into(),
        "--server".into(),
        url.clone(),
        "--format".into(),
        "jsonl".into(),
    ])
    .await;
    let stored = jsonl(&o.stdout)
        .iter()
        .filter(|a| {
            a["account_id"]
                .as_str()
                .unwrap_or_default()
                .starts_with("stop-")
        })
        .count();
    assert_eq!(stored, answered.len(), "{said}");

    // The allow-list through the binary: a campaign cleared by its id, listed, then removed,
    // and the removal names the campaign that scores again.
    let allow = |args: &[&str]| {
        run([
            vec!["allow".to_string()],
            args.iter().map(|a| a.to_string()).collect(),
            server_args(),
        ]
        .concat())
    };
    let o = allow(&["add", "--campaign", &campaign_id, "--note", "a known app"]).await;
    let (out, said) = (
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
    );
    assert!(
        o.status.success() && out.starts_with("allowed entry 1  ") && out.contains("<*>"),
        "{out}{said}"
    );
    assert_eq!(said, "allow: 1 campaign cleared\n");
    let o = allow(&["list"]).await;
    let listed = String::from_utf8_lossy(&o.stdout);
    assert!(
        listed.starts_with("entry 1  ") && listed.contains("(note: \"a known app\", added "),
        "{listed}"
    );
    assert_eq!(String::from_utf8_lossy(&o.stderr), "allow: 1 template(s)\n");
    let o = run([vec!["campaigns".into()], server_args(), jsonl_args()].concat()).await;
    assert!(
        jsonl(&o.stdout)
            .iter()
            .all(|c| c["campaign_id"] != campaign_id.as_str())
    );
    let o = allow(&["remove", "1"]).await;
    let (out, said) = (
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
    );
    assert!(out.starts_with("removed entry 1  "), "{out}");
    assert_eq!(
        said,
        format!("allow: 1 campaign scores again: {campaign_id} (`campaigns --id N`)\n")
    );
    let o = allow(&["remove", "1"]).await;
    assert_eq!(
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stderr).contains("NOT_FOUND")
        ),
        (Some(2), true)
    );
    server.stop().await;

    // A bad flag value is a clear error, not a panic.
    let o = run(vec!["serve".into(), "--device".into(), "tpu".into()]).await;
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("unknown device"));
}

/// Lines of a table on stdout, none of which may hold a control character (the line ends aside)
/// or a bidirectional override.
fn assert_terminal_safe(what: &str, stdout: &[u8]) -> String {
    let text = String::from_utf8_lossy(stdout).into_owned();
    assert!(!text.trim().is_empty(), "{what}: empty table");
    for line in text.lines() {
        assert!(
            !line.chars().any(|c| c.is_control() || c == '\u{202e}'),
            "{what}: {line:?}"
        );
    }
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tables_show_escape_sequences_in_prompts_escaped_and_jsonl_keeps_them() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(config(&dir.path().join("data"))).await;
    let url = format!("http://{}", server.addr);
    // A campaign whose fixed wording sets the analyst's clipboard (OSC 52), hides what follows
    // (SGR 8) and reverses its direction (right-to-left override); the newline would break a
    // search result's row in two.
    let attack = "\u{1b}]52;c;ZXZpbA==\u{7}\u{1b}[8m\u{202e}";
    let input = dir.path().join("traffic.jsonl");
    let mut f = std::fs::File::create(&input).unwrap();
    for i in 0..24 {
        let prompt = format!("{attack}\n{}", templated(i));
        let v = serde_json::json!({"account_id": format!("bot-{}", i % 8), "prompt": prompt, "timestamp_ms": 1_750_000_001_000i64 + i as i64});
        writeln!(f, "{v}").unwrap();
    }
    drop(f);
    let o = check_to_file(&url, &input, &dir.path().join("verdicts.jsonl")).await;
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    let server_args = || vec!["--server".to_string(), url.clone()];
    let o = run([vec!["campaigns".into()], server_args()].concat()).await;
    let table = assert_terminal_safe("campaigns", &o.stdout);
    assert!(
        table
            .contains("template: \\u{1b}]52;c;ZXZpbA==\\u{7}\\u{1b}[8m\\u{202e} You are an expert"),
        "{table}"
    );
    let o = run([
        vec!["campaigns".into()],
        server_args(),
        vec!["--format".into(), "jsonl".into()],
    ]
    .concat())
    .await;
    let campaigns = jsonl(&o.stdout);
    assert_eq!(campaigns.len(), 1, "{campaigns:?}");
    assert!(
        campaigns[0]["template"]
            .as_str()
            .unwrap()
            .starts_with(&format!("{attack} You are")),
        "jsonl keeps the exact text: {}",
        campaigns[0]["template"]
    );
    let id = campaigns[0]["campaign_id"].as_str().unwrap().to_string();
    let o = run([vec!["campaigns".into(), "--id".into(), id], server_args()].concat()).await;
    let table = assert_terminal_safe("campaigns --id", &o.stdout);
    assert!(
        table.contains("examples (") && table.contains("    \\u{1b}]52;c;ZXZpbA=="),
        "examples are escaped too: {table}"
    );

    let search = vec![
        "search".into(),
        "--text".into(),
        templated(3),
        "-k".into(),
        "3".into(),
    ];
    let o = run([search.clone(), server_args()].concat()).await;
    let table = assert_terminal_safe("search", &o.stdout);
    assert_eq!(
        table.lines().count(),
        4,
        "a header, a line per hit: {table}"
    );
    assert!(table.starts_with("cosine  id        account "), "{table}");
    assert!(
        table.lines().next().unwrap().ends_with(" campaign  prompt"),
        "{table}"
    );
    let o = run([
        search,
        server_args(),
        vec!["--format".into(), "jsonl".into()],
    ]
    .concat())
    .await;
    let hits = jsonl(&o.stdout);
    assert!(
        hits[0]["prompt"].as_str().unwrap().starts_with(attack),
        "{hits:?}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reindex_builds_a_data_dir_that_serve_opens() {
    let dir = tempfile::tempdir().unwrap();
    let input = traffic_file(dir.path());
    let data = dir.path().join("data");
    let o = run(vec![
        "reindex".into(),
        "--input".into(),
        input.display().to_string(),
        "--data-dir".into(),
        data.display().to_string(),
        "--model".into(),
        model_dir().display().to_string(),
    ])
    .await;
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "two bad lines: {stderr}");
    assert!(
        stderr.contains("line 3:") && stderr.contains("line 6:"),
        "{stderr}"
    );
    assert!(
        stderr.contains("reindex: 32 prompts") && stderr.contains("prompts/s"),
        "{stderr}"
    );
    // Where the ingest time went, phase by phase.
    assert!(
        stderr.contains("s busy: lookup ") && stderr.contains(", index "),
        "{stderr}"
    );
    // The index was checkpointed: the data directory opens without rebuilding anything.
    assert!(
        stderr.contains("index checkpoint written")
            && stderr.contains("(32 active-segment vectors"),
        "{stderr}"
    );
    let engine = open_data_dir(&data);
    let opened = engine.open_stats();
    assert_eq!(
        (
            opened.prompts,
            opened.reloaded,
            opened.rebuilt,
            opened.parts_rebuilt
        ),
        (32, 32, 0, 0),
        "{opened:?}"
    );
    drop(engine);

    let server = TestServer::start(config(&data)).await;
    let mut c = server.client().await;
    let list = c
        .list_campaigns(prompt_radar::proto::ListCampaignsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.campaigns.len(), 1);
    assert_eq!(
        (list.campaigns[0].accounts, list.campaigns[0].prompts),
        (8, 24)
    );
    server.stop().await;

    // Had another model written the directory (its record says so), `serve` with this one
    // refuses it in one line instead of mixing two models' vectors.
    // (The stopped server's last threads may still hold the store for a moment.)
    let store = (0..100)
        .find_map(|_| {
            prompt_radar::store::Store::open(&data)
                .map_err(|_| std::thread::sleep(std::time::Duration::from_millis(50)))
                .ok()
        })
        .expect("the store is released");
    let mut other = 384u32.to_le_bytes().to_vec();
    for i in 0..384 {
        let x: f32 = if i == 7 { 1.0 } else { 0.0 };
        other.extend_from_slice(&x.to_le_bytes());
    }
    other.extend_from_slice(b"models/another-model");
    store.set_meta("model_probe", &other).unwrap();
    drop(store);
    let (data_arg, model) = (
        data.display().to_string(),
        model_dir().display().to_string(),
    );
    let o = run([
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        &data_arg,
        "--model",
        &model,
    ]
    .map(String::from)
    .to_vec())
    .await;
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.starts_with(&format!(
            "prompt-radar: error: data directory {data_arg} holds the vectors of another model (models/another-model: "
        )) && stderr.lines().count() == 1,
        "{stderr}"
    );
}

/// Labelled traffic: two campaigns (a fixed template; a short fixed phrase with per-account
/// sign-offs), organic accounts with real prompts and a popular one-liner sent by many.
fn labelled_file(dir: &std::path::Path) -> std::path::PathBuf {
    let real: Vec<String> = crate::common::read_data("recall_prompts.txt")
        .lines()
        .take(400)
        .map(str::to_string)
        .collect();
    let mut lines: Vec<(i64, Value)> = Vec::new();
    let mut t = 1_750_000_000_000i64;
    let mut push = |account: String, prompt: String, label: &str| {
        t += 1_000;
        lines.push((t, serde_json::json!({"account_id": account, "prompt": prompt, "timestamp_ms": t, "label": label})));
    };
    for i in 0..24 {
        push(format!("tmpl-{}", i % 8), templated(i), "camp-a");
        push(
            format!("phrase-{}", i % 6),
            format!(
                "Summarize this dialogue:\n{}\nAre they duplicates?\nsent by agent {}",
                real[200 + i],
                i % 6
            ),
            "camp-b",
        );
    }
    for (i, p) in real.iter().take(120).enumerate() {
        push(format!("person-{}", i % 40), p.clone(), "organic");
        if i % 4 == 0 {
            push(
                format!("person-{}", i % 40),
                "tell me a joke".into(),
                "organic",
            );
        }
    }
    let path = dir.join("labelled.jsonl");
    let mut f = std::fs::File::create(&path).unwrap();
    for (_, v) in &lines {
        writeln!(f, "{v}").unwrap();
    }
    path
}

/// A campaign sent one account after another, its slots real instructions (alpaca_eval): the
/// verdicts must not depend on how the stream is batched. QA found the last account flagged at
/// batch size 1 and missed at 256: in a big batch a prompt's lookups see every earlier prompt of
/// the batch, and the first prompt took all of them as cross-account targets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eval_verdicts_do_not_depend_on_the_batch_size() {
    let dir = tempfile::tempdir().unwrap();
    let source = crate::common::repo_dir().join("eval/data/organic/alpaca_eval.jsonl");
    let slots: Vec<String> = std::fs::read_to_string(&source)
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["text"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .filter(|t| (81..400).contains(&t.len()))
        .take(40)
        .collect();
    assert_eq!(slots.len(), 40, "{}", source.display());
    let input = dir.path().join("in-turn.jsonl");
    let mut f = std::fs::File::create(&input).unwrap();
    for (i, slot) in slots.iter().enumerate() {
        let prompt = format!(
            "Please act as a careful senior math tutor today. Solve the following problem and \
             show every step clearly: {slot} Give the final answer on its own line at the very end."
        );
        let line = serde_json::json!({"account_id": format!("c-{}", i / 10), "prompt": prompt,
                                      "timestamp_ms": 1_750_000_000_000i64 + i as i64 * 1000,
                                      "label": "campaign"});
        writeln!(f, "{line}").unwrap();
    }
    drop(f);
    let mut outcomes = Vec::new();
    for batch in ["1", "256"] {
        let out = dir.path().join(format!("accounts-{batch}.jsonl"));
        let o = run(vec![
            "eval".into(),
            "--input".into(),
            input.display().to_string(),
            "--model".into(),
            model_dir().display().to_string(),
            "--batch-size".into(),
            batch.into(),
            "--accounts-out".into(),
            out.display().to_string(),
        ])
        .await;
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let mut accounts: Vec<(String, bool, u64)> = jsonl(&std::fs::read(&out).unwrap())
            .iter()
            .map(|a| {
                let id = a["account_id"].as_str().unwrap().to_string();
                (
                    id,
                    a["flagged"] == true,
                    a["campaign_prompts"].as_u64().unwrap(),
                )
            })
            .collect();
        accounts.sort();
        outcomes.push(accounts);
    }
    assert_eq!(outcomes[0], outcomes[1], "batch size 1, then 256");
    assert!(
        outcomes[1]
            .iter()
            .all(|(_, flagged, n)| *flagged && *n == 10),
        "{:?}",
        outcomes[1]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eval_gives_the_same_verdicts_as_serve_check_and_accounts() {
    let dir = tempfile::tempdir().unwrap();
    let input = labelled_file(dir.path());
    let acc_out = dir.path().join("eval-accounts.jsonl");
    let json_out = dir.path().join("eval.json");
    let model = model_dir().display().to_string();
    let o = run(vec![
        "eval".into(),
        "--input".into(),
        input.display().to_string(),
        "--model".into(),
        model,
        "--accounts-out".into(),
        acc_out.display().to_string(),
        "--json".into(),
        json_out.display().to_string(),
    ])
    .await;
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        stdout.contains("minhash-lsh") && stdout.contains("exact-hash"),
        "{stdout}"
    );
    let eval_lines = jsonl(&std::fs::read(&acc_out).unwrap());
    let listed: std::collections::BTreeSet<&str> = eval_lines
        .iter()
        .flat_map(|v| v["campaigns"].as_array().unwrap())
        .map(|c| c.as_str().unwrap())
        .collect();
    // The two templates are listed apart, and no organic account is credited in them.
    let metrics: Value = serde_json::from_slice(&std::fs::read(&json_out).unwrap()).unwrap();
    let mix = &metrics["prompt_radar_campaigns"];
    assert_eq!(mix["listed"].as_u64(), Some(listed.len() as u64), "{mix}");
    assert!(listed.len() >= 2, "{listed:?}");
    assert_eq!(
        (mix["merged"].as_u64(), mix["organic_credited"].as_u64()),
        (Some(0), Some(0))
    );
    assert!(
        stdout.contains(&format!(
            "campaigns listed {}, 0 of them merging",
            listed.len()
        )),
        "{stdout}"
    );
    // Campaign ids are strings here too, as in `accounts --format jsonl`.
    assert!(
        eval_lines.iter().any(|v| v["flagged"] == true)
            && eval_lines
                .iter()
                .filter(|v| v["flagged"] == true)
                .all(|v| v["campaigns"][0].is_string()),
        "{eval_lines:?}"
    );
    let by_eval: std::collections::BTreeMap<String, (bool, String)> = eval_lines
        .into_iter()
        .map(|v| {
            (
                v["account_id"].as_str().unwrap().to_string(),
                (
                    v["flagged"].as_bool().unwrap(),
                    v["label"].as_str().unwrap().to_string(),
                ),
            )
        })
        .collect();
    assert_eq!(by_eval.len(), 8 + 6 + 40);

    let server = TestServer::start(config(&dir.path().join("data"))).await;
    let url = format!("http://{}", server.addr);
    let o = check_to_file(&url, &input, &dir.path().join("verdicts.jsonl")).await;
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = run(vec![
        "accounts".into(),
        "--server".into(),
        url,
        "--format".into(),
        "jsonl".into(),
    ])
    .await;
    assert!(o.status.success());
    let by_server: std::collections::BTreeMap<String, bool> = jsonl(&o.stdout)
        .into_iter()
        .map(|v| {
            (
                v["account_id"].as_str().unwrap().to_string(),
                v["flagged"].as_bool().unwrap(),
            )
        })
        .collect();
    let eval_flags: std::collections::BTreeMap<String, bool> =
        by_eval.iter().map(|(a, (f, _))| (a.clone(), *f)).collect();
    assert_eq!(by_server, eval_flags, "serve + check + accounts == eval");

    // And the numbers eval printed follow from those verdicts: every campaign account flagged,
    // no organic one.
    let ours = &metrics["prompt_radar"];
    let tp = by_eval
        .values()
        .filter(|(f, l)| *f && l != "organic")
        .count();
    let fp = by_eval
        .values()
        .filter(|(f, l)| *f && l == "organic")
        .count();
    assert_eq!(
        (ours["tp"].as_u64(), ours["fp"].as_u64()),
        (Some(tp as u64), Some(fp as u64))
    );
    assert_eq!((tp, fp), (14, 0), "{by_eval:?}");
    server.stop().await;
}

/// `serve` on a port that is taken, or on a data directory another process holds open, exits 2
/// with one line that says what failed, each cause once.
#[test]
fn serve_refuses_a_busy_port_or_data_dir_with_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let model = model_dir().display().to_string();
    // The last line `serve` prints before it exits with status 2.
    let refused = |listen: &str, data: &std::path::Path| {
        let data = data.display().to_string();
        let args = [
            "serve",
            "--listen",
            listen,
            "--data-dir",
            &data,
            "--model",
            &model,
        ];
        let o = bin(&args);
        let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
        assert_eq!(o.status.code(), Some(2), "{stderr}");
        stderr.lines().last().unwrap_or_default().to_string()
    };
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let listen = taken.local_addr().unwrap().to_string();
    let line = refused(&listen, &dir.path().join("a"));
    assert!(
        line.starts_with(&format!("prompt-radar: error: cannot listen on {listen}: ")),
        "{line}"
    );
    let cause = line.rsplit(": ").next().unwrap();
    assert_eq!(line.matches(cause).count(), 1, "{line}");
    assert!(
        !dir.path().join("a").exists(),
        "the data directory is not created for a server that cannot listen"
    );

    let held = dir.path().join("b");
    let _store = prompt_radar::store::Store::open(&held).unwrap();
    let line = refused("127.0.0.1:0", &held);
    assert_eq!(
        line,
        format!(
            "prompt-radar: error: store: {} is in use by another process (a running `serve`, `reindex` or `eval`?); one process at a time opens a data directory",
            held.display()
        )
    );

    // An empty token (a secret that did not resolve) does not silently turn authentication off.
    let o = Command::new(env!("CARGO_BIN_EXE_prompt-radar"))
        .args(["serve", "--listen", "127.0.0.1:0", "--model", &model])
        .arg("--data-dir")
        .arg(dir.path().join("c"))
        .env("PROMPT_RADAR_AUTH_TOKEN", "")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("--auth-token (PROMPT_RADAR_AUTH_TOKEN) is empty"),
        "{stderr}"
    );
}

/// One line of a stored dump that is not UTF-8 costs that line, not the run.
#[test]
fn reindex_reports_a_line_that_is_not_utf8_and_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("dump.jsonl");
    let mut bytes = Vec::new();
    for (i, p) in ORGANIC.iter().take(3).enumerate() {
        let v = serde_json::json!({"account_id": format!("u{i}"), "prompt": p, "timestamp_ms": 1_750_000_001_000i64 + i as i64});
        writeln!(bytes, "{v}").unwrap();
        if i == 0 {
            bytes.extend_from_slice(b"{\"account_id\": \"u9\", \"prompt\": \"caf\xe9 latin-1\"}\n");
        }
    }
    std::fs::write(&input, bytes).unwrap();
    let (input, model) = (
        input.display().to_string(),
        model_dir().display().to_string(),
    );
    let reindex_into = |name: &str, more: &[&str]| {
        let data = dir.path().join(name).display().to_string();
        let args = [
            "reindex",
            "--input",
            &input,
            "--data-dir",
            &data,
            "--model",
            &model,
        ];
        bin(&[&args[..], more].concat())
    };
    let o = reindex_into("data", &[]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "a bad line: {stderr}");
    assert!(
        stderr.contains("line 2: not valid UTF-8 (at byte 36 of the line)"),
        "{stderr}"
    );
    assert!(
        stderr.contains("reindex: 3 prompts") && stderr.contains("1 bad lines"),
        "{stderr}"
    );

    // --on-error stop: line 1 is stored, line 2 is the one to fix, and the last line says so.
    let o = reindex_into("stopped", &["--on-error", "stop"]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{stderr}");
    assert_eq!(
        stderr.lines().last().unwrap_or_default(),
        "reindex: the lines before line 2 are stored and indexed; line 2 is not: fix it and go on with --start-line 2 (the same command)",
        "{stderr}"
    );

    // The server's --max-prompt-bytes holds here too: a prompt over it is a bad line.
    let o = reindex_into("limited", &["--max-prompt-bytes", "55"]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("line 3: prompt: 63 bytes exceeds the limit of 55")
            && stderr.contains("reindex: 2 prompts")
            && stderr.contains("2 bad lines"),
        "{stderr}"
    );
    assert_eq!(open_data_dir(&dir.path().join("limited")).len(), 2);
}

/// `reindex --input - --data-dir data` with `more` flags, fed `input` through a pipe.
fn reindex_piped(input: &std::path::Path, data: &std::path::Path, more: &[&str]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_prompt-radar"))
        .args(["reindex", "--input", "-", "--data-dir"])
        .arg(data)
        .arg("--model")
        .arg(model_dir())
        .args(more)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(&std::fs::read(input).unwrap())
        .unwrap();
    child.wait_with_output().unwrap()
}

/// `reindex --input -` reads standard input once, as it comes: counting its lines first would
/// drain the pipe and leave nothing to store.
#[test]
fn reindex_reads_standard_input() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("prompts.jsonl");
    prompts_file(&input, 30);
    let data = dir.path().join("data");
    let o = reindex_piped(&input, &data, &[]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    assert!(
        stderr.contains("standard input (-) is not a regular file: it is read once")
            && stderr.contains("reindex: 30 prompts"),
        "{stderr}"
    );
    assert_eq!(open_data_dir(&data).len(), 30);
    let reindex_file = |path: &std::path::Path| {
        bin(&[
            "reindex",
            "--input",
            &path.display().to_string(),
            "--data-dir",
            &data.display().to_string(),
            "--model",
            &model_dir().display().to_string(),
        ])
    };
    // The same file again from line 1 (a run killed part way, started again) would be stored
    // twice: refused, naming where to go on. (Its lines have no times: matched without.)
    let o = reindex_file(&input);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "lines 1-30 of {} are stored already (prompts 1-30 of the data dir",
            input.display()
        )) && stderr.contains("to go on: the same command with --start-line 31"),
        "{stderr}"
    );
    assert_eq!(open_data_dir(&data).len(), 30);
    // A new file whose first line repeats a stored prompt of its account ("Hi!" sent again),
    // without times, is no rerun: one line proves nothing.
    let again = dir.path().join("again.jsonl");
    let first = std::fs::read_to_string(&input).unwrap();
    let first = first.lines().next().unwrap();
    std::fs::write(
        &again,
        format!(
            "{first}\n{}\n",
            serde_json::json!({"account_id": "someone-new", "prompt": "What is the boiling point of water on Everest?"})
        ),
    )
    .unwrap();
    let o = reindex_file(&again);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(open_data_dir(&data).len(), 32);
    // A pipe cannot be read twice to check it: a note says what to look out for.
    let o = reindex_piped(&input, &data, &[]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        stderr.contains("reindex: note: the data dir already holds 32 prompts;")
            && stderr.contains("go on with --start-line instead"),
        "{stderr}"
    );
    // A pipe that ends before --start-line says so when it ends (a file, before it starts).
    let o = reindex_piped(&input, &data, &["--start-line", "31"]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    assert!(
        stderr.contains("reindex: the input ended before line 31 (--start-line): nothing to do"),
        "{stderr}"
    );
}

/// A file reindexed again after a run that was killed part way (here: its first 150 lines went
/// in) is refused, with the line to go on from; going on from there, or another file, stores
/// every line once.
#[test]
fn reindex_of_a_file_whose_first_lines_are_stored_names_where_to_go_on() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let args = reindex_of_a_dump(dir.path(), 200, 32);
    let input = dir.path().join("dump.jsonl");
    let all = std::fs::read_to_string(&input).unwrap();
    let lines: Vec<&str> = all.lines().collect();
    // The killed run stored lines 1-150: a file of them (and a bad line, never stored).
    let head = dir.path().join("head.jsonl");
    let mut text = lines[..150].join("\n") + "\n";
    text.insert_str(0, "{not json\n");
    std::fs::write(&head, &text).unwrap();
    let with_input = |path: &std::path::Path, more: &[&str]| {
        let mut a: Vec<String> = args.clone();
        a[2] = path.display().to_string();
        a.extend(more.iter().map(|s| s.to_string()));
        bin(&a.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let o = with_input(&head, &[]);
    assert_eq!(
        o.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    // The whole file with a bad first line too: line numbers are the file's.
    let mut full = String::from("{not json\n");
    full.push_str(&all);
    std::fs::write(&input, &full).unwrap();
    let o = with_input(&input, &[]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("lines 1-151 of ")
            && stderr.contains("(prompts 1-150 of the data dir")
            && stderr.contains("to go on: the same command with --start-line 152;"),
        "{stderr}"
    );
    assert_eq!(open_data_dir(&data).len(), 150, "nothing stored twice");
    let o = with_input(&input, &["--start-line", "152"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let engine = open_data_dir(&data);
    assert_eq!(engine.len(), 200);
    drop(engine);
    // Another file into the same data dir is added to it, as before.
    let other = dir.path().join("other.jsonl");
    prompts_file(&other, 10);
    let o = with_input(&other, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(open_data_dir(&data).len(), 210);
}

/// `reindex --input -` fed by a writer that goes quiet (a log tail, a queue consumer) stores what
/// came, and SIGTERM stops it at once, naming where to go on: before, the stop waited for a next
/// line that might never come.
#[test]
fn reindex_of_a_quiet_pipe_stops_at_once_when_told() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("prompts.jsonl");
    prompts_file(&input, 12);
    let data = dir.path().join("data");
    let mut child = Command::new(env!("CARGO_BIN_EXE_prompt-radar"))
        .args(["reindex", "--input", "-", "--data-dir"])
        .arg(&data)
        .arg("--model")
        .arg(model_dir())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // A bad line and twelve good ones, and the writer stays, silent.
    let mut writer = child.stdin.take().unwrap();
    writer.write_all(b"not json\n").unwrap();
    writer.write_all(&std::fs::read(&input).unwrap()).unwrap();
    let mut stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut seen = String::new();
    while !seen.contains("ready in") {
        assert!(stderr.read_line(&mut seen).unwrap() > 0, "{seen}");
    }
    std::thread::sleep(std::time::Duration::from_secs(1));
    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    ended_within(
        &mut child,
        std::time::Duration::from_secs(30),
        "reindex of a quiet pipe after SIGTERM",
    );
    std::io::Read::read_to_string(&mut stderr, &mut seen).unwrap();
    drop(writer);
    assert_eq!(child.wait().unwrap().code(), Some(1), "{seen}");
    assert!(seen.contains("reindex: stopping:"), "{seen}");
    let next = number_after(&seen, "the same command with --start-line ");
    let summary = seen
        .lines()
        .find(|l| l.contains(" prompts in "))
        .unwrap_or_default();
    // (On a busy machine the signal can come before the first line: nothing stored.)
    let stored = next.saturating_sub(2);
    assert_eq!(number_after(summary, "reindex: "), stored, "{seen}");
    assert!(next <= 14, "{seen}");
    assert_eq!(open_data_dir(&data).len(), stored as u64, "{seen}");
    if next > 1 {
        assert!(
            seen.contains(&format!("the lines before line {next} are stored and indexed, but for the 1 bad line reported above; to go on: the same command with --start-line {next}")),
            "{seen}"
        );
    }
}

/// With time-sliced segments (`--retention-days`), an input sorted by account instead of by time
/// goes back in time with every account. A rule on each segment's own oldest and newest time
/// sealed a segment of about a batch each time; the slice clock puts each account's older lines
/// into the slice being filled, and `reindex`, which reads the times first, says how many and
/// why it matters. The same lines in time order are sliced by day.
#[test]
fn reindex_of_traffic_out_of_time_order_does_not_slice_the_index_by_time() {
    const HOUR: i64 = 3_600_000;
    let dir = tempfile::tempdir().unwrap();
    let real = crate::common::read_data("recall_prompts.txt");
    // 30 accounts, 10 prompts each, 7 hours apart (2.6 days of traffic), one account after
    // the other.
    let mut lines: Vec<(i64, String)> = real
        .lines()
        .take(300)
        .enumerate()
        .map(|(i, p)| {
            let (account, n) = (i / 10, (i % 10) as i64);
            let t = 1_750_000_000_000 + n * 7 * HOUR + account as i64 * 1_000;
            let v = serde_json::json!({"account_id": format!("u{account}"), "prompt": p, "timestamp_ms": t});
            (t, v.to_string())
        })
        .collect();
    let model = model_dir().display().to_string();
    let reindex_with = |name: &str, lines: &[(i64, String)], slicing: &[&str]| {
        let input = dir.path().join(format!("{name}.jsonl"));
        let text: Vec<&str> = lines.iter().map(|(_, l)| l.as_str()).collect();
        std::fs::write(&input, text.join("\n")).unwrap();
        let data = dir.path().join(name).display().to_string();
        let o = bin(&[
            "reindex",
            "--input",
            &input.display().to_string(),
            "--data-dir",
            &data,
            "--model",
            &model,
            "--batch-size",
            "16",
        ]
        .into_iter()
        .chain(slicing.iter().copied())
        .collect::<Vec<_>>());
        let stderr = String::from_utf8_lossy(&o.stderr).to_string();
        assert_eq!(o.status.code(), Some(0), "{stderr}");
        let segments = number_after(&stderr, "`serve` reloads them); ");
        (stderr, segments)
    };
    let reindex_kept = |name: &str, lines: &[(i64, String)], days: &str| {
        reindex_with(name, lines, &["--retention-days", days])
    };
    let reindex = |name: &str, lines: &[(i64, String)]| reindex_kept(name, lines, "365");
    let (said, segments) = reindex("by-account", &lines);
    assert!(
        said.contains("reindex: the input is not in time order (line 21 is 2.6 days older than a line before it): ")
            && said.contains("of 300 lines")
            && said.contains("would go into an index segment with prompts over 48 h newer, and retention keeps them"),
        "{said}"
    );
    assert!(segments <= 2, "{said}");
    // Sliced by time without retention: nothing is kept past its time, so it does not say so.
    let (said, _) = reindex_with(
        "by-account-no-retention",
        &lines,
        &["--segment-hours", "24"],
    );
    assert!(
        said.contains("would go into an index segment with prompts over 48 h newer, which only makes that segment span more time")
            && !said.contains("retention keeps"),
        "{said}"
    );
    lines.sort();
    let (said, segments) = reindex("by-time", &lines);
    assert!(!said.contains("not in time order"), "{said}");
    assert!(segments >= 2, "sliced by day: {said}");
    assert!(!said.contains("past --retention-days"), "{said}");
    // Kept a day, 2.6 days of traffic: the older days' segments are dropped, and it says so.
    let (said, _) = reindex_kept("a-day", &lines, "1");
    let gone = said
        .lines()
        .find(|l| l.contains("past --retention-days"))
        .unwrap_or_else(|| panic!("{said}"));
    let n = number_after(gone, "reindex: ");
    assert!(
        n > 0 && n < 300 && gone.contains(&format!("{n} of the 300 stored prompts")),
        "{gone}"
    );
    assert_eq!(
        open_data_dir(&dir.path().join("a-day")).census().index.1,
        300 - n as u64
    );
}

/// The engine on a data directory that the binary wrote (384-d: the model's).
fn open_data_dir(data: &std::path::Path) -> prompt_radar::engine::Engine {
    prompt_radar::engine::Engine::open(config(data).engine, 384).unwrap()
}

/// The number in `text` right after the first `before`.
fn number_after(text: &str, before: &str) -> usize {
    let rest = text
        .split_once(before)
        .unwrap_or_else(|| panic!("no {before:?} in {text}"))
        .1;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits
        .parse()
        .unwrap_or_else(|_| panic!("no number after {before:?} in {text}"))
}

/// Runs `command` until it says it is "ready in" (its signal handlers are in place by then), then
/// runs `before_signal`, sends SIGINT and returns the exit code and all of stderr.
fn interrupted_when_ready(command: Command, before_signal: impl FnOnce()) -> (Option<i32>, String) {
    interrupted_at(command, &["ready in"], before_signal)
}

/// Sends SIGINT to `command` each time its stderr says the next of `cues` (`before_signal` runs
/// before the first); returns the exit code and all of stderr.
fn interrupted_at(
    mut command: Command,
    cues: &[&str],
    before_signal: impl FnOnce(),
) -> (Option<i32>, String) {
    use std::io::{BufRead, Read};
    let mut child = command
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut seen = String::new();
    let mut before_signal = Some(before_signal);
    for cue in cues {
        while !seen.contains(cue) {
            let read = stderr.read_line(&mut seen).unwrap();
            assert!(read > 0, "it ended before saying {cue:?}: {seen}");
        }
        if let Some(f) = before_signal.take() {
            f();
        }
        let kill = Command::new("kill")
            .args(["-INT", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(kill.success());
    }
    stderr.read_to_string(&mut seen).unwrap();
    (child.wait().unwrap().code(), seen)
}

/// Writes `dir/dump.jsonl`: `lines` real prompts (again, numbered, past the corpus's end) from 50
/// accounts, one a millisecond. Returns the arguments of a `reindex` of it into `dir/data` in
/// batches of `batch`.
fn reindex_of_a_dump(dir: &std::path::Path, lines: usize, batch: usize) -> Vec<String> {
    let input = dir.join("dump.jsonl");
    let mut f = std::fs::File::create(&input).unwrap();
    let real = crate::common::read_data("recall_prompts.txt");
    let real: Vec<&str> = real.lines().collect();
    for i in 0..lines {
        let p = match i / real.len() {
            0 => real[i].to_string(),
            n => format!("{} (request {n})", real[i % real.len()]),
        };
        let v = serde_json::json!({"account_id": format!("u{}", i % 50), "prompt": p, "timestamp_ms": 1_750_000_001_000i64 + i as i64});
        writeln!(f, "{v}").unwrap();
    }
    [
        "reindex".to_string(),
        "--input".into(),
        input.display().to_string(),
        "--data-dir".into(),
        dir.join("data").display().to_string(),
        "--model".into(),
        model_dir().display().to_string(),
        "--batch-size".into(),
        batch.to_string(),
    ]
    .into()
}

/// Ctrl-C on `reindex` stops after the lines already read, says which line to go on from, and
/// going on from there stores every line exactly once.
#[test]
fn reindex_stops_on_ctrl_c_and_goes_on_from_the_line_it_names() {
    const LINES: usize = 400;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let args = reindex_of_a_dump(dir.path(), LINES, 16);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut reindex = Command::new(env!("CARGO_BIN_EXE_prompt-radar"));
    reindex.args(&args);
    let (code, seen) = interrupted_when_ready(reindex, || {});
    assert_eq!(code, Some(1), "interrupted: {seen}");
    assert!(seen.contains("reindex: stopping:"), "{seen}");
    let next = number_after(&seen, "the same command with --start-line ");
    // Part way; on a busy machine the signal can come before the first line is read (next 1).
    assert!(next <= LINES, "stopped part way: {seen}");
    assert!(
        (seen.lines().last().unwrap_or_default()).contains("--start-line"),
        "where to go on is the last line: {seen}"
    );
    let summary = seen
        .lines()
        .find(|l| l.contains(" prompts in "))
        .unwrap_or_default();
    assert_eq!(
        number_after(summary, "reindex: "),
        next - 1,
        "every line before {next} stored: {seen}"
    );

    let start = next.to_string();
    let o = bin(&[&args[..], &["--start-line", &start]].concat());
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains(&format!("({} prompts already stored)", next - 1))
            && stderr.contains(&format!("reindex: starting at line {next}"))
            && stderr.contains(&format!("reindex: {} prompts in", LINES + 1 - next)),
        "{stderr}"
    );
    let engine = open_data_dir(&data);
    assert_eq!(engine.len(), LINES as u64, "each line stored once");
}

/// A second Ctrl-C quits at once, and still says which line to go on from: the lines before it
/// are in the store (the next start indexes them), the ones from it are not.
#[test]
fn reindex_stopped_at_once_by_a_second_ctrl_c_names_the_line_to_go_on_from() {
    const LINES: usize = 600;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let args = reindex_of_a_dump(dir.path(), LINES, 64);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut reindex = Command::new(env!("CARGO_BIN_EXE_prompt-radar"));
    reindex.args(&args);
    // Once it says it is stopping, the first signal is taken; the second ends it while the
    // lines read so far are still being embedded and stored (or checkpointed).
    let (code, seen) = interrupted_at(reindex, &["ready in", "reindex: stopping:"], || {});
    assert_eq!(code, Some(130), "{seen}");
    let last = seen.lines().last().unwrap_or_default();
    // Before the first batch was stored, there is nothing to count: the same command again.
    let next = if last
        == "reindex: stopped at once (second signal); nothing was stored: to go on, the same command"
    {
        1
    } else {
        assert!(
            last.starts_with("reindex: stopped at once (second signal); the lines before line "),
            "{seen}"
        );
        number_after(last, "the same command with --start-line ")
    };
    assert!(next <= LINES, "{seen}");

    let start = next.to_string();
    let o = bin(&[&args[..], &["--start-line", &start]].concat());
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains(&format!("({} prompts already stored)", next - 1)),
        "every line before {next} was stored, none after it: {stderr}"
    );
    let engine = open_data_dir(&data);
    assert_eq!(engine.len(), LINES as u64, "each line stored once");
}

/// The first Ctrl-C is answered at once, not after the batch being embedded: a run in one large
/// batch says it is stopping while that batch is still embedded, so a second Ctrl-C then finds
/// nothing stored, and its line follows the first's (no blank line where the first was missing).
#[test]
fn reindex_says_it_is_stopping_while_its_first_batch_is_embedded() {
    const LINES: usize = 4000;
    let dir = tempfile::tempdir().unwrap();
    let args = reindex_of_a_dump(dir.path(), LINES, LINES);
    let mut reindex = Command::new(env!("CARGO_BIN_EXE_prompt-radar"));
    reindex.args(&args);
    let (code, seen) = interrupted_at(reindex, &["ready in", "reindex: stopping:"], || {});
    assert_eq!(code, Some(130), "{seen}");
    let lines: Vec<&str> = seen.lines().collect();
    assert!(lines.iter().all(|l| !l.trim().is_empty()), "{seen}");
    let at = lines.len() - 1;
    assert!(lines[at - 1].starts_with("reindex: stopping:"), "{seen}");
    assert_eq!(
        lines[at],
        "reindex: stopped at once (second signal); nothing was stored: to go on, the same command",
        "{seen}"
    );
    assert_eq!(open_data_dir(&dir.path().join("data")).len(), 0, "{seen}");
}

/// Ctrl-C stops an `eval` (its metrics need the whole stream) and removes its temporary data
/// directory, which a large evaluation fills with ~100 MB.
#[test]
fn eval_stops_on_ctrl_c_and_leaves_no_temporary_data() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("labelled.jsonl");
    let mut f = std::fs::File::create(&input).unwrap();
    let real = crate::common::read_data("recall_prompts.txt");
    for (i, p) in real.lines().take(400).enumerate() {
        let v = serde_json::json!({"account_id": format!("u{}", i % 50), "prompt": p, "timestamp_ms": 1_750_000_001_000i64 + i as i64, "label": "organic"});
        writeln!(f, "{v}").unwrap();
    }
    drop(f);
    let tmp = dir.path().join("tmp");
    std::fs::create_dir(&tmp).unwrap();
    let (input, model) = (
        input.display().to_string(),
        model_dir().display().to_string(),
    );
    let eval_of_input = || {
        let mut eval = Command::new(env!("CARGO_BIN_EXE_prompt-radar"));
        eval.args([
            "eval",
            "--input",
            &input,
            "--model",
            &model,
            "--batch-size",
            "16",
        ]);
        eval
    };
    let mut eval = eval_of_input();
    eval.env("TMPDIR", &tmp);
    let (code, seen) = interrupted_when_ready(eval, || {
        assert_eq!(std::fs::read_dir(&tmp).unwrap().count(), 1, "its data dir");
    });
    assert_eq!(code, Some(2), "{seen}");
    assert!(
        seen.contains("eval: stopping:") && seen.contains("error: eval: interrupted"),
        "{seen}"
    );
    let left: Vec<_> = std::fs::read_dir(&tmp).unwrap().collect();
    assert!(left.is_empty(), "temporary data left behind: {left:?}");

    // With --data-dir on the command line (as with --keep-data) the directory stays,
    // checkpointed, and the message says so.
    let data = dir.path().join("kept");
    let mut eval = eval_of_input();
    eval.arg("--data-dir").arg(&data);
    let (code, seen) = interrupted_when_ready(eval, || {});
    assert_eq!(code, Some(2), "{seen}");
    let kept = number_after(&seen, " keeps the ");
    // (On a busy machine the signal can come before the first line: 0 kept.)
    assert!(
        seen.contains("error: eval: interrupted")
            && seen.contains("checkpointed: `serve` opens it"),
        "{seen}"
    );
    let engine = open_data_dir(&data);
    let stats = engine.open_stats();
    assert_eq!(
        (stats.prompts, stats.restored, stats.rebuilt),
        (kept as u64, kept as u64, 0),
        "{seen}"
    );
    drop(engine);

    // A second signal quits at once and still says what the kept directory holds.
    let data = dir.path().join("kept-abruptly");
    let mut eval = eval_of_input();
    eval.arg("--keep-data").arg("--data-dir").arg(&data);
    let (code, seen) = interrupted_at(eval, &["ready in", "eval: stopping:"], || {});
    assert_eq!(code, Some(130), "{seen}");
    let last = seen.lines().last().unwrap_or_default();
    assert!(
        last.starts_with(&format!(
            "eval: stopped at once (second signal); {} keeps ",
            data.display()
        )),
        "{seen}"
    );
    let kept = if last.contains("keeps no prompt") {
        0
    } else {
        number_after(last, "the lines before line ") - 1
    };
    let engine = open_data_dir(&data);
    assert_eq!(engine.len(), kept as u64, "{seen}");
}

/// Metrics of nothing are no metrics: an empty (or all-blank) file is an error, not a table of
/// zeros.
#[test]
fn eval_of_an_empty_file_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("empty.jsonl");
    std::fs::write(&input, "\n  \n").unwrap();
    let o = bin(&["eval", "--input", &input.display().to_string()]);
    assert_eq!(o.status.code(), Some(2));
    assert_eq!(
        String::from_utf8_lossy(&o.stderr),
        format!(
            "prompt-radar: error: {}: no traffic lines to evaluate\n",
            input.display()
        )
    );
    assert!(o.stdout.is_empty());
}

/// `eval` reads and checks every line before it runs: a line the run would refuse, or labels that
/// contradict each other, would otherwise leave metrics of part of the stream (exit 0).
#[test]
fn eval_refuses_a_file_with_a_line_it_cannot_use_before_running() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("labelled.jsonl");
    let good = |i: usize, account: &str, label: &str| {
        serde_json::json!({"account_id": account, "prompt": format!("prompt {i}"), "timestamp_ms": 1_750_000_000_000i64 + i as i64, "label": label}).to_string()
    };
    let cases = [
        (
            serde_json::json!({"account_id": "a", "prompt": "p", "timestamp_ms": 1_750_000_000, "label": "organic"}).to_string(),
            "line 3: timestamp_ms: 1750000000 is in 1970",
        ),
        (
            serde_json::json!({"account_id": " ", "prompt": "p", "label": "organic"}).to_string(),
            "line 3: account_id: must not be blank",
        ),
        (
            serde_json::json!({"account_id": "a", "prompt": "p", "label": null}).to_string(),
            "line 3: `label` must be",
        ),
        (
            good(3, "b", "camp-x"),
            "line 3: account \"b\" is labelled \"camp-x\" here and \"organic\" on line 2",
        ),
    ];
    for (bad, said) in cases {
        let text = [good(1, "a", "organic"), good(2, "b", "organic"), bad].join("\n");
        std::fs::write(&input, text).unwrap();
        let o = bin(&["eval", "--input", &input.display().to_string()]);
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{stderr}");
        assert!(stderr.contains(said), "{said}: {stderr}");
        assert!(o.stdout.is_empty(), "no metrics");
    }
    // `-` is not standard output for eval's files: the metrics table is.
    let path = input.display().to_string();
    for flag in ["--json", "--accounts-out", "--embed-cache"] {
        let o = bin(&["eval", "--input", &path, flag, "-"]);
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{stderr}");
        assert!(
            stderr.contains(&format!("eval: {flag} takes a file path, not -")),
            "{stderr}"
        );
    }
    // A prompt over --max-prompt-bytes ("prompt 1" has 8).
    let text = [good(1, "a", "organic"), good(2, "b", "organic")].join("\n");
    std::fs::write(&input, text).unwrap();
    let path = input.display().to_string();
    let o = bin(&["eval", "--input", &path, "--max-prompt-bytes", "7"]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("line 1: prompt: 8 bytes exceeds the limit of 7"),
        "{stderr}"
    );
}

/// How many prompts the server at `url` has stored (`stats --format jsonl`).
async fn stored(url: &str) -> u64 {
    let o = run(["stats", "--server", url, "--format", "jsonl"]
        .map(String::from)
        .to_vec())
    .await;
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    jsonl(&o.stdout)[0]["prompts"].as_u64().unwrap()
}

/// Writes `lines` real prompts of 40 accounts to `path`.
fn prompts_file(path: &std::path::Path, lines: usize) {
    let real = crate::common::read_data("recall_prompts.txt");
    let mut f = std::fs::File::create(path).unwrap();
    for (i, p) in real.lines().cycle().take(lines).enumerate() {
        let v = serde_json::json!({"account_id": format!("u{}", i % 40), "prompt": format!("{p} ({i})")});
        writeln!(f, "{v}").unwrap();
    }
}

/// `check` of `input` against `url` with `extra` flags, stdout piped; runs `on_first` once the
/// first verdict is out, then reads the rest. Returns the exit code, the verdict lines read and
/// stderr.
fn check_watched(
    url: &str,
    input: &std::path::Path,
    on_first: impl FnOnce(&mut std::process::Child) -> bool,
) -> (Option<i32>, Vec<Value>, String) {
    use std::io::{BufRead, Read};
    let mut child = Command::new(env!("CARGO_BIN_EXE_prompt-radar"))
        .args([
            "check",
            "--server",
            url,
            "--input",
            &input.display().to_string(),
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    stdout.read_line(&mut first).unwrap();
    let mut lines = vec![first];
    // `on_first` says whether to go on reading stdout (false: it is closed here).
    if on_first(&mut child) {
        lines.extend(stdout.lines().map(Result::unwrap));
    } else {
        drop(stdout);
    }
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    let code = child.wait().unwrap().code();
    let verdicts = lines
        .iter()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    (code, verdicts, stderr)
}

/// `check` never loses what it was given or what it stored: an output path that is the input is
/// refused before anything is written, a server that is down leaves the last output as it was,
/// a pipe is read (not drained by a line count first), and a Ctrl-C or a closed output ends the
/// run with every stored prompt's line accounted for and the line to go on from.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_keeps_its_input_reads_pipes_and_says_where_to_go_on_when_stopped() {
    const LINES: usize = 1500;
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(config(&dir.path().join("data"))).await;
    let url = format!("http://{}", server.addr);
    let input = dir.path().join("prompts.jsonl");
    prompts_file(&input, LINES);
    let bytes = std::fs::read(&input).unwrap();

    // The input as the output (here by another path to the same file): refused, input intact.
    let o = check_to_file(&url, &input, &dir.path().join(".").join("prompts.jsonl")).await;
    let said = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{said}");
    assert!(said.contains("is the input file"), "{said}");
    assert_eq!(std::fs::read(&input).unwrap(), bytes, "the input is kept");
    assert_eq!(stored(&url).await, 0);
    // So is eval's.
    let o = run(vec![
        "eval".into(),
        "--input".into(),
        input.display().to_string(),
        "--accounts-out".into(),
        input.display().to_string(),
    ])
    .await;
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--accounts-out"));
    assert_eq!(std::fs::read(&input).unwrap(), bytes, "the input is kept");
    // Two of eval's outputs on one file: the last written would be all it held.
    let both = dir.path().join("both.out").display().to_string();
    let o = run(vec![
        "eval".into(),
        "--input".into(),
        input.display().to_string(),
        "--json".into(),
        both.clone(),
        "--accounts-out".into(),
        both,
    ])
    .await;
    let said = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{said}");
    assert!(said.contains("name the same file"), "{said}");
    // Standard output appended to the input (`check --input t.jsonl >> t.jsonl`).
    let appended = std::fs::OpenOptions::new()
        .append(true)
        .open(&input)
        .unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_prompt-radar"))
        .args(["check", "--server", &url, "--input"])
        .arg(&input)
        .stdout(appended)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{said}");
    assert!(said.contains("standard output"), "{said}");
    assert_eq!(std::fs::read(&input).unwrap(), bytes, "the input is kept");

    // A server that is down: the last run's output stays as it was.
    let down = down_url();
    let output = dir.path().join("verdicts.jsonl");
    std::fs::write(&output, "{\"line\": 1}\n").unwrap();
    let o = check_to_file(&down, &input, &output).await;
    assert_eq!(o.status.code(), Some(2));
    assert_eq!(std::fs::read_to_string(&output).unwrap(), "{\"line\": 1}\n");

    // A pipe (`-`, standard input), from line 1496 on, to `--output -` (standard output).
    let tail = bytes.clone();
    let url2 = url.clone();
    let o = tokio::task::spawn_blocking(move || {
        let mut child = Command::new(env!("CARGO_BIN_EXE_prompt-radar"))
            .args([
                "check",
                "--server",
                &url2,
                "--input",
                "-",
                "--start-line",
                "1496",
                "--output",
                "-",
            ])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(&tail).unwrap();
        child.wait_with_output().unwrap()
    })
    .await
    .unwrap();
    let said = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{said}");
    assert!(
        said.contains("check: starting at line 1496 (lines 1-1495 skipped, --start-line)"),
        "{said}"
    );
    let lines: Vec<u64> = jsonl(&o.stdout)
        .iter()
        .map(|v| v["line"].as_u64().unwrap())
        .collect();
    assert_eq!(lines, (1496..=1500).collect::<Vec<u64>>(), "{said}");
    assert_eq!(stored(&url).await, 5);

    // Ctrl-C once the first verdict is out: the lines sent are answered and written, the rest
    // are not sent, and the run says where to go on.
    let (url2, input2) = (url.clone(), input.clone());
    let (code, verdicts, said) = tokio::task::spawn_blocking(move || {
        check_watched(&url2, &input2, |child| {
            let kill = Command::new("kill")
                .args(["-INT", &child.id().to_string()])
                .status()
                .unwrap();
            assert!(kill.success());
            true
        })
    })
    .await
    .unwrap();
    assert_eq!(code, Some(1), "{said}");
    assert!(said.contains("check: stopping:"), "{said}");
    let next = number_after(&said, "to go on: the same command with --start-line ");
    assert!(next <= LINES, "stopped part way: {said}");
    let lines: Vec<u64> = verdicts
        .iter()
        .map(|v| v["line"].as_u64().unwrap())
        .collect();
    assert_eq!(lines, (1..next as u64).collect::<Vec<u64>>(), "{said}");
    assert_eq!(
        stored(&url).await,
        5 + next as u64 - 1,
        "every stored prompt has its verdict written: {said}"
    );

    // A quiet pipe (`tail -f … | check --input -`): Ctrl-C stops at once, without waiting for
    // a line that may never come.
    let first_line = bytes.iter().position(|&b| b == b'\n').unwrap() + 1;
    let (url2, head) = (url.clone(), bytes[..first_line].to_vec());
    let before = stored(&url).await;
    let (code, said, verdicts) = tokio::task::spawn_blocking(move || {
        use std::io::BufRead;
        let mut child = Command::new(env!("CARGO_BIN_EXE_prompt-radar"))
            .args(["check", "--server", &url2, "--input", "-"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(&head).unwrap();
        stdin.flush().unwrap();
        // Its verdict comes out only at the end (stdout is buffered): wait until it is stored.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let until = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while runtime.block_on(stored(&url2)) == before {
            assert!(
                std::time::Instant::now() < until,
                "the line was never stored"
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        let pid = child.id().to_string();
        Command::new("kill").args(["-INT", &pid]).status().unwrap();
        let limit = std::time::Duration::from_secs(60);
        ended_within(&mut child, limit, "check on its quiet input");
        drop(stdin);
        let o = child.wait_with_output().unwrap();
        let verdicts = o.stdout.lines().count();
        let said = String::from_utf8_lossy(&o.stderr).to_string();
        (o.status.code(), said, verdicts)
    })
    .await
    .unwrap();
    assert_eq!((code, verdicts), (Some(1), 1), "{said}");
    assert!(
        said.contains("to go on: the same command with --start-line 2"),
        "{said}"
    );
    assert_eq!(stored(&url).await, before + 1);

    // The output closed after one verdict (`check | head -1`): an error naming where to go on,
    // and every line before it is stored.
    let before = stored(&url).await;
    let (url2, input2) = (url.clone(), input.clone());
    let (code, _, said) =
        tokio::task::spawn_blocking(move || check_watched(&url2, &input2, |_| false))
            .await
            .unwrap();
    assert_eq!(code, Some(2), "{said}");
    assert!(said.contains("cannot write stdout"), "{said}");
    let next = number_after(&said, "to go on: the same command with --start-line ");
    assert!(next > 1 && next <= LINES, "{said}");
    assert_eq!(stored(&url).await, before + next as u64 - 1, "{said}");
}

/// The URL of a port nothing listens on (a server that is down).
fn down_url() -> String {
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    format!("http://{}", free.local_addr().unwrap())
}

/// Waits for `child` to end; kills it and fails the test, saying `what`, if it has not ended
/// after `limit` (it hangs).
fn ended_within(child: &mut std::process::Child, limit: std::time::Duration, what: &str) {
    let until = std::time::Instant::now() + limit;
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > until {
            child.kill().unwrap();
            panic!("{what}: still waiting after {limit:?}");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Runs the binary with `args`; fails the test if it has not ended after `limit` (it hangs).
fn bin_within(args: &[&str], limit: std::time::Duration) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_prompt-radar"))
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    ended_within(&mut child, limit, &format!("{args:?}"));
    child.wait_with_output().unwrap()
}

/// A server that takes the connection and never answers (wedged, paused) is reported after
/// `--timeout`, by the listing verbs and by `check`, instead of being waited on for ever.
#[test]
fn a_server_that_never_answers_is_reported_after_the_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("prompts.jsonl");
    prompts_file(&input, 3);
    // Listening, so connections complete, but never accepting or answering.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", silent.local_addr().unwrap());
    let input = input.display().to_string();
    // The last run's verdicts: kept, since no answer came.
    let output = dir.path().join("verdicts.jsonl");
    std::fs::write(&output, "{\"line\": 1}\n").unwrap();
    let output = output.display().to_string();
    let limit = std::time::Duration::from_secs(60);
    for args in [
        vec!["stats", "--server", &url, "--timeout", "1"],
        vec!["campaigns", "--server", &url, "--timeout", "1"],
        vec![
            "check",
            "--server",
            &url,
            "--timeout",
            "1",
            "--input",
            &input,
            "--output",
            &output,
        ],
    ] {
        let o = bin_within(&args, limit);
        let said = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {said}");
        assert!(
            said.contains("DEADLINE_EXCEEDED: no answer from the server within --timeout"),
            "{args:?}: {said}"
        );
    }
    assert_eq!(std::fs::read_to_string(&output).unwrap(), "{\"line\": 1}\n");
    drop(silent);
}

/// A flag on the command line wins over the environment variable of a flag it excludes: a
/// `PROMPT_RADAR_TEXT` left set does not make `search --id` a usage error about `--text`, while
/// two exclusive flags typed together still are one.
#[test]
fn a_typed_flag_wins_over_the_environment_of_one_it_excludes() {
    let down = down_url();
    let run = |env: (&str, &str), args: &[&str]| {
        let o = Command::new(env!("CARGO_BIN_EXE_prompt-radar"))
            .args(args)
            .args(["--server", &down])
            .env(env.0, env.1)
            .output()
            .unwrap();
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stderr).to_string(),
        )
    };
    for (env, args) in [
        (("PROMPT_RADAR_TEXT", "hello"), vec!["search", "--id", "7"]),
        (("PROMPT_RADAR_TOP", "5"), vec!["campaigns", "--id", "7"]),
        (
            ("PROMPT_RADAR_FLAGGED", "true"),
            vec!["accounts", "--id", "a"],
        ),
        (
            ("PROMPT_RADAR_TEMPLATE", "Rewrite this text please: <*>"),
            vec!["allow", "add", "--campaign", "7"],
        ),
    ] {
        let (code, said) = run(env, &args);
        assert_eq!(code, Some(2), "{args:?}: {said}");
        assert!(said.contains("cannot connect"), "{env:?} {args:?}: {said}");
    }
    // Both typed: still refused.
    let (code, said) = run(
        ("PROMPT_RADAR_LOG", "warn"),
        &["search", "--id", "7", "--text", "x"],
    );
    assert_eq!(code, Some(2));
    assert!(said.contains("cannot be used with"), "{said}");
    // The environment alone still counts, and a switch takes 1/0, yes/no, on/off too.
    for (env, args) in [
        (("PROMPT_RADAR_TEXT", "hello"), vec!["search"]),
        (("PROMPT_RADAR_FLAGGED", "1"), vec!["accounts"]),
        (("PROMPT_RADAR_FLAGGED", "no"), vec!["accounts"]),
    ] {
        let (code, said) = run(env, &args);
        assert_eq!(code, Some(2));
        assert!(said.contains("cannot connect"), "{env:?}: {said}");
    }
}
