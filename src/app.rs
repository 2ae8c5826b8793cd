//! Wiring: [`Application::build`] connects to Redis and Postgres, checks the
//! deployment's meta record, binds the listener and assembles every
//! component; [`Application::run_until_stopped`] warms Redis when it must,
//! then runs the gRPC server and the background tasks until shutdown.

use std::net::SocketAddr;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};

use crate::config::{Config, SecurityConfig};
use crate::engine::{Engine, EngineSettings};
use crate::flusher::{FlushError, Flusher, FlusherSettings};
use crate::grpc::{AdminService, AdmissionLayer, InventoryService, RequireToken};
use crate::keys::Keyspace;
use crate::meta::{self, MetaError};
use crate::pb;
use crate::reaper::Reaper;
use crate::reconcile::Reconciler;
use crate::store::{Store, StoreError};
use crate::warmer::{Availability, EpochCheck, Warmer};
use crate::watch::{Hub, WatchSettings};
use crate::webhooks::{Detector, Dispatcher, Subscriptions, Wakeup, WebhookSettings};

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
    #[error("cannot create the Redis pool: {0}")]
    RedisPool(#[from] deadpool_redis::CreatePoolError),
    #[error("cannot create the flusher's consumer groups: {0}")]
    Flusher(#[from] FlushError),
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
}

/// Opens a multiplexed Redis connection (requests share one). It reconnects
/// by itself after Redis restarts; a command that cannot finish within
/// `timeout` fails (and the request answers UNAVAILABLE).
pub async fn connect_redis(url: &str, timeout: Duration) -> Result<ConnectionManager, StartError> {
    let client = redis::Client::open(url).map_err(StartError::Redis)?;
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(Some(timeout))
        .set_number_of_retries(2)
        .set_max_delay(Duration::from_secs(2));
    ConnectionManager::new_with_config(client, config)
        .await
        .map_err(StartError::Redis)
}

/// Connections for the flusher's blocking reads: one per partition loop, and
/// a few spare.
fn blocking_pool(url: &str, partitions: u32) -> Result<deadpool_redis::Pool, StartError> {
    let mut config = deadpool_redis::Config::from_url(url);
    config.pool = Some(deadpool_redis::PoolConfig::new(partitions as usize + 2));
    Ok(config.create_pool(Some(deadpool_redis::Runtime::Tokio1))?)
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

/// Checks the epoch until Redis is warm: re-warms it when this instance may,
/// or waits for the instance that does.
async fn wait_until_warm(warmer: &Warmer, shutdown: &CancellationToken) -> Result<(), StartError> {
    loop {
        match warmer.check_epoch_once().await.map_err(StartError::Warm)? {
            EpochCheck::Waiting => {}
            EpochCheck::Rewarmed { items, holds } => {
                tracing::info!(items, holds, "Redis warmed from Postgres");
                return Ok(());
            }
            EpochCheck::Steady | EpochCheck::Adopted => return Ok(()),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    }
}

/// The health service follows the warmer: NOT_SERVING while re-warming.
async fn report_health(
    health: tonic_health::server::HealthReporter,
    mut serving: tokio::sync::watch::Receiver<bool>,
) {
    use tonic::server::NamedService;
    use tonic_health::ServingStatus;
    let services = [
        <pb::inventory_server::InventoryServer<InventoryService> as NamedService>::NAME,
        <pb::admin_server::AdminServer<AdminService> as NamedService>::NAME,
    ];
    while serving.changed().await.is_ok() {
        let status = if *serving.borrow_and_update() {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        for service in services {
            health.set_service_status(service, status).await;
        }
    }
}

/// Every component of one stockd instance, connected and ready to run.
pub struct Application {
    config: Config,
    listener: TcpListener,
    engine: Engine,
    warmer: Warmer,
    flusher: Flusher,
    reconciler: Reconciler,
    hub: Hub,
    detector: Detector,
    dispatcher: Dispatcher,
    subscriptions: Subscriptions,
}

impl Application {
    /// Connects to Redis and Postgres, checks the deployment record (a
    /// partition count or schema that does not match refuses to start),
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

        let mut conn = connect_redis(redis_url, redis_timeout).await?;
        let keys = Keyspace::new(
            config.deployment.namespace.clone(),
            config.deployment.partitions,
        );
        let meta = meta::ensure(&mut conn, &keys).await?;
        tracing::info!(namespace = %keys.namespace(), partitions = meta.partitions, epoch = ?meta.epoch, "deployment checked");

        let store = Store::connect(
            config.postgres.database_url.expose(),
            config.postgres.database_max_connections,
        )
        .await?;
        tracing::info!("postgres schema up to date");

        // Not serving until Redis is known to be warm (see run_until_stopped).
        let warmer = Warmer::new(
            connect_redis(redis_url, redis_timeout).await?,
            store.clone(),
            keys.clone(),
            Availability::new(false),
        );
        let engine = Engine::new(
            conn,
            keys.clone(),
            EngineSettings {
                idempotency_window: config.reservations.idempotency_window(),
            },
        )
        .with_warmer(warmer.clone());
        let flusher = Flusher::new(
            // Its own connection, so flushing never queues behind requests.
            connect_redis(redis_url, redis_timeout).await?,
            blocking_pool(redis_url, keys.partition_count())?,
            store.clone(),
            keys.clone(),
            FlusherSettings {
                consumer: config.consumer_name(port),
                batch_size: config.flusher.flush_batch as usize,
                interval: config.flusher.interval(),
                claim_idle: config.flusher.claim_idle(),
                max_unflushed: config.flusher.max_unflushed,
                retention: config.flusher.retention(),
            },
        );
        flusher.ensure_groups().await?;
        let reconciler = Reconciler::new(
            connect_redis(redis_url, redis_timeout).await?,
            store.clone(),
            keys.clone(),
            warmer.clone(),
            flusher.clone(),
        );

        // Watch: one stream reader for every watcher of this instance, on a
        // connection of its own whose reply may take the whole XREAD BLOCK.
        let watch_settings = WatchSettings::from_config(&config);
        let hub = Hub::start(
            connect_redis(redis_url, redis_timeout + watch_settings.block).await?,
            connect_redis(redis_url, redis_timeout).await?,
            keys.clone(),
            watch_settings,
        )
        .await
        .map_err(StartError::Redis)?;

        // Webhooks: the detector's group exists before any request is
        // served, so no change after the start is missed.
        let webhook_settings = WebhookSettings::from_config(&config, config.consumer_name(port));
        let wakeup = Wakeup::default();
        let detector = Detector::new(
            connect_redis(redis_url, redis_timeout).await?,
            blocking_pool(redis_url, keys.partition_count())?,
            store.pool().clone(),
            keys.clone(),
            webhook_settings.clone(),
            wakeup.clone(),
        );
        detector
            .ensure_groups()
            .await
            .map_err(|e| StartError::Webhooks(e.to_string()))?;
        let dispatcher = Dispatcher::new(
            store.pool().clone(),
            webhook_settings.clone(),
            wakeup.clone(),
        )
        .map_err(StartError::Webhooks)?;
        let subscriptions = Subscriptions::new(
            store.pool().clone(),
            webhook_settings.server_secret.is_some(),
            webhook_settings.destinations.clone(),
            wakeup,
        );

        Ok(Self {
            config,
            listener,
            engine,
            warmer,
            flusher,
            reconciler,
            hub,
            detector,
            dispatcher,
            subscriptions,
        })
    }

    /// Where the gRPC server listens (the real port when configured with 0).
    pub fn grpc_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
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
            flusher,
            reconciler,
            hub,
            detector,
            dispatcher,
            subscriptions,
        } = self;

        // A new deployment, or a Redis that lost its data, is (re-)warmed
        // from Postgres before anything is served.
        wait_until_warm(&warmer, &shutdown).await?;

        let background = CancellationToken::new();
        let tasks: Vec<(&str, JoinHandle<()>)> = vec![
            (
                "reaper",
                tokio::spawn(
                    Reaper::new(engine.clone(), config.reservations.reaper_interval())
                        .run(background.clone()),
                ),
            ),
            (
                "flusher",
                tokio::spawn(flusher.clone().run(background.clone())),
            ),
            (
                "epoch watchdog",
                tokio::spawn(
                    warmer
                        .clone()
                        .run(config.redis.epoch_check_interval(), background.clone()),
                ),
            ),
            // The watch reader stops with the server (not after it): open
            // watches must end for the graceful shutdown to finish.
            (
                "watch reader",
                tokio::spawn(hub.clone().run(shutdown.clone())),
            ),
            (
                "webhook detector",
                tokio::spawn(detector.run(background.clone())),
            ),
            (
                "webhook dispatcher",
                tokio::spawn(dispatcher.run(background.clone())),
            ),
        ];

        let served = serve(
            &config,
            listener,
            Services {
                engine,
                warmer,
                flusher,
                reconciler,
                hub,
                subscriptions,
            },
            shutdown,
        )
        .await;

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
    flusher: Flusher,
    reconciler: Reconciler,
    hub: Hub,
    subscriptions: Subscriptions,
}

/// The gRPC server: health, reflection, Inventory and Admin behind the
/// admission layer and the token checks, until `shutdown`.
async fn serve(
    config: &Config,
    listener: TcpListener,
    services: Services,
    shutdown: CancellationToken,
) -> Result<(), StartError> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<pb::inventory_server::InventoryServer<InventoryService>>()
        .await;
    health
        .set_serving::<pb::admin_server::AdminServer<AdminService>>()
        .await;
    tokio::spawn(report_health(
        health,
        services.warmer.availability().subscribe(),
    ));
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;

    let token = |t: &Option<crate::config::Secret>| t.as_ref().map(|s| s.expose().to_owned());
    let admin_auth = RequireToken::new(token(&config.security.admin_token));
    let admin = InterceptedService::new(
        pb::admin_server::AdminServer::new(
            AdminService::new(
                services.engine.clone(),
                services.flusher,
                services.warmer,
                services.reconciler,
            )
            .with_webhooks(services.subscriptions),
        )
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

    let mut server = Server::builder();
    if let Some(tls) = tls_config(&config.security)? {
        server = server.tls_config(tls)?;
    }
    tracing::info!(
        addr = ?listener.local_addr().ok(),
        tls = config.security.tls_cert.is_some(),
        mtls = config.security.tls_client_ca.is_some(),
        "serving gRPC"
    );
    server
        .layer(AdmissionLayer::new(
            config.server.max_concurrent_requests as usize,
        ))
        .add_service(health_service)
        .add_service(reflection)
        .add_service(inventory)
        .add_service(admin)
        .serve_with_incoming_shutdown(
            // Without TCP_NODELAY a response can wait for the client's
            // delayed ACK (40 ms): serve_with_incoming ignores the builder's
            // TCP settings.
            TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown.cancelled(),
        )
        .await?;
    Ok(())
}
