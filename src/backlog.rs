//! The partition streams' backlog: what every consumer group (the flusher,
//! the exporters) has not handled yet, and what follows from it.
//!
//! About once a second, in a task of its own (so it goes on while a
//! consumer is stuck retrying), for every partition:
//! - the gauges of each group's unflushed entries and their age;
//! - the backlog gate: closed while any group's backlog is at or over the
//!   limit, which makes the scripts refuse new demand (UNAVAILABLE) so that
//!   Redis cannot run out of memory while Postgres or a broker is down;
//! - trimming: the stream is cut below the oldest entry any group still
//!   needs, and below the retention kept for Watch resumption.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use metrics::gauge;
use redis::streams::{StreamInfoGroupsReply, StreamPendingReply};
use tokio_util::sync::CancellationToken;

use crate::consumer::StepError;
use crate::events::EntryId;
use crate::keys::{Keyspace, Partition};
use crate::markers::Markers;
use crate::redis_conn::RedisConn;

/// One group's backlog in one partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupBacklog {
    pub group: &'static str,
    /// Entries not handled yet: delivered but unacknowledged, plus not yet
    /// delivered.
    pub unhandled: u64,
    pub oldest_unhandled: Option<EntryId>,
    pub oldest_unhandled_age_ms: i64,
}

/// A partition's stream and its groups' backlogs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backlog {
    pub partition: Partition,
    pub stream_length: u64,
    pub groups: Vec<GroupBacklog>,
    pub dead_letters: u64,
    /// Redis clock when this was read.
    pub now_ms: i64,
}

impl Backlog {
    pub fn group(&self, name: &str) -> Option<&GroupBacklog> {
        self.groups.iter().find(|g| g.group == name)
    }
}

#[derive(Debug, Clone)]
pub struct BacklogSettings {
    /// Unhandled entries of any group past which new demand is refused.
    pub max_unhandled: u64,
    /// How far back the stream is kept below the oldest unhandled entry.
    pub retention: Duration,
}

#[derive(Clone)]
pub struct Housekeeper {
    redis: RedisConn,
    keys: Keyspace,
    markers: Markers,
    /// The consumer groups whose progress counts.
    groups: Vec<&'static str>,
    settings: BacklogSettings,
    /// Per partition, whether this instance last saw its gate closed (to
    /// log the changes, not every second).
    closed: Arc<[AtomicBool]>,
}

impl Housekeeper {
    pub fn new(
        redis: RedisConn,
        keys: Keyspace,
        markers: Markers,
        groups: Vec<&'static str>,
        settings: BacklogSettings,
    ) -> Self {
        let closed = keys.partitions().map(|_| AtomicBool::new(false)).collect();
        Self {
            redis,
            keys,
            markers,
            groups,
            settings,
            closed,
        }
    }

    /// The backlog of every counted group in `partition`, in one pipelined
    /// round trip (and one more per group whose oldest unhandled entry was
    /// never delivered).
    pub async fn backlog(&self, partition: Partition) -> Result<Backlog, StepError> {
        let stream = self.keys.events(partition);
        let mut conn = self.redis.clone();
        let mut pipe = redis::pipe();
        pipe.cmd("TIME")
            .cmd("XLEN")
            .arg(&stream)
            .cmd("XINFO")
            .arg("GROUPS")
            .arg(&stream)
            .cmd("XLEN")
            .arg(self.keys.dead_letters(partition));
        for group in &self.groups {
            pipe.cmd("XPENDING").arg(&stream).arg(*group);
        }
        // XINFO GROUPS fails on a stream that does not exist yet.
        pipe.ignore_errors();
        let mut replies: Vec<redis::RedisResult<redis::Value>> =
            pipe.query_async(&mut conn).await?;
        let mut next = || replies.remove(0);
        let (secs, micros): (i64, i64) = redis::from_redis_value(next()?)?;
        let now_ms = secs * 1000 + micros / 1000;
        let length: u64 = redis::from_redis_value(next()?)?;
        let infos: StreamInfoGroupsReply = match next() {
            Ok(value) => redis::from_redis_value(value)?,
            Err(e) if e.code() == Some("ERR") => StreamInfoGroupsReply { groups: Vec::new() },
            Err(e) => return Err(e.into()),
        };
        let dead_letters: u64 = redis::from_redis_value(next()?)?;
        let mut groups = Vec::with_capacity(self.groups.len());
        for &group in &self.groups {
            let pending: Option<StreamPendingReply> =
                next().ok().and_then(|v| redis::from_redis_value(v).ok());
            let info = infos.groups.iter().find(|g| g.name == group);
            let pending_count = pending.as_ref().map_or(0, |p| p.count() as u64);
            let (lag, last_delivered) = match info {
                // No group yet: everything in the stream is unhandled.
                None => (length, None),
                Some(g) => (
                    g.lag.map(|l| l as u64).unwrap_or(0),
                    EntryId::parse(&g.last_delivered_id),
                ),
            };
            let oldest = match (&pending, last_delivered) {
                (Some(StreamPendingReply::Data(data)), _) => EntryId::parse(&data.start_id),
                _ if lag == 0 => None,
                (_, last) => {
                    // The first entry the group has not delivered yet.
                    let start = last
                        .map(|id| format!("({id}"))
                        .unwrap_or_else(|| "-".into());
                    let first: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
                        .arg(&stream)
                        .arg(start)
                        .arg("+")
                        .arg("COUNT")
                        .arg(1)
                        .query_async(&mut conn)
                        .await?;
                    first
                        .into_iter()
                        .next()
                        .and_then(|(id, _)| EntryId::parse(&id))
                }
            };
            groups.push(GroupBacklog {
                group,
                unhandled: pending_count + lag,
                oldest_unhandled: oldest,
                oldest_unhandled_age_ms: oldest
                    .map(|id| (now_ms - id.ms as i64).max(0))
                    .unwrap_or(0),
            });
        }
        Ok(Backlog {
            partition,
            stream_length: length,
            groups,
            dead_letters,
            now_ms,
        })
    }

