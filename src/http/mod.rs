//! The HTTP API for storefronts (DESIGN.md, "HTTP API for storefronts"),
//! for browsers and services that do not speak gRPC:
//!
//! | route | module |
//! |---|---|
//! | `GET /v1/stock/{sku}`, `GET /v1/stock?item=...` | [`stock`]: JSON reads |
//! | `GET /v1/events?sku=...` | [`sse`]: Server-Sent Events |
//! | `POST /graphql`, `GET /graphql` (+ WebSocket) | [`graphql`] |
//! | `GET /healthz`, `GET /readyz` | [`health`] |
//! | `GET /demo` | [`demo`]: a live availability page |
//!
//! [`access`] decides what a request may see (client token, public mode),
//! [`view`] shapes every answer by it, [`live`] subscribes to the
//! instance's one watch [`Hub`] (so every SSE and GraphQL subscriber costs
//! a queue, never a Redis reader), and [`error`] is the one mapping of
//! errors to HTTP statuses and JSON bodies.

mod access;
mod demo;
mod error;
mod graphql;
mod health;
mod live;
mod sse;
mod stock;
mod view;

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, FromRef, Request, State};
use axum::http::{HeaderName, HeaderValue, Method, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::serve::ListenerExt;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower_http::cors::{AllowOrigin, CorsLayer};

use crate::config::Config;
use crate::engine::Engine;
use crate::warmer::Availability;
use crate::watch::Hub;
use access::AccessPolicy;
use error::ApiError;
use live::Live;
use view::LowStock;

/// How long open connections have to finish once the server stops before
/// they are dropped (a client that stopped reading cannot hold up the
/// shutdown).
const SHUTDOWN_DEADLINE: Duration = Duration::from_secs(10);

/// Limits of one request or connection.
#[derive(Debug, Clone)]
pub(crate) struct Limits {
    /// Largest request body (`STOCKD_MAX_REQUEST_BYTES`), and largest
    /// WebSocket message.
    max_body_bytes: usize,
    /// GraphQL subscriptions per WebSocket connection.
    max_subscriptions: usize,
    /// Time to answer one request (event streams excepted: their answer
    /// is the headers).
    timeout: Duration,
}

/// What every handler can reach.
#[derive(Clone)]
pub(crate) struct AppState {
    engine: Engine,
    live: Live,
    policy: AccessPolicy,
    availability: Availability,
    schema: graphql::StockSchema,
    limits: Limits,
    /// Cancelled when the server stops.
    shutdown: CancellationToken,
    /// Cancelled when a shutdown is requested: not ready any more, though
    /// serving on for the drain period.
    draining: CancellationToken,
}

impl FromRef<AppState> for AccessPolicy {
    fn from_ref(app: &AppState) -> Self {
        app.policy.clone()
    }
}

/// The HTTP server of one stockd instance, bound and ready to serve.
pub struct HttpServer {
    listener: TcpListener,
    config: Config,
    engine: Engine,
    hub: Hub,
    availability: Availability,
}

impl HttpServer {
    /// Binds `--http-addr`; `None` when the HTTP API is switched off.
    pub async fn bind(
        config: &Config,
        engine: Engine,
        hub: Hub,
        availability: Availability,
    ) -> std::io::Result<Option<Self>> {
        let Some(addr) = config.http.http_addr.0 else {
            return Ok(None);
        };
        Ok(Some(Self {
            listener: TcpListener::bind(addr).await?,
            config: config.clone(),
            engine,
            hub,
            availability,
        }))
    }

    /// Where it listens (the real port when configured with 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown`, then lets open requests and event streams
    /// end (streams end with the id to resume from), for at most
    /// [`SHUTDOWN_DEADLINE`]. From `draining` on, `/readyz` says not ready.
    pub async fn serve(
        self,
        draining: CancellationToken,
        shutdown: CancellationToken,
    ) -> std::io::Result<()> {
        let addr = self.local_addr()?;
        let public = self.config.http.http_public;
        let (listener, router) = self.into_parts(draining, shutdown.clone());
        tracing::info!(%addr, public, "serving HTTP");
        // Events are small writes that must leave at once.
        let listener = listener.tap_io(|tcp| {
            if let Err(err) = tcp.set_nodelay(true) {
                tracing::debug!(error = %err, "cannot set TCP_NODELAY");
            }
        });
        let server = axum::serve(listener, router)
            .with_graceful_shutdown(shutdown.clone().cancelled_owned())
            .into_future();
        let deadline = async {
            shutdown.cancelled().await;
            tokio::time::sleep(SHUTDOWN_DEADLINE).await;
        };
        tokio::select! {
            served = server => served,
            () = deadline => {
                tracing::warn!("HTTP connections still open at the shutdown deadline; dropping them");
                Ok(())
            }
        }
    }

    fn into_parts(
        self,
        draining: CancellationToken,
        shutdown: CancellationToken,
    ) -> (TcpListener, Router) {
        let http = &self.config.http;
        let low = LowStock(i64::from(http.low_stock));
        let live = Live::new(self.hub, http.http_max_skus as usize, low);
        let limits = Limits {
            max_body_bytes: self.config.server.max_request_bytes,
            max_subscriptions: http.http_max_subscriptions as usize,
            timeout: http.timeout(),
        };
        let state = AppState {
            schema: graphql::schema(self.engine.clone(), live.clone()),
            engine: self.engine,
            live,
            policy: AccessPolicy::new(self.config.security.client_token.clone(), http.http_public),
            availability: self.availability,
            limits: limits.clone(),
            shutdown,
            draining,
        };
        let router = Router::new()
            .route("/v1/stock", get(stock::many))
            .route("/v1/stock/{sku}", get(stock::one))
            .route("/v1/events", get(sse::events))
            .route("/graphql", get(graphql::get).post(graphql::post))
            .route("/healthz", get(health::live))
            .route("/readyz", get(health::ready))
            .route("/demo", get(demo::page))
            .fallback(|| async { ApiError::NoRoute })
            .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
            .layer(middleware::from_fn_with_state(limits.clone(), time_limit))
            .layer(DefaultBodyLimit::max(limits.max_body_bytes))
            .with_state(state);
        let router = match cors(&http.cors_origins()) {
            Some(cors) => router.layer(cors),
            None => router,
        };
        (self.listener, router)
    }
}

/// Answers 504 (JSON) when a request takes longer than its limit. Only the
/// answer's headers are timed: an event stream or a WebSocket goes on.
async fn time_limit(State(limits): State<Limits>, request: Request, next: Next) -> Response {
    match tokio::time::timeout(limits.timeout, next.run(request)).await {
        Ok(response) => response,
        Err(_) => ApiError::Timeout.into_response(),
    }
}

/// Browsers on these origins may call the API; `*` allows any. No
/// origin configured: no CORS headers, so only same-origin pages can.
fn cors(origins: &[&str]) -> Option<CorsLayer> {
    if origins.is_empty() {
        return None;
    }
    let allow = if origins.contains(&"*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(
            origins
                .iter()
                .filter_map(|o| match HeaderValue::from_str(o) {
                    Ok(value) => Some(value),
                    Err(_) => {
                        tracing::warn!(origin = %o, "ignoring a CORS origin that is not a header value");
                        None
                    }
                }),
        )
    };
    Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([Method::GET, Method::POST])
            .allow_headers([
                header::AUTHORIZATION,
                header::CONTENT_TYPE,
                HeaderName::from_static("last-event-id"),
            ])
            .max_age(Duration::from_secs(600)),
    )
}
