//! BERT tokenisation without the general machinery: an ASCII text is cleaned, lower-cased, split
//! at spaces and punctuation and cut into WordPiece tokens in one pass over its bytes, stopping
//! once the model's token limit is reached. The same ids as the `tokenizers` crate with a
//! `BertNormalizer` + `BertPreTokenizer` + `WordPiece` + `[CLS] $A [SEP]` tokenizer.json, at a
//! fraction of the cost: that crate tracks every character's offsets through each step (~0.5 µs
//! a character, measured on dev-2c), and on a GPU node tokenisation, not the model, bounds how
//! many prompts a second get embedded.
//!
//! Only texts it can tokenise exactly take this path: ASCII (where normalisation is removing
//! control characters, turning tab and line breaks into spaces and lower-casing, with no accents,
//! Chinese characters or Unicode punctuation to handle), and without the content of an added
//! token such as `[MASK]`, which the full tokenizer matches before normalising. Everything else
//! is left to the full tokenizer. [`FastWordPiece::from_tokenizer`] accepts only a tokenizer whose
//! configuration is the one above, and checks itself against it on probe texts.

use std::collections::HashMap;

use tokenizers::Tokenizer;

/// The WordPiece vocabulary and limits of a BERT tokenizer, for ASCII texts.
pub struct FastWordPiece {
    /// Word-initial pieces.
    initial: HashMap<Box<str>, u32>,
    /// Continuation pieces, without their `##` prefix.
    continuing: HashMap<Box<str>, u32>,
    unk: u32,
    cls: u32,
    sep: u32,
    /// Words longer than this (in characters) are one unknown token.
    max_word_chars: usize,
    /// Tokens of a text between `[CLS]` and `[SEP]`, after truncation.
    max_body: usize,
    /// Added tokens' contents, lower-cased: a text holding one (in any case) is left to the full
    /// tokenizer.
    added: Vec<Vec<u8>>,
}

/// Texts the constructor compares with the full tokenizer before trusting itself.
const PROBES: &[&str] = &[
    "",
    "a",
    "Hello, World!",
    "  Tabs\tand\nnew\r\nlines  ",
    "unaffable supercalifragilisticexpialidocious xyzzyq",
    "C++ & Rust: fn main() { println!(\"{}\", 1_000); } // ok?",
    "control\u{1}chars\u{7f}and\u{b}vt\u{c}ff",
    "[mask] [CLS] x",
];

