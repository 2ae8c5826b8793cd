//! Wiring: connects to Redis, checks the deployment's meta record, and runs
//! the gRPC server and the background tasks until shutdown.

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Server;

use crate::config::Config;
use crate::engine::{Engine, EngineSettings};
use crate::grpc::{AdminService, InventoryService, RequireToken};
use crate::keys::Keyspace;
use crate::meta::{self, MetaError};
use crate::pb;
use crate::reaper::Reaper;

/// Why stockd could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot connect to Redis: {0}")]
    Redis(#[source] redis::RedisError),
    #[error(transparent)]
    Meta(#[from] MetaError),
    #[error("gRPC server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
    #[error("reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
}

/// Opens the multiplexed Redis connection that every request shares. It
/// reconnects by itself after Redis restarts; a command that cannot finish
/// within `timeout` fails (and the request answers UNAVAILABLE).
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

/// Serves on `listener` until `shutdown` is cancelled: stops accepting
/// requests, lets requests in flight finish, stops the background tasks,
/// then returns.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), StartError> {
    let mut conn = connect_redis(&config.redis_url, config.redis_timeout()).await?;
    let keys = Keyspace::new(config.namespace.clone(), config.partitions);
    let meta = meta::ensure(&mut conn, &keys).await?;
    tracing::info!(namespace = %config.namespace, partitions = meta.partitions, epoch = %meta.epoch, "deployment checked");

    let engine = Engine::new(
        conn,
        keys,
        EngineSettings {
            idempotency_window: config.idempotency_window(),
        },
    );

    let background = CancellationToken::new();
    let reaper =
        tokio::spawn(Reaper::new(engine.clone(), config.reaper_interval()).run(background.clone()));

    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<pb::inventory_server::InventoryServer<InventoryService>>()
        .await;
    health
        .set_serving::<pb::admin_server::AdminServer<AdminService>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;

    let auth = RequireToken::new(config.admin_token.clone());
    let admin = pb::admin_server::AdminServer::with_interceptor(
        AdminService::new(engine.clone()),
        move |req| auth.check(req),
    );

    let addr = listener.local_addr().ok();
    tracing::info!(?addr, "serving gRPC");
    let served = Server::builder()
        .add_service(health_service)
        .add_service(reflection)
        .add_service(pb::inventory_server::InventoryServer::new(
            InventoryService::new(engine),
        ))
        .add_service(admin)
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown.cancelled())
        .await;

    background.cancel();
    if let Err(err) = reaper.await {
        tracing::error!(error = %err, "reaper task failed");
    }
    tracing::info!("stopped");
    Ok(served?)
}
