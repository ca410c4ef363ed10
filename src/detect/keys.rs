//! Lexical template evidence. Whole-prompt embeddings are dominated by the slot: two prompts of
//! one template ("…explain your reasoning… Task: implement an LRU cache" vs "…Task: parse ISO
//! dates") can have cosine 0.25–0.5, so the embedding threshold alone misses templates. A
//! template's fixed wording, though, shows as the same leading or trailing words. This module
//! derives *template keys* — the first and the last [`KEY_TOKENS`] normalised tokens of prompts
//! long enough to also carry a slot — and remembers the latest prompt per key, so a new prompt
//! links to an earlier one of the same template whatever its slot says.
//!
//! A key alone proves little (organic prompts share openers too); the cluster's distinct accounts,
//! text diversity and each account's concentration decide (see `scoring`).

use std::collections::HashMap;

/// Tokens in a key. Long enough that ordinary openers ("what is the best way to") do not fill it.
pub const KEY_TOKENS: usize = 8;
/// A prompt needs this many tokens beyond a key to get keys (the rest is the slot).
pub const MIN_SLOT_TOKENS: usize = 3;

/// Whether `c` belongs to a script written without spaces between words: CJK ideographs (as
/// BERT's basic tokenizer splits them) and kana.
pub fn is_cjk(c: char) -> bool {
    matches!(
        c as u32,
        0x3040..=0x30FF // hiragana, katakana
            | 0x31F0..=0x31FF // katakana extensions
            | 0x3400..=0x4DBF // CJK extension A
            | 0x4E00..=0x9FFF // CJK unified ideographs
            | 0xF900..=0xFAFF // CJK compatibility ideographs
            | 0xFF66..=0xFF9D // half-width katakana
            | 0x20000..=0x2FA1F // CJK extensions B–F, compatibility supplement
    )
}

/// Whether `c` is the punctuation CJK text uses (`、。「」【】` and the full-width `！？：，（）`…),
/// written without spaces around it.
fn is_cjk_punctuation(c: char) -> bool {
    matches!(
        c as u32,
        0x3001..=0x303F // CJK symbols and punctuation (U+3000, a space, is whitespace)
            | 0xFE10..=0xFE1F // vertical forms
            | 0xFE30..=0xFE4F // CJK compatibility forms
            | 0xFF01..=0xFF0F | 0xFF1A..=0xFF20 | 0xFF3B..=0xFF40 | 0xFF5B..=0xFF65 // full-width
    )
}

/// A character that is a word of its own: a CJK character or CJK punctuation.
fn stands_alone(c: char) -> bool {
    is_cjk(c) || is_cjk_punctuation(c)
}

/// The words of `text`: runs between whitespace, except that each CJK character (see
/// [`is_cjk`]) and each CJK punctuation mark is a word of its own — Chinese and Japanese put no spaces between words, and one
/// character a word is what BERT's tokenizer does too. Each word comes with whether whitespace
/// precedes it, so that a template can be written back as the prompts were.
pub fn words(text: &str) -> Words<'_> {
    Words { text, at: 0 }
}

/// The iterator of [`words`].
#[derive(Debug, Clone)]
pub struct Words<'a> {
    text: &'a str,
    at: usize,
}

impl<'a> Iterator for Words<'a> {
    type Item = (&'a str, bool);

    fn next(&mut self) -> Option<(&'a str, bool)> {
        let rest = &self.text[self.at..];
        let word = rest.trim_start();
        let spaced = word.len() < rest.len();
        let first = word.chars().next()?;
        let len = if stands_alone(first) {
            first.len_utf8()
        } else {
            word.char_indices()
                .find(|&(_, c)| c.is_whitespace() || stands_alone(c))
                .map_or(word.len(), |(i, _)| i)
        };
        let start = self.text.len() - word.len();
        self.at = start + len;
        Some((&self.text[start..self.at], spaced))
    }
}

/// Normalised tokens: the [`words`], lower-case, trimmed of punctuation at both ends, digits
/// folded to `0`, empty tokens dropped.
pub fn tokens(text: &str) -> Vec<String> {
    words(text)
        .map(|(w, _)| {
            normalised(w)
                .map(|c| if c.is_ascii_digit() { '0' } else { c })
                .collect::<String>()
        })
        .filter(|w| !w.is_empty())
        .collect()
}

/// The characters of word `w`, lower-case, trimmed of punctuation at both ends: what [`tokens`]
/// and [`text_identity`] compare.
fn normalised(w: &str) -> impl Iterator<Item = char> + '_ {
    w.trim_matches(|c: char| !c.is_alphanumeric())
        .chars()
        .flat_map(char::to_lowercase)
}