impl FastWordPiece {
    /// The fast path for `tokenizer`, truncating at `max_tokens` (special tokens included), or
    /// why it does not apply: a tokenizer that is not plain lower-casing BERT WordPiece, or one
    /// that disagrees with it on the probe texts.
    pub fn from_tokenizer(tokenizer: &Tokenizer, max_tokens: usize) -> Result<Self, String> {
        let json: serde_json::Value = serde_json::from_str(
            &tokenizer
                .to_string(false)
                .map_err(|e| format!("serialise: {e}"))?,
        )
        .map_err(|e| format!("parse: {e}"))?;
        let norm = &json["normalizer"];
        let bert_norm = norm["type"] == "BertNormalizer"
            && norm["clean_text"] == true
            && norm["lowercase"] == true
            && (norm["strip_accents"].is_null() || norm["strip_accents"] == true);
        if !bert_norm {
            return Err(format!(
                "normalizer {norm} is not a lower-casing BertNormalizer"
            ));
        }
        if json["pre_tokenizer"]["type"] != "BertPreTokenizer" {
            return Err(format!(
                "pre-tokenizer {} is not BertPreTokenizer",
                json["pre_tokenizer"]
            ));
        }
        let model = &json["model"];
        if model["type"] != "WordPiece" {
            return Err(format!("model {} is not WordPiece", model["type"]));
        }
        let prefix = model["continuing_subword_prefix"].as_str().unwrap_or("##");
        let max_word_chars = model["max_input_chars_per_word"]
            .as_u64()
            .ok_or("WordPiece without max_input_chars_per_word")?
            as usize;
        let unk_token = model["unk_token"]
            .as_str()
            .ok_or("WordPiece without unk_token")?;
        let vocab = model["vocab"]
            .as_object()
            .ok_or("WordPiece without vocab")?;
        let (mut initial, mut continuing) = (HashMap::new(), HashMap::new());
        for (piece, id) in vocab {
            let id = id.as_u64().ok_or("a vocabulary id is not a number")? as u32;
            match piece.strip_prefix(prefix) {
                Some(rest) if !prefix.is_empty() => continuing.insert(rest.into(), id),
                _ => initial.insert(piece.as_str().into(), id),
            };
        }
        let unk = *initial
            .get(unk_token)
            .ok_or("the unknown token is not in the vocabulary")?;
        let added = tokenizer
            .get_added_tokens_decoder()
            .values()
            .map(|t| t.content.to_ascii_lowercase().into_bytes())
            .filter(|c| !c.is_empty())
            .collect();
        // The post-processor must wrap a text in exactly one token on each side.
        let special = |text: &str| -> Result<Vec<u32>, String> {
            Ok(tokenizer
                .encode(text, true)
                .map_err(|e| format!("probe {text:?}: {e}"))?
                .get_ids()
                .to_vec())
        };
        let (empty, one) = (special("")?, special("a")?);
        let a = *initial.get("a").ok_or("no 'a' in the vocabulary")?;
        if empty.len() != 2 || one != [empty[0], a, empty[1]] {
            return Err(format!(
                "post-processing is not [CLS] $A [SEP] ({empty:?}, {one:?})"
            ));
        }
        let fast = Self {
            initial,
            continuing,
            unk,
            cls: empty[0],
            sep: empty[1],
            max_word_chars,
            max_body: max_tokens.saturating_sub(2),
            added,
        };
        for probe in PROBES {
            let want = special(probe)?;
            if let Some(got) = fast.ids(probe)
                && got != want
            {
                return Err(format!("probe {probe:?}: {got:?} != {want:?}"));
            }
        }
        Ok(fast)
    }

    /// The ids of `text` (`[CLS]`, at most the truncation limit of tokens, `[SEP]`), or `None`
    /// when the text is not for this path (see the module docs).
    pub fn ids(&self, text: &str) -> Option<Vec<u32>> {
        let bytes = text.as_bytes();
        if !text.is_ascii() || self.holds_added_token(bytes) {
            return None;
        }
        let mut ids = Vec::with_capacity((bytes.len() / 4).min(self.max_body) + 2);
        ids.push(self.cls);
        let mut word: Vec<u8> = Vec::with_capacity(32);
        for &b in bytes {
            if ids.len() > self.max_body {
                break;
            }
            match b {
                b' ' | b'\t' | b'\n' | b'\r' => self.piece(&mut word, &mut ids),
                // Other control characters are removed (after them a word goes on).
                0..=0x1f | 0x7f => {}
                _ if b.is_ascii_punctuation() => {
                    self.piece(&mut word, &mut ids);
                    word.push(b);
                    self.piece(&mut word, &mut ids);
                }
                _ => word.push(b.to_ascii_lowercase()),
            }
        }
        self.piece(&mut word, &mut ids);
        ids.truncate(self.max_body + 1);
        ids.push(self.sep);
        Some(ids)
    }

    /// Whether `text` holds an added token's content, in any case.
    fn holds_added_token(&self, text: &[u8]) -> bool {
        self.added.iter().any(|token| {
            text.windows(token.len())
                .any(|w| w.eq_ignore_ascii_case(token))
        })
    }

    /// Appends the WordPiece ids of the lower-cased ASCII `word` (greedy longest match first;
    /// one unknown token for a word too long or with a part no piece matches), then clears it.
    fn piece(&self, word: &mut Vec<u8>, ids: &mut Vec<u32>) {
        if word.is_empty() {
            return;
        }
        // ASCII: one byte per character, and every slice is a str.
        let text = std::str::from_utf8(word).unwrap_or_default();
        if text.len() > self.max_word_chars {
            ids.push(self.unk);
            word.clear();
            return;
        }
        let first = ids.len();
        let mut start = 0;
        while start < text.len() {
            let vocab = if start == 0 {
                &self.initial
            } else {
                &self.continuing
            };
            let found = (start + 1..=text.len())
                .rev()
                .find_map(|end| vocab.get(&text[start..end]).map(|&id| (end, id)));
            match found {
                Some((end, id)) => {
                    ids.push(id);
                    start = end;
                }
                None => {
                    ids.truncate(first);
                    ids.push(self.unk);
                    break;
                }
            }
        }
        word.clear();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn tokenizer() -> Tokenizer {
        let dir = std::env::var_os("PROMPT_RADAR_MODEL")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| {
                std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/all-MiniLM-L6-v2")
            });
        super::super::candle_bert::full_tokenizer(&dir.join("tokenizer.json"))
            .expect("tokenizer.json")
    }

