//! Lifecycle as orchestrators and load balancers see it: the health status
//! (overall and per service), the drain on SIGTERM, the connection age
//! limit, and reflection in both versions.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::future::join_all;
use stockd::pb;
use tokio_stream::StreamExt;
use tonic::Code;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::support::own_redis::OwnRedis;
use crate::support::process::Stockd;
use crate::support::*;

fn ask(service: &str) -> HealthCheckRequest {
    HealthCheckRequest {
        service: service.into(),
    }
}

async fn status_of(channel: Channel, service: &str) -> ServingStatus {
    let answer = HealthClient::new(channel)
        .check(ask(service))
        .await
        .unwrap()
        .into_inner();
    ServingStatus::try_from(answer.status).unwrap()
}

/// A ten-minute hold of one unit of `sku`.
async fn hold(rpc: &impl Rpc, id: &str, sku: &str) -> Result<pb::ReserveResponse, tonic::Status> {
    rpc.reserve(id, vec![line(sku, "", 1)], 600).await
}

/// SIGTERM: NOT_SERVING (overall and per service) at once while stockd
/// still runs and serves for the drain period; requests in flight when the
/// drain ends complete; everything they wrote reaches Postgres before the
/// process exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_reports_not_serving_drains_and_exits_zero() {
    const DRAIN: Duration = Duration::from_millis(2_000);
    let redis = OwnRedis::start().await;
    let namespace = unique_namespace("drain");
    let database = namespace.replace('-', "_");
    let leftovers = Leftovers::database(&database);
    let mut stockd = Stockd::start_on_redis(
        &redis.url(),
        &namespace,
        &postgres_url(&database),
        "drain",
        &[
            "--shutdown-drain-ms".into(),
            DRAIN.as_millis().to_string(),
            // The requests held in flight below wait for Redis longer
            // than the default command timeout.
            "--redis-timeout-ms".into(),
            "10000".into(),
        ],
    )
    .await;
    let channel = stockd.channel();
    let rpc = Clients::new(channel.clone());
    rpc.set("seed", "drained", "", 1_000).await.unwrap();
    let mut watch = HealthClient::new(channel.clone())
        .watch(ask(""))
        .await
        .unwrap()
        .into_inner();
    let first = watch.next().await.unwrap().unwrap();
    assert_eq!(first.status, ServingStatus::Serving as i32);

    let asked = Instant::now();
    stockd.send_sigterm();
    let next = tokio::time::timeout(Duration::from_secs(5), watch.next())
        .await
        .expect("a health change within 5 s")
        .unwrap()
        .unwrap();
    assert_eq!(next.status, ServingStatus::NotServing as i32);
    assert!(
        stockd.running(),
        "NOT_SERVING is reported while stockd still runs"
    );
    for service in ["", "stockd.v1.Inventory", "stockd.v1.Admin"] {
        assert_eq!(
            status_of(channel.clone(), service).await,
            ServingStatus::NotServing,
            "{service:?}"
        );
    }
    // Draining still serves, on open connections and on new ones.
    for i in 0..5 {
        hold(&rpc, &format!("during-{i}"), "drained").await.unwrap();
    }
    hold(&stockd.clients(), "new-connection", "drained")
        .await
        .unwrap();
    assert!(
        asked.elapsed() < DRAIN,
        "the drain requests ran within the drain period; make DRAIN longer"
    );

    // Requests that Redis holds up until after the drain period ends are
    // in flight when the server stops: they finish.
    let _: () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(
            (DRAIN.saturating_sub(asked.elapsed()) + Duration::from_millis(700)).as_millis() as u64,
        )
        .arg("WRITE")
        .query_async(&mut own_conn(&redis).await)
        .await
        .unwrap();
    let in_flight = join_all((0..20).map(|i| {
        let rpc = rpc.clone();
        async move {
            let answer = hold(&rpc, &format!("in-flight-{i}"), "drained").await;
            (answer.map(|_| ()), Instant::now())
        }
    }));
    let stream_end = async {
        // The health watch ends when the server stops.
        while let Some(Ok(_)) = watch.next().await {}
        Instant::now()
    };
    let (answers, stopped) = tokio::join!(in_flight, stream_end);
    assert!(
        stopped.duration_since(asked) >= DRAIN,
        "served for the drain period"
    );
    for (i, (answer, done)) in answers.iter().enumerate() {
        assert!(answer.is_ok(), "in-flight request {i}: {answer:?}");
        assert!(
            *done > stopped,
            "request {i} was still in flight at the stop"
        );
    }

    let status = stockd.wait_exit(Duration::from_secs(20)).await;
    assert_eq!(status.code(), Some(0), "exit status");
    // The flush batch in hand was committed before the exit: Postgres holds
    // every hold of the 26 that returned OK.
    let pool = sqlx::PgPool::connect(&postgres_url(&database))
        .await
        .unwrap();
    let reserved: i64 = sqlx::query_scalar("SELECT reserved FROM stock WHERE sku = 'drained'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(reserved, 26);
    pool.close().await;
    leftovers.remove().await;
}

