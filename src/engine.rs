//! The stock engine: every stock operation as one script call in Redis.
//!
//! The engine turns validated requests into the key and argument layout of
//! `scripts/prelude.lua`, runs the script with EVALSHA on a multiplexed
//! connection shared by all requests, and turns the script's reply into a
//! domain result or an [`Error`]. It knows nothing about gRPC.
//!
//! Round trips: Reserve, Decrement, Adjust, SetStock and GetStock take one.
//! Commit, Release and Extend take two: the request carries only the
//! reservation id, and a script must be handed every key it touches, so the
//! engine first reads the reservation's lines from its home record, then runs
//! the script, which re-checks the record's fingerprint so that nothing can
//! change in between unnoticed.

use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::{AsyncCommands, Script};
use serde::Deserialize;

use crate::domain::{Delta, Item, Level, Lines, RequestId, StockLevel, Ttl};
use crate::error::{Error, Shortage};
use crate::keys::{Keyspace, Partition, fnv1a_64};
use crate::scripts;
use crate::warmer::Warmer;

/// Operational settings of the engine.
#[derive(Debug, Clone)]
pub struct EngineSettings {
    /// How long a finished reservation and an idempotency record are kept, so
    /// that a retry within the window replays the first outcome.
    pub idempotency_window: Duration,
}

impl Default for EngineSettings {
    fn default() -> Self {
        Self {
            idempotency_window: Duration::from_secs(24 * 3600),
        }
    }
}

/// A reservation after Reserve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reserved {
    pub expires_at_ms: i64,
    pub levels: Vec<StockLevel>,
    pub replayed: bool,
}

/// The levels after a change (or, when `replayed`, after the first one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Changed {
    pub levels: Vec<StockLevel>,
    pub replayed: bool,
}

/// What the reaper's attempt to expire one reservation did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    /// This call released the hold with op `expire`.
    Expired,
    /// Someone else finished it first, or it was extended: nothing to do.
    NotDue,
    /// The id no longer names a reservation.
    Unknown,
}

/// The end of a held reservation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Finish {
    Commit,
    Release,
    Expire,
}

impl Finish {
    fn op(self) -> &'static str {
        match self {
            Finish::Commit => "commit",
            Finish::Release => "release",
            Finish::Expire => "expire",
        }
    }
}

/// The operations of `scripts/`, against one Redis and one keyspace.
#[derive(Clone)]
pub struct Engine {
    conn: ConnectionManager,
    keys: Keyspace,
    settings: EngineSettings,
    /// Loads misses from Postgres and tells whether this instance serves;
    /// absent when the engine runs without Postgres (tests of the scripts).
    warmer: Option<Warmer>,
}

impl Engine {
    pub fn new(conn: ConnectionManager, keys: Keyspace, settings: EngineSettings) -> Self {
        Self {
            conn,
            keys,
            settings,
            warmer: None,
        }
    }

    /// Loads items a request misses from Postgres through `warmer`, and
    /// refuses requests while the warmer's availability is closed.
    pub fn with_warmer(mut self, warmer: Warmer) -> Self {
        self.warmer = Some(warmer);
        self
    }

    /// UNAVAILABLE while this instance re-warms Redis after a data loss.
    fn ensure_serving(&self) -> Result<(), Error> {
        match &self.warmer {
            Some(w) if !w.availability().is_serving() => Err(Error::Unavailable(
                "re-warming Redis from Postgres after a data loss".into(),
            )),
            _ => Ok(()),
        }
    }

    /// After a script answered `missing`: loads the missing items from
    /// Postgres (once per item, however many requests wait) and says whether
    /// to run the script again. Items Postgres lacks too stay missing.
    async fn load_missing(&self, payload: &str) -> Result<Option<Vec<(String, String)>>, Error> {
        let Some(warmer) = &self.warmer else {
            return Ok(None);
        };
        let missing: Vec<(String, String)> = decode(payload)?;
        let items = missing
            .iter()
            .map(|(sku, location)| Item::parse("", sku.clone(), location.clone()))
            .collect::<Result<Vec<_>, _>>()?;
        let unknown = warmer.load_on_miss(&items).await?;
        Ok(Some(
            unknown
                .into_iter()
                .map(|i| (i.sku.to_string(), i.location.to_string()))
                .collect(),
        ))
    }

