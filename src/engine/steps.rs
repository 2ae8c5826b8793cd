//! Requests that span partitions on a Redis Cluster, where no script may
//! touch two partitions (DESIGN.md, "Cluster mode").
//!
//! Such a request becomes per-partition steps coordinated by a record in
//! the request id's own partition (`scripts/coordinate.lua`), the one place
//! where its fate is decided with a compare-and-set:
//!
//! - **Reserve**: `begin` (the coordinator is created pending, or found:
//!   a retry continues or replays), then each partition's part is held
//!   (`reserve.lua` with flag `P<coordinator>`, concurrently), then
//!   `decide`: held when every part was, refused otherwise. Parts follow
//!   the decision, never the other way round: after a refusal the parts
//!   that were held are released, after a decision someone else took
//!   (a concurrent retry) they are left as that decision wants them.
//! - **Commit, Release, expiry**: the coordinator moves first (judging
//!   expiry by its own clock), then each part applies the same op
//!   (`finish.lua` in part mode), then the outcome is stored (`fin`). A
//!   retry after a crash in between finds the decision and finishes it.
//! - **Decrement**: an internal reservation of the lines (id `decrement
//!   <attempt> <request id>`, which no client id can be: ids hold no
//!   spaces) committed at once, coordinated by the request's own record;
//!   its events are `reserve` and `commit` with that reference.
//! - **A crash midway** leaves parts whose provisional expiry comes soon
//!   ([`PROVISIONAL`]): the reaper then asks the coordinator
//!   ([`Engine::expire_part`]) — a decided reservation's part is re-dated
//!   to the real expiry or finished as decided; a request still pending
//!   long after its start is aborted and its parts released. So stock is
//!   never left taken: the client's retry finishes the request, or the
//!   parts' expiry undoes it.

use std::time::Duration;

use futures::future::join_all;
use serde_json::json;

use super::located::Located;
use super::plan::{Kind, Plan};
use super::{Engine, Expiry, Finish, Mode, now_ms};
use crate::error::Error;
use crate::keys::Partition;
use crate::redis_conn::CommandBatch;
use crate::scripts::{self, Outcome, ScriptLine, StoredOutcome};

/// How long a part is held before the reaper asks its coordinator what
/// became of the request; also how old a pending request must be before
/// the reaper aborts it.
pub(crate) const PROVISIONAL: Duration = Duration::from_secs(30);
/// How long the internal hold of a decrement spanning partitions may live
/// between its reserve and its commit.
const INTERNAL_HOLD: Duration = Duration::from_secs(300);
/// Attempts of a decrement spanning partitions whose internal hold lapsed.
const DECREMENT_ATTEMPTS: u32 = 3;

/// A coordinator's reply, as words.
type Words = Vec<String>;

impl Engine {
    /// Whether requests spanning partitions go through coordinated steps.
    pub(super) fn coordinates(&self, plan: &Plan) -> bool {
        self.inner.conn.is_cluster() && plan.parts.len() > 1
    }

    /// Runs one verb of `coordinate.lua` on `kind`'s record of `id`.
    async fn coordinate(
        &self,
        kind: Kind,
        id: &str,
        fp: &str,
        verb: &str,
        args: &[String],
        checked: bool,
    ) -> Result<Words, Error> {
        let keys = &self.inner.keys;
        let home = keys.partition_of(id);
        let (h1, h2) = scripts::bloom_hashes(id);
        let mut inv = scripts::COORDINATE.prepare_invoke();
        inv.key(kind.record(keys, home, id))
            .key(keys.marker(home))
            .key(keys.seen(home))
            .arg(id)
            .arg(fp)
            .arg(verb)
            .arg(if checked { "C" } else { "" })
            .arg(h1)
            .arg(h2);
        for arg in args {
            inv.arg(arg);
        }
        let words: Words = inv.invoke_async(&mut self.conn()).await?;
        match words.first().map(String::as_str) {
            Some("lost") => Err(self.partition_refused(
                scripts::Refusal::Lost,
                words.get(1).map_or("", String::as_str),
            )),
            Some("healing") => Err(self.partition_refused(
                scripts::Refusal::Healing,
                words.get(1).map_or("", String::as_str),
            )),
            Some(_) => Ok(words),
            None => Err(Error::Internal(format!(
                "coordinate.lua {verb}: empty reply"
            ))),
        }
    }

