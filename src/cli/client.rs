//! Client verbs: `check`, `accounts`, `campaigns`, `search`. They talk to a running server.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use serde_json::json;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use prompt_radar::detect::scoring::{counted, score_text};
use prompt_radar::proto::{self, radar_client::RadarClient};
use prompt_radar::traffic;

use super::{Format, OnError, ServerArgs};

/// Adds the bearer token to every request.
#[derive(Clone)]
pub struct Auth(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for Auth {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// A connected client.
pub type Client = RadarClient<InterceptedService<Channel, Auth>>;

/// The URL to dial for `--server`: `host:port` as grpcurl takes it gets `http://`. `https://`
/// is refused: this build has no TLS, and tonic would otherwise dial such a URL in plain text,
/// bearer token included, while the user believes it encrypted.
fn server_url(server: &str) -> anyhow::Result<String> {
    let url = match server.split_once("://") {
        None => format!("http://{server}"),
        Some(("http", _)) => server.to_string(),
        Some(("https", _)) => anyhow::bail!(
            "--server {server}: this build speaks plain-text gRPC only (no TLS); use http:// on a trusted network or through a tunnel (ssh -L, stunnel)"
        ),
        Some((scheme, _)) => {
            anyhow::bail!("--server {server}: unknown scheme {scheme:?}; use http://HOST:PORT")
        }
    };
    let uri: tonic::codegen::http::Uri =
        url.parse()
            .map_err(|e: tonic::codegen::http::uri::InvalidUri| {
                anyhow::anyhow!("--server {server:?} is not a valid HOST:PORT or URL ({e})")
            })?;
    // `Uri::port_u16` is None for a port that is not a u16 as well as for none at all.
    let typed_port = uri
        .authority()
        .and_then(|a| a.as_str().rsplit_once(':'))
        .map(|(_, p)| p)
        .filter(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
    match (uri.port_u16(), typed_port) {
        (Some(p), _) if p > 0 => Ok(url),
        (_, Some(p)) => anyhow::bail!("--server {server}: {p} is not a port (1 to 65535)"),
        (_, None) => anyhow::bail!(
            "--server {server}: give the port, HOST:PORT (the server listens on 50051 by default)"
        ),
    }
}

/// A gRPC status as the server's contract names it: `NOT_FOUND: id: no allow-list entry 42`
/// (tonic's own text reads "code: 'Some requested entity was not found', message: \"…\"").
/// The client's own deadline (`--timeout`) reads as one.
pub fn status_text(status: &tonic::Status) -> String {
    // tonic reports its timeout layer's expiry as CANCELLED "Timeout expired".
    if status.code() == tonic::Code::Cancelled && status.message() == "Timeout expired" {
        return "DEADLINE_EXCEEDED: no answer from the server within --timeout".to_string();
    }
    let code = prompt_radar::server::code_name(status.code());
    match status.message() {
        "" => code.to_string(),
        m => format!("{code}: {m}"),
    }
}

/// Connects to the server.
pub async fn connect(args: &ServerArgs) -> anyhow::Result<Client> {
    let url = server_url(&args.server)?;
    let wait = std::time::Duration::from_secs(args.timeout);
    let channel = tonic::transport::Endpoint::from_shared(url)
        .with_context(|| format!("--server {:?} is not a valid URL", args.server))?
        .connect_timeout(wait)
        .timeout(wait)
        .http2_keep_alive_interval(wait)
        .keep_alive_timeout(wait)
        .connect()
        .await
        .with_context(|| format!("cannot connect to {}", args.server))?;
    let token = match &args.auth_token {
        Some(t) => Some(
            format!("Bearer {t}")
                .parse()
                .context("--auth-token has characters not allowed in a header")?,
        ),
        None => None,
    };
    Ok(RadarClient::with_interceptor(channel, Auth(token)).max_decoding_message_size(64 << 20))
}

/// Flags of `check`.
#[derive(Debug, Clone, Args)]
pub struct CheckArgs {
    #[command(flatten)]
    pub server: ServerArgs,
    /// Traffic JSONL: {"account_id", "prompt", "timestamp_ms"} per line (`-`: standard input;
    /// a pipe is read as it comes, without a line count for the progress bar).
    #[arg(long, env = "PROMPT_RADAR_INPUT")]
    pub input: PathBuf,
    /// Where verdicts go, one JSON line per input line (default, or `-`: stdout; not the input
    /// file).
    #[arg(long, env = "PROMPT_RADAR_OUTPUT")]
    pub output: Option<PathBuf>,
    /// On a malformed or rejected line: report it with its line number and go on, or stop.
    /// `check` sends ahead of the answers: at a line the server rejects, the lines already sent
    /// after it (up to 1,024) are still answered and stored; the summary says which.
    #[arg(long, env = "PROMPT_RADAR_ON_ERROR", value_enum, default_value_t = OnError::Skip)]
    pub on_error: OnError,
    /// Start at this line of the input (1-based), skipping the ones before: to go on after a
    /// stream the server ended, from the line the error names (verdicts keep the file's line
    /// numbers; give a new --output, which is overwritten). The server stores every prompt it
    /// answers: a line sent again is stored twice.
    #[arg(long, env = "PROMPT_RADAR_START_LINE", default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    pub start_line: u64,
}

/// A stop that a task can wait for: set by an error that stops the run, a signal, or an output
/// that cannot be written.
#[derive(Default)]
struct Halt(tokio::sync::watch::Sender<bool>);

impl Halt {
    fn set(&self) {
        self.0.send_replace(true);
    }

    /// Returns once the stop is set.
    async fn wait(&self) {
        let mut rx = self.0.subscribe();
        let _ = rx.wait_for(|&set| set).await;
    }
}

/// A file emptied when first written to (or when [`EmptiedAtFirstWrite::flush`] finds it not
/// yet written: a run with no verdict leaves an empty output, not the last run's).
struct EmptiedAtFirstWrite {
    file: std::fs::File,
    emptied: bool,
}

impl EmptiedAtFirstWrite {
    fn empty(&mut self) -> std::io::Result<()> {
        // Only a regular file has a length to cut: `/dev/null` or a named pipe has none.
        if !self.emptied && self.file.metadata()?.is_file() {
            self.file.set_len(0)?;
        }
        self.emptied = true;
        Ok(())
    }
}

impl Write for EmptiedAtFirstWrite {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.empty()?;
        self.file.write(buf)
    }

    /// Called at the end of a run (the writer's final flush), not when it fails part way: an
    /// output never written to is emptied then.
    fn flush(&mut self) -> std::io::Result<()> {
        self.empty()?;
        self.file.flush()
    }
}

/// The most lines `check` has sent and not yet had answered.
const IN_FLIGHT: usize = 1024;

/// An input line on its way: sent to the server, or failed locally.
enum Slot {
    Sent(usize),
    Bad(usize, String),
}

/// Streams the file through CheckStream and writes verdicts in file order.
///
/// The first Ctrl-C or SIGTERM stops reading: the lines already sent are answered (and stored)
/// and their verdicts written, and the run ends saying where to go on; a second quits at once.
/// An output that cannot be written (a closed pipe) ends the run the same way: what the server
/// stored is never left without a line to go on from.
pub async fn check(args: CheckArgs) -> anyhow::Result<bool> {
    let first = usize::try_from(args.start_line).unwrap_or(usize::MAX);
    let input = traffic::input_path(&args.input);
    // `--output -` is standard output, as `--input -` is standard input.
    let output = args.output.as_ref().filter(|p| p.as_os_str() != "-");
    match output {
        Some(out) => traffic::refuse_input_as_output(&input, out, "--output")?,
        // `check --input t.jsonl >> t.jsonl` would append verdicts to the traffic.
        None => traffic::refuse_input_as_output(
            &input,
            std::path::Path::new("/dev/stdout"),
            "standard output",
        )?,
    }
    // A pipe is read once: counting its lines first would drain it.
    let rereadable = traffic::rereadable(&input)
        .with_context(|| format!("cannot read {}", args.input.display()))?;
    let total = match rereadable {
        true => Some(
            traffic::count_lines(&input, first)
                .with_context(|| format!("cannot read {}", args.input.display()))?,
        ),
        false => None,
    };
    if first > 1 {
        eprintln!(
            "check: starting at line {first} ({} skipped, --start-line)",
            match first {
                2 => "line 1".to_string(),
                n => format!("lines 1-{}", n - 1),
            }
        );
        if total == Some(0) {
            eprintln!(
                "check: {} has nothing from line {first} on: nothing to do",
                args.input.display()
            );
        }
    }
    let file = std::fs::File::open(&input)
        .with_context(|| format!("cannot open {}", args.input.display()))?;
    // Connected before the output is created: a server that is down leaves the output of the
    // last run as it was.
    let mut client = connect(&args.server).await?;
    // Opened (so that a path that cannot be written is refused before anything is sent), but
    // emptied only at the first verdict: a server that takes the connection and then never
    // answers leaves the last run's verdicts as they were.
    let opened = match output {
        Some(p) => Some(
            std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .open(p)
                .with_context(|| format!("cannot create {}", p.display()))?,
        ),
        None => None,
    };
    let mut out: Box<dyn Write + Send> = match opened {
        Some(file) => Box::new(std::io::BufWriter::new(EmptiedAtFirstWrite {
            file,
            emptied: false,
        })),
        None => Box::new(std::io::BufWriter::new(std::io::stdout())),
    };
    let out_name = output.map_or("stdout".to_string(), |p| p.display().to_string());
    let (req_tx, req_rx) = mpsc::channel::<proto::CheckRequest>(256);
    // Lines sent and not yet answered: at most IN_FLIGHT, so that a stop (an error, a signal)
    // takes effect within that many lines, whatever the transport's buffers would take in.
    let in_flight = Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT));
    let permits = in_flight.clone();
    let (slot_tx, mut slot_rx) = mpsc::channel::<Slot>(4096);
    let stop_on_error = args.on_error == OnError::Stop;
    // Set at a stop (an error the server reported, a signal, an output that cannot be
    // written): the sender sends nothing more. The lines already sent are stored by then, so
    // their answers are still read.
    let halt = Arc::new(Halt::default());
    // The last line handed to the stream.
    let sent = Arc::new(AtomicUsize::new(0));
    // Lines are read on a thread of their own: a read from a quiet pipe can block for ever,
    // and a stop must not wait for it.
    let (line_tx, mut line_rx) = mpsc::channel(1024);
    let reader = std::io::BufReader::new(file);
    traffic::lines_on_a_thread(reader, first, "check-reader", move |item| {
        line_tx.blocking_send(item).is_ok()
    })
    .context("cannot start the reader thread")?;
    // Sends the lines read, until the input ends or a stop: whatever it sends has a slot, so
    // the answers of everything sent are awaited below.
    let sender = tokio::spawn({
        let (halt, last_sent) = (halt.clone(), sent.clone());
        async move {
            loop {
                let item = tokio::select! {
                    biased;
                    () = halt.wait() => break,
                    item = line_rx.recv() => item,
                };
                let Some((line, parsed)) = item else { break };
                let slot = match parsed {
                    Ok(t) => {
                        // (The semaphore is never closed: acquiring fails only at a stop.)
                        let permit = tokio::select! {
                            biased;
                            () = halt.wait() => break,
                            permit = permits.acquire() => permit,
                        };
                        let Ok(permit) = permit else { break };
                        permit.forget();
                        let req = proto::CheckRequest {
                            account_id: t.account_id,
                            prompt: t.prompt,
                            timestamp_ms: t.timestamp_ms,
                            request_id: line.to_string(),
                        };
                        if req_tx.send(req).await.is_err() {
                            break;
                        }
                        last_sent.store(line, Ordering::Relaxed);
                        Slot::Sent(line)
                    }
                    Err(e) => Slot::Bad(line, e.reason),
                };
                let bad = matches!(slot, Slot::Bad(..));
                if slot_tx.send(slot).await.is_err() || (bad && stop_on_error) {
                    break;
                }
            }
        }
    });
    let interrupted = stop_on_signal(halt.clone(), sent.clone())?;
    let started = Instant::now();
    let mut responses = client
        .check_stream(ReceiverStream::new(req_rx))
        .await
        .context("CheckStream")?
        .into_inner();
    let mut bar = super::progress::Progress::new("check", total);
    let (mut ok, mut errors) = (0u64, 0u64);
    let mut actions = [0u64; 3];
    let mut micros = Vec::with_capacity(total.unwrap_or(0).min(1 << 20) as usize);
    // The line of the error that stopped the run, and the last line answered or reported.
    let mut stopped: Option<usize> = None;
    let mut last_line = 0;
    // The output's write error, and the line whose verdict it lost: verdicts are no longer
    // written, but the answers to what was sent are still awaited, to know what is stored.
    let mut unwritten: Option<(usize, std::io::Error)> = None;
    while let Some(slot) = slot_rx.recv().await {
        let (line, value) = match slot {
            Slot::Bad(line, reason) => (line, Err(reason)),
            Slot::Sent(line) => match responses.message().await {
                Ok(Some(r)) => {
                    in_flight.add_permits(1);
                    (line, Ok(r))
                }
                // The verdicts so far are written (the writer flushes as it drops).
                ended => {
                    // A server that shuts down cleanly answers every request it has read,
                    // then ends the stream so; one that crashed or lost the connection may
                    // have stored requests it never answered.
                    let clean = matches!(&ended, Err(status) if status.code() == tonic::Code::Unavailable
                        && status.message().starts_with("server shutting down"));
                    let why = match ended {
                        Err(status) => anyhow::Error::new(status),
                        _ => anyhow::anyhow!("the server closed the stream"),
                    };
                    let ahead = sent.load(Ordering::Relaxed);
                    return Err(why.context(no_verdict(line, ahead, clean)));
                }
            },
        };
        let json = match value {
            Err(reason) => Err(json!({"line": line, "error": reason})),
            Ok(r) if r.error.is_some() => {
                let e = r.error.unwrap_or_default();
                Err(
                    json!({"line": line, "account_id": r.account_id, "error": format!("{}: {}", e.code, e.message)}),
                )
            }
            Ok(r) => {
                let action = action_name(r.action());
                match r.action() {
                    proto::Action::Review => actions[1] += 1,
                    proto::Action::Block => actions[2] += 1,
                    _ => actions[0] += 1,
                }
                micros.push(r.server_micros);
                Ok(json!({
                    "line": line, "account_id": r.account_id, "prompt_id": r.prompt_id, "action": action,
                    "score": r.score, "campaign_id": r.campaign_id.map(|c| c.to_string()), "neighbours": r.neighbours,
                    "campaign_score": r.campaign_score, "cluster_accounts": r.cluster_accounts,
                }))
            }
        };
        let v = match json {
            Ok(v) => {
                ok += 1;
                v
            }
            Err(v) => {
                errors += 1;
                bar.suspend(|| {
                    eprintln!(
                        "check: line {line}: {}",
                        v["error"].as_str().unwrap_or("error")
                    )
                });
                if stop_on_error && stopped.is_none() {
                    stopped = Some(line);
                    halt.set();
                }
                v
            }
        };
        if unwritten.is_none()
            && let Err(e) = writeln!(out, "{v}")
        {
            unwritten = Some((line, e));
            halt.set();
        }
        last_line = line;
        bar.inc(1);
    }
    drop(slot_rx);
    if unwritten.is_none()
        && let Err(e) = out.flush()
    {
        // Buffered verdicts were lost with it: which ones is not known.
        unwritten = Some((0, e));
    }
    bar.finish();
    let _ = sender.await;
    let secs = started.elapsed().as_secs_f64();
    micros.sort_unstable();
    let pct = |p: f64| {
        micros
            .get(((micros.len() as f64 - 1.0) * p).round() as usize)
            .copied()
            .unwrap_or(0) as f64
            / 1000.0
    };
    let times = match micros.is_empty() {
        true => String::new(),
        false => format!(
            "; server time p50 {:.1} ms, p99 {:.1} ms",
            pct(0.5),
            pct(0.99)
        ),
    };
    eprintln!(
        "check: {} in {:.1}s ({:.0} prompts/s): {} (allow {}, review {}, block {}), {}{times}{}",
        counted(ok + errors, "line"),
        secs,
        ok as f64 / secs.max(1e-9),
        counted(ok, "verdict"),
        actions[0],
        actions[1],
        actions[2],
        counted(errors, "error"),
        match stopped {
            None => String::new(),
            Some(n) if last_line > n => format!(
                "; stopped at the first error, line {n} (--on-error stop). Lines {}-{last_line} were already read ahead: their verdicts (or errors) are in the output, and what the server accepted is stored: fix line {n} and send it alone, then go on with --start-line {}",
                n + 1,
                last_line + 1
            ),
            Some(n) => format!(
                "; stopped at the first error, line {n} (--on-error stop): fix it and go on with --start-line {n}"
            ),
        }
    );
    let checked = match last_line {
        0 => "no line was sent".to_string(),
        n => format!("the lines up to {n} are checked and what the server accepted is stored"),
    };
    let go_on = last_line.max(first - 1) + 1;
    if let Some((line, e)) = unwritten {
        let lost = match line {
            0 => "some verdicts were not written".to_string(),
            n => format!(
                "the output broke at line {n}: its verdict and those after it (and perhaps some buffered before it) were not written"
            ),
        };
        // Not an I/O error to the caller: a closed pipe here is not a reader that has what it
        // wanted (`accounts | head`), it is verdicts lost for prompts now stored.
        anyhow::bail!(
            "cannot write {out_name}: {e}; {checked}, but {lost} (to go on: the same command with --start-line {go_on} and a new --output)"
        );
    }
    if interrupted.load(Ordering::Relaxed) && stopped.is_none() && sent.load(Ordering::Relaxed) > 0
    {
        eprintln!(
            "check: interrupted: {checked}, their verdicts are in {out_name}; to go on: the same command with --start-line {go_on} and a new --output"
        );
        return Ok(false);
    }
    Ok(errors == 0 && !interrupted.load(Ordering::Relaxed))
}

