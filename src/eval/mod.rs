//! Evaluation on labelled traffic: account-level [`metrics`] and the naive [`baselines`]
//! (exact hashing, MinHash-LSH) that the detector must beat on the same stream.
//!
//! Labelled traffic comes from `eval/make_traffic.py` (see `eval/README.md`): traffic JSONL whose
//! lines also carry `"label"` (`"organic"` or a campaign name). This module reads such a file,
//! replays it in order through a baseline and scores the outcome; running the real detector over
//! the same stream is the `eval` verb's business, not this module's.

pub mod baselines;
pub mod metrics;

use std::collections::HashMap;
use std::io::BufRead;

pub use baselines::{Baseline, ExactHashBaseline, MinHashLshBaseline};
pub use metrics::{AccountOutcome, CampaignMix, Metrics, campaign_mix, compute};

use crate::traffic::{self, LineError};

/// A labelled stream: prompts in file order and each account's label.
#[derive(Debug, Clone, Default)]
pub struct LabelledStream {
    /// `(account_id, prompt)` in file order (the generator writes files sorted by time).
    pub prompts: Vec<(String, String)>,
    /// Account → label; an account's first labelled line decides.
    pub labels: HashMap<String, String>,
}

/// Reads labelled traffic JSONL; stops at the first malformed line or line without a label.
pub fn read_labelled(reader: impl BufRead) -> Result<LabelledStream, LineError> {
    let mut stream = LabelledStream::default();
    for (line, parsed) in traffic::lines(reader) {
        let l = parsed?;
        let label = l.label.ok_or_else(|| LineError {
            line,
            reason: "missing field `label`".to_string(),
        })?;
        stream.labels.entry(l.account_id.clone()).or_insert(label);
        stream.prompts.push((l.account_id, l.prompt));
    }
    Ok(stream)
}

/// Feeds the stream through `baseline` in order and returns its account outcomes.
pub fn run_baseline<B: Baseline + ?Sized>(
    baseline: &mut B,
    stream: &LabelledStream,
) -> Vec<AccountOutcome> {
    for (account, prompt) in &stream.prompts {
        baseline.observe(account, prompt);
    }
    baseline.outcomes(&stream.labels)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_labels_and_rejects_unlabelled_lines() {
        let input = r#"{"account_id": "a", "prompt": "hi", "timestamp_ms": 1, "label": "organic", "kind": "popular"}
{"account_id": "b", "prompt": "x", "timestamp_ms": 2, "label": "camp-x"}
"#;
        let s = read_labelled(input.as_bytes()).expect("valid input");
        assert_eq!(s.prompts.len(), 2);
        assert_eq!(s.labels.get("b").map(String::as_str), Some("camp-x"));

        let bad = "{\"account_id\": \"a\", \"prompt\": \"hi\"}\n";
        let err = read_labelled(bad.as_bytes()).expect_err("no label");
        assert_eq!(err.line, 1);
    }

    #[test]
    fn runs_a_baseline_over_a_stream() {
        let mut s = LabelledStream::default();
        for i in 0..6 {
            let acc = format!("acct-{i}");
            s.prompts
                .push((acc.clone(), "What is the meaning of life?".to_string()));
            s.labels.insert(acc, "organic".to_string());
        }
        let out = run_baseline(&mut ExactHashBaseline::new(5), &s);
        let m = compute(&out);
        assert_eq!((m.accounts, m.fp), (6, 6));
    }

    /// Baseline numbers on the generated dev set:
    /// `cargo test --lib eval::tests::dev_seed1 -- --ignored --nocapture`.
    #[test]
    #[ignore = "needs eval/sets/dev-seed1.jsonl (eval/make_sets.sh)"]
    fn dev_seed1() {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("eval/sets/dev-seed1.jsonl");
        let Ok(file) = std::fs::File::open(&path) else {
            eprintln!("{} not found: run eval/make_sets.sh", path.display());
            return;
        };
        let stream = super::read_labelled(std::io::BufReader::new(file)).expect("valid dev set");
        let mut baselines: Vec<Box<dyn Baseline>> = vec![
            Box::new(ExactHashBaseline::new(baselines::DEFAULT_MIN_ACCOUNTS)),
            Box::new(MinHashLshBaseline::new(5)),
        ];
        for b in baselines.iter_mut() {
            let started = std::time::Instant::now();
            let out = super::run_baseline(b.as_mut(), &stream);
            let m = super::compute(&out);
            let title = format!(
                "{} on dev-seed1 ({:.1}s)",
                b.name(),
                started.elapsed().as_secs_f64()
            );
            println!("{}{}", m.report(&title), m.to_json());
        }
    }
}
