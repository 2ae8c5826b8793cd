//! Clients of the HTTP API for the tests: JSON requests, a Server-Sent
//! Events reader, and a GraphQL WebSocket (`graphql-transport-ws`).

use std::net::SocketAddr;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use super::*;

pub const DEADLINE: Duration = Duration::from_secs(20);

/// An answer: status, headers and the body as JSON (`Null` when empty).
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: Value,
}

impl Answer {
    /// The `error.code` of a JSON error body.
    pub fn code(&self) -> &str {
        self.body["error"]["code"].as_str().unwrap_or("")
    }
}

async fn answer(response: reqwest::Response) -> Answer {
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let text = response.text().await.unwrap();
    let body = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON ({status}): {text}"))
    };
    Answer {
        status,
        headers,
        body,
    }
}

pub async fn get(addr: SocketAddr, path: &str, token: Option<&str>) -> Answer {
    let mut request = reqwest::Client::new().get(format!("http://{addr}{path}"));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    answer(request.send().await.unwrap()).await
}

pub async fn graphql(addr: SocketAddr, query: &str, token: Option<&str>) -> Answer {
    let mut request = reqwest::Client::new()
        .post(format!("http://{addr}/graphql"))
        .header("content-type", "application/json")
        .body(json!({ "query": query }).to_string());
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    answer(request.send().await.unwrap()).await
}

/// One Server-Sent Event as a browser dispatches it.
#[derive(Debug, Clone, PartialEq)]
pub struct SseEvent {
    pub id: String,
    /// `message` unless the server named another type.
    pub event: String,
    pub data: Value,
}

/// An open `GET /v1/events` response, read event by event.
pub struct Sse {
    response: reqwest::Response,
    buffer: String,
    /// The id of the last event, kept across events as EventSource does.
    last_id: String,
}

impl Sse {
    /// Opens the stream, or returns the refusal.
    pub async fn open(
        addr: SocketAddr,
        skus: &[&str],
        last_event_id: Option<&str>,
        token: Option<&str>,
    ) -> Result<Sse, Answer> {
        let query: Vec<String> = skus.iter().map(|s| format!("sku={s}")).collect();
        let mut request = reqwest::Client::new()
            .get(format!("http://{addr}/v1/events?{}", query.join("&")))
            .header("accept", "text/event-stream");
        if let Some(id) = last_event_id {
            request = request.header("last-event-id", id);
        }
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.unwrap();
        if response.status() != 200 {
            return Err(answer(response).await);
        }
        let content_type = response.headers()["content-type"].to_str().unwrap();
        assert!(
            content_type.starts_with("text/event-stream"),
            "{content_type}"
        );
        Ok(Sse {
            response,
            buffer: String::new(),
            last_id: String::new(),
        })
    }

    /// The next event with data; `None` when the response ended.
    pub async fn next(&mut self) -> Option<SseEvent> {
        loop {
            if let Some(block_end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..block_end + 2).collect();
                let (mut event, mut data) = ("message".to_owned(), Vec::new());
                for line in block.lines() {
                    let (name, value) = line.split_once(':').unwrap_or((line, ""));
                    let value = value.strip_prefix(' ').unwrap_or(value);
                    match name {
                        "id" => self.last_id = value.to_owned(),
                        "event" => event = value.to_owned(),
                        "data" => data.push(value.to_owned()),
                        _ => {} // comments (keep-alive), retry
                    }
                }
                if data.is_empty() {
                    continue;
                }
                return Some(SseEvent {
                    id: self.last_id.clone(),
                    event,
                    data: serde_json::from_str(&data.join("\n")).unwrap(),
                });
            }
            let chunk = tokio::time::timeout(DEADLINE, self.response.chunk())
                .await
                .expect("an event within the deadline")
                .expect("the stream reads");
            match chunk {
                Some(bytes) => self.buffer.push_str(std::str::from_utf8(&bytes).unwrap()),
                None => return None,
            }
        }
    }

    /// The next `n` events, all of them changes.
    pub async fn take(&mut self, n: usize) -> Vec<SseEvent> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let event = self.next().await.expect("the stream goes on");
            assert_eq!(event.event, "message", "{event:?}");
            out.push(event);
        }
        out
    }
}

/// A GraphQL WebSocket connection after `connection_ack`.
pub struct GraphqlSocket {
    socket: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
}

impl GraphqlSocket {
    /// Connects with protocol `graphql-transport-ws` and initialises with
    /// `init` as the `connection_init` payload; the close reason when the
    /// server refuses.
    pub async fn connect(addr: SocketAddr, init: Value) -> Result<GraphqlSocket, String> {
        let mut request = format!("ws://{addr}/graphql")
            .into_client_request()
            .unwrap();
        request.headers_mut().insert(
            "sec-websocket-protocol",
            "graphql-transport-ws".parse().unwrap(),
        );
        let (mut socket, response) = tokio_tungstenite::connect_async(request).await.unwrap();
        assert_eq!(
            response.headers()["sec-websocket-protocol"],
            "graphql-transport-ws"
        );
        socket
            .send(Message::text(
                json!({"type": "connection_init", "payload": init}).to_string(),
            ))
            .await
            .unwrap();
        let mut socket = GraphqlSocket { socket };
        match socket.receive().await {
            Ok(ack) if ack["type"] == "connection_ack" => Ok(socket),
            Ok(other) => panic!("expected connection_ack, got {other}"),
            Err(reason) => Err(reason),
        }
    }

    pub async fn subscribe(&mut self, id: &str, query: &str) {
        self.socket
            .send(Message::text(
                json!({"type": "subscribe", "id": id, "payload": {"query": query}}).to_string(),
            ))
            .await
            .unwrap();
    }

    /// The next protocol message (pings answered on the way), or the close
    /// reason.
    pub async fn receive(&mut self) -> Result<Value, String> {
        loop {
            let message = tokio::time::timeout(DEADLINE, self.socket.next())
                .await
                .expect("a message within the deadline");
            match message {
                Some(Ok(Message::Text(text))) => {
                    let value: Value = serde_json::from_str(&text).unwrap();
                    if value["type"] == "ping" {
                        let pong = json!({"type": "pong"}).to_string();
                        self.socket.send(Message::text(pong)).await.unwrap();
                        continue;
                    }
                    return Ok(value);
                }
                Some(Ok(Message::Close(frame))) => {
                    return Err(frame.map(|f| f.reason.to_string()).unwrap_or_default());
                }
                Some(Ok(_)) => continue,
                Some(Err(err)) => return Err(err.to_string()),
                None => return Err("closed".into()),
            }
        }
    }
}

/// Reserves `quantity` of (`sku`, default location) through gRPC.
pub async fn reserve(app: &TestApp, id: &str, sku: &str, quantity: i64) {
    reserve_as(app, None, id, sku, quantity).await
}

/// The same, with the client token of a server that has one.
pub async fn reserve_as(app: &TestApp, token: Option<&str>, id: &str, sku: &str, quantity: i64) {
    let request = reserve_request(id, vec![line(sku, "", quantity)], 600);
    let request = match token {
        Some(token) => with_token(token, request),
        None => tonic::Request::new(request),
    };
    app.inventory
        .clone()
        .reserve(request)
        .await
        .expect("reserve");
}

pub async fn release(app: &TestApp, id: &str) {
    app.release(id).await.expect("release");
}
