#!/usr/bin/env python3
"""Prints the path of the test binary named argv[1] from `cargo test --no-run
--message-format=json...` output on stdin (the last one built); exits 1 if there is none."""
import json
import sys

name = sys.argv[1]
found = None
for line in sys.stdin:
    try:
        msg = json.loads(line)
    except json.JSONDecodeError:
        continue
    if msg.get("reason") == "compiler-artifact" and msg.get("executable") \
            and msg.get("target", {}).get("name") == name:
        found = msg["executable"]
if found is None:
    sys.exit(f"no test executable named {name!r} in cargo's output")
print(found)
