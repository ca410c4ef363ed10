//! Reading traffic JSONL (the input of `check`, `reindex` and `eval`): one object a line,
//! `{"account_id": "…", "prompt": "…", "timestamp_ms": 1718000000000}`, extra fields ignored,
//! `label` kept for `eval`. A bad line is reported with its 1-based line number; the caller
//! decides whether to skip it or stop.

use std::io::BufRead;

use serde::Deserialize;

use crate::index::SliceClock;

/// One parsed line.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct TrafficLine {
    /// Sending account (required).
    #[serde(deserialize_with = "account_id_text")]
    pub account_id: String,
    /// The prompt (required).
    #[serde(deserialize_with = "prompt_text")]
    pub prompt: String,
    /// Send time; absent, null or 0 means "now" to the server.
    #[serde(default, deserialize_with = "null_is_now")]
    pub timestamp_ms: i64,
    /// `"organic"` or a campaign name (evaluation only).
    #[serde(default, deserialize_with = "label_text")]
    pub label: Option<String>,
}

/// `label`: a string, or absent or null; anything else is refused naming the field.
fn label_text<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    match Option::<serde_json::Value>::deserialize(d)? {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(v) => text_field(v, "label")
            .map(Some)
            .map_err(serde::de::Error::custom),
    }
}

fn account_id_text<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    text_field(d, "account_id")
}

fn prompt_text<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    text_field(d, "prompt")
}

/// A string field; anything else is refused naming the field (serde alone would say
/// "invalid type: integer `12`, expected a string", and not of which field).
fn text_field<'de, D: serde::Deserializer<'de>>(d: D, field: &str) -> Result<String, D::Error> {
    match serde_json::Value::deserialize(d)? {
        serde_json::Value::String(s) => Ok(s),
        v => {
            let shown: String = v.to_string().chars().take(40).collect();
            let hint = match v {
                serde_json::Value::Number(_) => format!(" (write it as \"{shown}\")"),
                _ => String::new(),
            };
            Err(serde::de::Error::custom(format!(
                "`{field}` must be a string, not {shown}{hint}"
            )))
        }
    }
}

/// `"timestamp_ms": null` (how many exporters write a missing value) reads as absent: 0, "now".
/// Whole milliseconds written as a float (`1.75e12`, `1750000000000.0`: JavaScript, pandas) or
/// as a string (`"1750000000000"`: BigQuery's 64-bit integers) are taken as they are; anything
/// else is refused naming the field.
fn null_is_now<'de, D: serde::Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
    use serde_json::Value;
    let v = Option::<Value>::deserialize(d)?;
    let whole = |f: f64| (f.fract() == 0.0 && f.abs() < 9.0e18).then_some(f as i64);
    let ms = match &v {
        None | Some(Value::Null) => Some(0),
        Some(Value::Number(n)) => n.as_i64().or_else(|| n.as_f64().and_then(whole)),
        Some(Value::String(s)) => s.trim().parse::<i64>().ok(),
        Some(_) => None,
    };
    ms.ok_or_else(|| {
        let shown = v.map(|v| v.to_string()).unwrap_or_default();
        let shown: String = shown.chars().take(40).collect();
        serde::de::Error::custom(format!(
            "`timestamp_ms` must be whole milliseconds since the epoch, not {shown}"
        ))
    })
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

/// The longest line read: a prompt is at most 1 MiB (the largest `--max-prompt-bytes`,
/// [`crate::config::Limits::MAX_PROMPT_BYTES`]), and JSON's escapes can make it up to six times
/// longer. A longer line is reported and skipped without being held in memory.
pub const MAX_LINE_BYTES: usize = 8 << 20;
const _: () = assert!(6 * crate::config::Limits::MAX_PROMPT_BYTES + 4096 < MAX_LINE_BYTES);

/// Iterates the non-blank lines of a traffic file: `(line number, parsed or error)`.
///
/// A line that is not UTF-8, or longer than [`MAX_LINE_BYTES`], is an error of its own and the
/// next line is read as usual, so one damaged line of a large dump costs that line only. A read
/// error of the file itself is reported (with the number of the line it hit) and ends the
/// iteration: what follows cannot be read.
pub fn lines(
    reader: impl BufRead,
) -> impl Iterator<Item = (usize, Result<TrafficLine, LineError>)> {
    lines_from(reader, 1)
}

