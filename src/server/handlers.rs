//! The `promptradar.v1.Radar` handlers. Each validates, calls the engine or the pipeline, and
//! converts; compute (HNSW search, listing) runs on the blocking pool, never on tokio workers.

use std::sync::Arc;

use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::convert;
use super::pipeline::{CheckPipeline, Timed};
use super::stats::{ServerStats, refusal};
use super::validate;
use crate::config::Limits;
use crate::detect::{AccountSummary, Verdict};
use crate::engine::{Engine, SearchFilter};
use crate::error::Error;
use crate::proto::{self, radar_server::Radar};

/// The service state shared by every request.
#[derive(Clone)]
pub struct RadarService {
    engine: Arc<Engine>,
    pipeline: Arc<CheckPipeline>,
    limits: Limits,
    /// True once the server is shutting down: open CheckStreams stop taking requests.
    draining: Arc<watch::Sender<bool>>,
    /// What Check and CheckStream answered, for GetStats.
    stats: Arc<ServerStats>,
}

/// Starts a server's drain: see [`RadarService::drainer`].
#[derive(Clone)]
pub struct Drainer(Arc<watch::Sender<bool>>);

impl Drainer {
    /// From now on, every open CheckStream answers the requests it has read and then ends with
    /// `UNAVAILABLE`; one that opens later ends at once. Unary calls are not affected.
    pub fn drain(&self) {
        self.0.send_replace(true);
    }
}

impl RadarService {
    /// A service over a running engine and pipeline; `stats` are those the pipeline counts in.
    pub fn new(
        engine: Arc<Engine>,
        pipeline: Arc<CheckPipeline>,
        limits: Limits,
        stats: Arc<ServerStats>,
    ) -> Self {
        Self {
            engine,
            pipeline,
            limits,
            draining: Arc::new(watch::channel(false).0),
            stats,
        }
    }

    /// What ends the open CheckStreams at shutdown. A gateway's stream lives as long as the
    /// gateway, so a graceful shutdown that waits for every open call would wait for ever.
    pub fn drainer(&self) -> Drainer {
        Drainer(self.draining.clone())
    }

    /// The engine (for in-process use and tests).
    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Error> + Send + 'static,
) -> Result<T, Status> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(Status::from),
        Err(e) => Err(Status::internal(format!("worker task failed: {e}"))),
    }
}

/// A verdict and its server-side time in microseconds. The pipeline counted it in `stats` (or
/// its failure), whether or not this caller is still waiting; only a pipeline that stopped
/// without an answer is counted here.
async fn await_verdict(
    rx: tokio::sync::oneshot::Receiver<Timed<Verdict>>,
    stats: &ServerStats,
) -> Result<(Verdict, u64), Status> {
    match rx.await {
        Ok(Ok((v, t))) => Ok((v, t.as_micros() as u64)),
        Ok(Err(e)) => Err(Status::from(e)),
        Err(_) => Err(counted(
            Status::unavailable("check pipeline stopped"),
            stats,
        )),
    }
}

/// `status`, counted in `stats` as a refused or failed check.
fn counted(status: Status, stats: &ServerStats) -> Status {
    stats.record(refusal(status.code()));
    status
}

type CheckStream = ReceiverStream<Result<proto::CheckResponse, Status>>;
/// `StreamAccounts`' response: a listing taken at once, sent an account a message.
type AccountStream = tokio_stream::Iter<
    std::iter::Map<
        std::vec::IntoIter<AccountSummary>,
        fn(AccountSummary) -> Result<proto::Account, Status>,
    >,
>;

