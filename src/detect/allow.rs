//! Allow-listed templates: known legitimate apps whose prompts share a template across many
//! accounts (a writing assistant's "Rewrite the following text to be more professional: …").
//! An entry is a template in the form analysts see in `campaigns` — fixed words with `<*>` slots.
//! A prompt matches when its normalised tokens (see [`keys::tokens`]) contain the fixed runs in
//! order, the first anchored at the start unless the template opens with a slot, the last at the
//! end unless it closes with one. Matching prompts are never linked into campaigns.

use serde::{Deserialize, Serialize};

use super::keys;

/// Fewest fixed tokens an entry needs: a template of one or two words would allow everything.
pub const MIN_FIXED_TOKENS: usize = 3;
/// Fewest fixed tokens in a row a new entry needs somewhere: a template recovered from a merged
/// cluster can read `<*> a <*> and <*> of <*> the <*>`, whose scattered stop-words a fifth of all
/// prompts contain, and allow-listing it cleared an unrelated campaign.
pub const MIN_RUN_TOKENS: usize = 3;

/// One allow-list entry as stored and shown.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AllowEntry {
    /// Id, unique within the store.
    pub id: u64,
    /// The template: fixed words and `<*>` slots.
    pub template: String,
    /// Why it is allowed (free text).
    pub note: String,
    /// When it was added, ms since the epoch.
    pub created_ms: i64,
}

/// A compiled template. Two templates that compile to equal rules match the same prompts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowRule {
    runs: Vec<Vec<String>>,
    anchored_start: bool,
    anchored_end: bool,
}

impl AllowRule {
    /// Compiles `template`; `None` (with the reason) when it has too few fixed words.
    pub fn compile(template: &str) -> Result<Self, String> {
        let trimmed = template.trim();
        let pieces: Vec<&str> = trimmed.split("<*>").collect();
        let runs: Vec<Vec<String>> = pieces
            .iter()
            .map(|p| keys::tokens(p))
            .filter(|r| !r.is_empty())
            .collect();
        let fixed: usize = runs.iter().map(Vec::len).sum();
        if fixed < MIN_FIXED_TOKENS {
            return Err(format!(
                "a template needs at least {MIN_FIXED_TOKENS} fixed words besides its <*> slots (a Chinese or Japanese character counts as a word)"
            ));
        }
        let first_fixed = pieces.first().is_some_and(|p| !keys::tokens(p).is_empty());
        let last_fixed = pieces.last().is_some_and(|p| !keys::tokens(p).is_empty());
        Ok(Self {
            runs,
            anchored_start: first_fixed,
            anchored_end: last_fixed,
        })
    }

    /// [`AllowRule::compile`] for a new entry, which also needs [`MIN_RUN_TOKENS`] fixed words in
    /// a row. Entries already stored are compiled as they were accepted.
    pub fn compile_new(template: &str) -> Result<Self, String> {
        let rule = Self::compile(template)?;
        if rule.runs.iter().all(|r| r.len() < MIN_RUN_TOKENS) {
            return Err(format!(
                "a template needs {MIN_RUN_TOKENS} fixed words in a row somewhere; scattered words between <*> slots match unrelated prompts"
            ));
        }
        Ok(rule)
    }

    /// Whether `text` is an instance of the template.
    pub fn matches(&self, text: &str) -> bool {
        self.matches_tokens(&keys::tokens(text))
    }

    /// [`AllowRule::matches`] on already normalised tokens.
    pub fn matches_tokens(&self, t: &[String]) -> bool {
        let mut pos = 0;
        let n = self.runs.len();
        for (i, run) in self.runs.iter().enumerate() {
            let found = if i == 0 && self.anchored_start {
                t.starts_with(run).then_some(0)
            } else if i == n - 1 && self.anchored_end {
                let start = t.len().checked_sub(run.len());
                start.filter(|&s| s >= pos && t[s..] == run[..])
            } else {
                (pos..=t.len().saturating_sub(run.len()))
                    .find(|&s| t.get(s..s + run.len()) == Some(&run[..]))
            };
            match found {
                Some(s) => pos = s + run.len(),
                None => return false,
            }
        }
        !self.anchored_end || pos == t.len()
    }
}

/// The compiled allow-list.
#[derive(Debug, Clone, Default)]
pub struct AllowList {
    rules: Vec<(u64, AllowRule)>,
}

impl AllowList {
    /// Compiles `entries` (entries that no longer compile are skipped).
    pub fn new(entries: &[AllowEntry]) -> Self {
        Self {
            rules: entries
                .iter()
                .filter_map(|e| AllowRule::compile(&e.template).ok().map(|r| (e.id, r)))
                .collect(),
        }
    }

    /// The id of the first entry `text` matches.
    pub fn matching(&self, text: &str) -> Option<u64> {
        if self.rules.is_empty() {
            return None;
        }
        let t = keys::tokens(text);
        self.rules
            .iter()
            .find(|(_, r)| r.matches_tokens(&t))
            .map(|(id, _)| *id)
    }

