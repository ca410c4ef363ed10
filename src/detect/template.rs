//! Template recovery for analysts: aligns member prompts token by token (longest common
//! subsequence) and keeps the words every sample shares; the gaps become `<*>` slots.
//! "Solve step by step: 2+2" and "Solve step by step: what is 7*6" give "Solve step by step: <*>".

use super::keys;

/// The template shared by `samples`, with `<*>` for each run of differing tokens.
/// One sample gives itself back; no samples give an empty string. Words are split as
/// [`keys::words`] splits them (each CJK character a word), and written back with a space
/// before those that had one in the first sample, so a Chinese template reads without spaces.
pub fn extract(samples: &[&str]) -> String {
    let mut iter = samples.iter();
    let Some(first) = iter.next() else {
        return String::new();
    };
    // Long prompts are aligned on their first words: enough for a template, cheap for LCS. A
    // template cut there ends in a slot (the rest is not compared), so that an allow-list entry
    // made of it matches prompts that go on past it. A CJK character is a word: 500 words are a
    // long paragraph of Chinese.
    // One word past the aligned ones says whether a sample was cut (and how the first sample's
    // rest was spaced).
    let mut template: Vec<Word> = keys::words(first)
        .take(ALIGNED_WORDS + 1)
        .map(|(w, spaced)| (Some(w), spaced))
        .collect();
    let mut cut = if template.len() > ALIGNED_WORDS {
        template.pop().map(|(_, spaced)| spaced)
    } else {
        None
    };
    for s in iter {
        let mut other: Vec<&str> = keys::words(s)
            .take(ALIGNED_WORDS + 1)
            .map(|(w, _)| w)
            .collect();
        if other.len() > ALIGNED_WORDS {
            other.pop();
            cut.get_or_insert(true);
        }
        template = merge(&template, &other);
    }
    if let Some(spaced) = cut {
        template.push((None, spaced));
    }
    let mut out = String::new();
    let mut slot_last = false;
    for (w, spaced) in template {
        if w.is_none() && slot_last {
            continue;
        }
        slot_last = w.is_none();
        if spaced && !out.is_empty() {
            out.push(' ');
        }
        out.push_str(w.unwrap_or("<*>"));
    }
    out
}

/// Words of each sample aligned (the LCS of two samples costs their product).
const ALIGNED_WORDS: usize = 500;

/// A template word (`None`: a slot) and whether a space goes before it.
type Word<'a> = (Option<&'a str>, bool);

/// Aligns a template with a new word sequence; words off the LCS become slots, spaced as the
/// first template word they stand for.
fn merge<'a>(template: &[Word<'a>], other: &[&str]) -> Vec<Word<'a>> {
    let (n, m) = (template.len(), other.len());
    let fixed = |i: usize, j: usize| template[i].0.is_some() && template[i].0 == Some(other[j]);
    // lcs[i][j] = LCS length of template[i..] and other[j..], flattened.
    let mut lcs = vec![0u16; (n + 1) * (m + 1)];
    let at = |i: usize, j: usize| i * (m + 1) + j;
    for i in (0..n).rev() {
        for j in (0..m).rev() {
            lcs[at(i, j)] = if fixed(i, j) {
                lcs[at(i + 1, j + 1)] + 1
            } else {
                lcs[at(i + 1, j)].max(lcs[at(i, j + 1)])
            };
        }
    }
    let (mut i, mut j) = (0, 0);
    let mut out = Vec::with_capacity(n);
    // The spacing of the slot being opened, while words are skipped.
    let mut gap: Option<bool> = None;
    let spaced_at = |i: usize| template.get(i).is_none_or(|w| w.1);
    while i < n && j < m {
        if fixed(i, j) {
            if let Some(spaced) = gap.take() {
                out.push((None, spaced));
            }
            out.push(template[i]);
            i += 1;
            j += 1;
        } else {
            gap.get_or_insert(spaced_at(i));
            if lcs[at(i + 1, j)] >= lcs[at(i, j + 1)] {
                i += 1;
            } else {
                j += 1;
            }
        }
    }
    if gap.is_some() || i < n || j < m {
        out.push((None, gap.unwrap_or(spaced_at(i))));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::{ALIGNED_WORDS, extract};

    #[test]
    fn slots_become_wildcards() {
        let t = extract(&[
            "Write a Python function that reverses a linked list. Include unit tests.",
            "Write a Python function that merges two sorted arrays. Include unit tests.",
            "Write a Python function that parses ISO dates. Include unit tests.",
        ]);
        assert_eq!(t, "Write a Python function that <*> Include unit tests.");
    }

    #[test]
    fn leading_and_trailing_slots() {
        assert_eq!(
            extract(&["Q1: explain step by step", "Q2: explain step by step"]),
            "<*> explain step by step"
        );
        assert_eq!(
            extract(&["translate to French: cat", "translate to French: dog house"]),
            "translate to French: <*>"
        );
    }

    #[test]
    fn chinese_templates_are_aligned_by_character_and_written_without_spaces() {
        let t = extract(&[
            "请把下面这段话翻译成英文：今天天气很好。",
            "请把下面这段话翻译成英文：我喜欢在周末读书。",
            "请把下面这段话翻译成英文：这家餐厅的菜很好吃。",
        ]);
        assert_eq!(t, "请把下面这段话翻译成英文：<*>。");
        // Words in other scripts keep their spaces, and sit against CJK ones as they were.
        let t = extract(&[
            "用 Python 写一个函数，实现快速排序。",
            "用 Python 写一个函数，计算斐波那契数列。",
        ]);
        assert_eq!(t, "用 Python 写一个函数，<*>。");
        let t = extract(&[
            "次の文を要約してください：猫が好き",
            "次の文を要約してください：犬",
        ]);
        assert_eq!(t, "次の文を要約してください：<*>");
        // Full-width punctuation is a word of its own: a slot that sometimes ends in "？" keeps
        // the fixed emoji after it.
        let t = extract(&[
            "🔥请帮我写一条朋友圈文案🔥主题：周末去爬山？😀😀",
            "🔥请帮我写一条朋友圈文案🔥主题：新买的咖啡机😀😀",
            "🔥请帮我写一条朋友圈文案🔥主题：猫咪生日？😀😀",
        ]);
        assert_eq!(t, "🔥请帮我写一条朋友圈文案🔥主题：<*>😀😀");
    }

    #[test]
    fn a_template_cut_at_the_aligned_words_ends_in_a_slot() {
        let head: String = "请".repeat(ALIGNED_WORDS - 2);
        let (a, b) = (
            format!("{head}翻译：猫。谢谢"),
            format!("{head}翻译：狗。谢谢"),
        );
        // The slot is within the aligned words; what follows is cut, and says so.
        assert_eq!(extract(&[&a, &b]), format!("{head}翻译<*>"));
        let short = extract(&["Translate this: cat. Thanks", "Translate this: dog. Thanks"]);
        assert_eq!(short, "Translate this: <*> Thanks");
    }

    #[test]
    fn edge_cases() {
        assert_eq!(extract(&[]), "");
        assert_eq!(extract(&["just one"]), "just one");
        assert_eq!(extract(&["a b", "c d"]), "<*>");
        assert_eq!(extract(&["", "x"]), "<*>");
    }
}
