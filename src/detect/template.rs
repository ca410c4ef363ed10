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
    let mut draft = Draft::of(first, ALIGNED_WORDS);
    for s in iter {
        draft.absorb(Draft::of(s, ALIGNED_WORDS));
    }
    draft.written()
}

/// One template a campaign's prompts follow: its fixed words with `<*>` slots, and how many of
/// the samples follow it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateGroup {
    /// Fixed words with `<*>` slots, written as [`extract`] writes them.
    pub template: String,
    /// Samples that follow it.
    pub samples: u32,
}

/// The templates among `samples`, most followed first (ties: the first seen first), and how many
/// samples follow none that another sample follows. A cluster can hold prompts of several
/// templates: one campaign that rotates templates, or campaigns that look-alike prompts chained
/// together. [`extract`] over all of them keeps only the words they all share (`<*> the <*>`).
///
/// Here samples are grouped bottom-up: each step joins the two groups whose joint template keeps
/// the most fixed words in runs of [`RUN_WORDS`] or more — at least [`GROUP_WORDS`], and half of
/// each group's own, so two templates that share a phrase stay two (the rewordings of one
/// instruction, say); one text (a prompt, or the same prompt sent again) has no template to
/// keep. Groups of one sample are not templates: they are counted, not
/// returned (a paraphrasing campaign's prompts share little wording; what they share, they are
/// listed by). Prompts are compared on their first and last [`GROUP_END_WORDS`] words (pairs of
/// samples cost the product of their lengths); each group's template is then [`extract`] of its
/// samples.
pub fn groups(samples: &[&str]) -> (Vec<TemplateGroup>, u32) {
    let mut drafts: Vec<Option<Group<'_>>> = samples
        .iter()
        .enumerate()
        .map(|(i, s)| {
            Some(Group {
                draft: Draft::ends(s),
                members: vec![i],
                one_text: true,
            })
        })
        .collect();
    // The joint template of each pair of groups that may join, and the run words it keeps.
    let mut pairs: std::collections::BTreeMap<(usize, usize), (usize, Vec<Word<'_>>)> =
        std::collections::BTreeMap::new();
    for i in 0..drafts.len() {
        for j in i + 1..drafts.len() {
            if let (Some(a), Some(b)) = (&drafts[i], &drafts[j])
                && let Some(p) = joint(a, b)
            {
                pairs.insert((i, j), p);
            }
        }
    }
    // The pair keeping the most words joins first (ties: the first pair).
    while let Some((&(i, j), _)) = pairs
        .iter()
        .max_by(|x, y| x.1.0.cmp(&y.1.0).then(y.0.cmp(x.0)))
    {
        let (_, merged) = pairs.remove(&(i, j)).unwrap_or_default();
        let gone = drafts[j].take();
        pairs.retain(|&(x, y), _| x != i && y != i && x != j && y != j);
        if let (Some(a), Some(b)) = (drafts[i].as_mut(), gone) {
            a.one_text = a.one_text && b.one_text && samples[a.members[0]] == samples[b.members[0]];
            a.draft.join(merged, b.draft);
            a.members.extend(b.members);
        }
        for k in 0..drafts.len() {
            let (lo, hi) = (i.min(k), i.max(k));
            if k == i {
                continue;
            }
            if let (Some(a), Some(b)) = (&drafts[lo], &drafts[hi])
                && let Some(p) = joint(a, b)
            {
                pairs.insert((lo, hi), p);
            }
        }
    }
    let mut drafts: Vec<Group<'_>> = drafts.into_iter().flatten().collect();
    let alone = drafts.iter().filter(|d| d.members.len() == 1).count() as u32;
    // A stable sort: ties keep the order of their first sample.
    drafts.sort_by_key(|d| std::cmp::Reverse(d.members.len()));
    let groups = drafts
        .into_iter()
        .filter(|d| d.members.len() > 1)
        .map(|d| {
            let members: Vec<&str> = d.members.iter().map(|&i| samples[i]).collect();
            TemplateGroup {
                samples: members.len() as u32,
                template: extract(&members),
            }
        })
        .collect();
    (groups, alone)
}

/// A group of samples being formed by [`groups`]: their joint template, which samples (by
/// index), and whether they are all one text (a prompt, or the same prompt sent again), which has
/// no template of its own yet to keep.
struct Group<'a> {
    draft: Draft<'a>,
    members: Vec<usize>,
    one_text: bool,
}

