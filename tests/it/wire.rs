//! Request bodies that are not valid gRPC messages, sent as raw frames: a
//! string field that is not UTF-8, a truncated message, a truncated frame,
//! no message, a frame over the size limit. Each is the client's error
//! (INVALID_ARGUMENT, RESOURCE_EXHAUSTED for the size), never INTERNAL (which
//! means a bug and fires the errors alert), and changes nothing. (The typed
//! client's oversized request: tests/it/operability.rs.)

use bytes::{BufMut, Bytes, BytesMut};
use http_body_util::{BodyExt, Full};
use tonic::body::Body;
use tonic::transport::Channel;
use tonic::{Code, Status};
use tower::ServiceExt;

use crate::support::*;

/// A gRPC frame: uncompressed flag, big-endian length, then `message`.
fn frame(announced_len: u32, message: &[u8]) -> Bytes {
    let mut buf = BytesMut::with_capacity(5 + message.len());
    buf.put_u8(0);
    buf.put_u32(announced_len);
    buf.put_slice(message);
    buf.freeze()
}

fn whole(message: &[u8]) -> Bytes {
    frame(message.len() as u32, message)
}

/// A length-delimited field (`tag` = field number << 3 | 2) holding `bytes`.
fn field(number: u8, bytes: &[u8]) -> Vec<u8> {
    let mut out = vec![number << 3 | 2, bytes.len() as u8];
    out.extend_from_slice(bytes);
    out
}

/// POSTs `body` as-is to `path` and returns the final status, from the
/// headers (trailers-only answer) or else from the trailers.
async fn call_raw(app: &TestApp, path: &str, body: Bytes) -> Status {
    let channel = Channel::from_shared(format!("http://{}", app.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let request = http::Request::builder()
        .method("POST")
        .uri(path)
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Body::new(Full::new(body)))
        .unwrap();
    let response = channel.oneshot(request).await.unwrap();
    if let Some(status) = Status::from_header_map(response.headers()) {
        return status;
    }
    let collected = response.into_body().collect().await.unwrap();
    Status::from_header_map(collected.trailers().expect("trailers")).expect("grpc-status")
}

#[tokio::test]
async fn malformed_requests_are_the_clients_error_and_change_nothing() {
    let app = spawn_app().await;
    app.seed("ok", "", 10).await;
    let before = app.snapshot().await;

    let not_utf8 = [0xFF, 0xFE];
    let cases: Vec<(&str, &str, Bytes, Code, &str)> = vec![
        (
            "a string field that is not UTF-8",
            "/stockd.v1.Inventory/Adjust",
            whole(&field(1, &not_utf8)),
            Code::InvalidArgument,
            "AdjustRequest.request_id: invalid string value",
        ),
        (
            "a nested string field that is not UTF-8",
            "/stockd.v1.Inventory/Reserve",
            whole(&[field(1, b"r"), field(2, &field(1, &not_utf8))].concat()),
            Code::InvalidArgument,
            "Line.sku: ReserveRequest.lines: invalid string value",
        ),
        (
            "an incomplete UTF-8 sequence, Admin",
            "/stockd.v1.Admin/SetStock",
            whole(&field(2, &[b'o', 0xC3])),
            Code::InvalidArgument,
            "SetStockRequest.sku: invalid string value",
        ),
        (
            "a stream's request that is not UTF-8",
            "/stockd.v1.Inventory/Watch",
            whole(&field(1, &not_utf8)),
            Code::InvalidArgument,
            "WatchRequest.skus: invalid string value",
        ),
        (
            "a message cut inside a field",
            "/stockd.v1.Inventory/Reserve",
            whole(&[0x0A, 10, b'a', b'b', b'c']),
            Code::InvalidArgument,
            "ReserveRequest.reservation_id: buffer underflow",
        ),
        (
            "a frame shorter than its header announces",
            "/stockd.v1.Inventory/Decrement",
            frame(20, &field(1, b"d")),
            Code::InvalidArgument,
            "the body ends inside a message",
        ),
        (
            "a body cut inside the frame header",
            "/stockd.v1.Inventory/Commit",
            Bytes::from_static(&[0, 0, 0]),
            Code::InvalidArgument,
            "the body ends inside a message",
        ),
        (
            "no message at all",
            "/stockd.v1.Inventory/Commit",
            Bytes::new(),
            Code::InvalidArgument,
            "the body holds no message",
        ),
        (
            "a frame over the size limit (256 KiB)",
            "/stockd.v1.Inventory/Adjust",
            frame(300 * 1024, &field(1, b"big")),
            Code::ResourceExhausted,
            "request too large",
        ),
    ];
    for (what, path, body, code, says) in cases {
        let status = call_raw(&app, path, body).await;
        assert_eq!(status.code(), code, "{what}: {status:?}");
        assert!(status.message().contains(says), "{what}: {status:?}");
    }
    assert_eq!(
        app.snapshot().await,
        before,
        "malformed requests changed Redis"
    );

    // The same raw path serves a well-formed request: GetStock of item "ok".
    let got = call_raw(
        &app,
        "/stockd.v1.Inventory/GetStock",
        whole(&field(1, &field(1, b"ok"))),
    )
    .await;
    assert_eq!(got.code(), Code::Ok, "{got:?}");
    app.stop().await;
}
