//! `GET /v1/events?sku=A&sku=B`: Server-Sent Events of those SKUs' changes.
//!
//! Each change is one event: `id:` the event id (the stream entry id, as
//! in gRPC Watch), `data:` the change as JSON ([`EventView`]). A browser's
//! `EventSource` sends the last id it saw as `Last-Event-ID` when it
//! reconnects, and the stream resumes exactly like Watch's
//! `from_event_id`. When the stream is interrupted (a subscriber too slow
//! to keep up, a server shutdown), its last event is `event: stream_error`
//! with `id:` the position to resume from and the JSON error (with
//! `resume_from`) as data; then the response ends, and `EventSource`
//! reconnects from that id by itself.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, HeaderValue};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use tokio_stream::StreamExt;

use super::AppState;
use super::access::Access;
use super::error::{ApiError, Problem};
use super::stock::{query_pairs, values_of};
use super::view::EventView;
use crate::error::Error;
use crate::watch::parse_resume;

/// How long a browser waits before it reconnects a dropped stream.
const RECONNECT_AFTER: Duration = Duration::from_secs(1);

/// The event type of the last event of an interrupted stream (not `error`,
/// which `EventSource` uses for its own connection errors).
pub(crate) const STREAM_ERROR: &str = "stream_error";

pub(crate) async fn events(
    State(app): State<AppState>,
    access: Access,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let skus = values_of(query_pairs(query.as_deref(), &["sku"])?, "sku");
    let last_event_id = match headers.get("last-event-id") {
        None => "",
        Some(value) => value
            .to_str()
            .map_err(|_| Error::invalid("Last-Event-ID", "not readable text"))?,
    };
    let from = parse_resume("Last-Event-ID", last_event_id.trim())?;
    let low = app.live.low_stock();
    let changes = app.live.subscribe("sku", skus, from, access).await?;

    let retry = Event::default().retry(RECONNECT_AFTER);
    let events = changes.map(move |item| {
        Ok::<_, Infallible>(match item {
            Ok(change) => Event::default()
                .id(change.entry_id.to_string())
                .json_data(EventView::new(&change, access, low))
                .unwrap_or_else(|_| Event::default().comment("unserializable event")),
            Err(interrupted) => {
                let resume_from = interrupted.resume_from.to_string();
                let problem = Problem::of_interrupted(interrupted);
                Event::default()
                    .event(STREAM_ERROR)
                    .id(resume_from)
                    .json_data(problem.body())
                    .unwrap_or_else(|_| Event::default().event(STREAM_ERROR))
            }
        })
    });
    let stream = tokio_stream::once(Ok(retry)).chain(events);
    let mut response = Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response();
    // Proxies such as nginx would otherwise hold events back in a buffer.
    response
        .headers_mut()
        .insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(response)
}
