#!/usr/bin/env python3
"""Builds tests/data/recall_prompts.txt: 20,000 real prompts, one per line, for the HNSW recall test.

Reproducible: no randomness, only sorting by SHA-256. Each prompt has its whitespace (newlines
included) collapsed to single spaces and is trimmed; prompts up to MAX_CHARS long are preferred,
longer ones are only used to fill a quota and are cut at a word boundary. Duplicates (compared
case-insensitively) are dropped across all sources. staqc_sql_titles takes whatever the other
sources leave of the 20,000. The output lines are ordered by hash, so sources are interleaved.

Usage: python3 tests/data/make_recall_prompts.py [DATA_DIR] (default /work/shared/data)
"""

import hashlib
import json
import re
import sys
from pathlib import Path

TOTAL = 20_000
MAX_CHARS = 300
SALT = "prompt-radar recall v1"
# (source, quota); None = the rest.
QUOTAS = [
    ("nq_open", 5_000),
    ("conala", 2_500),  # only ~2,090 distinct intents exist: the shortfall goes to staqc
    ("gsm8k", 2_500),
    ("code_alpaca", 1_000),
    ("alpaca", 400),
    ("arena_hard", 250),
    ("koala", 180),
    ("mt_bench", 160),
    ("staqc_sql_titles", None),
]


def jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def with_input(rec):
    extra = (rec.get("input") or "").strip()
    return rec["instruction"] + (" " + extra if extra else "")


def load(data, source):
    d = data / source
    if source == "staqc_sql_titles":
        return [r["title"] for r in jsonl(d / "sql_question_titles.jsonl")]
    if source == "nq_open":
        return [r["question"] for p in sorted(d.glob("NQ-open*.jsonl")) for r in jsonl(p)]
    if source == "conala":
        recs = []
        for name in ("conala-train.json", "conala-test.json"):
            recs += json.loads((d / name).read_text(encoding="utf-8"))
        return [r["intent"] for r in recs if r.get("intent")]
    if source == "gsm8k":
        return [r["question"] for name in ("train.jsonl", "test.jsonl") for r in jsonl(d / name)]
    if source == "code_alpaca":
        recs = []
        for name in ("code_alpaca_2k.json", "new_codealpaca.json"):
            recs += json.loads((d / name).read_text(encoding="utf-8"))
        return [with_input(r) for r in recs]
    if source == "alpaca":
        return [with_input(r) for r in json.loads((d / "alpaca_en_demo.json").read_text(encoding="utf-8"))]
    if source == "arena_hard":
        return [r["turns"][0]["content"] for r in jsonl(d / "question.jsonl")]
    if source == "koala":
        return [r["prompt"] for r in jsonl(d / "koala_test_set.jsonl")]
    if source == "mt_bench":
        names = ("mt_bench_question.jsonl", "vicuna_bench_question.jsonl")
        return [r["turns"][0] for name in names for r in jsonl(d / name)]
    raise ValueError(source)


def clean(text):
    return re.sub(r"\s+", " ", text).strip()


def cut(text):
    if len(text) <= MAX_CHARS:
        return text
    head = text[:MAX_CHARS]
    space = head.rfind(" ")
    return (head[:space] if space > MAX_CHARS // 2 else head).rstrip()


def rank(text):
    return hashlib.sha256((SALT + "\0" + text).encode("utf-8")).hexdigest()


def main():
    data = Path(sys.argv[1] if len(sys.argv) > 1 else "/work/shared/data")
    out_dir = Path(__file__).resolve().parent
    seen = set()
    chosen = []  # (source, text)
    counts = {}
    for source, quota in QUOTAS:
        want = TOTAL - len(chosen) if quota is None else quota
        texts = [clean(t) for t in load(data, source)]
        texts = [t for t in texts if t]
        # Short ones first (in hash order), then long ones cut to MAX_CHARS.
        ordered = sorted(texts, key=lambda t: (len(t) > MAX_CHARS, rank(t)))
        taken = 0
        for t in ordered:
            if taken == want:
                break
            t = cut(t)
            key = t.lower()
            if key in seen:
                continue
            seen.add(key)
            chosen.append((source, t))
            taken += 1
        counts[source] = taken
    assert len(chosen) == TOTAL, len(chosen)
    lines = sorted((t for _, t in chosen), key=rank)
    body = "\n".join(lines) + "\n"
    (out_dir / "recall_prompts.txt").write_text(body, encoding="utf-8")
    for source, n in counts.items():
        print(f"{source:18} {n:6}")
    print(f"{'total':18} {len(lines):6}  ({len(body.encode('utf-8')):,} bytes)")


if __name__ == "__main__":
    main()
