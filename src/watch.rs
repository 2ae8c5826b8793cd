//! Live change events, fanned out to many watchers from one reader: the
//! source of gRPC `Inventory.Watch` (src/grpc/), Server-Sent Events and
//! GraphQL subscriptions (src/http/). The hub speaks domain types only: a
//! [`Filter`] and a resume [`EntryId`] in, [`ChangeEvent`]s and one final
//! [`Interrupted`] out; each edge converts them to its own protocol.
//!
//! Every stockd instance runs ONE reader task ([`Hub::run`]): a plain
//! `XREAD BLOCK` over every partition stream (not a consumer group: watching
//! acknowledges nothing), from the last entry it has seen, on a connection of
//! its own. Each read's entries are ordered by id and handed to every
//! watcher whose SKU filter matches, through that watcher's bounded queue
//! (`STOCKD_WATCH_BUFFER` events). A watcher whose queue is full is cut: the
//! reader never waits for a slow client and never holds more than the
//! buffer for it; the client gets, after the events it was already sent,
//! an [`Interrupted`] (`RESOURCE_EXHAUSTED`) with the id to resume from.
//!
//! Resuming (`from_event_id` = X, the `event_id` of the last event a client
//! received): stream ids are per partition, so X is read as
//!
//! - in the one watched partition that holds an entry X: the entries after X;
//! - in the others (or in all, when several partitions hold an entry with
//!   that same id): the entries from X's millisecond on (`<ms>-0`).
//!
//! Since events reach a watcher in id order within each read and reads
//! follow the Redis clock, nothing after X is missed in any partition; a
//! watch spanning partitions may see again events of X's very millisecond
//! from the other partitions (receivers deduplicate by `(sku, location,
//! version)`). A watch of one partition (e.g. one SKU) resumes exactly.
//!
//! A resumed watch first replays from the streams with `XRANGE` (merged
//! across partitions in id order, with flow control from the client), then
//! subscribes to the reader, replays what arrived in between up to the
//! position the reader had when it subscribed, and goes live, dropping live
//! events it already replayed: no gap and no duplicate at the switch.
//! An X older than what the streams still hold (trimmed below the
//! retention) is `OUT_OF_RANGE`.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use crate::redis_conn::{CommandBatch, RedisConn};
use metrics::{counter, gauge};
use redis::Value;
use redis::streams::StreamRangeReply;
use tokio::sync::{Notify, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use crate::domain::Sku;
use crate::error::Error;
use crate::events::{self, ChangeEvent, EntryId};
use crate::keys::{Keyspace, Partition};
use crate::scripts;

/// Most SKUs one watch may name.
pub const MAX_WATCH_SKUS: usize = 1_000;

/// How long the reader pauses when no partition had anything, on a
/// cluster (where it cannot block on every stream at once).
const CLUSTER_POLL: Duration = Duration::from_millis(20);

/// Entries fetched per partition per `XRANGE` while replaying.
const REPLAY_PAGE: usize = 500;

/// How long a watch's final status may wait for the client to read once
/// the server is shutting down.
const FINAL_STATUS_WAIT: Duration = Duration::from_secs(5);

/// Events between the watcher task and the client's stream (flow control
/// from the client reaches the watcher task through this small queue).
const OUT_QUEUE: usize = 16;

/// What a watch yields: its events in order, then, when it ends for any
/// reason but the client leaving, one [`Interrupted`].
pub type EventStream = ReceiverStream<Result<Arc<ChangeEvent>, Interrupted>>;

/// Why a watch ended, and where the client resumes (`from_event_id` over
/// gRPC, `Last-Event-ID` over SSE) to miss nothing.
#[derive(Debug, thiserror::Error)]
#[error("{error}")]
pub struct Interrupted {
    #[source]
    pub error: Error,
    pub resume_from: EntryId,
}

#[derive(Debug, Clone)]
pub struct WatchSettings {
    /// Events a watcher may have queued before it is cut as too slow.
    pub buffer: usize,
    /// How long one `XREAD BLOCK` waits before it looks again.
    pub block: Duration,
    /// Most entries per partition in one read.
    pub read_count: usize,
}

impl Default for WatchSettings {
    fn default() -> Self {
        Self {
            buffer: 1024,
            block: Duration::from_millis(1000),
            read_count: 1000,
        }
    }
}

impl WatchSettings {
    /// The settings of `config` (flags and environment).
    pub fn from_config(config: &crate::config::Config) -> Self {
        Self {
            buffer: config.watch.watch_buffer as usize,
            ..Self::default()
        }
    }
}

/// A client's resume position (`from_event_id`, `Last-Event-ID`): empty
/// means "only new events".
pub fn parse_resume(field: &str, raw: &str) -> Result<Option<EntryId>, Error> {
    if raw.is_empty() {
        return Ok(None);
    }
    EntryId::parse(raw).map(Some).ok_or_else(|| {
        Error::invalid(
            field,
            "expected a stream entry id <ms>-<seq>, e.g. 1764095704036-0",
        )
    })
}

/// Which events a watcher wants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Filter {
    All,
    Skus(HashSet<String>),
}

