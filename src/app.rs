//! Wiring: [`Application::build`] connects to Redis and Postgres, checks the
//! deployment's meta record, binds the listener and assembles every
//! component; [`Application::run_until_stopped`] warms Redis when it must,
//! then runs the gRPC server, the HTTP API and the background tasks until
//! shutdown.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};

use crate::backlog::{BacklogSettings, Housekeeper};
use crate::checkpoint_feed::CheckpointFeed;
use crate::config::{Config, SecurityConfig};
use crate::consumer::StepError;
use crate::engine::{Engine, EngineSettings};
use crate::export::{ExportSettings, Exporters};
use crate::flusher::{Flusher, FlusherSettings};
use crate::grpc::{AdminService, AdmissionLayer, InventoryService, RequireToken, StoppingHealth};
use crate::http::HttpServer;
use crate::keys::Keyspace;
use crate::markers::Markers;
use crate::meta::{self, MetaError};
use crate::pb;
use crate::reaper::Reaper;
use crate::reconcile::Reconciler;
use crate::redis_conn::RedisConn;
use crate::store::{Store, StoreError};
use crate::warmer::{Availability, Warmer};
use crate::watch::{Hub, WatchSettings};
use crate::watchdog::Watchdog;
use crate::webhooks::{Dispatcher, Subscriptions, Wakeup, WebhookSettings};

