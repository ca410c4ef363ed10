//! Command-line verbs of the `prompt-radar` binary (DESIGN.md, "Interface contract"). Raw flags
//! are parsed here and turned into the library's validated settings; every flag also reads an
//! environment variable `PROMPT_RADAR_<FLAG>`.

pub mod bench;
pub mod client;
pub mod eval;
pub mod progress;
pub mod reindex;
pub mod serve;

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use prompt_radar::config::{DeviceKind, EngineConfig, Limits};
use prompt_radar::detect::DetectorConfig;
use prompt_radar::index::{HnswParams, SegmentsConfig};

/// prompt-radar: catches capability-harvesting campaigns (templated prompts spread across
/// many accounts) with sentence embeddings, HNSW and template clustering.
#[derive(Debug, Parser)]
#[command(version, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// What the index no longer holds of the store: the prompts whose segments retention dropped
/// (`None` when it holds them all). They stay in the store and in their clusters, but no search
/// finds them; keeping them longer later does not bring them back.
pub fn past_retention(engine: &prompt_radar::engine::Engine) -> Option<String> {
    let census = engine.census();
    let gone = census.prompts.saturating_sub(census.index.1);
    let why = match engine.retention_ms() {
        Some(_) => "are past --retention-days",
        // Dropped under an earlier setting: a longer one (or none) does not bring them back.
        None => "were dropped from the index by an earlier --retention-days",
    };
    (gone > 0).then(|| {
        format!(
            "{gone} of the {} stored prompts {why}: stored and counted in their accounts and clusters, but out of the index, where neither `search` nor a new prompt's neighbour lookup finds them",
            census.prompts
        )
    })
}

/// A subcommand's path: `["allow", "add"]`.
type VerbPath = &'static [&'static str];
/// A flag's id (its field's name) and its long name.
type FlagName = (&'static str, &'static str);

/// Flags that exclude each other, per verb: (verb path, flag id, its long name). When one is on
/// the command line, the others' environment variables are not read: a `PROMPT_RADAR_TEXT` left
/// set must not make `search --id 7` fail with a conflict about a `--text` nobody typed.
const EXCLUSIVE: &[(VerbPath, &[FlagName])] = &[
    (&["search"], &[("text", "--text"), ("id", "--id")]),
    (
        &["allow", "add"],
        &[("template", "--template"), ("campaign", "--campaign")],
    ),
    (&["accounts"], &[("id", "--id"), ("flagged", "--flagged")]),
    (
        &["campaigns"],
        &[
            ("id", "--id"),
            ("top", "--top"),
            ("min_score", "--min-score"),
        ],
    ),
];

impl Cli {
    /// Parses the process's command line (and environment), exiting with clap's message and
    /// status on an error.
    pub fn parse_args() -> Self {
        Self::parse_from_args(std::env::args_os().collect())
    }

    /// [`Cli::parse_args`] of `args` (the program's name first).
    pub fn parse_from_args(args: Vec<std::ffi::OsString>) -> Self {
        Self::try_parse_from_args(args).unwrap_or_else(|e| e.exit())
    }

    /// [`Cli::parse_from_args`], returning clap's error instead of exiting with it.
    pub fn try_parse_from_args(args: Vec<std::ffi::OsString>) -> Result<Self, clap::Error> {
        use clap::{CommandFactory, FromArgMatches};
        let typed = |long: &str| {
            args.iter().skip(1).any(|a| {
                a.to_str().is_some_and(|a| {
                    a == long || a.strip_prefix(long).is_some_and(|r| r.starts_with('='))
                })
            })
        };
        let mut cmd = negative_numbers(Self::command());
        for (path, flags) in EXCLUSIVE {
            let on_line: Vec<&str> = flags
                .iter()
                .filter(|(_, long)| typed(long))
                .map(|(id, _)| *id)
                .collect();
            if on_line.is_empty() {
                continue;
            }
            for (id, _) in flags.iter().filter(|(id, _)| !on_line.contains(id)) {
                cmd = without_env(cmd, path, id);
            }
        }
        let cmd = cmd.mut_subcommand("eval", |eval| {
            eval.mut_arg("data_dir", |a| {
                a.help("Directory to write the run's store and index into, and keep (as --keep-data); must hold no store yet. Without it on the command line, eval writes into a temporary directory and removes it (with --keep-data: ./data, or PROMPT_RADAR_DATA_DIR)")
                    .hide_default_value(true)
            })
        });
        // Before clap's own errors: `--text --account x` would be "unexpected argument 'x'".
        if let Some(e) = flag_taken_as_value(&cmd, &args) {
            return Err(e);
        }
        let matches = cmd.try_get_matches_from(args).map_err(negative_count)?;
        let mut cli = Self::from_arg_matches(&matches)?;
        if let Command::Reindex(reindex) = &mut cli.command {
            // Given at all (the environment included): the user chose where to start.
            reindex.start_line_given = matches
                .subcommand_matches("reindex")
                .and_then(|m| m.value_source("start_line"))
                .is_some_and(|s| s != clap::parser::ValueSource::DefaultValue);
        }
        if let Command::Eval(eval) = &mut cli.command {
            eval.data_dir_typed = matches
                .subcommand_matches("eval")
                .and_then(|m| m.value_source("data_dir"))
                == Some(clap::parser::ValueSource::CommandLine);
        }
        Ok(cli)
    }
}

