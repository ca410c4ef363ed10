//! Integration and end-to-end tests, one binary (faster to link than one per file).
//! They use the real model (`make model` fetches it; `PROMPT_RADAR_MODEL` overrides the path),
//! a real redb store in a temp dir and real gRPC servers bound to 127.0.0.1:0.

#![allow(clippy::unwrap_used)] // benches and tests may panic on setup failures

mod cli;
mod common;
mod crash;
mod cuda_kernels;
mod embed_reference;
mod recall;
mod server_e2e;
