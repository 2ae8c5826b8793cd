//! The Lua scripts, one file per operation, and the typed protocol between
//! them and the engine.
//!
//! Every script starts with `common.lua` (the Redis clock, marker checks,
//! stock reads). The stock-changing scripts (reserve, finish, extend, apply,
//! set) continue with `layout.lua`, which decodes the key and argument
//! layout they share; [`Layout`] builds that layout on the Rust side and
//! [`ScriptReply`] decodes their replies, once. Each script's header states
//! its KEYS, ARGV, reply and invariants. Scripts run with EVALSHA
//! (`redis::Script` loads them on NOSCRIPT), so a request costs one round
//! trip.

use std::sync::LazyLock;

use redis::{FromRedisValue, ParsingError, Script, ScriptInvocation, Value};
use serde::Deserialize;

use crate::events::EntryId;
use crate::keys::{Partition, fnv1a_64};

macro_rules! script {
    ($(#[$doc:meta])* $name:ident, $($file:literal),+) => {
        $(#[$doc])*
        pub(crate) static $name: LazyLock<Script> =
            LazyLock::new(|| Script::new(concat!($(include_str!($file)),+)));
    };
}

script!(
    /// Hold units for a reservation.
    RESERVE,
    "common.lua",
    "layout.lua",
    "reserve.lua"
);
script!(
    /// Commit, release or expire a held reservation.
    FINISH,
    "common.lua",
    "layout.lua",
    "finish.lua"
);
script!(
    /// Move a held reservation's expiry.
    EXTEND,
    "common.lua",
    "layout.lua",
    "extend.lua"
);
script!(
    /// Signed change of `available` (Decrement, Adjust).
    APPLY,
    "common.lua",
    "layout.lua",
    "apply.lua"
);
script!(
    /// Absolute set of `available` (Admin.SetStock).
    SET,
    "common.lua",
    "layout.lua",
    "set.lua"
);
script!(
    /// Restate Redis's quantities as a `set` event (reconcile repair).
    REPAIR,
    "common.lua",
    "repair.lua"
);
script!(
    /// Reservation ids whose hold has lapsed (the reaper's query).
    DUE,
    "common.lua",
    "due.lua"
);
script!(
    /// Copy items from Postgres where Redis lacks them or is older; no event.
    LOAD,
    "load.lua"
);
script!(
    /// Every write to a partition marker.
    MARKER,
    "common.lua",
    "marker.lua"
);
script!(
    /// Put a reservation's record back from Postgres.
    RESTORE_RESERVATION,
    "restore_reservation.lua"
);
script!(
    /// Put a request's record back from Postgres.
    RESTORE_REQUEST,
    "restore_request.lua"
);
script!(
    /// The coordinator of a request spanning partitions on a cluster.
    COORDINATE,
    "common.lua",
    "coordinate.lua"
);
script!(
    /// A request's locator, written after it (on a cluster).
    CLAIM,
    "common.lua",
    "claim.lua"
);
script!(
    /// Release a lock held with a token.
    UNLOCK,
    "unlock.lua"
);
script!(
    /// A partition stream's bounds, for a Watch resume check.
    STREAM_RANGE,
    "stream_range.lua"
);

/// One line as a script receives it: `amount` is a quantity or a signed
/// delta, by script.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ScriptLine {
    pub sku: String,
    pub location: String,
    pub amount: i64,
}

/// The keys of one partition group, in the script's order (reservations:
/// record, rexp, events, marker; apply and set: events, marker).
pub(crate) struct Group {
    pub partition: Partition,
    pub keys: Vec<String>,
    /// The newest flushed entry id seen in this partition's marker.
    pub min_flushed: Option<EntryId>,
}

/// Flags of `layout.lua`.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Flags {
    /// The id was looked up in Postgres already.
    pub checked: bool,
    /// Create an item Redis lacks (SetStock).
    pub create: bool,
    /// A part of a request coordinated in this partition (cluster).
    pub part_of: Option<Partition>,
}

/// A request's own records: the coordinator (where its outcome lives), its
/// partition's marker and Bloom filter, and the locator when that is a
/// record of its own (in the id's partition).
pub(crate) struct Records {
    pub coordinator: String,
    pub coordinator_marker: String,
    pub coordinator_seen: String,
    pub locator: Option<(String, String)>,
}