/// Which text a prompt is, as [`KeyIndex`] counts texts: a hash of its [`words`], lower-case and
/// trimmed of punctuation at both ends, so that "How do I sleep better?" and "how do I sleep
/// better" are one text. Digits are kept: prompts of a template whose slot is a number are
/// different texts.
pub fn text_identity(text: &str) -> u64 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    for (w, _) in words(text) {
        let mut empty = true;
        for c in normalised(w) {
            h.update(c.encode_utf8(&mut [0; 4]).as_bytes());
            empty = false;
        }
        if !empty {
            h.update(b"\x1f");
        }
    }
    h.digest()
}

/// The template keys of a prompt: the head and tail keys of the whole prompt and of each of its
/// segments (lines, sentences) long enough to carry a slot. Segment keys share the tags of the
/// whole-prompt keys on purpose: a template sentence matches whether it opens the prompt or
/// follows a per-account greeting, and whether it closes the prompt or precedes a sign-off.
pub fn keys(text: &str) -> Vec<u64> {
    let mut out = Vec::new();
    let add = |out: &mut Vec<u64>, t: &[String]| {
        if t.len() < KEY_TOKENS + MIN_SLOT_TOKENS {
            return;
        }
        for (tag, words) in [
            (&b"head"[..], &t[..KEY_TOKENS]),
            (&b"tail"[..], &t[t.len() - KEY_TOKENS..]),
        ] {
            let k = hash(tag, words);
            if wordy(words) && !out.contains(&k) {
                out.push(k);
            }
        }
    };
    add(&mut out, &tokens(text));
    let segments = segments(text);
    if segments.len() > 1 {
        for seg in segments {
            let t = tokens(seg);
            // A whole short segment repeated verbatim is a template's fixed phrase even when it
            // is too short for head/tail keys ("Summarize this dialogue:", "Are they duplicates?").
            if (PART_MIN_TOKENS..=PART_MAX_TOKENS).contains(&t.len()) && is_prose(seg) && wordy(&t)
            {
                let k = hash(b"segment", &t);
                if !out.contains(&k) {
                    out.push(k);
                }
            }
            add(&mut out, &t);
        }
    }
    out
}

/// Whether at least half of `tokens` are words (hold a letter and no digit). Runs of numbers ("0 0
/// 0 0 0 0 0 0" once digits are folded: a list of values, a table's row, a version), with units
/// or without ("00km 00km …"), are data, a slot's, and recur across unrelated prompts.
fn wordy(tokens: &[String]) -> bool {
    let word = |t: &&String| t.chars().any(char::is_alphabetic) && !t.contains('0');
    2 * tokens.iter().filter(word).count() >= tokens.len()
}

/// Fewest normalised tokens of a part (shorter segments are greetings and fillers).
pub const PART_MIN_TOKENS: usize = 3;
/// Most normalised tokens of a part: longer segments are mostly slot (a question, a code block).
pub const PART_MAX_TOKENS: usize = 32;
/// Most parts taken from one prompt: the first and the last few eligible segments, where a
/// template's instruction, slot intro and closing usually sit.
pub const MAX_PARTS: usize = 4;

