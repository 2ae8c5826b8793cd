//! `stockd.v1.Admin`: rpcs for cache warmers and SREs. The admin token is
//! checked by the interceptor in `auth.rs` before any of these runs.
//!

use std::time::Duration;

use tonic::{Request, Response, Status};

use super::convert;
use crate::backlog::Housekeeper;
use crate::domain::{Item, Level, RequestId, Sku, parse_expected_version};
use crate::engine::Engine;
use crate::error::Error;
use crate::pb;
use crate::reconcile::{Class, Mode, Reconciler, Scope};
use crate::warmer::{PreloadCounts, Warmer};
use crate::webhooks::Subscriptions;

pub struct AdminService {
    engine: Engine,
    backlog: Housekeeper,
    warmer: Warmer,
    reconciler: Reconciler,
    webhooks: Subscriptions,
}

impl AdminService {
    pub fn new(
        engine: Engine,
        backlog: Housekeeper,
        warmer: Warmer,
        reconciler: Reconciler,
        webhooks: Subscriptions,
    ) -> Self {
        Self {
            engine,
            backlog,
            warmer,
            reconciler,
            webhooks,
        }
    }
}

/// SKUs of a Preload or Reconcile: either these or `all`.
fn skus_or_all(skus: Vec<String>, all: bool) -> Result<Option<Vec<String>>, Error> {
    match (all, skus.is_empty()) {
        (true, false) => Err(Error::invalid("skus", "give SKUs or `all`, not both")),
        (false, true) => Err(Error::invalid("skus", "give SKUs or `all`")),
        (true, true) => Ok(None),
        (false, false) => {
            if skus.len() > MAX_SKUS {
                return Err(Error::invalid(
                    "skus",
                    format!("at most {MAX_SKUS} SKUs per request, got {}", skus.len()),
                ));
            }
            let skus = skus
                .into_iter()
                .enumerate()
                .map(|(i, s)| Sku::parse(&format!("skus[{i}]"), s).map(|s| s.to_string()))
                .collect::<Result<Vec<_>, _>>()?;
            Ok(Some(skus))
        }
    }
}

/// Most SKUs one Preload or Reconcile may name.
const MAX_SKUS: usize = 10_000;

#[tonic::async_trait]
impl pb::admin_server::Admin for AdminService {
    #[tracing::instrument(name = "SetStock", skip_all, fields(id = ?request.get_ref().request_id))]
    async fn set_stock(
        &self,
        request: Request<pb::SetStockRequest>,
    ) -> Result<Response<pb::SetStockResponse>, Status> {
        let req = request.into_inner();
        let id = RequestId::parse("request_id", req.request_id)?;
        let item = Item::parse("", req.sku, req.location)?;
        let available = Level::parse("available", req.available)?;
        let expected = parse_expected_version("expected_version", req.expected_version)?;
        let changed = self.engine.set(&id, &item, available, expected).await?;
        Ok(Response::new(pb::SetStockResponse {
            level: Some(convert::single_level(changed.levels)?),
            replayed: changed.replayed,
        }))
    }

    #[tracing::instrument(name = "Preload", skip_all, fields(all = request.get_ref().all, skus = request.get_ref().skus.len()))]
    async fn preload(
        &self,
        request: Request<pb::PreloadRequest>,
    ) -> Result<Response<pb::PreloadResponse>, Status> {
        let req = request.into_inner();
        let (counts, next) = match skus_or_all(req.skus, req.all)? {
            Some(skus) => (self.warmer.preload_skus(&skus).await?, None),
            None if req.page_size == 0 => (self.warmer.preload_all().await?, None),
            None => {
                let after = parse_cursor(&req.cursor)?;
                self.warmer
                    .preload_page(after, i64::from(req.page_size))
                    .await?
            }
        };
        let PreloadCounts {
            loaded,
            skipped,
            not_found,
        } = counts;
        tracing::info!(loaded, skipped, not_found, "preloaded");
        Ok(Response::new(pb::PreloadResponse {
            loaded,
            skipped,
            not_found,
            next_cursor: next
                .map(|(sku, loc)| format!("{sku}\t{loc}"))
                .unwrap_or_default(),
        }))
    }

    #[tracing::instrument(name = "Reconcile", skip_all, fields(all = request.get_ref().all, mode = request.get_ref().mode))]
    async fn reconcile(
        &self,
        request: Request<pb::ReconcileRequest>,
    ) -> Result<Response<pb::ReconcileResponse>, Status> {
        let req = request.into_inner();
        let mode = match pb::ReconcileMode::try_from(req.mode) {
            Ok(pb::ReconcileMode::Unspecified | pb::ReconcileMode::Report) => Mode::Report,
            Ok(pb::ReconcileMode::Repair) => Mode::Repair,
            Err(_) => {
                return Err(Error::invalid("mode", format!("unknown mode {}", req.mode)).into());
            }
        };
        let scope = match skus_or_all(req.skus, req.all)? {
            Some(skus) => Scope::Skus(skus),
            None => Scope::All,
        };
        let page_size = (req.page_size > 0).then_some(req.page_size as usize);
        let report = self
            .reconciler
            .reconcile(scope, mode, page_size, &req.cursor)
            .await?;
        let level = |l: Option<crate::domain::StockLevel>| l.map(convert::level);
        Ok(Response::new(pb::ReconcileResponse {
            checked: report.checked,
            in_sync: report.count(Class::InSync),
            pending_flush: report.count(Class::PendingFlush),
            redis_stale: report.count(Class::RedisStale),
            drift: report.count(Class::Drift),
            missing_in_redis: report.count(Class::MissingInRedis),
            missing_in_postgres: report.count(Class::MissingInPostgres),
            ledger_mismatch: report.count(Class::LedgerMismatch),
            repaired: report.repaired,
            held_back: report.held_back,
            items: report
                .items
                .into_iter()
                .map(|i| pb::ReconcileItem {
                    sku: i.sku,
                    location: i.location,
                    state: pb::ItemState::from(i.class).into(),
                    redis: level(i.redis),
                    postgres: level(i.postgres),
                })
                .collect(),
            next_cursor: report.next_cursor.unwrap_or_default(),
        }))
    }

