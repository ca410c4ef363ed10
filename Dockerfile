# prompt-radar images: build stages, slim runtimes, non-root.
#   CPU (the default):  docker build -t prompt-radar .
#                       docker run -p 50051:50051 -v radar-data:/data prompt-radar
#   CUDA (H100/H200):   docker build --target cuda -t prompt-radar:cuda .
#                       docker run --gpus all -p 50051:50051 -v radar-data:/data prompt-radar:cuda
# The CUDA image needs the NVIDIA Container Toolkit and driver 580 or newer on the host (the toolkit
# mounts libcuda.so.1); it holds the CUDA 13.0 libraries the binary links (scripts/cuda-runtime.sh).
# Built with BuildKit (Docker's default builder), the CPU image builds no CUDA stage.

# Sources and model, shared by both builds.
FROM rust:1.95-bookworm AS sources
WORKDIR /src
RUN apt-get update && apt-get install -y --no-install-recommends python3-pip && rm -rf /var/lib/apt/lists/*
ENV PIP_BREAK_SYSTEM_PACKAGES=1
COPY models/fetch.sh models/fetch.sh
RUN ./models/fetch.sh /model
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto proto
COPY src src
COPY benches benches

FROM sources AS build
RUN cargo build --release --locked --bin prompt-radar && strip target/release/prompt-radar

# The recipe of `make cuda`: the CUDA 13.0 compiler from PyPI wheels (no system CUDA, no GPU), the
# project's kernels compiled to PTX for compute capability 90, then the runtime libraries.
FROM sources AS build-cuda
COPY scripts/cuda-toolchain.sh scripts/cuda-runtime.sh scripts/
COPY kernels kernels
RUN ./scripts/cuda-toolchain.sh /cuda/toolchain && . /cuda/toolchain/env.sh \
 && cargo build --release --locked --features cuda --bin prompt-radar && strip target/release/prompt-radar \
 && ./scripts/cuda-runtime.sh /cuda/runtime

FROM debian:bookworm-slim AS cuda
RUN useradd --system --uid 10001 --home /data radar && mkdir -p /data && chown radar /data
COPY --from=build-cuda /cuda/runtime/site/nvidia/cu13/lib /opt/cuda/lib
COPY --from=build-cuda /src/target/release/prompt-radar /usr/local/bin/prompt-radar
COPY --from=build-cuda /model /model
USER radar
# NVIDIA_REQUIRE_CUDA: the container toolkit refuses to start on a driver older than CUDA 13.0's
# (580) with a clear message, instead of the binary failing inside.
ENV LD_LIBRARY_PATH=/opt/cuda/lib NVIDIA_VISIBLE_DEVICES=all NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    NVIDIA_REQUIRE_CUDA="cuda>=13.0" \
    PROMPT_RADAR_DEVICE=cuda PROMPT_RADAR_LISTEN=0.0.0.0:50051 PROMPT_RADAR_DATA_DIR=/data PROMPT_RADAR_MODEL=/model
EXPOSE 50051
VOLUME /data
ENTRYPOINT ["prompt-radar"]
CMD ["serve"]

# The CPU image, last so that a plain `docker build` makes it.
FROM debian:bookworm-slim AS cpu
RUN useradd --system --uid 10001 --home /data radar && mkdir -p /data && chown radar /data
COPY --from=build /src/target/release/prompt-radar /usr/local/bin/prompt-radar
COPY --from=build /model /model
USER radar
ENV PROMPT_RADAR_LISTEN=0.0.0.0:50051 PROMPT_RADAR_DATA_DIR=/data PROMPT_RADAR_MODEL=/model
EXPOSE 50051
VOLUME /data
ENTRYPOINT ["prompt-radar"]
CMD ["serve"]
