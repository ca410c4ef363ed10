//! Crash safety: SIGKILL the real `prompt-radar serve` process in the middle of a CheckStream and
//! show that, after a restart on the same data directory, every prompt whose verdict was
//! returned is present and searchable. And a clean stop (SIGTERM) checkpoints the index, so the
//! next start reloads it instead of rebuilding it from the store.

use std::io::{BufRead, BufReader};
use std::process::{Child, ChildStdout, Command, Stdio};

use prompt_radar::proto::{self, radar_client::RadarClient, search_request::Query};

use crate::common::{all_accounts, model_dir, nearest, templated};

/// Starts `prompt-radar serve` on a free port and returns it with the address it printed, the
/// line that said so, and the rest of its standard output (keep it open: the server prints
/// again when it stops).
/// A server process that is killed when dropped, so a failing test leaves none behind (one
/// would keep the test run's output open).
struct Server(Child);

impl std::ops::Deref for Server {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Server {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_server(data_dir: &std::path::Path) -> (Server, String, String, BufReader<ChildStdout>) {
    spawn_server_with(data_dir, Stdio::inherit())
}

/// [`spawn_server`] with its standard error going to `stderr`.
fn spawn_server_with(
    data_dir: &std::path::Path,
    stderr: Stdio,
) -> (Server, String, String, BufReader<ChildStdout>) {
    let mut serve = Command::new(env!("CARGO_BIN_EXE_prompt-radar"));
    serve_args(&mut serve, data_dir);
    start(serve.stderr(stderr))
}

/// `serve`'s arguments: any port, segments of 25, `data_dir` and the model.
fn serve_args(command: &mut Command, data_dir: &std::path::Path) {
    command
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--segment-max-points",
            "25",
        ])
        .arg("--data-dir")
        .arg(data_dir)
        .arg("--model")
        .arg(model_dir());
}