async fn own_conn(redis: &OwnRedis) -> redis::aio::MultiplexedConnection {
    redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// The overall status follows serving as the named services do: while
/// Redis lost its data and another instance holds the restore lock, all
/// say NOT_SERVING; once restored, SERVING again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn overall_health_follows_a_rewarm() {
    let app = spawn_app_with(Options::with_args(&["--epoch-check-ms", "50"])).await;
    app.seed("rewarmed", "", 3).await;
    app.converged(&app.postgres().await).await;
    let channel = Channel::from_shared(format!("http://{}", app.addr))
        .unwrap()
        .connect_lazy();
    for service in ["", "stockd.v1.Inventory", "stockd.v1.Admin"] {
        assert_eq!(
            status_of(channel.clone(), service).await,
            ServingStatus::Serving
        );
    }
    // Another instance "restores": this one waits, not serving.
    let lock = app.keys.lock("rewarm");
    let _: () = redis::cmd("SET")
        .arg(&lock)
        .arg("someone-else")
        .arg("PX")
        .arg(60_000)
        .query_async(&mut app.redis.clone())
        .await
        .unwrap();
    lose_every_key_but(&app, &[lock.as_str()]).await;
    for service in ["", "stockd.v1.Inventory", "stockd.v1.Admin"] {
        eventually(
            Duration::from_secs(10),
            "NOT_SERVING while re-warming",
            || {
                let channel = channel.clone();
                async move {
                    (status_of(channel, service).await == ServingStatus::NotServing).then_some(())
                }
            },
        )
        .await;
    }
    let _: () = redis::cmd("DEL")
        .arg(&lock)
        .query_async(&mut app.redis.clone())
        .await
        .unwrap();
    for service in ["", "stockd.v1.Inventory", "stockd.v1.Admin"] {
        eventually(Duration::from_secs(10), "SERVING once restored", || {
            let channel = channel.clone();
            async move {
                (status_of(channel, service).await == ServingStatus::Serving).then_some(())
            }
        })
        .await;
    }
    assert_eq!(app.level("rewarmed", "").await.unwrap().available, 3);
    app.stop().await;
}

/// Past the maximum connection age the server sends GOAWAY; the client
/// reconnects and no request fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn connections_are_recycled_after_their_maximum_age_without_failures() {
    let app = spawn_app_with(Options::with_args(&["--max-connection-age-secs", "1"])).await;
    app.seed("aged", "", 5).await;
    // The client counts the connections it opens.
    let opened = Arc::new(AtomicU64::new(0));
    let connector = {
        let opened = opened.clone();
        let addr = app.addr;
        tower::service_fn(move |_: tonic::transport::Uri| {
            opened.fetch_add(1, Ordering::SeqCst);
            async move {
                let tcp = tokio::net::TcpStream::connect(addr).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tcp))
            }
        })
    };
    let channel = Channel::from_static("http://stockd.test").connect_with_connector_lazy(connector);
    let mut inv = pb::inventory_client::InventoryClient::new(channel);
    let get = || get_request(&[("aged", "")]);
    let started = Instant::now();
    let (mut ok, mut failed, mut resent) = (0u32, Vec::new(), 0u64);
    // Four clients in a loop for 3.5 s: three or four connection lives.
    while started.elapsed() < Duration::from_millis(3_500) {
        let answers = join_all((0..4).map(|_| {
            let mut inv = inv.clone();
            async move {
                // tonic's client may hand a request to a connection that is
                // closing after its GOAWAY: such a request never reached the
                // service (CANCELLED "connection closed" before it was sent,
                // or refused by the GOAWAY's last stream id) and is sent
                // again, as gRPC's transparent retry does in other languages.
                let mut resent = 0;
                loop {
                    match inv.get_stock(get()).await {
                        Err(status) if never_processed(&status) && resent < 3 => resent += 1,
                        answer => return (answer, resent),
                    }
                }
            }
        }))
        .await;
        for (answer, again) in answers {
            resent += again;
            match answer {
                Ok(answer) => {
                    assert_eq!(answer.into_inner().levels[0].available, 5);
                    ok += 1;
                }
                Err(status) => failed.push(status),
            }
        }
    }
    inv.get_stock(get()).await.unwrap();
    assert!(
        failed.is_empty(),
        "{} of {} failed: {failed:?}",
        failed.len(),
        ok as usize + failed.len()
    );
    assert!(ok > 100, "{ok} requests");
    let opened = opened.load(Ordering::SeqCst);
    assert!(
        opened >= 3,
        "the connection was closed and reopened: {opened} connections"
    );
    assert!(
        resent <= 4 * (opened - 1),
        "at most the requests in flight at each GOAWAY are sent again: {resent}"
    );
    app.stop().await;
}

