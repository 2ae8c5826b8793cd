//! Event export to the real NATS JetStream and RabbitMQ (DESIGN.md, "Event
//! export to message brokers"): every change reaches JetStream exactly once
//! by message id and RabbitMQ at least once, in version order per item,
//! across kill -9; a broker that is down delays its export only, up to the
//! backlog limit; names with `.`, `*`, `>` and `%` stay distinct and
//! decodable.
//!
//! Each test has its own namespace, hence its own JetStream stream
//! (`STOCKD_<NS>`) and exchange (`stockd.<ns>.events`) with a queue of its
//! own, deleted at the end.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use futures::StreamExt;
use lapin::options::{
    BasicConsumeOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use rand::Rng;
use stockd::export;
use tonic::Code;

use crate::support::brokers::{amqp_url, nats_url};
use crate::support::load::background_load;
use crate::support::process::Stockd;
use crate::support::proxy::FaultProxy;
use crate::support::*;

/// `host:port` of a broker URL, for a fault proxy in front of it.
fn socket_of(url: &str) -> SocketAddr {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, r)| r);
    let host_port = rest.split('/').next().unwrap();
    host_port.parse().expect("a broker URL with an IP address")
}

/// One exported change as a consumer receives it.
#[derive(Debug, Clone, PartialEq)]
struct Seen {
    sku: String,
    location: String,
    version: i64,
    id: String,
    payload: Vec<u8>,
}

/// Checks a received message against the contract: the routing key or
/// subject tail is the item's encoded `<location>.<sku>` and decodes back
/// to the payload's item, the id is `<location>.<sku>.<version>`, the
/// payload carries the namespace.
fn seen(namespace: &str, item_key: &str, id: &str, payload: &[u8]) -> Seen {
    let json: serde_json::Value = serde_json::from_slice(payload).expect("a JSON payload");
    let text = |f: &str| {
        json[f]
            .as_str()
            .unwrap_or_else(|| panic!("{f} in {json}"))
            .to_owned()
    };
    let (sku, location) = (text("sku"), text("location"));
    let version = json["version"].as_i64().expect("version");
    assert_eq!(text("namespace"), namespace);
    assert_eq!(item_key, export::item_key(&location, &sku), "{json}");
    let tokens: Vec<&str> = item_key.split('.').collect();
    assert_eq!(
        tokens.len(),
        2,
        "{item_key}: one token each for location and sku"
    );
    assert_eq!(
        export::decode_token(tokens[0]).as_deref(),
        Some(location.as_str())
    );
    assert_eq!(
        export::decode_token(tokens[1]).as_deref(),
        Some(sku.as_str())
    );
    assert_eq!(id, export::message_id(&location, &sku, version));
    Seen {
        sku,
        location,
        version,
        id: id.to_owned(),
        payload: payload.to_vec(),
    }
}

/// The test's JetStream stream, read whole.
struct Jet {
    js: jetstream::Context,
    namespace: String,
}

impl Jet {
    async fn connect(namespace: &str) -> Self {
        let client = async_nats::connect(nats_url())
            .await
            .expect("the test NATS");
        Self {
            js: jetstream::new(client),
            namespace: namespace.to_owned(),
        }
    }

    fn stream(&self) -> String {
        export::stream_name(&self.namespace)
    }

    /// Every message of the stream in stream order (none before stockd
    /// created it).
    async fn messages(&self) -> Vec<Seen> {
        let Ok(mut stream) = self.js.get_stream(self.stream()).await else {
            return Vec::new();
        };
        let state = stream.info().await.unwrap().state.clone();
        let prefix = format!("{}.", export::subject_prefix(&self.namespace));
        let mut out = Vec::with_capacity(state.messages as usize);
        if state.messages == 0 {
            return out;
        }
        for seq in state.first_sequence..=state.last_sequence {
            let m = stream.get_raw_message(seq).await.unwrap();
            let tail = m
                .subject
                .strip_prefix(&prefix)
                .expect("a subject of the namespace");
            let id = m
                .headers
                .get(async_nats::header::NATS_MESSAGE_ID)
                .expect("Nats-Msg-Id")
                .as_str();
            out.push(seen(&self.namespace, tail, id, &m.payload));
        }
        out
    }

    async fn delete(self) {
        let _ = self.js.delete_stream(self.stream()).await;
    }
}