/// The parts of a prompt embedded on their own, so that reworded instructions meet in the vector
/// index even when the slot dominates the whole-prompt vector: its segments (see [`segments`]) of
/// [`PART_MIN_TOKENS`]..=[`PART_MAX_TOKENS`] tokens, trimmed, distinct, the first and last
/// [`MAX_PARTS`]` / 2`. Empty for single-segment prompts (the whole-prompt vector covers those).
pub fn parts(text: &str) -> Vec<&str> {
    let segs = segments(text);
    if segs.len() < 2 {
        return Vec::new();
    }
    let mut eligible: Vec<&str> = Vec::new();
    for s in segs {
        let s = s.trim();
        let n = tokens(s).len();
        if (PART_MIN_TOKENS..=PART_MAX_TOKENS).contains(&n) && is_prose(s) && !eligible.contains(&s)
        {
            eligible.push(s);
        }
    }
    if eligible.len() > MAX_PARTS {
        let tail = eligible.split_off(eligible.len() - MAX_PARTS / 2);
        eligible.truncate(MAX_PARTS - tail.len());
        eligible.extend(tail);
    }
    eligible
}

/// Whether a segment reads as prose rather than code or markup: short code lines (`return a + b`,
/// `if n == 0:`) recur across unrelated programs and are slot, not template.
pub fn is_prose(segment: &str) -> bool {
    !segment.chars().any(|c| "=(){}[];<>+*\\|`_#".contains(c))
}

/// Lines, and sentences within lines: split after `.`, `!`, `?` or `:` followed by a space, and
/// after their full-width forms `。！？：`, which take no space after them.
pub fn segments(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    for line in text.lines() {
        let mut start = 0;
        let mut chars = line.char_indices().peekable();
        while let Some((_, c)) = chars.next() {
            let Some(&(next, after)) = chars.peek() else {
                break;
            };
            let ends = match c {
                '.' | '!' | '?' | ':' => after == ' ',
                '。' | '！' | '？' | '：' => true,
                _ => false,
            };
            if ends {
                out.push(&line[start..next]);
                start = next;
            }
        }
        out.push(&line[start..]);
    }
    out.retain(|s| !s.trim().is_empty());
    out
}

fn hash(tag: &[u8], words: &[String]) -> u64 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(tag);
    for w in words {
        h.update(w.as_bytes());
        h.update(b"\x1f");
    }
    h.digest()
}

/// Distinct texts a template key must have been seen in, the new prompt's included, before it
/// links prompts of different accounts (and [`KEY_ACCOUNTS`] accounts, or there is no other
/// account to link). A key that two texts share proves little: a campaign's slot is often a
/// public question (a benchmark's, a FAQ's) that an ordinary user also asks on its own, and then
/// the user's prompt and the campaign's (sent verbatim by several of its accounts) end in the same
/// words. A template's fixed wording comes back with slot after slot; a slot value seldom does.
/// Prompts of one account still link through any key they share, and the prompt that brings a
/// key to the spread links the latest prompt under it and the latest of another account.
///
/// Three accounts as well (tried) also keeps apart a user and a campaign account that wrapped the
/// same question in two templates, but a campaign whose accounts send their prompts one account
/// after another then loses its first accounts: their bursts link to no one until a third
/// account comes (QA: 4 of 8 accounts flagged, where two accounts gave 6 and the old rule 7).
pub const KEY_TEXTS: u8 = 3;
/// Distinct accounts a key must have been seen from, the new prompt's included (see
/// [`KEY_TEXTS`]).
pub const KEY_ACCOUNTS: u8 = 2;

/// Who sent a prompt, as the [`KeyIndex`] tells prompts apart: hashes of its account id
/// ([`account_hash`]) and of its text ([`text_identity`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Source {
    pub account: u64,
    pub text: u64,
}

/// The latest two distinct values seen, and how many distinct ones: exact up to [`KEY_TEXTS`],
/// where it stops (one value is `last`, two are `last` and `other`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Distinct {
    last: u64,
    other: u64,
    count: u8,
}

impl Distinct {
    fn new(value: u64) -> Self {
        Self {
            last: value,
            other: 0,
            count: 1,
        }
    }

    fn then(self, value: u64) -> Self {
        if value == self.last {
            return self;
        }
        let known = self.count == 2 && self.other == value;
        Self {
            last: value,
            other: self.last,
            count: if known {
                self.count
            } else {
                (self.count + 1).min(KEY_TEXTS)
            },
        }
    }

    /// Whether `value` is one of those seen, when that is known (below [`KEY_TEXTS`]).
    fn holds(self, value: u64) -> bool {
        value == self.last || (self.count == 2 && value == self.other)
    }
}

