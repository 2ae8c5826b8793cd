//! `stockd.v1.Admin`: rpcs for cache warmers and SREs. The admin token is
//! checked by the interceptor in `auth.rs` before any of these runs.
//!
//! Preload, Reconcile and FlushStatus come with their own issues; until then
//! the generated default answers UNIMPLEMENTED.

use tonic::{Request, Response, Status};

use super::convert;
use crate::domain::{Item, Level, RequestId, parse_expected_version};
use crate::engine::Engine;
use crate::pb;

pub struct AdminService {
    engine: Engine,
}

impl AdminService {
    pub fn new(engine: Engine) -> Self {
        Self { engine }
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
}
