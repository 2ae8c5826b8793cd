//! Event export to message brokers (DESIGN.md, "Event export to message
//! brokers"): every change event of the partition streams, published to
//! NATS JetStream (`nats.rs`) and/or RabbitMQ (`amqp.rs`).
//!
//! Each exporter is a consumer group of its own on the partition streams
//! (`export-nats`, `export-amqp`), a [`Handler`] on the one consumer loop
//! ([`crate::consumer`]): the loop reads, retries with backoff and
//! acknowledges; a handler only publishes a batch and waits for the
//! broker's acknowledgements (JetStream publish acks, AMQP publisher
//! confirms) before it returns, so an entry is XACKed only once the broker
//! holds it. A crash in between replays the entries with the same message
//! ids: JetStream's duplicate window drops them, AMQP consumers see the same
//! `message_id` again (at least once).
//!
//! Order: a batch is published in stream order, and one partition's entries
//! hold every change of an item in version order, so publishing in batch
//! order keeps each item's versions in order. A broker that is down only
//! holds back its own group: its backlog grows (the housekeeper's gauges
//! and backlog limit, [`crate::backlog`]), checkout never waits on it.
//!
//! Subjects, routing keys and message ids carry the location and sku
//! percent-encoded ([`encode_token`]) so that no item's name can add a
//! token, a wildcard or whitespace, and every name decodes back.

mod amqp;
mod nats;

use std::borrow::Cow;
use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use metrics::counter;
use serde::Serialize;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::consumer::{Batch, Consumer, ConsumerSettings, GroupStart, Handler, StepError};
use crate::events::{ChangeEvent, StreamEntry};
use crate::keys::Keyspace;
use crate::redis_conn::RedisConn;

pub use amqp::AmqpBroker;
pub use nats::NatsBroker;

/// The consumer group of the NATS JetStream exporter.
pub const NATS_GROUP: &str = "export-nats";
/// The consumer group of the RabbitMQ exporter.
pub const AMQP_GROUP: &str = "export-amqp";

/// The exporter named by a consumer group (`nats`, `amqp`), for metric
/// labels and status output; `None` for other groups.
pub fn exporter_of(group: &str) -> Option<&'static str> {
    match group {
        NATS_GROUP => Some("nats"),
        AMQP_GROUP => Some("amqp"),
        _ => None,
    }
}

/// Whether a byte must be percent-encoded inside a subject or routing-key
/// token: the separator, the wildcards, `%` itself (so that decoding is
/// unambiguous), whitespace and control bytes.
fn needs_escape(byte: u8) -> bool {
    matches!(byte, b'.' | b'*' | b'>' | b'%')
        || byte.is_ascii_whitespace()
        || byte < 0x20
        || byte == 0x7f
}

