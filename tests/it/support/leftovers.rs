//! What a test made on the shared servers (its Redis namespace, its
//! database), removed by `remove` at the end of a test that went well, and
//! by the guard's drop while a failing test unwinds: a failure leaves
//! nothing behind for the next run to trip over or for the disk to fill.

use std::time::Duration;

use crate::support::namespace::{redis_cluster, redis_url};
use crate::support::postgres::drop_database;

/// A test's namespace and database, removed when dropped unless removed or
/// kept before.
pub struct Leftovers {
    /// The namespace (none for a test whose Redis is its own and dies
    /// with it).
    namespace: Option<String>,
    /// None once removed or kept.
    database: Option<String>,
    /// Where the namespace lives: URL, and whether it is a cluster.
    redis: (String, bool),
}

impl Leftovers {
    /// A namespace on the shared test Redis, and a database.
    pub fn new(namespace: &str, database: &str) -> Self {
        Self::on(namespace, database, (redis_url(), redis_cluster()))
    }

    /// A namespace on the Redis at `redis` (URL, is it a cluster), and a
    /// database.
    pub fn on(namespace: &str, database: &str, redis: (String, bool)) -> Self {
        Self {
            namespace: Some(namespace.to_owned()),
            database: Some(database.to_owned()),
            redis,
        }
    }

    /// A database only (the test's Redis is its own).
    pub fn database(database: &str) -> Self {
        Self {
            namespace: None,
            database: Some(database.to_owned()),
            redis: (redis_url(), redis_cluster()),
        }
    }

    /// Removes them now.
    pub async fn remove(mut self) {
        let (namespace, database) = self.disarm();
        remove(namespace, database, self.redis.clone()).await;
    }

    /// Leaves them in place (another app of the test goes on with them).
    pub fn keep(mut self) {
        self.disarm();
    }

    fn disarm(&mut self) -> (Option<String>, Option<String>) {
        (self.namespace.take(), self.database.take())
    }
}

impl Drop for Leftovers {
    /// Runs on a thread and runtime of its own: the test's runtime may be
    /// unwinding, or single threaded and blocked here.
    fn drop(&mut self) {
        let (namespace, database) = self.disarm();
        if namespace.is_none() && database.is_none() {
            return;
        }
        let redis = self.redis.clone();
        let cleanup = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime for the cleanup")
                .block_on(remove(namespace, database, redis));
        });
        let _ = cleanup.join();
    }
}

/// Deletes the namespace's keys and drops the database, each step bounded;
/// panics after both were tried when either failed.
async fn remove(namespace: Option<String>, database: Option<String>, redis: (String, bool)) {
    const STEP: Duration = Duration::from_secs(20);
    let mut failed = Vec::new();
    if let Some(namespace) = namespace {
        let (url, cluster) = redis;
        match stockd::app::connect_redis(&url, cluster, Duration::from_secs(5)).await {
            Ok(conn) => {
                let keys = stockd::keys::Keyspace::new(namespace.as_str(), 1);
                let deleted =
                    tokio::time::timeout(STEP, stockd::keys::delete_namespace(&conn, &keys)).await;
                if !matches!(deleted, Ok(Ok(_))) {
                    failed.push(format!("deleting namespace {namespace}: {deleted:?}"));
                }
            }
            Err(err) => failed.push(format!("connecting to {url} for {namespace}: {err}")),
        }
    }
    if let Some(database) = database
        && tokio::time::timeout(STEP, drop_database(&database))
            .await
            .is_err()
    {
        failed.push(format!("dropping database {database} took over {STEP:?}"));
    }
    assert!(failed.is_empty(), "cleanup: {failed:?}");
}
