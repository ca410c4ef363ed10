//! Request validation: every check names the offending field, nothing panics on user input.

use crate::config::Limits;
use crate::error::Error;

/// A prompt that passed validation.
#[derive(Debug, Clone)]
pub struct ValidPrompt {
    /// Trimmed account id.
    pub account_id: String,
    /// The prompt text as sent.
    pub prompt: String,
    /// Send time (the server's clock when the request gave 0).
    pub timestamp_ms: i64,
}

/// The earliest send time taken: 2000-01-01T00:00:00Z, in milliseconds.
pub const EARLIEST_MS: i64 = 946_684_800_000;

/// Checks account id, prompt and timestamp against `limits`.
pub fn prompt(
    account_id: &str,
    prompt: &str,
    timestamp_ms: i64,
    limits: &Limits,
) -> Result<ValidPrompt, Error> {
    let account_id = self::account_id(account_id, limits)?;
    text("prompt", prompt, limits)?;
    let timestamp_ms = timestamp(timestamp_ms, limits)?;
    Ok(ValidPrompt {
        account_id: account_id.to_string(),
        prompt: prompt.to_string(),
        timestamp_ms,
    })
}

/// Checks an account id against `limits`: given, not blank, not too long, without control or
/// invisible characters. Returns it trimmed.
pub fn account_id<'a>(account_id: &'a str, limits: &Limits) -> Result<&'a str, Error> {
    if account_id.is_empty() {
        return Err(Error::invalid("account_id", "required"));
    }
    let account_id = account_id.trim();
    if account_id.is_empty() {
        return Err(Error::invalid("account_id", "must not be blank"));
    }
    if account_id.len() > limits.max_account_bytes {
        return Err(Error::invalid(
            "account_id",
            format!(
                "{} bytes exceeds the limit of {}",
                account_id.len(),
                limits.max_account_bytes
            ),
        ));
    }
    if let Some((at, c)) = account_id
        .chars()
        .enumerate()
        .find(|&(_, c)| c.is_control() || invisible(c))
    {
        // An id with a character that shows as nothing (or as a space) looks like another id in
        // every listing, and cannot be typed back from one.
        return Err(Error::invalid(
            "account_id",
            format!(
                "must not contain control or invisible characters (U+{:04X} at character {})",
                c as u32,
                at + 1
            ),
        ));
    }
    Ok(account_id)
}

/// Checks a prompt's timestamp against `limits`: 0 is now; returns the time to store.
fn timestamp(timestamp_ms: i64, limits: &Limits) -> Result<i64, Error> {
    if timestamp_ms < 0 {
        return Err(Error::invalid(
            "timestamp_ms",
            format!("{timestamp_ms} is negative"),
        ));
    }
    if timestamp_ms != 0 && timestamp_ms < EARLIEST_MS {
        // Seconds since the epoch read as milliseconds land in January 1970. Taken, they would
        // also make a time-sliced index segment span decades and seal at once.
        return Err(Error::invalid(
            "timestamp_ms",
            format!(
                "{timestamp_ms} is in {}, before 2000 (the earliest taken); is it in seconds?",
                1970 + timestamp_ms / 31_557_600_000
            ),
        ));
    }
    let now = now_ms();
    if timestamp_ms > now.saturating_add(limits.max_future_ms) {
        let years = (timestamp_ms - now) as f64 / (365.25 * 86_400_000.0);
        return Err(Error::invalid(
            "timestamp_ms",
            format!(
                "{timestamp_ms} is {} ahead of the clock (at most {} h ahead is taken); is it in microseconds?",
                if years >= 1.0 {
                    format!("{years:.0} years")
                } else {
                    format!("{:.0} h", (timestamp_ms - now) as f64 / 3_600_000.0)
                },
                limits.max_future_ms / 3_600_000
            ),
        ));
    }
    Ok(if timestamp_ms == 0 { now } else { timestamp_ms })
}

/// Characters that show as nothing or as white space in a listing: zero-width spaces and joiners,
/// direction marks and overrides, line and paragraph separators, word joiners, the byte-order
/// mark, the soft hyphen and other format characters. (Refused in account ids; escaped in the
/// CLI's tables.)
pub fn invisible(c: char) -> bool {
    matches!(
        c,
        '\u{00AD}'
            | '\u{034F}'
            | '\u{061C}'
            | '\u{115F}'
            | '\u{1160}'
            | '\u{180E}'
            | '\u{200B}'..='\u{200F}'
            | '\u{2028}'..='\u{202E}'
            | '\u{2060}'..='\u{206F}'
            | '\u{3164}'
            | '\u{FE00}'..='\u{FE0F}'
            | '\u{FEFF}'
            | '\u{2800}'
            | '\u{E0000}'..='\u{E007F}'
            | '\u{FFA0}'
            | '\u{FFF9}'..='\u{FFFB}'
    )
}

/// Checks a prompt-like text (a prompt, a search text, a template): not blank, and at most
/// `limits.max_prompt_bytes`. Errors name `field`.
pub fn text(field: &'static str, text: &str, limits: &Limits) -> Result<(), Error> {
    // Blank: nothing that shows (white space, control and invisible characters only, such as a
    // run of zero-width spaces).
    if text
        .chars()
        .all(|c| c.is_whitespace() || c.is_control() || invisible(c))
    {
        return Err(Error::invalid(field, "must not be empty or blank"));
    }
    if text.len() > limits.max_prompt_bytes {
        return Err(Error::invalid(
            field,
            format!(
                "{} bytes exceeds the limit of {}",
                text.len(),
                limits.max_prompt_bytes
            ),
        ));
    }
    Ok(())
}

