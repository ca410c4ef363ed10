//! The candle embedder against sentence-transformers' own vectors (`tests/data/minilm-reference.jsonl`),
//! batched and one by one, the fused CPU forward against candle-transformers' forward, plus
//! truncation, odd inputs and load errors.

use prompt_radar::config::DeviceKind;
use prompt_radar::embed::{BertForward, CandleEmbedder, EmbedError, Embedder};

use crate::common;

/// One fixture line: a text and the vector sentence-transformers computed for it.
#[derive(serde::Deserialize)]
struct Reference {
    text: String,
    embedding: Vec<f32>,
}

fn references() -> Vec<Reference> {
    let data = common::read_data("minilm-reference.jsonl");
    let refs: Vec<Reference> = data
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad fixture line: {e}")))
        .collect();
    assert_eq!(refs.len(), 25, "fixture lines");
    refs
}

fn load() -> CandleEmbedder {
    let dir = common::model_dir();
    CandleEmbedder::load(&dir, DeviceKind::Cpu)
        .unwrap_or_else(|e| panic!("load {}: {e}", dir.display()))
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "dimensions");
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
    let nb: f32 = b.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (na * nb)
}

fn norm(v: &[f32]) -> f32 {
    v.iter().map(|x| x * x).sum::<f32>().sqrt()
}

/// Checks `got` against the references; returns the smallest cosine.
fn check(label: &str, refs: &[Reference], got: &[Vec<f32>]) -> f32 {
    assert_eq!(got.len(), refs.len(), "{label}: one vector per text");
    let mut min = f32::INFINITY;
    for (r, v) in refs.iter().zip(got) {
        let cos = cosine(&r.embedding, v);
        assert!(
            cos >= 0.999,
            "{label}: cosine {cos} < 0.999 for {:?}",
            r.text
        );
        assert!(
            (norm(v) - 1.0).abs() < 1e-4,
            "{label}: norm {} for {:?}",
            norm(v),
            r.text
        );
        min = min.min(cos);
    }
    println!("{label}: min cosine vs sentence-transformers = {min:.7}");
    min
}

#[test]
fn matches_sentence_transformers_batched_and_one_by_one() {
    let refs = references();
    let mut embedder = load();
    assert_eq!(embedder.dim(), 384);
    assert_eq!(embedder.device_name(), "cpu");

    let texts: Vec<&str> = refs.iter().map(|r| r.text.as_str()).collect();
    let batched = embedder.embed(&texts).expect("embed batch");
    let min_batch = check("one batch", &refs, &batched);

    let single: Vec<Vec<f32>> = texts
        .iter()
        .map(|t| {
            embedder
                .embed(&[t])
                .expect("embed one")
                .into_iter()
                .next()
                .expect("one vector")
        })
        .collect();
    let min_single = check("one by one", &refs, &single);
    println!("min cosine overall = {:.7}", min_batch.min(min_single));
}

/// Embeds `texts` as one batch and one by one.
fn batched_and_single(embedder: &mut CandleEmbedder, texts: &[&str]) -> [Vec<Vec<f32>>; 2] {
    let batched = embedder.embed(texts).expect("embed batch");
    let single = texts
        .iter()
        .map(|t| embedder.embed(&[t]).expect("embed one").remove(0))
        .collect();
    [batched, single]
}

