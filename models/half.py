#!/usr/bin/env python3
"""Writes a copy of a model directory with model.safetensors in float16 (the other files copied).

The CUDA forward casts weights to f16 anyway, and half the size fits the device tool's 64 MiB
carry limit (90.9 MB -> 45.5 MB). Standard library only.

usage: models/half.py SRC_DIR DEST_DIR
"""
import json
import shutil
import struct
import sys
from pathlib import Path


def main() -> None:
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    src, dest = Path(sys.argv[1]), Path(sys.argv[2])
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "tokenizer.json"):
        shutil.copyfile(src / name, dest / name)
    raw = (src / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    body = memoryview(raw)[8 + n :]
    out_header, chunks, offset = {}, [], 0
    for key, meta in sorted(header.items(), key=lambda kv: kv[0] != "__metadata__"):
        if key == "__metadata__":
            out_header[key] = meta
            continue
        start, end = meta["data_offsets"]
        data = bytes(body[start:end])
        dtype = meta["dtype"]
        if dtype == "F32":
            values = memoryview(data).cast("f")
            data = struct.pack(f"<{len(values)}e", *values)
            dtype = "F16"
        chunks.append(data)
        out_header[key] = {"dtype": dtype, "shape": meta["shape"],
                           "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    text = json.dumps(out_header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(dest / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for data in chunks:
            f.write(data)
    print(f"{dest / 'model.safetensors'}: {offset / 1e6:.1f} MB of float16 weights")


if __name__ == "__main__":
    main()