/// The joint template of groups `a` and `b` and the fixed words it keeps in runs (see
/// [`run_words`]), when they may be one group (see [`groups`]).
fn joint<'a>(a: &Group<'a>, b: &Group<'_>) -> Option<(usize, Vec<Word<'a>>)> {
    let other: Vec<Option<&str>> = b.draft.words.iter().map(|w| w.0).collect();
    // Too few words in common for a template: skip the alignment.
    if common_words(&a.draft.words, &other) < GROUP_WORDS {
        return None;
    }
    let merged = merge(&a.draft.words, &other);
    let kept = run_words(&merged);
    // Half of each group's template must stay: the sentence two rewordings share is not a
    // template of theirs. (Not more: a slot filled from a short list — a city, a topic — is
    // fixed within a group of prompts that drew the same value, and such groups are one
    // template; two templates that share half their words are listed as one.)
    let keeps_enough = |g: &Group<'_>| g.one_text || 2 * kept >= run_words(&g.draft.words);
    (kept >= GROUP_WORDS && keeps_enough(a) && keeps_enough(b)).then_some((kept, merged))
}

/// Words from each end of a sample that [`groups`] compares: a template's fixed wording sits at
/// its start, its end or both (an instruction after a long pasted slot).
pub const GROUP_END_WORDS: usize = 64;

/// Fixed words a template must keep, in runs of [`RUN_WORDS`] or more, for samples to be one
/// group: a sentence of a template, more than two prompts' slots share by chance.
pub const GROUP_WORDS: usize = 6;
/// Words in a row that count towards [`GROUP_WORDS`]: scattered common words ("the", "a") are
/// not a template.
pub const RUN_WORDS: usize = 3;

/// The fixed words of `template` in runs of [`RUN_WORDS`] or more.
fn run_words(template: &[Word<'_>]) -> usize {
    let mut total = 0;
    let mut run = 0;
    for w in template.iter().chain(std::iter::once(&(None, false))) {
        if w.0.is_some() {
            run += 1;
        } else {
            if run >= RUN_WORDS {
                total += run;
            }
            run = 0;
        }
    }
    total
}

/// An upper bound of the fixed words `template` and `other` can share (their common words,
/// counted with multiplicity): cheap, to skip alignments that cannot make a group.
fn common_words(template: &[Word<'_>], other: &[Option<&str>]) -> usize {
    let mut counts: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    for w in template.iter().filter_map(|w| w.0) {
        *counts.entry(w).or_default() += 1;
    }
    other
        .iter()
        .flatten()
        .filter(|w| {
            counts.get_mut(*w).is_some_and(|n| {
                let left = *n > 0;
                *n = n.saturating_sub(1);
                left
            })
        })
        .count()
}

/// A template being built: its words, and whether a sample was cut (and how the first sample's
/// rest was spaced).
struct Draft<'a> {
    words: Vec<Word<'a>>,
    cut: Option<bool>,
}

impl<'a> Draft<'a> {
    /// The template of one sample: its first `limit` words. Long prompts are aligned on their
    /// first words: enough for a template, cheap for LCS. A template cut there ends in a slot
    /// (the rest is not compared), so that an allow-list entry made of it matches prompts that
    /// go on past it. A CJK character is a word: 500 words are a long paragraph of Chinese.
    fn of(sample: &'a str, limit: usize) -> Self {
        // One word past the aligned ones says whether a sample was cut (and how the first
        // sample's rest was spaced).
        let mut words: Vec<Word<'a>> = keys::words(sample)
            .take(limit + 1)
            .map(|(w, spaced)| (Some(w), spaced))
            .collect();
        let cut = if words.len() > limit {
            words.pop().map(|(_, spaced)| spaced)
        } else {
            None
        };
        Self { words, cut }
    }

    /// A sample's first and last [`GROUP_END_WORDS`] words, a slot between them when it has
    /// more (see [`groups`]).
    fn ends(sample: &'a str) -> Self {
        let mut words: Vec<Word<'a>> = keys::words(sample)
            .map(|(w, spaced)| (Some(w), spaced))
            .collect();
        if words.len() > 2 * GROUP_END_WORDS {
            let tail = words.split_off(words.len() - GROUP_END_WORDS);
            words.truncate(GROUP_END_WORDS);
            words.push((None, true));
            words.extend(tail);
        }
        Self { words, cut: None }
    }

    /// Takes in another sample's (or group's) template.
    fn absorb(&mut self, other: Draft<'_>) {
        let words: Vec<Option<&str>> = other.words.iter().map(|w| w.0).collect();
        let merged = merge(&self.words, &words);
        self.join(merged, other);
    }

    /// Takes in `other`, `merged` being [`merge`] of the two templates' words.
    fn join(&mut self, merged: Vec<Word<'a>>, other: Draft<'_>) {
        self.words = merged;
        if other.cut.is_some() {
            self.cut.get_or_insert(true);
        }
    }

    /// The template as text: slots as `<*>` (one for a run of them), spaced as the first sample.
    fn written(mut self) -> String {
        if let Some(spaced) = self.cut {
            self.words.push((None, spaced));
        }
        let mut out = String::new();
        let mut slot_last = false;
        for (w, spaced) in self.words {
            if w.is_none() && slot_last {
                continue;
            }
            // A word that began its sample has no space before it; after a slot (another sample
            // had words before it) it reads as a word of its own, unless it is CJK or
            // punctuation, which are written against what precedes them.
            let apart = slot_last
                && w.and_then(|w| w.chars().next())
                    .is_some_and(|c| c.is_alphanumeric() && !keys::is_cjk(c));
            slot_last = w.is_none();
            if (spaced || apart) && !out.is_empty() {
                out.push(' ');
            }
            out.push_str(w.unwrap_or("<*>"));
        }
        out
    }
}

/// Words of each sample aligned (the LCS of two samples costs their product).
const ALIGNED_WORDS: usize = 500;

/// A template word (`None`: a slot) and whether a space goes before it.
type Word<'a> = (Option<&'a str>, bool);