/// Checks a search's `k` (0 → 10).
pub fn k(k: u32, limits: &Limits) -> Result<usize, Error> {
    match k as usize {
        0 => Ok(10),
        k if k > limits.max_search_k => Err(Error::invalid(
            "k",
            format!("{k} exceeds the limit of {}", limits.max_search_k),
        )),
        k => Ok(k),
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(e: Error) -> &'static str {
        match e {
            Error::Invalid { field, .. } => field,
            other => panic!("not a validation error: {other}"),
        }
    }

    #[test]
    fn an_account_id_with_an_invisible_character_is_refused_naming_it() {
        let l = Limits::default();
        for (id, code, at) in [
            ("acct\u{200B}7", "U+200B", 5),
            ("acct\u{2028}sep", "U+2028", 5),
            ("\u{202E}tcca", "U+202E", 1),
            ("a\u{FEFF}", "U+FEFF", 2),
            ("a\u{1b}[31m", "U+001B", 2),
        ] {
            let e = prompt(id, "hi", 0, &l).unwrap_err().to_string();
            assert!(
                e.contains(&format!("({code} at character {at})")),
                "{id:?}: {e}"
            );
        }
        // Letters of any script, emoji and ordinary punctuation are ids like any other.
        for id in ["ユーザー-42", "acct_é.ü", "team 🚀 7", "user@example.com"] {
            assert_eq!(prompt(id, "hi", 0, &l).unwrap().account_id, id);
        }
    }

    #[test]
    fn rejects_bad_fields_by_name() {
        let l = Limits::default();
        assert_eq!(field(prompt("", "hi", 0, &l).unwrap_err()), "account_id");
        assert_eq!(field(prompt("  ", "hi", 0, &l).unwrap_err()), "account_id");
        assert_eq!(
            field(prompt("a\u{0}b", "hi", 0, &l).unwrap_err()),
            "account_id"
        );
        assert_eq!(
            field(prompt(&"x".repeat(300), "hi", 0, &l).unwrap_err()),
            "account_id"
        );
        assert_eq!(field(prompt("a", "", 0, &l).unwrap_err()), "prompt");
        assert_eq!(field(prompt("a", " \n\t ", 0, &l).unwrap_err()), "prompt");
        // Nothing that shows is blank too; an emoji or a letter of any script is not.
        for blank in [
            "\u{200B}\u{200B}",
            " \u{FEFF}\u{2060} ",
            "\u{0}\u{1b}",
            "\u{E0041}\u{E0042}",
            "\u{2800}\u{2800}",
        ] {
            let e = prompt("a", blank, 0, &l).unwrap_err().to_string();
            assert!(
                e.contains("prompt: must not be empty or blank"),
                "{blank:?}: {e}"
            );
        }
        for shown in ["🚀", "\u{200B}é", "ㅤ?"] {
            assert!(prompt("a", shown, 0, &l).is_ok(), "{shown:?}");
        }
        // An account id given as spaces is not missing: it is blank.
        let e = prompt("  ", "hi", 0, &l).unwrap_err().to_string();
        assert!(e.contains("account_id: must not be blank"), "{e}");
        let e = prompt("", "hi", 0, &l).unwrap_err().to_string();
        assert!(e.contains("account_id: required"), "{e}");
        assert_eq!(
            field(prompt("a", &"x".repeat(40_000), 0, &l).unwrap_err()),
            "prompt"
        );
        assert_eq!(
            field(prompt("a", "hi", -1, &l).unwrap_err()),
            "timestamp_ms"
        );
        assert_eq!(field(k(5000, &l).unwrap_err()), "k");
    }

    #[test]
    fn a_time_far_ahead_of_the_clock_is_refused_and_a_skewed_one_taken() {
        let l = Limits::default();
        let micros = now_ms() * 1000;
        let e = prompt("a", "hi", micros, &l).unwrap_err();
        assert!(e.to_string().contains("microseconds"), "{e}");
        assert_eq!(field(e), "timestamp_ms");
        assert!(prompt("a", "hi", i64::MAX, &l).is_err());
        let skewed = now_ms() + 3_600_000;
        assert_eq!(prompt("a", "hi", skewed, &l).unwrap().timestamp_ms, skewed);
    }

    #[test]
    fn a_time_in_seconds_is_refused_and_an_old_one_in_milliseconds_taken() {
        let l = Limits::default();
        let seconds = now_ms() / 1000;
        let e = prompt("a", "hi", seconds, &l).unwrap_err();
        assert!(
            e.to_string().contains("is in 1970") && e.to_string().contains("seconds"),
            "{e}"
        );
        assert_eq!(field(e), "timestamp_ms");
        assert!(prompt("a", "hi", 42, &l).is_err());
        assert!(prompt("a", "hi", EARLIEST_MS - 1, &l).is_err());
        let june_2015 = 1_433_116_800_000;
        assert_eq!(
            prompt("a", "hi", june_2015, &l).unwrap().timestamp_ms,
            june_2015
        );
        assert_eq!(
            prompt("a", "hi", EARLIEST_MS, &l).unwrap().timestamp_ms,
            EARLIEST_MS
        );
    }

    #[test]
    fn accepts_and_fills_time() {
        let l = Limits::default();
        let p = prompt(" acct ", "hello 🌍", 0, &l).unwrap();
        assert_eq!(p.account_id, "acct");
        assert!(p.timestamp_ms > 1_700_000_000_000);
        let t = 1_750_000_000_000;
        assert_eq!(prompt("a", "x", t, &l).unwrap().timestamp_ms, t);
        assert_eq!(k(0, &l).unwrap(), 10);
    }
}