/// A free-text flag (they take values that begin with `-`: `--text "-v means verbose?"`) whose
/// value, given as a word of its own, is another flag of its verb: `search --text --account x`
/// forgot the text, and would search for "--account". Refused, saying how to mean it
/// (`--text=--account`).
fn flag_taken_as_value(cmd: &clap::Command, args: &[std::ffi::OsString]) -> Option<clap::Error> {
    let words: Vec<&str> = args.iter().filter_map(|a| a.to_str()).collect();
    // The verb's command: `search`, or `allow add` (a verb has no subcommand named like a
    // value it takes, so a value does not lead astray).
    let (mut leaf, mut verb) = (cmd, Vec::new());
    for w in words.iter().skip(1) {
        if let Some(sub) = leaf.find_subcommand(w) {
            leaf = sub;
            verb.push(sub.get_name());
        }
    }
    let flags: Vec<String> = leaf
        .get_arguments()
        .flat_map(|a| {
            let long = a.get_long().map(|l| format!("--{l}"));
            let short = a.get_short().map(|c| format!("-{c}"));
            long.into_iter().chain(short)
        })
        .chain(["--help".to_string(), "-h".to_string()])
        .collect();
    for a in leaf
        .get_arguments()
        .filter(|a| a.is_allow_hyphen_values_set())
    {
        let Some(long) = a.get_long().map(|l| format!("--{l}")) else {
            continue;
        };
        for pair in words.windows(2) {
            if pair[0] == long && flags.iter().any(|f| f == pair[1]) {
                return Some(clap::Error::raw(
                    clap::error::ErrorKind::InvalidValue,
                    format!(
                        "{long} needs a value, and '{}' is a flag of `{}`: give the value after {long} (to mean that very text, write {long}={})\n",
                        pair[1],
                        verb.join(" "),
                        pair[1]
                    ),
                ));
            }
        }
    }
    None
}

/// A negative number given to a flag that counts (`--timeout -1`) is said as such, not as the
/// integer parser's "invalid digit found in string", and a 0 given to one that counts from 1
/// (`--top 0`) as "must be at least 1", not "0 is not in 1..=4294967295"; other errors are as
/// clap made them.
fn negative_count(e: clap::Error) -> clap::Error {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    let (Some(ContextValue::String(arg)), Some(ContextValue::String(value))) = (
        e.get(ContextKind::InvalidArg),
        e.get(ContextKind::InvalidValue),
    ) else {
        return e;
    };
    let text = e.to_string();
    // clap writes an open range as `1..=4294967295` (u32) or `1..18446744073709551615` (u64).
    let unbounded = [u32::MAX as u64, u64::MAX].iter().any(|max| {
        text.contains(&format!(" is not in 1..={max}"))
            || text.contains(&format!(" is not in 1..{max}"))
    });
    if e.kind() == ErrorKind::ValueValidation && unbounded {
        return clap::Error::raw(
            ErrorKind::ValueValidation,
            format!("invalid value '{value}' for '{arg}': must be at least 1\n"),
        );
    }
    let negative = value.starts_with('-') && value[1..].parse::<f64>().is_ok();
    if e.kind() != ErrorKind::ValueValidation || !negative || !text.contains("invalid digit") {
        return e;
    }
    clap::Error::raw(
        ErrorKind::ValueValidation,
        format!("invalid value '{value}' for '{arg}': must not be negative\n"),
    )
}

/// `cmd` with every flag that takes a value, in every subcommand, taking a negative number:
/// `--retention-days -1` then reaches the flag's own check ("must not be negative") instead of
/// clap's "unexpected argument '-1'", and `--from-ms -5` its range check.
fn negative_numbers(cmd: clap::Command) -> clap::Command {
    cmd.mut_args(|a| {
        if a.get_action().takes_values() {
            a.allow_negative_numbers(true)
        } else {
            a
        }
    })
    .mut_subcommands(negative_numbers)
}

