//! Template recovery for analysts: aligns member prompts token by token (longest common
//! subsequence) and keeps the words every sample shares; the gaps become `<*>` slots.
//! "Solve step by step: 2+2" and "Solve step by step: what is 7*6" give "Solve step by step: <*>".

/// The template shared by `samples`, with `<*>` for each run of differing tokens.
/// One sample gives itself back; no samples give an empty string.
pub fn extract(samples: &[&str]) -> String {
    let mut iter = samples.iter();
    let Some(first) = iter.next() else {
        return String::new();
    };
    // Long prompts are aligned on their first 200 tokens: enough for a template, cheap for LCS.
    let mut template: Vec<Option<&str>> = first.split_whitespace().take(200).map(Some).collect();
    for s in iter {
        let other: Vec<&str> = s.split_whitespace().take(200).collect();
        template = merge(&template, &other);
    }
    let mut out: Vec<&str> = Vec::with_capacity(template.len());
    for t in template {
        match t {
            Some(w) => out.push(w),
            None if out.last() != Some(&"<*>") => out.push("<*>"),
            None => {}
        }
    }
    out.join(" ")
}

/// Aligns a template (None = slot) with a new token sequence; tokens off the LCS become slots.
fn merge<'a>(template: &[Option<&'a str>], other: &[&str]) -> Vec<Option<&'a str>> {
    let (n, m) = (template.len(), other.len());
    // lcs[i][j] = LCS length of template[i..] and other[j..], flattened.
    let mut lcs = vec![0u16; (n + 1) * (m + 1)];
    let at = |i: usize, j: usize| i * (m + 1) + j;
    for i in (0..n).rev() {
        for j in (0..m).rev() {
            lcs[at(i, j)] = if template[i].is_some() && template[i] == Some(other[j]) {
                lcs[at(i + 1, j + 1)] + 1
            } else {
                lcs[at(i + 1, j)].max(lcs[at(i, j + 1)])
            };
        }
    }
    let (mut i, mut j) = (0, 0);
    let mut out = Vec::with_capacity(n);
    let mut gap = false;
    while i < n && j < m {
        if template[i].is_some() && template[i] == Some(other[j]) {
            if gap {
                out.push(None);
                gap = false;
            }
            out.push(template[i]);
            i += 1;
            j += 1;
        } else {
            gap = true;
            if lcs[at(i + 1, j)] >= lcs[at(i, j + 1)] {
                i += 1;
            } else {
                j += 1;
            }
        }
    }
    if gap || i < n || j < m {
        out.push(None);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::extract;

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
    fn edge_cases() {
        assert_eq!(extract(&[]), "");
        assert_eq!(extract(&["just one"]), "just one");
        assert_eq!(extract(&["a b", "c d"]), "<*>");
        assert_eq!(extract(&["", "x"]), "<*>");
    }
}
