//! GraphQL over HTTP (`POST /graphql`, `GET /graphql?query=...`) and over
//! WebSocket (`GET /graphql` upgraded, protocol `graphql-transport-ws`),
//! with async-graphql:
//!
//! ```graphql
//! query { stock(sku: "A", location: "default") { sku location available reserved version availability } }
//! subscription { stockChanged(skus: ["A"]) { eventId sku location available reserved version op availability } }
//! ```
//!
//! `stock` is null for an unknown item. `stockChanged` yields changes in
//! stream order (so in version order per item); `fromEventId` resumes
//! like `Last-Event-ID`. An interrupted subscription (too slow, server
//! shutting down) ends with an error whose `extensions` carry `code` and
//! `resumeFrom`. In public mode the quantity fields (`available`,
//! `reserved`, `version`, `op`, deltas) are hidden from introspection and
//! answer an error (`PERMISSION_DENIED`); `availability` is always there.
//!
//! A WebSocket connection authenticates with its upgrade request's
//! `Authorization` header or, as browsers cannot set one, with
//! `{"Authorization": "Bearer <token>"}` in its `connection_init` payload.

use std::sync::Arc;
use std::time::Duration;

use async_graphql::futures_util::{SinkExt, StreamExt};
use async_graphql::http::{ALL_WEBSOCKET_PROTOCOLS, parse_query_string};
use async_graphql::{Context, Data, EmptyMutation, Object, Schema, Subscription};
use async_graphql_axum::{GraphQLProtocol, GraphQLResponse, GraphQLWebSocket};
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, FailedToBufferBody};
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{RawQuery, State};
use axum::http::header::UPGRADE;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_stream::Stream;
use tokio_util::sync::CancellationToken;

use super::AppState;
use super::access::{Access, AccessPolicy, authorization};
use super::error::{ApiError, Problem, graphql_error};
use super::live::Live;
use super::view::{Availability, LowStock};
use crate::domain::{Item, StockLevel};
use crate::engine::Engine;
use crate::error::Error;
use crate::events::ChangeEvent;
use crate::watch::parse_resume;

pub(crate) type StockSchema = Schema<QueryRoot, EmptyMutation, SubscriptionRoot>;

/// Deepest selection a query may make (the schema is two levels deep).
const MAX_DEPTH: usize = 8;
/// Most fields a query may resolve.
const MAX_COMPLEXITY: usize = 200;
/// How long subscriptions have to send their last error at shutdown
/// before their connections are closed.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);

pub(crate) fn schema(engine: Engine, live: Live) -> StockSchema {
    Schema::build(QueryRoot, EmptyMutation, SubscriptionRoot)
        .data(engine)
        .data(live)
        .limit_depth(MAX_DEPTH)
        .limit_complexity(MAX_COMPLEXITY)
        .finish()
}

/// The access of the operation; without one (never in practice) the least.
fn access(ctx: &Context<'_>) -> Access {
    ctx.data_opt::<Access>().copied().unwrap_or(Access::Public)
}

fn shows_quantities(ctx: &Context<'_>) -> bool {
    access(ctx) == Access::Full
}

/// A field only full access may read.
fn guarded<T>(ctx: &Context<'_>, value: T) -> async_graphql::Result<T> {
    if shows_quantities(ctx) {
        Ok(value)
    } else {
        Err(Problem::of(ApiError::Hidden).into_graphql())
    }
}

pub(crate) struct QueryRoot;

#[Object]
impl QueryRoot {
    /// One item (loaded from Postgres when Redis lacks it); null when
    /// unknown.
    async fn stock(
        &self,
        ctx: &Context<'_>,
        sku: String,
        #[graphql(default = "default")] location: String,
    ) -> async_graphql::Result<Option<Level>> {
        let item = Item::parse("", sku, location).map_err(graphql_error)?;
        let (levels, _missing) = ctx
            .data_unchecked::<Engine>()
            .get(&[item])
            .await
            .map_err(graphql_error)?;
        let low = ctx.data_unchecked::<Live>().low_stock();
        Ok(levels.into_iter().next().map(|level| Level { level, low }))
    }
}

pub(crate) struct Level {
    level: StockLevel,
    low: LowStock,
}