/// `cmd` with flag `id` of subcommand `path` reading no environment variable.
fn without_env(cmd: clap::Command, path: &[&str], id: &str) -> clap::Command {
    match path.split_first() {
        None => cmd.mut_arg(id, |a| a.env(None)),
        Some((sub, rest)) => cmd.mut_subcommand(*sub, |s| without_env(s, rest, id)),
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gRPC server on its embedded defaults.
    Serve(serve::ServeArgs),
    /// Stream every line of a traffic JSONL file through CheckStream, in file order, and write
    /// one verdict per line.
    Check(client::CheckArgs),
    /// Every account's current verdict.
    Accounts(client::AccountsArgs),
    /// Campaigns with their template, sizes and score.
    Campaigns(client::CampaignsArgs),
    /// Nearest stored prompts with account, time and similarity.
    Search(client::SearchArgs),
    /// Offline batch: embed, store, index and cluster a traffic JSONL file into a data directory.
    Reindex(reindex::ReindexArgs),
    /// Run labelled traffic through the detector and print its metrics beside two baselines.
    Eval(eval::EvalArgs),
    /// Manage the allow-list of known legitimate app templates (admin).
    Allow(client::AllowArgs),
    /// What the server answered since it started and how fast, its queue, and how much it holds
    /// (operators; --watch to follow it).
    Stats(client::StatsArgs),
    /// Time the embedder on real prompts (or fixed-length batches) per batch size.
    BenchEmbed(bench::BenchEmbedArgs),
}

/// What to do with a bad input line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OnError {
    /// Report it (with its line number) and go on.
    Skip,
    /// Report it and stop.
    Stop,
}

/// Output format of the listing verbs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// One JSON object per line.
    Jsonl,
    /// An aligned table for people.
    Table,
}

/// Where the model is and where it runs.
#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// Directory with config.json, tokenizer.json and model.safetensors (`make model` fetches it).
    #[arg(
        long,
        env = "PROMPT_RADAR_MODEL",
        default_value = "models/all-MiniLM-L6-v2"
    )]
    pub model: PathBuf,
    /// Where the model runs: cpu, cuda or cuda:N (cuda needs a build with --features cuda).
    #[arg(long, env = "PROMPT_RADAR_DEVICE", default_value = "cpu")]
    pub device: DeviceKind,
}

/// Store, index and detector settings shared by `serve` and `reindex`.
#[derive(Debug, Clone, Args)]
pub struct EngineArgs {
    /// Directory of the prompt store and the sealed index segments (created if missing).
    #[arg(long, env = "PROMPT_RADAR_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,
    /// Link two prompts when the cosine of their embeddings is at least this.
    #[arg(long, env = "PROMPT_RADAR_SIMILARITY_THRESHOLD", default_value_t = DetectorConfig::default().similarity_threshold)]
    pub similarity_threshold: f32,
    /// Neighbours looked up per prompt.
    #[arg(long, env = "PROMPT_RADAR_NEIGHBOURS", default_value_t = DetectorConfig::default().neighbours_k)]
    pub neighbours: usize,
    /// Link two prompts by their parts (sentences, lines) when their part embeddings have at least
    /// this cosine (see --part-matches).
    #[arg(long, env = "PROMPT_RADAR_PART_SIMILARITY", default_value_t = DetectorConfig::default().part_similarity)]
    pub part_similarity: f32,
    /// Matched parts two prompts must share to be linked by their parts (0 turns part links off).
    #[arg(long, env = "PROMPT_RADAR_PART_MATCHES", default_value_t = DetectorConfig::default().part_matches)]
    pub part_matches: u32,
    /// Distinct accounts at which a cluster's account factor reaches 0.63.
    #[arg(long, env = "PROMPT_RADAR_CAMPAIGN_ACCOUNTS", default_value_t = DetectorConfig::default().campaign_accounts)]
    pub campaign_accounts: u32,
    /// Prompts per account at which a cluster's repeat factor reaches 1: harvesters send their
    /// template again and again, organic templates reach many users about once each (1 = off).
    #[arg(long, env = "PROMPT_RADAR_CAMPAIGN_PROMPTS_PER_ACCOUNT", default_value_t = DetectorConfig::default().campaign_prompts_per_account)]
    pub campaign_prompts_per_account: f32,
    /// Account score from which the action is `review` (and the account is flagged), once the
    /// account has --min-campaign-prompts prompts in campaigns (before, it is `allow`).
    #[arg(long, env = "PROMPT_RADAR_REVIEW_SCORE", default_value_t = DetectorConfig::default().review_score)]
    pub review_score: f32,
    /// Account score from which the action is `block`.
    #[arg(long, env = "PROMPT_RADAR_BLOCK_SCORE", default_value_t = DetectorConfig::default().block_score)]
    pub block_score: f32,
    /// Prompts an account must have in campaigns before it is flagged at all: until then its
    /// action is `allow` whatever its score.
    #[arg(long, env = "PROMPT_RADAR_MIN_CAMPAIGN_PROMPTS", default_value_t = DetectorConfig::default().min_campaign_prompts)]
    pub min_campaign_prompts: u32,
    /// Share of an account's prompts in a campaign that must link directly to other accounts'
    /// prompts for all of its prompts there to count (below it, only those linked ones count).
    #[arg(long, env = "PROMPT_RADAR_MIN_CROSS_ACCOUNT_SHARE", default_value_t = DetectorConfig::default().min_cross_account_share)]
    pub min_cross_account_share: f32,
    /// HNSW links per vector and layer (layer 0 keeps twice as many): more find neighbours
    /// better, at the cost of slower inserts and more memory. Applies to new segments.
    #[arg(long, env = "PROMPT_RADAR_HNSW_M", default_value_t = HnswParams::default().m)]
    pub hnsw_m: usize,
    /// HNSW candidate list while inserting: larger builds a better graph, more slowly.
    /// Applies to new segments.
    #[arg(long, env = "PROMPT_RADAR_HNSW_EF_CONSTRUCTION", default_value_t = HnswParams::default().ef_construction)]
    pub hnsw_ef_construction: usize,
    /// HNSW candidate list while searching (at least --neighbours is used): larger misses fewer
    /// neighbours, more slowly. Applies to every segment, reloaded ones too.
    #[arg(long, env = "PROMPT_RADAR_HNSW_EF_SEARCH", default_value_t = HnswParams::default().ef_search)]
    pub hnsw_ef_search: usize,
    /// Most vectors in one HNSW segment before it is sealed and dumped. Default: 200000 for
    /// `serve` (a start after a crash re-inserts the active segment's prompts); `reindex` and
    /// `eval` build their segments at --segment-merge-points at once (1000000), as searching
    /// many small segments and merging them costs an offline run more than twice the time.
    #[arg(long, env = "PROMPT_RADAR_SEGMENT_MAX_POINTS", value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub segment_max_points: Option<usize>,
    /// Hours of traffic one HNSW segment spans before it is sealed. Default: 24 with
    /// --retention-days (whole segments are what retention drops), else none: segments seal by
    /// size alone, as each one more is one more graph every search visits.
    #[arg(long, env = "PROMPT_RADAR_SEGMENT_HOURS")]
    pub segment_hours: Option<i64>,
    /// Merge adjacent sealed HNSW segments, in the background, into segments of up to this
    /// many vectors (0 = never): every search visits every segment.
    #[arg(long, env = "PROMPT_RADAR_SEGMENT_MERGE_POINTS", default_value_t = SegmentsConfig::default().merge_max_points)]
    pub segment_merge_points: usize,
    /// Drop sealed segments older than this many days from the index (0 = keep forever).
    /// The store keeps every prompt; only the searchable window shrinks.
    #[arg(long, env = "PROMPT_RADAR_RETENTION_DAYS", default_value_t = 0)]
    pub retention_days: i64,
}