    /// The id of the entry whose rule is `rule` (one that matches the same prompts), if any.
    pub fn listed(&self, rule: &AllowRule) -> Option<u64> {
        self.rules
            .iter()
            .find(|(_, r)| r == rule)
            .map(|(id, _)| *id)
    }

    /// The compiled rules, in entry order.
    pub fn rules(&self) -> impl Iterator<Item = &AllowRule> {
        self.rules.iter().map(|(_, r)| r)
    }

    /// True when there are no entries.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_instances_and_nothing_else() {
        let r =
            AllowRule::compile("Rewrite the following text to be more professional: <*>").unwrap();
        assert!(
            r.matches("Rewrite the following text to be more professional:\n\nhey boss, cant come")
        );
        assert!(r.matches("rewrite the following TEXT to be more professional - x y z"));
        assert!(!r.matches("Please rewrite the following text to be more professional: x"));
        assert!(!r.matches("Rewrite the following text to be shorter: x"));

        let mid = AllowRule::compile("<*> Translate to French: <*> Thanks.").unwrap();
        assert!(mid.matches("Hi. Translate to French: where is the station? Thanks."));
        assert!(!mid.matches("Hi. Translate to French: where is the station?"));
        assert!(!mid.matches("Thanks. Translate to German: x Thanks."));
    }

    #[test]
    fn chinese_and_japanese_templates_match_character_by_character() {
        // No spaces between words: each CJK character is a fixed word of its own.
        let zh = AllowRule::compile("请把下面这段话翻译成英文：<*>").unwrap();
        assert!(zh.matches("请把下面这段话翻译成英文：今天天气很好。"));
        assert!(zh.matches("请把下面这段话翻译成英文： The cat sat."));
        assert!(!zh.matches("请把下面这段话翻译成法文：今天天气很好。"));
        assert!(!zh.matches("你好，请把下面这段话翻译成英文：今天天气很好。"));
        let ja = AllowRule::compile("<*>を英語に翻訳してください").unwrap();
        assert!(ja.matches("今日はいい天気ですを英語に翻訳してください"));
        assert!(!ja.matches("今日はいい天気ですをフランス語に翻訳してください"));
        // Three characters are three words, enough; two are not.
        assert!(AllowRule::compile("翻译成<*>").is_ok());
        assert!(AllowRule::compile("翻译<*>").is_err());
    }

    #[test]
    fn a_new_entry_needs_three_fixed_words_in_a_row() {
        // What a merged cluster's template can read: five fixed words, none next to another.
        let merged = "<*> a <*> and <*> of <*> the <*> the <*>";
        assert!(
            AllowRule::compile(merged).is_ok(),
            "an entry already stored still loads"
        );
        let err = AllowRule::compile_new(merged).unwrap_err();
        assert!(err.contains("3 fixed words in a row"), "{err}");
        let rule = AllowRule::compile(merged).unwrap();
        assert!(rule.matches("Write a poem and a list of the colours of the sea, the sky."));
        for ok in [
            "Rewrite the following text to be more professional: <*>",
            "<*> Translate to French: <*> Thanks.",
            "翻译成<*>",
        ] {
            assert!(AllowRule::compile_new(ok).is_ok(), "{ok}");
        }
        assert!(AllowRule::compile_new("Translate <*> to <*> now").is_err());
    }

    #[test]
    fn templates_differing_in_spacing_case_or_edge_punctuation_are_one_rule() {
        let rule = |t: &str| AllowRule::compile(t).unwrap();
        let zh = rule("请把下面这段话翻译成英文：<*>");
        assert_eq!(rule("请把下面这段话翻译成英文：  <*>"), zh);
        assert_eq!(rule("请 把 下 面 这 段 话 翻 译 成 英 文 ： <*>"), zh);
        assert_eq!(
            rule("Rewrite the text to be formal: <*>"),
            rule(" rewrite THE text to be formal <*>")
        );
        assert_ne!(
            rule("Rewrite the text to be formal: <*>"),
            rule("Rewrite the text to be formal")
        );
        assert_ne!(zh, rule("请把下面这段话翻译成法文：<*>"));
    }

    #[test]
    fn too_generic_templates_are_refused() {
        assert!(AllowRule::compile("<*>").is_err());
        assert!(AllowRule::compile("what is <*>").is_err());
        assert!(AllowRule::compile("").is_err());
    }

    #[test]
    fn list_reports_the_matching_entry() {
        let e = |id, t: &str| AllowEntry {
            id,
            template: t.into(),
            note: String::new(),
            created_ms: 0,
        };
        let list = AllowList::new(&[e(1, "Fix the grammar and spelling <*>"), e(2, "x")]);
        assert_eq!(
            list.matching("fix the grammar and spelling: teh cat"),
            Some(1)
        );
        assert_eq!(list.matching("tell me a joke"), None);
        assert!(AllowList::default().matching("anything").is_none());
    }
}
