//! Reading traffic JSONL (the input of `check`, `reindex` and `eval`): one object a line,
//! `{"account_id": "…", "prompt": "…", "timestamp_ms": 1718000000000}`, extra fields ignored,
//! `label` kept for `eval`. A bad line is reported with its 1-based line number; the caller
//! decides whether to skip it or stop.

use std::io::BufRead;

use serde::Deserialize;

/// One parsed line.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct TrafficLine {
    /// Sending account (required).
    pub account_id: String,
    /// The prompt (required).
    pub prompt: String,
    /// Send time; absent or 0 means "now" to the server.
    #[serde(default)]
    pub timestamp_ms: i64,
    /// `"organic"` or a campaign name (evaluation only).
    #[serde(default)]
    pub label: Option<String>,
}

/// A line that could not be used.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("line {line}: {reason}")]
pub struct LineError {
    /// 1-based line number.
    pub line: usize,
    /// What is wrong.
    pub reason: String,
}

/// Iterates the non-blank lines of a traffic file: `(line number, parsed or error)`.
pub fn lines(
    reader: impl BufRead,
) -> impl Iterator<Item = (usize, Result<TrafficLine, LineError>)> {
    reader.lines().enumerate().filter_map(|(i, l)| {
        let line = i + 1;
        match l {
            Err(e) => Some((
                line,
                Err(LineError {
                    line,
                    reason: format!("unreadable: {e}"),
                }),
            )),
            Ok(s) if s.trim().is_empty() => None,
            Ok(s) => Some((line, parse(line, &s))),
        }
    })
}

/// Parses one line.
pub fn parse(line: usize, s: &str) -> Result<TrafficLine, LineError> {
    serde_json::from_str::<TrafficLine>(s).map_err(|e| {
        let msg = e.to_string();
        // serde names the missing field ("missing field `account_id`"): keep that wording.
        LineError {
            line,
            reason: format!("malformed JSON object: {msg}"),
        }
    })
}

/// Counts non-blank lines (for progress bars).
pub fn count_lines(path: &std::path::Path) -> std::io::Result<u64> {
    let f = std::io::BufReader::new(std::fs::File::open(path)?);
    let mut n = 0;
    for l in f.lines() {
        if !l?.trim().is_empty() {
            n += 1;
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_good_lines_and_reports_bad_ones_by_number() {
        let input = r#"{"account_id": "a", "prompt": "hi", "timestamp_ms": 5, "extra": 1}

not json
{"prompt": "no account"}
{"account_id": "b", "prompt": "x", "label": "organic"}
"#;
        let got: Vec<_> = lines(input.as_bytes()).collect();
        assert_eq!(got.len(), 4);
        assert_eq!(got[0].1.as_ref().unwrap().timestamp_ms, 5);
        assert_eq!(got[1].0, 3);
        assert_eq!(got[1].1.as_ref().unwrap_err().line, 3);
        let e = got[2].1.as_ref().unwrap_err();
        assert_eq!(e.line, 4);
        assert!(e.reason.contains("account_id"), "{}", e.reason);
        assert_eq!(got[3].1.as_ref().unwrap().label.as_deref(), Some("organic"));
    }
}