/// Whether a failed call never reached the service because its connection
/// was going away: tonic surfaces these as transport errors of its own.
fn never_processed(status: &tonic::Status) -> bool {
    let detail = format!("{status:?}");
    match status.code() {
        Code::Cancelled => detail.contains("connection closed"),
        Code::Internal | Code::Unavailable => {
            detail.contains("GoAway(") && detail.contains("Remote")
        }
        _ => false,
    }
}

/// Reflection answers v1 and v1alpha clients (older grpcurl, Postman,
/// Python's grpcio-reflection).
#[tokio::test]
async fn reflection_answers_v1_and_v1alpha() {
    use tonic_reflection::pb::{v1, v1alpha};
    let app = spawn_app().await;
    let channel = Channel::from_shared(format!("http://{}", app.addr))
        .unwrap()
        .connect_lazy();

    let request = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            v1alpha::server_reflection_request::MessageRequest::ListServices(String::new()),
        ),
    };
    let mut answers =
        v1alpha::server_reflection_client::ServerReflectionClient::new(channel.clone())
            .server_reflection_info(tokio_stream::iter([request]))
            .await
            .unwrap()
            .into_inner();
    let answer = answers.next().await.unwrap().unwrap();
    let Some(v1alpha::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        answer.message_response
    else {
        panic!("not a service list: {answer:?}");
    };
    // Each version lists itself as the reflection service; the rest agree.
    let mut alpha: Vec<String> = list
        .service
        .into_iter()
        .map(|s| s.name)
        .filter(|s| s != "grpc.reflection.v1alpha.ServerReflection")
        .collect();
    alpha.sort();

    let request = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
    };
    let mut answers = v1::server_reflection_client::ServerReflectionClient::new(channel)
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let answer = answers.next().await.unwrap().unwrap();
    let Some(v1::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        answer.message_response
    else {
        panic!("not a service list: {answer:?}");
    };
    let mut current: Vec<String> = list
        .service
        .into_iter()
        .map(|s| s.name)
        .filter(|s| s != "grpc.reflection.v1.ServerReflection")
        .collect();
    current.sort();

    for service in [
        "grpc.health.v1.Health",
        "stockd.v1.Admin",
        "stockd.v1.Inventory",
    ] {
        assert!(alpha.iter().any(|s| s == service), "{service} in {alpha:?}");
    }
    assert_eq!(alpha, current);
    app.stop().await;
}

/// A restart while Postgres does not answer: Redis holds the deployment, so
/// stockd starts degraded, serves reads and writes of warm items from
/// Redis, and flushes the backlog once Postgres answers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn starts_degraded_without_postgres_and_flushes_when_it_returns() {
    let first = spawn_app().await;
    first.seed("warm", "", 10).await;
    let pool = first.postgres().await;
    first.converged(&pool).await;
    let namespace = first.namespace.clone();
    let database = first.database.clone();
    first.stop_keep_data().await;

    let postgres: std::net::SocketAddr = "127.0.0.1:5432".parse().unwrap();
    let proxy = crate::support::proxy::FaultProxy::start(postgres).await;
    proxy.cut();
    let app = spawn_app_with(Options {
        namespace,
        database_url: Some(format!("postgres://postgres@{}/{database}", proxy.addr)),
        ..Options::default()
    })
    .await;
    hold(&app, "while-degraded", "warm").await.unwrap();
    app.commit("while-degraded").await.unwrap();
    let level = app.level("warm", "").await.unwrap();
    assert_eq!((level.available, level.reserved), (9, 0));
    // An item Redis does not hold needs Postgres: UNAVAILABLE, not a guess.
    let missing = hold(&app, "needs-postgres", "cold-item").await.unwrap_err();
    assert_eq!(missing.code(), Code::Unavailable, "{missing:?}");
    let stored: i64 = sqlx::query_scalar("SELECT available FROM stock WHERE sku = 'warm'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(stored, 10, "nothing reached Postgres yet");

    proxy.restore();
    app.converged(&pool).await;
    let stored: i64 = sqlx::query_scalar("SELECT available FROM stock WHERE sku = 'warm'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(stored, 9, "the backlog was flushed");
    pool.close().await;
    app.stop().await;
}