/// Runs `command` (a `serve`) as [`spawn_server`] does.
fn start(command: &mut Command) -> (Server, String, String, BufReader<ChildStdout>) {
    let mut child = command
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn prompt-radar serve");
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    let addr = line
        .split("listening on ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        .to_string();
    (Server(child), format!("http://{addr}"), line, stdout)
}

/// Stops `server` with SIGTERM; returns the line it printed as it shut down, once it exited 0.
fn clean_stop(mut server: Server, out: &mut BufReader<ChildStdout>) -> String {
    let term = Command::new("kill")
        .args(["-TERM", &server.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    let mut bye = String::new();
    out.read_line(&mut bye).unwrap();
    assert!(server.wait().unwrap().success(), "clean exit: {bye}");
    bye
}

fn prompt(i: usize) -> String {
    // Unique texts, half of them templated, so the restart also has clusters to rebuild.
    if i.is_multiple_of(2) {
        templated(i)
    } else {
        format!("Organic question number {i}: how do tides depend on the moon and sun?")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_stream_loses_no_acknowledged_prompt() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, url, _, _out) = spawn_server(dir.path());
    let mut c = RadarClient::connect(url.clone()).await.unwrap();

    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let mut out = c
        .check_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let feeder = tokio::spawn(async move {
        for i in 0..2_000 {
            let r = proto::CheckRequest {
                account_id: format!("acct-{}", i % 9),
                prompt: prompt(i),
                timestamp_ms: 1_750_000_000_000 + i as i64,
                request_id: i.to_string(),
            };
            if tx.send(r).await.is_err() {
                return;
            }
        }
    });
    let mut acked: Vec<(u64, String)> = Vec::new();
    while acked.len() < 80 {
        let r = out.message().await.unwrap().expect("verdict");
        assert!(r.error.is_none(), "{r:?}");
        let i: usize = r.request_id.parse().unwrap();
        acked.push((r.prompt_id, prompt(i)));
    }
    child.kill().unwrap(); // SIGKILL: no shutdown path runs
    child.wait().unwrap();
    feeder.abort();
    drop(out);

    let (mut child, url, line, _out) = spawn_server(dir.path());
    // No clean stop, but segments of 25 were sealed, each with a detector snapshot: the restart
    // restores the last one and replays what was stored after it.
    let count = |before: &str| -> u64 {
        let head = line.split(before).next().unwrap_or_default();
        let n = head.rsplit([' ', '(']).next().unwrap_or_default();
        n.parse()
            .unwrap_or_else(|_| panic!("no count before {before:?} in {line}"))
    };
    let (stored, restored, replayed) = (
        count(" prompts:"),
        count(" restored from the snapshot"),
        count(" replayed;"),
    );
    assert!(restored > 0 && restored + replayed == stored, "{line}");
    let mut c = RadarClient::connect(url).await.unwrap();
    for (id, text) in &acked {
        let by_id = nearest(&mut c, Query::PromptId(*id))
            .await
            .unwrap_or_else(|e| panic!("acknowledged prompt {id} missing after restart: {e}"));
        assert_eq!(
            by_id.prompt_id, *id,
            "prompt {id} is its own nearest neighbour"
        );
        assert_eq!(&by_id.prompt, text);
        let by_text = nearest(&mut c, Query::Text(text.clone())).await.unwrap();
        assert_eq!(by_text.prompt_id, *id, "{text}");
        assert!(by_text.similarity > 0.999);
    }
    let accounts = all_accounts(&mut c).await;
    let stored: u64 = accounts.iter().map(|a| a.prompts).sum();
    assert!(
        stored >= acked.len() as u64,
        "stored {stored} < acknowledged {}",
        acked.len()
    );
    child.kill().unwrap();
    child.wait().unwrap();
}

/// A store whose commits start failing (here: a file-size limit, as a full disk would) stops the
/// server from answering at all until it is restarted: its memory holds the failed batch, which
/// the store lacks. Every prompt answered before is in the store after the restart, and no
/// other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_failed_store_commit_nothing_is_answered_until_a_restart() {
    use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};
    let dir = tempfile::tempdir().unwrap();
    // Writes past 1 MB fail with EFBIG (SIGXFSZ ignored): about 60 prompts fit.
    let mut limited = Command::new("sh");
    limited
        .args([
            "-c",
            "trap '' XFSZ; exec prlimit --fsize=1000000 \"$@\"",
            "sh",
        ])
        .arg(env!("CARGO_BIN_EXE_prompt-radar"));
    serve_args(&mut limited, dir.path());
    let (mut child, url, _, _out) = start(limited.stderr(Stdio::null()));
    let mut c = RadarClient::connect(url.clone()).await.unwrap();
    let mut answered: Vec<(u64, String)> = Vec::new();
    let mut failure = None;
    for i in 0..2_000 {
        let r = c
            .check(proto::CheckRequest {
                account_id: format!("acct-{}", i % 9),
                prompt: prompt(i),
                timestamp_ms: 1_750_000_000_000 + i as i64,
                request_id: i.to_string(),
            })
            .await;
        match r {
            Ok(r) => answered.push((r.into_inner().prompt_id, prompt(i))),
            Err(status) => {
                failure = Some(status);
                break;
            }
        }
    }
    let failure = failure.expect("the store's file limit is reached");
    assert_eq!(failure.code(), tonic::Code::Unavailable, "{failure:?}");
    assert!(!answered.is_empty());
    // Every call is refused now, with what to do, reads included: their counts would include
    // the batch the store lacks.
    let refused = c
        .get_stats(proto::GetStatsRequest {})
        .await
        .expect_err("stats refused");
    assert_eq!(refused.code(), tonic::Code::Unavailable);
    assert!(
        refused.message().contains("a store commit failed (")
            && refused.message().contains("restart the server"),
        "{refused:?}"
    );
    let again = c
        .check(proto::CheckRequest {
            account_id: "late".into(),
            prompt: "One more question about glaciers.".into(),
            ..Default::default()
        })
        .await
        .expect_err("check refused");
    assert_eq!(again.code(), tonic::Code::Unavailable);
    // And load balancers are told.
    let channel = tonic::transport::Endpoint::from_shared(url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let mut status = ServingStatus::Serving;
    for _ in 0..50 {
        let r = health
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        status = r.status();
        if status == ServingStatus::NotServing {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(status, ServingStatus::NotServing);
    drop(c);
    child.kill().unwrap();
    child.wait().unwrap();

    // Restarted without the limit: exactly the answered prompts are stored.
    let (mut child, url, line, _out) = spawn_server(dir.path());
    assert!(
        line.contains(&format!(" {} prompts: ", answered.len())),
        "{} answered: {line}",
        answered.len()
    );
    let mut c = RadarClient::connect(url).await.unwrap();
    for (id, text) in answered.iter().rev().take(5) {
        let hit = nearest(&mut c, Query::PromptId(*id)).await.unwrap();
        assert_eq!((&hit.prompt_id, &hit.prompt), (id, text));
    }
    child.kill().unwrap();
    child.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_stop_checkpoints_the_index_and_the_next_start_reloads_it() {
    let dir = tempfile::tempdir().unwrap();
    let (child, url, _, mut out) = spawn_server(dir.path());
    let mut c = RadarClient::connect(url).await.unwrap();
    let mut sent: Vec<(u64, String)> = Vec::new();
    for i in 0..60 {
        // Multi-line prompts, so the part index has vectors too.
        let text = format!("{}\nAnswer in three sentences.\nCite sources.", prompt(i));
        let r = c
            .check(proto::CheckRequest {
                account_id: format!("acct-{}", i % 7),
                prompt: text.clone(),
                timestamp_ms: 1_750_000_000_000 + i as i64,
                request_id: i.to_string(),
            })
            .await
            .unwrap()
            .into_inner();
        sent.push((r.prompt_id, text));
    }
    let accounts = all_accounts(&mut c).await;
    drop(c);
    let bye = clean_stop(child, &mut out);
    // 60 prompts in segments of 25: 50 sealed, 10 in the checkpointed active segment.
    assert!(
        bye.contains("shut down (index checkpoint: 10 active-segment vectors")
            && bye.contains("detector snapshot of 60 prompts"),
        "{bye}"
    );

    let (mut child, url, line, _out) = spawn_server(dir.path());
    assert!(
        line.contains("60 prompts: 60 reloaded from segments, 0 re-indexed, part vectors ")
            && line.contains(
                " reloaded, 0 re-indexed, clusters of 60 restored from the snapshot, 0 replayed;"
            )
            && !line.contains("part vectors 0 reloaded"),
        "nothing rebuilt from the store: {line}"
    );
    let mut c = RadarClient::connect(url).await.unwrap();
    // The accounts, their scores and campaigns come back as they were.
    let restored = all_accounts(&mut c).await;
    assert_eq!(restored, accounts);
    for (id, text) in sent.iter().rev().take(15) {
        let hit = nearest(&mut c, Query::Text(text.clone())).await.unwrap();
        assert_eq!(hit.prompt_id, *id, "{text}");
    }
    // The reloaded active segment goes on growing, and a new prompt is found.
    let late = c
        .check(proto::CheckRequest {
            account_id: "acct-late".into(),
            prompt: "A question sent after the restart about volcano formation.".into(),
            timestamp_ms: 1_750_000_001_000,
            request_id: "late".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let hit = nearest(&mut c, Query::PromptId(late.prompt_id))
        .await
        .unwrap();
    assert_eq!(hit.prompt_id, late.prompt_id);
    child.kill().unwrap();
    child.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_detector_snapshot_is_reported_and_the_store_replayed() {
    let dir = tempfile::tempdir().unwrap();
    let (child, url, _, mut out) = spawn_server(dir.path());
    let mut c = RadarClient::connect(url).await.unwrap();
    for i in 0..12 {
        c.check(proto::CheckRequest {
            account_id: format!("acct-{}", i % 4),
            prompt: prompt(i),
            timestamp_ms: 1_750_000_000_000 + i as i64,
            request_id: i.to_string(),
        })
        .await
        .unwrap();
    }
    let accounts = all_accounts(&mut c).await;
    drop(c);
    let bye = clean_stop(child, &mut out);
    assert!(bye.contains("detector snapshot of 12 prompts"), "{bye}");

    // One byte flipped in the middle: the checksum catches it.
    let path = dir.path().join("detector.snapshot");
    let mut bytes = std::fs::read(&path).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x20;
    std::fs::write(&path, bytes).unwrap();

    let log = tempfile::NamedTempFile::new().unwrap();
    let (mut child, url, line, _out) =
        spawn_server_with(dir.path(), Stdio::from(log.reopen().unwrap()));
    assert!(
        line.contains("clusters of 0 restored from the snapshot, 12 replayed;"),
        "{line}"
    );
    let mut c = RadarClient::connect(url).await.unwrap();
    assert_eq!(all_accounts(&mut c).await, accounts);
    child.kill().unwrap();
    child.wait().unwrap();
    // Said once, in plain text: stderr here is a file, not a terminal.
    let said = std::fs::read_to_string(log.path()).unwrap();
    assert!(
        said.contains("detector snapshot not used") && said.contains("checksum mismatch"),
        "{said}"
    );
    assert!(
        !said.contains('\u{1b}'),
        "no terminal colour codes: {said:?}"
    );
}
