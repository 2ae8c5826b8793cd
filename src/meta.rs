//! The deployment's record in Redis, `NS:{meta}`: partition count, schema
//! version and epoch id, checked at start.

use crate::redis_conn::RedisConn;

use crate::error::Error;
use crate::keys::Keyspace;

/// Version of the Redis layout (keys, record fields, event fields).
/// 2: user parts of keys percent-encoded, partition markers, records in
/// the partition of their items with a locator in the id's partition.
pub const SCHEMA_VERSION: u32 = 2;

/// What stockd found (or wrote) in `NS:{meta}` at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meta {
    pub partitions: u32,
    /// Absent on a new deployment, and after Redis lost its data: the
    /// warmer then (re-)warms Redis from Postgres and writes one.
    pub epoch: Option<String>,
}

/// Errors that stop stockd from starting.
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    #[error(
        "this deployment was created with {stored} partitions but stockd was started with \
         --partitions {configured}; the partition count is fixed for the life of a deployment: \
         start with --partitions {stored} (or use another --namespace)"
    )]
    PartitionMismatch { stored: u32, configured: u32 },
    #[error(
        "Redis holds this namespace in layout {stored}; this stockd writes layout {SCHEMA_VERSION} \
         (keys encoded, partition markers). To move over: stop every older stockd, then start this \
         one once with --reset-redis: it flushes what the streams still hold to Postgres, deletes \
         the namespace's keys and warms Redis from Postgres (idempotency records of requests made \
         before are not carried over)"
    )]
    SchemaMismatch { stored: String },
    #[error("reading NS:{{meta}}: {0}")]
    Redis(#[from] Error),
}

/// Records the partition count at first start and refuses a different one
/// later. The epoch id is written by the watchdog once Redis is warm (each
/// partition's marker carries it too, which is what the scripts check).
pub async fn ensure(conn: &mut RedisConn, keys: &Keyspace) -> Result<Meta, MetaError> {
    let key = keys.meta();
    // HSETNX keeps the first writer's values when several instances start at once.
    let mut pipe = redis::pipe();
    pipe.hset_nx(key, "partitions", keys.partition_count())
        .ignore()
        .hset_nx(key, "schema", SCHEMA_VERSION)
        .ignore()
        .cmd("HMGET")
        .arg(key)
        .arg(&["partitions", "schema", "epoch"]);
    let ((stored, schema, epoch),): ((u32, String, Option<String>),) =
        pipe.query_async(conn).await.map_err(Error::from)?;
    if schema != SCHEMA_VERSION.to_string() {
        return Err(MetaError::SchemaMismatch { stored: schema });
    }
    if stored != keys.partition_count() {
        return Err(MetaError::PartitionMismatch {
            stored,
            configured: keys.partition_count(),
        });
    }
    Ok(Meta {
        partitions: stored,
        epoch,
    })
}
