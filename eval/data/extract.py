#!/usr/bin/env python3
"""Provenance record: how the subsets in this folder were cut from the shared corpora.

Not needed to generate traffic (make_traffic.py reads only the files next to this script).
Run once, from the repository root, against a checkout of the shared corpora:

    python3 eval/data/extract.py --src /work/shared/data --dst eval/data

Every output is JSONL (gzip for the larger ones) with a "text" field and, for a few files, extra
fields named below. Subsets are drawn with a fixed seed, so re-running gives the same bytes.
"""

import argparse
import csv
import gzip
import json
import random
import sys
from pathlib import Path


def read_jsonl(path, tolerant=False):
    """Yields parsed lines; with `tolerant`, skips lines that are not valid JSON (instruction_wild
    has 5 of 878 with bad escapes) and reports how many were skipped."""
    opener = gzip.open if str(path).endswith(".gz") else open
    skipped = 0
    with opener(path, "rt", encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                yield json.loads(line, strict=False)
            except json.JSONDecodeError:
                if not tolerant:
                    raise
                skipped += 1
    if skipped:
        print(f"  {path}: skipped {skipped} malformed line(s)")


def write(dst: Path, name: str, rows):
    path = dst / name
    path.parent.mkdir(parents=True, exist_ok=True)
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")
    with open(path, "wb") as raw:
        if name.endswith(".gz"):  # no name, mtime 0: byte-identical on every run
            with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz:
                gz.write(data)
        else:
            raw.write(data)
    print(f"{name}: {len(rows)}")


def dedupe(rows, key="text"):
    seen, out = set(), []
    for r in rows:
        k = r[key].strip()
        if k and k not in seen:
            seen.add(k)
            out.append(r)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--src", default="/work/shared/data")
    ap.add_argument("--dst", default=str(Path(__file__).parent))
    a = ap.parse_args()
    src, dst = Path(a.src), Path(a.dst)
    rng = random.Random(20250602)
    csv.field_size_limit(sys.maxsize)

    # ---------------- organic ----------------
    write(dst, "organic/arena_hard.jsonl", dedupe(
        [{"text": r["turns"][0]["content"]} for r in read_jsonl(src / "arena_hard/question.jsonl")]))
    koala = dedupe([{"text": r["prompt"]} for r in read_jsonl(src / "koala/koala_test_set.jsonl")])
    write(dst, "organic/koala.jsonl", koala)
    mt = [{"text": r["turns"][0]} for r in read_jsonl(src / "mt_bench/mt_bench_question.jsonl")]
    mt += [{"text": r["turns"][0]} for r in read_jsonl(src / "mt_bench/vicuna_bench_question.jsonl")]
    mt = dedupe(mt)
    write(dst, "organic/mt_bench.jsonl", mt)
    write(dst, "organic/wizardlm_testset.jsonl", dedupe(
        [{"text": r["Instruction"]} for r in read_jsonl(src / "wizardlm_testset/WizardLM_testset.jsonl")]))
    # alpaca_eval overlaps koala, vicuna and self-instruct user-oriented: keep only the other origins.
    write(dst, "organic/alpaca_eval.jsonl", dedupe(
        [{"text": r["instruction"]} for r in read_jsonl(src / "alpaca_eval/alpaca_eval_instructions.jsonl")
         if r["dataset"] in ("helpful_base", "oasst")]))
    iw = []
    for n in ("user_1", "user_2", "user_3"):  # seed_prompts_en duplicates user_1
        iw += [{"text": r["instruction"]} for r in read_jsonl(src / f"instruction_wild/{n}.jsonl", tolerant=True)]
    write(dst, "organic/instruction_wild.jsonl", dedupe(iw))
    write(dst, "organic/hh_rlhf_first_turns.jsonl", dedupe(
        [{"text": r["first_human_turn"]} for r in read_jsonl(src / "hh_rlhf/harmless-base_test_first_turns.jsonl")]))
    with open(src / "awesome_chatgpt_prompts/prompts.csv", encoding="utf-8") as f:
        acp = [{"text": r["prompt"]} for r in csv.DictReader(f)
               if r.get("type", "TEXT") == "TEXT" and 40 <= len(r["prompt"]) <= 1500]
    acp = dedupe(acp)
    rng.shuffle(acp)
    write(dst, "organic/awesome_chatgpt_prompts.jsonl", acp[:600])
    uo = []
    for r in read_jsonl(src / "self_instruct/user_oriented_instructions.jsonl"):
        inp = (r.get("instances") or [{}])[0].get("input", "").strip()
        uo.append({"text": r["instruction"], "input": inp})
    write(dst, "organic/self_instruct_user_oriented.jsonl", uo)
    nq = []
    for n in ("NQ-open.dev.jsonl", "NQ-open.efficientqa.dev.1.1.jsonl",
              "NQ-open.efficientqa.test.1.1.no-annotations.jsonl"):
        nq += [{"text": r["question"]} for r in read_jsonl(src / "nq_open" / n)]
    write(dst, "organic/nq_open.jsonl.gz", dedupe(nq))
    sq = dedupe([{"text": r["title"]} for r in read_jsonl(src / "staqc_sql_titles/sql_question_titles.jsonl")])
    rng.shuffle(sq)
    write(dst, "organic/staqc_sql_titles.jsonl.gz", sq[:16000])
    cn = []
    for n in ("conala-train.json", "conala-test.json"):
        with open(src / "conala" / n, encoding="utf-8") as f:
            cn += [{"text": r["intent"]} for r in json.load(f) if r.get("intent")]
    write(dst, "organic/conala_intents.jsonl", dedupe(cn))

    # ---------------- harvest-like slot material ----------------
    gs = [{"text": r["question"]} for r in read_jsonl(src / "gsm8k/test.jsonl")]
    gs += [{"text": r["question"]} for r in read_jsonl(src / "gsm8k/train.jsonl")]
    gs = dedupe(gs)
    rng.shuffle(gs)
    write(dst, "harvest/gsm8k_questions.jsonl.gz", gs[:7000])
    write(dst, "harvest/mbpp.jsonl.gz", dedupe(
        [{"text": r["text"], "code": r["code"]} for r in read_jsonl(src / "mbpp/mbpp.jsonl")]))
    write(dst, "harvest/humaneval.jsonl", [{"text": r["prompt"]} for r in read_jsonl(src / "humaneval/HumanEval.jsonl.gz")])
    ca = []
    for n in ("code_alpaca_2k.json", "new_codealpaca.json"):
        with open(src / "code_alpaca" / n, encoding="utf-8") as f:
            ca += [{"text": r["instruction"], "input": (r.get("input") or "").strip()} for r in json.load(f)]
    ca = [r for r in dedupe(ca) if len(r["text"]) + len(r["input"]) <= 1200]
    rng.shuffle(ca)
    write(dst, "harvest/code_alpaca.jsonl.gz", ca[:4000])
    write(dst, "harvest/bbh.jsonl.gz", dedupe(
        [{"text": r["input"], "task": r["task"]} for r in read_jsonl(src / "bbh/bbh_all.jsonl")]))
    with open(src / "alpaca/alpaca_en_demo.json", encoding="utf-8") as f:
        al = [{"text": r["instruction"], "input": (r.get("input") or "").strip()} for r in json.load(f)]
    write(dst, "harvest/alpaca_en_demo.jsonl", dedupe(al))

    # t0: a few templates kept whole (campaign material), plus slot text cut out of others (batch jobs).
    keep = ("trec_trec1", "glue_qqp_duplicate", "social_i_qa_Generate_answer", "quarel_logic_test",
            "samsum_Summarize_this_dialogue_")
    t0_keep, reviews, headlines = [], [], []
    rt_suffix = " What is the sentiment expressed in this text?\n"
    for r in read_jsonl(src / "t0_templated/t0_train_50k_per_template.jsonl.gz"):
        t, p = r["template"], r["prompt"]
        if t in keep:
            t0_keep.append({"text": p, "template": t})
        elif t == "rotten_tomatoes_Text_Expressed_Sentiment" and p.endswith(rt_suffix):
            reviews.append({"text": p[: -len(rt_suffix)].strip()})
        elif t == "amazon_polarity_Is_this_review" and p.startswith("Title: ") and "\nReview: " in p:
            body = p.split("\nReview: ", 1)[1].rsplit("\nIs the review", 1)[0].strip()
            reviews.append({"text": body})
        elif t == "ag_news_classify":
            head = p.rsplit("\nWhat label best describes", 1)[0].replace("\\", " ")
            headlines.append({"text": " ".join(head.split())})
    write(dst, "harvest/t0_templates.jsonl.gz", dedupe(t0_keep))
    write(dst, "harvest/t0_reviews.jsonl.gz", dedupe(reviews))
    write(dst, "harvest/t0_news.jsonl.gz", dedupe(headlines))


if __name__ == "__main__":
    main()