    /// Before anything is written: every item known (loaded from Postgres
    /// when Redis lacks it) and holding the quantity. So a request refused
    /// for an unknown item changes nothing, and one refused for short stock
    /// only stores its refusal — no part is held and given back — unless
    /// the stock moved between this look and the parts.
    async fn precheck(&self, plan: &Plan) -> Result<Option<Outcome>, Error> {
        let keys = &self.inner.keys;
        let mut loaded = false;
        loop {
            let mut batch = CommandBatch::new();
            for (line, _) in &plan.lines {
                let key = keys.stock(&line.sku, &line.location);
                let mut read = redis::cmd("HGET");
                read.arg(&key).arg("avail");
                batch.cmd(key, read);
            }
            let mut missing = Vec::new();
            let mut short = Vec::new();
            for ((line, _), reply) in plan.lines.iter().zip(batch.query(&self.inner.conn).await?) {
                let available: Option<i64> = redis::from_redis_value(reply)
                    .map_err(|e| Error::Internal(format!("stock level: {e}")))?;
                match available {
                    None => missing.push((line.sku.clone(), line.location.clone())),
                    Some(a) if a < line.amount => {
                        short.push((line.sku.clone(), line.location.clone(), line.amount, a));
                    }
                    Some(_) => {}
                }
            }
            if !missing.is_empty() {
                if loaded {
                    return Ok(Some(Outcome::Missing(missing)));
                }
                loaded = true;
                match self.load_missing(&missing).await? {
                    Some(unknown) if !unknown.is_empty() => {
                        return Ok(Some(Outcome::Missing(unknown)));
                    }
                    None => return Ok(Some(Outcome::Missing(missing))),
                    Some(_) => continue,
                }
            }
            return Ok((!short.is_empty()).then_some(Outcome::Short(short)));
        }
    }

    /// Reserve across partitions: begin, hold every part, decide.
    pub(super) async fn reserve_across(
        &self,
        plan: &Plan,
        fp: &str,
        ttl: Duration,
    ) -> Result<Outcome, Error> {
        let window = self.window_ms();
        let all = all_lines(plan);
        let parts = parts_text(&plan.parts);
        let precheck = self.precheck(plan).await?;
        if let Some(missing @ Outcome::Missing(_)) = precheck {
            return Ok(missing);
        }
        let mut checked = false;
        loop {
            let words = self
                .coordinate(
                    Kind::Reservation,
                    &plan.id,
                    fp,
                    "begin",
                    &[parts.clone(), all.clone(), window.clone()],
                    checked,
                )
                .await?;
            match word(&words, 0) {
                "exists" => return Ok(Outcome::Exists),
                "refused" => return stored_refusal(word(&words, 1), word(&words, 2)),
                "decided" => {
                    return Ok(match word(&words, 1) {
                        "aborted" => Outcome::State("aborted".into()),
                        _ => Outcome::Applied {
                            out: word(&words, 2).to_owned(),
                            replayed: true,
                        },
                    });
                }
                "check" if !checked => {
                    self.recall_reservation(&plan.id).await?;
                    checked = true;
                }
                "new" | "pending" => break,
                other => {
                    return Err(Error::Internal(format!("coordinate begin: {other:?}")));
                }
            }
        }
        if let Some(short) = precheck {
            // Refused before any part was held: only the refusal is stored.
            let words = self
                .coordinate(
                    Kind::Reservation,
                    &plan.id,
                    fp,
                    "decide",
                    &["refused".into(), refusal_text(&short), window],
                    true,
                )
                .await?;
            return self.follow_decision(plan, fp, &words, true, false).await;
        }

        let coordinator = plan.home;
        let provisional = PROVISIONAL.min(ttl).as_millis().to_string();
        let held = join_all(plan.parts.iter().map(|&p| {
            let provisional = provisional.clone();
            let window = window.clone();
            async move {
                let part = self.part_plan(plan, p);
                let groups = part.reservation_groups(&self.inner.keys, &self.inner.markers);
                let held = self
                    .run(
                        &scripts::RESERVE,
                        &part,
                        fp,
                        &groups,
                        Mode::part_of(coordinator),
                        [provisional, window],
                    )
                    .await;
                if matches!(held, Ok(Outcome::Applied { .. })) {
                    crate::failpoint::hit("after-first-part");
                }
                held
            }
        }))
        .await;

        let mut levels = Vec::new();
        let mut refusal = None;
        let mut failure = None;
        for result in &held {
            match result {
                Ok(Outcome::Applied { out, .. }) => {
                    let out = StoredOutcome::parse(out)
                        .map_err(|e| Error::Internal(format!("part reserve: {e}")))?;
                    levels.extend(out.levels);
                }
                Ok(other) => refusal = refusal.or(Some(other.clone())),
                Err(e) => failure = failure.or(Some(e.to_string())),
            }
        }
        if let Some(detail) = failure {
            // Undecided: the coordinator stays pending; a retry continues,
            // or the parts' provisional expiry undoes what was held.
            return Err(Error::Unavailable(format!(
                "reservation {} spans partitions and one of them failed: {detail}",
                plan.id
            )));
        }
        match refusal {
            None => {
                sort_levels(&mut levels, plan);
                let out = json!({ "exp": "%EXP%", "levels": levels }).to_string();
                let words = self
                    .coordinate(
                        Kind::Reservation,
                        &plan.id,
                        fp,
                        "decide",
                        &["held".into(), out, window, ttl.as_millis().to_string()],
                        true,
                    )
                    .await?;
                self.follow_decision(plan, fp, &words, false, true).await
            }
            Some(Outcome::Missing(items)) => {
                // Not an outcome (the item may be created): release what
                // was held and leave the request undecided.
                self.release_parts(plan, fp, Finish::Release).await?;
                Ok(Outcome::Missing(items))
            }
            Some(refused) => {
                let words = self
                    .coordinate(
                        Kind::Reservation,
                        &plan.id,
                        fp,
                        "decide",
                        &["refused".into(), refusal_text(&refused), window],
                        true,
                    )
                    .await?;
                self.follow_decision(plan, fp, &words, true, true).await
            }
        }
    }

