//! The deployment's record in Redis, `NS:{meta}`: partition count, schema
//! version and epoch id, checked at start.

use std::time::{SystemTime, UNIX_EPOCH};

use redis::aio::ConnectionManager;

use crate::error::Error;
use crate::keys::Keyspace;

/// Version of the Redis layout (keys, record fields, event fields).
pub const SCHEMA_VERSION: u32 = 1;

/// What stockd found (or wrote) in `NS:{meta}` at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meta {
    pub partitions: u32,
    pub epoch: String,
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
    #[error("NS:{{meta}} holds schema {stored}, this stockd understands {SCHEMA_VERSION}")]
    SchemaMismatch { stored: String },
    #[error("reading NS:{{meta}}: {0}")]
    Redis(#[from] Error),
}

/// Records the partition count at first start and refuses a different one
/// later; writes an epoch id when there is none (so that a later loss of the
/// Redis data shows as a missing epoch).
pub async fn ensure(conn: &mut ConnectionManager, keys: &Keyspace) -> Result<Meta, MetaError> {
    let key = keys.meta();
    // HSETNX keeps the first writer's values when several instances start at once.
    let mut pipe = redis::pipe();
    pipe.hset_nx(&key, "partitions", keys.partition_count())
        .ignore()
        .hset_nx(&key, "schema", SCHEMA_VERSION)
        .ignore()
        .hset_nx(&key, "epoch", new_epoch_id())
        .ignore()
        .cmd("HMGET")
        .arg(&key)
        .arg(&["partitions", "schema", "epoch"]);
    let ((stored, schema, epoch),): ((u32, String, String),) =
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

fn new_epoch_id() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!("{nanos:x}-{:x}", std::process::id())
}
