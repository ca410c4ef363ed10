#!/usr/bin/env python3
"""Real prompts with their natural mixed lengths, sampled from the corpora copied into eval/data/
(see eval/data/SOURCES.md for sources and licences), for benchmarks.

    python3 benches/sample_prompts.py --n 20000 --out /tmp/prompts.jsonl            # {"prompt"}
    python3 benches/sample_prompts.py --n 1000000 --traffic --out /tmp/1m.jsonl      # + account, time

Every record of every corpus is drawn with equal weight (the organic chat, search and code corpora,
and the harvest-like benchmark and template corpora), shuffled, seeded. Beyond the corpora's size
(~150k texts) records repeat. `--traffic` writes the traffic contract format (account_id, prompt,
timestamp_ms), 1,000 accounts, one prompt a second. Python 3.11 standard library only.
"""

import argparse
import gzip
import json
import random
from pathlib import Path

DATA = Path(__file__).resolve().parent.parent / "eval" / "data"
EPOCH_MS = 1_748_822_400_000


def corpus_texts(path: Path) -> list[str]:
    opener = gzip.open if path.name.endswith(".gz") else open
    out = []
    with opener(path, "rt", encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            r = json.loads(line)
            text = r.get("text") or r.get("prompt") or r.get("code") or ""
            if r.get("input"):
                text += "\n\n" + r["input"]
            if text.strip():
                out.append(text)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--traffic", action="store_true")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    texts = []
    for path in sorted(DATA.glob("*/*.jsonl*")):
        texts.extend(corpus_texts(path))
    rng.shuffle(texts)
    with open(args.out, "w", encoding="utf-8") as out:
        for i in range(args.n):
            text = texts[i % len(texts)] if i < len(texts) else rng.choice(texts)
            rec = {"prompt": text}
            if args.traffic:
                rec = {"account_id": f"acct-{rng.randrange(1000):04d}", "prompt": text,
                       "timestamp_ms": EPOCH_MS + i * 1000}
            out.write(json.dumps(rec, ensure_ascii=False) + "\n")
    print(f"{args.out}: {args.n} prompts from {len(texts)} corpus texts")


if __name__ == "__main__":
    main()
