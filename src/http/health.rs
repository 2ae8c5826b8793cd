//! `GET /healthz` (the process answers) and `GET /readyz` (it serves:
//! Redis is warm and the instance is not stopping), as the gRPC health
//! service reports them.

use axum::Json;
use axum::extract::State;
use serde_json::{Value, json};

use super::AppState;
use super::error::ApiError;
use crate::error::Error;

pub(crate) async fn live() -> Json<Value> {
    Json(json!({"status": "live"}))
}

pub(crate) async fn ready(State(app): State<AppState>) -> Result<Json<Value>, ApiError> {
    if app.draining.is_cancelled() || app.shutdown.is_cancelled() {
        return Err(Error::ShuttingDown("the server is shutting down".into()).into());
    }
    if !app.availability.is_serving() {
        return Err(Error::ShuttingDown(
            "not serving yet: Redis is being warmed from Postgres".into(),
        )
        .into());
    }
    Ok(Json(json!({"status": "ready"})))
}