    /// After `decide`: when the decision is a refusal (ours or a concurrent
    /// attempt's), the parts held (`held_parts`: this attempt held some) are
    /// released; a hold decided by anyone stands.
    async fn follow_decision(
        &self,
        plan: &Plan,
        fp: &str,
        words: &Words,
        we_refused: bool,
        held_parts: bool,
    ) -> Result<Outcome, Error> {
        let (state, why, out, ours) = match word(words, 0) {
            "ok" if we_refused => {
                let (why, detail) = word(words, 1).split_once(' ').unwrap_or(("short", ""));
                ("refused", why, detail, true)
            }
            "ok" => ("held", "", word(words, 1), true),
            "refused" => ("refused", word(words, 1), word(words, 2), false),
            "decided" => (word(words, 1), "", word(words, 2), false),
            other => return Err(Error::Internal(format!("coordinate decide: {other:?}"))),
        };
        if state == "held" {
            if ours && let Ok(StoredOutcome { exp: Some(exp), .. }) = StoredOutcome::parse(out) {
                // The parts wait for the real expiry, not their provisional
                // one (the reaper would re-date them too, later).
                let engine = self.clone();
                let parts: Vec<Partition> = plan.parts.clone();
                let id = plan.id.clone();
                tokio::spawn(async move {
                    if let Err(err) = engine.redate_parts(&id, &parts, exp).await {
                        tracing::debug!(reservation = %id, error = %err, "re-dating parts later");
                    }
                });
            }
            return Ok(Outcome::Applied {
                out: out.to_owned(),
                replayed: !ours,
            });
        }
        // A concurrent attempt may hold parts even when this one held none.
        if held_parts || !ours {
            self.release_parts(plan, fp, Finish::Release).await?;
        }
        if state == "refused" {
            return stored_refusal(why, out);
        }
        Ok(Outcome::State(state.to_owned()))
    }