impl EngineArgs {
    /// The validated engine settings of an offline run (`reindex`, `eval`): as
    /// [`Self::to_config`], but unless --segment-max-points is given, segments are built at the
    /// size merges would make (--segment-merge-points) rather than sealed small and merged in
    /// the background. An offline run of 1M prompts otherwise searches up to five segments a
    /// lookup and re-inserts every vector once or twice more in merges, on the same cores.
    pub fn to_offline_config(&self) -> anyhow::Result<EngineConfig> {
        let mut c = self.to_config()?;
        if self.segment_max_points.is_none() {
            let merged = c.segments.merge_max_points;
            c.segments.max_points_per_segment = merged.max(c.segments.max_points_per_segment);
        }
        Ok(c)
    }

    /// The validated engine settings.
    pub fn to_config(&self) -> anyhow::Result<EngineConfig> {
        for (flag, value) in [
            ("--similarity-threshold", self.similarity_threshold),
            ("--part-similarity", self.part_similarity),
            ("--review-score", self.review_score),
            ("--block-score", self.block_score),
            ("--min-cross-account-share", self.min_cross_account_share),
        ] {
            // (NaN is in no range.)
            anyhow::ensure!((0.0..=1.0).contains(&value), "{flag} must be within [0, 1]");
        }
        anyhow::ensure!(
            self.review_score <= self.block_score,
            "--review-score must not exceed --block-score"
        );
        anyhow::ensure!(self.neighbours > 0, "--neighbours must be at least 1");
        anyhow::ensure!(
            self.campaign_accounts >= 2,
            "--campaign-accounts must be at least 2 (one account alone is never a campaign)"
        );
        anyhow::ensure!(
            self.campaign_prompts_per_account >= 1.0
                && self.campaign_prompts_per_account.is_finite(),
            "--campaign-prompts-per-account must be a number of at least 1 (1 = off)"
        );
        anyhow::ensure!(
            (2..=255).contains(&self.hnsw_m),
            "--hnsw-m must be within [2, 255]"
        );
        anyhow::ensure!(
            self.hnsw_ef_construction > 0 && self.hnsw_ef_search > 0,
            "--hnsw-ef-construction and --hnsw-ef-search must be at least 1"
        );
        anyhow::ensure!(
            self.segment_hours.is_none_or(|h| h > 0),
            "--segment-hours must be at least 1"
        );
        anyhow::ensure!(
            self.retention_days >= 0,
            "--retention-days must not be negative"
        );
        let mut c = EngineConfig::with_data_dir(&self.data_dir);
        c.detector = DetectorConfig {
            similarity_threshold: self.similarity_threshold,
            neighbours_k: self.neighbours,
            part_similarity: self.part_similarity,
            part_matches: self.part_matches,
            campaign_accounts: self.campaign_accounts,
            campaign_prompts_per_account: self.campaign_prompts_per_account,
            review_score: self.review_score,
            block_score: self.block_score,
            min_campaign_prompts: self.min_campaign_prompts,
            min_cross_account_share: self.min_cross_account_share,
            ..DetectorConfig::default()
        };
        c.segments.params = HnswParams {
            m: self.hnsw_m,
            ef_construction: self.hnsw_ef_construction,
            ef_search: self.hnsw_ef_search,
            ..c.segments.params
        };
        c.segments.max_points_per_segment = self
            .segment_max_points
            .unwrap_or(SegmentsConfig::default().max_points_per_segment)
            .max(1);
        c.segments.merge_max_points = self.segment_merge_points;
        c.segments.retention_ms =
            (self.retention_days > 0).then_some(self.retention_days.saturating_mul(86_400_000));
        c.segments.segment_span_ms = match self.segment_hours {
            Some(h) => Some(h.saturating_mul(3_600_000)),
            None => c.segments.retention_ms.map(|_| 24 * 3_600_000),
        };
        Ok(c)
    }
}