/// The first Ctrl-C or SIGTERM sets `halt` (the sender sends nothing more; the answers to what
/// was sent are still written) and the flag returned; the second exits at once, with status 130,
/// saying how far the lines were sent (`sent`). The handlers are in place when this returns.
#[cfg(unix)]
fn stop_on_signal(halt: Arc<Halt>, sent: Arc<AtomicUsize>) -> anyhow::Result<Arc<AtomicBool>> {
    use tokio::signal::unix::{SignalKind, signal};
    let (mut interrupt, mut terminate) = (
        signal(SignalKind::interrupt())?,
        signal(SignalKind::terminate())?,
    );
    let interrupted = Arc::new(AtomicBool::new(false));
    let flag = interrupted.clone();
    tokio::spawn(async move {
        tokio::select! { _ = interrupt.recv() => {}, _ = terminate.recv() => {} }
        flag.store(true, Ordering::Relaxed);
        halt.set();
        eprintln!(
            "check: stopping: nothing more is sent; waiting for the answers to the lines already sent (at most 1,024), to write their verdicts (a second Ctrl-C or SIGTERM quits at once)"
        );
        tokio::select! { _ = interrupt.recv() => {}, _ = terminate.recv() => {} }
        let mut err = std::io::stderr().lock();
        let _ = writeln!(
            err,
            "\ncheck: stopped at once (second signal): lines up to {} were sent and may be stored, and not all their verdicts are written; the server goes on storing what it received, so count the stored prompts (`stats`) once its queue is empty before going on (the store does not deduplicate)",
            sent.load(Ordering::Relaxed)
        );
        std::process::exit(130);
    });
    Ok(interrupted)
}