    /// Finishes every part as `how` (idempotent: a part already finished
    /// that way replays); returns their levels in the plan's line order.
    async fn finish_parts(
        &self,
        plan: &Plan,
        fp: &str,
        how: Finish,
    ) -> Result<Vec<(String, String, i64, i64, i64)>, Error> {
        let window = self.window_ms();
        let coordinator = plan.home;
        let results = join_all(plan.parts.iter().map(|&p| {
            let window = window.clone();
            async move {
                let part = self.part_plan(plan, p);
                let groups = part.reservation_groups(&self.inner.keys, &self.inner.markers);
                self.run(
                    &scripts::FINISH,
                    &part,
                    fp,
                    &groups,
                    Mode::part_of(coordinator),
                    [how.op().to_owned(), window],
                )
                .await
            }
        }))
        .await;
        let mut levels = Vec::new();
        for result in results {
            match result? {
                Outcome::Applied { out, .. } => {
                    levels.extend(
                        StoredOutcome::parse(&out)
                            .map_err(|e| Error::Internal(format!("part finish: {e}")))?
                            .levels,
                    );
                }
                // A part never held (its reserve failed or was refused).
                Outcome::Unknown => {}
                Outcome::State(state) => {
                    return Err(Error::Internal(format!(
                        "reservation {}: a part is {state}, the coordinator says {}",
                        plan.id,
                        how.op()
                    )));
                }
                other => {
                    return Err(Error::Internal(format!(
                        "reservation {}: finishing a part answered {other:?}",
                        plan.id
                    )));
                }
            }
        }
        sort_levels(&mut levels, plan);
        Ok(levels)
    }

    /// Gives back the parts a refused (or undecided) request holds.
    async fn release_parts(&self, plan: &Plan, fp: &str, how: Finish) -> Result<(), Error> {
        self.finish_parts(plan, fp, how).await.map(|_| ())
    }

    /// Commit or Release of a reservation spanning partitions: the
    /// coordinator moves, then every part, then the outcome is stored.
    pub(super) async fn finish_across(
        &self,
        plan: &Plan,
        fp: &str,
        how: Finish,
    ) -> Result<Outcome, Error> {
        let words = self
            .coordinate(
                Kind::Reservation,
                &plan.id,
                fp,
                "finish",
                &[how.op().to_owned()],
                true,
            )
            .await?;
        let (final_state, replayed) = match word(&words, 0) {
            "ok" => (word(&words, 1), false),
            "replay" if !word(&words, 2).is_empty() => {
                return Ok(Outcome::Applied {
                    out: word(&words, 2).to_owned(),
                    replayed: true,
                });
            }
            // Decided, but the parts or the outcome were not finished
            // (a crash in between): finish them now.
            "replay" => (word(&words, 1), true),
            "state" => return Ok(Outcome::State(word(&words, 1).to_owned())),
            "unknown" => return Ok(Outcome::Unknown),
            other => return Err(Error::Internal(format!("coordinate finish: {other:?}"))),
        };
        let applied = match final_state {
            "committed" => Finish::Commit,
            "released" => Finish::Release,
            _ => Finish::Expire,
        };
        let levels = self.finish_parts(plan, fp, applied).await?;
        let out = json!({ "levels": levels }).to_string();
        self.coordinate(
            Kind::Reservation,
            &plan.id,
            fp,
            "fin",
            &[out.clone(), self.window_ms()],
            true,
        )
        .await?;
        // A release that found the hold lapsed is the expiry it is: the
        // client learns its units are back, as a replay.
        let lapsed = how == Finish::Release && applied == Finish::Expire;
        Ok(Outcome::Applied {
            out,
            replayed: replayed || lapsed,
        })
    }

    /// Extend of a reservation spanning partitions: only the coordinator's
    /// expiry moves; the reaper re-dates each part when it comes due.
    pub(super) async fn extend_across(
        &self,
        plan: &Plan,
        fp: &str,
        ttl: Duration,
    ) -> Result<Outcome, Error> {
        let words = self
            .coordinate(
                Kind::Reservation,
                &plan.id,
                fp,
                "extend",
                &[ttl.as_millis().to_string()],
                true,
            )
            .await?;
        Ok(match word(&words, 0) {
            "ok" => {
                let exp: i64 = word(&words, 1)
                    .parse()
                    .map_err(|_| Error::Internal(format!("extend: {words:?}")))?;
                self.redate_parts(&plan.id, &plan.parts, exp).await?;
                Outcome::Applied {
                    out: exp.to_string(),
                    replayed: false,
                }
            }
            "state" => Outcome::State(word(&words, 1).to_owned()),
            _ => Outcome::Unknown,
        })
    }

