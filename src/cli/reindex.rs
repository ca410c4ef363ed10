//! `prompt-radar reindex`: the offline batch path. Reads traffic JSONL, embeds it in large
//! batches and ingests it through the same engine as the server (see `prompt_radar::offline`),
//! with a progress bar and a summary line giving each stage's rate, so the bound is visible.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;

use prompt_radar::embed::{CandleEmbedder, Embedder};
use prompt_radar::engine::Engine;
use prompt_radar::offline::{self, CommittedLine, Observer};
use prompt_radar::traffic::{self, LineError, TrafficLine};

use super::{OfflineArgs, OnError, progress};

/// Flags of `reindex`.
#[derive(Debug, Clone, Args)]
pub struct ReindexArgs {
    #[command(flatten)]
    pub offline: OfflineArgs,
    /// On a malformed line: report it with its line number and go on, or stop.
    #[arg(long, env = "PROMPT_RADAR_ON_ERROR", value_enum, default_value_t = OnError::Skip)]
    pub on_error: OnError,
    /// Start at this line of the input (1-based), skipping the ones before: to go on after a
    /// stopped run (Ctrl-C, SIGTERM or --on-error stop), from the line its last message names.
    /// The store does not deduplicate: reading a line again stores its prompt twice.
    #[arg(long, env = "PROMPT_RADAR_START_LINE", default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    pub start_line: u64,
    /// Whether --start-line was given (on the command line or in the environment): then a
    /// file whose first lines are stored already is reindexed as told, not refused.
    #[arg(skip)]
    pub start_line_given: bool,
}

/// A progress display fed by the offline run; prints bad lines above it.
pub struct Progress {
    /// The bar (or plain lines, without a terminal).
    pub display: progress::Progress,
    /// Whether to go on after a bad line.
    pub keep_going: bool,
    /// Set (by [`stop_on_signal`]) when the run should stop.
    stop: Option<Arc<AtomicBool>>,
    /// The last line the store has committed.
    committed: CommittedLine,
    /// The verb, before each bad line's message.
    verb: String,
}

impl Progress {
    /// Progress over `total` lines labelled `verb` (`None`: not known beforehand).
    pub fn new(verb: &str, total: Option<u64>, on_error: OnError) -> Self {
        Self {
            display: progress::Progress::new(verb, total),
            keep_going: on_error == OnError::Skip,
            stop: None,
            committed: CommittedLine::default(),
            verb: verb.to_string(),
        }
    }

    /// From now on the first Ctrl-C or SIGTERM stops the run before its next line (saying
    /// `message` at once, even while a batch is being embedded), and a second exits at once,
    /// after removing `remove_on_exit` if given. With `stored`, that exit also says what it
    /// returns given the last committed line (`Err`: a commit was still running).
    pub fn stop_on_signal(
        &mut self,
        verb: &'static str,
        message: &'static str,
        remove_on_exit: Option<PathBuf>,
        stored: Option<AbruptStopNote>,
    ) -> anyhow::Result<()> {
        let note = stored.map(|f| (self.committed.clone(), f));
        let bar = self.display.bar();
        self.stop = Some(stop_on_signal(verb, message, bar, remove_on_exit, note)?);
        Ok(())
    }
}

/// What an abrupt stop adds to its line, given the last committed line (`Err`: a commit was still
/// running when it gave up waiting).
pub type AbruptStopNote = Box<dyn FnOnce(Result<usize, usize>) -> String + Send>;