/// Per template key, its latest prompts and those of the account before (see [`Latest`]).
#[derive(Debug, Default)]
pub struct KeyIndex {
    latest: HashMap<u64, Latest>,
}

/// Prompts kept per run of one account under a key (see [`Latest`]).
pub const RUN: usize = 4;

/// Up to [`RUN`] prompt ids, newest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Ring {
    ids: [u64; RUN],
    len: u8,
}

impl Ring {
    const EMPTY: Self = Self {
        ids: [0; RUN],
        len: 0,
    };

    fn one(id: u64) -> Self {
        Self::EMPTY.push(id)
    }

    /// The ring with `id` as its newest, the oldest dropped when full.
    fn push(self, id: u64) -> Self {
        let mut ids = [0; RUN];
        ids[0] = id;
        ids[1..].copy_from_slice(&self.ids[..RUN - 1]);
        Self {
            ids,
            len: (self.len + 1).min(RUN as u8),
        }
    }

    /// The `i`-th newest, counting round the ring.
    fn get(&self, i: usize) -> Option<u64> {
        (self.len > 0).then(|| self.ids[i % usize::from(self.len)])
    }
}

/// A key's state. A *run* is the prompts one account sent under the key with no other account's
/// in between.
#[derive(Debug, Clone, Copy)]
struct Latest {
    /// The current run's latest prompts (all of account `accounts.last`), newest first: `run.ids[0]`
    /// is the key's latest prompt.
    run: Ring,
    /// Prompts in the current run so far (saturating).
    run_len: u16,
    /// The run before: the latest prompts of the account that sent under the key before the
    /// current run's, newest first (empty until a second run starts).
    before: Ring,
    accounts: Distinct,
    texts: Distinct,
}

impl Latest {
    /// The state after prompt `id` from `from` under a key whose state was `prev`.
    fn then(prev: Option<Latest>, id: u64, from: Source) -> Latest {
        match prev {
            None => Latest {
                run: Ring::one(id),
                run_len: 1,
                before: Ring::EMPTY,
                accounts: Distinct::new(from.account),
                texts: Distinct::new(from.text),
            },
            Some(p) if p.accounts.last == from.account => Latest {
                run: p.run.push(id),
                run_len: p.run_len.saturating_add(1),
                texts: p.texts.then(from.text),
                ..p
            },
            Some(p) => Latest {
                run: Ring::one(id),
                run_len: 1,
                before: p.run,
                accounts: p.accounts.then(from.account),
                texts: p.texts.then(from.text),
            },
        }
    }

    /// The latest prompt under the key.
    fn id(&self) -> u64 {
        self.run.ids[0]
    }

    /// The latest prompt from another account than the latest prompt's.
    fn other(&self) -> Option<u64> {
        self.before.get(0)
    }

    /// Whether the key links prompts of different accounts (see [`KEY_TEXTS`]).
    fn spread(&self) -> bool {
        self.accounts.count >= KEY_ACCOUNTS && self.texts.count >= KEY_TEXTS
    }
}

impl KeyIndex {
    /// Links of prompt `id` from `from` with `keys`, per key once it is spread over
    /// [`KEY_ACCOUNTS`] accounts and [`KEY_TEXTS`] texts: the latest earlier prompt, and one of
    /// the run before the latest prompt's (so a template an account repeats in a burst still
    /// links it to the other accounts that share it). A prompt that goes on a run takes the run
    /// before's prompts in turn, newest first: a campaign whose accounts send one after another
    /// then links each account to [`RUN`] prompts of the one before, not to its last prompt
    /// alone, and the cross-account evidence that counts distinct targets sees that many.
    /// Before the key is spread, only the account's own latest earlier prompt under it. Records
    /// `id`.
    pub fn link(&mut self, id: u64, from: Source, keys: &[u64]) -> Vec<u64> {
        let mut links = Vec::with_capacity(keys.len());
        for &k in keys {
            let prev = self.latest.get(&k).copied();
            let next = Latest::then(prev, id, from);
            if let Some(p) = prev {
                let own = p.accounts.last == from.account;
                let candidates = if next.spread() {
                    let turn = if own { usize::from(p.run_len) } else { 0 };
                    [Some(p.id()), p.before.get(turn)]
                } else if own {
                    [Some(p.id()), None]
                } else if p.accounts.holds(from.account) {
                    // Two accounts so far, and the other one sent the latest prompt.
                    [p.other(), None]
                } else {
                    [None, None]
                };
                for l in candidates.into_iter().flatten() {
                    if l < id && !links.contains(&l) {
                        links.push(l);
                    }
                }
            }
            self.latest.insert(k, next);
        }
        links
    }