/// Percent-encodes one token of a subject, routing key or message id.
/// Injective (`%` is encoded), and the result holds no `.`, `*`, `>` or
/// whitespace. Unicode whitespace is encoded byte by byte like ASCII.
pub fn encode_token(value: &str) -> Cow<'_, str> {
    let escape = |c: char| (c.is_ascii() && needs_escape(c as u8)) || c.is_whitespace();
    if !value.chars().any(escape) {
        return Cow::Borrowed(value);
    }
    let mut out = String::with_capacity(value.len() + 8);
    for c in value.chars() {
        if escape(c) {
            let mut buf = [0u8; 4];
            for b in c.encode_utf8(&mut buf).bytes() {
                out.push_str(&format!("%{b:02X}"));
            }
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// Decodes a token of [`encode_token`]; `None` when it is not one.
pub fn decode_token(token: &str) -> Option<String> {
    let bytes = token.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = token.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The JetStream stream of a namespace: `STOCKD_<NS>`, upper-cased, every
/// character other than a letter or digit `_`.
pub fn stream_name(namespace: &str) -> String {
    let ns: String = namespace
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect();
    format!("STOCKD_{ns}")
}

/// `stockd.<ns>.stock`: the prefix of every subject of a namespace.
pub fn subject_prefix(namespace: &str) -> String {
    format!("stockd.{}.stock", encode_token(namespace))
}

/// `<location>.<sku>`: an item's routing key, and its subject after the
/// prefix.
pub fn item_key(location: &str, sku: &str) -> String {
    format!("{}.{}", encode_token(location), encode_token(sku))
}

/// `stockd.<ns>.stock.<location>.<sku>`.
pub fn subject(namespace: &str, location: &str, sku: &str) -> String {
    format!("{}.{}", subject_prefix(namespace), item_key(location, sku))
}

/// `<location>.<sku>.<version>`: the identity of a change, the same after
/// any replay (`Nats-Msg-Id`, AMQP `message_id`).
pub fn message_id(location: &str, sku: &str, version: i64) -> String {
    format!("{}.{version}", item_key(location, sku))
}

/// The RabbitMQ topic exchange of a namespace: `stockd.<ns>.events`.
pub fn exchange(namespace: &str) -> String {
    format!("stockd.{}.events", encode_token(namespace))
}

/// The payload: the event as JSON with the namespace added.
#[derive(Debug, Serialize)]
struct Payload<'a> {
    namespace: &'a str,
    sku: &'a str,
    location: &'a str,
    op: &'static str,
    d_available: i64,
    d_reserved: i64,
    available: i64,
    reserved: i64,
    version: i64,
    reference: &'a str,
    ts: i64,
    partition: u32,
    entry_id: String,
}

/// One change, ready for a broker.
#[derive(Debug, Clone)]
pub struct Message {
    /// `<location>.<sku>`: the routing key, the subject's tail.
    pub item_key: String,
    pub id: String,
    pub payload: Vec<u8>,
}

impl Message {
    pub fn of(namespace: &str, e: &ChangeEvent) -> Self {
        let payload = Payload {
            namespace,
            sku: &e.sku,
            location: &e.location,
            op: e.op.as_str(),
            d_available: e.d_available,
            d_reserved: e.d_reserved,
            available: e.available,
            reserved: e.reserved,
            version: e.version,
            reference: &e.reference,
            ts: e.ts_ms,
            partition: e.partition,
            entry_id: e.entry_id.to_string(),
        };
        Self {
            item_key: item_key(&e.location, &e.sku),
            id: message_id(&e.location, &e.sku, e.version),
            payload: serde_json::to_vec(&payload).expect("a payload of strings and integers"),
        }
    }
}

/// What a broker did with a publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Acked {
    /// Stored.
    Stored,
    /// Dropped as a replay of a message id it holds (JetStream's window).
    Duplicate,
}

/// A broker the exporter publishes to.
pub trait Broker: Send + Sync + 'static {
    /// `nats`, `amqp`: the exporter's label.
    const NAME: &'static str;

    /// Publishes `messages` in their order and waits for the broker's
    /// acknowledgement of each: `on_ack` hears of each acknowledged one
    /// (by index), in order. An error leaves the rest unacknowledged: the
    /// caller publishes them again (and must be ready to publish again the
    /// ones heard of, which the broker takes as replays).
    fn publish(
        &self,
        messages: &[&Message],
        on_ack: &mut (dyn FnMut(usize, Acked) + Send),
    ) -> impl Future<Output = Result<(), String>> + Send;

    /// Connects and creates the stream or exchange where missing, so that
    /// consumers can bind to it before the first change.
    fn prepare(&self) -> impl Future<Output = Result<(), String>> + Send;
}

/// Most messages published before their acknowledgements are awaited.
const MAX_IN_FLIGHT: usize = 1000;

/// The exporter's handler of one batch: the change events, as messages, to
/// its broker; extend records (no change of stock) are skipped, and so are
/// malformed entries (the flusher dead-letters them).
pub(crate) struct ExportHandler<B> {
    broker: B,
    namespace: String,
    /// The messages acknowledged of the batch in hand (keyed by its first
    /// entry), so that a retry after a broker failure publishes only what
    /// is left: fewer duplicates for brokers without a window.
    acked: Mutex<(Option<String>, HashSet<String>)>,
}

