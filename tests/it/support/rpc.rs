//! Typed calls of stockd's gRPC services, so that a test says what it asks
//! (`app.reserve("cart", vec![line("shirt", "", 2)], 60)`) instead of
//! building request literals. Each call answers the response message or the
//! refusal's status. [`Rpc`] is implemented by [`TestApp`] (the in-process
//! server) and by [`Clients`] (any channel, such as a `stockd` process of
//! the test's own).
//!
//! The request builders serve the tests that send a request another way:
//! with metadata of their own, many times, or through a client they hold.

use std::net::SocketAddr;

use stockd::pb;
use stockd::pb::admin_client::AdminClient;
use stockd::pb::inventory_client::InventoryClient;
use tonic::transport::{Channel, Endpoint};
use tonic::{Response, Status, Streaming};

use super::TestApp;

pub fn line(sku: &str, location: &str, quantity: i64) -> pb::Line {
    pb::Line {
        sku: sku.into(),
        location: location.into(),
        quantity,
    }
}

pub fn item(sku: &str, location: &str) -> pb::ItemRef {
    pb::ItemRef {
        sku: sku.into(),
        location: location.into(),
    }
}

pub fn reserve_request(id: &str, lines: Vec<pb::Line>, ttl_seconds: u32) -> pb::ReserveRequest {
    pb::ReserveRequest {
        reservation_id: id.into(),
        lines,
        ttl_seconds,
    }
}

pub fn commit_request(id: &str) -> pb::CommitRequest {
    pb::CommitRequest {
        reservation_id: id.into(),
    }
}

pub fn release_request(id: &str) -> pb::ReleaseRequest {
    pb::ReleaseRequest {
        reservation_id: id.into(),
    }
}

pub fn extend_request(id: &str, ttl_seconds: u32) -> pb::ExtendRequest {
    pb::ExtendRequest {
        reservation_id: id.into(),
        ttl_seconds,
    }
}

pub fn decrement_request(id: &str, lines: Vec<pb::Line>) -> pb::DecrementRequest {
    pb::DecrementRequest {
        request_id: id.into(),
        lines,
    }
}

pub fn adjust_request(
    id: &str,
    sku: &str,
    location: &str,
    delta: i64,
    reason: &str,
) -> pb::AdjustRequest {
    pb::AdjustRequest {
        request_id: id.into(),
        sku: sku.into(),
        location: location.into(),
        delta,
        reason: reason.into(),
    }
}

/// SetStock without a version check (see [`Rpc::set_if_version`]).
pub fn set_request(id: &str, sku: &str, location: &str, available: i64) -> pb::SetStockRequest {
    pb::SetStockRequest {
        request_id: id.into(),
        sku: sku.into(),
        location: location.into(),
        available,
        expected_version: None,
    }
}

/// GetStock of `(sku, location)` pairs.
pub fn get_request(items: &[(&str, &str)]) -> pb::GetStockRequest {
    pb::GetStockRequest {
        items: items.iter().map(|(sku, loc)| item(sku, loc)).collect(),
    }
}

/// Reconcile of every SKU, in one page.
pub fn reconcile_all_request(mode: pb::ReconcileMode) -> pb::ReconcileRequest {
    pb::ReconcileRequest {
        all: true,
        mode: mode as i32,
        ..Default::default()
    }
}

/// Preload of every SKU, in one page.
pub fn preload_all_request() -> pb::PreloadRequest {
    pb::PreloadRequest {
        all: true,
        ..Default::default()
    }
}

/// A webhook subscription of `url` to `events`, every SKU, the server's
/// secret (struct update for the other fields).
pub fn webhook_request(url: &str, events: &[pb::WebhookEvent]) -> pb::AddWebhookRequest {
    pb::AddWebhookRequest {
        url: url.into(),
        events: events.iter().map(|&event| event.into()).collect(),
        ..Default::default()
    }
}

/// `message` with the `authorization` header `value` (scheme and token).
pub fn with_authorization<T>(value: &str, message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", value.parse().unwrap());
    request
}