    /// Records `id` under `keys` without linking (replay: the links are already stored).
    pub fn record(&mut self, id: u64, from: Source, keys: &[u64]) {
        for &k in keys {
            let next = Latest::then(self.latest.get(&k).copied(), id, from);
            self.latest.insert(k, next);
        }
    }

    /// Writes the index for the detector snapshot (see `snapshot`).
    pub(super) fn encode<W: std::io::Write>(&self, e: &mut super::snapshot::Enc<W>) {
        e.len(self.latest.len());
        for (&key, l) in &self.latest {
            e.u64(key);
            for ring in [l.run, l.before] {
                e.u8(ring.len);
                for &id in &ring.ids[..usize::from(ring.len)] {
                    e.u64(id);
                }
            }
            e.u32(u32::from(l.run_len));
            for d in [l.accounts, l.texts] {
                e.u64(d.last);
                e.u64(d.other);
                e.u8(d.count);
            }
        }
    }

    /// Reads what [`KeyIndex::encode`] wrote.
    pub(super) fn decode(d: &mut super::snapshot::Dec) -> std::io::Result<Self> {
        use super::snapshot::invalid;
        // The fewest bytes of an entry: a key, a run of one, an empty run before, the run's
        // length, two `Distinct`s.
        let n = d.len(8 + 9 + 1 + 4 + 2 * 17)?;
        let mut latest = HashMap::with_capacity(n);
        for _ in 0..n {
            let key = d.u64()?;
            let mut ring = |least: u8| -> std::io::Result<Ring> {
                let len = d.u8()?;
                if !(least..=RUN as u8).contains(&len) {
                    return Err(invalid(format!("a key's run of {len} prompts")));
                }
                let mut ids = [0; RUN];
                for id in &mut ids[..usize::from(len)] {
                    *id = d.u64()?;
                }
                Ok(Ring { ids, len })
            };
            let (run, before) = (ring(1)?, ring(0)?);
            let run_len = u16::try_from(d.u32()?.max(1)).unwrap_or(u16::MAX);
            let mut distinct = || -> std::io::Result<Distinct> {
                Ok(Distinct {
                    last: d.u64()?,
                    other: d.u64()?,
                    count: d.u8()?.clamp(1, KEY_TEXTS),
                })
            };
            let (accounts, texts) = (distinct()?, distinct()?);
            latest.insert(
                key,
                Latest {
                    run,
                    run_len,
                    before,
                    accounts,
                    texts,
                },
            );
        }
        Ok(Self { latest })
    }

    /// Keys remembered.
    pub fn len(&self) -> usize {
        self.latest.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.latest.is_empty()
    }
}