/// A flag that the first Ctrl-C (SIGINT) or SIGTERM sets, saying `message` above `bar`; the
/// second exits at once with status 130. Stopping between batches keeps the store and the index in step either way (each batch is
/// one commit, and a start re-indexes what the last checkpoint lacks), but the first signal also
/// ends with the summary and a checkpoint. The second says what is stored when given `note` (it
/// waits for the batch being committed, if any, to know it). The handlers are in place when this
/// returns.
#[cfg(unix)]
fn stop_on_signal(
    verb: &'static str,
    message: &'static str,
    bar: indicatif::ProgressBar,
    remove_on_exit: Option<PathBuf>,
    note: Option<(CommittedLine, AbruptStopNote)>,
) -> anyhow::Result<Arc<AtomicBool>> {
    use tokio::signal::unix::{SignalKind, signal};
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (mut interrupt, mut terminate) = {
        let _entered = runtime.enter();
        (
            signal(SignalKind::interrupt())?,
            signal(SignalKind::terminate())?,
        )
    };
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            runtime.block_on(async {
                tokio::select! { _ = interrupt.recv() => {}, _ = terminate.recv() => {} }
                flag.fetch_or(true, Ordering::Relaxed);
                // Said now, not when the run next looks at the flag: that is after the batch
                // being embedded, which can take seconds.
                bar.suspend(|| eprintln!("{message}"));
                tokio::select! { _ = interrupt.recv() => {}, _ = terminate.recv() => {} }
            });
            if let Some(dir) = remove_on_exit {
                let _ = std::fs::remove_dir_all(dir);
            }
            let go_on = note.map_or(String::new(), |(committed, note)| {
                note(committed.stop_commits(Duration::from_secs(10)))
            });
            // Written, and the process ended, holding stderr (and the bar, which is cleared
            // first): no other thread's line (a summary being printed) can come after it, so
            // it is the last line, where a log's reader looks for where to go on.
            bar.suspend(|| {
                let mut err = std::io::stderr().lock();
                let _ = writeln!(err, "{verb}: stopped at once (second signal){go_on}");
                std::process::exit(130)
            })
        })?;
    Ok(stop)
}

/// What an abrupt stop says of the stored lines, given the last committed one (`Err`: a commit
/// was still running) and the run's first line.
fn go_on_after_abrupt_stop(committed: Result<usize, usize>, first: usize) -> String {
    let lines = the_lines(first);
    match committed {
        Ok(last) if last < first => {
            let again = if first > 1 {
                format!("the same command (--start-line {first})")
            } else {
                "the same command".to_string()
            };
            format!("; nothing was stored: to go on, {again}")
        }
        Ok(last) => {
            let next = last + 1;
            format!(
                "; {lines} before line {next} are stored (the next start indexes them); to go on: the same command with --start-line {next}"
            )
        }
        Err(last) if last < first => "; nothing was stored but perhaps the first batch, which was still being stored (the store does not deduplicate: count the stored prompts before going on)".to_string(),
        Err(last) => format!(
            "; {lines} up to line {last} are stored, and perhaps the batch after it, which was still being stored (the store does not deduplicate: count the stored prompts before going on)"
        ),
    }
}

/// "the lines", or "the lines from N" for a run that started at line N.
fn the_lines(first: usize) -> String {
    if first > 1 {
        format!("the lines from {first}")
    } else {
        "the lines".to_string()
    }
}

/// Elsewhere a signal ends the run as the system does by default.
#[cfg(not(unix))]
fn stop_on_signal(
    _verb: &'static str,
    _message: &'static str,
    _bar: indicatif::ProgressBar,
    _remove_on_exit: Option<PathBuf>,
    _note: Option<(CommittedLine, AbruptStopNote)>,
) -> anyhow::Result<Arc<AtomicBool>> {
    Ok(Arc::new(AtomicBool::new(false)))
}

impl Observer for Progress {
    fn stored(&mut self, _line: usize, _input: &TrafficLine) {
        self.display.inc(1);
    }
    /// `reindex` shows no verdicts (`eval`, which reads them, says so itself).
    fn scores(&self) -> bool {
        false
    }
    fn bad_line(&mut self, error: &LineError) -> bool {
        self.display
            .suspend(|| eprintln!("{}: line {}: {}", self.verb, error.line, error.reason));
        self.display.inc(1);
        self.keep_going
    }
    fn interrupted(&mut self) -> bool {
        self.stop
            .as_ref()
            .is_some_and(|stop| stop.load(Ordering::Relaxed))
    }
    fn committed_line(&self) -> Option<CommittedLine> {
        Some(self.committed.clone())
    }
}

/// The lines of an input that an earlier run of it stored: from line 1 (skipping bad lines,
/// which are never stored) to the line before `next`, as prompts `first_id..=last_id`.
#[derive(Debug, PartialEq, Eq)]
struct Rerun {
    next: usize,
    first_id: u64,
    last_id: u64,
    /// Whether every matched line gave its time (and the time matched too).
    timed: bool,
}

/// Whether `input`'s first lines are stored already, as a run of it stored them: its first
/// usable line is a stored prompt (the same account, text and time, where the line gives one),
/// and so is each next usable line, at the next id. `None` when the first usable line is not,
/// or when it has no time and the next usable line does not follow it: one account's "Hi!",
/// stored before, is no evidence that this file was run.
fn rerun_of(
    engine: &Engine,
    input: &std::path::Path,
    limits: &prompt_radar::config::Limits,
) -> anyhow::Result<Option<Rerun>> {
    let found = stored_run(engine, input, limits)?;
    Ok(found.filter(|run| run.timed || run.last_id > run.first_id))
}