#[test]
fn fused_forward_matches_candle_transformers() {
    // The fixture's 25 texts (1 to ~1,300 tokens, two truncated at 256) and the 5 longest
    // recall prompts.
    let refs = references();
    let prompts = common::read_data("recall_prompts.txt");
    let texts = reference_and_long_texts(&refs, &prompts);
    let texts: Vec<&str> = texts.iter().map(String::as_str).collect();

    let mut fused = load();
    let dir = common::model_dir();
    let mut candle = CandleEmbedder::load_with(&dir, DeviceKind::Cpu, BertForward::Candle)
        .unwrap_or_else(|e| panic!("load {}: {e}", dir.display()));
    assert!(
        texts.iter().any(|t| count(&candle, t) == 256),
        "a truncated text"
    );
    let want = batched_and_single(&mut candle, &texts);
    let got = batched_and_single(&mut fused, &texts);
    let mut min = f32::INFINITY;
    for (g, w) in got.iter().flatten().zip(want.iter().flatten()) {
        min = min.min(cosine(g, w));
        assert!((norm(g) - 1.0).abs() < 1e-4, "norm {}", norm(g));
    }
    println!(
        "fused vs candle-transformers: min cosine {min:.7} over {} texts",
        texts.len()
    );
    assert!(min >= 0.99999, "min cosine {min}");
}

/// The pipelined path (tokeniser a batch ahead on its own thread) gives `embed`'s vectors, batch
/// by batch in order, and stops when the sink says so.
#[test]
fn pipelined_embedding_matches_embed_in_order() {
    let prompts = common::read_data("recall_prompts.txt");
    let texts: Vec<&str> = prompts.lines().take(70).collect();
    let mut embedder = load();
    let want = embedder.embed(&texts).expect("embed");
    let mut got: Vec<Vec<f32>> = Vec::new();
    let mut ranges = Vec::new();
    embedder
        .embed_pipelined(&texts, 16, |range, vectors| {
            assert_eq!(
                vectors.len(),
                range.len(),
                "one vector per text of the batch"
            );
            ranges.push(range);
            got.extend(vectors);
            std::ops::ControlFlow::Continue(())
        })
        .expect("pipelined");
    assert_eq!(ranges, vec![0..16, 16..32, 32..48, 48..64, 64..70]);
    for (g, w) in got.iter().zip(&want) {
        assert!(cosine(g, w) > 0.99999, "same vector as embed");
    }
    let mut batches = 0;
    embedder
        .embed_pipelined(&texts, 16, |_, _| {
            batches += 1;
            std::ops::ControlFlow::Break(())
        })
        .expect("stopped early");
    assert_eq!(batches, 1, "the sink stopped the run");
}

/// Tokens of one text through the tokeniser handed to other threads.
fn count(embedder: &CandleEmbedder, text: &str) -> usize {
    embedder.tokenizer().ids(text).expect("tokenize").len()
}

#[test]
fn counts_tokens_after_truncation() {
    let embedder = load();
    let long: String = (0..5000).map(|i| format!("word{} ", i % 97)).collect();
    assert_eq!(count(&embedder, &long), 256);
    assert_eq!(count(&embedder, &"lorem ipsum dolor ".repeat(2000)), 256);
    assert_eq!(count(&embedder, "hi"), 3, "[CLS] hi [SEP]");
    assert_eq!(count(&embedder, ""), 2, "[CLS] [SEP]");
    // A long text whose first 4 KiB hold few tokens must still be counted in full.
    let sparse = format!("{} {}", "x".repeat(4000), "y ".repeat(300));
    assert_eq!(count(&embedder, &sparse), 256);
}

/// The server tokenises each request on its own thread with `tokenizer()`; the batch paths use
/// the pooled tokeniser. Both must give the model the same ids, and the ids the same vectors.
#[test]
fn request_tokeniser_matches_batch_tokenisation() {
    let refs = references();
    let prompts = common::read_data("recall_prompts.txt");
    let mut texts = reference_and_long_texts(&refs, &prompts);
    texts.push(format!("{} {}", "x".repeat(4000), "y ".repeat(300)));
    texts.push((0..5000).map(|i| format!("word{} ", i % 97)).collect());
    let texts: Vec<&str> = texts.iter().map(String::as_str).collect();
    let mut embedder = load();
    let batch = embedder.token_ids(&texts).expect("batch tokenisation");
    let tokenizer = embedder.tokenizer();
    let one_by_one: Vec<Vec<u32>> = texts
        .iter()
        .map(|t| tokenizer.ids(t).expect("tokenize one"))
        .collect();
    assert_eq!(one_by_one, batch);
    let ids: Vec<&[u32]> = one_by_one.iter().map(Vec::as_slice).collect();
    let from_ids = embedder.embed_ids(&ids).expect("embed ids");
    let from_texts = embedder.embed(&texts).expect("embed texts");
    for (a, b) in from_ids.iter().zip(&from_texts) {
        assert!(cosine(a, b) >= 0.999_999, "same ids, same vectors");
    }
    assert_eq!(from_ids.len(), texts.len());
}