/// [`lines`] from line `first` on (1-based): the lines before it are read past unparsed (to go
/// on after a stopped run, `reindex --start-line`).
pub fn lines_from(
    reader: impl BufRead,
    first: usize,
) -> impl Iterator<Item = (usize, Result<TrafficLine, LineError>)> {
    let mut raw = RawLines::new(reader, first);
    std::iter::from_fn(move || {
        let (line, read) = raw.next()?;
        let error = |reason: String| Some((line, Err(LineError { line, reason })));
        match read {
            Err(e) => error(format!("unreadable: {e}")),
            Ok(Raw::TooLong(bytes)) => error(format!(
                "{bytes} bytes, longer than the {MAX_LINE_BYTES} a line may have"
            )),
            Ok(Raw::NotUtf8(at)) => error(format!("not valid UTF-8 (at byte {at} of the line)")),
            Ok(Raw::Text) => Some((line, parse(line, raw.text()))),
        }
    })
}

/// [`lines_from`] read on a thread of its own, named `name`: each line is handed to `hand`
/// until the input ends or `hand` returns `false` (its receiver is gone). A read that blocks (a
/// quiet pipe, `tail -f … |`) blocks that thread only, so the run can stop without waiting for
/// it; the thread is then left behind until its next line.
pub fn lines_on_a_thread(
    reader: impl BufRead + Send + 'static,
    first: usize,
    name: &str,
    mut hand: impl FnMut((usize, Result<TrafficLine, LineError>)) -> bool + Send + 'static,
) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            for item in lines_from(reader, first) {
                if !hand(item) {
                    break;
                }
            }
        })?;
    Ok(())
}

/// A non-blank line that [`RawLines`] read.
enum Raw {
    /// UTF-8 text of at most [`MAX_LINE_BYTES`], now in [`RawLines::text`].
    Text,
    /// Not UTF-8: the 1-based byte of the line where it breaks.
    NotUtf8(usize),
    /// A longer line (its length in bytes), read past and dropped.
    TooLong(usize),
}

/// The non-blank lines of a reader from line `first` on, each at most [`MAX_LINE_BYTES`] in
/// memory, without the line end. Blank means empty or whitespace once read as UTF-8; the one
/// rule for [`lines`] and [`count_lines`].
struct RawLines<R> {
    reader: R,
    /// The last [`Raw::Text`]; its allocation is reused for the next line.
    text: String,
    line: usize,
    first: usize,
    done: bool,
}

impl<R: BufRead> RawLines<R> {
    fn new(reader: R, first: usize) -> Self {
        RawLines {
            reader,
            text: String::new(),
            line: 0,
            first,
            done: false,
        }
    }

    /// The text of the last [`Raw::Text`] (a `\r` before its `\n` removed).
    fn text(&self) -> &str {
        &self.text
    }

    /// The next non-blank line from `first` on: its number and what was read; `None` at the end
    /// or after a read error (which is returned, whatever its line).
    fn next(&mut self) -> Option<(usize, std::io::Result<Raw>)> {
        loop {
            let (line, read) = self.read_line()?;
            match read {
                Ok(None) => {}
                Ok(Some(_)) if line < self.first => {}
                Ok(Some(raw)) => return Some((line, Ok(raw))),
                Err(e) => return Some((line, Err(e))),
            }
        }
    }

    /// The next line: its number and what was read, `None` for a blank one.
    fn read_line(&mut self) -> Option<(usize, std::io::Result<Option<Raw>>)> {
        if self.done {
            return None;
        }
        let mut buf = std::mem::take(&mut self.text).into_bytes();
        buf.clear();
        let mut bytes = 0usize;
        let mut too_long = false;
        loop {
            let available = match self.reader.fill_buf() {
                Ok(b) => b,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.done = true;
                    return Some((self.line + 1, Err(e)));
                }
            };
            if available.is_empty() {
                self.done = true;
                if bytes == 0 {
                    return None;
                }
                break;
            }
            let end = available.iter().position(|&b| b == b'\n');
            let chunk = &available[..end.unwrap_or(available.len())];
            bytes += chunk.len();
            if !too_long && buf.len() + chunk.len() > MAX_LINE_BYTES {
                too_long = true;
                buf = Vec::new();
            }
            if !too_long {
                buf.extend_from_slice(chunk);
            }
            let used = chunk.len() + usize::from(end.is_some());
            self.reader.consume(used);
            if end.is_some() {
                break;
            }
        }
        self.line += 1;
        if too_long {
            return Some((self.line, Ok(Some(Raw::TooLong(bytes)))));
        }
        if buf.last() == Some(&b'\r') {
            buf.pop();
        }
        // A byte-order mark before the first line (what some Windows tools write) is not part of
        // its JSON.
        if self.line == 1 && buf.starts_with(b"\xEF\xBB\xBF") {
            buf.drain(..3);
        }
        // UTF-16 (what PowerShell's `>` writes): every line would fail as not UTF-8 or as
        // malformed JSON; one error says why and ends the reading.
        let wide = match &buf[..] {
            [0xFF, 0xFE, 0, 0, ..] | [0, 0, 0xFE, 0xFF, ..] => Some("UTF-32"),
            [0xFF, 0xFE, ..] | [0xFE, 0xFF, ..] => Some("UTF-16"),
            _ => None,
        };
        if let (1, Some(code)) = (self.line, wide) {
            self.done = true;
            let e = std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "the file is {code} (it starts with a {code} byte-order mark); traffic files are UTF-8: convert it first (iconv -f {code} -t UTF-8)"
                ),
            );
            return Some((self.line, Err(e)));
        }
        let read = match String::from_utf8(buf) {
            Ok(text) => {
                let blank = text.trim().is_empty();
                self.text = text;
                (!blank).then_some(Raw::Text)
            }
            Err(e) => Some(Raw::NotUtf8(e.utf8_error().valid_up_to() + 1)),
        };
        Some((self.line, Ok(read)))
    }
}