/// Elsewhere a signal ends the run as the system does by default.
#[cfg(not(unix))]
fn stop_on_signal(_halt: Arc<Halt>, _sent: Arc<AtomicUsize>) -> anyhow::Result<Arc<AtomicBool>> {
    Ok(Arc::new(AtomicBool::new(false)))
}

/// What `check` says when the stream ended without a verdict for `line`, with lines up to
/// `ahead` sent: where to go on. After a `clean` shutdown (the server answered every request it
/// read) that is `line`; otherwise the server may have stored some sent lines unanswered.
fn no_verdict(line: usize, ahead: usize, clean: bool) -> String {
    let go_on = if clean {
        format!(
            "the lines before it are checked, and no later line is stored (to go on: the same command with --start-line {line} and a new --output)"
        )
    } else {
        let lines = if ahead > line {
            format!("lines {line}-{ahead} were sent")
        } else {
            format!("line {line} was sent")
        };
        format!(
            "the lines before it are checked; {lines}, and the server may have stored some of them without answering (a crash after its commit, a lost connection, a server that stopped answering the connection's pings for twice --timeout): the store does not deduplicate, so before going on with --start-line {line} and a new --output, find the last of them it stored (`stats`' prompt count against the count before this run, or `search --text` with a line's prompt) and start after it"
        )
    };
    format!("no verdict for line {line}; {go_on}")
}

/// Flags of `accounts`.
#[derive(Debug, Clone, Args)]
pub struct AccountsArgs {
    #[command(flatten)]
    pub server: ServerArgs,
    /// Only flagged accounts.
    #[arg(long, env = "PROMPT_RADAR_FLAGGED", value_parser = clap::builder::BoolishValueParser::new())]
    pub flagged: bool,
    /// Only this account, in full: verdict, counts, campaigns, first and last seen, reason.
    #[arg(
        long,
        env = "PROMPT_RADAR_ACCOUNT_ID",
        conflicts_with = "flagged",
        allow_hyphen_values = true
    )]
    pub id: Option<String>,
    /// Output format.
    #[arg(long, env = "PROMPT_RADAR_FORMAT", value_enum, default_value_t = Format::Table)]
    pub format: Format,
}

/// An action as `check --output` and `accounts` write it: `allow`, `review` or `block`.
fn action_name(action: proto::Action) -> String {
    action
        .as_str_name()
        .trim_start_matches("ACTION_")
        .to_lowercase()
}

/// An account as `accounts --format jsonl` prints it.
fn account_json(a: &proto::Account) -> serde_json::Value {
    json!({"account_id": a.account_id, "flagged": a.flagged, "score": a.score, "action": action_name(a.action()),
           "campaigns": a.campaigns.iter().map(u64::to_string).collect::<Vec<_>>(),
           "prompts": a.prompts, "campaign_prompts": a.campaign_prompts,
           "first_seen_ms": a.first_seen_ms, "last_seen_ms": a.last_seen_ms, "reason": a.reason})
}

/// `accounts --id`: one account through GetAccount, in full.
async fn one_account(client: &mut Client, id: &str, format: Format) -> anyhow::Result<()> {
    let a = client
        .get_account(proto::GetAccountRequest {
            account_id: id.to_string(),
        })
        .await?
        .into_inner();
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    match format {
        Format::Jsonl => writeln!(out, "{}", account_json(&a))?,
        Format::Table => {
            let campaigns: Vec<String> = a.campaigns.iter().map(u64::to_string).collect();
            writeln!(out, "account    {}", shown_id(&a.account_id, usize::MAX))?;
            writeln!(
                out,
                "verdict    {}, score {}{}",
                action_name(a.action()),
                score_text(a.score, 3),
                if a.flagged { ", flagged" } else { "" }
            )?;
            writeln!(
                out,
                "prompts    {} ({} in campaigns)",
                a.prompts, a.campaign_prompts
            )?;
            writeln!(
                out,
                "campaigns  {}",
                match campaigns.is_empty() {
                    true => "none".to_string(),
                    false => format!("{}  (`campaigns --id N` shows one)", campaigns.join(", ")),
                }
            )?;
            writeln!(
                out,
                "seen       {} .. {}",
                utc(a.first_seen_ms),
                utc(a.last_seen_ms)
            )?;
            writeln!(out, "reason     {}", shown(&a.reason, usize::MAX))?;
        }
    }
    out.flush()?;
    Ok(())
}

/// Prints every account's verdict.
pub async fn accounts(args: AccountsArgs) -> anyhow::Result<()> {
    let mut client = connect(&args.server).await?;
    if let Some(id) = &args.id {
        return one_account(&mut client, id, args.format).await;
    }
    // A stream, an account a message: one ListAccounts response must fit the decoding limit
    // (64 MB here, 4 MB in most gRPC clients: ~18,000 flagged accounts), a stream need not.
    let mut stream = client
        .stream_accounts(proto::ListAccountsRequest {
            flagged_only: args.flagged,
            limit: 0,
        })
        .await?
        .into_inner();
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    if args.format == Format::Table {
        writeln!(
            out,
            "{:<28} {:>7} {:>6} {:>7} {:>9}  {:<17} reason",
            "account", "action", "score", "prompts", "in-camp.", "campaigns"
        )?;
    }
    let (mut listed, mut flagged) = (0usize, 0usize);
    while let Some(a) = stream.message().await.context("StreamAccounts")? {
        listed += 1;
        flagged += usize::from(a.flagged);
        match args.format {
            Format::Jsonl => writeln!(out, "{}", account_json(&a))?,
            Format::Table => writeln!(
                out,
                "{} {:>7} {:>6} {:>7} {:>9}  {:<17} {}",
                padded(&shown_id(&a.account_id, usize::MAX), 28),
                action_name(a.action()),
                score_text(a.score, 3),
                a.prompts,
                a.campaign_prompts,
                campaign_ids(&a.campaigns, 3),
                shown(&a.reason, usize::MAX)
            )?,
        }
    }
    out.flush()?;
    eprintln!("accounts: {listed} listed ({flagged} flagged)");
    Ok(())
}