/// A queue of the test's own bound to the namespace's exchange (`#`).
struct Rabbit {
    connection: lapin::Connection,
    channel: lapin::Channel,
    exchange: String,
    queue: String,
    consumer: lapin::Consumer,
    received: Vec<Seen>,
    namespace: String,
}

impl Rabbit {
    async fn bind(namespace: &str) -> Self {
        let connection = lapin::Connection::connect(&amqp_url(), Default::default())
            .await
            .expect("the test RabbitMQ");
        let channel = connection.create_channel().await.unwrap();
        let exchange = export::exchange(namespace);
        // As stockd declares it (the first declaration wins; they agree).
        channel
            .exchange_declare(
                exchange.as_str().into(),
                lapin::ExchangeKind::Topic,
                ExchangeDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        let queue = format!("{exchange}.test");
        channel
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        channel
            .queue_bind(
                queue.as_str().into(),
                exchange.as_str().into(),
                "#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        let consumer = channel
            .basic_consume(
                queue.as_str().into(),
                "export-test".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        Self {
            connection,
            channel,
            exchange,
            queue,
            consumer,
            received: Vec::new(),
            namespace: namespace.to_owned(),
        }
    }

    /// Receives until every version of `levels` arrived, first
    /// occurrences in order (at least once), or panics after `deadline`
    /// saying what is wrong.
    async fn receive_all(&mut self, deadline: Duration, levels: &Levels) {
        let until = Instant::now() + deadline;
        while let Err(why) = check_order(&self.received, levels, false) {
            let left = until.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "RabbitMQ after {deadline:?} ({} messages): {why}",
                self.received.len()
            );
            let Ok(Some(delivery)) = tokio::time::timeout(left, self.consumer.next()).await else {
                continue;
            };
            let d = delivery.expect("a delivery");
            let props = &d.properties;
            assert_eq!(props.delivery_mode(), &Some(2), "persistent");
            let id = props.message_id().as_ref().expect("message_id").to_string();
            let received = seen(&self.namespace, d.routing_key.as_str(), &id, &d.data);
            self.received.push(received);
        }
    }

    async fn delete(self) {
        let _ = self
            .channel
            .queue_delete(self.queue.as_str().into(), QueueDeleteOptions::default())
            .await;
        let _ = self
            .channel
            .exchange_delete(
                self.exchange.as_str().into(),
                ExchangeDeleteOptions::default(),
            )
            .await;
        let _ = self.connection.close(0, "done".into()).await;
    }
}

/// What a broker received, checked against the items' versions in Redis:
/// every version 1..=current of every item, first occurrences in version
/// order; with `exactly_once`, no message twice. Duplicates (at least
/// once) must repeat the first one exactly. Returns how many duplicates.
fn check_order(received: &[Seen], levels: &Levels, exactly_once: bool) -> Result<usize, String> {
    let mut first: HashMap<&str, &Seen> = HashMap::new();
    let mut per_item: BTreeMap<(String, String), Vec<i64>> = BTreeMap::new();
    let mut duplicates = 0;
    for m in received {
        if let Some(earlier) = first.get(m.id.as_str()) {
            if exactly_once {
                return Err(format!("{} arrived twice", m.id));
            }
            if *earlier != m {
                return Err(format!("duplicate {} differs: {earlier:?} / {m:?}", m.id));
            }
            duplicates += 1;
            continue;
        }
        first.insert(&m.id, m);
        per_item
            .entry((m.sku.clone(), m.location.clone()))
            .or_default()
            .push(m.version);
    }
    for ((sku, location), (_, _, version)) in levels {
        let got = per_item
            .remove(&(sku.clone(), location.clone()))
            .unwrap_or_default();
        let want: Vec<i64> = (1..=*version).collect();
        if got != want {
            return Err(format!(
                "{location}/{sku}: versions {} arrived as {got:?}, not 1..={version} in order",
                got.len()
            ));
        }
    }
    match per_item.keys().next() {
        Some(item) => Err(format!("{item:?} is no item of Redis")),
        None => Ok(duplicates),
    }
}

impl Jet {
    /// Waits until the stream holds every version of `levels` exactly once
    /// in order; returns how many messages, or panics after `deadline`
    /// saying what is wrong.
    async fn wait_all(&self, deadline: Duration, levels: &Levels) -> usize {
        let until = Instant::now() + deadline;
        loop {
            let messages = self.messages().await;
            match check_order(&messages, levels, true) {
                Ok(_) => return messages.len(),
                Err(why) => assert!(
                    Instant::now() < until,
                    "JetStream after {deadline:?} ({} messages): {why}",
                    messages.len()
                ),
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }
}

/// Sum of a counter's samples with this label in a Prometheus text page.
fn counter_in(page: &str, name: &str, label: &str) -> u64 {
    page.lines()
        .filter(|l| l.starts_with(name) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

async fn scrape(addr: &str) -> String {
    match reqwest::get(format!("http://{addr}/metrics")).await {
        Ok(r) => r.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    }
}

/// A free local address for `--metrics-addr`.
fn metrics_addr() -> String {
    format!("127.0.0.1:{}", free_port())
}

/// (published, duplicates) of the NATS export, as the instance whose
/// metrics are at `addr` counted them.
async fn nats_export_counts(addr: &str) -> (u64, u64) {
    let page = scrape(addr).await;
    (
        counter_in(&page, "stockd_export_published_total", "nats"),
        counter_in(&page, "stockd_export_duplicates_total", "nats"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_change_reaches_both_brokers_in_order_across_kill_9() {
    let namespace = unique_namespace("export-kill");
    let database = namespace.replace('-', "_");
    let leftovers = Leftovers::new(&namespace, &database);
    let database_url = postgres_url(&database);
    let redis = shared_redis().await;
    let skus: Vec<String> = (0..10).map(|i| format!("exp.sku*{i}")).collect();
    let jet = Jet::connect(&namespace).await;
    let mut rabbit = Rabbit::bind(&namespace).await;
    let exporter = async |failpoint: Option<&str>, metrics: &str| {
        let args = [
            "--nats-url".to_owned(),
            nats_url(),
            "--amqp-url".into(),
            amqp_url(),
            "--metrics-addr".into(),
            metrics.to_owned(),
        ];
        Stockd::start_failing(&namespace, &database_url, "exporter", failpoint, &args).await
    };

    // 1. An instance that dies between JetStream's ack and the XACK: its
    //    restart publishes the batch again, and JetStream drops it.
    let failing = metrics_addr();
    let mut first = exporter(Some("export-crash-after-publish:nats"), &failing).await;
    first.clients().seed_each(&skus[..1], 10_000).await;
    assert!(!first.wait_exit(Duration::from_secs(30)).await.success());

    // 2. Rounds of load from many clients, each ended by kill -9 at a
    //    random moment; metrics are read just before each kill.
    let mut published = 0;
    let mut duplicates = 0;
    for round in 0..4 {
        let metrics = metrics_addr();
        let mut stockd = exporter(None, &metrics).await;
        if round == 0 {
            // The replay of the aborted batch, dropped as a duplicate.
            eventually(
                Duration::from_secs(20),
                "the replay to reach JetStream",
                || {
                    let metrics = metrics.clone();
                    async move {
                        let page = scrape(&metrics).await;
                        (counter_in(&page, "stockd_export_duplicates_total", "nats") > 0)
                            .then_some(())
                    }
                },
            )
            .await;
            stockd.clients().seed_each(&skus, 10_000).await;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let load = background_load(stockd.channel(), skus.clone(), stop.clone());
        let chaos = Duration::from_millis(rand::rng().random_range(200..800));
        tokio::time::sleep(chaos).await;
        let (p, d) = nats_export_counts(&metrics).await;
        (published, duplicates) = (published + p, duplicates + d);
        stockd.kill9();
        stop.store(true, Ordering::Relaxed);
        load.await.unwrap();
    }

    // 3. A last instance replays what the killed ones left pending.
    let metrics = metrics_addr();
    let mut stockd = exporter(None, &metrics).await;
    let levels = levels_in_redis(&mut redis.clone(), &namespace).await;
    let changes: i64 = levels.values().map(|(_, _, v)| v).sum();
    assert!(changes > 50, "the load made changes: {changes}");
    let in_jetstream = jet.wait_all(Duration::from_secs(60), &levels).await;
    rabbit.receive_all(Duration::from_secs(60), &levels).await;
    let rabbit_duplicates = check_order(&rabbit.received, &levels, false).unwrap();
    let (p, d) = nats_export_counts(&metrics).await;
    (published, duplicates) = (published + p, duplicates + d);
    eprintln!(
        "export across kill -9: {changes} changes; JetStream holds {in_jetstream}, \
         {published} acks seen by live instances of which {duplicates} duplicates dropped; \
         RabbitMQ delivered {} ({rabbit_duplicates} duplicates with the same message_id)",
        rabbit.received.len()
    );
    assert_eq!(in_jetstream as i64, changes);
    assert!(
        duplicates >= 1,
        "the replayed batch was dropped by JetStream's window"
    );
    assert_eq!(stockd.terminate().await.code(), Some(0));

    jet.delete().await;
    rabbit.delete().await;
    leftovers.remove().await;
}

/// The export's state per exporter: (backlog, oldest lag ms) summed over
/// partitions, and the flusher's pending entries.
async fn export_status(app: &TestApp, exporter: &str) -> (u64, i64, u64) {
    let status = app.flush_status().await.unwrap();
    let mut out = (0, 0, 0);
    for p in status.partitions {
        out.2 += p.pending;
        for e in p.exports.iter().filter(|e| e.exporter == exporter) {
            out.0 += e.backlog;
            out.1 = out.1.max(e.lag_ms);
        }
    }
    out
}

async fn decrement(app: &TestApp, id: &str, sku: &str) -> Result<(), tonic::Status> {
    app.decrement(id, vec![line(sku, "", 1)]).await.map(drop)
}

/// A broker under test, with what a consumer of it received.
enum Broker {
    Nats(Box<Jet>),
    Amqp(Box<Rabbit>),
}

impl Broker {
    async fn open(name: &str, namespace: &str) -> Self {
        match name {
            "nats" => Broker::Nats(Box::new(Jet::connect(namespace).await)),
            _ => Broker::Amqp(Box::new(Rabbit::bind(namespace).await)),
        }
    }

    /// stockd's flag and URL for this broker behind `proxy`.
    fn through(&self, proxy: &FaultProxy) -> [String; 2] {
        match self {
            Broker::Nats(_) => ["--nats-url".into(), format!("nats://{}", proxy.addr)],
            Broker::Amqp(_) => [
                "--amqp-url".into(),
                format!("amqp://guest:guest@{}/%2f", proxy.addr),
            ],
        }
    }

    /// Waits until every version of `levels` arrived in order (exactly
    /// once on JetStream); returns how many messages that took.
    async fn wait_complete(&mut self, levels: &Levels) -> usize {
        match self {
            Broker::Nats(jet) => jet.wait_all(Duration::from_secs(60), levels).await,
            Broker::Amqp(rabbit) => {
                rabbit.receive_all(Duration::from_secs(60), levels).await;
                rabbit.received.len()
            }
        }
    }

    async fn delete(self) {
        match self {
            Broker::Nats(jet) => jet.delete().await,
            Broker::Amqp(rabbit) => rabbit.delete().await,
        }
    }
}

/// One broker behind the TCP fault proxy, cut under load: checkout goes on
/// answering, the exporter's backlog grows, past the limit new demand is
/// refused, and once the broker is back the export catches up with nothing
/// lost.
async fn broker_down(name: &str) {
    let upstream = if name == "nats" {
        nats_url()
    } else {
        amqp_url()
    };
    let proxy = FaultProxy::start(socket_of(&upstream)).await;
    let namespace = unique_namespace(&format!("export-down-{name}"));
    let mut broker = Broker::open(name, &namespace).await;
    let mut extra_args = broker.through(&proxy).to_vec();
    extra_args.extend(["--max-unflushed".into(), "60".into()]);
    let app = spawn_app_with(Options {
        namespace,
        partitions: 1,
        extra_args,
        ..Options::default()
    })
    .await;
    app.seed("down", "", 1_000_000).await;
    let seeded = levels_in_redis(&mut app.redis.clone(), &app.namespace).await;
    assert_eq!(broker.wait_complete(&seeded).await, 1);

    // The broker unreachable: checkout goes on answering at its usual pace.
    proxy.cut();
    let clients = (0..8).map(|c| {
        let app = &app;
        async move {
            for i in 0..5 {
                let started = Instant::now();
                decrement(app, &format!("down-{c}-{i}"), "down")
                    .await
                    .unwrap();
                assert!(
                    started.elapsed() < Duration::from_secs(1),
                    "a decrement waited for the broker: {:?}",
                    started.elapsed()
                );
            }
        }
    });
    futures::future::join_all(clients).await;
    let (backlog, lag_ms, _) =
        eventually(Duration::from_secs(10), "the backlog to show", || async {
            let s = export_status(&app, name).await;
            (s.0 >= 40 && s.2 == 0).then_some(s)
        })
        .await;
    assert!(lag_ms > 0, "the export lag shows: {lag_ms} ms");
    if let Broker::Nats(jet) = &broker {
        assert_eq!(
            jet.messages().await.len(),
            1,
            "nothing reached NATS meanwhile"
        );
    }

    // Past the backlog limit new demand is refused, and changes nothing.
    let mut n = 0;
    eventually(
        Duration::from_secs(20),
        "writes to be refused past the limit",
        || {
            n += 1;
            let id = format!("over-{n}");
            let app = &app;
            async move {
                match decrement(app, &id, "down").await {
                    Ok(()) => None,
                    Err(status) => {
                        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
                        Some(())
                    }
                }
            }
        },
    )
    .await;
    let before = app.level("down", "").await.unwrap();
    assert_eq!(
        decrement(&app, "refused", "down").await.unwrap_err().code(),
        Code::Unavailable
    );
    assert_eq!(
        app.level("down", "").await.unwrap(),
        before,
        "a refused write changes nothing"
    );
    eprintln!("{name} down: export backlog {backlog} (lag {lag_ms} ms) before the limit");

    // The broker back: the export catches up, nothing lost, writes pass again.
    proxy.restore();
    eventually(
        Duration::from_secs(60),
        "the export to catch up",
        || async { (export_status(&app, name).await.0 == 0).then_some(()) },
    )
    .await;
    let levels = levels_in_redis(&mut app.redis.clone(), &app.namespace).await;
    broker.wait_complete(&levels).await;
    eventually(Duration::from_secs(10), "writes to pass again", || async {
        decrement(&app, "after", "down").await.ok()
    })
    .await;
    broker.delete().await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nats_down_delays_only_its_export_up_to_the_backlog_limit() {
    broker_down("nats").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rabbitmq_down_delays_only_its_export_up_to_the_backlog_limit() {
    broker_down("amqp").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn subjects_and_routing_keys_of_odd_names_are_distinct_and_decodable() {
    let namespace = unique_namespace("export-names");
    let jet = Jet::connect(&namespace).await;
    let mut rabbit = Rabbit::bind(&namespace).await;
    let app = spawn_app_with(Options {
        namespace,
        extra_args: vec![
            "--nats-url".into(),
            nats_url(),
            "--amqp-url".into(),
            amqp_url(),
        ],
        ..Options::default()
    })
    .await;
    // Names that would add a token, a wildcard or an escape if they went
    // into a subject unencoded: `a.b` must not meet `a%2Eb`, nor `a*` a
    // wildcard.
    let skus = ["a.b", "a%2Eb", "a*", ">", "a>b.c", "%", "%25", "plain"];
    let locations = ["wh.1", "wh%2E1", "*"];
    for sku in skus {
        for location in locations {
            app.seed(sku, location, 3).await;
        }
    }
    // Whitespace never gets this far: names with it are refused.
    let refused = app.set("space", "a b", "", 1).await;
    assert_eq!(code_of(refused), Code::InvalidArgument);

    let levels = levels_in_redis(&mut app.redis.clone(), &app.namespace).await;
    assert_eq!(levels.len(), skus.len() * locations.len());
    jet.wait_all(Duration::from_secs(20), &levels).await;
    let messages = jet.messages().await;
    let subjects: std::collections::HashSet<String> = messages
        .iter()
        .map(|m| export::subject(&app.namespace, &m.location, &m.sku))
        .collect();
    assert_eq!(subjects.len(), levels.len(), "one subject per item");
    rabbit.receive_all(Duration::from_secs(20), &levels).await;

    // A consumer filtered on one item's subject gets that item only.
    let subject = export::subject(&app.namespace, "wh.1", "a.b");
    let stream = jet.js.get_stream(jet.stream()).await.unwrap();
    let filtered = stream
        .create_consumer(jetstream::consumer::pull::Config {
            filter_subject: subject.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut batch = filtered
        .fetch()
        .max_messages(100)
        .expires(Duration::from_secs(1))
        .messages()
        .await
        .unwrap();
    let mut got = Vec::new();
    while let Some(m) = batch.next().await {
        got.push(m.unwrap().subject.to_string());
    }
    assert_eq!(got, vec![subject], "only a.b at wh.1");

    jet.delete().await;
    rabbit.delete().await;
    app.stop().await;
}
