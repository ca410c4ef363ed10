//! The naive online detectors prompt-radar must beat (DESIGN.md, "Detection quality"): exact text
//! hashing across accounts, and MinHash-LSH on word shingles. Both share one rule: a group of
//! prompts is *shared* once at least `min_accounts` distinct accounts sent into it, and an account
//! is flagged when at least half of its prompts so far fall in shared groups.
//!
//! The rule is evaluated after each of the account's own prompts (giving `first_flag_prompt`) and
//! once more after the whole stream (giving `flagged`), because later prompts of *other* accounts
//! can make an account's earlier groups shared. Groups are union-find sets over prompts, so that
//! MinHash band collisions can chain prompts into clusters; for exact hashing a group is simply
//! one normalised text. Plain Rust, in memory, no index: a yardstick, not a product.

use std::collections::HashMap;
use std::collections::hash_map::Entry;

use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

use super::metrics::AccountOutcome;

/// Distinct accounts at which a group counts as shared, unless told otherwise.
pub const DEFAULT_MIN_ACCOUNTS: usize = 5;
/// Label given to accounts missing from the label map (shows up as its own "campaign").
pub const UNLABELLED: &str = "unlabelled";
/// MinHash signature length: `BANDS × ROWS`.
const HASHES: usize = 64;
/// LSH bands; two prompts are linked when all rows of any one band agree.
const BANDS: usize = 16;
/// Rows (signature entries) per band.
const ROWS: usize = HASHES / BANDS;

/// An online baseline fed one prompt at a time, in stream order.
pub trait Baseline {
    /// Short name for reports.
    fn name(&self) -> &'static str;
    /// Records one prompt of `account`.
    fn observe(&mut self, account: &str, text: &str);
    /// Every account seen (in first-seen order) with its verdicts and its label from `labels`.
    fn outcomes(&self, labels: &HashMap<String, String>) -> Vec<AccountOutcome>;
}

/// Union-find over prompts with, per set, up to `min_accounts` distinct accounts (enough to know
/// whether the set is shared: sets only grow, so a shared set stays shared).
#[derive(Debug)]
struct SharedGroups {
    min_accounts: usize,
    parent: Vec<u32>,
    size: Vec<u32>,
    members: Vec<Vec<u32>>,
    key_owner: HashMap<u64, u32>,
    account_index: HashMap<String, u32>,
    account_ids: Vec<String>,
    account_prompts: Vec<Vec<u32>>,
    first_flag: Vec<Option<usize>>,
}

impl SharedGroups {
    fn new(min_accounts: usize) -> Self {
        Self {
            min_accounts: min_accounts.max(1),
            parent: Vec::new(),
            size: Vec::new(),
            members: Vec::new(),
            key_owner: HashMap::new(),
            account_index: HashMap::new(),
            account_ids: Vec::new(),
            account_prompts: Vec::new(),
            first_flag: Vec::new(),
        }
    }

    /// Adds a prompt of `account` that belongs with every earlier prompt carrying one of `keys`.
    fn observe(&mut self, account: &str, keys: impl IntoIterator<Item = u64>) {
        let a = match self.account_index.get(account) {
            Some(&a) => a,
            None => {
                let a = self.account_ids.len() as u32;
                self.account_index.insert(account.to_string(), a);
                self.account_ids.push(account.to_string());
                self.account_prompts.push(Vec::new());
                self.first_flag.push(None);
                a
            }
        };
        let node = self.parent.len() as u32;
        self.parent.push(node);
        self.size.push(1);
        self.members.push(vec![a]);
        for key in keys {
            match self.key_owner.entry(key) {
                Entry::Occupied(e) => {
                    let other = *e.get();
                    self.union(node, other);
                }
                Entry::Vacant(e) => {
                    e.insert(node);
                }
            }
        }
        let a = a as usize;
        self.account_prompts[a].push(node);
        if self.first_flag[a].is_none() && self.flagged_now(a) {
            self.first_flag[a] = Some(self.account_prompts[a].len());
        }
    }

