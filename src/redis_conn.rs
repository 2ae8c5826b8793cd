//! The one Redis handle every component uses: a multiplexed connection that
//! reconnects by itself, so that concurrent requests share it and pipeline
//! (one round trip per request, however many are in flight).

use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::{Cmd, Pipeline, RedisFuture, Value};

/// A Redis connection: cheap to clone, every clone shares the socket.
#[derive(Clone)]
pub struct RedisConn {
    inner: ConnectionManager,
}

impl RedisConn {
    /// Connects to `url`. A command that cannot finish within `timeout`
    /// fails (and the request answers UNAVAILABLE); after Redis restarts
    /// the next command reconnects.
    pub async fn connect(url: &str, timeout: Duration) -> Result<Self, redis::RedisError> {
        let client = redis::Client::open(url)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_secs(2));
        let inner = ConnectionManager::new_with_config(client, config).await?;
        Ok(Self { inner })
    }
}

impl ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        self.inner.req_packed_command(cmd)
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        self.inner.req_packed_commands(pipeline, offset, count)
    }

    fn get_db(&self) -> i64 {
        self.inner.get_db()
    }
}