/// [`rerun_of`]'s walk: the run of stored lines from the first usable one.
fn stored_run(
    engine: &Engine,
    input: &std::path::Path,
    limits: &prompt_radar::config::Limits,
) -> anyhow::Result<Option<Rerun>> {
    use prompt_radar::server::validate;
    let reader = std::io::BufReader::new(std::fs::File::open(input)?);
    let mut found: Option<Rerun> = None;
    let mut last_line = 0;
    for (line, parsed) in traffic::lines(reader) {
        last_line = line;
        let Ok(t) = parsed else { continue };
        let Ok(v) = validate::prompt(&t.account_id, &t.prompt, t.timestamp_ms, limits) else {
            continue;
        };
        // A line without a time was stored at the time of its run.
        let time = (t.timestamp_ms != 0).then_some(v.timestamp_ms);
        let same = |r: &prompt_radar::store::PromptRecord| {
            r.account_id == v.account_id
                && r.text == v.prompt
                && time.is_none_or(|t| t == r.timestamp_ms)
        };
        match &mut found {
            None => match engine.find_stored(&v.account_id, &v.prompt, time)? {
                Some(id) => {
                    found = Some(Rerun {
                        next: line + 1,
                        first_id: id,
                        last_id: id,
                        timed: time.is_some(),
                    });
                }
                None => return Ok(None),
            },
            Some(run) => match engine.record(run.last_id + 1) {
                Ok(r) if same(&r) => {
                    (run.next, run.last_id) = (line + 1, run.last_id + 1);
                    run.timed &= time.is_some();
                }
                _ => {
                    run.next = line;
                    return Ok(found);
                }
            },
        }
    }
    if let Some(run) = &mut found {
        run.next = last_line + 1;
    }
    Ok(found)
}

/// An input as messages name it: `-` is standard input.
fn named(input: &std::path::Path) -> String {
    match input.as_os_str() == "-" {
        true => "standard input (-)".to_string(),
        false => input.display().to_string(),
    }
}