/// An account's campaigns for a table's column: the first `max` ids, then how many more
/// (`4711,88,913,+2`), or `-`. `accounts --id` and `--format jsonl` list them all.
fn campaign_ids(ids: &[u64], max: usize) -> String {
    if ids.is_empty() {
        return "-".into();
    }
    let mut text: Vec<String> = ids.iter().take(max).map(u64::to_string).collect();
    if ids.len() > max {
        text.push(format!("+{}", ids.len() - max));
    }
    text.join(",")
}

/// Flags of `campaigns`.
#[derive(Debug, Clone, Args)]
pub struct CampaignsArgs {
    #[command(flatten)]
    pub server: ServerArgs,
    /// At most this many campaigns, highest score first.
    #[arg(long, env = "PROMPT_RADAR_TOP", default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..))]
    pub top: u32,
    /// Only campaigns scoring at least this (the server's campaign threshold is the floor).
    #[arg(long, env = "PROMPT_RADAR_MIN_SCORE", default_value_t = 0.0)]
    pub min_score: f32,
    /// Only this campaign, in full: its whole template (and every template its sampled prompts
    /// follow, when they follow several), its 10 top accounts (most campaign prompts first) and
    /// up to 8 example prompts (a uniform sample of its prompts). Any prompt id of a cluster (a
    /// `search` hit's cluster or prompt id) shows that cluster, campaign or not.
    #[arg(long, env = "PROMPT_RADAR_CAMPAIGN_ID", conflicts_with_all = ["top", "min_score"])]
    pub id: Option<u64>,
    /// Output format.
    #[arg(long, env = "PROMPT_RADAR_FORMAT", value_enum, default_value_t = Format::Table)]
    pub format: Format,
}

/// Prints campaigns with their template: the top ones, or one in full (`--id`).
pub async fn campaigns(args: CampaignsArgs) -> anyhow::Result<()> {
    let mut client = connect(&args.server).await?;
    let (list, total) = match args.id {
        Some(id) => (
            vec![
                client
                    .get_campaign(proto::GetCampaignRequest { campaign_id: id })
                    .await?
                    .into_inner(),
            ],
            1,
        ),
        None => {
            let r = client
                .list_campaigns(proto::ListCampaignsRequest {
                    top: args.top,
                    min_score: args.min_score,
                })
                .await?
                .into_inner();
            (r.campaigns, r.total)
        }
    };
    let full = args.id.is_some();
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    for c in &list {
        match args.format {
            Format::Jsonl => writeln!(
                out,
                "{}",
                json!({"campaign_id": c.campaign_id.to_string(), "is_campaign": c.is_campaign, "score": c.score, "template": c.template,
                       "accounts": c.accounts, "flagged_accounts": c.flagged_accounts,
                       "prompts": c.prompts, "distinct_prompts": c.distinct_prompts,
                       "first_seen_ms": c.first_seen_ms, "last_seen_ms": c.last_seen_ms,
                       "top_accounts": c.top_accounts.iter().map(|a| json!({"account_id": a.account_id, "prompts": a.prompts, "campaign_prompts": a.campaign_prompts})).collect::<Vec<_>>(),
                       "templates": c.templates.iter().map(|t| json!({"template": t.template, "samples": t.samples})).collect::<Vec<_>>(),
                       "sampled": c.sampled, "sampled_alone": c.sampled_alone,
                       "allow_listed": c.allow_listed, "allowed_by": (c.allowed_by > 0).then_some(c.allowed_by),
                       "examples": c.examples})
            )?,
            Format::Table => {
                writeln!(
                    out,
                    "{}  score {}  {} ({} flagged)  {} ({} distinct)  seen {} .. {}",
                    match (c.is_campaign, c.allow_listed, c.allowed_by) {
                        (true, ..) => format!("campaign {}", c.campaign_id),
                        (false, true, 0) => format!("cluster {} (allow-listed)", c.campaign_id),
                        (false, true, entry) =>
                            format!("cluster {} (allow-listed: entry {entry})", c.campaign_id),
                        (false, false, _) => format!("cluster {} (not a campaign)", c.campaign_id),
                    },
                    score_text(c.score, 3),
                    counted(c.accounts, "account"),
                    c.flagged_accounts,
                    counted(c.prompts, "prompt"),
                    c.distinct_prompts,
                    utc(c.first_seen_ms),
                    utc(c.last_seen_ms)
                )?;
                if full {
                    campaign_in_full(&mut out, c)?;
                    continue;
                }
                writeln!(out, "  template: {}", shown(&c.template, 160))?;
                templates(&mut out, c, 5, 160)?;
                let top: Vec<String> = c
                    .top_accounts
                    .iter()
                    .take(5)
                    .map(|a| {
                        format!(
                            "{} ({}/{})",
                            shown_id(&a.account_id, 64),
                            a.campaign_prompts,
                            a.prompts
                        )
                    })
                    .collect();
                writeln!(
                    out,
                    "  top accounts (campaign prompts/prompts here): {}",
                    top.join(", ")
                )?;
            }
        }
    }
    out.flush()?;
    if !full {
        eprintln!("campaigns: {} listed of {total}", list.len());
    }
    Ok(())
}

/// A campaign's templates, when they say more than its one template does: when its sampled
/// prompts follow several, or some follow none (a paraphrasing campaign's share no wording). At
/// most `most` of them, each cut at `width` characters, with how many sampled prompts follow
/// each.
fn templates(
    out: &mut impl Write,
    c: &proto::Campaign,
    most: usize,
    width: usize,
) -> std::io::Result<()> {
    if c.templates.len() < 2 && c.sampled_alone == 0 || c.sampled < 2 {
        return Ok(());
    }
    if c.templates.is_empty() && c.distinct_prompts < c.prompts {
        // A question many people ask, in a few spellings: repeats, not a template's slots.
        return writeln!(
            out,
            "  templates: none (its {} prompts are {} distinct texts, case and spacing aside, sent again and again rather than filled into a template's slots)",
            c.prompts, c.distinct_prompts
        );
    }
    if c.templates.is_empty() {
        return writeln!(
            out,
            "  templates: none (no two of its {} sampled prompts share a template's wording)",
            c.sampled
        );
    }
    writeln!(
        out,
        "  templates ({} of {} sampled prompts follow one; samples, template):",
        c.sampled.saturating_sub(c.sampled_alone),
        c.sampled
    )?;
    for t in c.templates.iter().take(most) {
        writeln!(out, "    {:>3}  {}", t.samples, shown(&t.template, width))?;
    }
    if c.templates.len() > most {
        writeln!(
            out,
            "    ... {} more (campaigns --id {})",
            c.templates.len() - most,
            c.campaign_id
        )?;
    }
    Ok(())
}

/// The rest of `campaigns --id`'s table: the whole template, every top account the server
/// sends, and the example prompts (each on one line, cut at 300 characters).
fn campaign_in_full(out: &mut impl Write, c: &proto::Campaign) -> std::io::Result<()> {
    writeln!(out, "  template: {}", shown(&c.template, usize::MAX))?;
    templates(out, c, usize::MAX, usize::MAX)?;
    writeln!(
        out,
        "  top accounts ({} of {}, {} flagged): campaign prompts, prompts here, account",
        c.top_accounts.len(),
        c.accounts,
        c.flagged_accounts
    )?;
    for a in &c.top_accounts {
        writeln!(
            out,
            "    {:>7}  {:>7}  {}",
            a.campaign_prompts,
            a.prompts,
            shown_id(&a.account_id, usize::MAX)
        )?;
    }
    writeln!(out, "  examples ({}):", c.examples.len())?;
    for e in &c.examples {
        writeln!(out, "    {}", shown(e, 300))?;
    }
    Ok(())
}