#[test]
fn long_texts_embed_like_their_truncation() {
    let mut embedder = load();
    let long: String = (0..5000).map(|i| format!("word{} ", i % 97)).collect();
    let short: String = (0..400).map(|i| format!("word{} ", i % 97)).collect();
    let v = embedder.embed(&[&long, &short]).expect("embed long");
    assert!(
        cosine(&v[0], &v[1]) > 0.99999,
        "both truncate to the same 256 tokens"
    );
}

#[test]
fn odd_inputs_do_not_panic() {
    let mut embedder = load();
    let huge_word = "a".repeat(200_000);
    let many_emoji = "🚀🔥".repeat(20_000);
    let chinese = "请一步一步地思考".repeat(3000);
    let inputs = [
        "",
        " ",
        "\0\u{1}\u{7f}\u{85}\u{200b}\u{feff}",
        "\u{301}\u{301}\u{301}",
        "[CLS] [SEP] [PAD] [MASK] [UNK]",
        "\u{fffd}\u{10ffff}",
        huge_word.as_str(),
        many_emoji.as_str(),
        chinese.as_str(),
    ];
    for text in inputs {
        let _ = embedder.tokenizer().ids(text);
        if let Ok(v) = embedder.embed(&[text]) {
            assert_eq!(v.len(), 1);
            let head: String = text.chars().take(20).collect();
            assert!(
                v[0].iter().all(|x| x.is_finite()),
                "finite vector for {head:?}"
            );
        }
    }
    let all = embedder
        .embed(&inputs)
        .expect("a batch of odd inputs embeds");
    assert_eq!(all.len(), inputs.len());
    assert!(embedder.embed(&[]).expect("an empty batch").is_empty());
}

#[test]
fn missing_model_dir_is_a_model_error_naming_the_path() {
    let dir = std::env::temp_dir().join("prompt-radar-no-such-model-dir");
    let err = match CandleEmbedder::load(&dir, DeviceKind::Cpu) {
        Ok(_) => panic!("loading from a missing directory succeeded"),
        Err(e) => e,
    };
    assert!(matches!(err, EmbedError::Model(_)), "{err:?}");
    assert!(
        err.to_string().contains(&*dir.to_string_lossy()),
        "message names the path: {err}"
    );
}

#[cfg(not(feature = "cuda"))]
#[test]
fn cuda_without_the_feature_says_so() {
    let err = match CandleEmbedder::load(&common::model_dir(), DeviceKind::Cuda(0)) {
        Ok(_) => panic!("cuda without the feature loaded"),
        Err(e) => e,
    };
    assert!(
        err.to_string().contains("built without the cuda feature"),
        "{err}"
    );
}

/// The reference texts plus the five longest prompts of `recall_prompts.txt` (truncated at 256
/// tokens), and those prompts themselves.
fn reference_and_long_texts(refs: &[Reference], prompts: &str) -> Vec<String> {
    let mut longest: Vec<&str> = prompts.lines().collect();
    longest.sort_by_key(|l| std::cmp::Reverse(l.len()));
    refs.iter()
        .map(|r| r.text.clone())
        .chain(longest.into_iter().take(5).map(str::to_owned))
        .collect()
}