    fn find(&self, mut x: u32) -> u32 {
        while self.parent[x as usize] != x {
            x = self.parent[x as usize];
        }
        x
    }

    fn find_compress(&mut self, x: u32) -> u32 {
        let root = self.find(x);
        let mut x = x;
        while self.parent[x as usize] != root {
            let next = self.parent[x as usize];
            self.parent[x as usize] = root;
            x = next;
        }
        root
    }

    /// Union by size; the surviving root keeps the merged (capped) account list.
    fn union(&mut self, a: u32, b: u32) {
        let (ra, rb) = (self.find_compress(a), self.find_compress(b));
        if ra == rb {
            return;
        }
        let (big, small) = if self.size[ra as usize] >= self.size[rb as usize] {
            (ra, rb)
        } else {
            (rb, ra)
        };
        self.parent[small as usize] = big;
        self.size[big as usize] += self.size[small as usize];
        let moved = std::mem::take(&mut self.members[small as usize]);
        let kept = &mut self.members[big as usize];
        for acc in moved {
            if kept.len() >= self.min_accounts {
                break;
            }
            if !kept.contains(&acc) {
                kept.push(acc);
            }
        }
    }

    fn is_shared(&self, node: u32) -> bool {
        self.members[self.find(node) as usize].len() >= self.min_accounts
    }

    /// At least half of the account's prompts so far are in shared groups.
    fn flagged_now(&self, account: usize) -> bool {
        let prompts = &self.account_prompts[account];
        let shared = prompts.iter().filter(|&&p| self.is_shared(p)).count();
        !prompts.is_empty() && 2 * shared >= prompts.len()
    }

    fn outcomes(&self, labels: &HashMap<String, String>) -> Vec<AccountOutcome> {
        (0..self.account_ids.len())
            .map(|a| AccountOutcome {
                account_id: self.account_ids[a].clone(),
                label: labels
                    .get(&self.account_ids[a])
                    .cloned()
                    .unwrap_or_else(|| UNLABELLED.to_string()),
                flagged: self.flagged_now(a),
                first_flag_prompt: self.first_flag[a],
            })
            .collect()
    }
}

/// Lower-cases and collapses whitespace: the text identity used by [`ExactHashBaseline`].
pub fn normalise_whitespace(text: &str) -> String {
    text.split_whitespace()
        .map(str::to_lowercase)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Exact text hashing: a group is one whitespace-normalised, lower-cased text (xxh3).
#[derive(Debug)]
pub struct ExactHashBaseline {
    groups: SharedGroups,
}

impl ExactHashBaseline {
    /// A baseline where a text is shared once `min_accounts` distinct accounts sent it.
    pub fn new(min_accounts: usize) -> Self {
        Self {
            groups: SharedGroups::new(min_accounts),
        }
    }

    /// Records one prompt of `account`.
    pub fn observe(&mut self, account: &str, text: &str) {
        let key = xxh3_64(normalise_whitespace(text).as_bytes());
        self.groups.observe(account, [key]);
    }

    /// Every account seen, in first-seen order, with its verdicts and label.
    pub fn outcomes(&self, labels: &HashMap<String, String>) -> Vec<AccountOutcome> {
        self.groups.outcomes(labels)
    }
}

impl Baseline for ExactHashBaseline {
    fn name(&self) -> &'static str {
        "exact-hash"
    }
    fn observe(&mut self, account: &str, text: &str) {
        ExactHashBaseline::observe(self, account, text);
    }
    fn outcomes(&self, labels: &HashMap<String, String>) -> Vec<AccountOutcome> {
        ExactHashBaseline::outcomes(self, labels)
    }
}

/// Lower-cased tokens with everything but letters and digits removed; empty tokens dropped.
pub fn tokens(text: &str) -> Vec<String> {
    text.split_whitespace()
        .map(|t| {
            t.chars()
                .filter(|c| c.is_alphanumeric())
                .flat_map(char::to_lowercase)
                .collect::<String>()
        })
        .filter(|t| !t.is_empty())
        .collect()
}

