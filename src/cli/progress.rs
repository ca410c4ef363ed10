//! Progress of long runs (`reindex`, `eval`, `check`): a bar on a terminal, and elsewhere (a batch
//! job's log, a pipe, `nohup`) a plain line every [`PLAIN_EVERY`], where indicatif draws nothing.

use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

/// How often a plain progress line is printed when standard error is not a terminal.
pub const PLAIN_EVERY: Duration = Duration::from_secs(10);

/// A progress bar, or plain lines where no bar can be drawn.
pub struct Progress {
    bar: ProgressBar,
    plain: Option<Plain>,
}

struct Plain {
    verb: String,
    every: Duration,
    last: Instant,
}

impl Progress {
    /// Progress over `total` items labelled `verb`, drawn on standard error. Without a total
    /// (input read from a pipe, not counted beforehand): a count and a rate, no share or ETA.
    pub fn new(verb: &str, total: Option<u64>) -> Self {
        let bar = total.map_or_else(ProgressBar::no_length, ProgressBar::new);
        Self::with_bar(verb, bar, PLAIN_EVERY)
    }

    /// Progress through `bar`, with plain lines every `every` when it is hidden.
    pub fn with_bar(verb: &str, bar: ProgressBar, every: Duration) -> Self {
        let template = match bar.length() {
            Some(_) => {
                format!("{{spinner}} {verb} [{{bar:30}}] {{pos}}/{{len}} {{per_sec}} eta {{eta}}")
            }
            None => format!("{{spinner}} {verb} {{pos}} {{per_sec}}"),
        };
        let style = ProgressStyle::with_template(&template)
            .unwrap_or_else(|_| ProgressStyle::default_bar());
        let plain = bar.is_hidden().then(|| Plain {
            verb: verb.to_string(),
            every,
            last: Instant::now(),
        });
        Self {
            bar: bar.with_style(style),
            plain,
        }
    }

    /// Counts `n` more items done.
    pub fn inc(&mut self, n: u64) {
        if let Some(line) = self.inc_line(n) {
            eprintln!("{line}");
        }
    }

    /// Counts `n` more items done; returns the plain line due, if any. The line counts what was
    /// done *before* these: items arrive a batch at a time, and the first item of a batch that
    /// ends after a long wait (the first one, at start) would otherwise make the count, rate and
    /// ETA look like one item in all that time (an ETA of hours for a run of seconds).
    fn inc_line(&mut self, n: u64) -> Option<String> {
        let line = self.plain_line();
        self.bar.inc(n);
        line
    }

    /// The plain line due now, if any.
    fn plain_line(&mut self) -> Option<String> {
        let p = self.plain.as_mut()?;
        if p.last.elapsed() < p.every {
            return None;
        }
        p.last = Instant::now();
        let pos = self.bar.position();
        let secs = self.bar.elapsed().as_secs_f64().max(1e-9);
        let rate = pos as f64 / secs;
        let Some(total) = self.bar.length() else {
            return Some(format!("{}: {pos} in {secs:.0}s, {rate:.0}/s", p.verb));
        };
        let share = 100.0 * pos as f64 / total.max(1) as f64;
        let eta = if rate > 0.0 {
            format!("{:.0}s", total.saturating_sub(pos) as f64 / rate)
        } else {
            "?".into()
        };
        Some(format!(
            "{}: {pos}/{total} ({share:.0}%) in {secs:.0}s, {rate:.0}/s, eta {eta}",
            p.verb
        ))
    }

    /// Prints through `f` without garbling the bar.
    pub fn suspend<R>(&self, f: impl FnOnce() -> R) -> R {
        self.bar.suspend(f)
    }

    /// The bar, for another thread to print through (`ProgressBar::suspend`).
    pub fn bar(&self) -> ProgressBar {
        self.bar.clone()
    }

    /// Removes the bar (the caller prints its summary line next).
    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use indicatif::ProgressDrawTarget;

    #[test]
    fn without_a_terminal_a_plain_line_reports_count_rate_and_eta() {
        let bar = ProgressBar::with_draw_target(Some(1_000), ProgressDrawTarget::hidden());
        let mut p = Progress::with_bar("reindex", bar, Duration::ZERO);
        p.bar.inc(250);
        let line = p.plain_line().unwrap_or_default();
        assert!(line.starts_with("reindex: 250/1000 (25%) in "), "{line}");
        assert!(line.contains("/s, eta ") && line.ends_with('s'), "{line}");
        // Items arrive a batch at a time: a line due at the first item of a batch counts the
        // batches before it, not that one item (no rate or ETA from nothing).
        let bar = ProgressBar::with_draw_target(Some(1_000), ProgressDrawTarget::hidden());
        let mut p = Progress::with_bar("eval", bar, Duration::ZERO);
        let first = p.inc_line(1).unwrap_or_default();
        assert!(first.starts_with("eval: 0/1000 (0%) in "), "{first}");
        assert!(first.ends_with(", 0/s, eta ?"), "{first}");
        for _ in 1..256 {
            p.inc_line(1);
        }
        let next = p.inc_line(1).unwrap_or_default();
        assert!(next.starts_with("eval: 256/1000 (26%) in "), "{next}");
        // A pipe's lines are not counted beforehand: a count and a rate only.
        let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::hidden());
        let mut p = Progress::with_bar("check", bar, Duration::ZERO);
        p.bar.inc(300);
        let line = p.plain_line().unwrap_or_default();
        assert!(
            line.starts_with("check: 300 in ") && line.ends_with("/s"),
            "{line}"
        );
        // On a schedule: not again before `every` has passed.
        let bar = ProgressBar::with_draw_target(Some(10), ProgressDrawTarget::hidden());
        let mut p = Progress::with_bar("check", bar, Duration::from_secs(3600));
        assert_eq!(p.plain_line(), None);
    }
}
