//! Change events as they stand in the partition streams (DESIGN.md,
//! "Events"): one entry per changed (sku, location) with fields
//! `sku loc op d_avail d_resv avail resv ver ref ts` (and `exp` on reserve
//! events, see docs/design.md).

use std::collections::HashMap;
use std::fmt;

use redis::Value;

/// The operation that produced an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    Reserve,
    Commit,
    Release,
    Expire,
    Decrement,
    Adjust,
    Set,
}

impl Op {
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Reserve => "reserve",
            Op::Commit => "commit",
            Op::Release => "release",
            Op::Expire => "expire",
            Op::Decrement => "decrement",
            Op::Adjust => "adjust",
            Op::Set => "set",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "reserve" => Op::Reserve,
            "commit" => Op::Commit,
            "release" => Op::Release,
            "expire" => Op::Expire,
            "decrement" => Op::Decrement,
            "adjust" => Op::Adjust,
            "set" => Op::Set,
            _ => return None,
        })
    }

    /// The reservation state an event of this op leaves behind, for the
    /// reservation ops.
    pub fn reservation_state(self) -> Option<&'static str> {
        match self {
            Op::Reserve => Some("held"),
            Op::Commit => Some("committed"),
            Op::Release => Some("released"),
            Op::Expire => Some("expired"),
            Op::Decrement | Op::Adjust | Op::Set => None,
        }
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One well-formed change event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangeEvent {
    /// The stream entry id, `<ms>-<seq>`.
    pub entry_id: String,
    pub partition: u32,
    pub sku: String,
    pub location: String,
    pub op: Op,
    pub d_available: i64,
    pub d_reserved: i64,
    pub available: i64,
    pub reserved: i64,
    pub version: i64,
    /// The reservation id or request id.
    pub reference: String,
    pub ts_ms: i64,
    /// Reserve events only: when the hold expires.
    pub expires_at_ms: Option<i64>,
}

impl ChangeEvent {
    /// Parses an entry's fields; the error says why it can never be written.
    pub fn parse(
        partition: u32,
        entry_id: &str,
        fields: &HashMap<String, Value>,
    ) -> Result<Self, String> {
        let text = |name: &str| -> Result<String, String> {
            match fields.get(name) {
                Some(Value::BulkString(bytes)) => String::from_utf8(bytes.clone())
                    .map_err(|_| format!("field {name} is not UTF-8")),
                Some(Value::SimpleString(s)) => Ok(s.clone()),
                Some(other) => Err(format!("field {name} has an unexpected type {other:?}")),
                None => Err(format!("field {name} is missing")),
            }
        };
        let int = |name: &str| -> Result<i64, String> {
            let t = text(name)?;
            t.parse()
                .map_err(|_| format!("field {name} is not an integer: {t:?}"))
        };
        let op_text = text("op")?;
        let op = Op::parse(&op_text).ok_or_else(|| format!("unknown op {op_text:?}"))?;
        let event = ChangeEvent {
            entry_id: entry_id.to_owned(),
            partition,
            sku: text("sku")?,
            location: text("loc")?,
            op,
            d_available: int("d_avail")?,
            d_reserved: int("d_resv")?,
            available: int("avail")?,
            reserved: int("resv")?,
            version: int("ver")?,
            reference: text("ref")?,
            ts_ms: int("ts")?,
            expires_at_ms: if fields.contains_key("exp") {
                Some(int("exp")?)
            } else {
                None
            },
        };
        if event.sku.is_empty() || event.location.is_empty() {
            return Err("empty sku or location".into());
        }
        if event.available < 0 || event.reserved < 0 {
            return Err(format!(
                "negative state: available {}, reserved {}",
                event.available, event.reserved
            ));
        }
        if event.version < 1 {
            return Err(format!("version {} is below 1", event.version));
        }
        Ok(event)
    }
}

/// A stream entry id as (milliseconds, sequence), for ordering.
pub fn parse_entry_id(id: &str) -> Option<(u64, u64)> {
    let (ms, seq) = id.split_once('-')?;
    Some((ms.parse().ok()?, seq.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(pairs: &[(&str, &str)]) -> HashMap<String, Value> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), Value::BulkString(v.as_bytes().to_vec())))
            .collect()
    }

    const GOOD: [(&str, &str); 10] = [
        ("sku", "a"),
        ("loc", "default"),
        ("op", "reserve"),
        ("d_avail", "-2"),
        ("d_resv", "2"),
        ("avail", "8"),
        ("resv", "2"),
        ("ver", "2"),
        ("ref", "r1"),
        ("ts", "1700000000000"),
    ];

    #[test]
    fn parses_a_well_formed_entry() {
        let e = ChangeEvent::parse(3, "1-0", &fields(&GOOD)).unwrap();
        assert_eq!(
            (e.op, e.d_available, e.version, e.partition),
            (Op::Reserve, -2, 2, 3)
        );
        assert_eq!(e.expires_at_ms, None);
    }

    #[test]
    fn refuses_malformed_entries_with_a_reason() {
        let mut bad = GOOD.to_vec();
        bad[2] = ("op", "steal");
        assert!(
            ChangeEvent::parse(0, "1-0", &fields(&bad))
                .unwrap_err()
                .contains("unknown op")
        );
        let mut bad = GOOD.to_vec();
        bad[7] = ("ver", "x");
        assert!(
            ChangeEvent::parse(0, "1-0", &fields(&bad))
                .unwrap_err()
                .contains("ver")
        );
        let mut bad = GOOD.to_vec();
        bad[5] = ("avail", "-1");
        assert!(
            ChangeEvent::parse(0, "1-0", &fields(&bad))
                .unwrap_err()
                .contains("negative")
        );
        assert!(
            ChangeEvent::parse(0, "1-0", &fields(&GOOD[..9]))
                .unwrap_err()
                .contains("ts")
        );
    }

    #[test]
    fn entry_ids_order_numerically() {
        assert!(parse_entry_id("10-0") > parse_entry_id("9-5"));
        assert_eq!(parse_entry_id("bad"), None);
    }
}