/// Flags of `search`.
#[derive(Debug, Clone, Args)]
#[command(group = clap::ArgGroup::new("query").required(true).args(["text", "id"]))]
pub struct SearchArgs {
    #[command(flatten)]
    pub server: ServerArgs,
    /// Text to search for. It may begin with `-`; a flag of this verb right after --text is
    /// taken as a forgotten value and refused (--text=--account searches for that text).
    #[arg(long, env = "PROMPT_RADAR_TEXT", allow_hyphen_values = true)]
    pub text: Option<String>,
    /// Search for the neighbours of a stored prompt instead (the prompt itself comes first, at
    /// similarity 1, unless a filter leaves it out).
    #[arg(long, env = "PROMPT_RADAR_ID")]
    pub id: Option<u64>,
    /// Number of results (at most the server's limit, 1000 by default).
    #[arg(short, long, env = "PROMPT_RADAR_K", default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
    pub k: u32,
    /// Only prompts of this account.
    #[arg(long, env = "PROMPT_RADAR_ACCOUNT", allow_hyphen_values = true)]
    pub account: Option<String>,
    /// Only prompts sent at or after this time (ms since the epoch).
    #[arg(long, env = "PROMPT_RADAR_FROM_MS", default_value_t = 0)]
    pub from_ms: i64,
    /// Only prompts sent at or before this time (ms since the epoch).
    #[arg(long, env = "PROMPT_RADAR_TO_MS", default_value_t = 0)]
    pub to_ms: i64,
    /// Output format.
    #[arg(long, env = "PROMPT_RADAR_FORMAT", value_enum, default_value_t = Format::Table)]
    pub format: Format,
}

/// Prints the nearest stored prompts.
pub async fn search(args: SearchArgs) -> anyhow::Result<()> {
    let mut client = connect(&args.server).await?;
    let query = match (&args.text, args.id) {
        (Some(t), _) => proto::search_request::Query::Text(t.clone()),
        (None, Some(id)) => proto::search_request::Query::PromptId(id),
        (None, None) => anyhow::bail!("give --text or --id"),
    };
    let req = proto::SearchRequest {
        query: Some(query),
        k: args.k,
        account_id: args.account.clone().unwrap_or_default(),
        from_ms: args.from_ms,
        to_ms: args.to_ms,
    };
    let hits = client.search(req).await?.into_inner().hits;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    match args.format {
        Format::Table => {
            for line in search_table(&hits) {
                writeln!(out, "{line}")?;
            }
        }
        Format::Jsonl => {
            for h in &hits {
                writeln!(
                    out,
                    "{}",
                    json!({"prompt_id": h.prompt_id, "account_id": h.account_id, "timestamp_ms": h.timestamp_ms,
                           "similarity": h.similarity, "cluster_id": h.cluster_id,
                           "campaign_id": h.campaign_id.map(|c| c.to_string()), "prompt": h.prompt})
                )?;
            }
        }
    }
    out.flush()?;
    eprintln!("search: {}", counted(hits.len() as u64, "hit"));
    Ok(())
}

/// `search`'s table: a header and a line per hit (none without hits), the id, account and
/// campaign columns as wide as their widest entry, so long account ids and large prompt ids keep
/// the columns aligned.
fn search_table(hits: &[proto::SearchHit]) -> Vec<String> {
    if hits.is_empty() {
        return Vec::new();
    }
    let accounts: Vec<String> = hits.iter().map(|h| shown_id(&h.account_id, 64)).collect();
    let campaigns: Vec<String> = hits
        .iter()
        .map(|h| h.campaign_id.map_or("-".to_string(), |c| c.to_string()))
        .collect();
    let ids: Vec<String> = hits.iter().map(|h| format!("#{}", h.prompt_id)).collect();
    let widest = |column: &[String], header: &str| {
        (column
            .iter()
            .map(|s| unicode_width::UnicodeWidthStr::width(s.as_str())))
        .chain([header.len()])
        .max()
        .unwrap_or(0)
    };
    let (id_w, account_w, campaign_w) = (
        widest(&ids, "id").max(9),
        widest(&accounts, "account").max(20),
        widest(&campaigns, "campaign").max(9),
    );
    let mut out = vec![format!(
        "cosine  {} {} {:<20}  {:>campaign_w$}  prompt",
        padded("id", id_w),
        padded("account", account_w),
        "sent (UTC)",
        "campaign",
    )];
    for (((h, id), account), campaign) in hits.iter().zip(&ids).zip(&accounts).zip(&campaigns) {
        out.push(format!(
            "{:.4}  {} {} {:<20}  {:>campaign_w$}  {}",
            h.similarity,
            padded(id, id_w),
            padded(account, account_w),
            utc(h.timestamp_ms),
            campaign,
            shown(&h.prompt, 100)
        ));
    }
    out
}

/// Text from the server made safe to print in a table: at most `max` characters of `s` (then
/// `…`), on one line, with nothing a terminal would act on.
///
/// Prompts and the templates recovered from them are written by whoever sends the traffic,
/// attackers included. Printed raw, an escape sequence in a prompt could recolour, hide or
/// overwrite what an analyst sees, or set the clipboard; a bidirectional override could reorder
/// the words of a template; zero-width and tag characters can hide text from the analyst
/// (and make two templates that look alike differ). So whitespace controls (newline, tab, …)
/// become spaces, and every other control character, bidirectional formatting character and
/// invisible character (those the server refuses in account ids) is shown escaped, as
/// `\u{1b}`. A joiner or variation selector after a character beyond ASCII is kept: it is part
/// of an emoji sequence or of a script's spelling. `--format jsonl` keeps the exact text (JSON
/// escapes control characters).
pub(crate) fn shown(s: &str, max: usize) -> String {
    use prompt_radar::server::validate::invisible;
    let mut out = String::with_capacity(s.len());
    let mut before = ' ';
    for (i, c) in s.chars().enumerate() {
        if i == max {
            out.push('…');
            break;
        }
        match c {
            '\t' | '\n' | '\u{b}' | '\u{c}' | '\r' | '\u{85}' | '\u{2028}' | '\u{2029}' => {
                out.push(' ')
            }
            '\u{200c}' | '\u{200d}' | '\u{fe00}'..='\u{fe0f}'
                if !before.is_ascii() && !invisible(before) =>
            {
                out.push(c)
            }
            // `invisible` includes the bidirectional formatting characters.
            c if c.is_control() || invisible(c) => {
                out.extend(c.escape_unicode());
            }
            c => out.push(c),
        }
        before = c;
    }
    out
}

/// An account id made safe to print, as [`shown`] makes a text, and unmistakable: white space
/// other than a plain space (a no-break, an ideographic or an en space) is shown escaped too, so
/// that `team 7` and `team\u{a0}7`, two accounts, do not look like one in a listing.
pub(crate) fn shown_id(s: &str, max: usize) -> String {
    use prompt_radar::server::validate::invisible;
    let mut out = String::with_capacity(s.len());
    for (i, c) in s.chars().enumerate() {
        if i == max {
            out.push('…');
            break;
        }
        if c != ' ' && (c.is_whitespace() || c.is_control() || invisible(c)) {
            out.extend(c.escape_unicode());
        } else {
            out.push(c);
        }
    }
    out
}

/// `s` padded with spaces to `width` columns of a terminal (a CJK character or an emoji takes
/// two, a combining mark none), for the columns of a table; longer text is left as it is.
pub(crate) fn padded(s: &str, width: usize) -> String {
    let used = unicode_width::UnicodeWidthStr::width(s);
    format!("{s}{}", " ".repeat(width.saturating_sub(used)))
}

