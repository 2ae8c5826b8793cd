//! Wiring: connects to Redis and Postgres, checks the deployment's meta
//! record, and runs the gRPC server and the background tasks (reaper,
//! flusher) until shutdown.

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::net::TcpListener;

use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};

use crate::config::Config;
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
    #[error("cannot read the TLS files: {0}")]
    Tls(String),
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
fn tls_config(config: &Config) -> Result<Option<ServerTlsConfig>, StartError> {
    let (Some(cert), Some(key)) = (&config.tls_cert, &config.tls_key) else {
        return Ok(None);
    };
    let read = |path: &std::path::Path| {
        std::fs::read(path).map_err(|e| StartError::Tls(format!("{}: {e}", path.display())))
    };
    let mut tls = ServerTlsConfig::new().identity(Identity::from_pem(read(cert)?, read(key)?));
    if let Some(ca) = &config.tls_client_ca {
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

/// Serves on `listener` until `shutdown` is cancelled: stops accepting
/// requests, lets requests in flight finish, then stops the background
/// tasks (the flusher commits the batch in hand), then returns.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), StartError> {
    let mut conn = connect_redis(&config.redis_url, config.redis_timeout()).await?;
    let keys = Keyspace::new(config.namespace.clone(), config.partitions);
    let meta = meta::ensure(&mut conn, &keys).await?;
    tracing::info!(namespace = %config.namespace, partitions = meta.partitions, epoch = ?meta.epoch, "deployment checked");

    let store = Store::connect(&config.database_url, config.database_max_connections).await?;
    tracing::info!("postgres schema up to date");

    // Not serving until Redis is known to be warm: a new deployment, or a
    // Redis that lost its data, is (re-)warmed from Postgres first.
    let warmer = Warmer::new(
        connect_redis(&config.redis_url, config.redis_timeout()).await?,
        store.clone(),
        keys.clone(),
        Availability::new(false),
    );
    wait_until_warm(&warmer, &shutdown).await?;

    let engine = Engine::new(
        conn,
        keys.clone(),
        EngineSettings {
            idempotency_window: config.idempotency_window(),
        },
    )
    .with_warmer(warmer.clone());
    let port = listener.local_addr().map(|a| a.port()).unwrap_or_default();
    let flusher = Flusher::new(
        // Its own connection, so flushing never queues behind requests.
        connect_redis(&config.redis_url, config.redis_timeout()).await?,
        blocking_pool(&config.redis_url, keys.partition_count())?,
        store.clone(),
        keys.clone(),
        FlusherSettings {
            consumer: config.consumer_name(port),
            batch_size: config.flush_batch as usize,
            interval: Duration::from_millis(config.flush_interval_ms),
            claim_idle: Duration::from_millis(config.flush_claim_idle_ms),
            max_unflushed: config.max_unflushed,
            retention: Duration::from_secs(config.stream_retention_secs),
        },
    );
    flusher.ensure_groups().await?;

    let reconciler = Reconciler::new(
        connect_redis(&config.redis_url, config.redis_timeout()).await?,
        store.clone(),
        keys.clone(),
        warmer.clone(),
        flusher.clone(),
    );

    // Watch: one stream reader for every watcher of this instance, on a
    // connection of its own whose reply may take the whole XREAD BLOCK.
    let watch_settings = WatchSettings::from_config(&config);
    let hub = Hub::start(
        connect_redis(
            &config.redis_url,
            config.redis_timeout() + watch_settings.block,
        )
        .await?,
        connect_redis(&config.redis_url, config.redis_timeout()).await?,
        keys.clone(),
        watch_settings,
    )
    .await
    .map_err(StartError::Redis)?;

    // Webhooks: the detector's group exists before any request is served,
    // so no change after the start is missed.
    let webhook_settings = WebhookSettings::from_config(&config, config.consumer_name(port));
    let wakeup = Wakeup::default();
    let detector = Detector::new(
        connect_redis(&config.redis_url, config.redis_timeout()).await?,
        blocking_pool(&config.redis_url, keys.partition_count())?,
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
        wakeup,
    );

    let background = CancellationToken::new();
    let reaper =
        tokio::spawn(Reaper::new(engine.clone(), config.reaper_interval()).run(background.clone()));
    let flushing = tokio::spawn(flusher.clone().run(background.clone()));
    let watchdog = tokio::spawn(
        warmer
            .clone()
            .run(config.epoch_check_interval(), background.clone()),
    );
    // The watch reader stops with the server (not after it): open watches
    // must end for the graceful shutdown to finish.
    let watching = tokio::spawn(hub.clone().run(shutdown.clone()));
    let detecting = tokio::spawn(detector.run(background.clone()));
    let dispatching = tokio::spawn(dispatcher.run(background.clone()));

    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<pb::inventory_server::InventoryServer<InventoryService>>()
        .await;
    health
        .set_serving::<pb::admin_server::AdminServer<AdminService>>()
        .await;
    tokio::spawn(report_health(health, warmer.availability().subscribe()));
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;

    let admin_auth = RequireToken::new(config.admin_token.clone());
    let admin = InterceptedService::new(
        pb::admin_server::AdminServer::new(
            AdminService::new(engine.clone(), flusher, warmer, reconciler)
                .with_webhooks(subscriptions),
        )
        .max_decoding_message_size(config.max_request_bytes),
        move |req| admin_auth.check(req),
    );
    let client_auth = RequireToken::new(config.client_token.clone());
    let inventory = InterceptedService::new(
        pb::inventory_server::InventoryServer::new(InventoryService::new(engine, hub))
            .max_decoding_message_size(config.max_request_bytes),
        move |req| client_auth.check(req),
    );

    let mut server = Server::builder();
    if let Some(tls) = tls_config(&config)? {
        server = server.tls_config(tls)?;
    }
    let addr = listener.local_addr().ok();
    tracing::info!(
        ?addr,
        tls = config.tls_cert.is_some(),
        mtls = config.tls_client_ca.is_some(),
        "serving gRPC"
    );
    let served = server
        .layer(AdmissionLayer::new(config.max_concurrent_requests as usize))
        .add_service(health_service)
        .add_service(reflection)
        .add_service(inventory)
        .add_service(admin)
        .serve_with_incoming_shutdown(
            // Without TCP_NODELAY a response can wait for the client's delayed ACK
            // (40 ms): serve_with_incoming ignores the builder's TCP settings.
            TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown.cancelled(),
        )
        .await;

    // No request can add events any more: let the background tasks finish
    // what they hold (the flusher commits its batch in hand), then stop.
    background.cancel();
    for (name, task) in [
        ("reaper", reaper),
        ("flusher", flushing),
        ("epoch watchdog", watchdog),
        ("watch reader", watching),
        ("webhook detector", detecting),
        ("webhook dispatcher", dispatching),
    ] {
        if let Err(err) = task.await {
            tracing::error!(task = name, error = %err, "background task failed");
        }
    }
    tracing::info!("stopped");
    Ok(served?)
}
