# prompt-radar — CPU image: build stage, slim runtime, non-root.
# (The CUDA image is the subject of the GPU issue; it will add an nvidia/cuda build stage.)
#   docker build -t prompt-radar .
#   docker run -p 50051:50051 -v radar-data:/data prompt-radar
FROM rust:1.95-bookworm AS build
WORKDIR /src
RUN apt-get update && apt-get install -y --no-install-recommends python3-pip && rm -rf /var/lib/apt/lists/*
COPY models/fetch.sh models/fetch.sh
RUN PIP_BREAK_SYSTEM_PACKAGES=1 ./models/fetch.sh /model
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto proto
COPY src src
COPY benches benches
RUN cargo build --release --locked --bin prompt-radar && strip target/release/prompt-radar

FROM debian:bookworm-slim
RUN useradd --system --uid 10001 --home /data radar && mkdir -p /data && chown radar /data
COPY --from=build /src/target/release/prompt-radar /usr/local/bin/prompt-radar
COPY --from=build /model /model
USER radar
ENV PROMPT_RADAR_LISTEN=0.0.0.0:50051 PROMPT_RADAR_DATA_DIR=/data PROMPT_RADAR_MODEL=/model
EXPOSE 50051
VOLUME /data
ENTRYPOINT ["prompt-radar"]
CMD ["serve"]
