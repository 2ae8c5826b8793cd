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
    #[error(
        "Redis evicts keys (maxmemory-policy {policy}): evicted idempotency records would let \
         retries apply twice and evicted stock would be reloaded from older Postgres rows. Set \
         `maxmemory-policy noeviction` (and size maxmemory for the stock and the backlog), or \
         start with --allow-redis-eviction if you accept that"
    )]
    EvictingPolicy { policy: String },
    #[error("reading NS:{{meta}}: {0}")]
    Redis(#[from] Error),
}

/// Redis' persistence and eviction settings, as far as the ACL lets stockd
/// read them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisSettings {
    pub appendonly: Option<String>,
    pub appendfsync: Option<String>,
    pub save: Option<String>,
    pub maxmemory_policy: Option<String>,
}

impl RedisSettings {
    /// What a Redis crash can cost with these settings, for the log.
    pub fn durability(&self) -> &'static str {
        match (self.appendonly.as_deref(), self.appendfsync.as_deref()) {
            (Some("yes"), Some("always")) => {
                "AOF with appendfsync always: an acknowledged change survives a Redis crash"
            }
            (Some("yes"), Some("everysec")) => {
                "AOF with appendfsync everysec: a Redis crash can lose about the last second of \
                 changes not yet flushed to Postgres"
            }
            (Some("yes"), _) => {
                "AOF without fsync: a Redis crash can lose the changes not yet flushed to Postgres"
            }
            _ if self.save.as_deref().is_some_and(|s| !s.trim().is_empty()) => {
                "RDB snapshots only: a Redis crash rolls back to the last snapshot, losing the \
                 changes not yet flushed to Postgres"
            }
            _ => "no persistence: a Redis restart loses every change not yet flushed to Postgres",
        }
    }
}

/// Reads Redis' persistence and eviction settings (CONFIG GET; the ACL of
/// deploy/redis-acl.txt allows it), refuses an evicting policy unless
/// allowed, and logs what a Redis crash can cost. When the ACL does not
/// allow reading them, says so and goes on.
pub async fn check_redis_settings(
    conn: &mut RedisConn,
    allow_eviction: bool,
) -> Result<Option<RedisSettings>, MetaError> {
    let mut get = redis::cmd("CONFIG");
    get.arg("GET")
        .arg("appendonly")
        .arg("appendfsync")
        .arg("save")
        .arg("maxmemory-policy");
    // Every primary of a cluster must be set alike; the weakest counts.
    let read: Result<Vec<(String, String)>, redis::RedisError> =
        conn.on_every_primary(&get).await.and_then(|nodes| {
            let mut all = Vec::new();
            for (_, value) in nodes {
                all.extend(redis::from_redis_value::<Vec<(String, String)>>(value)?);
            }
            Ok(all)
        });
    let pairs = match read {
        Ok(pairs) => pairs,
        Err(e) if e.code() == Some("NOPERM") => {
            tracing::warn!(
                "cannot read Redis' persistence and eviction settings (the ACL does not allow \
                 CONFIG GET): grant +config|get as in deploy/redis-acl.txt, and make sure \
                 maxmemory-policy is noeviction"
            );
            return Ok(None);
        }
        Err(e) => return Err(MetaError::Redis(e.into())),
    };
    // The weakest value of each setting across the primaries.
    let pick = |name: &str, weakest: &[&str]| {
        let values: Vec<&String> = pairs
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v)
            .collect();
        weakest
            .iter()
            .find_map(|w| values.iter().find(|v| v.as_str() == *w))
            .or(values.first())
            .map(|v| (*v).clone())
    };
    let settings = RedisSettings {
        appendonly: pick("appendonly", &["no"]),
        appendfsync: pick("appendfsync", &["no", "everysec"]),
        save: pick("save", &[""]),
        maxmemory_policy: pairs
            .iter()
            .filter(|(k, _)| k == "maxmemory-policy")
            .map(|(_, v)| v.clone())
            .find(|v| v != "noeviction")
            .or_else(|| pick("maxmemory-policy", &[])),
    };
    match settings.maxmemory_policy.as_deref() {
        Some("noeviction") | None => {}
        Some(policy) if allow_eviction => {
            tracing::warn!(
                policy,
                "Redis may evict keys (allowed by --allow-redis-eviction): \
                evicted idempotency records let retries apply twice"
            );
        }
        Some(policy) => {
            return Err(MetaError::EvictingPolicy {
                policy: policy.to_owned(),
            });
        }
    }
    if settings.appendonly.as_deref() == Some("yes")
        && settings.appendfsync.as_deref() == Some("always")
    {
        tracing::info!(durability = settings.durability(), "Redis persistence");
    } else {
        tracing::warn!(
            durability = settings.durability(),
            "Redis persistence: set appendonly yes and appendfsync always to close the window"
        );
    }
    Ok(Some(settings))
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