/// Parses one line.
pub fn parse(line: usize, s: &str) -> Result<TrafficLine, LineError> {
    // serde would read an array as the fields in order, and call a string "struct TrafficLine".
    let first = s.trim_start().chars().next();
    if first != Some('{') && serde_json::from_str::<serde_json::Value>(s).is_ok() {
        return Err(LineError {
            line,
            reason: r#"not a JSON object (a traffic line is {"account_id": "…", "prompt": "…", "timestamp_ms": …})"#.into(),
        });
    }
    serde_json::from_str::<TrafficLine>(s).map_err(|e| {
        // serde names the missing field ("missing field `account_id`"): keep that wording. Its
        // "at line 1 column C" is within this one line, beside the file's line number: say
        // "column C" alone.
        let msg = e.to_string();
        let within = format!(" at line {} column {}", e.line(), e.column());
        let reason = match msg.strip_suffix(&within) {
            Some(what) if e.column() > 0 => format!("{what} (column {})", e.column()),
            _ => msg,
        };
        // Valid JSON with a wrong or missing field is not "malformed".
        let reason = match e.classify() {
            serde_json::error::Category::Data => reason,
            _ => format!("malformed JSON object: {reason}"),
        };
        LineError { line, reason }
    })
}

/// The file an `--input` names: `-` is standard input.
pub fn input_path(path: &std::path::Path) -> std::path::PathBuf {
    match path.as_os_str() == "-" {
        true => "/dev/stdin".into(),
        false => path.to_path_buf(),
    }
}

/// Whether `path` can be read twice: a regular file. A pipe (`--input /dev/stdin`, `<(zcat …)`,
/// a FIFO) can be read once only, so a verb reads it without counting its lines first (a count
/// would drain it and leave nothing to read).
/// A directory (or a path that cannot be read) is an error.
pub fn rereadable(path: &std::path::Path) -> std::io::Result<bool> {
    let meta = std::fs::metadata(path)?;
    if meta.is_dir() {
        return Err(std::io::Error::other("is a directory, not a traffic file"));
    }
    Ok(meta.is_file())
}

/// Whether `a` and `b` are one existing file (device and inode), whatever their paths say.
pub fn same_file(a: &std::path::Path, b: &std::path::Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => (a.dev(), a.ino()) == (b.dev(), b.ino()),
        _ => false,
    }
}

/// Refuses an output path that is the input file (the same file by device and inode, whatever
/// the path says): creating the output would empty the input before it is read, or overwrite it
/// after. `flag` names the output's flag in the error.
pub fn refuse_input_as_output(
    input: &std::path::Path,
    output: &std::path::Path,
    flag: &str,
) -> anyhow::Result<()> {
    let regular = std::fs::metadata(input).is_ok_and(|m| m.is_file());
    if regular && same_file(input, output) {
        anyhow::bail!(
            "{flag} {} is the input file: writing it would destroy the input; give another path",
            output.display()
        );
    }
    Ok(())
}

/// Counts the non-blank lines from line `first` on (for progress bars); lines that are not UTF-8
/// or too long count too, as [`lines`] reports each of them.
pub fn count_lines(path: &std::path::Path, first: usize) -> std::io::Result<u64> {
    scan(path, first, |_, _| {})
}

