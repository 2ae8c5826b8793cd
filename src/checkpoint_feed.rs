//! Every instance learns every flush as it commits, whichever instance
//! flushed it.
//!
//! The scripts refuse a partition whose marker is behind the newest flushed
//! entry this instance knows while the stream lacks that entry (a rollback:
//! see [`crate::markers`]). The instance whose flusher committed a batch
//! knows it at the commit; the others learned it from the marker, which the
//! flusher writes just after, so a master that died between the two left
//! them knowing less than Postgres: on the promoted replica their scripts
//! passed the check and took writes under versions Postgres had, until
//! their watchdog's next look (up to `STOCKD_EPOCH_CHECK_MS`).
//!
//! So each flush transaction NOTIFYs [`CHANNEL`] with its checkpoints
//! (delivered at the commit, never for a rolled-back transaction), and every
//! instance LISTENs here and learns them into its [`Markers`]. Postgres
//! delivers nothing sent while a listener was disconnected: after every
//! (re)connection the checkpoints are read once ([`CheckpointFeed::catch_up_once`]),
//! and every 5 s besides, for a connection that went half-open unnoticed.

use std::time::Duration;

use metrics::counter;
use sqlx::postgres::PgListener;
use tokio_util::sync::CancellationToken;

use crate::consumer::Backoff;
use crate::events::EntryId;
use crate::keys::Partition;
use crate::markers::Markers;
use crate::store::Store;

/// The channel each flush transaction notifies with its checkpoints.
pub(crate) const CHANNEL: &str = "stockd_flushed";

/// How often the checkpoints are read besides the notifications (see
/// `listen`).
const CATCH_UP_EVERY: Duration = Duration::from_secs(5);

/// Longest notification payload sent (Postgres refuses 8,000 bytes and
/// more); a flush of many partitions sends several.
const MAX_PAYLOAD: usize = 7_000;

/// The payloads announcing `checkpoints`: `<partition>=<entry id>` pairs
/// separated by spaces.
pub(crate) fn payloads(checkpoints: &[(u32, EntryId)]) -> Vec<String> {
    let mut out = vec![String::new()];
    for (partition, id) in checkpoints {
        let pair = format!("{partition}={id}");
        let last = out.last_mut().expect("never empty");
        if !last.is_empty() && last.len() + 1 + pair.len() > MAX_PAYLOAD {
            out.push(pair);
        } else {
            if !last.is_empty() {
                last.push(' ');
            }
            last.push_str(&pair);
        }
    }
    out.retain(|p| !p.is_empty());
    out
}

/// The pairs of a payload; what does not parse is left out.
fn parse(payload: &str) -> impl Iterator<Item = (u32, EntryId)> + '_ {
    payload.split_whitespace().filter_map(|pair| {
        let (partition, id) = pair.split_once('=')?;
        Some((partition.parse().ok()?, EntryId::parse(id)?))
    })
}

pub(crate) struct CheckpointFeed {
    store: Store,
    markers: Markers,
    /// The deployment's partition count: a pair naming another partition
    /// (a foreign payload) is ignored.
    partitions: u32,
}

impl CheckpointFeed {
    pub(crate) fn new(store: Store, markers: Markers, partitions: u32) -> Self {
        Self {
            store,
            markers,
            partitions,
        }
    }

    fn learn(&self, partition: u32, id: EntryId) -> bool {
        if partition >= self.partitions {
            return false;
        }
        self.markers.learn(Partition(partition), id);
        true
    }

    /// Learns every partition's checkpoint as Postgres holds it now; the
    /// number of partitions learned.
    pub(crate) async fn catch_up_once(&self) -> Result<usize, sqlx::Error> {
        let checkpoints = self.store.checkpoints().await?;
        Ok(checkpoints
            .into_iter()
            .filter_map(|(p, c)| EntryId::parse(&c.last_entry_id).map(|id| (p, id)))
            .filter(|&(p, id)| self.learn(p, id))
            .count())
    }

    /// Learns the pairs of one notification.
    fn learn_payload(&self, payload: &str) {
        for (p, id) in parse(payload) {
            self.learn(p, id);
        }
    }

    /// Listens until `shutdown`; reconnects with backoff, catching up after
    /// every connection.
    pub(crate) async fn run(self, shutdown: CancellationToken) {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        loop {
            match self.listen(&shutdown, &mut backoff).await {
                Ok(()) => return,
                Err(err) => {
                    counter!("stockd_checkpoint_feed_errors_total").increment(1);
                    tracing::warn!(error = %err,
                        "checkpoint feed: listening for other instances' flushes failed; \
                         reconnecting (until then the watchdog's look covers them)");
                    if !backoff.wait(&shutdown).await {
                        return;
                    }
                }
            }
        }
    }

    /// One connection's life: LISTEN, catch up (then the next failure
    /// backs off from the start), then every notification until `shutdown`
    /// (Ok) or a failure (Err).
    async fn listen(
        &self,
        shutdown: &CancellationToken,
        backoff: &mut Backoff,
    ) -> Result<(), sqlx::Error> {
        let mut listener = PgListener::connect_with(self.store.pool()).await?;
        listener.listen(CHANNEL).await?;
        self.catch_up_once().await?;
        backoff.reset();
        // A connection that went half-open says nothing and delivers
        // nothing: reading the checkpoints now and then bounds how stale
        // this instance's knowledge can get without a notification.
        let mut catch_up = tokio::time::interval(CATCH_UP_EVERY);
        catch_up.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        catch_up.reset();
        loop {
            // The receive is kept across catch-ups, never dropped midway.
            let recv = listener.try_recv();
            tokio::pin!(recv);
            let next = loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = catch_up.tick() => self.catch_up_once().await.map(drop)?,
                    next = &mut recv => break next?,
                }
            };
            match next {
                Some(notification) => self.learn_payload(notification.payload()),
                // The connection was lost; `try_recv` reconnects on the
                // next call, and what was sent meanwhile is read back.
                None => {
                    self.catch_up_once().await?;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_round_trip_and_stay_under_the_limit() {
        let checkpoints: Vec<(u32, EntryId)> = (0..1024)
            .map(|p| {
                (
                    p,
                    EntryId {
                        ms: 1_796_066_498_039 + u64::from(p),
                        seq: u64::from(p % 3),
                    },
                )
            })
            .collect();
        let sent = payloads(&checkpoints);
        assert!(sent.len() > 1, "1,024 partitions need several payloads");
        assert!(sent.iter().all(|p| p.len() <= MAX_PAYLOAD));
        let back: Vec<(u32, EntryId)> = sent.iter().flat_map(|p| parse(p)).collect();
        assert_eq!(back, checkpoints);
        assert!(payloads(&[]).is_empty());
    }

    #[test]
    fn foreign_pairs_are_left_out() {
        let pairs: Vec<(u32, EntryId)> = parse("1=5-0 x=1-0 2=nope 3=7-1 =1-1").collect();
        assert_eq!(
            pairs,
            vec![
                (1, EntryId { ms: 5, seq: 0 }),
                (3, EntryId { ms: 7, seq: 1 })
            ]
        );
    }
}
