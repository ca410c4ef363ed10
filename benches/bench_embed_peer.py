#!/usr/bin/env python3
"""The peer of `prompt-radar bench-embed`: times sentence-transformers (or, with --fixed-tokens,
PyTorch's BertModel alone) on the same texts, the same weights and the same batch sizes, and prints
one table beside prompt-radar's numbers.

    prompt-radar bench-embed --device cuda --input P.jsonl --texts 20000 --json ours.json
    python3 benches/bench_embed_peer.py --input P.jsonl --texts 20000 --ours ours.json

End to end (default): `SentenceTransformer.encode` from strings to L2-normalised vectors on the
host, tokenisation included, fp16 on CUDA (f32 on the CPU), max_seq_length 256 as the model ships.
Model only (--fixed-tokens T): `BertModel` on fixed T-token batches (ids uploaded, forward, mean
pooling, L2 normalisation, vectors copied back), like `bench-embed --fixed-tokens T`.
Each batch size: one warm-up batch, then --rounds timed rounds over the texts (CUDA synchronised),
the median round reported. Needs torch, transformers and sentence-transformers (the GPU machine has
them); the model directory is the project's (config.json, tokenizer.json, model.safetensors).
"""

import argparse
import json
import statistics
import sys
import time


def read_texts(path, limit):
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if len(out) >= limit:
                break
            line = line.rstrip("\n")
            text = json.loads(line)["prompt"] if line.lstrip().startswith("{") else line
            if text.strip():
                out.append(text)
    if not out:
        sys.exit(f"{path}: no prompts")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", required=True)
    ap.add_argument("--model", default="models/all-MiniLM-L6-v2")
    ap.add_argument("--texts", type=int, default=2000)
    ap.add_argument("--batch-sizes", default="1,32,128,512")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--fixed-tokens", type=int, default=0)
    ap.add_argument("--max-round-seconds", type=float, default=60.0)
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    ap.add_argument("--dtype", default=None, help="fp16 or fp32 (default: fp16 on cuda, fp32 on cpu)")
    ap.add_argument("--ours", help="bench-embed --json output to print beside")
    ap.add_argument("--json", help="write this side's rows here")
    args = ap.parse_args()

    import torch
    from sentence_transformers import SentenceTransformer, models
    from transformers import AutoTokenizer, BertModel

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("fp16" if device.startswith("cuda") else "fp32")
    torch_dtype = torch.float16 if dtype == "fp16" else torch.float32
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    texts = read_texts(args.input, args.texts)
    batches = [int(b) for b in args.batch_sizes.split(",")]

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if args.fixed_tokens:
        model = BertModel.from_pretrained(args.model, dtype=torch_dtype).to(device).eval()
        pool = [t for ids in tokenizer(texts, truncation=True, max_length=256)["input_ids"] for t in ids[1:-1]]
        body = args.fixed_tokens - 2
        seqs = [[tokenizer.cls_token_id] + [pool[(i * body + j) % len(pool)] for j in range(body)]
                + [tokenizer.sep_token_id] for i in range(len(texts))]
        lens = [args.fixed_tokens] * len(texts)

        @torch.inference_mode()
        def run(lo, hi):
            ids = torch.tensor(seqs[lo:hi], device=device)
            mask = torch.ones_like(ids)
            h = model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
            m = mask.unsqueeze(-1).float()
            v = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
            v = torch.nn.functional.normalize(v, dim=-1)
            return v.cpu()
        mode = f"model only, fixed {args.fixed_tokens} tokens (transformers BertModel, {dtype})"
    else:
        word = models.Transformer(args.model, max_seq_length=256)
        st = SentenceTransformer(modules=[word, models.Pooling(word.get_word_embedding_dimension(), "mean"),
                                          models.Normalize()], device=device)
        if torch_dtype == torch.float16:
            st = st.half()
        lens = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=256)["input_ids"]]

        def run(lo, hi):
            return st.encode(texts[lo:hi], batch_size=hi - lo, convert_to_numpy=True,
                             normalize_embeddings=False, show_progress_bar=False)
        mode = f"end to end (sentence-transformers encode, {dtype})"

    print(f"peer: {mode} on {device} (torch {torch.__version__}), {len(texts)} texts, "
          f"mean {statistics.mean(lens):.1f} tokens")
    rows = []
    for b in batches:
        run(0, min(b, len(texts)))
        sync()
        rates, token_rates, batch_ms = [], [], []
        for _ in range(args.rounds):
            seqs_done = tokens = 0
            start = time.perf_counter()
            lo = 0
            while lo < len(texts) and time.perf_counter() - start < args.max_round_seconds:
                hi = min(lo + b, len(texts))
                t = time.perf_counter()
                run(lo, hi)
                sync()
                batch_ms.append((time.perf_counter() - t) * 1e3)
                seqs_done += hi - lo
                tokens += sum(lens[lo:hi])
                lo = hi
            secs = time.perf_counter() - start
            rates.append(seqs_done / secs)
            token_rates.append(tokens / secs)
        rows.append({"batch": b, "sequences_per_s": statistics.median(rates),
                     "tokens_per_s": statistics.median(token_rates),
                     "batch_ms_p50": statistics.median(batch_ms)})

    if args.json:
        with open(args.json, "w") as f:
            json.dump({"system": "peer", "device": device, "mode": mode, "texts": len(texts),
                       "mean_tokens": statistics.mean(lens), "rows": rows}, f, indent=2)
    ours = {}
    if args.ours:
        with open(args.ours) as f:
            report = json.load(f)
        print(f"ours: {report['mode']} on {report['device']}")
        ours = {r["batch"]: r for r in report["rows"]}
    head = f"{'batch':>6} {'peer seq/s':>11} {'peer tok/s':>11} {'peer ms':>8}"
    if ours:
        head += f" {'ours seq/s':>11} {'ours tok/s':>11} {'ours ms':>8} {'ours/peer':>9}"
    print(head)
    for r in rows:
        line = f"{r['batch']:>6} {r['sequences_per_s']:>11.0f} {r['tokens_per_s']:>11.0f} {r['batch_ms_p50']:>8.2f}"
        o = ours.get(r["batch"])
        if o:
            line += (f" {o['sequences_per_s']:>11.0f} {o['tokens_per_s']:>11.0f} {o['batch_ms_p50']:>8.2f}"
                     f" {o['sequences_per_s'] / r['sequences_per_s']:>8.2f}x")
        print(line)


if __name__ == "__main__":
    main()