    /// Every held part's expiry entry moves to `exp`, the coordinator's:
    /// one batch (`XX`: a part finished meanwhile is not put back). A part
    /// record's own `exp` is left as it was: parts never judge expiry, the
    /// coordinator does.
    async fn redate_parts(&self, id: &str, parts: &[Partition], exp: i64) -> Result<(), Error> {
        let keys = &self.inner.keys;
        let mut batch = CommandBatch::new();
        for &p in parts {
            let index = keys.reservation_expiry(p);
            let mut date = redis::cmd("ZADD");
            date.arg(&index).arg("XX").arg(exp).arg(id);
            batch.cmd(index, date);
        }
        batch.query(&self.inner.conn).await?;
        Ok(())
    }

    /// Decrement across partitions: an internal hold of the lines,
    /// committed at once, coordinated by the request's own record.
    pub(super) async fn decrement_across(&self, plan: &Plan, fp: &str) -> Result<Outcome, Error> {
        let window = self.window_ms();
        let all = all_lines(plan);
        let parts = parts_text(&plan.parts);
        // The quantities, positive: the internal hold takes them.
        let lines: Vec<ScriptLine> = plan
            .lines
            .iter()
            .map(|(l, _)| ScriptLine {
                amount: -l.amount,
                ..l.clone()
            })
            .collect();
        // An unknown item is no outcome: nothing may be stored for the id.
        let probe = Plan::new(&self.inner.keys, Kind::Reservation, &plan.id, lines.clone());
        if let Some(missing @ Outcome::Missing(_)) = self.precheck(&probe).await? {
            return Ok(missing);
        }
        let mut checked = false;
        let mut attempt: u32 = loop {
            let words = self
                .coordinate(
                    Kind::Request,
                    &plan.id,
                    fp,
                    "begin",
                    &[parts.clone(), all.clone(), window.clone()],
                    checked,
                )
                .await?;
            match word(&words, 0) {
                "exists" => return Ok(Outcome::Exists),
                "refused" => return stored_refusal(word(&words, 1), word(&words, 2)),
                "decided" => {
                    return Ok(Outcome::Applied {
                        out: word(&words, 2).to_owned(),
                        replayed: true,
                    });
                }
                "check" if !checked => {
                    self.recall(plan).await?;
                    checked = true;
                }
                "new" => break 1,
                "pending" => break word(&words, 1).parse().unwrap_or(1),
                other => return Err(Error::Internal(format!("coordinate begin: {other:?}"))),
            }
        };
        loop {
            let internal = internal_decrement_id(attempt, &plan.id);
            let hold = Plan::new(
                &self.inner.keys,
                Kind::Reservation,
                &internal,
                lines.clone(),
            );
            match self.reserve_across(&hold, fp, INTERNAL_HOLD).await? {
                Outcome::Applied { .. } => {}
                refused @ (Outcome::Short(_) | Outcome::Ceiling(_)) => {
                    self.coordinate(
                        Kind::Request,
                        &plan.id,
                        fp,
                        "decide",
                        &["refused".into(), refusal_text(&refused), window],
                        true,
                    )
                    .await?;
                    return Ok(refused);
                }
                other => return Ok(other),
            }
            match self.finish_across(&hold, fp, Finish::Commit).await? {
                Outcome::Applied { out, .. } => {
                    let words = self
                        .coordinate(
                            Kind::Request,
                            &plan.id,
                            fp,
                            "decide",
                            &["applied".into(), out, window],
                            true,
                        )
                        .await?;
                    return Ok(match word(&words, 0) {
                        "ok" => Outcome::Applied {
                            out: word(&words, 1).to_owned(),
                            replayed: false,
                        },
                        _ => Outcome::Applied {
                            out: word(&words, 2).to_owned(),
                            replayed: true,
                        },
                    });
                }
                // The internal hold lapsed before its commit (a retry long
                // after a crash): nothing was taken; hold again.
                Outcome::State(_) if attempt < DECREMENT_ATTEMPTS => {
                    let words = self
                        .coordinate(Kind::Request, &plan.id, fp, "reattempt", &[], true)
                        .await?;
                    attempt = word(&words, 1).parse().unwrap_or(attempt + 1);
                }
                other => return Ok(other),
            }
        }
    }