    /// Runs a script built by `build`; when it misses items, loads them and
    /// runs it once more. `build(true)` may create items Postgres lacks too
    /// (SetStock); otherwise those are NOT_FOUND.
    async fn call_loading<'s>(
        &self,
        build: impl Fn(bool) -> redis::ScriptInvocation<'s>,
        creates: bool,
    ) -> Result<(String, String), Error> {
        self.ensure_serving()?;
        let (status, payload) = self.call(build(false)).await?;
        if status != "missing" {
            return Ok((status, payload));
        }
        match self.load_missing(&payload).await? {
            // No warmer (tests of the scripts alone): creating is allowed.
            None if creates => self.call(build(true)).await,
            None => Ok((status, payload)),
            Some(unknown) if unknown.is_empty() || creates => self.call(build(true)).await,
            Some(unknown) => Ok((
                "missing".into(),
                serde_json::to_string(&unknown).expect("serialise"),
            )),
        }
    }

    pub fn keys(&self) -> &Keyspace {
        &self.keys
    }

    pub async fn reserve(
        &self,
        id: &RequestId,
        lines: &Lines,
        ttl: Ttl,
    ) -> Result<Reserved, Error> {
        let fp = fingerprint(
            "reserve",
            &[&ttl.as_millis().to_string()],
            lines_for_fingerprint(lines),
        );
        let lines: Vec<ScriptLine> = lines
            .iter()
            .map(|l| ScriptLine::new(&l.item, l.quantity.get()))
            .collect();
        let home = self
            .keys
            .reservation(self.keys.partition_of(id.as_str()), id.as_str());
        let ttl_ms = ttl.as_millis().to_string();
        let (status, payload) = self
            .call_loading(
                |_| {
                    self.reservation_layout(
                        &scripts::RESERVE,
                        home.clone(),
                        id.as_str(),
                        &fp,
                        &ttl_ms,
                        "",
                        &lines,
                    )
                },
                false,
            )
            .await?;
        let (out, replayed) = interpret(&status, &payload, id)?;
        let out: Outcome = decode(&out)?;
        Ok(Reserved {
            expires_at_ms: out
                .exp
                .ok_or_else(|| Error::Internal("reserve reply without exp".into()))?,
            levels: out.levels(),
            replayed,
        })
    }

    pub async fn commit(&self, id: &RequestId) -> Result<Changed, Error> {
        self.finish(id, Finish::Commit).await
    }

    pub async fn release(&self, id: &RequestId) -> Result<Changed, Error> {
        self.finish(id, Finish::Release).await
    }

    /// Expires the reservation if its hold has lapsed (the reaper's call).
    pub async fn expire(&self, id: &RequestId) -> Result<Expiry, Error> {
        match self.finish(id, Finish::Expire).await {
            Ok(_) => Ok(Expiry::Expired),
            Err(Error::NotFound(_)) => Ok(Expiry::Unknown),
            Err(Error::FailedPrecondition(_)) => Ok(Expiry::NotDue),
            Err(other) => Err(other),
        }
    }

    pub async fn extend(&self, id: &RequestId, ttl: Ttl) -> Result<i64, Error> {
        self.ensure_serving()?;
        let held = self.lookup(id).await?;
        let invocation = self.reservation_layout(
            &scripts::EXTEND,
            held.home,
            id.as_str(),
            &held.fingerprint,
            &ttl.as_millis().to_string(),
            "",
            &held.lines,
        );
        let (status, payload) = self.call(invocation).await?;
        let (out, _) = interpret(&status, &payload, id)?;
        out.parse()
            .map_err(|_| Error::Internal(format!("extend reply {out:?} is not a time")))
    }

    pub async fn decrement(&self, id: &RequestId, lines: &Lines) -> Result<Changed, Error> {
        let fp = fingerprint("decrement", &[], lines_for_fingerprint(lines));
        let lines: Vec<ScriptLine> = lines
            .iter()
            .map(|l| ScriptLine::new(&l.item, -l.quantity.get()))
            .collect();
        self.apply(id, &fp, "decrement", &lines).await
    }

    pub async fn adjust(
        &self,
        id: &RequestId,
        item: &Item,
        delta: Delta,
        reason: &str,
    ) -> Result<Changed, Error> {
        let delta_text = delta.get().to_string();
        let fp = fingerprint(
            "adjust",
            &[
                item.sku.as_str(),
                item.location.as_str(),
                &delta_text,
                reason,
            ],
            Vec::new(),
        );
        self.apply(id, &fp, "adjust", &[ScriptLine::new(item, delta.get())])
            .await
    }

    pub async fn set(
        &self,
        id: &RequestId,
        item: &Item,
        available: Level,
        expected_version: Option<i64>,
    ) -> Result<Changed, Error> {
        let expected = expected_version.map(|v| v.to_string()).unwrap_or_default();
        let target = available.get().to_string();
        let fp = fingerprint(
            "set",
            &[
                item.sku.as_str(),
                item.location.as_str(),
                &target,
                &expected,
            ],
            Vec::new(),
        );
        let line = [ScriptLine::new(item, available.get())];
        let window = self.window_ms();
        let (status, payload) = self
            .call_loading(
                |create| {
                    let mut invocation = self.line_layout(
                        &scripts::SET,
                        self.keys.idempotency(id.as_str()),
                        id.as_str(),
                        &fp,
                        &expected,
                        &window,
                        &line,
                        |p| vec![self.keys.events(p), self.keys.backlog_gate(p)],
                    );
                    invocation.arg(if create { "create" } else { "" });
                    invocation
                },
                true,
            )
            .await?;
        if status == "version" {
            return Err(Error::VersionMismatch {
                expected: expected_version.unwrap_or_default(),
                current: payload.parse().unwrap_or_default(),
            });
        }
        changed(interpret(&status, &payload, id)?)
    }

    /// Reads the levels of `items`; items Redis lacks come back in `missing`.
    /// One pipelined round trip.
    pub async fn get(&self, items: &[Item]) -> Result<(Vec<StockLevel>, Vec<Item>), Error> {
        self.ensure_serving()?;
        let (mut levels, missing) = self.read(items).await?;
        let Some(warmer) = self.warmer.as_ref().filter(|_| !missing.is_empty()) else {
            return Ok((levels, missing));
        };
        let unknown = warmer.load_on_miss(&missing).await?;
        let loaded: Vec<Item> = missing
            .into_iter()
            .filter(|i| !unknown.contains(i))
            .collect();
        let (more, _) = self.read(&loaded).await?;
        levels.extend(more);
        Ok((levels, unknown))
    }

    async fn read(&self, items: &[Item]) -> Result<(Vec<StockLevel>, Vec<Item>), Error> {
        if items.is_empty() {
            return Ok((Vec::new(), Vec::new()));
        }
        let mut pipe = redis::pipe();
        for item in items {
            pipe.cmd("HMGET")
                .arg(self.keys.stock(item.sku.as_str(), item.location.as_str()))
                .arg(&["avail", "resv", "ver"]);
        }
        let mut conn = self.conn.clone();
        let rows: Vec<(Option<i64>, Option<i64>, Option<i64>)> =
            pipe.query_async(&mut conn).await?;
        let mut levels = Vec::new();
        let mut missing = Vec::new();
        for (item, row) in items.iter().zip(rows) {
            match row {
                (Some(available), Some(reserved), Some(version)) => levels.push(StockLevel {
                    sku: item.sku.to_string(),
                    location: item.location.to_string(),
                    available,
                    reserved,
                    version,
                }),
                _ => missing.push(item.clone()),
            }
        }
        Ok((levels, missing))
    }

    /// Ids of `partition`'s reservations whose hold has lapsed, at most `limit`.
    pub async fn due_reservations(
        &self,
        partition: Partition,
        limit: usize,
    ) -> Result<Vec<String>, Error> {
        let mut invocation = scripts::DUE.prepare_invoke();
        invocation
            .key(self.keys.reservation_expiry(partition))
            .arg("")
            .arg("")
            .arg(limit);
        let mut conn = self.conn.clone();
        Ok(invocation.invoke_async(&mut conn).await?)
    }

    /// Drops an id from a partition's expiry index when it names no
    /// reservation any more (so the reaper does not look at it again).
    pub async fn forget_expiry(&self, partition: Partition, id: &str) -> Result<(), Error> {
        let mut conn = self.conn.clone();
        let _: i64 = conn
            .zrem(self.keys.reservation_expiry(partition), id)
            .await?;
        Ok(())
    }

    async fn finish(&self, id: &RequestId, how: Finish) -> Result<Changed, Error> {
        self.ensure_serving()?;
        let held = self.lookup(id).await?;
        let invocation = self.reservation_layout(
            &scripts::FINISH,
            held.home,
            id.as_str(),
            &held.fingerprint,
            how.op(),
            &self.window_ms(),
            &held.lines,
        );
        let (status, payload) = self.call(invocation).await?;
        if status == "noop" {
            return Err(Error::FailedPrecondition(format!(
                "reservation {id} is {payload}"
            )));
        }
        changed(interpret(&status, &payload, id)?)
    }

    async fn apply(
        &self,
        id: &RequestId,
        fp: &str,
        op: &str,
        lines: &[ScriptLine],
    ) -> Result<Changed, Error> {
        let window = self.window_ms();
        let (status, payload) = self
            .call_loading(
                |_| {
                    self.line_layout(
                        &scripts::APPLY,
                        self.keys.idempotency(id.as_str()),
                        id.as_str(),
                        fp,
                        op,
                        &window,
                        lines,
                        |p| vec![self.keys.events(p), self.keys.backlog_gate(p)],
                    )
                },
                false,
            )
            .await?;
        changed(interpret(&status, &payload, id)?)
    }

    /// Reads what the reservation scripts need to know before they can name
    /// their keys: the reservation's lines and fingerprint.
    async fn lookup(&self, id: &RequestId) -> Result<Held, Error> {
        let home = self
            .keys
            .reservation(self.keys.partition_of(id.as_str()), id.as_str());
        let mut conn = self.conn.clone();
        let (fingerprint, all): (Option<String>, Option<String>) = redis::cmd("HMGET")
            .arg(&home)
            .arg(&["fp", "all"])
            .query_async(&mut conn)
            .await?;
        let (Some(fingerprint), Some(all)) = (fingerprint, all) else {
            return Err(unknown_reservation(id));
        };
        let all: Vec<(String, String, i64)> = decode(&all)?;
        let lines = all
            .into_iter()
            .map(|(sku, location, quantity)| ScriptLine {
                sku,
                location,
                amount: quantity,
            })
            .collect();
        Ok(Held {
            home,
            fingerprint,
            lines,
        })
    }

    /// The layout of reserve/finish/extend: groups of (resv, rexp, events, gate).
    #[allow(clippy::too_many_arguments)]
    fn reservation_layout<'s>(
        &self,
        script: &'s Script,
        home: String,
        id: &str,
        fp: &str,
        param: &str,
        param2: &str,
        lines: &[ScriptLine],
    ) -> redis::ScriptInvocation<'s> {
        self.line_layout(script, home, id, fp, param, param2, lines, |p| {
            vec![
                self.keys.reservation(p, id),
                self.keys.reservation_expiry(p),
                self.keys.events(p),
                self.keys.backlog_gate(p),
            ]
        })
    }

    /// Builds the standard layout of `scripts/prelude.lua`: the request's own
    /// key, the keys of each partition group, then each line's stock key.
    #[allow(clippy::too_many_arguments)]
    fn line_layout<'s>(
        &self,
        script: &'s Script,
        own_key: String,
        id: &str,
        fp: &str,
        param: &str,
        param2: &str,
        lines: &[ScriptLine],
        group_keys: impl Fn(Partition) -> Vec<String>,
    ) -> redis::ScriptInvocation<'s> {
        // Partitions in order of first appearance; at most 100 lines, so a
        // linear search beats hashing.
        let mut groups: Vec<Partition> = Vec::new();
        let mut group_of = Vec::with_capacity(lines.len());
        for line in lines {
            let p = self.keys.partition_of(&line.sku);
            let j = match groups.iter().position(|g| *g == p) {
                Some(j) => j,
                None => {
                    groups.push(p);
                    groups.len() - 1
                }
            };
            group_of.push(j + 1);
        }
        let mut invocation = script.prepare_invoke();
        invocation.key(own_key);
        for p in &groups {
            for key in group_keys(*p) {
                invocation.key(key);
            }
        }
        for line in lines {
            invocation.key(self.keys.stock(&line.sku, &line.location));
        }
        invocation
            .arg(id)
            .arg(fp)
            .arg(param)
            .arg(groups.len())
            .arg(lines.len())
            .arg(param2);
        for (line, j) in lines.iter().zip(group_of) {
            invocation
                .arg(&line.sku)
                .arg(&line.location)
                .arg(line.amount)
                .arg(j);
        }
        invocation
    }

    async fn call(
        &self,
        invocation: redis::ScriptInvocation<'_>,
    ) -> Result<(String, String), Error> {
        let mut conn = self.conn.clone();
        Ok(invocation.invoke_async(&mut conn).await?)
    }

    fn window_ms(&self) -> String {
        self.settings.idempotency_window.as_millis().to_string()
    }
}