    /// Metrics, the backlog gate and trimming for one partition.
    pub async fn housekeeping(&self, partition: Partition) -> Result<Backlog, StepError> {
        let backlog = self.backlog(partition).await?;
        let label = partition.to_string();
        for g in &backlog.groups {
            gauge!("stockd_consumer_backlog", "group" => g.group, "partition" => label.clone())
                .set(g.unhandled as f64);
            gauge!("stockd_consumer_lag_seconds", "group" => g.group, "partition" => label.clone())
                .set(g.oldest_unhandled_age_ms as f64 / 1000.0);
            if let Some(exporter) = crate::export::exporter_of(g.group) {
                gauge!("stockd_export_backlog", "exporter" => exporter, "partition" => label.clone())
                    .set(g.unhandled as f64);
                gauge!("stockd_export_lag_seconds", "exporter" => exporter, "partition" => label.clone())
                    .set(g.oldest_unhandled_age_ms as f64 / 1000.0);
            }
        }
        if let Some(flusher) = backlog.group(crate::flusher::GROUP) {
            gauge!("stockd_unflushed_events", "partition" => label.clone())
                .set(flusher.unhandled as f64);
            gauge!("stockd_oldest_unflushed_age_seconds", "partition" => label)
                .set(flusher.oldest_unhandled_age_ms as f64 / 1000.0);
        }

        let mut conn = self.redis.clone();
        let over: Vec<&GroupBacklog> = backlog
            .groups
            .iter()
            .filter(|g| g.unhandled >= self.settings.max_unhandled)
            .collect();
        let closing = !over.is_empty();
        self.markers.set_gate(&mut conn, partition, closing).await?;
        let was_closed = self.closed[partition.index()].swap(closing, Ordering::Relaxed);
        if closing && !was_closed {
            let behind: Vec<&str> = over.iter().map(|g| g.group).collect();
            tracing::warn!(%partition, groups = ?behind, limit = self.settings.max_unhandled,
                "backlog over its limit: new demand on this partition is refused until it drains");
        } else if was_closed && !closing {
            tracing::info!(%partition, "backlog drained: accepting demand again");
        }

        // Keep everything from the oldest entry any group still needs on,
        // and the retention window before it.
        let retention_floor = backlog.now_ms - self.settings.retention.as_millis() as i64;
        let floor = backlog
            .groups
            .iter()
            .filter_map(|g| g.oldest_unhandled)
            .map(|id| id.ms as i64)
            .fold(retention_floor, i64::min);
        if floor > 0 {
            let _: i64 = redis::cmd("XTRIM")
                .arg(self.keys.events(partition))
                .arg("MINID")
                .arg("~")
                .arg(format!("{floor}-0"))
                .query_async(&mut conn)
                .await?;
        }
        Ok(backlog)
    }

    /// Every second: metrics, gate and trimming of every partition.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut ticker = tokio::time::interval(Duration::from_secs(1));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = ticker.tick() => {}
            }
            for p in self.keys.partitions() {
                // With Redis gone each partition takes its retries: stop
                // between partitions rather than after all of them.
                if shutdown.is_cancelled() {
                    return;
                }
                if let Err(err) = self.housekeeping(p).await {
                    tracing::warn!(partition = %p, error = %err, "stream housekeeping failed");
                }
            }
        }
    }
}