/// Reads `path` from line `first` on, handing the number and text of each non-blank line that is
/// text to `each`; returns what [`count_lines`] counts.
fn scan(
    path: &std::path::Path,
    first: usize,
    mut each: impl FnMut(usize, &str),
) -> std::io::Result<u64> {
    let mut raw = RawLines::new(std::io::BufReader::new(std::fs::File::open(path)?), first);
    let mut n = 0;
    while let Some((line, read)) = raw.next() {
        if matches!(read?, Raw::Text) {
            each(line, raw.text());
        }
        n += 1;
    }
    Ok(n)
}

/// How far a traffic file is from time order, as index segments sliced by time see it.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TimeOrder {
    /// Lines read, as [`count_lines`] counts them (a run that needs both reads the file once).
    pub lines: u64,
    /// Lines whose time was read (0, null or absent: the time of the scan, as ingest takes
    /// them "now"); unreadable lines are left out.
    pub timed: u64,
    /// Segments that would seal for their time, ingesting in batches of the run's size
    /// (counted in timed lines) as `reindex` does.
    pub seals: u64,
    /// Lines that would go into a segment whose newest prompt is more than twice the span newer:
    /// retention keeps them that much past their time. (In time order a segment spans a little
    /// more than the span: it seals after the batch that took it past.)
    pub late: u64,
    /// Of `late`, the lines that came in time order (none in an earlier batch of the file, nor
    /// in the index, more than the span newer; a batch is ingested whole, so the order within
    /// it does not count): a batch spanning more than the span took them into a segment with
    /// newer ones. Sparse traffic in large batches, or a shuffle within batches, not disorder
    /// that sorting the file would mend.
    pub late_in_order: u64,
    /// The most time the lines of one batch span (ms), in time order or not.
    pub widest_batch_ms: i64,
    /// The first line more than the span older than the newest of the file's earlier batches,
    /// and by how much (ms).
    pub first_late: Option<(usize, i64)>,
    /// Newest time minus oldest, in ms.
    pub covered_ms: i64,
}

impl TimeOrder {
    /// Whether slicing by time would seal more than twice the segments that slices of the times
    /// covered make in time order (a few steps back, shards one after the other, are fine).
    pub fn too_disordered(&self, span_ms: i64) -> bool {
        let slices = (self.covered_ms / span_ms.max(1)).max(1) as u64;
        self.seals > 2 * slices
    }

    /// Whether more than 1% of the timed lines would be late for being out of time order: kept
    /// well past their retention.
    pub fn many_late(&self) -> bool {
        (self.late - self.late_in_order) * 100 > self.timed
    }

    /// Whether more than 1% of the timed lines would be late though they came in time order,
    /// and batches span more than a segment's `span_ms` (see [`Self::late_in_order`]).
    pub fn many_late_in_order(&self, span_ms: i64) -> bool {
        self.late_in_order * 100 > self.timed && self.widest_batch_ms > span_ms
    }
}

/// The segment being filled, as [`time_order`] follows it.
#[derive(Debug)]
struct Filling {
    /// Times of the lines in it, and whether each came behind a newer line of an earlier batch
    /// or of the index (by over the span).
    times: Vec<(i64, bool)>,
    /// Vectors it held before (the data directory's active segment), and their newest time.
    before: (usize, Option<i64>),
}

impl Filling {
    /// Counts the lines more than twice `span` older than the segment's newest, and those of
    /// them that came in time order; empties it.
    fn seal(&mut self, span: i64) -> (u64, u64) {
        let newest = self.times.iter().map(|&(t, _)| t).max().max(self.before.1);
        let (mut late, mut in_order) = (0, 0);
        if let Some(n) = newest {
            let cutoff = n.saturating_sub(span.saturating_mul(2));
            for &(t, behind) in &self.times {
                if t < cutoff {
                    late += 1;
                    in_order += u64::from(!behind);
                }
            }
        }
        self.times.clear();
        self.before = (0, None);
        (late, in_order)
    }
}

