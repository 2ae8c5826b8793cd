//! One tower layer in front of every service: admission (a bound on requests
//! in flight, past which requests are refused at once with
//! RESOURCE_EXHAUSTED instead of queueing without bound), a tracing span per
//! request, the request metrics, and the right status for requests tonic
//! could not decode (`decode_errors`).
//!
//! A request is counted once its response ENDS, with its final status: a
//! unary answer's status is in its trailers, and a stream (Watch) may end
//! with an error long after its OK headers. The `rpc` label only ever names
//! a method stockd serves (`unknown` for any other path), so that random
//! paths cannot create series.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Instant;

use http_body::{Body, Frame, SizeHint};
use metrics::{counter, gauge, histogram};
use prost::Message;
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

/// The `rpc` label of requests for paths that name no method of stockd's.
pub(crate) const UNKNOWN_RPC: &str = "unknown";

/// `/stockd.v1.Inventory/Reserve` → `Reserve`; the standard services'
/// methods keep their service's name (`Health/Check`,
/// `ServerReflection/ServerReflectionInfo`); any other path → `unknown`.
pub(crate) fn rpc_label(path: &str) -> &'static str {
    static KNOWN: OnceLock<HashMap<String, &'static str>> = OnceLock::new();
    let known = KNOWN.get_or_init(|| {
        let mut known = HashMap::new();
        for set in [
            crate::pb::FILE_DESCRIPTOR_SET,
            tonic_health::pb::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
        ] {
            let set = prost_types::FileDescriptorSet::decode(set)
                .expect("the compiled-in descriptor sets decode");
            for file in set.file {
                let package = file.package();
                for service in &file.service {
                    for method in &service.method {
                        let label = if package == "stockd.v1" {
                            method.name().to_owned()
                        } else {
                            format!("{}/{}", service.name(), method.name())
                        };
                        // A handful of names, made once for the process.
                        let label: &'static str = Box::leak(label.into_boxed_str());
                        known.insert(
                            format!("/{package}.{}/{}", service.name(), method.name()),
                            label,
                        );
                    }
                }
            }
        }
        known
    });
    known.get(path).copied().unwrap_or(UNKNOWN_RPC)
}

/// The request id of a span: the client's `x-request-id` when it sends
/// one (quoted in logs), else a number of this process's.
fn request_id(headers: &http::HeaderMap) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    match headers.get("x-request-id").and_then(|v| v.to_str().ok()) {
        Some(id) if !id.is_empty() && id.len() <= 128 => id.to_owned(),
        _ => format!("{:x}", NEXT.fetch_add(1, Ordering::Relaxed)),
    }
}

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

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for Admission<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    ReqBody: Send + 'static,
    ResBody: Body + Default + Unpin + Send + 'static,
{
    type Response = http::Response<Metered<ResBody>>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        // The clone is the one that was polled ready; keep a fresh one.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let path = request.uri().path();
        let rpc = rpc_label(path);
        let permit = if path.starts_with(HEALTH_SERVICE) {
            None
        } else {
            Some(self.permits.clone().try_acquire_owned())
        };
        let id = request_id(request.headers());
        let span = tracing::debug_span!("request", rpc, request_id = ?id);
        let call = Call::start(rpc, span.clone());
        Box::pin(
            async move {
                let _permit = match permit {
                    Some(Err(_)) => {
                        let response = Status::from(Error::Overloaded).into_http();
                        return Ok(call.respond(response));
                    }
                    Some(Ok(permit)) => Some(permit),
                    None => None,
                };
                let response = decode_errors::reclassify(inner.call(request).await?);
                Ok(call.respond(response))
            }
            .instrument(span),
        )
    }
}

/// One request from its arrival until its response ends.
struct Call {
    rpc: &'static str,
    started: Instant,
    span: tracing::Span,
}

impl Call {
    fn start(rpc: &'static str, span: tracing::Span) -> Self {
        gauge!("stockd_requests_in_flight").increment(1.0);
        Self {
            rpc,
            started: Instant::now(),
            span,
        }
    }

    /// The response, counted now when its headers carry the status (a
    /// refusal: trailers-only), else when its body ends.
    fn respond<B>(self, response: http::Response<B>) -> http::Response<Metered<B>> {
        let code = grpc_status(response.headers());
        let (parts, body) = response.into_parts();
        let mut call = Some(self);
        if let (Some(code), Some(call)) = (code, call.take_if(|_| code.is_some())) {
            call.finish(code);
        }
        http::Response::from_parts(parts, Metered { inner: body, call })
    }

    fn finish(self, code: Code) {
        let elapsed = self.started.elapsed();
        gauge!("stockd_requests_in_flight").decrement(1.0);
        counter!("stockd_requests_total", "rpc" => self.rpc, "code" => format!("{code:?}"))
            .increment(1);
        // Only known methods: an unknown path adds no series.
        if self.rpc != UNKNOWN_RPC {
            histogram!("stockd_request_duration_seconds", "rpc" => self.rpc)
                .record(elapsed.as_secs_f64());
        }
        let elapsed_us = elapsed.as_micros() as u64;
        self.span.in_scope(|| match code {
            Code::Ok => tracing::debug!(elapsed_us, "ok"),
            code => tracing::debug!(?code, elapsed_us, "refused"),
        });
    }
}

fn grpc_status(headers: &http::HeaderMap) -> Option<Code> {
    headers
        .get("grpc-status")
        .map(|v| Code::from_bytes(v.as_bytes()))
}

/// A response body that counts its request when it ends: with the status
/// of its trailers, OK when it ends without any, CANCELLED when the client
/// goes away first (the body is dropped unfinished).
pub struct Metered<B> {
    inner: B,
    call: Option<Call>,
}

impl<B: Default> Default for Metered<B> {
    fn default() -> Self {
        Self {
            inner: B::default(),
            call: None,
        }
    }
}

impl<B> Metered<B> {
    fn finish(&mut self, code: Code) {
        if let Some(call) = self.call.take() {
            call.finish(code);
        }
    }
}

impl<B> Drop for Metered<B> {
    fn drop(&mut self) {
        self.finish(Code::Cancelled);
    }
}

impl<B: Body + Unpin> Body for Metered<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(code) = frame.trailers_ref().and_then(grpc_status) {
                    self.finish(code);
                }
            }
            Poll::Ready(Some(Err(_))) => self.finish(Code::Unknown),
            Poll::Ready(None) => self.finish(Code::Ok),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rpc_labels_name_known_methods_only() {
        assert_eq!(rpc_label("/stockd.v1.Inventory/Reserve"), "Reserve");
        assert_eq!(rpc_label("/stockd.v1.Admin/SetStock"), "SetStock");
        assert_eq!(rpc_label("/grpc.health.v1.Health/Check"), "Health/Check");
        assert_eq!(
            rpc_label("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"),
            "ServerReflection/ServerReflectionInfo"
        );
        for path in [
            "/stockd.v1.Inventory/Nope",
            "/x/Reserve",
            "/stockd.v1.Inventory/Reserve/",
            "/",
            "",
        ] {
            assert_eq!(rpc_label(path), UNKNOWN_RPC, "{path:?}");
        }
    }
}