    #[tracing::instrument(name = "FlushStatus", skip_all)]
    async fn flush_status(
        &self,
        _request: Request<pb::FlushStatusRequest>,
    ) -> Result<Response<pb::FlushStatusResponse>, Status> {
        // The status matters most while Postgres is down: answer from Redis
        // then, without the checkpoints.
        let checkpoints = match tokio::time::timeout(
            Duration::from_secs(1),
            self.warmer.store().checkpoints(),
        )
        .await
        {
            Ok(Ok(checkpoints)) => checkpoints,
            Ok(Err(err)) => {
                tracing::warn!(error = %err, "flush status without checkpoints: postgres failed");
                Default::default()
            }
            Err(_) => {
                tracing::warn!("flush status without checkpoints: postgres did not answer in time");
                Default::default()
            }
        };
        let mut partitions = Vec::new();
        for p in self.engine.keys().partitions() {
            let backlog = self.backlog.backlog(p).await.map_err(Error::from)?;
            let flusher = backlog.group(crate::flusher::GROUP);
            partitions.push(pb::PartitionFlushStatus {
                partition: p.0,
                stream_length: backlog.stream_length,
                pending: flusher.map_or(0, |g| g.unhandled),
                last_flushed_id: checkpoints
                    .get(&p.0)
                    .map(|c| c.last_entry_id.clone())
                    .unwrap_or_default(),
                oldest_unflushed_age_ms: flusher.map_or(0, |g| g.oldest_unhandled_age_ms),
                dead_letters: backlog.dead_letters,
                exports: backlog
                    .groups
                    .iter()
                    .filter_map(|g| {
                        crate::export::exporter_of(g.group).map(|exporter| {
                            pb::PartitionExportStatus {
                                exporter: exporter.to_owned(),
                                backlog: g.unhandled,
                                lag_ms: g.oldest_unhandled_age_ms,
                            }
                        })
                    })
                    .collect(),
            });
        }
        Ok(Response::new(pb::FlushStatusResponse { partitions }))
    }

    // Webhooks: the work is in src/webhooks/subscriptions.rs.

    #[tracing::instrument(name = "AddWebhook", skip_all)]
    async fn add_webhook(
        &self,
        request: Request<pb::AddWebhookRequest>,
    ) -> Result<Response<pb::AddWebhookResponse>, Status> {
        let added = self.webhooks.add(request.into_inner()).await?;
        Ok(Response::new(added))
    }

    #[tracing::instrument(name = "ListWebhooks", skip_all)]
    async fn list_webhooks(
        &self,
        request: Request<pb::ListWebhooksRequest>,
    ) -> Result<Response<pb::ListWebhooksResponse>, Status> {
        Ok(Response::new(
            self.webhooks.list(request.into_inner()).await?,
        ))
    }

    #[tracing::instrument(name = "RemoveWebhook", skip_all, fields(id = request.get_ref().id))]
    async fn remove_webhook(
        &self,
        request: Request<pb::RemoveWebhookRequest>,
    ) -> Result<Response<pb::RemoveWebhookResponse>, Status> {
        let removed = self.webhooks.remove(request.into_inner()).await?;
        Ok(Response::new(removed))
    }

    #[tracing::instrument(name = "ListWebhookDeadLetters", skip_all)]
    async fn list_webhook_dead_letters(
        &self,
        request: Request<pb::ListWebhookDeadLettersRequest>,
    ) -> Result<Response<pb::ListWebhookDeadLettersResponse>, Status> {
        let listed = self.webhooks.dead_letters(request.into_inner()).await?;
        Ok(Response::new(listed))
    }

    #[tracing::instrument(name = "RedeliverWebhook", skip_all)]
    async fn redeliver_webhook(
        &self,
        request: Request<pb::RedeliverWebhookRequest>,
    ) -> Result<Response<pb::RedeliverWebhookResponse>, Status> {
        let requeued = self.webhooks.redeliver(request.into_inner()).await?;
        Ok(Response::new(requeued))
    }
}

/// A Preload cursor is `sku<TAB>location` of the last item of the previous
/// page (neither may hold whitespace, so the tab is unambiguous).
fn parse_cursor(cursor: &str) -> Result<Option<(String, String)>, Error> {
    if cursor.is_empty() {
        return Ok(None);
    }
    match cursor.split_once('\t') {
        Some((sku, loc)) if !sku.is_empty() && !loc.is_empty() => {
            Ok(Some((sku.to_owned(), loc.to_owned())))
        }
        _ => Err(Error::invalid(
            "cursor",
            "not a cursor this server returned",
        )),
    }
}