impl Filter {
    /// Empty = every SKU; each SKU validated like everywhere else.
    pub fn parse(field: &str, skus: Vec<String>) -> Result<Self, Error> {
        if skus.is_empty() {
            return Ok(Filter::All);
        }
        Self::skus(field, skus, MAX_WATCH_SKUS)
    }

    /// One to `max` SKUs (never "every SKU"), each validated.
    pub fn skus(field: &str, skus: Vec<String>, max: usize) -> Result<Self, Error> {
        if skus.is_empty() {
            return Err(Error::invalid(field, "name at least one SKU"));
        }
        if skus.len() > max {
            return Err(Error::invalid(
                field,
                format!("at most {max} SKUs per watch, got {}", skus.len()),
            ));
        }
        let mut set = HashSet::new();
        for (i, sku) in skus.into_iter().enumerate() {
            set.insert(Sku::parse(&format!("{field}[{i}]"), sku)?.to_string());
        }
        Ok(Filter::Skus(set))
    }

    pub fn matches(&self, sku: &str) -> bool {
        match self {
            Filter::All => true,
            Filter::Skus(skus) => skus.contains(sku),
        }
    }

    /// The partitions that can hold matching events, in order.
    pub fn partitions(&self, keys: &Keyspace) -> Vec<Partition> {
        match self {
            Filter::All => keys.partitions().collect(),
            Filter::Skus(skus) => {
                let mut ps: Vec<Partition> = skus.iter().map(|s| keys.partition_of(s)).collect();
                ps.sort();
                ps.dedup();
                ps
            }
        }
    }
}

/// Why the reader stopped feeding a watcher.
const END_NONE: u8 = 0;
const END_TOO_SLOW: u8 = 1;
const END_SHUTDOWN: u8 = 2;

struct Slot {
    tx: mpsc::Sender<Arc<ChangeEvent>>,
    end: Arc<AtomicU8>,
    filter: Filter,
}

#[derive(Default)]
struct State {
    /// Per partition, the last entry the reader has handed out.
    cursors: Vec<EntryId>,
    watchers: HashMap<u64, Slot>,
    /// Watchers of every SKU, and watchers by SKU.
    all: HashSet<u64>,
    by_sku: HashMap<String, HashSet<u64>>,
    closed: bool,
}

impl State {
    fn remove(&mut self, id: u64) {
        if let Some(slot) = self.watchers.remove(&id) {
            match slot.filter {
                Filter::All => {
                    self.all.remove(&id);
                }
                Filter::Skus(skus) => {
                    for sku in skus {
                        if let Some(ids) = self.by_sku.get_mut(&sku) {
                            ids.remove(&id);
                            if ids.is_empty() {
                                self.by_sku.remove(&sku);
                            }
                        }
                    }
                }
            }
        }
    }

    /// Hands `events` (in order) to every matching watcher; cuts the ones
    /// whose queue is full and forgets the ones that went away.
    fn fan_out(&mut self, events: &[Arc<ChangeEvent>]) -> usize {
        let mut gone: Vec<u64> = Vec::new();
        let mut sent = 0;
        for event in events {
            let targets = self
                .all
                .iter()
                .chain(self.by_sku.get(&event.sku).into_iter().flatten());
            for id in targets {
                if gone.contains(id) {
                    continue;
                }
                let Some(slot) = self.watchers.get(id) else {
                    continue;
                };
                match slot.tx.try_send(event.clone()) {
                    Ok(()) => sent += 1,
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        slot.end.store(END_TOO_SLOW, Ordering::SeqCst);
                        counter!("stockd_watchers_cut_total").increment(1);
                        gone.push(*id);
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => gone.push(*id),
                }
            }
        }
        for id in gone {
            // Dropping the sender closes the queue: the watcher sees the
            // end after the events it already holds.
            self.remove(id);
        }
        sent
    }
}

struct Inner {
    keys: Keyspace,
    /// The reader's connection: `XREAD BLOCK` only.
    reader: RedisConn,
    /// Replays and range checks of the watchers.
    query: RedisConn,
    settings: WatchSettings,
    state: Mutex<State>,
    next_id: AtomicU64,
    /// Cancelled when the reader stops: watchers end, new ones are refused.
    stopped: CancellationToken,
    /// Stream key → partition, for read replies.
    partition_of_key: HashMap<String, Partition>,
    /// Woken when a watcher subscribes, so that an idle reader (no
    /// watchers) starts reading at once.
    watcher_arrived: Notify,
}