/// A reservation as its home record describes it.
struct Held {
    home: String,
    fingerprint: String,
    lines: Vec<ScriptLine>,
}

/// One line as a script receives it: `amount` is a quantity or a signed delta.
struct ScriptLine {
    sku: String,
    location: String,
    amount: i64,
}

impl ScriptLine {
    fn new(item: &Item, amount: i64) -> Self {
        Self {
            sku: item.sku.to_string(),
            location: item.location.to_string(),
            amount,
        }
    }
}

/// The JSON a script stores as a request's outcome.
#[derive(Deserialize)]
struct Outcome {
    exp: Option<i64>,
    levels: Vec<(String, String, i64, i64, i64)>,
}

impl Outcome {
    fn levels(self) -> Vec<StockLevel> {
        self.levels
            .into_iter()
            .map(|(sku, location, available, reserved, version)| StockLevel {
                sku,
                location,
                available,
                reserved,
                version,
            })
            .collect()
    }
}

fn decode<'a, T: Deserialize<'a>>(json: &'a str) -> Result<T, Error> {
    serde_json::from_str(json)
        .map_err(|e| Error::Internal(format!("undecodable script reply {json:?}: {e}")))
}

fn changed((out, replayed): (String, bool)) -> Result<Changed, Error> {
    let out: Outcome = decode(&out)?;
    Ok(Changed {
        levels: out.levels(),
        replayed,
    })
}

