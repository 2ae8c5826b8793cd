//! The standard gRPC health service, whose Watch streams end when the
//! server stops: tonic-health's never end by themselves, and a graceful
//! shutdown waits for every open stream, so one client watching health (as
//! gRPC's client-side health checking does) would hold stockd up for ever.

use std::pin::Pin;

use futures::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};
use tonic_health::server::{HealthReporter, HealthService};

pub struct StoppingHealth {
    inner: HealthService,
    stop: CancellationToken,
}

impl StoppingHealth {
    /// The service for `reporter`'s statuses; Watch streams end at `stop`.
    pub fn server(reporter: HealthReporter, stop: CancellationToken) -> HealthServer<Self> {
        HealthServer::new(Self {
            inner: HealthService::from_health_reporter(reporter),
            stop,
        })
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<HealthCheckResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Health for StoppingHealth {
    async fn check(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        self.inner.check(request).await
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let statuses = self.inner.watch(request).await?.into_inner();
        let stopped = self.stop.clone().cancelled_owned();
        Ok(Response::new(Box::pin(statuses.take_until(stopped))))
    }
}