/// `message` with the bearer `token`.
pub fn with_token<T>(token: &str, message: T) -> tonic::Request<T> {
    with_authorization(&format!("Bearer {token}"), message)
}

/// Both services' clients on one channel.
#[derive(Clone)]
pub struct Clients {
    pub inventory: InventoryClient<Channel>,
    pub admin: AdminClient<Channel>,
}

impl Clients {
    pub fn new(channel: Channel) -> Self {
        Self {
            inventory: InventoryClient::new(channel.clone()),
            admin: AdminClient::new(channel),
        }
    }

    /// Clients on a connection of their own to `addr` that advertises a
    /// 4 KiB HTTP/2 window: one that then reads nothing soon has the
    /// server's sends wait on it (a slow consumer).
    pub async fn small_window(addr: SocketAddr) -> Self {
        let channel = Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .initial_stream_window_size(4096)
            .initial_connection_window_size(4096)
            .connect()
            .await
            .unwrap();
        Self::new(channel)
    }
}

/// The rpcs of stockd, each a typed call. Implementors only hand out their
/// clients.
pub trait Rpc {
    fn clients(&self) -> Clients;

    async fn reserve(
        &self,
        id: &str,
        lines: Vec<pb::Line>,
        ttl_seconds: u32,
    ) -> Result<pb::ReserveResponse, Status> {
        let request = reserve_request(id, lines, ttl_seconds);
        self.clients()
            .inventory
            .reserve(request)
            .await
            .map(Response::into_inner)
    }

    async fn commit(&self, id: &str) -> Result<pb::CommitResponse, Status> {
        let request = commit_request(id);
        self.clients()
            .inventory
            .commit(request)
            .await
            .map(Response::into_inner)
    }

    async fn release(&self, id: &str) -> Result<pb::ReleaseResponse, Status> {
        let request = release_request(id);
        self.clients()
            .inventory
            .release(request)
            .await
            .map(Response::into_inner)
    }

    async fn extend(&self, id: &str, ttl_seconds: u32) -> Result<pb::ExtendResponse, Status> {
        let request = extend_request(id, ttl_seconds);
        self.clients()
            .inventory
            .extend(request)
            .await
            .map(Response::into_inner)
    }

    async fn decrement(
        &self,
        id: &str,
        lines: Vec<pb::Line>,
    ) -> Result<pb::DecrementResponse, Status> {
        let request = decrement_request(id, lines);
        self.clients()
            .inventory
            .decrement(request)
            .await
            .map(Response::into_inner)
    }

    async fn get(&self, items: &[(&str, &str)]) -> Result<pb::GetStockResponse, Status> {
        let request = get_request(items);
        self.clients()
            .inventory
            .get_stock(request)
            .await
            .map(Response::into_inner)
    }

    /// The changes of `skus` after the event `from` (`""`: from now on).
    async fn watch(&self, skus: &[&str], from: &str) -> Result<Streaming<pb::StockEvent>, Status> {
        let request = pb::WatchRequest {
            skus: skus.iter().map(|sku| sku.to_string()).collect(),
            from_event_id: from.into(),
        };
        self.clients()
            .inventory
            .watch(request)
            .await
            .map(Response::into_inner)
    }

    async fn adjust(
        &self,
        id: &str,
        sku: &str,
        location: &str,
        delta: i64,
        reason: &str,
    ) -> Result<pb::AdjustResponse, Status> {
        let request = adjust_request(id, sku, location, delta, reason);
        self.clients()
            .inventory
            .adjust(request)
            .await
            .map(Response::into_inner)
    }

    async fn set(
        &self,
        id: &str,
        sku: &str,
        location: &str,
        available: i64,
    ) -> Result<pb::SetStockResponse, Status> {
        let request = set_request(id, sku, location, available);
        self.clients()
            .admin
            .set_stock(request)
            .await
            .map(Response::into_inner)
    }