/// The fan-out hub of one stockd instance: the reader and its watchers.
#[derive(Clone)]
pub struct Hub {
    inner: Arc<Inner>,
}

/// Where a replay of one partition starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Start {
    After(EntryId),
    From(EntryId),
}

impl Start {
    fn xrange_arg(self) -> String {
        match self {
            Start::After(id) => format!("({id}"),
            Start::From(id) => id.to_string(),
        }
    }

    /// The newest id the replay does not include.
    fn last_excluded(self) -> EntryId {
        match self {
            Start::After(id) => id,
            Start::From(id) => id.predecessor(),
        }
    }

    fn admits(self, id: EntryId) -> bool {
        match self {
            Start::After(x) => id > x,
            Start::From(x) => id >= x,
        }
    }
}

impl Hub {
    /// Connects the reader at the current end of every partition stream.
    /// `reader` must allow a command to take `settings.block` plus margin.
    pub async fn start(
        reader: RedisConn,
        query: RedisConn,
        keys: Keyspace,
        settings: WatchSettings,
    ) -> Result<Self, redis::RedisError> {
        let partition_of_key = keys.partitions().map(|p| (keys.events(p), p)).collect();
        let hub = Hub {
            inner: Arc::new(Inner {
                keys,
                reader,
                query,
                settings,
                state: Mutex::new(State::default()),
                next_id: AtomicU64::new(1),
                stopped: CancellationToken::new(),
                partition_of_key,
                watcher_arrived: Notify::new(),
            }),
        };
        let cursors = hub.stream_ends().await?;
        hub.state().cursors = cursors;
        describe_metrics();
        Ok(hub)
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the state half
        // updated in a way that matters more than losing the hub.
        self.inner.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The last entry id of every partition stream (`0-0` when empty).
    async fn stream_ends(&self) -> Result<Vec<EntryId>, redis::RedisError> {
        let all: Vec<Partition> = self.inner.keys.partitions().collect();
        self.stream_ends_of(&all).await
    }

    /// The last entry id of each of `partitions`' streams, in one round trip.
    async fn stream_ends_of(
        &self,
        partitions: &[Partition],
    ) -> Result<Vec<EntryId>, redis::RedisError> {
        let mut batch = CommandBatch::new();
        for &p in partitions {
            let stream = self.inner.keys.events(p);
            let mut last = redis::cmd("XREVRANGE");
            last.arg(&stream).arg("+").arg("-").arg("COUNT").arg(1);
            batch.cmd(stream, last);
        }
        batch
            .query(&self.inner.query)
            .await?
            .into_iter()
            .map(|reply| {
                let r: StreamRangeReply = redis::from_redis_value(reply)?;
                Ok(r.ids
                    .first()
                    .and_then(|e| EntryId::parse(&e.id))
                    .unwrap_or(EntryId::ZERO))
            })
            .collect()
    }

    /// The reader: reads and fans out until `shutdown`, then ends every
    /// watch (UNAVAILABLE with the id to resume from), so that the server's
    /// graceful shutdown is not held up by open streams.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut backoff =
            crate::webhooks::Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        loop {
            let read = tokio::select! {
                _ = shutdown.cancelled() => break,
                read = self.read_once() => read,
            };
            match read {
                Ok(_) => backoff.reset(),
                Err(err) => {
                    tracing::warn!(error = %err, "watch reader: reading the streams failed; backing off");
                    if !backoff.wait(&shutdown).await {
                        break;
                    }
                }
            }
        }
        self.close();
        tracing::debug!("watch reader stopped");
    }

    /// Ends every watch and refuses new ones.
    pub fn close(&self) {
        let mut state = self.state();
        state.closed = true;
        for slot in state.watchers.values() {
            slot.end.store(END_SHUTDOWN, Ordering::SeqCst);
        }
        state.watchers.clear();
        state.all.clear();
        state.by_sku.clear();
        gauge!("stockd_watchers").set(0.0);
        drop(state);
        self.inner.stopped.cancel();
    }