/// `models/half.py`, the f16 copy of the model carried to GPU machines, embeds as the f32 model
/// does on the CPU (weights rounded to f16, arithmetic in f32): the weight half of the CUDA
/// forward's precision.
#[test]
fn half_precision_weights_keep_the_vectors() {
    let refs = references();
    let prompts = common::read_data("recall_prompts.txt");
    let texts = reference_and_long_texts(&refs, &prompts);
    let texts: Vec<&str> = texts.iter().map(String::as_str).collect();
    let dir = common::model_dir();
    let half = tempfile::tempdir().expect("tempdir");
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/half.py");
    let status = std::process::Command::new("python3")
        .arg(&script)
        .arg(&dir)
        .arg(half.path())
        .status()
        .expect("python3 models/half.py");
    assert!(status.success(), "models/half.py: {status}");
    let size = |d: &std::path::Path| {
        std::fs::metadata(d.join("model.safetensors"))
            .expect("weights")
            .len()
    };
    assert!(
        size(half.path()) * 10 < size(&dir) * 6,
        "about half the size of the f32 weights"
    );
    let mut f32_model = load();
    let mut f16_model = CandleEmbedder::load(half.path(), DeviceKind::Cpu).expect("load f16");
    let want = f32_model.embed(&texts).expect("f32");
    let got = f16_model.embed(&texts).expect("f16");
    let min = got
        .iter()
        .zip(&want)
        .map(|(g, w)| cosine(g, w))
        .fold(f32::INFINITY, f32::min);
    println!(
        "f16 weights vs f32: min cosine {min:.6} over {} texts",
        texts.len()
    );
    assert!(min >= 0.9999, "min cosine {min}");
}

/// On a GPU build: the project's CUDA forward (f16) against CPU f32 vectors and
/// sentence-transformers' vectors on the reference fixture plus truncated 256-token prompts
/// (cosine ≥ 0.999), batched and one by one, then 3,000 real prompts in one call (several packed
/// passes). Needs a CUDA GPU (device 0): a `--features cuda` test binary is meant to run on the GPU
/// machine.
#[cfg(feature = "cuda")]
#[test]
fn cuda_vectors_match_cpu_f32_vectors() {
    let refs = references();
    let prompts = common::read_data("recall_prompts.txt");
    let texts = reference_and_long_texts(&refs, &prompts);
    let texts: Vec<&str> = texts.iter().map(String::as_str).collect();
    let mut cpu = load();
    let dir = common::model_dir();
    let mut gpu = CandleEmbedder::load(&dir, DeviceKind::Cuda(0))
        .unwrap_or_else(|e| panic!("cuda:0 (this test needs a GPU): {e}"));
    assert_eq!(gpu.device_name(), "cuda:0");
    let min_cosine = |got: &[Vec<f32>], want: &[Vec<f32>]| {
        assert_eq!(got.len(), want.len(), "one vector per text");
        let mut min = f32::INFINITY;
        for (g, w) in got.iter().zip(want) {
            assert!(g.iter().all(|x| x.is_finite()), "finite cuda vector");
            assert!((norm(g) - 1.0).abs() < 1e-3, "norm {}", norm(g));
            min = min.min(cosine(g, w));
        }
        min
    };
    let want = cpu.embed(&texts).expect("cpu batch");
    let [batched, single] = batched_and_single(&mut gpu, &texts);
    let min = min_cosine(&batched, &want).min(min_cosine(&single, &want));
    println!(
        "cuda vs cpu f32: min cosine {min:.6} over {} texts",
        texts.len()
    );
    assert!(min >= 0.999, "min cosine {min}");
    check(
        "cuda batch vs sentence-transformers",
        &refs,
        &batched[..refs.len()],
    );

    let many: Vec<&str> = prompts.lines().take(3000).collect();
    let want = cpu.embed(&many).expect("cpu many");
    let got = gpu.embed(&many).expect("cuda many");
    let min = min_cosine(&got, &want);
    println!(
        "cuda vs cpu f32: min cosine {min:.6} over {} prompts in one call",
        many.len()
    );
    assert!(min >= 0.999, "min cosine {min}");
}
