//! The gRPC server: thin tonic handlers (validate → engine → convert), the standard health
//! service, server reflection (so `grpcurl` works without the .proto) and an optional bearer-token
//! interceptor. `run` takes its listener and shutdown signal, so tests bind `127.0.0.1:0` and run
//! the real server.

mod convert;
mod handlers;
mod pipeline;
pub mod stats;
pub mod validate;

pub use handlers::{Drainer, RadarService};
pub use pipeline::CheckPipeline;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;

use crate::config::Config;
use crate::embed::{CandleEmbedder, Embedder};
use crate::engine::Engine;
use crate::proto::radar_server::RadarServer;

/// A status code's name as gRPC and the proto write it: `INVALID_ARGUMENT`, `NOT_FOUND`, … (the
/// `code` of a CheckStream item's error; tonic's `Debug` would say `InvalidArgument`).
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Errors starting or running the server.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Loading the model failed.
    #[error(transparent)]
    Embed(#[from] crate::embed::EmbedError),
    /// Opening the data directory failed.
    #[error(transparent)]
    Engine(#[from] crate::error::Error),
    /// Binding or a worker thread failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The transport failed.
    #[error(transparent)]
    Transport(#[from] tonic::transport::Error),
    /// The reflection service could not be built.
    #[error("reflection: {0}")]
    Reflection(String),
}

/// A server whose model and data are loaded, ready to serve on a listener.
pub struct Prepared {
    /// The service (shared engine and pipeline).
    pub service: RadarService,
    /// The token required by the interceptor, if any.
    pub auth_token: Option<String>,
}

impl Prepared {
    /// Loads the model and opens the data directory described by `config`.
    pub fn load(config: &Config) -> Result<Self, ServeError> {
        let embedder = CandleEmbedder::load(&config.model_dir, config.device)?;
        Self::with_embedder(config, embedder)
    }

    /// Opens the data directory with an already loaded embedder.
    pub fn with_embedder<E: Embedder + 'static>(
        config: &Config,
        mut embedder: E,
    ) -> Result<Self, ServeError> {
        let engine = Arc::new(Engine::open(config.engine.clone(), embedder.dim())?);
        engine.check_model(&mut embedder, &config.model_dir.display().to_string())?;
        let stats = Arc::new(stats::ServerStats::new());
        let pipeline = Arc::new(CheckPipeline::start(
            embedder,
            engine.clone(),
            config.batch.clone(),
            stats.clone(),
        )?);
        let service = RadarService::new(engine, pipeline, config.limits.clone(), stats);
        Ok(Self {
            service,
            auth_token: config.auth_token.clone(),
        })
    }

    /// Serves on `listener` until `shutdown` resolves.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), ServeError> {
        let (health_reporter, health) = tonic_health::server::health_reporter();
        health_reporter
            .set_serving::<RadarServer<RadarService>>()
            .await;
        // Both versions: grpcurl before 1.8.8, Postman, Kreya and evans ask v1alpha only.
        let reflection = || {
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        };
        let reflection_v1 = reflection()
            .build_v1()
            .map_err(|e| ServeError::Reflection(e.to_string()))?;
        let reflection_v1alpha = reflection()
            .build_v1alpha()
            .map_err(|e| ServeError::Reflection(e.to_string()))?;
        // At the shutdown signal: report NOT_SERVING (for the server, "", which probes and load
        // balancers ask about, and for the Radar service), and end the open CheckStreams (after
        // the requests each has read) and health Watches (after they have seen NOT_SERVING), so
        // that the graceful shutdown below can finish: a load balancer keeps a Watch open for
        // ever.
        let watcher = health_reporter.clone();
        let drainer = self.service.drainer();
        let (signalled, on_signal) = tokio::sync::oneshot::channel::<()>();
        let shutdown = async move {
            shutdown.await;
            drainer.drain();
            let mut health = health_reporter;
            for name in ["", RADAR_SERVICE] {
                health
                    .set_service_status(name, tonic_health::ServingStatus::NotServing)
                    .await;
                health.clear_service_status(name).await;
            }
            let _ = signalled.send(());
        };
        // After a failed store commit the engine's memory holds prompts the store lacks: every
        // call is refused (its answer would count them), and health says NOT_SERVING, so that
        // load balancers send traffic elsewhere until the server is restarted.
        let engine = self.service.engine().clone();
        let mut failed = engine.failure_watch();
        tokio::spawn(async move {
            // An error: the engine is gone (with the server), never having failed.
            if failed.wait_for(|&failed| failed).await.is_err() {
                return;
            }
            for name in ["", RADAR_SERVICE] {
                watcher
                    .set_service_status(name, tonic_health::ServingStatus::NotServing)
                    .await;
            }
        });
        let token = self.auth_token;
        let radar = RadarServer::with_interceptor(self.service, move |req: tonic::Request<()>| {
            if let Some(failure) = engine.failure() {
                return Err(tonic::Status::unavailable(failure));
            }
            let Some(want) = &token else { return Ok(req) };
            let got = req
                .metadata()
                .get("authorization")
                .and_then(|v| v.to_str().ok());
            match got.is_some_and(|got| bearer_is(got, want)) {
                true => Ok(req),
                false => Err(tonic::Status::unauthenticated(
                    "authorization: missing or wrong bearer token",
                )),
            }
        });
        let server = tonic::transport::Server::builder()
            .add_service(health)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(radar)
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown);
        // A call that still does not end SHUTDOWN_GRACE after the signal (a client that stopped
        // reading its stream) is dropped: the checkpoint and the exit do not wait on a client.
        let too_late = async {
            match on_signal.await {
                Ok(()) => tokio::time::sleep(SHUTDOWN_GRACE).await,
                Err(_) => std::future::pending().await,
            }
        };
        tokio::select! {
            served = server => served?,
            () = too_late => eprintln!(
                "prompt-radar: calls still open {} s after the shutdown signal are dropped",
                SHUTDOWN_GRACE.as_secs()
            ),
        }
        Ok(())
    }
}

