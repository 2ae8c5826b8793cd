//! `stockd.v1.Inventory`: the checkout-facing rpcs.

use tokio_stream::StreamExt;
use tonic::codegen::BoxStream;
use tonic::{Request, Response, Status};

use super::convert;
use crate::domain::{Delta, Item, RequestId, Ttl, parse_reason};
use crate::engine::Engine;
use crate::pb;
use crate::watch::{self, Filter, Hub};

pub struct InventoryService {
    engine: Engine,
    /// The instance's Watch fan-out (src/watch.rs).
    hub: Hub,
}

impl InventoryService {
    pub fn new(engine: Engine, hub: Hub) -> Self {
        Self { engine, hub }
    }
}

/// The reason is free text with spaces and quotes: logged quoted and escaped
/// (Debug), so that `damaged" x=y` cannot pose as a field of its own. At
/// debug, as every per-request line (the event in the stream is the record).
fn log_adjust(item: &Item, delta: Delta, reason: &str) {
    tracing::debug!(item = ?item.to_string(), delta = delta.get(), ?reason, "adjust");
}

#[tonic::async_trait]
impl pb::inventory_server::Inventory for InventoryService {
    #[tracing::instrument(name = "Reserve", skip_all, fields(id = ?request.get_ref().reservation_id))]
    async fn reserve(
        &self,
        request: Request<pb::ReserveRequest>,
    ) -> Result<Response<pb::ReserveResponse>, Status> {
        let req = request.into_inner();
        let id = RequestId::parse("reservation_id", req.reservation_id)?;
        let lines = convert::lines("lines", req.lines)?;
        let ttl = Ttl::parse("ttl_seconds", req.ttl_seconds)?;
        let reserved = self.engine.reserve(&id, &lines, ttl).await?;
        Ok(Response::new(pb::ReserveResponse {
            reservation_id: id.to_string(),
            expires_at_ms: reserved.expires_at_ms,
            levels: convert::levels(reserved.levels),
            replayed: reserved.replayed,
        }))
    }

    #[tracing::instrument(name = "Commit", skip_all, fields(id = ?request.get_ref().reservation_id))]
    async fn commit(
        &self,
        request: Request<pb::CommitRequest>,
    ) -> Result<Response<pb::CommitResponse>, Status> {
        let id = RequestId::parse("reservation_id", request.into_inner().reservation_id)?;
        let changed = self.engine.commit(&id).await?;
        Ok(Response::new(pb::CommitResponse {
            levels: convert::levels(changed.levels),
            replayed: changed.replayed,
        }))
    }

    #[tracing::instrument(name = "Release", skip_all, fields(id = ?request.get_ref().reservation_id))]
    async fn release(
        &self,
        request: Request<pb::ReleaseRequest>,
    ) -> Result<Response<pb::ReleaseResponse>, Status> {
        let id = RequestId::parse("reservation_id", request.into_inner().reservation_id)?;
        let changed = self.engine.release(&id).await?;
        Ok(Response::new(pb::ReleaseResponse {
            levels: convert::levels(changed.levels),
            replayed: changed.replayed,
        }))
    }

    #[tracing::instrument(name = "Extend", skip_all, fields(id = ?request.get_ref().reservation_id))]
    async fn extend(
        &self,
        request: Request<pb::ExtendRequest>,
    ) -> Result<Response<pb::ExtendResponse>, Status> {
        let req = request.into_inner();
        let id = RequestId::parse("reservation_id", req.reservation_id)?;
        let ttl = Ttl::parse_required("ttl_seconds", req.ttl_seconds)?;
        let expires_at_ms = self.engine.extend(&id, ttl).await?;
        Ok(Response::new(pb::ExtendResponse { expires_at_ms }))
    }

    #[tracing::instrument(name = "Decrement", skip_all, fields(id = ?request.get_ref().request_id))]
    async fn decrement(
        &self,
        request: Request<pb::DecrementRequest>,
    ) -> Result<Response<pb::DecrementResponse>, Status> {
        let req = request.into_inner();
        let id = RequestId::parse("request_id", req.request_id)?;
        let lines = convert::lines("lines", req.lines)?;
        let changed = self.engine.decrement(&id, &lines).await?;
        Ok(Response::new(pb::DecrementResponse {
            levels: convert::levels(changed.levels),
            replayed: changed.replayed,
        }))
    }

    #[tracing::instrument(name = "Adjust", skip_all, fields(id = ?request.get_ref().request_id))]
    async fn adjust(
        &self,
        request: Request<pb::AdjustRequest>,
    ) -> Result<Response<pb::AdjustResponse>, Status> {
        let req = request.into_inner();
        let id = RequestId::parse("request_id", req.request_id)?;
        let item = Item::parse("", req.sku, req.location)?;
        let delta = Delta::parse("delta", req.delta)?;
        let reason = parse_reason("reason", req.reason)?;
        log_adjust(&item, delta, &reason);
        let changed = self.engine.adjust(&id, &item, delta, &reason).await?;
        Ok(Response::new(pb::AdjustResponse {
            level: Some(convert::single_level(changed.levels)?),
            replayed: changed.replayed,
        }))
    }

    #[tracing::instrument(name = "GetStock", skip_all)]
    async fn get_stock(
        &self,
        request: Request<pb::GetStockRequest>,
    ) -> Result<Response<pb::GetStockResponse>, Status> {
        let items = convert::items("items", request.into_inner().items)?;
        let (levels, missing) = self.engine.get(&items).await?;
        Ok(Response::new(pb::GetStockResponse {
            levels: convert::levels(levels),
            missing: missing.into_iter().map(convert::item_ref).collect(),
        }))
    }

    #[tracing::instrument(name = "Watch", skip_all, fields(skus = request.get_ref().skus.len(), from = %request.get_ref().from_event_id))]
    async fn watch(
        &self,
        request: Request<pb::WatchRequest>,
    ) -> Result<Response<BoxStream<pb::StockEvent>>, Status> {
        let request = request.into_inner();
        let filter = Filter::parse("skus", request.skus)?;
        let from = watch::parse_resume("from_event_id", &request.from_event_id)?;
        let events = self.hub.watch(filter, from).await?.map(|item| match item {
            Ok(event) => Ok(convert::stock_event(&event)),
            Err(interrupted) => Err(interrupted.error.into()),
        });
        Ok(Response::new(Box::pin(events)))
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    use super::*;

    /// The log output of a test, as the text formatter writes it.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn an_adjust_reason_cannot_forge_log_fields() {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_max_level(tracing::Level::DEBUG)
            .with_writer(move || writer.clone())
            .finish();
        let item = Item::parse("", "mug".into(), String::new()).unwrap();
        let delta = Delta::parse("delta", -1).unwrap();
        tracing::subscriber::with_default(subscriber, || {
            log_adjust(&item, delta, r#"damaged" x=y"#)
        });
        let line = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
        assert!(
            line.trim_end()
                .ends_with(r#"item="default/mug" delta=-1 reason="damaged\" x=y""#),
            "{line}"
        );
    }
}
