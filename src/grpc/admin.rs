//! `stockd.v1.Admin`: rpcs for cache warmers and SREs. The admin token is
//! checked by the interceptor in `auth.rs` before any of these runs.
//!
//! Preload and Reconcile come with their own issues; until then the
//! generated default answers UNIMPLEMENTED.

use std::time::Duration;

use tonic::{Request, Response, Status};

use super::convert;
use crate::domain::{Item, Level, RequestId, parse_expected_version};
use crate::engine::Engine;
use crate::error::Error;
use crate::flusher::Flusher;
use crate::pb;

pub struct AdminService {
    engine: Engine,
    flusher: Flusher,
}

impl AdminService {
    pub fn new(engine: Engine, flusher: Flusher) -> Self {
        Self { engine, flusher }
    }
}

#[tonic::async_trait]
impl pb::admin_server::Admin for AdminService {
    #[tracing::instrument(name = "SetStock", skip_all, fields(id = %request.get_ref().request_id))]
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

    #[tracing::instrument(name = "FlushStatus", skip_all)]
    async fn flush_status(
        &self,
        _request: Request<pb::FlushStatusRequest>,
    ) -> Result<Response<pb::FlushStatusResponse>, Status> {
        // The status matters most while Postgres is down: answer from Redis
        // then, without the checkpoints.
        let checkpoints = match tokio::time::timeout(
            Duration::from_secs(1),
            self.flusher.store().checkpoints(),
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
            let backlog = self.flusher.backlog(p).await.map_err(Error::from)?;
            partitions.push(pb::PartitionFlushStatus {
                partition: p.0,
                stream_length: backlog.stream_length,
                pending: backlog.unflushed,
                last_flushed_id: checkpoints
                    .get(&p.0)
                    .map(|c| c.last_entry_id.clone())
                    .unwrap_or_default(),
                oldest_unflushed_age_ms: backlog.oldest_unflushed_age_ms,
                dead_letters: backlog.dead_letters,
            });
        }
        Ok(Response::new(pb::FlushStatusResponse { partitions }))
    }
}