/// The Radar service's full name, as the health service knows it.
const RADAR_SERVICE: &str = <RadarServer<RadarService> as tonic::server::NamedService>::NAME;

/// How long the graceful shutdown waits for the calls in flight after the signal.
pub const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(30);

/// Whether an `authorization` header carries bearer token `want`: the scheme in any case
/// (RFC 7235: `bearer` from a proxy is `Bearer`), then spaces, then exactly the token.
fn bearer_is(header: &str, want: &str) -> bool {
    let Some((scheme, token)) = header.split_once(' ') else {
        return false;
    };
    scheme.eq_ignore_ascii_case("bearer")
        && same_secret(token.trim_start_matches(' ').as_bytes(), want.as_bytes())
}

/// `a == b` in a time that does not depend on where they differ: a plain comparison stops at the
/// first differing byte, which lets a client time its way to the bearer token byte by byte.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    let differ = b
        .iter()
        .enumerate()
        .fold(a.len() ^ b.len(), |acc, (i, &y)| {
            acc | usize::from(a.get(i).copied().unwrap_or(!y) ^ y)
        });
    std::hint::black_box(differ) == 0
}

/// Binds `addr` (port 0 picks a free port) and returns the listener and the bound address.
pub async fn bind(addr: SocketAddr) -> Result<(TcpListener, SocketAddr), ServeError> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    Ok((listener, local))
}

#[cfg(test)]
mod tests {
    #[test]
    fn secrets_compare_equal_only_when_equal() {
        use super::same_secret;
        assert!(same_secret(b"Bearer t0k", b"Bearer t0k"));
        assert!(!same_secret(b"Bearer t0j", b"Bearer t0k"));
        assert!(!same_secret(b"Bearer t0", b"Bearer t0k"));
        assert!(!same_secret(b"Bearer t0kk", b"Bearer t0k"));
        assert!(!same_secret(b"", b"Bearer t0k"));
        assert!(same_secret(b"", b""));
    }

    #[test]
    fn the_bearer_scheme_is_read_in_any_case_and_the_token_exactly() {
        use super::bearer_is;
        for ok in ["Bearer t0k", "bearer t0k", "BEARER  t0k"] {
            assert!(bearer_is(ok, "t0k"), "{ok}");
        }
        for wrong in [
            "Bearer t0k ",
            "Bearer T0K",
            "t0k",
            "Basic t0k",
            "Bearer",
            "Bearer ",
        ] {
            assert!(!bearer_is(wrong, "t0k"), "{wrong}");
        }
    }
}