/// A time in milliseconds since the Unix epoch as UTC to the second, `2024-06-10 06:13:20Z`, for
/// tables (`--format jsonl` keeps the milliseconds).
pub(crate) fn utc(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let (days, rest) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's civil_from_days: the proleptic Gregorian date of a day number.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}Z",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

/// Flags of `allow`.
#[derive(Debug, Clone, Args)]
pub struct AllowArgs {
    #[command(flatten)]
    pub server: ServerArgs,
    #[command(subcommand)]
    pub action: AllowAction,
}

/// What `allow` does.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum AllowAction {
    /// Allow-list a known legitimate app's template: by text (fixed words and <*> slots, as
    /// `campaigns` shows templates) or by campaign id (its recovered template).
    #[command(group = clap::ArgGroup::new("what").required(true).args(["template", "campaign"]))]
    Add {
        /// The template, e.g. "Rewrite the following text to be more professional: <*>".
        #[arg(long, env = "PROMPT_RADAR_TEMPLATE", allow_hyphen_values = true)]
        template: Option<String>,
        /// A campaign id from `campaigns`.
        #[arg(long, env = "PROMPT_RADAR_CAMPAIGN")]
        campaign: Option<u64>,
        /// Why it is legitimate.
        #[arg(
            long,
            env = "PROMPT_RADAR_NOTE",
            default_value = "",
            allow_hyphen_values = true
        )]
        note: String,
    },
    /// List the allow-list.
    List {
        /// Output format.
        #[arg(long, env = "PROMPT_RADAR_FORMAT", value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Remove an entry by id.
    Remove {
        /// The entry's id (see `allow list`).
        id: u64,
    },
}

/// Runs `allow add|list|remove` against the server.
pub async fn allow(args: AllowArgs) -> anyhow::Result<()> {
    use proto::allow_template_request::Source;
    let mut client = connect(&args.server).await?;
    // "entry N" as the campaigns table names the entry that cleared a cluster.
    let line = |id: u64, template: &str, note: &str, created_ms: i64| {
        format!(
            "entry {id}  {}  (note: \"{}\", added {})",
            shown(template, usize::MAX),
            shown(note, usize::MAX),
            utc(created_ms)
        )
    };
    let entry = |e: &proto::AllowedTemplate| line(e.id, &e.template, &e.note, e.created_ms);
    match args.action {
        AllowAction::Add {
            template,
            campaign,
            note,
        } => {
            let source = match (template, campaign) {
                (Some(t), _) => Source::Template(t),
                (None, Some(c)) => Source::CampaignId(c),
                (None, None) => anyhow::bail!("give --template or --campaign"),
            };
            let r = client
                .allow_template(proto::AllowTemplateRequest {
                    source: Some(source),
                    note,
                })
                .await?
                .into_inner();
            if let Some(e) = &r.entry {
                let verb = match r.already_listed {
                    true => "already allowed",
                    false => "allowed",
                };
                writeln!(std::io::stdout(), "{verb} {}", entry(e))?;
            }
            eprintln!(
                "allow: {} cleared",
                counted(r.campaigns_cleared, "campaign")
            );
            for c in &r.campaigns_not_cleared {
                eprintln!(
                    "allow: campaign {c} not cleared: some of its prompts match, others follow \
                     templates of their own (`campaigns --id {c}`)"
                );
            }
        }
        AllowAction::List { format } => {
            let list = client
                .list_allowed_templates(proto::ListAllowedTemplatesRequest {})
                .await?
                .into_inner()
                .templates;
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            for e in &list {
                match format {
                    Format::Jsonl => writeln!(
                        out,
                        "{}",
                        json!({"id": e.id, "template": e.template, "note": e.note, "created_ms": e.created_ms})
                    )?,
                    Format::Table => writeln!(out, "{}", entry(e))?,
                }
            }
            out.flush()?;
            eprintln!("allow: {} template(s)", list.len());
        }
        AllowAction::Remove { id } => {
            let e = client
                .remove_allowed_template(proto::RemoveAllowedTemplateRequest { id })
                .await?
                .into_inner();
            writeln!(
                std::io::stdout(),
                "removed {}",
                line(e.id, &e.template, &e.note, e.created_ms)
            )?;
            let again = &e.campaigns_scoring_again;
            let ids: Vec<String> = again.iter().map(u64::to_string).collect();
            match again.len() {
                0 => eprintln!("allow: no campaign scores again"),
                n => eprintln!(
                    "allow: {} again: {} (`campaigns --id N`)",
                    match n {
                        1 => "1 campaign scores".to_string(),
                        n => format!("{n} campaigns score"),
                    },
                    ids.join(", ")
                ),
            }
        }
    }
    Ok(())
}

/// Flags of `stats`.
#[derive(Debug, Clone, Args)]
pub struct StatsArgs {
    #[command(flatten)]
    pub server: ServerArgs,
    /// Read again every this many seconds until interrupted, a line each with what changed since
    /// the reading before (0: read once).
    #[arg(long, env = "PROMPT_RADAR_WATCH", default_value_t = 0)]
    pub watch: u64,
    /// Output format (jsonl: one object a reading, the server's counters as they are).
    #[arg(long, env = "PROMPT_RADAR_FORMAT", value_enum, default_value_t = Format::Table)]
    pub format: Format,
}