/// Hashes of the word 3-shingles of `text`; texts with fewer than 3 tokens use the tokens
/// themselves, and texts without any token use their trimmed, lower-cased whole.
fn shingle_hashes(text: &str) -> Vec<u64> {
    let toks = tokens(text);
    if toks.len() >= 3 {
        toks.windows(3)
            .map(|w| xxh3_64(w.join(" ").as_bytes()))
            .collect()
    } else if !toks.is_empty() {
        toks.iter().map(|t| xxh3_64(t.as_bytes())).collect()
    } else {
        vec![xxh3_64(text.trim().to_lowercase().as_bytes())]
    }
}

/// The MinHash signature: per seeded hash function, the minimum over the shingles.
pub fn minhash_signature(text: &str) -> [u64; HASHES] {
    let mut sig = [u64::MAX; HASHES];
    for base in shingle_hashes(text) {
        let bytes = base.to_le_bytes();
        for (i, slot) in sig.iter_mut().enumerate() {
            // Seeded xxh3 of the shingle hash: one independent-looking hash function per index.
            let h = xxh3_64_with_seed(&bytes, 0x9E37_79B9_7F4A_7C15 ^ (i as u64 + 1));
            *slot = (*slot).min(h);
        }
    }
    sig
}

/// One key per LSH band (band index mixed in, so equal rows in different bands do not collide).
fn band_keys(sig: &[u64; HASHES]) -> [u64; BANDS] {
    let mut keys = [0u64; BANDS];
    for (b, key) in keys.iter_mut().enumerate() {
        let mut bytes = [0u8; ROWS * 8];
        for (r, v) in sig[b * ROWS..(b + 1) * ROWS].iter().enumerate() {
            bytes[r * 8..(r + 1) * 8].copy_from_slice(&v.to_le_bytes());
        }
        *key = xxh3_64_with_seed(&bytes, b as u64);
    }
    keys
}

/// MinHash-LSH on word 3-shingles (64 hashes, 16 bands × 4 rows): prompts that agree on any band
/// are linked, links are unioned into clusters, and clusters are shared by the same rule.
#[derive(Debug)]
pub struct MinHashLshBaseline {
    groups: SharedGroups,
}

impl MinHashLshBaseline {
    /// A baseline where a cluster is shared once `min_accounts` distinct accounts sent into it.
    pub fn new(min_accounts: usize) -> Self {
        Self {
            groups: SharedGroups::new(min_accounts),
        }
    }

    /// Records one prompt of `account`.
    pub fn observe(&mut self, account: &str, text: &str) {
        let keys = band_keys(&minhash_signature(text));
        self.groups.observe(account, keys);
    }

    /// Every account seen, in first-seen order, with its verdicts and label.
    pub fn outcomes(&self, labels: &HashMap<String, String>) -> Vec<AccountOutcome> {
        self.groups.outcomes(labels)
    }
}

