//! Reading the partition streams through a consumer group, the way every
//! at-least-once reader of stockd does it (the flusher; the webhook
//! detector): at start a consumer replays its own pending entries, then
//! claims entries idle past the claim timeout from silent consumers
//! (XAUTOCLAIM), then reads new ones, going back to claiming every claim
//! timeout. Entries are acknowledged by the caller once handled.

use std::time::Duration;

use rand::Rng;
use redis::aio::ConnectionManager;
use redis::streams::{StreamAutoClaimReply, StreamId, StreamReadReply};
use tokio_util::sync::CancellationToken;

use crate::error::Error;
use crate::keys::{Keyspace, Partition};

/// Where a read takes its entries from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// This consumer's pending entries (after a restart).
    OwnPending,
    /// Entries idle past the claim timeout with other consumers.
    Claimed,
    /// New entries, waiting up to the block time for some.
    New,
}

impl Source {
    /// Where to read after a read from `self` came back empty.
    pub fn after_empty(self) -> Source {
        match self {
            Source::OwnPending => Source::Claimed,
            Source::Claimed | Source::New => Source::New,
        }
    }
}

/// Errors of one step of a stream consumer (flusher, webhook detector and
/// dispatcher); their loops log them and retry.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("redis pool: {0}")]
    Pool(#[from] deadpool_redis::PoolError),
    #[error("postgres: {0}")]
    Postgres(#[from] sqlx::Error),
}

impl From<StepError> for Error {
    fn from(err: StepError) -> Self {
        match err {
            StepError::Redis(e) => e.into(),
            StepError::Postgres(e) => e.into(),
            other => Error::Unavailable(other.to_string()),
        }
    }
}

impl StepError {
    /// The group (or the stream) is gone: Redis lost its data.
    pub fn is_missing_group(&self) -> bool {
        matches!(self, StepError::Redis(e) if e.code() == Some("NOGROUP"))
    }
}

/// One consumer of one group on every partition stream.
#[derive(Clone)]
pub struct GroupReader {
    redis: ConnectionManager,
    /// Connections for blocking reads (XREADGROUP BLOCK must not hold up a
    /// multiplexed connection others share).
    blocking: deadpool_redis::Pool,
    keys: Keyspace,
    group: &'static str,
    consumer: String,
    batch_size: usize,
    block: Duration,
    claim_idle: Duration,
}

impl GroupReader {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        redis: ConnectionManager,
        blocking: deadpool_redis::Pool,
        keys: Keyspace,
        group: &'static str,
        consumer: String,
        batch_size: usize,
        block: Duration,
        claim_idle: Duration,
    ) -> Self {
        Self {
            redis,
            blocking,
            keys,
            group,
            consumer,
            batch_size,
            block,
            claim_idle,
        }
    }

    pub fn keys(&self) -> &Keyspace {
        &self.keys
    }

    pub fn group(&self) -> &'static str {
        self.group
    }

    pub fn claim_idle(&self) -> Duration {
        self.claim_idle
    }

    /// Creates the group on every partition stream (and the stream itself)
    /// where missing, starting at `start` (`0`: every entry; `$`: new ones).
    pub async fn ensure_groups(&self, start: &str) -> Result<(), StepError> {
        let mut conn = self.redis.clone();
        for p in self.keys.partitions() {
            let created: Result<(), redis::RedisError> = redis::cmd("XGROUP")
                .arg("CREATE")
                .arg(self.keys.events(p))
                .arg(self.group)
                .arg(start)
                .arg("MKSTREAM")
                .query_async(&mut conn)
                .await;
            match created {
                Ok(()) => {}
                Err(e) if e.code() == Some("BUSYGROUP") => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Reads up to a batch of `partition`'s entries from `source`. `held`
    /// keeps the connection for blocking reads between calls (a pool
    /// checkout costs a round trip of its own); it is dropped on error.
    pub async fn read(
        &self,
        partition: Partition,
        source: Source,
        held: &mut Option<deadpool_redis::Connection>,
    ) -> Result<Vec<StreamId>, StepError> {
        let stream = self.keys.events(partition);
        if source == Source::Claimed {
            let reply: StreamAutoClaimReply = redis::cmd("XAUTOCLAIM")
                .arg(&stream)
                .arg(self.group)
                .arg(&self.consumer)
                .arg(self.claim_idle.as_millis() as u64)
                .arg("0-0")
                .arg("COUNT")
                .arg(self.batch_size)
                .query_async(&mut self.redis.clone())
                .await?;
            if !reply.claimed.is_empty() {
                tracing::info!(%partition, group = self.group, entries = reply.claimed.len(),
                    "took over entries of a silent consumer");
            }
            return Ok(reply.claimed);
        }
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(self.group)
            .arg(&self.consumer)
            .arg("COUNT")
            .arg(self.batch_size);
        let reply: Option<StreamReadReply> = if source == Source::New {
            cmd.arg("BLOCK")
                .arg(self.block.as_millis() as u64)
                .arg("STREAMS")
                .arg(&stream)
                .arg(">");
            let conn = match held {
                Some(conn) => conn,
                None => held.insert(self.blocking.get().await?),
            };
            match cmd.query_async(&mut **conn).await {
                Ok(reply) => reply,
                Err(err) => {
                    *held = None;
                    return Err(err.into());
                }
            }
        } else {
            cmd.arg("STREAMS").arg(&stream).arg("0");
            cmd.query_async(&mut self.redis.clone()).await?
        };
        Ok(reply
            .map(|r| r.keys.into_iter().flat_map(|k| k.ids).collect())
            .unwrap_or_default())
    }

    /// Acknowledges handled entries.
    pub async fn ack<'a>(
        &self,
        partition: Partition,
        ids: impl IntoIterator<Item = &'a str>,
    ) -> Result<(), StepError> {
        let mut cmd = redis::cmd("XACK");
        cmd.arg(self.keys.events(partition)).arg(self.group);
        let mut any = false;
        for id in ids {
            cmd.arg(id);
            any = true;
        }
        if any {
            let _: i64 = cmd.query_async(&mut self.redis.clone()).await?;
        }
        Ok(())
    }
}

/// Capped exponential backoff with full jitter, for the background loops
/// (by default 100 ms doubling to 5 s).
#[derive(Debug)]
pub struct Backoff {
    attempt: u32,
    base: Duration,
    cap: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new(Duration::from_millis(100), Duration::from_secs(5))
    }
}

impl Backoff {
    pub fn new(base: Duration, cap: Duration) -> Self {
        Self {
            attempt: 0,
            base,
            cap,
        }
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// Sleeps the next delay; false when `shutdown` came first.
    pub async fn wait(&mut self, shutdown: &CancellationToken) -> bool {
        let ceiling = retry_ceiling(self.base, self.cap, self.attempt);
        self.attempt = self.attempt.saturating_add(1);
        let delay = rand::rng().random_range(Duration::ZERO..=ceiling);
        tokio::select! {
            _ = shutdown.cancelled() => false,
            _ = tokio::time::sleep(delay) => true,
        }
    }
}

/// `base * 2^attempt`, at most `cap`.
pub fn retry_ceiling(base: Duration, cap: Duration, attempt: u32) -> Duration {
    base.saturating_mul(1u32 << attempt.min(20)).min(cap)
}