/// Why stockd could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot connect to Redis: {0}")]
    Redis(#[source] redis::RedisError),
    #[error(transparent)]
    Meta(#[from] MetaError),
    #[error("cannot prepare Postgres: {0}")]
    Store(#[from] StoreError),
    #[error("cannot create the consumer groups (flusher, exporters): {0}")]
    Flusher(#[from] StepError),
    #[error("cannot warm Redis from Postgres: {0}")]
    Warm(#[source] crate::error::Error),
    #[error("cannot read the TLS file {path}: {source}")]
    Tls {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("gRPC server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
    #[error("reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("cannot start webhooks: {0}")]
    Webhooks(String),
    #[error("HTTP server: {0}")]
    Http(#[source] std::io::Error),
}

/// Opens a multiplexed Redis connection, to a cluster when `cluster` (see
/// [`RedisConn`]).
pub async fn connect_redis(
    url: &str,
    cluster: bool,
    timeout: Duration,
) -> Result<RedisConn, StartError> {
    RedisConn::connect(url, cluster, timeout)
        .await
        .map_err(StartError::Redis)
}

/// TLS from `--tls-cert`/`--tls-key`, and client certificates from
/// `--tls-client-ca` (mutual TLS); `None` for plaintext.
fn tls_config(security: &SecurityConfig) -> Result<Option<ServerTlsConfig>, StartError> {
    let (Some(cert), Some(key)) = (&security.tls_cert, &security.tls_key) else {
        return Ok(None);
    };
    let read = |path: &std::path::Path| {
        std::fs::read(path).map_err(|source| StartError::Tls {
            path: path.to_owned(),
            source,
        })
    };
    let mut tls = ServerTlsConfig::new().identity(Identity::from_pem(read(cert)?, read(key)?));
    if let Some(ca) = &security.tls_client_ca {
        tls = tls.client_ca_root(Certificate::from_pem(read(ca)?));
    }
    Ok(Some(tls))
}

/// Looks until every partition is warm: restores lost or rolled-back ones
/// when this instance may, or waits for the instance that does.
async fn wait_until_warm(
    watchdog: &Watchdog,
    shutdown: &CancellationToken,
) -> Result<(), StartError> {
    loop {
        let check = watchdog.check_once().await.map_err(StartError::Warm)?;
        if !check.waiting {
            if !check.restored.is_empty() || !check.healed.is_empty() {
                tracing::info!(
                    items = check.items,
                    holds = check.holds,
                    "Redis warmed from Postgres"
                );
            }
            return Ok(());
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    }
}

/// Whether Redis holds a deployment of this namespace that was warm (its
/// epoch recorded, which happens once Postgres had the schema): the
/// condition of a start without Postgres.
async fn redis_is_warm(conn: &mut RedisConn, keys: &Keyspace) -> bool {
    let epoch: Result<Option<String>, _> = redis::cmd("HGET")
        .arg(keys.meta())
        .arg("epoch")
        .query_async(conn)
        .await;
    matches!(epoch, Ok(Some(_)))
}

/// After a degraded start: prepares Postgres (migrations, the partition
/// check) once it answers, and says so.
async fn prepare_postgres_when_back(store: Store, partitions: u32, shutdown: CancellationToken) {
    let mut backoff =
        crate::consumer::Backoff::new(Duration::from_millis(500), Duration::from_secs(10));
    loop {
        match store.prepare(partitions).await {
            Ok(()) => {
                tracing::info!("Postgres answers again: schema checked, leaving degraded mode");
                return;
            }
            Err(err) if err.is_unreachable() => {
                tracing::debug!(error = %err, "Postgres still does not answer");
            }
            Err(err) => {
                tracing::error!(error = %err, "Postgres answers but refuses this deployment")
            }
        }
        if !backoff.wait(&shutdown).await {
            return;
        }
    }
}

/// `--reset-redis`: writes what the namespace's streams still hold to
/// Postgres (taking over every consumer's pending entries), then deletes
/// the namespace's keys, so that the start that follows warms Redis from
/// Postgres in this version's layout. Every older stockd must be stopped.
async fn reset_redis(
    conn: &RedisConn,
    store: &Store,
    keys: &Keyspace,
    markers: &Markers,
) -> Result<(), StartError> {
    tracing::warn!(namespace = %keys.namespace(), "--reset-redis: flushing the streams, then deleting the namespace's keys");
    let drainer = Flusher::new(
        conn.clone(),
        store.clone(),
        keys.clone(),
        markers.clone(),
        Wakeup::default(),
        FlusherSettings {
            consumer: "reset-redis".into(),
            batch_size: 500,
            interval: Duration::from_millis(10),
            // Every pending entry, whoever read it: nobody else runs.
            claim_idle: Duration::ZERO,
            remove_idle: Duration::MAX,
        },
    );
    drainer.ensure_groups().await?;
    let flushed = drainer.drain().await?;
    let deleted = crate::keys::delete_namespace(conn, keys)
        .await
        .map_err(StartError::Redis)?;
    tracing::warn!(
        flushed,
        deleted,
        "--reset-redis: done; warming from Postgres"
    );
    Ok(())
}

/// Webhook detection once had a consumer group of its own (`webhooks`);
/// it now runs in the flusher's transaction. The group's pending list
/// would only take memory: it goes.
async fn forget_legacy_groups(conn: &RedisConn, keys: &Keyspace) {
    let mut batch = crate::redis_conn::CommandBatch::new();
    for p in keys.partitions() {
        let stream = keys.events(p);
        let mut destroy = redis::cmd("XGROUP");
        destroy.arg("DESTROY").arg(&stream).arg("webhooks");
        batch.cmd(stream, destroy);
    }
    // Per-command errors (no such stream) are of no interest here.
    if let Err(err) = batch.query_each(conn).await {
        tracing::debug!(error = %err, "could not remove the legacy webhooks group");
    }
}

/// The health service, overall (`""`, what Kubernetes and
/// grpc_health_probe ask) and per service, follows the warmer:
/// NOT_SERVING while re-warming. Once `shutdown` is requested every status
/// turns NOT_SERVING for good, stockd serves on for the `drain` period (load
/// balancers and clients move away meanwhile), and then `stop` tells the
/// servers to stop.
async fn report_health_then_drain(
    health: tonic_health::server::HealthReporter,
    mut serving: tokio::sync::watch::Receiver<bool>,
    shutdown: CancellationToken,
    drain: Duration,
    stop: CancellationToken,
) {
    use tonic_health::ServingStatus;
    let set_all = |status| {
        let health = health.clone();
        async move {
            for service in HEALTH_SERVICES {
                health.set_service_status(service, status).await;
            }
        }
    };
    loop {
        let status = if *serving.borrow_and_update() {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        set_all(status).await;
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            changed = serving.changed() => if changed.is_err() {
                shutdown.cancelled().await;
                break;
            },
        }
    }
    set_all(ServingStatus::NotServing).await;
    tracing::info!(
        drain_ms = drain.as_millis() as u64,
        "shutting down: health NOT_SERVING, serving on until the drain period ends"
    );
    tokio::time::sleep(drain).await;
    tracing::info!("drain period over: finishing requests in flight");
    stop.cancel();
}

/// What the health service reports on: the server as a whole (`""`) and
/// each service.
const HEALTH_SERVICES: [&str; 3] = [
    "",
    <pb::inventory_server::InventoryServer<InventoryService> as tonic::server::NamedService>::NAME,
    <pb::admin_server::AdminServer<AdminService> as tonic::server::NamedService>::NAME,
];

/// Every component of one stockd instance, connected and ready to run.
pub struct Application {
    config: Config,
    listener: TcpListener,
    engine: Engine,
    warmer: Warmer,
    watchdog: Watchdog,
    checkpoint_feed: CheckpointFeed,
    flusher: Flusher,
    exporters: Exporters,
    housekeeper: Housekeeper,
    reconciler: Reconciler,
    hub: Hub,
    dispatcher: Dispatcher,
    subscriptions: Subscriptions,
    /// The HTTP API, unless switched off.
    http: Option<HttpServer>,
    /// Started while Postgres did not answer.
    degraded: bool,
}

impl Application {
    /// Connects to Redis and Postgres, checks the deployment record (a
    /// partition count or layout that does not match refuses to start),
    /// runs the migrations, binds the gRPC listener and assembles the
    /// components. Nothing is served yet.
    pub async fn build(config: Config) -> Result<Self, StartError> {
        let addr = config.server.grpc_addr;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| StartError::Listen { addr, source })?;
        let port = listener.local_addr().map(|a| a.port()).unwrap_or_default();
        let redis_url = config.redis.redis_url.expose();
        let redis_timeout = config.redis.timeout();
        let cluster = config.redis.redis_cluster;

        // Requests share one connection; background work shares another,
        // so that a preload's pipelines never delay a checkout.
        let mut requests = connect_redis(redis_url, cluster, redis_timeout).await?;
        let background = connect_redis(redis_url, cluster, redis_timeout).await?;
        let keys = Keyspace::new(
            config.deployment.namespace.clone(),
            config.deployment.partitions,
        );
        meta::check_redis_settings(&mut requests, config.redis.allow_redis_eviction).await?;
        let (store, degraded) = match Store::connect(&config.postgres).await {
            Ok(store) => {
                store.ensure_partitions(keys.partition_count()).await?;
                tracing::info!("postgres schema up to date");
                (store, false)
            }
            Err(err)
                if err.is_unreachable()
                    && !config.redis.reset_redis
                    && redis_is_warm(&mut requests, &keys).await =>
            {
                tracing::warn!(error = %err, "Postgres does not answer; Redis holds this deployment: \
                    starting DEGRADED, serving from Redis. Until Postgres answers: changes wait in \
                    the streams (the flusher retries; writes are refused once a partition's backlog \
                    passes STOCKD_MAX_UNFLUSHED), items Redis does not hold cannot be loaded \
                    (UNAVAILABLE), and re-warming after a Redis loss, Preload, Reconcile, webhooks \
                    and outcomes past the idempotency window wait for it");
                (Store::connect_later(&config.postgres)?, true)
            }
            Err(err) => return Err(err.into()),
        };
        let markers = Markers::new(keys.clone());
        if config.redis.reset_redis {
            reset_redis(&background, &store, &keys, &markers).await?;
        }
        let meta = meta::ensure(&mut requests, &keys).await?;
        tracing::info!(namespace = %keys.namespace(), partitions = meta.partitions, epoch = ?meta.epoch, "deployment checked");

        // Not serving until Redis is known to be warm (see run_until_stopped).
        let warmer = Warmer::new(
            background.clone(),
            store.clone(),
            keys.clone(),
            Availability::new(false),
        );
        let window = config.reservations.idempotency_window();
        let engine = Engine::new(
            requests,
            keys.clone(),
            markers.clone(),
            EngineSettings {
                idempotency_window: window,
                ..EngineSettings::default()
            },
        )
        .with_warmer(warmer.clone());
        let watchdog = Watchdog::new(
            background.clone(),
            store.clone(),
            warmer.clone(),
            markers.clone(),
            window,
        );
        let checkpoint_feed =
            CheckpointFeed::new(store.clone(), markers.clone(), keys.partition_count());
        let wakeup = Wakeup::default();
        let flusher = Flusher::new(
            background.clone(),
            store.clone(),
            keys.clone(),
            markers.clone(),
            wakeup.clone(),
            FlusherSettings {
                consumer: config.consumer_name(port),
                batch_size: config.flusher.flush_batch as usize,
                interval: config.flusher.interval(),
                claim_idle: config.flusher.claim_idle(),
                remove_idle: config.flusher.stale_consumer_idle(),
            },
        );
        flusher.ensure_groups().await?;
        forget_legacy_groups(&background, &keys).await;
        let exporters = Exporters::new(
            &background,
            &keys,
            &ExportSettings {
                nats_url: config
                    .export
                    .nats_url
                    .as_ref()
                    .map(|u| u.expose().to_owned()),
                amqp_url: config
                    .export
                    .amqp_url
                    .as_ref()
                    .map(|u| u.expose().to_owned()),
                consumer: config.consumer_name(port),
                batch_size: config.flusher.flush_batch as usize,
                interval: config.flusher.interval(),
                claim_idle: config.flusher.claim_idle(),
                remove_idle: config.flusher.stale_consumer_idle(),
            },
        );
        // Before serving: every change made once stockd answers is exported.
        exporters.ensure_groups().await?;
        // Trimming and the backlog limit count every group.
        let mut groups = vec![crate::flusher::GROUP];
        groups.extend(exporters.groups());
        let housekeeper = Housekeeper::new(
            background.clone(),
            keys.clone(),
            markers.clone(),
            groups,
            BacklogSettings {
                max_unhandled: config.flusher.max_unflushed,
                retention: config.flusher.retention(),
            },
        );
        let reconciler = Reconciler::new(
            background.clone(),
            store.clone(),
            keys.clone(),
            warmer.clone(),
            housekeeper.clone(),
        );

        // Watch: one stream reader for every watcher of this instance, on a
        // connection of its own whose reply may take the whole XREAD BLOCK.
        let watch_settings = WatchSettings::from_config(&config);
        let hub = Hub::start(
            connect_redis(redis_url, cluster, redis_timeout + watch_settings.block).await?,
            background.clone(),
            keys.clone(),
            watch_settings,
        )
        .await
        .map_err(StartError::Redis)?;

        let webhook_settings = WebhookSettings::from_config(&config);
        let dispatcher = Dispatcher::new(store.clone(), webhook_settings.clone(), wakeup.clone())
            .map_err(StartError::Webhooks)?;
        let subscriptions = Subscriptions::new(
            store.clone(),
            webhook_settings.server_secret.is_some(),
            webhook_settings.destinations.clone(),
            wakeup,
        );

        // The HTTP API: its live channels fan out from the same hub.
        let http = HttpServer::bind(
            &config,
            engine.clone(),
            hub.clone(),
            warmer.availability().clone(),
        )
        .await
        .map_err(StartError::Http)?;

        Ok(Self {
            config,
            listener,
            engine,
            warmer,
            watchdog,
            checkpoint_feed,
            flusher,
            exporters,
            housekeeper,
            reconciler,
            hub,
            dispatcher,
            subscriptions,
            http,
            degraded,
        })
    }

    /// Where the gRPC server listens (the real port when configured with 0).
    pub fn grpc_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// Where the HTTP API listens, when it is on.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http.as_ref().and_then(|h| h.local_addr().ok())
    }

    /// Serves until `shutdown` is cancelled: stops accepting requests, lets
    /// requests in flight finish, then stops the background tasks (the
    /// flusher commits the batch in hand), then returns.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> Result<(), StartError> {
        let Self {
            config,
            listener,
            engine,
            warmer,
            watchdog,
            checkpoint_feed,
            flusher,
            exporters,
            housekeeper,
            reconciler,
            hub,
            dispatcher,
            subscriptions,
            http,
            degraded,
        } = self;

        // A new deployment, or a Redis that lost or rolled back its data,
        // is restored from Postgres before anything is served.
        wait_until_warm(&watchdog, &shutdown).await?;

        // SIGTERM: NOT_SERVING at once, serving on for the drain period,
        // then `stop` stops the servers.
        let stop = CancellationToken::new();
        let health = tonic_health::server::HealthReporter::new();
        let drain = tokio::spawn(report_health_then_drain(
            health.clone(),
            warmer.availability().subscribe(),
            shutdown.clone(),
            config.server.shutdown_drain(),
            stop.clone(),
        ));

        let background = CancellationToken::new();
        let mut tasks: Vec<(&str, JoinHandle<()>)> = vec![
            (
                "reaper",
                tokio::spawn(
                    Reaper::new(engine.clone(), config.reservations.reaper_interval())
                        .run(background.clone()),
                ),
            ),
            ("flusher", tokio::spawn(flusher.run(background.clone()))),
            (
                "stream housekeeping",
                tokio::spawn(housekeeper.clone().run(background.clone())),
            ),
            (
                "watchdog",
                tokio::spawn(watchdog.run(config.redis.epoch_check_interval(), background.clone())),
            ),
            (
                "checkpoint feed",
                tokio::spawn(checkpoint_feed.run(background.clone())),
            ),
            // The watch reader stops with the server (not after it): open
            // watches must end for the graceful shutdown to finish.
            ("watch reader", tokio::spawn(hub.clone().run(stop.clone()))),
            (
                "webhook dispatcher",
                tokio::spawn(dispatcher.run(background.clone())),
            ),
            (
                "metrics sampler",
                tokio::spawn(
                    crate::telemetry::Sampler::new(
                        warmer.store().pool().clone(),
                        config.postgres.database_max_connections,
                        Duration::from_secs(5),
                    )
                    .run(background.clone()),
                ),
            ),
        ];
        tasks.extend(exporters.spawn(&background));

        if degraded {
            tasks.push((
                "postgres preparation",
                tokio::spawn(prepare_postgres_when_back(
                    warmer.store().clone(),
                    config.deployment.partitions,
                    background.clone(),
                )),
            ));
        }

        let http = http.map(|server| tokio::spawn(server.serve(shutdown.clone(), stop.clone())));
        let served = serve(
            &config,
            listener,
            Services {
                engine,
                warmer,
                housekeeper,
                reconciler,
                hub,
                subscriptions,
                health,
            },
            stop,
        )
        .await;
        drain.abort();
        if let Some(http) = http {
            match http.await {
                Ok(Ok(())) => {}
                Ok(Err(err)) => tracing::error!(error = %err, "HTTP server failed"),
                Err(err) => tracing::error!(error = %err, "HTTP server task failed"),
            }
        }

        // No request can add events any more: let the background tasks
        // finish what they hold (the flusher commits its batch in hand).
        background.cancel();
        for (name, task) in tasks {
            if let Err(err) = task.await {
                tracing::error!(task = name, error = %err, "background task failed");
            }
        }
        tracing::info!("stopped");
        served
    }
}

/// What the gRPC services are built from.
struct Services {
    engine: Engine,
    warmer: Warmer,
    housekeeper: Housekeeper,
    reconciler: Reconciler,
    hub: Hub,
    subscriptions: Subscriptions,
    health: tonic_health::server::HealthReporter,
}

/// The gRPC server: health, reflection, Inventory and Admin behind the
/// admission layer and the token checks, until `shutdown`.
async fn serve(
    config: &Config,
    listener: TcpListener,
    services: Services,
    shutdown: CancellationToken,
) -> Result<(), StartError> {
    // Both versions of reflection: older grpcurl, Postman and Python's
    // grpcio-reflection ask v1alpha.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection().build_v1()?;
    let reflection_v1alpha = reflection().build_v1alpha()?;

    let token = |t: &Option<crate::config::Secret>| t.as_ref().map(|s| s.expose().to_owned());
    let admin_auth = RequireToken::new(token(&config.security.admin_token));
    let admin = InterceptedService::new(
        pb::admin_server::AdminServer::new(AdminService::new(
            services.engine.clone(),
            services.housekeeper,
            services.warmer,
            services.reconciler,
            services.subscriptions,
        ))
        .max_decoding_message_size(config.server.max_request_bytes),
        move |req| admin_auth.check(req),
    );
    let client_auth = RequireToken::new(token(&config.security.client_token));
    let inventory = InterceptedService::new(
        pb::inventory_server::InventoryServer::new(InventoryService::new(
            services.engine,
            services.hub,
        ))
        .max_decoding_message_size(config.server.max_request_bytes),
        move |req| client_auth.check(req),
    );

    let mut server = Server::builder()
        .http2_keepalive_interval(config.server.keepalive_interval())
        .http2_keepalive_timeout(Some(config.server.keepalive_timeout()));
    if let Some(age) = config.server.max_connection_age() {
        // GOAWAY at the age; the connection closes once its streams end.
        // Not tonic's max_connection_age_grace: with it tonic 0.14 skips
        // the GOAWAY and cuts the connection at age + grace, failing the
        // requests in flight.
        server = server.max_connection_age(age);
    }
    if let Some(tls) = tls_config(&config.security)? {
        server = server.tls_config(tls)?;
    }
    tracing::info!(
        addr = ?listener.local_addr().ok(),
        tls = config.security.tls_cert.is_some(),
        mtls = config.security.tls_client_ca.is_some(),
        "serving gRPC"
    );
    let server = server
        .layer(AdmissionLayer::new(
            config.server.max_concurrent_requests as usize,
        ))
        .add_service(StoppingHealth::server(services.health, shutdown.clone()))
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(inventory)
        .add_service(admin)
        .serve_with_incoming_shutdown(
            // Without TCP_NODELAY a response can wait for the client's
            // delayed ACK (40 ms): serve_with_incoming ignores the builder's
            // TCP settings.
            TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown.cancelled(),
        );
    // Requests in flight finish (each is bounded by the Redis and Postgres
    // timeouts); a stream a client keeps open past the deadline is cut.
    let deadline = async {
        shutdown.cancelled().await;
        tokio::time::sleep(GRPC_SHUTDOWN_DEADLINE).await;
    };
    tokio::select! {
        served = server => served?,
        () = deadline => tracing::warn!("gRPC connections still open at the shutdown deadline; dropping them"),
    }
    Ok(())
}

/// How long requests in flight have, once the drain period is over, to
/// finish before their connections are dropped.
const GRPC_SHUTDOWN_DEADLINE: Duration = Duration::from_secs(30);