impl<B: Broker> Handler for ExportHandler<B> {
    async fn handle(&self, batch: &Batch) -> Result<(), StepError> {
        let messages: Vec<Message> = batch
            .entries
            .iter()
            .filter_map(|e| match &e.parsed {
                Ok(StreamEntry::Change(change)) => Some(Message::of(&self.namespace, change)),
                Ok(StreamEntry::Extend(_)) | Err(_) => None,
            })
            .collect();
        let batch_key = batch
            .entries
            .first()
            .map(|e| format!("{}/{}", e.partition, e.id));
        let todo: Vec<&Message> = {
            let mut acked = self.acked.lock().expect("not poisoned");
            if acked.0 != batch_key {
                *acked = (batch_key, HashSet::new());
            }
            messages
                .iter()
                .filter(|m| !acked.1.contains(&m.id))
                .collect()
        };
        if todo.is_empty() {
            return Ok(());
        }
        let name = B::NAME;
        // Bounded in flight: async-nats blocks a publish while 5,000 acks
        // are outstanding, and a whole batch may hold 500 entries of every
        // partition. Chunks go out in stream order, each acknowledged
        // before the next, so order per item holds across them.
        for (c, chunk) in todo.chunks(MAX_IN_FLIGHT).enumerate() {
            let offset = c * MAX_IN_FLIGHT;
            let mut on_ack = |i: usize, acked: Acked| {
                counter!("stockd_export_published_total", "exporter" => name).increment(1);
                if acked == Acked::Duplicate {
                    counter!("stockd_export_duplicates_total", "exporter" => name).increment(1);
                }
                self.acked
                    .lock()
                    .expect("not poisoned")
                    .1
                    .insert(todo[offset + i].id.clone());
            };
            if let Err(err) = self.broker.publish(chunk, &mut on_ack).await {
                counter!("stockd_export_retries_total", "exporter" => name).increment(1);
                return Err(StepError::Handler(format!("{name} export: {err}")));
            }
        }
        // The replay after a crash here must be dropped by the broker
        // (JetStream) or carry the same message ids (AMQP).
        crate::failpoint::hit(&format!("export-crash-after-publish:{name}"));
        Ok(())
    }
}

/// How the exporters read the streams (the flusher's batching settings).
#[derive(Debug, Clone)]
pub struct ExportSettings {
    pub nats_url: Option<String>,
    pub amqp_url: Option<String>,
    pub consumer: String,
    pub batch_size: usize,
    pub interval: std::time::Duration,
    pub claim_idle: std::time::Duration,
    /// Other consumers silent this long that own nothing are removed.
    pub remove_idle: std::time::Duration,
}

/// The configured exporters of one instance.
#[derive(Clone, Default)]
pub struct Exporters {
    nats: Option<Arc<Consumer<ExportHandler<NatsBroker>>>>,
    amqp: Option<Arc<Consumer<ExportHandler<AmqpBroker>>>>,
}

fn consumer_of<B: Broker>(
    redis: &RedisConn,
    keys: &Keyspace,
    settings: &ExportSettings,
    group: &'static str,
    broker: B,
) -> Arc<Consumer<ExportHandler<B>>> {
    Arc::new(Consumer::new(
        redis.clone(),
        keys.clone(),
        ConsumerSettings {
            group,
            // A new deployment exports what is written from now on.
            start: GroupStart::End,
            consumer: settings.consumer.clone(),
            batch_size: settings.batch_size,
            interval: settings.interval,
            claim_idle: settings.claim_idle,
            remove_idle: settings.remove_idle,
        },
        ExportHandler {
            broker,
            namespace: keys.namespace().to_owned(),
            acked: Mutex::new((None, HashSet::new())),
        },
    ))
}

impl Exporters {
    /// The exporters whose broker URL is set. Nothing connects yet: a
    /// broker that is down at start delays its export only.
    pub fn new(redis: &RedisConn, keys: &Keyspace, settings: &ExportSettings) -> Self {
        let ns = keys.namespace();
        Self {
            nats: settings.nats_url.as_ref().map(|url| {
                consumer_of(redis, keys, settings, NATS_GROUP, NatsBroker::new(url, ns))
            }),
            amqp: settings.amqp_url.as_ref().map(|url| {
                consumer_of(redis, keys, settings, AMQP_GROUP, AmqpBroker::new(url, ns))
            }),
        }
    }