#[Object(name = "StockLevel")]
impl Level {
    async fn sku(&self) -> &str {
        &self.level.sku
    }
    async fn location(&self) -> &str {
        &self.level.location
    }
    /// Units sellable now (not in public mode).
    #[graphql(visible = "shows_quantities")]
    async fn available(&self, ctx: &Context<'_>) -> async_graphql::Result<i64> {
        guarded(ctx, self.level.available)
    }
    /// Units held by pending reservations (not in public mode).
    #[graphql(visible = "shows_quantities")]
    async fn reserved(&self, ctx: &Context<'_>) -> async_graphql::Result<i64> {
        guarded(ctx, self.level.reserved)
    }
    /// Goes up by one with every change (not in public mode).
    #[graphql(visible = "shows_quantities")]
    async fn version(&self, ctx: &Context<'_>) -> async_graphql::Result<i64> {
        guarded(ctx, self.level.version)
    }
    async fn availability(&self) -> Availability {
        self.low.bucket(self.level.available)
    }
}

pub(crate) struct SubscriptionRoot;

#[Subscription]
impl SubscriptionRoot {
    /// Changes of these SKUs from now on, or after `fromEventId`.
    async fn stock_changed(
        &self,
        ctx: &Context<'_>,
        skus: Vec<String>,
        from_event_id: Option<String>,
    ) -> async_graphql::Result<impl Stream<Item = async_graphql::Result<Change>> + use<>> {
        // Held until the subscription ends (completed, or its connection
        // closed).
        let slot = match ctx.data_opt::<ConnectionSlots>() {
            Some(slots) => Some(slots.take()?),
            None => None,
        };
        let from = parse_resume("fromEventId", from_event_id.as_deref().unwrap_or(""))
            .map_err(graphql_error)?;
        let live = ctx.data_unchecked::<Live>();
        let low = live.low_stock();
        let changes = live
            .subscribe("skus", skus, from, access(ctx))
            .await
            .map_err(graphql_error)?;
        Ok(changes.map(move |item| {
            let _slot = &slot;
            match item {
                Ok(event) => Ok(Change { event, low }),
                Err(interrupted) => Err(Problem::of_interrupted(interrupted).into_graphql()),
            }
        }))
    }
}

pub(crate) struct Change {
    event: Arc<ChangeEvent>,
    low: LowStock,
}

#[Object(name = "StockChange")]
impl Change {
    /// The event id: resume after it with `fromEventId`.
    async fn event_id(&self) -> String {
        self.event.entry_id.to_string()
    }
    async fn sku(&self) -> &str {
        &self.event.sku
    }
    async fn location(&self) -> &str {
        &self.event.location
    }
    /// `reserve commit release expire decrement adjust set` (not in public
    /// mode).
    #[graphql(visible = "shows_quantities")]
    async fn op(&self, ctx: &Context<'_>) -> async_graphql::Result<&str> {
        guarded(ctx, self.event.op.as_str())
    }
    #[graphql(visible = "shows_quantities")]
    async fn delta_available(&self, ctx: &Context<'_>) -> async_graphql::Result<i64> {
        guarded(ctx, self.event.d_available)
    }
    #[graphql(visible = "shows_quantities")]
    async fn delta_reserved(&self, ctx: &Context<'_>) -> async_graphql::Result<i64> {
        guarded(ctx, self.event.d_reserved)
    }
    #[graphql(visible = "shows_quantities")]
    async fn available(&self, ctx: &Context<'_>) -> async_graphql::Result<i64> {
        guarded(ctx, self.event.available)
    }
    #[graphql(visible = "shows_quantities")]
    async fn reserved(&self, ctx: &Context<'_>) -> async_graphql::Result<i64> {
        guarded(ctx, self.event.reserved)
    }
    #[graphql(visible = "shows_quantities")]
    async fn version(&self, ctx: &Context<'_>) -> async_graphql::Result<i64> {
        guarded(ctx, self.event.version)
    }
    async fn availability(&self) -> Availability {
        self.low.bucket(self.event.available)
    }
}

/// The subscriptions one WebSocket connection may still open.
#[derive(Clone)]
struct ConnectionSlots {
    free: Arc<Semaphore>,
    max: usize,
}

impl ConnectionSlots {
    fn new(max: usize) -> Self {
        Self {
            free: Arc::new(Semaphore::new(max)),
            max,
        }
    }

    fn take(&self) -> async_graphql::Result<OwnedSemaphorePermit> {
        self.free.clone().try_acquire_owned().map_err(|_| {
            graphql_error(Error::ResourceExhausted(format!(
                "at most {} subscriptions per connection; complete one first",
                self.max
            )))
        })
    }
}