    /// One read of every partition from the reader's cursors, fanned out;
    /// returns how many events were read. On a standalone Redis one
    /// `XREAD BLOCK` over every stream; on a cluster, where one command may
    /// not span slots, one non-blocking `XREAD` per partition in one batch,
    /// and a short pause when none had anything.
    ///
    /// Without watchers there is no one to hand events to: the reader then
    /// only moves its cursors to the ends of the streams ([`Self::idle_once`])
    /// instead of reading and decoding every change (measured at about 8 %
    /// of stockd's CPU under load, docs/benchmarks.md).
    pub async fn read_once(&self) -> Result<usize, redis::RedisError> {
        if self.state().watchers.is_empty() {
            self.idle_once().await?;
            return Ok(0);
        }
        let inner = &self.inner;
        let cursors = self.state().cursors.clone();
        let read = |partitions: &[Partition], block: bool| {
            let mut cmd = redis::cmd("XREAD");
            cmd.arg("COUNT").arg(inner.settings.read_count);
            if block {
                cmd.arg("BLOCK")
                    .arg(inner.settings.block.as_millis() as u64);
            }
            cmd.arg("STREAMS");
            for p in partitions {
                cmd.arg(inner.keys.events(*p));
            }
            for p in partitions {
                cmd.arg(cursors[p.index()].to_string());
            }
            cmd
        };
        let partitions: Vec<Partition> = inner.keys.partitions().collect();
        let replies: Vec<Value> = if inner.reader.is_cluster() {
            let mut batch = CommandBatch::new();
            for &p in &partitions {
                batch.cmd(inner.keys.events(p), read(&[p], false));
            }
            let replies = batch.query(&inner.reader).await?;
            if replies.iter().all(|r| *r == Value::Nil) {
                tokio::time::sleep(CLUSTER_POLL).await;
                return Ok(0);
            }
            replies
        } else {
            vec![
                read(&partitions, true)
                    .query_async(&mut inner.reader.clone())
                    .await?,
            ]
        };
        let mut next = cursors.clone();
        let mut events = Vec::new();
        let mut streams = Vec::new();
        for reply in replies {
            streams.extend(events::read_reply(reply)?);
        }
        for (key, entries) in streams {
            let Some(&partition) = inner.partition_of_key.get(&key) else {
                continue;
            };
            for entry in entries {
                let Some(id) = EntryId::parse(&entry.id) else {
                    continue;
                };
                let slot = &mut next[partition.0 as usize];
                *slot = (*slot).max(id);
                match ChangeEvent::parse(partition.0, id, &entry.fields) {
                    Ok(event) => events.push((id, Arc::new(event))),
                    Err(reason) => {
                        tracing::debug!(%partition, entry = %entry.id, %reason, "watch: skipping a malformed entry")
                    }
                }
            }
        }
        // In id order across partitions: a client that resumes from the
        // last id it received misses nothing of the other partitions.
        events.sort_by_key(|(id, e)| (*id, e.partition));
        let events: Vec<Arc<ChangeEvent>> = events.into_iter().map(|(_, e)| e).collect();
        let mut state = self.state();
        state.cursors = next;
        let sent = state.fan_out(&events);
        gauge!("stockd_watchers").set(state.watchers.len() as f64);
        drop(state);
        counter!("stockd_watch_events_read_total").increment(events.len() as u64);
        counter!("stockd_watch_events_sent_total").increment(sent as u64);
        Ok(events.len())
    }

    /// The reader's step while no one watches: moves the cursors to the
    /// streams' ends, then waits for a watcher (or `block`). A watcher
    /// subscribes at the cursors, so they may only jump while there is none:
    /// one that subscribed after the ends were read keeps the older cursors,
    /// and the reader reads on from there.
    async fn idle_once(&self) -> Result<(), redis::RedisError> {
        let arrived = self.inner.watcher_arrived.notified();
        tokio::pin!(arrived);
        // Registered before the check: a subscribe in between still wakes us.
        arrived.as_mut().enable();
        let ends = self.stream_ends().await?;
        {
            let mut state = self.state();
            if !state.watchers.is_empty() {
                return Ok(());
            }
            for (cursor, end) in state.cursors.iter_mut().zip(ends) {
                *cursor = (*cursor).max(end);
            }
        }
        let _ = tokio::time::timeout(self.inner.settings.block, arrived).await;
        Ok(())
    }

    /// Registers a watcher: it receives every matching event after the
    /// returned subscription's `start` positions.
    fn subscribe(&self, filter: &Filter) -> Result<Subscription, Error> {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(self.inner.settings.buffer.max(1));
        let end = Arc::new(AtomicU8::new(END_NONE));
        let mut state = self.state();
        if state.closed {
            return Err(Error::ShuttingDown(
                "the server is shutting down; watch another instance".into(),
            ));
        }
        match filter {
            Filter::All => {
                state.all.insert(id);
            }
            Filter::Skus(skus) => {
                for sku in skus {
                    state.by_sku.entry(sku.clone()).or_default().insert(id);
                }
            }
        }
        state.watchers.insert(
            id,
            Slot {
                tx,
                end: end.clone(),
                filter: filter.clone(),
            },
        );
        gauge!("stockd_watchers").set(state.watchers.len() as f64);
        let start = state.cursors.clone();
        drop(state);
        self.inner.watcher_arrived.notify_one();
        Ok(Subscription {
            hub: self.clone(),
            id,
            rx,
            end,
            start,
        })
    }