/// Runs the batch; returns whether every line was used.
pub fn run(args: ReindexArgs) -> anyhow::Result<bool> {
    let first = usize::try_from(args.start_line).unwrap_or(usize::MAX);
    let mut config = args.offline.engine.to_offline_config()?;
    let input = &traffic::input_path(&args.offline.input);
    // A pipe is read once: no count and no time-order pass before the run.
    let once = !traffic::rereadable(input)
        .with_context(|| format!("cannot read {}", args.offline.input.display()))?;
    if once {
        eprintln!(
            "reindex: {} is not a regular file: it is read once, with no line count beforehand and no check that it is in time order",
            named(&args.offline.input)
        );
    }
    // With time-sliced segments the input's times are read too, in the same pass as the count.
    let span = config.segments.segment_span_ms;
    let max_points = config.segments.max_points_per_segment;
    let order = prompt_radar::engine::slice_clock_on_disk(&config)
        .filter(|_| !once)
        .map(|(clock, before)| {
            let index = (clock, before, max_points);
            traffic::time_order(input, first, args.offline.batch_size, index)
        })
        .transpose()
        .with_context(|| format!("cannot read {}", input.display()))?;
    let total = match &order {
        _ if once => None,
        Some(order) => Some(order.lines),
        None => Some(
            traffic::count_lines(input, first)
                .with_context(|| format!("cannot read {}", input.display()))?,
        ),
    };
    let file =
        std::fs::File::open(input).with_context(|| format!("cannot open {}", input.display()))?;
    let load = Instant::now();
    let mut embedder = CandleEmbedder::load(&args.offline.model.model, args.offline.model.device)?;
    if let (Some(span), Some(order)) = (span, order) {
        // What a late line costs: without retention (segments sliced by --segment-hours alone)
        // only a segment that spans more time.
        let keeps = if config.segments.retention_ms.is_some() {
            "and retention keeps them until those expire"
        } else {
            "which only makes that segment span more time (nothing expires without --retention-days)"
        };
        let example = order.first_late.map_or(String::new(), |(line, behind)| {
            format!(
                " (line {line} is {:.1} days older than a line before it)",
                behind as f64 / 86_400_000.0
            )
        });
        if order.too_disordered(span) {
            // Traffic that goes back in time again and again would seal a segment per run of
            // it, and every search visits every segment.
            config.segments.segment_span_ms = None;
            eprintln!(
                "reindex: the input is not in time order{example}: index segments of {} h would be {} segments for {:.1} days of traffic, so this run seals them by size only (retention drops a segment once its newest prompt expires); sort the file by timestamp_ms to slice it by time",
                span / 3_600_000,
                order.seals,
                order.covered_ms as f64 / 86_400_000.0,
            );
        } else if order.many_late() {
            let late = order.late - order.late_in_order;
            // No line of the file came behind another: it is older than the index's newest, and
            // sorting the file would not help.
            let (what, remedy) = match order.first_late {
                Some(_) => (
                    format!("the input is not in time order{example}"),
                    "sort the file by timestamp_ms to slice it exactly",
                ),
                None => (
                    "the input is older than the index's segment being filled".to_string(),
                    "traffic older than a data directory's goes into its newest segment",
                ),
            };
            eprintln!(
                "reindex: {what}: {late} of {} lines ({:.1}%) would go into an index segment with prompts over {} h newer, {keeps}; {remedy}",
                order.timed,
                100.0 * late as f64 / order.timed.max(1) as f64,
                2 * span / 3_600_000,
            );
        } else if order.many_late_in_order(span) {
            eprintln!(
                "reindex: batches of {} lines span up to {:.1} h of this input's traffic, more than the index segments' {} h: {} of {} lines ({:.1}%) would go into a segment with prompts over {} h newer, {keeps}; a smaller --batch-size slices closer",
                args.offline.batch_size,
                order.widest_batch_ms as f64 / 3_600_000.0,
                span / 3_600_000,
                order.late_in_order,
                order.timed,
                100.0 * order.late_in_order as f64 / order.timed.max(1) as f64,
                2 * span / 3_600_000,
            );
        }
    }
    let engine = Engine::open(config, embedder.dim())?;
    engine.check_model(
        &mut embedder,
        &args.offline.model.model.display().to_string(),
    )?;
    let mut progress = Progress::new("reindex", total, args.on_error);
    progress.stop_on_signal(
        "reindex",
        "reindex: stopping: the lines read so far are embedded and stored first (a second Ctrl-C quits at once)",
        None,
        Some(Box::new(move |committed| {
            go_on_after_abrupt_stop(committed, first)
        })),
    )?;
    eprintln!(
        "reindex: model on {} and data dir {} ready in {:.1}s ({} prompts already stored)",
        embedder.device_name(),
        engine.data_dir().display(),
        load.elapsed().as_secs_f64(),
        engine.len()
    );
    if first == 1 && !engine.is_empty() {
        // A run killed part way (kill -9, a crash) and started again would store its lines
        // twice: a file whose first lines are stored already is refused, naming where to go on.
        let rerun = match (once, args.start_line_given) {
            (false, false) => {
                let limits = args.offline.prompt_limit.limits();
                rerun_of(&engine, input, &limits)
                    .with_context(|| format!("cannot read {}", input.display()))?
            }
            _ => None,
        };
        if let Some(rerun) = rerun {
            anyhow::bail!(
                "{} (prompts {}-{} of the data dir, {}): going on from line 1 would store them twice; to go on: the same command with --start-line {}; to store them again: --start-line 1",
                match rerun.next {
                    2 => format!("line 1 of {} is stored already", named(&args.offline.input)),
                    n => format!(
                        "lines 1-{} of {} are stored already",
                        n - 1,
                        named(&args.offline.input)
                    ),
                },
                rerun.first_id,
                rerun.last_id,
                if rerun.timed {
                    "with the same account, time and text"
                } else {
                    "with the same accounts and texts, in the same order"
                },
                rerun.next
            );
        }
        if once {
            eprintln!(
                "reindex: note: the data dir already holds {} prompts; if they are this input's lines from a run that was stopped, go on with --start-line instead (its last message, or the count of lines stored, names it): the store does not deduplicate",
                engine.len()
            );
        }
    }
    if first > 1 {
        eprintln!("reindex: starting at line {first}");
        if total == Some(0) {
            eprintln!(
                "reindex: {} has nothing from line {first} on: nothing to do",
                named(&args.offline.input)
            );
        }
    }
    let reader = std::io::BufReader::new(file);
    // A pipe is read on a thread of its own: while it is quiet, what was read is stored and a
    // stop (Ctrl-C, SIGTERM) takes effect, instead of both waiting for its next line.
    let lines: Box<dyn Iterator<Item = offline::Feed>> = if once {
        Box::new(offline::read_on_a_thread(reader, first)?)
    } else {
        Box::new(offline::feed(traffic::lines_from(reader, first)))
    };
    let cache_file = args.offline.embed_cache.as_deref();
    let mut cache =
        offline::VectorCache::for_run(cache_file, embedder.dim(), &args.offline.model.model)
            .context("--embed-cache")?;
    let times = offline::run(
        &mut embedder,
        &mut cache,
        &engine,
        lines,
        args.offline.batch_size,
        &args.offline.prompt_limit.limits(),
        &mut progress,
    )?;
    progress.display.finish();
    eprintln!("{}", times.summary("reindex"));
    // What was embedded is valid whatever happened next: a rerun starts warm.
    if let Some(p) = cache_file {
        match cache.save(p) {
            Ok(()) => eprintln!(
                "reindex: {} vectors in --embed-cache {}",
                cache.len(),
                p.display()
            ),
            Err(e) => eprintln!("reindex: cannot write --embed-cache {}: {e}", p.display()),
        }
    }
    if once && first > 1 && times.last_line == 0 && !times.interrupted {
        // A file is checked before the run; a pipe only shows it now.
        eprintln!("reindex: the input ended before line {first} (--start-line): nothing to do");
    }
    // So that `serve` reloads the index instead of rebuilding what the last segment holds.
    let saved = engine.checkpoint();
    if let Ok(saved) = &saved {
        eprintln!(
            "reindex: index checkpoint written in {:.1}s ({} active-segment vectors, {} of the part index's, {}; `serve` reloads them); {}{}",
            saved.seconds,
            saved.active_vectors,
            saved.part_vectors,
            super::snapshot_note(saved),
            prompt_radar::detect::scoring::counted(saved.segments as u64, "index segment"),
            if saved.merging {
                " (a merge was running: `serve` starts it again)"
            } else {
                ""
            }
        );
    }
    if let Some(note) = super::past_retention(&engine) {
        eprintln!("reindex: {note}");
    }
    // Where to go on is the last line (a batch job's log tail), checkpoint or not.
    if times.interrupted || times.stopped {
        // A stop at a bad line leaves that line to fix; an interrupted run goes on after the
        // last line it read (or from where it started, when it read none).
        let next = if times.stopped {
            times.last_line
        } else {
            (times.last_line + 1).max(first)
        };
        // The bad lines skipped on the way (a stop at one: that one is named below).
        let skipped = times.bad_lines - u64::from(times.stopped);
        let stored = if next <= first {
            "nothing was stored".to_string()
        } else if skipped > 0 {
            format!(
                "{} before line {next} are stored and indexed, but for the {} reported above",
                the_lines(first),
                prompt_radar::detect::scoring::counted(skipped, "bad line")
            )
        } else {
            format!(
                "{} before line {next} are stored and indexed",
                the_lines(first)
            )
        };
        if times.stopped {
            eprintln!(
                "reindex: {stored}; line {next} is not: fix it and go on with --start-line {next} (the same command)"
            );
        } else {
            eprintln!("reindex: {stored}; to go on: the same command with --start-line {next}");
        }
    }
    saved?;
    Ok(times.bad_lines == 0 && !times.interrupted)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_abrupt_stop_says_where_to_go_on() {
        assert_eq!(
            go_on_after_abrupt_stop(Ok(256), 1),
            "; the lines before line 257 are stored (the next start indexes them); to go on: the same command with --start-line 257"
        );
        assert!(
            go_on_after_abrupt_stop(Ok(300), 100)
                .starts_with("; the lines from 100 before line 301 are stored")
        );
        // Stopped before the first batch was stored: nothing to count, and no line 1 to name.
        assert_eq!(
            go_on_after_abrupt_stop(Ok(0), 1),
            "; nothing was stored: to go on, the same command"
        );
        assert_eq!(
            go_on_after_abrupt_stop(Ok(0), 40),
            "; nothing was stored: to go on, the same command (--start-line 40)"
        );
        assert!(
            go_on_after_abrupt_stop(Err(0), 1)
                .starts_with("; nothing was stored but perhaps the first batch")
        );
        assert!(
            go_on_after_abrupt_stop(Err(512), 1).starts_with(
                "; the lines up to line 512 are stored, and perhaps the batch after it"
            )
        );
    }
}