    /// The consumer groups of the configured exporters.
    pub fn groups(&self) -> Vec<&'static str> {
        let mut groups = Vec::new();
        if self.nats.is_some() {
            groups.push(NATS_GROUP);
        }
        if self.amqp.is_some() {
            groups.push(AMQP_GROUP);
        }
        groups
    }

    /// Creates the exporters' groups where missing (before serving, so that
    /// no change made once stockd answers is missed).
    pub async fn ensure_groups(&self) -> Result<(), StepError> {
        if let Some(c) = &self.nats {
            c.ensure_groups(false).await?;
        }
        if let Some(c) = &self.amqp {
            c.ensure_groups(false).await?;
        }
        Ok(())
    }

    /// Starts each exporter's loop until `shutdown`, and connects to its
    /// broker at once (a broker that is down is retried by the loop when
    /// there is something to publish).
    pub fn spawn(&self, shutdown: &CancellationToken) -> Vec<(&'static str, JoinHandle<()>)> {
        let mut tasks = Vec::new();
        if let Some(c) = self.nats.clone() {
            tasks.push(("nats exporter", spawn_exporter(c, shutdown.clone())));
        }
        if let Some(c) = self.amqp.clone() {
            tasks.push(("amqp exporter", spawn_exporter(c, shutdown.clone())));
        }
        tasks
    }
}

fn spawn_exporter<B: Broker>(
    consumer: Arc<Consumer<ExportHandler<B>>>,
    shutdown: CancellationToken,
) -> JoinHandle<()> {
    let early = consumer.clone();
    tokio::spawn(async move {
        if let Err(err) = early.handler().broker.prepare().await {
            tracing::warn!(exporter = B::NAME, error = %err, "broker not reachable yet; the export waits for it");
        }
    });
    tokio::spawn(async move { consumer.run(shutdown).await })
}

/// Describes the exporter metrics and registers the counters at zero.
pub fn describe_metrics() {
    use metrics::{describe_counter, describe_gauge};
    describe_counter!(
        "stockd_export_published_total",
        "change events a broker acknowledged, per exporter (replays included)"
    );
    describe_counter!(
        "stockd_export_duplicates_total",
        "replayed change events the broker dropped as duplicates (JetStream's window), per exporter"
    );
    describe_counter!(
        "stockd_export_retries_total",
        "failed publishes of a batch (the batch is retried with backoff), per exporter"
    );
    describe_gauge!(
        "stockd_export_backlog",
        "change events not yet acknowledged by the broker, per exporter and partition"
    );
    describe_gauge!(
        "stockd_export_lag_seconds",
        "age of the oldest event not yet acknowledged by the broker, per exporter and partition"
    );
    for name in ["nats", "amqp"] {
        for metric in [
            "stockd_export_published_total",
            "stockd_export_duplicates_total",
            "stockd_export_retries_total",
        ] {
            counter!(metric, "exporter" => name).increment(0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn names_follow_the_contract() {
        assert_eq!(stream_name("stockd"), "STOCKD_STOCKD");
        assert_eq!(stream_name("shop-eu.1"), "STOCKD_SHOP_EU_1");
        assert_eq!(
            subject("stockd", "wh-1", "SKU-1"),
            "stockd.stockd.stock.wh-1.SKU-1"
        );
        assert_eq!(exchange("stockd"), "stockd.stockd.events");
        assert_eq!(
            message_id("wh 1", "a.b*c>d%", 7),
            "wh%201.a%2Eb%2Ac%3Ed%25.7"
        );
    }

    #[test]
    fn tokens_hold_no_separator_wildcard_or_space() {
        let nasty = "a.b*c>d%e f\tg\u{00a0}h";
        let token = encode_token(nasty);
        assert!(
            !token.contains(['.', '*', '>', ' ', '\t', '\u{00a0}']),
            "{token}"
        );
        assert_eq!(decode_token(&token).as_deref(), Some(nasty));
        assert_eq!(decode_token("%4"), None);
        assert_eq!(decode_token("%ZZ"), None);
    }

    proptest! {
        #[test]
        fn distinct_items_give_distinct_subjects(
            a in ("\\PC{1,8}|[.*>% ]{1,4}", "\\PC{1,8}|[.*>% ]{1,4}"),
            b in ("\\PC{1,8}|[.*>% ]{1,4}", "\\PC{1,8}|[.*>% ]{1,4}"),
        ) {
            let key = |(loc, sku): &(String, String)| item_key(loc, sku);
            prop_assert_eq!(a == b, key(&a) == key(&b));
            let k = key(&a);
            let tokens: Vec<&str> = k.split('.').collect();
            prop_assert_eq!(tokens.len(), 2);
            prop_assert_eq!(decode_token(tokens[0]), Some(a.0.clone()));
            prop_assert_eq!(decode_token(tokens[1]), Some(a.1.clone()));
        }
    }
}