    /// Starts a watch of `filter`'s SKUs: the stream answers with the
    /// replay after `from` (when resuming), then live events.
    pub async fn watch(&self, filter: Filter, from: Option<EntryId>) -> Result<EventStream, Error> {
        if self.inner.stopped.is_cancelled() {
            return Err(Error::ShuttingDown(
                "the server is shutting down; watch another instance".into(),
            ));
        }
        let partitions = filter.partitions(&self.inner.keys);
        let start = match from {
            Some(x) => Begin::Resume(self.resume_starts(x, &partitions).await?),
            None => {
                // Subscribed before the answer: every change made after the
                // client got it is in the stream. Events the reader has yet
                // to hand out that are older than this call are skipped.
                let sub = self.subscribe(&filter)?;
                let ends = self.stream_ends_of(&partitions).await?;
                Begin::Live(sub, partitions.iter().copied().zip(ends).collect())
            }
        };
        let (out, rx) = mpsc::channel(OUT_QUEUE);
        let watcher = Watcher {
            hub: self.clone(),
            filter,
            partitions,
            from,
            out,
            consumed: HashMap::new(),
            last_sent: None,
            subscribed_at: Vec::new(),
        };
        tokio::spawn(watcher.run(start));
        Ok(ReceiverStream::new(rx))
    }

    /// Where the replay of each partition starts for a resume from `x`, or
    /// `OUT_OF_RANGE` when entries after `x` may have been trimmed.
    async fn resume_starts(
        &self,
        x: EntryId,
        partitions: &[Partition],
    ) -> Result<Vec<(Partition, Start)>, Error> {
        struct Bounds {
            partition: Partition,
            length: u64,
            added: u64,
            first: Option<EntryId>,
            last: EntryId,
            holds_x: bool,
        }
        let mut conn = self.inner.query.clone();
        let mut bounds = Vec::with_capacity(partitions.len());
        for &p in partitions {
            let (length, added, first, last, hit): (u64, u64, String, String, u64) =
                scripts::STREAM_RANGE
                    .key(self.inner.keys.events(p))
                    .arg(x.to_string())
                    .invoke_async(&mut conn)
                    .await?;
            bounds.push(Bounds {
                partition: p,
                length,
                added,
                first: EntryId::parse(&first),
                last: EntryId::parse(&last).unwrap_or(EntryId::ZERO),
                holds_x: hit > 0,
            });
        }
        let x_retained = bounds.iter().any(|b| b.holds_x);
        // Ids are per partition: several partitions may hold an entry with
        // this very id (changes of one millisecond), and the client got only
        // some of them. Then no partition can be skipped past it.
        let x_unique = bounds.iter().filter(|b| b.holds_x).count() == 1;
        let mut starts = Vec::with_capacity(bounds.len());
        for b in &bounds {
            let trimmed = b.added > b.length;
            let lost = match b.first {
                // Everything was trimmed, including entries after x.
                None => trimmed && b.last > x,
                // Entries between x and the first one kept may have been
                // trimmed. When x itself is still kept somewhere, the
                // streams are trimmed to one horizon, which is then older
                // than x.
                Some(first) => trimmed && first > x && !b.holds_x && !x_retained,
            };
            if lost {
                return Err(Error::OutOfRange(format!(
                    "event {x} is older than the oldest event partition {} still holds; \
                     watch without from_event_id (or from a newer id) and reload current \
                     levels with GetStock",
                    b.partition
                )));
            }
            let start = if b.holds_x && x_unique {
                Start::After(x)
            } else {
                Start::From(x.millisecond_start())
            };
            starts.push((b.partition, start));
        }
        Ok(starts)
    }
}

/// How a watch begins.
enum Begin {
    /// Replay from these positions, then subscribe.
    Resume(Vec<(Partition, Start)>),
    /// Already subscribed; the streams' ends when the watch was accepted.
    Live(Subscription, HashMap<Partition, EntryId>),
}

/// A watcher's registration with the reader; unregisters when dropped.
struct Subscription {
    hub: Hub,
    id: u64,
    rx: mpsc::Receiver<Arc<ChangeEvent>>,
    end: Arc<AtomicU8>,
    /// The reader's position per partition when this subscription started.
    start: Vec<EntryId>,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut state = self.hub.state();
        state.remove(self.id);
        gauge!("stockd_watchers").set(state.watchers.len() as f64);
    }
}

/// Why a watch ended other than by the client.
enum Ended {
    /// The client went away: nothing to say.
    ClientGone,
    Failed {
        error: Error,
        /// The first event that was not sent, when one was dropped.
        first_unsent: Option<EntryId>,
    },
}

