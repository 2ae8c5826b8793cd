//! A Redis lock with a token and an expiry: re-warming after data loss and
//! reconciliation run once at a time across every stockd instance.
//!
//! The expiry bounds how long a crashed holder blocks the others; the token
//! makes sure a holder whose lock expired never deletes the next holder's.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::error::Error;
use crate::redis_conn::RedisConn;
use crate::scripts;

pub struct RedisLock {
    conn: RedisConn,
    key: String,
    token: String,
}

impl RedisLock {
    /// Takes the lock at `key` for `ttl`, or `None` when someone holds it.
    pub async fn acquire(
        conn: &RedisConn,
        key: String,
        ttl: Duration,
    ) -> Result<Option<Self>, Error> {
        let token = format!(
            "{:x}-{:x}",
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or_default(),
            std::process::id()
        );
        let mut conn = conn.clone();
        let taken: Option<String> = redis::cmd("SET")
            .arg(&key)
            .arg(&token)
            .arg("NX")
            .arg("PX")
            .arg(ttl.as_millis() as u64)
            .query_async(&mut conn)
            .await?;
        Ok(taken.map(|_| Self { conn, key, token }))
    }

    /// Gives the lock `ttl` more from now if it is still ours: a holder
    /// that works longer than a short expiry keeps it by renewing, and
    /// one that dies frees it within that expiry.
    pub async fn renew(&self, ttl: Duration) -> Result<bool, Error> {
        let renewed: i64 = scripts::UNLOCK
            .key(&self.key)
            .arg(&self.token)
            .arg(ttl.as_millis() as u64)
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(renewed == 1)
    }

    /// Releases the lock if it is still ours.
    pub async fn release(mut self) -> Result<bool, Error> {
        let released: i64 = scripts::UNLOCK
            .key(&self.key)
            .arg(&self.token)
            .invoke_async(&mut self.conn)
            .await?;
        Ok(released == 1)
    }
}