    /// Every ASCII text of the project's corpora (and variants of each with control characters,
    /// tabs and upper case), plus long texts cut at the token limit, gets exactly the full
    /// tokenizer's ids.
    #[test]
    fn ascii_texts_get_the_full_tokenizers_ids() {
        let full = tokenizer();
        let fast = FastWordPiece::from_tokenizer(&full, super::super::candle_bert::MAX_TOKENS)
            .expect("a BERT tokenizer");
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let body = std::fs::read_to_string(root.join("tests/data/recall_prompts.txt"))
            .expect("tests/data/recall_prompts.txt");
        let mut texts: Vec<String> = body.lines().map(str::to_owned).collect();
        // The corpora of eval/data that are not compressed: whole prompts, line breaks and all.
        for kind in ["organic", "harvest"] {
            let dir = std::fs::read_dir(root.join("eval/data").join(kind)).expect("eval/data");
            for entry in dir {
                let path = entry.expect("entry").path();
                if path.extension().is_none_or(|e| e != "jsonl") {
                    continue;
                }
                let body = std::fs::read_to_string(&path).expect("corpus");
                for line in body.lines() {
                    let Ok(record) = serde_json::from_str::<serde_json::Value>(line) else {
                        continue;
                    };
                    let field = |name: &str| record[name].as_str().unwrap_or_default().to_owned();
                    let text = [field("text"), field("prompt"), field("input")].join("\n\n");
                    texts.push(text);
                }
            }
        }
        assert!(texts.len() > 25_000, "corpora found: {}", texts.len());
        let long = texts
            .iter()
            .filter(|t| t.len() > 300)
            .take(50)
            .cloned()
            .collect::<Vec<_>>();
        texts.push(long.join(" "));
        texts.push("word ".repeat(400));
        texts.push("x".repeat(101));
        texts.push("x".repeat(100));
        texts.push("a\u{0}b\u{1f}c\u{7f}d\u{b}e\u{c}f g".into());
        texts.push("[MASK] is [mask] or [Mask]".into());
        texts.push("[SEP".into());
        let variants: Vec<String> = texts
            .iter()
            .step_by(10)
            .map(|t| t.replace(' ', "\t").to_uppercase().replace('e', "e\u{1}"))
            .collect();
        texts.extend(variants);
        let (mut checked, mut fallbacks) = (0, 0);
        for text in &texts {
            let want = full.encode(text.as_str(), true).expect("encode");
            match fast.ids(text) {
                Some(got) => {
                    assert_eq!(got, want.get_ids(), "{text:?}");
                    checked += 1;
                }
                None => {
                    let special = ["[pad]", "[unk]", "[cls]", "[sep]", "[mask]"];
                    let lower = text.to_lowercase();
                    assert!(
                        !text.is_ascii() || special.iter().any(|s| lower.contains(s)),
                        "{text:?} left to the full tokenizer"
                    );
                    fallbacks += 1;
                }
            }
        }
        println!(
            "fast path: {checked} texts equal to the full tokenizer's, {fallbacks} left to it"
        );
        assert!(
            checked > texts.len() * 3 / 4,
            "{checked} of {}",
            texts.len()
        );
    }

    /// A tokenizer that is not BERT WordPiece is refused, not approximated.
    #[test]
    fn other_tokenizers_are_refused() {
        let mut t = tokenizer();
        t.with_normalizer(None::<tokenizers::NormalizerWrapper>)
            .expect("no normalizer");
        assert!(FastWordPiece::from_tokenizer(&t, super::super::candle_bert::MAX_TOKENS).is_err());
    }
}