impl From<Error> for Ended {
    fn from(error: Error) -> Self {
        Ended::Failed {
            error,
            first_unsent: None,
        }
    }
}

impl From<redis::RedisError> for Ended {
    fn from(err: redis::RedisError) -> Self {
        Error::from(err).into()
    }
}

/// One watch: replay, then live, into the client's stream.
struct Watcher {
    hub: Hub,
    filter: Filter,
    partitions: Vec<Partition>,
    from: Option<EntryId>,
    out: mpsc::Sender<Result<Arc<ChangeEvent>, Interrupted>>,
    /// Per partition, the last entry read from the stream for this watcher
    /// (sent or filtered out).
    consumed: HashMap<Partition, EntryId>,
    /// The last event sent to the client.
    last_sent: Option<EntryId>,
    /// The reader's position per partition when this watch subscribed.
    subscribed_at: Vec<EntryId>,
}

impl Watcher {
    async fn run(mut self, start: Begin) {
        let ended = self.serve(start).await;
        if let Err(Ended::Failed {
            error,
            first_unsent,
        }) = ended
        {
            // The end follows the events already queued for the client,
            // however long it takes the client to read them; only a server
            // shutdown limits the wait.
            let stopped = self.hub.inner.stopped.clone();
            let interrupted = Interrupted {
                error,
                resume_from: self.resume_hint(first_unsent),
            };
            let send = self.out.send(Err(interrupted));
            tokio::pin!(send);
            tokio::select! {
                biased;
                _ = &mut send => return,
                _ = stopped.cancelled() => {}
            }
            let _ = tokio::time::timeout(FINAL_STATUS_WAIT, send).await;
        }
    }

    async fn serve(&mut self, start: Begin) -> Result<(), Ended> {
        let mut sub = match start {
            Begin::Live(sub, ends) => {
                // "Only new events": new since the call, not since the
                // reader's last read, which may be a moment behind.
                self.consumed = ends;
                sub
            }
            Begin::Resume(mut starts) => {
                // What the client had: the reader may hand out entries from
                // before the resume point when its cursors are behind it
                // (an idle reader moves them only now and then).
                self.consumed = starts
                    .iter()
                    .map(|&(p, start)| (p, start.last_excluded()))
                    .collect();
                // Up to the end of the streams, before subscribing: a long
                // replay cannot overflow the live queue.
                self.replay(&mut starts, None).await?;
                let sub = self.hub.subscribe(&self.filter)?;
                // What arrived meanwhile, up to where the subscription starts.
                let upper: HashMap<Partition, EntryId> = self
                    .partitions
                    .iter()
                    .map(|&p| (p, sub.start[p.0 as usize]))
                    .collect();
                self.replay(&mut starts, Some(&upper)).await?;
                sub
            }
        };
        self.subscribed_at = sub.start.clone();
        let stopped = self.hub.inner.stopped.clone();
        loop {
            let event = tokio::select! {
                _ = self.out.closed() => return Err(Ended::ClientGone),
                event = sub.rx.recv() => event,
            };
            let Some(event) = event else {
                return Err(self.ended_by_reader(&sub, &stopped).into());
            };
            if sub.end.load(Ordering::SeqCst) == END_TOO_SLOW {
                // Cut: the queued events are dropped with the queue; the
                // client resumes from the last event it was sent.
                let first_unsent = Some(event.entry_id);
                return Err(Ended::Failed {
                    error: self.too_slow(first_unsent),
                    first_unsent,
                });
            }
            let partition = Partition(event.partition);
            let id = event.entry_id;
            if self.consumed.get(&partition).is_some_and(|&c| c >= id) {
                continue; // replayed already
            }
            self.send(event, id).await?;
        }
    }

    /// The reader closed this watcher's queue (after the queued events).
    fn ended_by_reader(&self, sub: &Subscription, stopped: &CancellationToken) -> Error {
        match sub.end.load(Ordering::SeqCst) {
            END_TOO_SLOW => self.too_slow(None),
            _ if stopped.is_cancelled() => self.shutting_down(),
            _ => Error::ShuttingDown(format!(
                "the watch reader stopped; resume from {}",
                self.resume_hint(None)
            )),
        }
    }

    fn too_slow(&self, first_unsent: Option<EntryId>) -> Error {
        Error::ResourceExhausted(format!(
            "watcher too slow: more than {} events waited for it; resume with from_event_id {}",
            self.hub.inner.settings.buffer,
            self.resume_hint(first_unsent),
        ))
    }