    /// The reaper found a part (of a request spanning partitions) due:
    /// the coordinator says what becomes of it.
    pub(super) async fn expire_part(
        &self,
        partition: Partition,
        id: &str,
        located: &Located,
        coordinator: Partition,
    ) -> Result<Expiry, Error> {
        let keys = &self.inner.keys;
        let fp = &located.fingerprint;
        let part = Plan::of_parts(keys, Kind::Part, id, vec![partition], located.lines.clone())
            .ok_or_else(|| {
                Error::Internal(format!("reservation {id}: a part's lines elsewhere"))
            })?;
        let words = self
            .coordinate(Kind::Reservation, id, fp, "read", &[], true)
            .await?;
        let (state, exp) = match word(&words, 0) {
            "ok" => (
                word(&words, 1).to_owned(),
                word(&words, 2).parse::<i64>().ok(),
            ),
            // The coordinator went with the window: the request never
            // finished; its parts go back.
            _ => ("gone".to_owned(), None),
        };
        let how = match state.as_str() {
            "pending" => {
                let words = self
                    .coordinate(
                        Kind::Reservation,
                        id,
                        fp,
                        "abort",
                        &[PROVISIONAL.as_millis().to_string()],
                        true,
                    )
                    .await?;
                if word(&words, 1) != "aborted" {
                    self.redate_part(partition, id, now_ms() + PROVISIONAL.as_millis() as i64)
                        .await?;
                    return Ok(Expiry::NotDue);
                }
                Finish::Expire
            }
            "held" => match exp {
                Some(exp) if exp > now_ms() => {
                    self.redate_part(partition, id, exp).await?;
                    return Ok(Expiry::NotDue);
                }
                _ => {
                    let words = self
                        .coordinate(
                            Kind::Reservation,
                            id,
                            fp,
                            "finish",
                            &["expire".into()],
                            true,
                        )
                        .await?;
                    match word(&words, 0) {
                        "ok" | "replay" => Finish::Expire,
                        // Extended or finished meanwhile: look again later.
                        _ => return Ok(Expiry::NotDue),
                    }
                }
            },
            "committed" => Finish::Commit,
            "released" => Finish::Release,
            _ => Finish::Expire,
        };
        let groups = part.reservation_groups(keys, &self.inner.markers);
        let outcome = self
            .run(
                &scripts::FINISH,
                &part,
                fp,
                &groups,
                Mode::part_of(coordinator),
                [how.op().to_owned(), self.window_ms()],
            )
            .await?;
        tracing::debug!(%partition, reservation = %id, state = %state, ?outcome, "expire_part");
        Ok(match outcome {
            Outcome::Applied { .. } => Expiry::Expired,
            Outcome::State(_) | Outcome::NotDue => Expiry::NotDue,
            Outcome::Unknown => Expiry::Unknown,
            Outcome::Corrupt(detail) => Expiry::Broken(detail),
            other => Expiry::Broken(format!("a part's finish answered {other:?}")),
        })
    }

    /// Moves a part's expiry entry (the reaper looks at it again then).
    async fn redate_part(&self, partition: Partition, id: &str, at_ms: i64) -> Result<(), Error> {
        let _: i64 = redis::cmd("ZADD")
            .arg(self.inner.keys.reservation_expiry(partition))
            .arg(at_ms)
            .arg(id)
            .query_async(&mut self.conn())
            .await?;
        Ok(())
    }