fn unknown_reservation(id: &RequestId) -> Error {
    Error::NotFound(format!("unknown reservation {id}"))
}

/// Maps a script's `{status, payload}` reply to the outcome JSON and whether
/// it is a replay, or to the error the status stands for.
fn interpret(status: &str, payload: &str, id: &RequestId) -> Result<(String, bool), Error> {
    match status {
        "ok" => Ok((payload.to_owned(), false)),
        "replay" => Ok((payload.to_owned(), true)),
        "exists" => Err(Error::AlreadyExists(format!(
            "id {id} was already used for a different request"
        ))),
        "missing" => {
            let items: Vec<(String, String)> = decode(payload)?;
            let names: Vec<String> = items.iter().map(|(s, l)| format!("{l}/{s}")).collect();
            Err(Error::NotFound(format!(
                "unknown item(s): {}",
                names.join(", ")
            )))
        }
        "short" => {
            let lines: Vec<(String, String, i64, i64)> = decode(payload)?;
            Err(Error::InsufficientStock(
                lines
                    .into_iter()
                    .map(|(sku, location, requested, available)| Shortage {
                        sku,
                        location,
                        requested,
                        available,
                    })
                    .collect(),
            ))
        }
        "unknown" => Err(unknown_reservation(id)),
        "backlog" => Err(Error::Backlogged(payload.to_owned())),
        "state" | "noop" => Err(Error::FailedPrecondition(format!(
            "reservation {id} is {payload}"
        ))),
        "corrupt" => Err(Error::Internal(format!(
            "stock does not match reservation: {payload}"
        ))),
        other => Err(Error::Internal(format!(
            "unexpected script status {other:?}"
        ))),
    }
}

/// Lines in canonical order, so that the same lines in another order are the
/// same request.
fn lines_for_fingerprint(lines: &Lines) -> Vec<String> {
    let mut parts: Vec<String> = lines
        .iter()
        .map(|l| {
            format!(
                "{}\u{1f}{}\u{1f}{}",
                l.item.sku,
                l.item.location,
                l.quantity.get()
            )
        })
        .collect();
    parts.sort_unstable();
    parts
}

/// A stable digest of a request's payload, stored with its outcome so that a
/// retry can be told apart from a different request under the same id.
fn fingerprint(op: &str, fields: &[&str], lines: Vec<String>) -> String {
    let mut text = String::from(op);
    for part in fields
        .iter()
        .copied()
        .chain(lines.iter().map(String::as_str))
    {
        text.push('\u{1e}');
        text.push_str(part);
    }
    format!("{:016x}", fnv1a_64(text.as_bytes()))
}