    /// The id a client should resume from: the last event it was sent;
    /// before any, just below the first one it was not sent, or where it
    /// asked to start, or the reader's position when it subscribed.
    fn resume_hint(&self, first_unsent: Option<EntryId>) -> EntryId {
        if let Some(last) = self.last_sent {
            return last;
        }
        if let Some(first) = first_unsent {
            return first.predecessor();
        }
        if let Some(from) = self.from {
            return from;
        }
        self.partitions
            .iter()
            .filter_map(|p| self.subscribed_at.get(p.0 as usize).copied())
            .max()
            .unwrap_or(EntryId::ZERO)
    }

    /// Sends one event, waiting for the client (flow control) unless the
    /// server shuts down meanwhile.
    async fn send(&mut self, event: Arc<ChangeEvent>, id: EntryId) -> Result<(), Ended> {
        self.consumed.insert(Partition(event.partition), id);
        if !self.filter.matches(&event.sku) {
            return Ok(());
        }
        let stopped = self.hub.inner.stopped.clone();
        let sent = tokio::select! {
            sent = self.out.send(Ok(event)) => Some(sent.is_ok()),
            _ = stopped.cancelled() => None,
        };
        match sent {
            Some(true) => {
                self.last_sent = Some(id);
                Ok(())
            }
            Some(false) => Err(Ended::ClientGone),
            None => Err(self.shutting_down().into()),
        }
    }

    fn shutting_down(&self) -> Error {
        Error::ShuttingDown(format!(
            "the server is shutting down; resume from {}",
            self.resume_hint(None)
        ))
    }

    /// Replays the watched partitions from `starts` (moved forward as it
    /// goes) up to `upper` (inclusive; `None`: the current end), merged in
    /// id order.
    async fn replay(
        &mut self,
        starts: &mut [(Partition, Start)],
        upper: Option<&HashMap<Partition, EntryId>>,
    ) -> Result<(), Ended> {
        struct Cursor {
            partition: Partition,
            index: usize,
            buf: VecDeque<(EntryId, Arc<ChangeEvent>)>,
            done: bool,
        }
        let mut cursors: Vec<Cursor> = starts
            .iter()
            .enumerate()
            .map(|(index, &(partition, _))| Cursor {
                partition,
                index,
                buf: VecDeque::new(),
                done: false,
            })
            .collect();
        let stopped = self.hub.inner.stopped.clone();
        let mut conn = self.hub.inner.query.clone();
        loop {
            if stopped.is_cancelled() {
                return Err(self.shutting_down().into());
            }
            for c in cursors.iter_mut().filter(|c| c.buf.is_empty() && !c.done) {
                let start = starts[c.index].1;
                let end = match upper.map(|u| u.get(&c.partition).copied()) {
                    Some(Some(limit)) if !start.admits(limit) => {
                        c.done = true;
                        continue;
                    }
                    Some(Some(limit)) => limit.to_string(),
                    Some(None) => {
                        c.done = true;
                        continue;
                    }
                    None => "+".to_owned(),
                };
                let page: Value = redis::cmd("XRANGE")
                    .arg(self.hub.inner.keys.events(c.partition))
                    .arg(start.xrange_arg())
                    .arg(end)
                    .arg("COUNT")
                    .arg(REPLAY_PAGE)
                    .query_async(&mut conn)
                    .await?;
                let page = events::range_reply(page).map_err(redis::RedisError::from)?;
                c.done = page.len() < REPLAY_PAGE;
                for entry in page {
                    let Some(id) = EntryId::parse(&entry.id) else {
                        continue;
                    };
                    starts[c.index].1 = Start::After(id);
                    match ChangeEvent::parse(c.partition.0, id, &entry.fields) {
                        Ok(event) => c.buf.push_back((id, Arc::new(event))),
                        Err(_) => {
                            self.consumed.insert(c.partition, id);
                        }
                    }
                }
            }
            // The smallest head next; `done` cursors with an empty buffer
            // are finished, the others were just refilled.
            let Some(next) = cursors
                .iter_mut()
                .filter(|c| !c.buf.is_empty())
                .min_by_key(|c| c.buf.front().map(|(id, _)| *id))
            else {
                return Ok(());
            };
            let (id, event) = next.buf.pop_front().expect("not empty");
            self.send(event, id).await?;
        }
    }
}