    /// After a request of one partition was carried out on a cluster: its
    /// locator in the id's own partition, written afterwards (one script
    /// may not touch both). A hint for lookups by id; an id found naming
    /// another request there was reused across partitions: logged and
    /// counted, since the request is already done.
    pub(super) fn claim_locator(&self, plan: &Plan, fp: &str, ttl: Duration) {
        if !self.inner.conn.is_cluster() || !plan.separate_locator() {
            return;
        }
        let keys = &self.inner.keys;
        let mut inv = scripts::CLAIM.prepare_invoke();
        inv.key(plan.kind.record(keys, plan.home, &plan.id))
            .key(keys.marker(plan.home))
            .arg(fp)
            .arg(parts_text(&plan.parts))
            .arg(all_lines(plan))
            .arg(ttl.as_millis() as u64);
        let mut conn = self.conn();
        let id = plan.id.clone();
        tokio::spawn(async move {
            let claimed: Result<Words, redis::RedisError> = inv.invoke_async(&mut conn).await;
            match claimed {
                Ok(words) if word(&words, 0) == "exists" => {
                    metrics::counter!("stockd_id_reuse_total").increment(1);
                    tracing::warn!(request_id = %id,
                        "an id was reused for another request in another partition (on a \
                         cluster this is noticed after the fact, not refused)");
                }
                Ok(_) => {}
                Err(err) => {
                    tracing::debug!(request_id = %id, error = %err, "could not write a locator; lookups will probe")
                }
            }
        });
    }

    /// The plan of one partition's part of `plan`.
    fn part_plan(&self, plan: &Plan, partition: Partition) -> Plan {
        let lines = plan
            .lines
            .iter()
            .filter(|(_, j)| plan.parts[*j] == partition)
            .map(|(l, _)| l.clone())
            .collect();
        Plan::of_parts(
            &self.inner.keys,
            Kind::Part,
            &plan.id,
            vec![partition],
            lines,
        )
        .expect("a part's lines are in its partition")
    }
}

/// `decrement <attempt> <request id>`: the internal reservation of a
/// decrement spanning partitions (no client id holds a space).
fn internal_decrement_id(attempt: u32, id: &str) -> String {
    format!("decrement {attempt} {id}")
}

/// The request id behind an internal reservation id, if it is one.
pub fn decrement_of_internal(reservation_id: &str) -> Option<&str> {
    let rest = reservation_id.strip_prefix("decrement ")?;
    let (attempt, id) = rest.split_once(' ')?;
    attempt.parse::<u32>().ok().map(|_| id)
}

fn word(words: &Words, i: usize) -> &str {
    words.get(i).map_or("", String::as_str)
}

fn parts_text(parts: &[Partition]) -> String {
    parts
        .iter()
        .map(|p| p.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

fn all_lines(plan: &Plan) -> String {
    let all: Vec<(&str, &str, i64)> = plan
        .lines
        .iter()
        .map(|(l, _)| (l.sku.as_str(), l.location.as_str(), l.amount))
        .collect();
    serde_json::to_string(&all).expect("lines serialise")
}

/// Levels in the order of the plan's lines.
fn sort_levels(levels: &mut [(String, String, i64, i64, i64)], plan: &Plan) {
    levels.sort_by_key(|l| {
        plan.lines
            .iter()
            .position(|(line, _)| line.sku == l.0 && line.location == l.1)
            .unwrap_or(usize::MAX)
    });
}

/// A refusal as the coordinator stores it: `<why> <payload>`.
fn refusal_text(outcome: &Outcome) -> String {
    match outcome {
        Outcome::Short(lines) => {
            format!("short {}", serde_json::to_string(lines).unwrap_or_default())
        }
        Outcome::Ceiling(lines) => {
            format!(
                "ceiling {}",
                serde_json::to_string(lines).unwrap_or_default()
            )
        }
        _ => "exists -".to_owned(),
    }
}

/// The outcome a stored refusal stands for.
fn stored_refusal(why: &str, payload: &str) -> Result<Outcome, Error> {
    let json = |p: &str| {
        serde_json::from_str(p).map_err(|e| Error::Internal(format!("stored refusal {p:?}: {e}")))
    };
    Ok(match why {
        "short" => Outcome::Short(json(payload)?),
        "ceiling" => Outcome::Ceiling(json(payload)?),
        _ => Outcome::Exists,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_decrement_ids_name_their_request_and_no_client_id() {
        let internal = internal_decrement_id(2, "order-7");
        assert_eq!(decrement_of_internal(&internal), Some("order-7"));
        assert_eq!(decrement_of_internal("order-7"), None);
        assert_eq!(decrement_of_internal("decrement x y"), None);
        assert!(crate::domain::RequestId::parse("id", internal).is_err());
    }
}
