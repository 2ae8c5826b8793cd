//! One tower layer in front of every service: admission (a bound on requests
//! in flight, past which requests are refused at once with
//! RESOURCE_EXHAUSTED instead of queueing without bound), a tracing span per
//! request, the request metrics, and the right status for requests tonic
//! could not decode (`decode_errors`).

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use metrics::{counter, histogram};
use tokio::sync::Semaphore;
use tonic::{Code, Status};
use tower::{Layer, Service};
use tracing::Instrument;

use super::decode_errors;
use crate::error::Error;

type BoxFuture<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'static>>;

/// The service a request is for is exempt from admission: a health check
/// must answer precisely when the server is busy.
const HEALTH_SERVICE: &str = "/grpc.health.v1.Health/";

#[derive(Clone)]
pub struct AdmissionLayer {
    permits: Arc<Semaphore>,
}

impl AdmissionLayer {
    /// At most `max_in_flight` requests are served at once.
    pub fn new(max_in_flight: usize) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(max_in_flight)),
        }
    }
}

impl<S> Layer<S> for AdmissionLayer {
    type Service = Admission<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Admission {
            inner,
            permits: self.permits.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Admission<S> {
    inner: S,
    permits: Arc<Semaphore>,
}

/// `/stockd.v1.Inventory/Reserve` → `Reserve`.
fn rpc_name(path: &str) -> String {
    path.rsplit('/').next().unwrap_or(path).to_owned()
}

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for Admission<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    ReqBody: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        // The clone is the one that was polled ready; keep a fresh one.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let path = request.uri().path().to_owned();
        let rpc = rpc_name(&path);
        let permit = if path.starts_with(HEALTH_SERVICE) {
            None
        } else {
            Some(self.permits.clone().try_acquire_owned())
        };
        let span = tracing::info_span!("request", rpc = %rpc);
        Box::pin(
            async move {
                let started = Instant::now();
                let _permit = match permit {
                    Some(Err(_)) => {
                        record(&rpc, Code::ResourceExhausted, started);
                        tracing::debug!("shed: too many requests in flight");
                        return Ok(Status::from(Error::Overloaded).into_http());
                    }
                    Some(Ok(permit)) => Some(permit),
                    None => None,
                };
                let response = decode_errors::reclassify(inner.call(request).await?);
                // An error travels in the headers (trailers-only response); a
                // success sends its status in the trailers, after the body.
                let code = response
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<i32>().ok())
                    .map(Code::from_i32)
                    .unwrap_or(Code::Ok);
                record(&rpc, code, started);
                match code {
                    Code::Ok => {
                        tracing::debug!(elapsed_us = started.elapsed().as_micros() as u64, "ok")
                    }
                    code => tracing::info!(
                        ?code,
                        elapsed_us = started.elapsed().as_micros() as u64,
                        "refused"
                    ),
                }
                Ok(response)
            }
            .instrument(span),
        )
    }
}

fn record(rpc: &str, code: Code, started: Instant) {
    counter!("stockd_requests_total", "rpc" => rpc.to_owned(), "code" => format!("{code:?}"))
        .increment(1);
    histogram!("stockd_request_duration_seconds", "rpc" => rpc.to_owned())
        .record(started.elapsed().as_secs_f64());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rpc_names() {
        assert_eq!(rpc_name("/stockd.v1.Inventory/Reserve"), "Reserve");
        assert_eq!(rpc_name("/grpc.health.v1.Health/Check"), "Check");
    }
}