/// The largest prompt a verb takes (`serve`, `reindex`, `eval`: the offline verbs keep to the
/// server's limit so that a file reindexed is a file the server would take).
#[derive(Debug, Clone, Args)]
pub struct PromptLimitArgs {
    /// Largest prompt accepted, in bytes of UTF-8 (at most 1 MiB).
    #[arg(long, env = "PROMPT_RADAR_MAX_PROMPT_BYTES", default_value_t = Limits::default().max_prompt_bytes, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=Limits::MAX_PROMPT_BYTES as u64))]
    pub max_prompt_bytes: usize,
}

impl PromptLimitArgs {
    /// The request limits with this prompt size.
    pub fn limits(&self) -> Limits {
        Limits {
            max_prompt_bytes: self.max_prompt_bytes,
            ..Limits::default()
        }
    }
}

/// Flags shared by the offline verbs (`reindex`, `eval`).
#[derive(Debug, Clone, Args)]
pub struct OfflineArgs {
    /// Traffic JSONL: {"account_id", "prompt", "timestamp_ms"} per line (`eval` also needs "label";
    /// `-`: standard input, read once as it comes: `reindex` then has no line count beforehand
    /// and no time-order check).
    #[arg(long, env = "PROMPT_RADAR_INPUT")]
    pub input: PathBuf,
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub engine: EngineArgs,
    #[command(flatten)]
    pub prompt_limit: PromptLimitArgs,
    /// Prompts per forward pass (their parts go with them). Large batches keep both cores busy:
    /// the pass is split into lanes that are balanced across threads, and a batch's last lane is
    /// a smaller share of it.
    #[arg(long, env = "PROMPT_RADAR_BATCH_SIZE", default_value_t = 256, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub batch_size: usize,
    /// Keep the vectors of every text in this file and reuse them on the next run over the same
    /// traffic, so a rerun after a detector change skips the model (created if missing; a cache
    /// of another model is refused). Timings with a warm cache are not embedding timings.
    #[arg(long, env = "PROMPT_RADAR_EMBED_CACHE")]
    pub embed_cache: Option<PathBuf>,
}

/// How to reach a running server. Global, so that a verb with subcommands takes them after its
/// subcommand too: `allow add --server URL …` as well as `allow --server URL add …`.
#[derive(Debug, Clone, Args)]
pub struct ServerArgs {
    /// The server: http://HOST:PORT, or HOST:PORT (plain-text gRPC; this build has no TLS).
    #[arg(
        long,
        global = true,
        env = "PROMPT_RADAR_SERVER",
        default_value = "http://127.0.0.1:50051"
    )]
    pub server: String,
    /// Bearer token, when the server requires one.
    #[arg(
        long,
        global = true,
        env = "PROMPT_RADAR_AUTH_TOKEN",
        hide_env_values = true
    )]
    pub auth_token: Option<String>,
    /// Seconds to wait for the server: to connect, and for each answer to begin. A server that
    /// takes connections but does not answer (wedged, paused) is then reported, not waited on for
    /// ever; a `check` stream's connection is pinged as often and dropped when a ping goes
    /// unanswered as long.
    #[arg(long, global = true, env = "PROMPT_RADAR_TIMEOUT", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub timeout: u64,
}