/// The account hash [`KeyIndex`] takes.
pub fn account_hash(account_id: &str) -> u64 {
    xxhash_rust::xxh3::xxh3_64(account_id.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: &str =
        "You are an expert programmer. Think step by step and explain your reasoning, then solve: ";

    #[test]
    fn same_template_different_slots_share_the_head_key() {
        let a = keys(&format!("{T}reverse a linked list in place"));
        let b = keys(&format!("{T}parse ISO 8601 dates with time zones"));
        assert_eq!(a[0], b[0], "head keys match");
        assert_ne!(a[1], b[1], "tail keys differ (the slot is at the end)");
        // The template's sentences are also keys of their own; the slot's is not shared.
        let shared = a.iter().filter(|k| b.contains(k)).count();
        assert_eq!(shared, 3, "head + two template sentences: {a:?} {b:?}");
    }

    #[test]
    fn normalisation_ignores_case_punctuation_and_digits() {
        assert_eq!(
            tokens("Hello, WORLD!! Task 17: x"),
            vec!["hello", "world", "task", "00", "x"]
        );
        let a =
            keys("Answer question 12 of the exam carefully and in detail please: what is a cell");
        let b = keys(
            "answer Question 99 of the exam, carefully and in detail please - why do cats purr",
        );
        assert_eq!(a[0], b[0]);
    }

    #[test]
    fn short_prompts_and_ordinary_openers_get_no_shared_key() {
        assert!(keys("what is the best way to learn rust").is_empty());
        let a = keys("what is the best way to learn rust as a python developer with little time");
        let b = keys("what is the best way to cook rice so that it does not stick to the pot");
        assert_ne!(a[0], b[0], "8 tokens reach into the slot");
    }

    #[test]
    fn per_account_prefixes_and_suffixes_do_not_hide_the_template_sentence() {
        let sentence = "Write a complete Python solution with unit tests and a complexity analysis for this task";
        let a = keys(&format!(
            "Hey, it's Bob from team 7. {sentence}: reverse a linked list"
        ));
        let b = keys(&format!(
            "{sentence}: merge two sorted arrays\nThanks a lot, cheers, Alice."
        ));
        assert!(
            a.iter().any(|k| b.contains(k)),
            "the template sentence's head key is shared"
        );
        let c =
            keys("Hey, it's Bob from team 7. What is the capital of France and why is it there?");
        assert!(!c.iter().any(|k| b.contains(k)));
    }

    #[test]
    fn cjk_characters_are_words_of_their_own() {
        let w: Vec<(&str, bool)> = words(" 用Python写 一个函数。 ok").collect();
        assert_eq!(
            w,
            vec![
                ("用", true),
                ("Python", false),
                ("写", false),
                ("一", true),
                ("个", false),
                ("函", false),
                ("数", false),
                ("。", false),
                ("ok", true)
            ]
        );
        assert_eq!(
            tokens("翻译成English: 2 次"),
            ["翻", "译", "成", "english", "0", "次"]
        );
        // English is split as before: on whitespace alone.
        let en = "Don't  stop—now: it's 3.14!";
        let split: Vec<&str> = en.split_whitespace().collect();
        assert_eq!(words(en).map(|(w, _)| w).collect::<Vec<_>>(), split);
        assert_eq!(words("").count() + words(" \n ").count(), 0);
    }

    #[test]
    fn chinese_prompts_of_one_template_share_keys_and_split_into_parts() {
        let a = "请你作为一名资深的软件工程师，详细解释下面这个概念：量子计算的基本原理";
        let b = "请你作为一名资深的软件工程师，详细解释下面这个概念：区块链是如何运作的";
        let c = "今天的天气怎么样？我想知道明天会不会下雨，需要带伞吗";
        let (ka, kb, kc) = (keys(a), keys(b), keys(c));
        assert!(!ka.is_empty());
        assert!(ka.iter().any(|k| kb.contains(k)));
        assert!(!ka.iter().any(|k| kc.contains(k)));
        assert_eq!(
            segments("第一句话。第二句话！第三句？最后：结束"),
            vec!["第一句话。", "第二句话！", "第三句？", "最后：", "结束"]
        );
        assert_eq!(
            parts("请翻译下面的句子。今天天气很好，我们去公园散步吧。谢谢你的帮助！"),
            vec![
                "请翻译下面的句子。",
                "今天天气很好，我们去公园散步吧。",
                "谢谢你的帮助！"
            ]
        );
    }

    #[test]
    fn segments_split_lines_and_sentences() {
        assert_eq!(
            segments("One. Two! Three?\nFour: five\n\n"),
            vec!["One.", " Two!", " Three?", "Four:", " five"]
        );
        assert_eq!(segments("3.14 is pi"), vec!["3.14 is pi"]);
        assert!(segments("").is_empty());
    }

    #[test]
    fn code_lines_are_neither_parts_nor_segment_keys() {
        let code = "Write a docstring for this Python function:\ndef add(a, b):\n    total = a + b\n    return total";
        assert_eq!(
            parts(code),
            vec!["Write a docstring for this Python function:"]
        );
        let other = "Explain this function:\ndef sub(a, b):\n    total = a + b\n    return total";
        let shared: Vec<_> = keys(code)
            .into_iter()
            .filter(|k| keys(other).contains(k))
            .collect();
        assert!(
            shared.is_empty(),
            "code lines must not link unrelated prompts"
        );
    }

    #[test]
    fn parts_are_the_short_segments_first_and_last() {
        assert!(parts("What is the capital of France and why is it there?").is_empty());
        let p = parts(
            "Evening.\n\nFigure out the problem stage by stage please.\n\nDetails: Faraday owns a shop. He sells sunflowers at $2 each.",
        );
        assert_eq!(
            p,
            vec![
                "Figure out the problem stage by stage please.",
                "Faraday owns a shop.",
                "He sells sunflowers at $2 each."
            ]
        );
        let many: String = (0..20)
            .map(|i| format!("Sentence number {i} here.\n"))
            .collect();
        let p = parts(&many);
        assert_eq!(p.len(), MAX_PARTS);
        assert_eq!(p[0], "Sentence number 0 here.");
        assert_eq!(p[MAX_PARTS - 1], "Sentence number 19 here.");
    }

    #[test]
    fn one_text_whatever_its_case_spacing_and_punctuation() {
        let a = text_identity("How can I improve the quality of my sleep at night?");
        assert_eq!(
            a,
            text_identity("how can i improve the quality of my sleep at night")
        );
        assert_eq!(
            a,
            text_identity("  How can I improve the quality of my sleep, at night ?!")
        );
        assert_ne!(
            a,
            text_identity("How can I improve the quality of my sleep at noon?")
        );
        assert_ne!(
            text_identity("What is 12 + 7?"),
            text_identity("What is 13 + 7?")
        );
        assert_eq!(
            text_identity("光合作用的过程是怎样的？"),
            text_identity("光合作用的过程是怎样的")
        );
    }

    #[test]
    fn runs_of_numbers_are_no_keys() {
        let a = keys("Sort these numbers in ascending order:\n4 8 15 16 23 42 7 19 3 11 5");
        let b = keys("Find the median of the list below.\n1 9 12 17 25 40 6 18 2 10 3");
        assert!(
            !a.iter().any(|k| b.contains(k)),
            "the numbers' tails are not keys: {a:?} {b:?}"
        );
        // Fixed wording with a number or two in it still is.
        let c = keys("Sort these numbers in ascending order:\n5 3 9 1 0 8 2 7 6 4 11");
        assert!(a.iter().any(|k| c.contains(k)));
        let t = |s: &str| tokens(s);
        assert!(wordy(&t("answer in 3 steps and 100 words at most")));
        assert!(!wordy(&t("1, 2, 3, 4, 5 and 6 or 7")));
        assert!(!wordy(&t("40km 85km 79km 12km 33km 61km 90km 27km")));
        let d = keys(
            "Plan a route through these distances:\n40km 85km 79km 12km 33km 61km 90km 27km 55km",
        );
        let e = keys(
            "Which of these runs is an outlier?\n10km 15km 19km 12km 13km 11km 90km 17km 15km",
        );
        assert!(!d.iter().any(|k| e.contains(k)), "{d:?} {e:?}");
    }

    /// Account `account`'s prompt of text `text`.
    fn from(account: u64, text: u64) -> Source {
        Source { account, text }
    }

    #[test]
    fn index_links_to_the_latest_prompt_per_key() {
        let mut idx = KeyIndex::default();
        assert!(idx.link(1, from(100, 1), &[10, 20]).is_empty());
        // Two texts under key 10: not yet.
        assert!(idx.link(2, from(200, 2), &[10, 30]).is_empty());
        // The third text links the latest prompts of both earlier accounts.
        assert_eq!(idx.link(3, from(300, 3), &[10, 20]), vec![2, 1]);
        idx.record(4, from(400, 4), &[30]);
        idx.record(5, from(500, 5), &[30]);
        assert_eq!(idx.link(6, from(600, 6), &[30]), vec![5, 4]);
        assert_eq!(idx.len(), 3);
        // A burst of one account still links to the latest other account under the key.
        assert_eq!(idx.link(7, from(700, 7), &[10]), vec![3, 2]);
        assert_eq!(idx.link(8, from(700, 8), &[10]), vec![7, 3]);
        assert_eq!(idx.link(9, from(700, 9), &[10]), vec![8, 3]);
        assert_eq!(idx.link(10, from(300, 10), &[10]), vec![9, 3]);
    }

    #[test]
    fn a_run_takes_the_run_before_in_turn() {
        // Accounts that send one after another, ten prompts each: account 100 sends 1..=10,
        // 200 sends 11..=20, 300 sends 21..=23.
        let mut idx = KeyIndex::default();
        for id in 1..=10 {
            idx.link(id, from(100, id), &[10]);
        }
        let mut got = Vec::new();
        for id in 11..=20 {
            got.push(idx.link(id, from(200, id), &[10]));
        }
        // Its first prompt links the latest of the run before; the next ones its own latest and
        // the run before's last RUN prompts in turn, then round again.
        let want: [&[u64]; 10] = [
            &[10],
            &[11, 9],
            &[12, 8],
            &[13, 7],
            &[14, 10],
            &[15, 9],
            &[16, 8],
            &[17, 7],
            &[18, 10],
            &[19, 9],
        ];
        assert_eq!(got, want.map(<[u64]>::to_vec));
        assert_eq!(idx.link(21, from(300, 21), &[10]), vec![20, 10]);
        assert_eq!(idx.link(22, from(300, 22), &[10]), vec![21, 19]);
        // Back to an earlier account: a new run, before which is 300's.
        assert_eq!(idx.link(23, from(100, 23), &[10]), vec![22, 20]);
        assert_eq!(idx.link(24, from(100, 24), &[10]), vec![23, 21]);
        assert_eq!(idx.link(25, from(100, 25), &[10]), vec![24, 22]);
    }

    #[test]
    fn a_second_account_links_once_the_key_has_three_texts() {
        let mut idx = KeyIndex::default();
        assert!(idx.link(1, from(100, 1), &[10]).is_empty());
        assert_eq!(idx.link(2, from(100, 2), &[10]), vec![1]);
        assert_eq!(idx.link(3, from(200, 3), &[10]), vec![2]);
        assert_eq!(idx.link(4, from(200, 4), &[10]), vec![3, 1]);
    }

    #[test]
    fn a_key_of_two_texts_links_each_account_to_itself_only() {
        // A campaign wraps a public question in its template; an ordinary account then asks that
        // question on its own. Both prompts end in the question's words.
        let q = "What is the best way to learn to play the guitar as an adult?";
        let campaign = keys(&format!(
            "Translate this text to Italian and keep the same tone please. {q}"
        ));
        let user = keys(q);
        assert!(
            user.iter().any(|k| campaign.contains(k)),
            "the question's keys are shared: {campaign:?} {user:?}"
        );
        let mut idx = KeyIndex::default();
        assert!(idx.link(1, from(100, 1), &campaign).is_empty());
        assert!(idx.link(2, from(200, 2), &user).is_empty(), "two texts");
        assert_eq!(
            idx.link(3, from(200, 2), &user),
            vec![2],
            "its own earlier prompt"
        );
        assert_eq!(
            idx.link(4, from(100, 1), &campaign),
            vec![1],
            "its own earlier prompt"
        );
        // However often either sends, the key stays at two texts: each links to itself.
        let mut last = [4, 3];
        for id in 5..20 {
            let who = usize::from(id % 3 != 0);
            let (source, keys) = [(from(100, 1), &campaign), (from(200, 2), &user)][who];
            assert_eq!(idx.link(id, source, keys), vec![last[who]], "prompt {id}");
            last[who] = id;
        }
        // Campaign accounts that send the same wrapped question: three accounts, two texts.
        assert!(idx.link(20, from(300, 1), &campaign).is_empty());
        assert!(idx.link(21, from(400, 1), &campaign).is_empty());
        assert!(
            idx.link(22, from(200, 2), &user).is_empty(),
            "not known to be its own"
        );
        // A third text, from a third account, makes the keys template evidence.
        let third = idx.link(23, from(500, 3), &user);
        assert_eq!(third, vec![22, 21], "{third:?}");
    }
}