/// Reads the times of `path` from line `first` on and follows what ingesting it in batches of
/// `batch` lines would do to the index's segments (see [`TimeOrder`]): `clock` is the index's
/// (as [`crate::engine::slice_clock_on_disk`] reads it), whose active segment holds `before`
/// vectors and seals at `max_points`.
pub fn time_order(
    path: &std::path::Path,
    first: usize,
    batch: usize,
    (mut clock, before, max_points): (SliceClock, usize, usize),
) -> std::io::Result<TimeOrder> {
    #[derive(Deserialize)]
    struct Timed {
        #[serde(default, deserialize_with = "null_is_now")]
        timestamp_ms: i64,
    }
    let now = crate::server::validate::now_ms();
    let span = clock.span_ms();
    let mut order = TimeOrder::default();
    let (mut newest, mut oldest) = (i64::MIN, i64::MAX);
    let batch = batch.max(1) as u64;
    let mut filling = Filling {
        times: Vec::new(),
        before: (before, clock.newest()),
    };
    // The newest time in the index, and in the file before the batch being read; the oldest
    // and newest of that batch. Ingest takes a batch whole, so a line is behind only a line of
    // an earlier batch (or of the index).
    let index_ahead = clock.newest().or(clock.start()).unwrap_or(i64::MIN);
    let mut file_ahead = i64::MIN;
    let mut in_batch = (i64::MAX, i64::MIN);
    let seal = |filling: &mut Filling, order: &mut TimeOrder| {
        let (late, in_order) = filling.seal(span);
        order.late += late;
        order.late_in_order += in_order;
    };
    order.lines = scan(path, first, |line, text| {
        let Ok(Timed { timestamp_ms: t }) = serde_json::from_str::<Timed>(text) else {
            return;
        };
        let t = match t {
            0 => now,
            t if t < 0 => return, // refused at ingest
            t => t,
        };
        if order.first_late.is_none()
            && file_ahead != i64::MIN
            && t < file_ahead.saturating_sub(span)
        {
            order.first_late = Some((line, file_ahead - t));
        }
        newest = newest.max(t);
        oldest = oldest.min(t);
        clock.note(t);
        let ahead = index_ahead.max(file_ahead);
        filling.times.push((t, t < ahead.saturating_sub(span)));
        in_batch = (in_batch.0.min(t), in_batch.1.max(t));
        order.timed += 1;
        // A segment seals after the batch that made it due, or full.
        if order.timed % batch == 0 {
            order.widest_batch_ms = order.widest_batch_ms.max(in_batch.1 - in_batch.0);
            in_batch = (i64::MAX, i64::MIN);
            file_ahead = newest;
            let due = clock.due();
            if due || filling.times.len() + filling.before.0 >= max_points {
                order.seals += u64::from(due);
                seal(&mut filling, &mut order);
                clock.sealed();
            }
        }
    })?;
    if in_batch.1 >= in_batch.0 {
        order.widest_batch_ms = order.widest_batch_ms.max(in_batch.1 - in_batch.0);
    }
    seal(&mut filling, &mut order);
    order.covered_ms = if order.timed > 0 { newest - oldest } else { 0 };
    Ok(order)
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

    #[test]
    fn time_order_counts_the_seals_of_time_slices_and_tells_disorder() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.jsonl");
        const DAY: i64 = 86_400_000;
        let t0 = 1_750_000_000_000;
        let write = |times: &[i64]| {
            let text: Vec<String> = times
                .iter()
                .map(|t| format!(r#"{{"account_id": "a", "prompt": "p", "timestamp_ms": {t}}}"#))
                .collect();
            std::fs::write(&path, text.join("\n")).unwrap();
        };
        // A fresh index's clock. Four late lines in a row mean the traffic went back (segments
        // of 256 vectors), or 3,125 (the default 200,000).
        let index = |max_points: usize| {
            let config = crate::index::SegmentsConfig {
                segment_span_ms: Some(DAY),
                max_points_per_segment: max_points,
                ..Default::default()
            };
            (
                SliceClock::for_config(&config, None).unwrap(),
                0,
                max_points,
            )
        };
        let (short_run, long_run) = (index(256), index(200_000));
        // In order, ten lines a day for 30 days, batches of 4: a seal a day or so.
        let in_order: Vec<i64> = (0..300).map(|i| t0 + i * DAY / 10).collect();
        write(&in_order);
        let o = time_order(&path, 1, 4, short_run).unwrap();
        assert_eq!((o.lines, o.timed, o.late), (300, 300, 0));
        assert_eq!(o.first_late, None);
        assert!((20..=30).contains(&o.seals), "{o:?}");
        assert!(!o.too_disordered(DAY) && !o.many_late());
        assert_eq!(o.widest_batch_ms, 3 * DAY / 10);
        // The same in batches of 40 lines, four days each: segments hold lines over two days
        // apart, though the file is in time order; they are told apart from disorder.
        let o = time_order(&path, 1, 40, short_run).unwrap();
        assert_eq!(o.widest_batch_ms, 39 * DAY / 10);
        assert!(o.late > 100 && o.late_in_order == o.late, "{o:?}");
        assert!(!o.many_late() && o.many_late_in_order(DAY), "{o:?}");
        assert_eq!(o.first_late, None);
        // The same batches, each newest first: a batch is ingested whole, so this is the same
        // run, and sorting the file would not change it.
        let shuffled: Vec<i64> = in_order
            .chunks(40)
            .flat_map(|c| c.iter().rev().copied())
            .collect();
        write(&shuffled);
        assert_eq!(time_order(&path, 1, 40, short_run).unwrap(), o);
        // Two shards one after the other: the second goes back and is sliced on its own; only
        // the run that told it went back is late.
        let shards: Vec<i64> = in_order.iter().chain(&in_order).copied().collect();
        write(&shards);
        let o = time_order(&path, 1, 4, short_run).unwrap();
        assert_eq!(o.first_late, Some((301, in_order[299] - t0)));
        assert!((40..=60).contains(&o.seals), "{o:?}");
        assert!(o.late <= 4, "{o:?}");
        assert!(!o.too_disordered(DAY) && !o.many_late(), "{o:?}");
        // Sorted by account: 10 accounts, each a line a day over the same 30 days.
        let by_account: Vec<i64> = (0..10)
            .flat_map(|_| (0..30).map(|d| t0 + d * DAY))
            .collect();
        write(&by_account);
        // Each account goes back in a run long enough to tell, and seals its own slices.
        let o = time_order(&path, 1, 4, short_run).unwrap();
        assert!(o.too_disordered(DAY), "{o:?}");
        // Runs too short to tell: the later accounts go into the first one's last slice, late.
        let o = time_order(&path, 1, 4, long_run).unwrap();
        assert!(o.seals <= 10 && !o.too_disordered(DAY), "{o:?}");
        assert!(o.late > 200 && o.many_late(), "{o:?}");
        // From line 31 on (--start-line): the first account's lines are not read.
        assert_eq!(time_order(&path, 31, 4, long_run).unwrap().timed, 270);
        // Newest first, in segments of 8 lines (0.8 days): sealed by size, nothing is late.
        let reversed: Vec<i64> = in_order.iter().rev().copied().collect();
        write(&reversed);
        let (clock, ..) = long_run;
        let o = time_order(&path, 1, 4, (clock, 0, 8)).unwrap();
        assert_eq!((o.late, o.seals), (0, 0), "{o:?}");
        assert!(o.first_late.is_some());
    }

    #[test]
    fn time_order_takes_untimed_lines_as_now_and_starts_from_the_index_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.jsonl");
        const DAY: i64 = 86_400_000;
        let now = crate::server::validate::now_ms();
        let config = crate::index::SegmentsConfig {
            segment_span_ms: Some(DAY),
            ..Default::default()
        };
        let fresh = SliceClock::for_config(&config, None).unwrap();
        // Six days of the past in order, but the first line without a time: ingest takes it as
        // now, and the slice it starts leaves every other line late.
        let mut lines: Vec<String> = (0..600)
            .map(|i| {
                let t = now - 6 * DAY + i * DAY / 100;
                format!(r#"{{"account_id": "a", "prompt": "p", "timestamp_ms": {t}}}"#)
            })
            .collect();
        std::fs::write(&path, lines.join("\n")).unwrap();
        let o = time_order(&path, 1, 16, (fresh, 0, 200_000)).unwrap();
        assert!(!o.many_late(), "{o:?}");
        lines[0] = r#"{"account_id": "a", "prompt": "p"}"#.into();
        std::fs::write(&path, lines.join("\n")).unwrap();
        let o = time_order(&path, 1, 16, (fresh, 0, 200_000)).unwrap();
        assert_eq!(o.timed, 600);
        assert!(o.late > 350 && o.many_late(), "{o:?}");
        // Put in order again, into an index whose slice started now (a backfill): all late.
        lines[0] = lines[1].clone();
        std::fs::write(&path, lines.join("\n")).unwrap();
        let on_disk = SliceClock::for_config(&config, Some(now)).unwrap();
        let o = time_order(&path, 1, 16, (on_disk, 1_000, 200_000)).unwrap();
        assert!(o.late > 350 && o.many_late(), "{o:?}");
        assert_eq!((o.first_late, o.late_in_order), (None, 0), "{o:?}");
    }

    #[test]
    fn a_field_of_the_wrong_type_is_named() {
        let reason = |s: &str| parse(7, s).unwrap_err().reason;
        let r = reason(r#"{"account_id": 12, "prompt": "hi"}"#);
        assert!(
            r.starts_with(r#"`account_id` must be a string, not 12 (write it as "12")"#),
            "{r}"
        );
        let r = reason(r#"{"account_id": "a", "prompt": null}"#);
        assert!(r.starts_with("`prompt` must be a string, not null"), "{r}");
        let r = reason(r#"{"account_id": "a", "prompt": ["x"]}"#);
        assert!(
            r.starts_with(r#"`prompt` must be a string, not ["x"]"#),
            "{r}"
        );
        let r = reason(r#"{"account_id": "a", "prompt": "hi", "label": 5}"#);
        assert!(
            r.starts_with(r#"`label` must be a string, not 5 (write it as "5")"#),
            "{r}"
        );
        let null = parse(1, r#"{"account_id": "a", "prompt": "hi", "label": null}"#).unwrap();
        assert_eq!(null.label, None);
        // Escapes are read as JSON strings are.
        let ok = parse(1, r#"{"account_id": "a\u00e9", "prompt": "line\nbreak"}"#).unwrap();
        assert_eq!(
            (ok.account_id.as_str(), ok.prompt.as_str()),
            ("aé", "line\nbreak")
        );
    }

    #[test]
    fn a_byte_order_mark_before_the_first_line_is_skipped_and_nowhere_else() {
        let input = "\u{feff}{\"account_id\": \"a\", \"prompt\": \"hi\"}\n\u{feff}{\"account_id\": \"b\", \"prompt\": \"x\"}\n";
        let got: Vec<_> = lines(input.as_bytes()).collect();
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].1.as_ref().unwrap().account_id, "a");
        // Inside the file it is a stray character: that line is malformed, as before.
        let e = got[1].1.as_ref().unwrap_err();
        assert_eq!(e.line, 2);
        assert!(e.reason.contains("malformed JSON"), "{}", e.reason);
    }

    #[test]
    fn a_utf16_file_is_one_error_that_says_so() {
        let text = "{\"account_id\": \"a\", \"prompt\": \"hi\"}\n{\"account_id\": \"b\", \"prompt\": \"x\"}\n";
        for bom in [[0xFF, 0xFE], [0xFE, 0xFF]] {
            let mut bytes = bom.to_vec();
            for unit in text.encode_utf16() {
                let b = match bom[0] {
                    0xFF => unit.to_le_bytes(),
                    _ => unit.to_be_bytes(),
                };
                bytes.extend_from_slice(&b);
            }
            let got: Vec<_> = lines(&bytes[..]).collect();
            assert_eq!(got.len(), 1, "one error, not one a line");
            let e = got[0].1.as_ref().unwrap_err();
            assert!(
                e.reason.contains("the file is UTF-16") && e.reason.contains("iconv -f UTF-16"),
                "{}",
                e.reason
            );
        }
        // UTF-32 is named as such (its little-endian mark begins as UTF-16's does).
        let mut bytes = vec![0xFF, 0xFE, 0, 0];
        for c in text.chars() {
            bytes.extend_from_slice(&(c as u32).to_le_bytes());
        }
        let got: Vec<_> = lines(&bytes[..]).collect();
        let e = got[0].1.as_ref().unwrap_err();
        assert!(e.reason.contains("the file is UTF-32"), "{}", e.reason);
    }

    #[test]
    fn a_directory_is_no_input_and_a_pipe_is_read_once() {
        let dir = tempfile::tempdir().unwrap();
        let e = rereadable(dir.path()).unwrap_err();
        assert!(e.to_string().contains("is a directory"), "{e}");
        let file = dir.path().join("t.jsonl");
        std::fs::write(&file, "{}\n").unwrap();
        assert!(rereadable(&file).unwrap());
        assert!(rereadable(std::path::Path::new("/nonexistent/t.jsonl")).is_err());
        assert_eq!(
            input_path(std::path::Path::new("-")),
            std::path::Path::new("/dev/stdin")
        );
    }

    #[test]
    fn a_null_time_is_now_and_a_bad_one_is_named_by_its_column() {
        let now = parse(
            1,
            r#"{"account_id": "a", "prompt": "p", "timestamp_ms": null}"#,
        );
        assert_eq!(now.unwrap().timestamp_ms, 0);
        let e = parse(
            7,
            r#"{"account_id": "a", "prompt": "p", "timestamp_ms": "soon"}"#,
        )
        .unwrap_err();
        assert_eq!(e.line, 7);
        assert_eq!(
            e.reason,
            "`timestamp_ms` must be whole milliseconds since the epoch, not \"soon\" (column 58)",
            "the field named, no serde \"line 1\" beside the file's line number"
        );
        for bad in ["1750000000000.7", "[1]", "true", "1e300"] {
            let text = format!(r#"{{"account_id": "a", "prompt": "p", "timestamp_ms": {bad}}}"#);
            let e = parse(1, &text).unwrap_err();
            assert!(
                e.reason.starts_with("`timestamp_ms` must be"),
                "{bad}: {}",
                e.reason
            );
        }
        // Whole milliseconds as exporters write them: a float, a string.
        for ok in ["1.75e12", "1750000000000.0", "\"1750000000000\""] {
            let text = format!(r#"{{"account_id": "a", "prompt": "p", "timestamp_ms": {ok}}}"#);
            assert_eq!(
                parse(1, &text).unwrap().timestamp_ms,
                1_750_000_000_000,
                "{ok}"
            );
        }
        let e = parse(2, r#"{"prompt": "p"}"#).unwrap_err();
        assert_eq!(e.reason, "missing field `account_id` (column 15)");
        let e = parse(2, r#"{"account_id": "a", "prompt": "p""#).unwrap_err();
        assert!(
            e.reason.starts_with("malformed JSON object: "),
            "{}",
            e.reason
        );
    }

    #[test]
    fn a_line_that_is_valid_json_but_not_an_object_is_refused_as_such() {
        for text in [
            r#"["acct", "an array read as the fields in order", 1750000000000]"#,
            r#""a string""#,
            "42",
            "null",
        ] {
            let e = parse(4, text).unwrap_err();
            assert!(
                e.reason.starts_with("not a JSON object"),
                "{text}: {}",
                e.reason
            );
        }
    }

    fn line(account: &str, prompt: &str) -> String {
        serde_json::json!({"account_id": account, "prompt": prompt}).to_string()
    }

    #[test]
    fn a_line_that_is_not_utf8_or_too_long_costs_that_line_only() {
        let mut input = Vec::new();
        input.extend_from_slice(line("a", "first").as_bytes());
        input.extend_from_slice(b"\r\n{\"account_id\": \"b\", \"prompt\": \"bad \xff\xfe\"}\n\n");
        let long = line("c", &"x".repeat(MAX_LINE_BYTES));
        input.extend_from_slice(long.as_bytes());
        input.extend_from_slice("\n \u{a0} \n".as_bytes());
        input.extend_from_slice(line("d", "last, no line end").as_bytes());
        let got: Vec<_> = lines(&input[..]).collect();
        let numbers: Vec<usize> = got.iter().map(|g| g.0).collect();
        assert_eq!(
            numbers,
            [1, 2, 4, 6],
            "blank lines 3 and 5 are skipped, not renumbered"
        );
        assert_eq!(
            got[0].1.as_ref().unwrap().prompt,
            "first",
            "CRLF is a line end"
        );
        let reason = |i: usize| got[i].1.as_ref().unwrap_err().reason.clone();
        assert_eq!(reason(1), "not valid UTF-8 (at byte 36 of the line)");
        let skipped = format!(
            "{} bytes, longer than the {MAX_LINE_BYTES} a line may have",
            long.len()
        );
        assert_eq!(reason(2), skipped);
        assert_eq!(got[3].1.as_ref().unwrap().account_id, "d");

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.jsonl");
        std::fs::write(&path, &input).unwrap();
        assert_eq!(count_lines(&path, 1).unwrap(), 4, "what `lines` reports");
        assert_eq!(count_lines(&path, 4).unwrap(), 2);
        let from: Vec<usize> = lines_from(&input[..], 4).map(|g| g.0).collect();
        assert_eq!(
            from,
            [4, 6],
            "line 2 (not UTF-8) is before the start: read past, not reported"
        );
    }

    /// A reader that gives `data` and then fails, as a failing disk would.
    struct Failing<'a>(&'a [u8]);

    impl std::io::Read for Failing<'_> {
        fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
            if self.0.is_empty() {
                return Err(std::io::Error::other("device error"));
            }
            let n = out.len().min(self.0.len());
            out[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }

    #[test]
    fn a_read_error_is_reported_once_and_ends_the_lines() {
        let data = format!("{}\n{}\n", line("a", "one"), line("b", "two"));
        let got: Vec<_> = lines(std::io::BufReader::new(Failing(data.as_bytes()))).collect();
        assert_eq!(
            got.len(),
            3,
            "two lines, then the error, then nothing: {got:?}"
        );
        let e = got[2].1.as_ref().unwrap_err();
        assert_eq!((e.line, e.reason.as_str()), (3, "unreadable: device error"));
    }
}