impl Baseline for MinHashLshBaseline {
    fn name(&self) -> &'static str {
        "minhash-lsh"
    }
    fn observe(&mut self, account: &str, text: &str) {
        MinHashLshBaseline::observe(self, account, text);
    }
    fn outcomes(&self, labels: &HashMap<String, String>) -> Vec<AccountOutcome> {
        MinHashLshBaseline::outcomes(self, labels)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(a, l)| (a.to_string(), l.to_string()))
            .collect()
    }

    fn by_id(outcomes: &[AccountOutcome], id: &str) -> AccountOutcome {
        outcomes
            .iter()
            .find(|o| o.account_id == id)
            .cloned()
            .expect("account present")
    }

    #[test]
    fn verbatim_shared_prompt_flags_accounts_in_exact_hash() {
        let mut b = ExactHashBaseline::new(5);
        for i in 0..5 {
            // case and whitespace differences are normalised away
            let text = if i % 2 == 0 {
                "Tell me a joke"
            } else {
                "  tell ME   a joke "
            };
            b.observe(&format!("u{i}"), text);
        }
        b.observe("u0", "something else entirely");
        b.observe("u9", "tell me a joke");
        b.observe("u9", "what is a monad");
        b.observe("u9", "explain borrow checking");
        let out = b.outcomes(&HashMap::new());
        assert_eq!(out.len(), 6);
        // u0..u3 sent before the text was shared: flagged only at the end, not online.
        assert_eq!(by_id(&out, "u1").first_flag_prompt, None);
        assert!(by_id(&out, "u1").flagged);
        // u4 made it shared with its own (only) prompt.
        assert_eq!(by_id(&out, "u4").first_flag_prompt, Some(1));
        // u0: 1 of 2 prompts shared = 50% → flagged at the end.
        assert!(by_id(&out, "u0").flagged);
        // u9: flagged online at its first prompt, but 1 of 3 at the end.
        let u9 = by_id(&out, "u9");
        assert_eq!((u9.flagged, u9.first_flag_prompt), (false, Some(1)));
        assert_eq!(u9.label, UNLABELLED);
    }

    #[test]
    fn near_duplicates_collide_in_minhash_but_not_in_exact_hash() {
        let template = "Please solve the following problem step by step and explain your reasoning in \
                        detail before you give the final answer to the question about";
        let slots = [
            "apples",
            "trains",
            "rectangles",
            "interest",
            "clocks",
            "marbles",
        ];
        let mut exact = ExactHashBaseline::new(5);
        let mut lsh = MinHashLshBaseline::new(5);
        for (i, slot) in slots.iter().enumerate() {
            let text = format!("{template} {slot}");
            exact.observe(&format!("a{i}"), &text);
            lsh.observe(&format!("a{i}"), &text);
        }
        let l = labels(&[
            ("a0", "camp"),
            ("a1", "camp"),
            ("a2", "camp"),
            ("a3", "camp"),
            ("a4", "camp"),
        ]);
        assert!(exact.outcomes(&l).iter().all(|o| !o.flagged));
        let out = lsh.outcomes(&l);
        assert!(out.iter().all(|o| o.flagged), "{out:?}");
        assert_eq!(by_id(&out, "a4").first_flag_prompt, Some(1));
        assert_eq!(by_id(&out, "a0").label, "camp");
    }

    #[test]
    fn single_account_batch_job_is_never_flagged() {
        let mut exact = ExactHashBaseline::new(5);
        let mut lsh = MinHashLshBaseline::new(5);
        for i in 0..300 {
            let text = format!("Classify the sentiment of this review: item {i} was fine");
            exact.observe("batch", &text);
            lsh.observe("batch", &text);
            exact.observe("batch", "Classify the sentiment of this review: same");
            lsh.observe("batch", "Classify the sentiment of this review: same");
        }
        for out in [
            exact.outcomes(&HashMap::new()),
            lsh.outcomes(&HashMap::new()),
        ] {
            assert_eq!(out.len(), 1);
            assert!(!out[0].flagged);
            assert_eq!(out[0].first_flag_prompt, None);
        }
    }

    #[test]
    fn minority_of_shared_prompts_does_not_flag() {
        let mut lsh = MinHashLshBaseline::new(3);
        lsh.observe("u1", "hi!");
        lsh.observe("u2", "Hi");
        lsh.observe(
            "u0",
            "How do I reverse a linked list in Rust without cloning nodes?",
        );
        lsh.observe(
            "u0",
            "Recommend three novels about the sea for a long flight",
        );
        lsh.observe("u0", "hi");
        let out = lsh.outcomes(&HashMap::new());
        // u0: 1 of 3 prompts in a shared cluster, at every step
        let u0 = by_id(&out, "u0");
        assert_eq!((u0.flagged, u0.first_flag_prompt), (false, None));
        assert!(by_id(&out, "u1").flagged);
    }

    #[test]
    fn tokens_and_short_texts() {
        assert_eq!(tokens("Hello, World!  it's"), vec!["hello", "world", "its"]);
        assert_eq!(minhash_signature("HI!"), minhash_signature("hi"));
        assert_ne!(minhash_signature("???"), minhash_signature("!!!"));
        assert_eq!(normalise_whitespace("  A\tb\n C "), "a b c");
    }
}