/// Describes the Watch metrics and registers them at zero.
pub fn describe_metrics() {
    use metrics::{describe_counter, describe_gauge};
    describe_gauge!("stockd_watchers", "Watch streams open on this instance");
    describe_counter!(
        "stockd_watch_events_read_total",
        "events the watch reader read from the partition streams"
    );
    describe_counter!(
        "stockd_watch_events_sent_total",
        "events handed to watchers (one per watcher and event)"
    );
    describe_counter!(
        "stockd_watchers_cut_total",
        "watchers cut off as too slow (RESOURCE_EXHAUSTED)"
    );
    gauge!("stockd_watchers").set(0.0);
    for name in [
        "stockd_watch_events_read_total",
        "stockd_watch_events_sent_total",
        "stockd_watchers_cut_total",
    ] {
        counter!(name).increment(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_admit_after_or_from() {
        let x = EntryId { ms: 5, seq: 1 };
        assert!(!Start::After(x).admits(x));
        assert!(Start::From(x).admits(x));
        assert_eq!(Start::After(x).xrange_arg(), "(5-1");
        assert_eq!(Start::From(x).xrange_arg(), "5-1");
    }

    #[test]
    fn filters_validate_and_name_partitions() {
        let keys = Keyspace::new("t", 16);
        assert_eq!(Filter::parse("skus", vec![]).unwrap(), Filter::All);
        assert_eq!(Filter::All.partitions(&keys).len(), 16);
        let f = Filter::parse("skus", vec!["a".into(), "a".into(), "b".into()]).unwrap();
        assert!(f.matches("a") && !f.matches("c"));
        let mut expected = vec![keys.partition_of("a"), keys.partition_of("b")];
        expected.sort();
        expected.dedup();
        assert_eq!(f.partitions(&keys), expected);
        let err = Filter::parse("skus", vec!["ok".into(), "has space".into()]).unwrap_err();
        assert!(err.to_string().contains("skus[1]"), "{err}");
    }

    #[test]
    fn a_bounded_filter_names_one_to_max_skus() {
        let err = Filter::skus("sku", vec![], 2).unwrap_err();
        assert!(err.to_string().contains("invalid sku"), "{err}");
        let err = Filter::skus("sku", vec!["a".into(), "b".into(), "c".into()], 2).unwrap_err();
        assert!(err.to_string().contains("at most 2"), "{err}");
        assert!(Filter::skus("sku", vec!["a".into(), "b".into()], 2).is_ok());
    }

    #[test]
    fn resume_positions_are_empty_or_entry_ids() {
        assert_eq!(parse_resume("from", "").unwrap(), None);
        assert_eq!(
            parse_resume("from", "7-1").unwrap(),
            Some(EntryId { ms: 7, seq: 1 })
        );
        let err = parse_resume("Last-Event-ID", "7").unwrap_err();
        assert!(err.to_string().contains("Last-Event-ID"), "{err}");
    }

    fn event(sku: &str, id: &str) -> Arc<ChangeEvent> {
        Arc::new(ChangeEvent {
            entry_id: EntryId::parse(id).unwrap(),
            partition: 0,
            sku: sku.into(),
            location: "default".into(),
            op: crate::events::Op::Adjust,
            d_available: 1,
            d_reserved: 0,
            available: 1,
            reserved: 0,
            version: 1,
            reference: "r".into(),
            ts_ms: 0,
            expires_at_ms: None,
            fingerprint: None,
        })
    }

    #[test]
    fn fan_out_filters_and_cuts_a_full_queue() {
        let mut state = State::default();
        let add = |state: &mut State, id: u64, filter: Filter, cap: usize| {
            let (tx, rx) = mpsc::channel(cap);
            let end = Arc::new(AtomicU8::new(END_NONE));
            match &filter {
                Filter::All => {
                    state.all.insert(id);
                }
                Filter::Skus(s) => {
                    for sku in s {
                        state.by_sku.entry(sku.clone()).or_default().insert(id);
                    }
                }
            }
            state.watchers.insert(
                id,
                Slot {
                    tx,
                    end: end.clone(),
                    filter,
                },
            );
            (rx, end)
        };
        let (mut all_rx, all_end) = add(&mut state, 1, Filter::All, 10);
        let only_a = Filter::Skus(["a".to_owned()].into());
        let (mut a_rx, a_end) = add(&mut state, 2, only_a, 1);
        let sent = state.fan_out(&[event("a", "1-0"), event("b", "1-1"), event("a", "1-2")]);
        // 3 to the watcher of all, 1 to the watcher of `a` before it is cut.
        assert_eq!(sent, 4);
        assert_eq!(a_end.load(Ordering::SeqCst), END_TOO_SLOW);
        assert_eq!(all_end.load(Ordering::SeqCst), END_NONE);
        assert!(!state.watchers.contains_key(&2));
        assert!(!state.by_sku.contains_key("a"));
        assert_eq!(a_rx.try_recv().unwrap().entry_id.to_string(), "1-0");
        assert!(matches!(
            a_rx.try_recv(),
            Err(mpsc::error::TryRecvError::Disconnected)
        ));
        let ids: Vec<String> = std::iter::from_fn(|| all_rx.try_recv().ok())
            .map(|e| e.entry_id.to_string())
            .collect();
        assert_eq!(ids, ["1-0", "1-1", "1-2"]);
    }
}