/// The layout of `layout.lua`, built in one place.
pub(crate) struct Layout<'a> {
    pub id: &'a str,
    pub fingerprint: &'a str,
    pub records: Records,
    pub groups: &'a [Group],
    /// Per line, its group (index into `groups`).
    pub lines: &'a [(ScriptLine, usize)],
    pub flags: Flags,
    pub params: [String; 2],
    /// The stock key of every line, in line order.
    pub stock_keys: &'a [String],
}

impl Layout<'_> {
    /// The invocation of `script` with this layout.
    pub fn invocation<'s>(&self, script: &'s Script) -> ScriptInvocation<'s> {
        let mut inv = script.prepare_invoke();
        inv.key(&self.records.coordinator)
            .key(&self.records.coordinator_marker)
            .key(&self.records.coordinator_seen);
        let mut flags = String::new();
        if let Some((locator, marker)) = &self.records.locator {
            inv.key(locator).key(marker);
            flags.push('L');
        }
        if self.flags.checked {
            flags.push('C');
        }
        if self.flags.create {
            flags.push('X');
        }
        if let Some(coordinator) = self.flags.part_of {
            flags.push_str(&format!("P{coordinator}"));
        }
        for group in self.groups {
            for key in &group.keys {
                inv.key(key);
            }
        }
        for key in self.stock_keys {
            inv.key(key);
        }
        let parts: Vec<String> = self
            .groups
            .iter()
            .map(|g| g.partition.to_string())
            .collect();
        inv.arg(self.id)
            .arg(self.fingerprint)
            .arg(self.groups.len())
            .arg(self.lines.len())
            .arg(flags)
            .arg(&self.params[0])
            .arg(&self.params[1])
            .arg(parts.join(","));
        for group in self.groups {
            inv.arg(
                group
                    .min_flushed
                    .map(|id| id.to_string())
                    .unwrap_or_default(),
            );
        }
        for (line, group) in self.lines {
            inv.arg(&line.sku)
                .arg(&line.location)
                .arg(line.amount)
                .arg(group + 1);
        }
        let (h1, h2) = bloom_hashes(self.id);
        inv.arg(h1).arg(h2);
        inv
    }
}

/// Bits per id in a Bloom filter of seen ids (about 1 % false positives
/// with 7 probes).
pub(crate) const BLOOM_BITS_PER_ID: u64 = 10;
/// Probes per id.
pub(crate) const BLOOM_PROBES: u64 = 7;

/// The two 32-bit hashes whose combinations `h1 + i * h2` pick an id's
/// probes in a filter of `m` bits (Kirsch–Mitzenmacher double hashing);
/// layout.lua computes the positions the same way.
pub(crate) fn bloom_hashes(id: &str) -> (u64, u64) {
    let h = fnv1a_64(id.as_bytes());
    (h & 0xffff_ffff, (h >> 32) | 1)
}

/// The bit positions of `id` in a filter of `bits` bits.
pub(crate) fn bloom_positions(id: &str, bits: u64) -> impl Iterator<Item = u64> {
    let (h1, h2) = bloom_hashes(id);
    (0..BLOOM_PROBES).map(move |i| (h1 + i * h2) % bits)
}

/// What a stock-changing script answered, decoded once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ScriptReply {
    pub outcome: Outcome,
    /// Per group, the flushed entry id its marker held (learned by the
    /// engine, so that a marker that goes back is noticed).
    pub flushed: Vec<Option<EntryId>>,
}

/// The outcome of a script, by status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Applied now (`replayed = false`) or earlier (`true`); the stored
    /// outcome as JSON.
    Applied { out: String, replayed: bool },
    /// The id names another request.
    Exists,
    /// Redis lacks these items (sku, location).
    Missing(Vec<(String, String)>),
    /// Not enough stock: (sku, location, requested, available).
    Short(Vec<(String, String, i64, i64)>),
    /// `available` would pass the ceiling: (sku, location, delta, available).
    Ceiling(Vec<(String, String, i64, i64)>),
    /// Compare-and-set mismatch: the current version.
    Version(i64),
    /// No such reservation.
    Unknown,
    /// The reservation is in this state, where the operation does not apply.
    State(String),
    /// An expiry that is not due.
    NotDue,
    /// The stock cannot take a reservation's change.
    Corrupt(String),
    /// Postgres may know the id: look it up first.
    CheckPostgres,
    /// The partition of this marker key refuses the request.
    Refused(Refusal, String),
}