/// `POST /graphql` with a JSON body `{"query": ..., "variables": ...}`.
pub(crate) async fn post(
    State(app): State<AppState>,
    access: Access,
    body: Result<Bytes, BytesRejection>,
) -> Result<GraphQLResponse, ApiError> {
    let body = body.map_err(|rejection| match rejection {
        BytesRejection::FailedToBufferBody(FailedToBufferBody::LengthLimitError(_)) => {
            ApiError::PayloadTooLarge {
                limit: app.limits.max_body_bytes,
            }
        }
        other => Error::invalid("body", other.body_text()).into(),
    })?;
    let request: async_graphql::Request = serde_json::from_slice(&body)
        .map_err(|e| Error::invalid("body", format!("not a GraphQL request: {e}")))?;
    Ok(app.schema.execute(request.data(access)).await.into())
}

/// `GET /graphql`: a WebSocket for subscriptions when the request asks
/// for an upgrade, else a query in the query string.
pub(crate) async fn get(
    State(app): State<AppState>,
    parts: Parts,
    upgrade: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
    protocol: Result<GraphQLProtocol, axum::http::StatusCode>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let policy = &app.policy;
    if !parts.headers.contains_key(UPGRADE) {
        let access = policy.decide(authorization(&parts))?;
        let request = parse_query_string(query.as_deref().unwrap_or(""))
            .map_err(|e| Error::invalid("query", e.to_string()))?;
        let response: GraphQLResponse = app.schema.execute(request.data(access)).await.into();
        return Ok(response.into_response());
    }
    let upgrade = upgrade.map_err(|r| Error::invalid("Upgrade", r.body_text()))?;
    let protocol = protocol.map_err(|_| {
        Error::invalid(
            "Sec-WebSocket-Protocol",
            "expected graphql-transport-ws (or graphql-ws)",
        )
    })?;
    // A header that is there must be right; without one the token may
    // come in connection_init.
    let header_access = match authorization(&parts) {
        Some(value) => Some(policy.decide(Some(value))?),
        None => None,
    };
    let policy = policy.clone();
    let schema = app.schema.clone();
    let slots = ConnectionSlots::new(app.limits.max_subscriptions);
    let shutdown = app.shutdown.clone();
    Ok(upgrade
        .protocols(ALL_WEBSOCKET_PROTOCOLS)
        .max_message_size(app.limits.max_body_bytes)
        .on_upgrade(move |socket| {
            serve_socket(
                socket,
                schema,
                protocol,
                Connection {
                    header_access,
                    policy,
                    slots,
                },
                shutdown,
            )
        }))
}

/// What a WebSocket connection starts with.
struct Connection {
    header_access: Option<Access>,
    policy: AccessPolicy,
    slots: ConnectionSlots,
}

impl Connection {
    /// The connection's data once `connection_init` arrives.
    fn init(self, payload: serde_json::Value) -> async_graphql::Result<Data> {
        let access = match self.header_access {
            Some(access) => access,
            None => {
                let token = payload.as_object().and_then(|fields| {
                    fields
                        .iter()
                        .find(|(k, _)| k.eq_ignore_ascii_case("authorization"))
                        .and_then(|(_, v)| v.as_str())
                });
                self.policy.decide(token).map_err(graphql_error)?
            }
        };
        let mut data = Data::default();
        data.insert(access);
        data.insert(self.slots);
        Ok(data)
    }
}

async fn serve_socket(
    socket: WebSocket,
    schema: StockSchema,
    protocol: GraphQLProtocol,
    connection: Connection,
    shutdown: CancellationToken,
) {
    let (mut sink, stream) = socket.split();
    // At shutdown the hub ends every subscription with an error naming the
    // id to resume from; the input ends a moment later, which closes the
    // GraphQL session once those errors are out.
    let grace = shutdown.clone();
    let input = stream.take_until(async move {
        grace.cancelled().await;
        tokio::time::sleep(SHUTDOWN_GRACE).await;
    });
    GraphQLWebSocket::new_with_pair(&mut sink, input, schema, protocol)
        .on_connection_init(move |payload| async move { connection.init(payload) })
        .serve()
        .await;
    if shutdown.is_cancelled() {
        let _ = sink
            .send(Message::Close(Some(CloseFrame {
                code: axum::extract::ws::close_code::AWAY,
                reason: "the server is shutting down".into(),
            })))
            .await;
    }
}