#[tonic::async_trait]
impl Radar for RadarService {
    async fn check(
        &self,
        request: Request<proto::CheckRequest>,
    ) -> Result<Response<proto::CheckResponse>, Status> {
        let r = request.into_inner();
        let stats = &self.stats;
        let p = validate::prompt(&r.account_id, &r.prompt, r.timestamp_ms, &self.limits)
            .map_err(|e| counted(e.into(), stats))?;
        let rx = self
            .pipeline
            .try_check(p.prompt, p.account_id.clone(), p.timestamp_ms)
            .map_err(|e| counted(e.into(), stats))?;
        let (v, micros) = await_verdict(rx, stats).await?;
        Ok(Response::new(convert::check_response(
            r.request_id,
            p.account_id,
            &v,
            micros,
        )))
    }

    type CheckStreamStream = CheckStream;

    async fn check_stream(
        &self,
        request: Request<Streaming<proto::CheckRequest>>,
    ) -> Result<Response<Self::CheckStreamStream>, Status> {
        let mut input = request.into_inner();
        let in_flight = self.limits.stream_in_flight.max(1);
        // Bounded: at most `in_flight` prompts of this stream are queued or being processed;
        // reading the client's stream pauses beyond that (HTTP/2 flow control does the rest).
        let (pending_tx, mut pending_rx) = mpsc::channel::<Pending>(in_flight);
        let (out_tx, out_rx) = mpsc::channel(in_flight);
        let (pipeline, limits) = (self.pipeline.clone(), self.limits.clone());
        let stats = self.stats.clone();
        let reader_stats = self.stats.clone();
        let engine = self.engine.clone();
        let mut draining = self.draining.subscribe();
        tokio::spawn(async move {
            let mut read = 0u64;
            loop {
                let next = tokio::select! {
                    biased;
                    () = async { drop(draining.wait_for(|d| *d).await) } => {
                        let status = Status::unavailable(format!(
                            "server shutting down: the stream's first {read} requests are answered (and what was accepted is stored); send the rest again (another server, or this one once restarted)"
                        ));
                        let _ = pending_tx.send(Pending::Failed(status)).await;
                        break;
                    }
                    next = input.message() => next,
                };
                let r = match next {
                    Ok(Some(r)) => r,
                    Ok(None) => break,
                    Err(status) => {
                        let _ = pending_tx.send(Pending::Failed(status)).await;
                        break;
                    }
                };
                read += 1;
                let item = match validate::prompt(&r.account_id, &r.prompt, r.timestamp_ms, &limits)
                {
                    // Echoed as an accepted item's is: trimmed.
                    Err(e) => {
                        let account_id = r.account_id.trim().to_string();
                        Pending::Rejected(r.request_id, account_id, e.into())
                    }
                    // Refused before the model runs: nothing is stored after a failed commit.
                    Ok(p) if let Some(failure) = engine.failure() => {
                        Pending::Rejected(r.request_id, p.account_id, Status::unavailable(failure))
                    }
                    Ok(p) => match pipeline
                        .check(p.prompt, p.account_id.clone(), p.timestamp_ms)
                        .await
                    {
                        Ok(rx) => Pending::Queued(r.request_id, p.account_id, rx),
                        Err(e) => Pending::Rejected(r.request_id, p.account_id, e.into()),
                    },
                };
                // A refusal is counted as it is made, as a unary Check's is: a client that goes
                // away before reading its answer still had the request read and refused.
                if let Pending::Rejected(_, _, status) = &item {
                    reader_stats.record(refusal(status.code()));
                }
                if pending_tx.send(item).await.is_err() {
                    break; // the client went away
                }
            }
        });
        // Answers in request order. When the client goes away (a cancel), the pending requests
        // are dropped at once: those still waiting for the model are then dropped by the
        // batcher (counted as cancelled), as a cancelled unary Check is.
        tokio::spawn(async move {
            loop {
                let item = tokio::select! {
                    biased;
                    () = out_tx.closed() => break,
                    item = pending_rx.recv() => match item {
                        Some(item) => item,
                        None => break,
                    },
                };
                let out = match item {
                    Pending::Queued(id, account, rx) => {
                        let answer = tokio::select! {
                            biased;
                            () = out_tx.closed() => break,
                            answer = await_verdict(rx, &stats) => answer,
                        };
                        Ok(match answer {
                            Ok((v, micros)) => convert::check_response(id, account, &v, micros),
                            Err(status) => convert::check_error(id, account, &status),
                        })
                    }
                    Pending::Rejected(id, account, status) => {
                        Ok(convert::check_error(id, account, &status))
                    }
                    Pending::Failed(status) => Err(status),
                };
                if out_tx.send(out).await.is_err() {
                    break;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(out_rx)))
    }

    async fn search(
        &self,
        request: Request<proto::SearchRequest>,
    ) -> Result<Response<proto::SearchResponse>, Status> {
        let r = request.into_inner();
        let k = validate::k(r.k, &self.limits)?;
        for (field, ms) in [("from_ms", r.from_ms), ("to_ms", r.to_ms)] {
            if ms < 0 {
                return Err(Error::invalid(field, "must not be negative (0 = unbounded)").into());
            }
        }
        if r.to_ms > 0 && r.from_ms > r.to_ms {
            return Err(Error::invalid("from_ms", "must not be after to_ms").into());
        }
        let account_id = Some(r.account_id.trim().to_string()).filter(|a| !a.is_empty());
        let filter = SearchFilter {
            account_id,
            from_ms: (r.from_ms > 0).then_some(r.from_ms),
            to_ms: (r.to_ms > 0).then_some(r.to_ms),
        };
        let engine = self.engine.clone();
        let hits = match r.query {
            Some(proto::search_request::Query::Text(t)) => {
                validate::text("text", &t, &self.limits)?;
                let query = self.pipeline.embed(t).await?;
                blocking(move || engine.search(&query, k, &filter)).await?
            }
            Some(proto::search_request::Query::PromptId(0)) => {
                // As GetCampaign's: 0 is proto3's unset number, and ids start at 1.
                return Err(Error::invalid("prompt_id", "required (ids start at 1)").into());
            }
            Some(proto::search_request::Query::PromptId(id)) => {
                blocking(move || engine.search_like(id, k, &filter)).await?
            }
            None => return Err(Error::invalid("query", "set either text or prompt_id").into()),
        };
        Ok(Response::new(proto::SearchResponse {
            hits: hits.into_iter().map(convert::hit).collect(),
        }))
    }

    async fn list_campaigns(
        &self,
        request: Request<proto::ListCampaignsRequest>,
    ) -> Result<Response<proto::ListCampaignsResponse>, Status> {
        let r = request.into_inner();
        if !(0.0..=1.0).contains(&r.min_score) {
            return Err(Error::invalid("min_score", "must be within [0, 1]").into());
        }
        let top = if r.top == 0 { 20 } else { r.top as usize };
        let engine = self.engine.clone();
        let (list, total) = blocking(move || engine.campaigns(top, r.min_score)).await?;
        Ok(Response::new(proto::ListCampaignsResponse {
            campaigns: list.into_iter().map(convert::campaign).collect(),
            total: u32::try_from(total).unwrap_or(u32::MAX),
        }))
    }

    async fn get_campaign(
        &self,
        request: Request<proto::GetCampaignRequest>,
    ) -> Result<Response<proto::Campaign>, Status> {
        let id = request.into_inner().campaign_id;
        if id == 0 {
            return Err(Error::invalid("campaign_id", "required (ids start at 1)").into());
        }
        let engine = self.engine.clone();
        Ok(Response::new(convert::campaign(
            blocking(move || engine.campaign(id)).await?,
        )))
    }

    async fn list_accounts(
        &self,
        request: Request<proto::ListAccountsRequest>,
    ) -> Result<Response<proto::ListAccountsResponse>, Status> {
        let r = request.into_inner();
        let engine = self.engine.clone();
        let list = blocking(move || Ok(engine.accounts(r.flagged_only, r.limit as usize))).await?;
        Ok(Response::new(proto::ListAccountsResponse {
            accounts: list.into_iter().map(convert::account).collect(),
        }))
    }

    type StreamAccountsStream = AccountStream;

    async fn stream_accounts(
        &self,
        request: Request<proto::ListAccountsRequest>,
    ) -> Result<Response<AccountStream>, Status> {
        let r = request.into_inner();
        let engine = self.engine.clone();
        let list = blocking(move || Ok(engine.accounts(r.flagged_only, r.limit as usize))).await?;
        // Converted one message at a time, as the transport takes them.
        let convert: fn(AccountSummary) -> Result<proto::Account, Status> =
            |a| Ok(convert::account(a));
        Ok(Response::new(tokio_stream::iter(
            list.into_iter().map(convert),
        )))
    }

    async fn get_account(
        &self,
        request: Request<proto::GetAccountRequest>,
    ) -> Result<Response<proto::Account>, Status> {
        let request = request.into_inner();
        // Checked as Check checks it: an id no account can have is a wrong argument, and an
        // unbounded one would not fit the NOT_FOUND message's header.
        let id = validate::account_id(&request.account_id, &self.limits)?.to_string();
        let engine = self.engine.clone();
        Ok(Response::new(convert::account(
            blocking(move || engine.account(&id)).await?,
        )))
    }

    async fn allow_template(
        &self,
        request: Request<proto::AllowTemplateRequest>,
    ) -> Result<Response<proto::AllowTemplateResponse>, Status> {
        use proto::allow_template_request::Source;
        let req = request.into_inner();
        let note = req.note;
        if note.len() > 4096 {
            return Err(Error::invalid("note", "at most 4096 bytes").into());
        }
        let engine = self.engine.clone();
        let now = validate::now_ms();
        let allowed = match req.source {
            Some(Source::Template(t)) => {
                validate::text("template", &t, &self.limits)?;
                blocking(move || engine.allow_template(&t, &note, now)).await?
            }
            Some(Source::CampaignId(0)) => {
                return Err(Error::invalid("campaign_id", "required (ids start at 1)").into());
            }
            Some(Source::CampaignId(id)) => {
                blocking(move || engine.allow_campaign(id, &note, now)).await?
            }
            None => {
                return Err(Error::invalid("source", "give a template or a campaign_id").into());
            }
        };
        Ok(Response::new(proto::AllowTemplateResponse {
            entry: Some(convert::allowed(allowed.entry)),
            campaigns_cleared: allowed.cleared as u32,
            already_listed: allowed.already_listed,
            campaigns_not_cleared: allowed.not_cleared,
        }))
    }

    async fn list_allowed_templates(
        &self,
        _request: Request<proto::ListAllowedTemplatesRequest>,
    ) -> Result<Response<proto::ListAllowedTemplatesResponse>, Status> {
        Ok(Response::new(proto::ListAllowedTemplatesResponse {
            templates: self
                .engine
                .allowed_templates()
                .into_iter()
                .map(convert::allowed)
                .collect(),
        }))
    }

    async fn remove_allowed_template(
        &self,
        request: Request<proto::RemoveAllowedTemplateRequest>,
    ) -> Result<Response<proto::RemoveAllowedTemplateResponse>, Status> {
        let id = request.into_inner().id;
        let engine = self.engine.clone();
        Ok(Response::new(convert::removed(
            blocking(move || engine.remove_allowed(id)).await?,
        )))
    }

    async fn get_stats(
        &self,
        _request: Request<proto::GetStatsRequest>,
    ) -> Result<Response<proto::Stats>, Status> {
        let engine = self.engine.clone();
        let census = blocking(move || Ok(engine.census())).await?;
        let queue = (self.pipeline.queued(), self.pipeline.queue_capacity());
        Ok(Response::new(convert::stats(
            &self.stats.read(),
            queue,
            &census,
        )))
    }
}

/// A stream item between reading and answering, kept in request order.
enum Pending {
    Queued(
        String,
        String,
        tokio::sync::oneshot::Receiver<Timed<Verdict>>,
    ),
    Rejected(String, String, Status),
    Failed(Status),
}