/// Why a partition refuses, whatever the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// Its unflushed backlog is over the limit.
    Backlog,
    /// Redis lost its data (no marker).
    Lost,
    /// A rollback of Redis is being healed.
    Healing,
    /// The marker is behind what was seen: Redis rolled back.
    RolledBack,
}

impl FromRedisValue for ScriptReply {
    fn from_redis_value(value: Value) -> Result<Self, ParsingError> {
        let (status, payload, flushed): (String, String, String) =
            FromRedisValue::from_redis_value(value)?;
        let outcome = Outcome::decode(&status, payload)
            .map_err(|e| ParsingError::from(format!("script reply {status:?}: {e}").as_str()))?;
        let flushed = if flushed.is_empty() {
            Vec::new()
        } else {
            flushed.split(',').map(EntryId::parse).collect()
        };
        Ok(ScriptReply { outcome, flushed })
    }
}

impl Outcome {
    fn decode(status: &str, payload: String) -> Result<Self, String> {
        fn json<'a, T: Deserialize<'a>>(text: &'a str) -> Result<T, String> {
            serde_json::from_str(text).map_err(|e| format!("{e} in {text:?}"))
        }
        Ok(match status {
            "ok" => Outcome::Applied {
                out: payload,
                replayed: false,
            },
            "replay" => Outcome::Applied {
                out: payload,
                replayed: true,
            },
            "exists" => Outcome::Exists,
            "missing" => Outcome::Missing(json(&payload)?),
            "short" => Outcome::Short(json(&payload)?),
            "ceiling" => Outcome::Ceiling(json(&payload)?),
            "version" => Outcome::Version(
                payload
                    .parse()
                    .map_err(|_| format!("version {payload:?}"))?,
            ),
            "unknown" => Outcome::Unknown,
            "state" => Outcome::State(payload),
            "noop" => Outcome::NotDue,
            "corrupt" => Outcome::Corrupt(payload),
            "check" => Outcome::CheckPostgres,
            "backlog" => Outcome::Refused(Refusal::Backlog, payload),
            "lost" => Outcome::Refused(Refusal::Lost, payload),
            "healing" => Outcome::Refused(Refusal::Healing, payload),
            "rollback" => Outcome::Refused(Refusal::RolledBack, payload),
            other => return Err(format!("unknown status {other:?}")),
        })
    }
}

/// The JSON outcome a script stores for replays.
#[derive(Debug, Deserialize)]
pub(crate) struct StoredOutcome {
    pub exp: Option<i64>,
    pub levels: Vec<(String, String, i64, i64, i64)>,
}

impl StoredOutcome {
    pub fn parse(json: &str) -> Result<Self, String> {
        serde_json::from_str(json).map_err(|e| format!("stored outcome {json:?}: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(status: &str, payload: &str, flushed: &str) -> ScriptReply {
        ScriptReply::from_redis_value(Value::Array(vec![
            Value::BulkString(status.into()),
            Value::BulkString(payload.into()),
            Value::BulkString(flushed.into()),
        ]))
        .unwrap()
    }

    #[test]
    fn replies_decode_once_into_outcomes() {
        let r = reply("ok", r#"{"levels":[]}"#, "5-1,");
        assert_eq!(
            r.outcome,
            Outcome::Applied {
                out: r#"{"levels":[]}"#.into(),
                replayed: false
            }
        );
        assert_eq!(r.flushed, vec![Some(EntryId { ms: 5, seq: 1 }), None]);
        assert_eq!(
            reply("short", r#"[["a","d",3,1]]"#, "").outcome,
            Outcome::Short(vec![("a".into(), "d".into(), 3, 1)])
        );
        assert_eq!(reply("version", "7", "").outcome, Outcome::Version(7));
        assert_eq!(
            reply("rollback", "k", "").outcome,
            Outcome::Refused(Refusal::RolledBack, "k".into())
        );
        assert!(
            ScriptReply::from_redis_value(Value::Array(vec![
                Value::BulkString(b"bogus".to_vec()),
                Value::BulkString(vec![]),
                Value::BulkString(vec![]),
            ]))
            .is_err()
        );
    }

    #[test]
    fn bloom_positions_spread_and_stay_in_range() {
        let positions: Vec<u64> = bloom_positions("order-1", 1000).collect();
        assert_eq!(positions.len(), 7);
        assert!(positions.iter().all(|p| *p < 1000));
        let distinct: std::collections::HashSet<_> = positions.iter().collect();
        assert!(distinct.len() >= 5, "{positions:?}");
    }
}