/// Aligns a template with a new word sequence; words off the LCS become slots, spaced as the
/// first template word they stand for.
fn merge<'a>(template: &[Word<'a>], other: &[Option<&str>]) -> Vec<Word<'a>> {
    let (n, m) = (template.len(), other.len());
    let fixed = |i: usize, j: usize| template[i].0.is_some() && template[i].0 == other[j];
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
    use super::{ALIGNED_WORDS, TemplateGroup, extract, groups};

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
    fn a_cluster_of_two_templates_shows_both() {
        let samples = [
            "Below is an instruction that describes a task. Write a response that appropriately completes the request. ### Instruction: Name three fruits. ### Response:",
            "Hi! Write a Python function for the task below. Include type hints and three pytest unit tests. Task: reverse a list. Thanks!",
            "Below is an instruction that describes a task. Write a response that appropriately completes the request. ### Instruction: Give the capital of France. ### Response:",
            "How do I sleep better when the neighbours are loud at night?",
            "Write a Python function for the task below. Include type hints and three pytest unit tests. Task: parse ISO dates. -- Sam",
            "Below is an instruction that describes a task. Write a response that appropriately completes the request. ### Instruction: Summarise the plot of Hamlet. ### Response:",
        ];
        // Over all of them, only scattered words survive.
        let all = extract(&samples);
        assert!(
            all.split("<*>")
                .all(|part| part.split_whitespace().count() < 2),
            "{all}"
        );
        let (groups, alone) = groups(&samples);
        assert_eq!(
            groups,
            vec![
                TemplateGroup {
                    template: "Below is an instruction that describes a task. Write a response that appropriately completes the request. ### Instruction: <*> ### Response:".into(),
                    samples: 3,
                },
                TemplateGroup {
                    template: "<*> Write a Python function for the task below. Include type hints and three pytest unit tests. Task: <*>".into(),
                    samples: 2,
                },
            ]
        );
        assert_eq!(alone, 1, "the organic question follows no template");
    }

    #[test]
    fn prompts_sharing_only_common_words_are_no_template() {
        // Reworded prompts: the same question type, no sentence in common.
        let samples = [
            "Quick one for you: what is the sum of the first ten odd numbers? Walk me through it.",
            "I'm stuck on this: a train leaves at noon at 60 mph, when is it 90 miles out? Explain please.",
            "Could use some help. How many legs do five spiders have in total? Show the steps.",
        ];
        assert_eq!(groups(&samples), (vec![], 3));
        // One template throughout: one group, the template over all of them.
        let one = [
            "Translate to French, keeping the tone: the cat sleeps",
            "Translate to French, keeping the tone: we are late again",
            "Translate to French, keeping the tone: good morning",
        ];
        assert_eq!(
            groups(&one),
            (
                vec![TemplateGroup {
                    template: extract(&one),
                    samples: 3
                }],
                0
            )
        );
        assert_eq!(groups(&[]), (vec![], 0));
    }

    #[test]
    fn templates_that_share_one_sentence_stay_two() {
        // Two rewordings of one instruction: the same opening sentence (six words, enough for a
        // template of two prompts), then different words. Each is its own template.
        let samples = [
            "Please answer the question below carefully. Use at most two sentences and cite a source for every claim you make. Question: why is the sky blue",
            "Please answer the question below carefully. Then tell me a joke about it in the style of a pirate captain on a long voyage. Question: why do cats purr",
            "Please answer the question below carefully. Use at most two sentences and cite a source for every claim you make. Question: how do tides work",
            "Please answer the question below carefully. Then tell me a joke about it in the style of a pirate captain on a long voyage. Question: what is rust",
            "Please answer the question below carefully. Can you recommend a good novel?",
        ];
        let (groups, alone) = groups(&samples);
        let found: Vec<(&str, u32)> = groups
            .iter()
            .map(|g| (g.template.as_str(), g.samples))
            .collect();
        assert_eq!(
            found,
            vec![
                (
                    "Please answer the question below carefully. Use at most two sentences and cite a source for every claim you make. Question: <*>",
                    2
                ),
                (
                    "Please answer the question below carefully. Then tell me a joke about it in the style of a pirate captain on a long voyage. Question: <*>",
                    2
                ),
            ]
        );
        assert_eq!(alone, 1, "the opener alone is no template of the groups");
    }

    #[test]
    fn a_prompt_sent_twice_follows_the_template_not_a_template_of_its_own() {
        let t =
            "Act as a strict grader. Solve this and output only the final number, nothing else:";
        let questions = [
            "What is 7 times 8?",
            "How many legs do 3 spiders have?",
            "What is 2 + 2?",
        ];
        // Each question twice: a repeated pair shares every word, more than the template.
        let samples: Vec<String> = questions
            .iter()
            .flat_map(|q| [format!("{t} {q}"), format!("{t} {q}")])
            .collect();
        let refs: Vec<&str> = samples.iter().map(String::as_str).collect();
        assert_eq!(
            groups(&refs),
            (
                vec![TemplateGroup {
                    template: format!("{t} <*>"),
                    samples: 6
                }],
                0
            )
        );
    }

    #[test]
    fn long_prompts_are_compared_at_both_ends() {
        // One opening, a long pasted slot, and two different closing instructions.
        let code = |i: usize| {
            (0..150)
                .map(|w| format!("tok{}_{}", i, w))
                .collect::<Vec<_>>()
                .join(" ")
        };
        let open = "Below is a module from our repository. Read it carefully before answering.";
        let samples: Vec<String> = (0..6)
            .map(|i| {
                let close = if i % 2 == 0 {
                    "Now translate the whole module to idiomatic Rust and explain every change you made."
                } else {
                    "Now audit the module for security problems and rank each finding by its severity."
                };
                format!("{open} {} {close}", code(i))
            })
            .collect();
        let refs: Vec<&str> = samples.iter().map(String::as_str).collect();
        let (groups, alone) = groups(&refs);
        assert_eq!(alone, 0);
        let mut found: Vec<(String, u32)> = groups
            .into_iter()
            .map(|g| (g.template, g.samples))
            .collect();
        found.sort();
        assert_eq!(
            found,
            vec![
                (
                    format!(
                        "{open} <*> Now audit the module for security problems and rank each finding by its severity."
                    ),
                    3
                ),
                (
                    format!(
                        "{open} <*> Now translate the whole module to idiomatic Rust and explain every change you made."
                    ),
                    3
                ),
            ]
        );
    }

    #[test]
    fn a_slot_before_a_words_that_began_its_sample_is_spaced() {
        // The first sample begins with the template; the second has a greeting first.
        assert_eq!(
            extract(&[
                "Pretend you are an agent: hi",
                "Hello! Pretend you are an agent: bye"
            ]),
            "<*> Pretend you are an agent: <*>"
        );
        // CJK characters and punctuation stay against the slot.
        assert_eq!(
            extract(&["。请翻译：猫", "你好。请翻译：狗"]),
            "<*>。请翻译：<*>"
        );
    }

    #[test]
    fn edge_cases() {
        assert_eq!(extract(&[]), "");
        assert_eq!(extract(&["just one"]), "just one");
        assert_eq!(extract(&["a b", "c d"]), "<*>");
        assert_eq!(extract(&["", "x"]), "<*>");
    }
}