/// Default listen address.
pub fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 50051))
}

/// What a checkpoint says of the detector snapshot: its size, or why none was written.
pub fn snapshot_note(saved: &prompt_radar::engine::CheckpointStats) -> String {
    match &saved.detector_error {
        None => format!(
            "detector snapshot of {} prompts ({:.1} MB)",
            saved.detector_prompts,
            saved.detector_bytes as f64 / 1e6
        ),
        Some(e) => format!("detector snapshot NOT written ({e}): the next start replays the store"),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use clap::Parser;

    use super::EngineArgs;

    #[derive(Parser)]
    struct Flags {
        #[command(flatten)]
        engine: EngineArgs,
    }

    fn config(flags: &[&str]) -> anyhow::Result<prompt_radar::config::EngineConfig> {
        let args = std::iter::once("prompt-radar").chain(flags.iter().copied());
        Flags::try_parse_from(args)?.engine.to_config()
    }

    fn span(flags: &[&str]) -> anyhow::Result<Option<i64>> {
        Ok(config(flags)?.segments.segment_span_ms)
    }

    /// Each exclusive flag names a real flag of its verb (a wrong id would panic in clap), and
    /// a command line with it parses.
    #[test]
    fn exclusive_flags_name_real_flags() {
        for (path, flags) in super::EXCLUSIVE {
            for (_, long) in flags.iter() {
                let value = match *long {
                    "--flagged" => None,
                    "--min-score" => Some("0.5"),
                    "--text" | "--template" => Some("some words <*> here"),
                    _ => Some("7"),
                };
                let mut args: Vec<std::ffi::OsString> = vec!["prompt-radar".into()];
                args.extend(path.iter().map(Into::into));
                args.push(long.into());
                args.extend(value.map(Into::into));
                let cli = super::Cli::parse_from_args(args.clone());
                assert!(!format!("{cli:?}").is_empty(), "{args:?}");
            }
        }
    }

    /// Words that begin with `-` reach the flag they follow: a prompt searched for, an account
    /// id, a template; and a negative number reaches the flag's own check.
    #[test]
    fn values_that_begin_with_a_hyphen_reach_their_flag() {
        use super::client::AllowAction;
        use super::{Cli, Command};
        let parse = |words: &[&str]| {
            let args = std::iter::once("prompt-radar").chain(words.iter().copied());
            Cli::try_parse_from_args(args.map(Into::into).collect())
        };
        match parse(&[
            "search",
            "--text",
            "-v means verbose?",
            "--account",
            "-acct",
        ]) {
            Ok(Cli {
                command: Command::Search(s),
            }) => {
                assert_eq!(s.text.as_deref(), Some("-v means verbose?"));
                assert_eq!(s.account.as_deref(), Some("-acct"));
            }
            other => panic!("{other:?}"),
        }
        match parse(&["accounts", "--id", "-7"]) {
            Ok(Cli {
                command: Command::Accounts(a),
            }) => assert_eq!(a.id.as_deref(), Some("-7")),
            other => panic!("{other:?}"),
        }
        match parse(&["allow", "add", "--template", "- <*>", "--note", "-"]) {
            Ok(Cli {
                command: Command::Allow(a),
            }) => assert!(
                matches!(a.action, AllowAction::Add { template: Some(t), note, .. } if t == "- <*>" && note == "-")
            ),
            other => panic!("{other:?}"),
        }
        match parse(&["serve", "--retention-days", "-1"]) {
            Ok(Cli {
                command: Command::Serve(s),
            }) => {
                let e = s.engine.to_config().unwrap_err().to_string();
                assert!(e.contains("--retention-days must not be negative"), "{e}");
            }
            other => panic!("{other:?}"),
        }
        // A negative count is a wrong value of its flag, not an unknown flag.
        for (words, said) in [
            (
                &["search", "--text", "x", "-k", "-5"][..],
                "'-5' for '--k <K>': must be at least 1",
            ),
            (
                &["campaigns", "--top", "0"],
                "'0' for '--top <TOP>': must be at least 1",
            ),
            (
                &["reindex", "--input", "x", "--batch-size", "0"],
                "'0' for '--batch-size <BATCH_SIZE>': must be at least 1",
            ),
            (
                &["allow", "remove", "-3"],
                "'-3' for '<ID>': must not be negative",
            ),
            (
                &["stats", "--watch", "-1"],
                "'-1' for '--watch <WATCH>': must not be negative",
            ),
            (
                &["search", "--id", "7", "--timeout", "-2"],
                "must not be negative",
            ),
        ] {
            let e = parse(words).unwrap_err();
            assert_eq!(
                e.kind(),
                clap::error::ErrorKind::ValueValidation,
                "{words:?}: {e}"
            );
            assert!(e.to_string().contains(said), "{words:?}: {e}");
        }
        // Flags are still flags.
        let e = parse(&["search", "--id", "7", "-x"]).unwrap_err();
        assert_eq!(e.kind(), clap::error::ErrorKind::UnknownArgument);
        // A free-text flag followed by another flag forgot its value: said, not searched for.
        for words in [
            &["search", "--text", "--account", "x"][..],
            &["search", "--account", "--text", "x"],
            &["search", "--text", "-k", "5"],
            &["allow", "add", "--template", "--note", "x"],
        ] {
            let e = parse(words).unwrap_err().to_string();
            assert!(e.contains("needs a value, and '"), "{words:?}: {e}");
        }
        match parse(&["search", "--text=--account", "--account", "-v"]) {
            Ok(Cli {
                command: Command::Search(s),
            }) => assert_eq!(
                (s.text.as_deref(), s.account.as_deref()),
                (Some("--account"), Some("-v"))
            ),
            other => panic!("{other:?}"),
        }
    }

    /// reindex knows whether --start-line was given (a rerun of a stored file is refused only
    /// when it was not).
    #[test]
    fn reindex_knows_whether_its_start_line_was_given() {
        use super::{Cli, Command};
        let given = |more: &[&str]| {
            let args = [&["prompt-radar", "reindex", "--input", "x.jsonl"][..], more].concat();
            match Cli::try_parse_from_args(args.iter().map(Into::into).collect()) {
                Ok(Cli {
                    command: Command::Reindex(r),
                }) => (r.start_line, r.start_line_given),
                other => panic!("{other:?}"),
            }
        };
        assert_eq!(given(&[]), (1, false));
        assert_eq!(given(&["--start-line", "1"]), (1, true));
        assert_eq!(given(&["--start-line", "40"]), (40, true));
    }

    /// --max-prompt-bytes is one limit for the verbs that take prompts, and stays within what
    /// a gRPC message and a JSONL line can carry.
    #[test]
    fn the_prompt_limit_is_shared_and_bounded() {
        use super::{Cli, Command};
        let parse = |verb: &str, bytes: &str| {
            let args = [
                "prompt-radar",
                verb,
                "--input",
                "x",
                "--max-prompt-bytes",
                bytes,
            ];
            let args = if verb == "serve" {
                vec!["prompt-radar", verb, "--max-prompt-bytes", bytes]
            } else {
                args.to_vec()
            };
            Cli::try_parse_from_args(args.into_iter().map(Into::into).collect())
        };
        let most = super::Limits::MAX_PROMPT_BYTES;
        for verb in ["serve", "reindex", "eval"] {
            let limit = match parse(verb, &most.to_string()) {
                Ok(Cli {
                    command: Command::Serve(a),
                }) => a.prompt_limit.limits(),
                Ok(Cli {
                    command: Command::Reindex(a),
                }) => a.offline.prompt_limit.limits(),
                Ok(Cli {
                    command: Command::Eval(a),
                }) => a.offline.prompt_limit.limits(),
                other => panic!("{verb}: {other:?}"),
            };
            assert_eq!(limit.max_prompt_bytes, most, "{verb}");
            for bad in ["0".to_string(), (most + 1).to_string()] {
                let e = parse(verb, &bad).unwrap_err();
                assert_eq!(
                    e.kind(),
                    clap::error::ErrorKind::ValueValidation,
                    "{verb} {bad}"
                );
            }
        }
    }

    /// DESIGN's contract: every flag of every verb also reads `PROMPT_RADAR_<FLAG>`.
    #[test]
    fn every_flag_reads_its_environment_variable() {
        use clap::CommandFactory;
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in cmd.get_arguments() {
                let id = arg.get_id().as_str();
                if arg.is_positional() || ["help", "version"].contains(&id) {
                    continue;
                }
                let named = arg
                    .get_env()
                    .and_then(|e| e.to_str())
                    .is_some_and(|e| e.starts_with("PROMPT_RADAR_"));
                if !named {
                    missing.push(format!("{path} --{}", arg.get_long().unwrap_or(id)));
                }
            }
            for sub in cmd.get_subcommands() {
                walk(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        let mut missing = Vec::new();
        walk(&super::Cli::command(), "prompt-radar", &mut missing);
        assert!(
            missing.is_empty(),
            "flags without PROMPT_RADAR_*: {missing:?}"
        );
    }

    #[test]
    fn segments_seal_by_time_only_for_retention_or_when_asked() {
        assert_eq!(span(&[]).unwrap(), None, "by size alone");
        let day = 24 * 3_600_000;
        assert_eq!(span(&["--retention-days", "30"]).unwrap(), Some(day));
        assert_eq!(span(&["--segment-hours", "6"]).unwrap(), Some(day / 4));
        assert!(span(&["--segment-hours", "0"]).is_err());
    }

    #[test]
    fn offline_runs_build_segments_at_the_merged_size_unless_told() {
        let sizes = |flags: &[&str]| {
            let args = std::iter::once("prompt-radar").chain(flags.iter().copied());
            let engine = Flags::try_parse_from(args).unwrap().engine;
            let served = engine.to_config().unwrap().segments.max_points_per_segment;
            let offline = engine.to_offline_config().unwrap().segments;
            (
                served,
                offline.max_points_per_segment,
                offline.merge_max_points,
            )
        };
        assert_eq!(sizes(&[]), (200_000, 1_000_000, 1_000_000));
        let merge = ["--segment-merge-points", "300000"];
        assert_eq!(sizes(&merge), (200_000, 300_000, 300_000));
        // No merging: offline runs seal at the server's size.
        assert_eq!(
            sizes(&["--segment-merge-points", "0"]),
            (200_000, 200_000, 0)
        );
        let given = ["--segment-max-points", "5000"];
        assert_eq!(sizes(&given), (5_000, 5_000, 1_000_000));
    }

    /// The `allow` lines of README.md's "Using it", word for word: the server flag comes after
    /// the subcommand there.
    #[test]
    fn allow_takes_the_server_flags_before_or_after_its_subcommand() {
        use super::client::AllowAction;
        use super::{Cli, Command};
        let url = "http://10.0.0.7:50051";
        let parse = |line: &str| match Cli::try_parse_from(line.split_whitespace()) {
            Ok(Cli {
                command: Command::Allow(a),
            }) => (a.server.server, a.server.auth_token, a.action),
            other => panic!("{line}: {other:?}"),
        };
        let (server, _, action) = parse(&format!(
            "prompt-radar allow add --server {url} --template Rewrite:<*> --note app"
        ));
        assert_eq!(server, url);
        assert!(
            matches!(action, AllowAction::Add { template: Some(t), note, .. } if t == "Rewrite:<*>" && note == "app")
        );
        let (server, _, action) = parse(&format!(
            "prompt-radar allow add --server {url} --campaign 4711"
        ));
        assert_eq!(server, url);
        assert!(matches!(
            action,
            AllowAction::Add {
                campaign: Some(4711),
                ..
            }
        ));
        let (server, token, action) = parse(&format!(
            "prompt-radar allow remove 3 --server {url} --auth-token t0k"
        ));
        assert_eq!((server.as_str(), token.as_deref()), (url, Some("t0k")));
        assert!(matches!(action, AllowAction::Remove { id: 3 }));
        let (server, _, action) = parse(&format!("prompt-radar allow --server {url} list"));
        assert_eq!(server, url);
        assert!(matches!(action, AllowAction::List { .. }));
    }

    #[test]
    fn hnsw_settings_reach_the_index_and_are_checked() {
        let params = config(&[]).unwrap().segments.params;
        assert_eq!(params, super::HnswParams::default());
        let flags = [
            "--hnsw-m",
            "12",
            "--hnsw-ef-construction",
            "64",
            "--hnsw-ef-search",
            "32",
        ];
        let params = config(&flags).unwrap().segments.params;
        let want = (12, 64, 32);
        assert_eq!((params.m, params.ef_construction, params.ef_search), want);
        assert!(config(&["--hnsw-m", "1"]).is_err());
        assert!(config(&["--hnsw-m", "256"]).is_err());
        assert!(config(&["--hnsw-ef-search", "0"]).is_err());
    }

    /// A detector setting out of its range is refused by name, not quietly changed or kept as NaN.
    #[test]
    fn detector_settings_out_of_range_are_refused() {
        let refused = |flag: &str, value: &str| {
            let e = config(&[&format!("{flag}={value}")])
                .unwrap_err()
                .to_string();
            assert!(e.starts_with(flag), "{flag} {value}: {e}");
        };
        refused("--campaign-accounts", "1");
        refused("--campaign-prompts-per-account", "0.5");
        refused("--campaign-prompts-per-account", "NaN");
        refused("--min-cross-account-share", "1.5");
        refused("--min-cross-account-share", "NaN");
        refused("--similarity-threshold", "NaN");
        refused("--review-score", "-0.1");
        refused("--review-score", "NaN");
        refused("--block-score", "-1");
        refused("--block-score", "1.5");
        let d = config(&[
            "--campaign-accounts",
            "2",
            "--campaign-prompts-per-account",
            "1",
        ])
        .unwrap()
        .detector;
        assert_eq!(
            (d.campaign_accounts, d.campaign_prompts_per_account),
            (2, 1.0)
        );
    }
}