    /// SetStock that applies only while the item is at `expected_version`.
    async fn set_if_version(
        &self,
        id: &str,
        sku: &str,
        location: &str,
        available: i64,
        expected_version: i64,
    ) -> Result<pb::SetStockResponse, Status> {
        let request = pb::SetStockRequest {
            expected_version: Some(expected_version),
            ..set_request(id, sku, location, available)
        };
        self.clients()
            .admin
            .set_stock(request)
            .await
            .map(Response::into_inner)
    }

    async fn flush_status(&self) -> Result<pb::FlushStatusResponse, Status> {
        let request = pb::FlushStatusRequest {};
        self.clients()
            .admin
            .flush_status(request)
            .await
            .map(Response::into_inner)
    }

    /// Reconcile (a page size or cursor of its own: struct update on
    /// [`reconcile_all_request`]).
    async fn reconcile(
        &self,
        request: pb::ReconcileRequest,
    ) -> Result<pb::ReconcileResponse, Status> {
        self.clients()
            .admin
            .reconcile(request)
            .await
            .map(Response::into_inner)
    }

    async fn reconcile_all(
        &self,
        mode: pb::ReconcileMode,
    ) -> Result<pb::ReconcileResponse, Status> {
        self.reconcile(reconcile_all_request(mode)).await
    }

    async fn preload(&self, request: pb::PreloadRequest) -> Result<pb::PreloadResponse, Status> {
        self.clients()
            .admin
            .preload(request)
            .await
            .map(Response::into_inner)
    }

    async fn preload_all(&self) -> Result<pb::PreloadResponse, Status> {
        self.preload(preload_all_request()).await
    }

    async fn preload_skus(&self, skus: &[&str]) -> Result<pb::PreloadResponse, Status> {
        let request = pb::PreloadRequest {
            skus: skus.iter().map(|sku| sku.to_string()).collect(),
            ..Default::default()
        };
        self.preload(request).await
    }

    async fn add_webhook(
        &self,
        request: pb::AddWebhookRequest,
    ) -> Result<pb::AddWebhookResponse, Status> {
        self.clients()
            .admin
            .add_webhook(request)
            .await
            .map(Response::into_inner)
    }

    async fn list_webhooks(
        &self,
        page_size: u32,
        page_token: &str,
    ) -> Result<pb::ListWebhooksResponse, Status> {
        let request = pb::ListWebhooksRequest {
            page_size,
            page_token: page_token.into(),
        };
        self.clients()
            .admin
            .list_webhooks(request)
            .await
            .map(Response::into_inner)
    }

    async fn remove_webhook(&self, id: u64) -> Result<pb::RemoveWebhookResponse, Status> {
        let request = pb::RemoveWebhookRequest { id };
        self.clients()
            .admin
            .remove_webhook(request)
            .await
            .map(Response::into_inner)
    }

    /// The dead letters of a subscription (`limit` 0: the server's default).
    async fn webhook_dead_letters(
        &self,
        subscription_id: u64,
        limit: u32,
    ) -> Result<pb::ListWebhookDeadLettersResponse, Status> {
        let request = pb::ListWebhookDeadLettersRequest {
            subscription_id,
            limit,
        };
        let mut admin = self.clients().admin;
        admin
            .list_webhook_dead_letters(request)
            .await
            .map(Response::into_inner)
    }

    /// SetStock of every SKU (location `default`) to `available`, each
    /// under the id `seed-<sku>` (so that seeding again is a replay).
    async fn seed_each(&self, skus: &[String], available: i64) {
        for sku in skus {
            self.set(&format!("seed-{sku}"), sku, "", available)
                .await
                .unwrap_or_else(|status| panic!("seed {sku}: {status:?}"));
        }
    }
}

impl Rpc for Clients {
    fn clients(&self) -> Clients {
        self.clone()
    }
}

impl Rpc for TestApp {
    fn clients(&self) -> Clients {
        Clients {
            inventory: self.inventory.clone(),
            admin: self.admin.clone(),
        }
    }
}