/// Prints the server's counters (GetStats): once, or every `--watch` seconds.
pub async fn stats(args: StatsArgs) -> anyhow::Result<()> {
    let mut client = connect(&args.server).await?;
    let mut out = std::io::stdout().lock();
    let mut last: Option<proto::Stats> = None;
    loop {
        let reading = client.get_stats(proto::GetStatsRequest {}).await;
        let now = match reading {
            Ok(r) => r.into_inner(),
            // Watching outlives a server's restart or a network blip: the next reading is tried.
            Err(e) if args.watch > 0 && last.is_some() => {
                eprintln!("stats: no reading: {}", status_text(&e));
                tokio::select! {
                    () = tokio::time::sleep(std::time::Duration::from_secs(args.watch)) => {}
                    _ = tokio::signal::ctrl_c() => return Ok(()),
                }
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        match (args.format, &last) {
            (Format::Jsonl, _) => writeln!(out, "{}", stats_json(&now))?,
            (Format::Table, None) => write!(out, "{}", stats_table(&now))?,
            (Format::Table, Some(before)) => writeln!(out, "{}", stats_line(before, &now))?,
        }
        out.flush()?;
        if args.watch == 0 {
            return Ok(());
        }
        last = Some(now);
        tokio::select! {
            () = tokio::time::sleep(std::time::Duration::from_secs(args.watch)) => {}
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
    }
}

fn latency_json(l: Option<&proto::Latency>) -> serde_json::Value {
    let l = l.copied().unwrap_or_default();
    json!({"count": l.count, "p50_us": l.p50_us, "p90_us": l.p90_us, "p99_us": l.p99_us, "max_us": l.max_us})
}

fn stats_json(s: &proto::Stats) -> serde_json::Value {
    json!({
        "uptime_ms": s.uptime_ms,
        "allowed": s.allowed,
        "reviewed": s.reviewed,
        "blocked": s.blocked,
        "refused_invalid": s.refused_invalid,
        "refused_overload": s.refused_overload,
        "failed": s.failed,
        "cancelled": s.cancelled,
        "latency": latency_json(s.latency.as_ref()),
        "latency_last_minute": latency_json(s.latency_last_minute.as_ref()),
        "queued": s.queued,
        "queue_capacity": s.queue_capacity,
        "prompts": s.prompts,
        "accounts": s.accounts,
        "index_segments": s.index_segments,
        "index_vectors": s.index_vectors,
        "part_index_segments": s.part_index_segments,
        "part_index_vectors": s.part_index_vectors,
    })
}

/// `1234567` as `1,234,567`.
fn grouped(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Microseconds for people: `850 µs`, `2.1 ms`, `1.25 s`.
fn micros(us: u64) -> String {
    match us {
        0..1_000 => format!("{us} µs"),
        1_000..1_000_000 => format!("{:.1} ms", us as f64 / 1e3),
        _ => format!("{:.2} s", us as f64 / 1e6),
    }
}

/// Milliseconds of uptime as `3d 4h 05m 06s`, leading zero units left out.
fn uptime(ms: u64) -> String {
    let s = ms / 1000;
    let (d, h, m, s) = (s / 86_400, s / 3_600 % 24, s / 60 % 60, s % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m {s:02}s"),
        (0, _, _) => format!("{h}h {m:02}m {s:02}s"),
        _ => format!("{d}d {h}h {m:02}m {s:02}s"),
    }
}

fn segments(n: u32) -> String {
    format!("{n} segment{}", if n == 1 { "" } else { "s" })
}

fn latency_text(l: Option<&proto::Latency>) -> String {
    match l {
        Some(l) if l.count > 0 => format!(
            "{} answers: p50 {}, p90 {}, p99 {}, max {}",
            grouped(l.count),
            micros(l.p50_us),
            micros(l.p90_us),
            micros(l.p99_us),
            micros(l.max_us)
        ),
        _ => "no answers".into(),
    }
}

fn stats_table(s: &proto::Stats) -> String {
    let answered = s.allowed + s.reviewed + s.blocked;
    format!(
        "uptime        {}
checks        {} answered: {} allow, {} review, {} block; refused: {} invalid, {} overload (queue full); {} failed; {} cancelled by their callers
answer time   last minute: {}
              since start: {}
queue         {} of {} waiting for the model
stored        {} prompts from {} accounts
index         {} vectors in {}; part index {} vectors in {}
",
        uptime(s.uptime_ms),
        grouped(answered),
        grouped(s.allowed),
        grouped(s.reviewed),
        grouped(s.blocked),
        grouped(s.refused_invalid),
        grouped(s.refused_overload),
        grouped(s.failed),
        grouped(s.cancelled),
        latency_text(s.latency_last_minute.as_ref()),
        latency_text(s.latency.as_ref()),
        s.queued,
        s.queue_capacity,
        grouped(s.prompts),
        grouped(s.accounts),
        grouped(s.index_vectors),
        segments(s.index_segments),
        grouped(s.part_index_vectors),
        segments(s.part_index_segments),
    )
}

/// One `--watch` line: what changed since `before`, and the last minute's answer times. A server
/// whose uptime went back has restarted: its counters are counted from its start.
fn stats_line(before: &proto::Stats, s: &proto::Stats) -> String {
    let restarted = s.uptime_ms < before.uptime_ms;
    let zero = proto::Stats::default();
    let before = if restarted { &zero } else { before };
    let d = |now: u64, then: u64| now.saturating_sub(then);
    let seconds = (d(s.uptime_ms, before.uptime_ms) as f64 / 1e3).max(1e-3);
    let (allow, review, block) = (
        d(s.allowed, before.allowed),
        d(s.reviewed, before.reviewed),
        d(s.blocked, before.blocked),
    );
    let refused = d(
        s.refused_invalid + s.refused_overload + s.failed,
        before.refused_invalid + before.refused_overload + before.failed,
    );
    let cancelled = match d(s.cancelled, before.cancelled) {
        0 => String::new(),
        n => format!(", {n} cancelled"),
    };
    let minute = s.latency_last_minute.unwrap_or_default();
    let times = if minute.count > 0 {
        format!(
            "p50 {} p99 {} (last minute)",
            micros(minute.p50_us),
            micros(minute.p99_us)
        )
    } else {
        "no answers in the last minute".into()
    };
    format!(
        "up {}{}: {:.1} checks/s ({allow} allow, {review} review, {block} block), {refused} refused{cancelled}, {times}, queue {}/{}, {} prompts",
        uptime(s.uptime_ms),
        if restarted { " (restarted)" } else { "" },
        (allow + review + block) as f64 / seconds,
        s.queued,
        s.queue_capacity,
        grouped(s.prompts),
    )
}

#[cfg(test)]
mod tests {
    use super::{search_table, shown, shown_id};
    use prompt_radar::proto;

    #[test]
    fn the_search_table_keeps_its_columns_whatever_the_ids() {
        let hit = |prompt_id: u64, account: &str, campaign_id: Option<u64>| proto::SearchHit {
            prompt_id,
            account_id: account.to_string(),
            timestamp_ms: 1_750_000_000_000,
            similarity: 0.98,
            prompt: "Translate to French: cat".to_string(),
            cluster_id: 1,
            campaign_id,
        };
        let hits = [
            hit(7, "a", None),
            hit(
                123_456_789_012,
                "org-7f3e9c2a-user-0000000000042",
                Some(123_456_789),
            ),
            hit(42, "账户-十二", Some(3)),
        ];
        let table = search_table(&hits);
        assert_eq!(table.len(), 4, "{table:#?}");
        assert!(table[0].starts_with("cosine  id "), "{table:#?}");
        // Where each column starts, on screen: the same on every line.
        let at = |line: &str, what: &str| {
            let i = line
                .find(what)
                .unwrap_or_else(|| panic!("{what} in {line}"));
            unicode_width::UnicodeWidthStr::width(&line[..i])
        };
        let starts = |line: &str, account: &str, sent: &str| (at(line, account), at(line, sent));
        let header = starts(&table[0], "account", "sent (UTC)");
        for (line, h) in table[1..].iter().zip(&hits) {
            let sent = super::utc(h.timestamp_ms);
            assert_eq!(starts(line, &h.account_id, &sent).0, header.0, "{table:#?}");
            assert_eq!(starts(line, &h.account_id, &sent).1, header.1, "{table:#?}");
        }
        let ends: Vec<usize> = table[1..].iter().map(|l| at(l, "  Translate")).collect();
        assert!(
            ends.iter().all(|&e| e == ends[0]) && ends[0] == at(&table[0], "  prompt"),
            "{table:#?}"
        );
        assert!(search_table(&[]).is_empty());
    }

    #[test]
    fn a_campaigns_templates_are_listed_when_there_are_several_or_none() {
        let share = |template: &str, samples| proto::TemplateShare {
            template: template.into(),
            samples,
        };
        let mut c = proto::Campaign {
            campaign_id: 7,
            template: "Translate: <*>".into(),
            templates: vec![share("Translate: <*>", 32)],
            sampled: 32,
            ..Default::default()
        };
        let shown_for = |c: &proto::Campaign, most| {
            let mut out = Vec::new();
            super::templates(&mut out, c, most, 20).unwrap();
            String::from_utf8(out).unwrap()
        };
        assert_eq!(
            shown_for(&c, 5),
            "",
            "one template, all samples: the headline says it"
        );
        c.template = "<*>".into();
        c.templates = vec![
            share("Translate into French, keeping the tone: <*>", 20),
            share("Summarise in one line: <*>", 9),
            share("Name three <*>", 2),
        ];
        c.sampled_alone = 1;
        assert_eq!(
            shown_for(&c, 2),
            "  templates (31 of 32 sampled prompts follow one; samples, template):\n     \
             20  Translate into Frenc…\n      9  Summarise in one lin…\n    ... 1 more (campaigns --id 7)\n"
        );
        c.templates.clear();
        c.sampled_alone = 32;
        assert_eq!(
            shown_for(&c, 5),
            "  templates: none (no two of its 32 sampled prompts share a template's wording)\n",
            "a paraphrasing campaign: no template"
        );
        // A popular question in a few spellings: said as such.
        let (mut asked, sampled) = (c.clone(), 16);
        (
            asked.sampled,
            asked.sampled_alone,
            asked.prompts,
            asked.distinct_prompts,
        ) = (sampled, sampled, 16, 5);
        assert_eq!(
            shown_for(&asked, 5),
            "  templates: none (its 16 prompts are 5 distinct texts, case and spacing aside, sent again and again rather than filled into a template's slots)\n"
        );
        c.sampled = 1;
        c.sampled_alone = 1;
        assert_eq!(shown_for(&c, 5), "", "one prompt: nothing to group");
    }

    #[test]
    fn stats_numbers_read_as_people_write_them() {
        use super::{grouped, micros, uptime};
        assert_eq!(grouped(0), "0");
        assert_eq!(grouped(999), "999");
        assert_eq!(grouped(1_000), "1,000");
        assert_eq!(grouped(28_800_000), "28,800,000");
        assert_eq!(micros(850), "850 µs");
        assert_eq!(micros(2_140), "2.1 ms");
        assert_eq!(micros(1_250_000), "1.25 s");
        assert_eq!(uptime(59_999), "59s");
        assert_eq!(uptime(3_723_000), "1h 02m 03s");
        assert_eq!(uptime(90_061_000), "1d 1h 01m 01s");
    }

    #[test]
    fn a_watch_line_gives_the_rates_since_the_reading_before() {
        use prompt_radar::proto::{Latency, Stats};
        let before = Stats {
            uptime_ms: 10_000,
            allowed: 100,
            blocked: 5,
            prompts: 105,
            queue_capacity: 1024,
            ..Stats::default()
        };
        let now = Stats {
            uptime_ms: 12_000,
            allowed: 180,
            reviewed: 4,
            blocked: 21,
            refused_overload: 3,
            latency_last_minute: Some(Latency {
                count: 205,
                p50_us: 2_100,
                p99_us: 15_000,
                ..Latency::default()
            }),
            prompts: 205,
            queued: 7,
            queue_capacity: 1024,
            ..Stats::default()
        };
        assert_eq!(
            super::stats_line(&before, &now),
            "up 12s: 50.0 checks/s (80 allow, 4 review, 16 block), 3 refused, p50 2.1 ms p99 15.0 ms (last minute), queue 7/1024, 205 prompts"
        );
        // The server restarted between two readings: its new counters, over its uptime.
        let restarted = Stats {
            uptime_ms: 4_000,
            allowed: 18,
            ..Stats::default()
        };
        let line = super::stats_line(&now, &restarted);
        assert!(
            line.starts_with("up 4s (restarted): 4.5 checks/s (18 allow, 0 review, 0 block)"),
            "{line}"
        );
        let table = super::stats_table(&Stats {
            index_segments: 1,
            ..Stats::default()
        });
        assert!(table.contains("last minute: no answers"), "{table}");
        assert!(table.contains("0 vectors in 1 segment; part index 0 vectors in 0 segments"));
    }

    #[test]
    fn server_urls_take_host_port_and_refuse_https() {
        let url = |s: &str| super::server_url(s).map_err(|e| e.to_string());
        assert_eq!(url("127.0.0.1:50051").unwrap(), "http://127.0.0.1:50051");
        assert_eq!(url("http://radar:50051").unwrap(), "http://radar:50051");
        assert!(url("https://radar:50051").unwrap_err().contains("no TLS"));
        assert!(url("127.0.0.1").unwrap_err().contains("give the port"));
        assert!(url("http://radar").unwrap_err().contains("give the port"));
        assert!(
            url("http://127.0.0.1:99999")
                .unwrap_err()
                .contains("99999 is not a port (1 to 65535)")
        );
        assert!(url("127.0.0.1:0").unwrap_err().contains("0 is not a port"));
        assert!(url("radar:50051 x").unwrap_err().contains("not a valid"));
        assert_eq!(url("[::1]:50051").unwrap(), "http://[::1]:50051");
        assert!(url("[::1]").unwrap_err().contains("give the port"));
        assert!(
            url("grpc://radar:50051")
                .unwrap_err()
                .contains("unknown scheme")
        );
    }

    #[test]
    fn table_text_cannot_drive_the_terminal() {
        // Conceal, clear screen, set the clipboard (OSC 52, BEL-terminated), a C1 CSI.
        let attack =
            "Solve \u{1b}[8mhidden\u{1b}[0m \u{1b}[2J \u{1b}]52;c;ZXZpbA==\u{7} \u{9b}31m x";
        let s = shown(attack, usize::MAX);
        assert!(!s.chars().any(char::is_control), "{s:?}");
        assert_eq!(
            s,
            "Solve \\u{1b}[8mhidden\\u{1b}[0m \\u{1b}[2J \\u{1b}]52;c;ZXZpbA==\\u{7} \\u{9b}31m x"
        );
        // Bidirectional overrides and isolates, which reorder what follows them.
        assert_eq!(shown("a\u{202e}b\u{2066}c", 10), "a\\u{202e}b\\u{2066}c");
        // Line breaks and tabs keep the row on one line; other text is untouched.
        assert_eq!(
            shown("one\ntwo\r\n\tthree \u{2028}é 🌍", 100),
            "one two   three  é 🌍"
        );
    }

    #[test]
    fn table_text_shows_hidden_characters() {
        // Zero-width space and joiner, soft hyphen, byte-order mark, Hangul filler, and "hi"
        // in tag characters (hidden text that some models read).
        assert_eq!(
            shown(
                "a\u{200b}b\u{200d}c\u{ad}d\u{feff}e\u{3164}f \u{e0068}\u{e0069}",
                100
            ),
            "a\\u{200b}b\\u{200d}c\\u{ad}d\\u{feff}e\\u{3164}f \\u{e0068}\\u{e0069}"
        );
        // Joiners and variation selectors that are part of an emoji or a script are kept.
        let kept = "family 👨\u{200d}👩\u{200d}👧, heart ❤\u{fe0f}, क्\u{200d}ष";
        assert_eq!(shown(kept, 100), kept);
        // ... but not after ASCII, nor chained after a hidden one.
        assert_eq!(shown("x\u{fe0f}", 100), "x\\u{fe0f}");
        assert_eq!(shown("é\u{200b}\u{200d}", 100), "é\\u{200b}\\u{200d}");
    }

    #[test]
    fn table_columns_are_padded_to_their_display_width() {
        use super::padded;
        use unicode_width::UnicodeWidthStr;
        for id in [
            "acct-1",
            "账户-0",
            "アカウント0",
            "acct-😀0",
            "acct-z\u{337}0",
        ] {
            let cell = padded(id, 12);
            assert_eq!(cell.width(), 12, "{id:?} -> {cell:?}");
        }
        // Longer text is not cut (an id is something an analyst copies).
        assert_eq!(
            padded("a-very-long-account-id", 4),
            "a-very-long-account-id"
        );
    }

    #[test]
    fn a_stream_ended_without_a_verdict_says_where_to_go_on() {
        use super::no_verdict;
        let clean = no_verdict(650, 700, true);
        assert!(
            clean.starts_with("no verdict for line 650; the lines before it are checked, and no later line is stored (to go on: the same command with --start-line 650"),
            "{clean}"
        );
        // A crash may have stored lines it never answered: going on at 650 could store them twice.
        let crashed = no_verdict(650, 700, false);
        assert!(
            crashed.contains("lines 650-700 were sent, and the server may have stored some of them without answering")
                && crashed.contains("the store does not deduplicate")
                && !crashed.contains("to go on: the same command with --start-line"),
            "{crashed}"
        );
        assert!(no_verdict(3, 3, false).contains("; line 3 was sent, "));
    }

    #[test]
    fn an_output_that_is_not_a_regular_file_is_written_without_emptying_it() {
        use std::io::Write;
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/null")
            .unwrap();
        let mut out = super::EmptiedAtFirstWrite {
            file,
            emptied: false,
        };
        out.write_all(b"{}\n").unwrap();
        out.flush().unwrap();
        // A regular file is emptied at the first write, not before.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.jsonl");
        std::fs::write(&path, "old verdicts\n").unwrap();
        let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        let mut out = super::EmptiedAtFirstWrite {
            file,
            emptied: false,
        };
        assert_eq!(std::fs::read(&path).unwrap(), b"old verdicts\n");
        out.write_all(b"new\n").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new\n");
    }

    #[test]
    fn table_times_are_utc_dates() {
        use super::utc;
        assert_eq!(utc(0), "1970-01-01 00:00:00Z");
        assert_eq!(utc(1_718_000_000_000), "2024-06-10 06:13:20Z");
        assert_eq!(
            utc(951_782_400_000),
            "2000-02-29 00:00:00Z",
            "leap day of a 400-year leap year"
        );
        assert_eq!(
            utc(4_107_542_399_999),
            "2100-02-28 23:59:59Z",
            "2100 is no leap year"
        );
        assert_eq!(utc(-1), "1969-12-31 23:59:59Z");
    }

    #[test]
    fn an_accounts_campaigns_column_names_the_first_few() {
        use super::campaign_ids;
        assert_eq!(campaign_ids(&[], 3), "-");
        assert_eq!(campaign_ids(&[4711], 3), "4711");
        assert_eq!(campaign_ids(&[4711, 88, 913], 3), "4711,88,913");
        assert_eq!(campaign_ids(&[4711, 88, 913, 5, 6], 3), "4711,88,913,+2");
    }

    #[test]
    fn account_ids_show_lookalike_spaces_escaped() {
        assert_eq!(
            shown_id("team 7|team\u{a0}7|team\u{3000}7|team\u{2007}7", 100),
            "team 7|team\\u{a0}7|team\\u{3000}7|team\\u{2007}7"
        );
        assert_eq!(shown_id("é\u{200b}\u{1b}x", 100), "é\\u{200b}\\u{1b}x");
        assert_eq!(shown_id("abcdef", 4), "abcd…");
    }

    #[test]
    fn table_text_is_cut_after_max_characters() {
        assert_eq!(shown("abcdef", 6), "abcdef");
        assert_eq!(shown("abcdef", 4), "abcd…");
        assert_eq!(shown("ééééé", 2), "éé…");
        assert_eq!(shown("", 3), "");
    }
}
