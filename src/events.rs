//! Entries of the partition streams (DESIGN.md, "Events"), parsed once.
//!
//! A change event is one entry per changed (sku, location) with fields
//! `sku loc op d_avail d_resv avail resv ver ref ts`, and two more that
//! only the write-behind needs: `fp`, the request's fingerprint (so that
//! Postgres can answer a retry after Redis lost its record), and `exp` on
//! reserve events (the hold's expiry). Extend writes an entry with op
//! `extend` and no item (`ref fp exp ts`): not a change of stock, so Watch,
//! webhooks and exporters skip it; the flusher writes the new expiry.

use std::fmt;

use redis::Value;

/// One entry of a stream reply (XREAD, XREADGROUP, XRANGE), as Redis sent
/// it: its id and its fields as the flat `[name, value, ...]` list, moved
/// out of the reply. redis-rs' `StreamReadReply` copies the whole reply and
/// builds two maps per entry; the flusher and Watch read every event, and
/// that conversion was about a tenth of stockd's CPU.
#[derive(Debug, Clone, PartialEq)]
pub struct RawEntry {
    pub id: String,
    /// Empty for a pending entry that was deleted from the stream.
    pub fields: Vec<Value>,
}

/// The streams of an XREAD or XREADGROUP reply with their entries:
/// `[[key, entries], ...]` (RESP2) or a map of key to entries (RESP3); nil
/// (nothing to read) is no stream.
pub fn read_reply(value: Value) -> Result<Vec<(String, Vec<RawEntry>)>, redis::ParsingError> {
    let pairs: Vec<(Value, Value)> = match value {
        Value::Nil => return Ok(Vec::new()),
        Value::Map(pairs) => pairs,
        Value::Array(streams) => streams
            .into_iter()
            .map(|stream| match stream {
                Value::Array(pair) => match <[Value; 2]>::try_from(pair) {
                    Ok([key, entries]) => Ok((key, entries)),
                    Err(pair) => Err(format!("a stream of {} items, not 2", pair.len())),
                },
                other => Err(format!("a stream that is not an array: {other:?}")),
            })
            .collect::<Result<_, _>>()?,
        other => return Err(format!("not a stream read reply: {other:?}").into()),
    };
    pairs
        .into_iter()
        .map(|(key, entries)| Ok((text_of(key)?, range_reply(entries)?)))
        .collect()
}

/// The entries of an XRANGE reply, or of one stream of a read reply:
/// `[[id, [name, value, ...] | nil], ...]`.
pub fn range_reply(value: Value) -> Result<Vec<RawEntry>, redis::ParsingError> {
    let entries = match value {
        Value::Nil => return Ok(Vec::new()),
        Value::Array(entries) => entries,
        other => return Err(format!("not a list of stream entries: {other:?}").into()),
    };
    entries
        .into_iter()
        // Redis 6.2's XAUTOCLAIM gives nil for an entry deleted meanwhile.
        .filter(|entry| *entry != Value::Nil)
        .map(|entry| {
            let Value::Array(parts) = entry else {
                return Err(format!("a stream entry that is not an array: {entry:?}").into());
            };
            let mut parts = parts.into_iter();
            let id = text_of(parts.next().unwrap_or(Value::Nil))?;
            let fields = match parts.next() {
                None | Some(Value::Nil) => Vec::new(),
                Some(Value::Array(fields)) => fields,
                Some(Value::Map(pairs)) => pairs.into_iter().flat_map(|(k, v)| [k, v]).collect(),
                Some(other) => {
                    return Err(format!("stream entry {id} has fields {other:?}").into());
                }
            };
            Ok(RawEntry { id, fields })
        })
        .collect()
}

fn text_of(value: Value) -> Result<String, redis::ParsingError> {
    match value {
        Value::BulkString(bytes) => Ok(String::from_utf8(bytes)?),
        Value::SimpleString(s) => Ok(s),
        other => Err(format!("expected a string, got {other:?}").into()),
    }
}

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

/// One well-formed entry of a partition stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamEntry {
    Change(ChangeEvent),
    Extend(ExtendRecord),
}

impl StreamEntry {
    /// Parses an entry's fields; the error says why it can never be written.
    pub fn parse(partition: u32, entry_id: EntryId, fields: &[Value]) -> Result<Self, String> {
        let f = Fields(fields);
        if f.bytes("op")? == b"extend" {
            return Ok(StreamEntry::Extend(ExtendRecord {
                entry_id,
                partition,
                reservation_id: f.text("ref")?,
                fingerprint: f.text("fp")?,
                expires_at_ms: f.int("exp")?,
                ts_ms: f.int("ts")?,
            }));
        }
        ChangeEvent::parse(partition, entry_id, fields).map(StreamEntry::Change)
    }
}

/// A held reservation's new expiry, as Extend wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtendRecord {
    pub entry_id: EntryId,
    pub partition: u32,
    pub reservation_id: String,
    pub fingerprint: String,
    pub expires_at_ms: i64,
    pub ts_ms: i64,
}

/// The fields of a stream entry (`[name, value, ...]`), read as text or
/// integers. An entry has about a dozen fields: a scan beats a map.
struct Fields<'a>(&'a [Value]);

impl Fields<'_> {
    fn get(&self, name: &str) -> Option<&Value> {
        self.0
            .chunks_exact(2)
            .find(|pair| match &pair[0] {
                Value::BulkString(b) => b == name.as_bytes(),
                Value::SimpleString(s) => s == name,
                _ => false,
            })
            .map(|pair| &pair[1])
    }

    fn bytes(&self, name: &str) -> Result<&[u8], String> {
        match self.get(name) {
            Some(Value::BulkString(bytes)) => Ok(bytes),
            Some(Value::SimpleString(s)) => Ok(s.as_bytes()),
            Some(other) => Err(format!("field {name} has an unexpected type {other:?}")),
            None => Err(format!("field {name} is missing")),
        }
    }

    fn str(&self, name: &str) -> Result<&str, String> {
        std::str::from_utf8(self.bytes(name)?).map_err(|_| format!("field {name} is not UTF-8"))
    }

    fn text(&self, name: &str) -> Result<String, String> {
        self.str(name).map(str::to_owned)
    }

    fn int(&self, name: &str) -> Result<i64, String> {
        let t = self.str(name)?;
        t.parse()
            .map_err(|_| format!("field {name} is not an integer: {t:?}"))
    }

    fn optional(&self, name: &str) -> bool {
        self.get(name).is_some()
    }
}

/// One well-formed change event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangeEvent {
    /// The stream entry id.
    pub entry_id: EntryId,
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
    /// The fingerprint of the request that made the change (absent on
    /// events written before it was recorded, and on reconcile repairs).
    pub fingerprint: Option<String>,
}

impl ChangeEvent {
    /// Parses an entry's fields; the error says why it can never be written.
    pub fn parse(partition: u32, entry_id: EntryId, fields: &[Value]) -> Result<Self, String> {
        let f = Fields(fields);
        let op_text = f.str("op")?;
        let op = Op::parse(op_text).ok_or_else(|| format!("unknown op {op_text:?}"))?;
        let event = ChangeEvent {
            entry_id,
            partition,
            sku: f.text("sku")?,
            location: f.text("loc")?,
            op,
            d_available: f.int("d_avail")?,
            d_reserved: f.int("d_resv")?,
            available: f.int("avail")?,
            reserved: f.int("resv")?,
            version: f.int("ver")?,
            reference: f.text("ref")?,
            ts_ms: f.int("ts")?,
            expires_at_ms: if f.optional("exp") {
                Some(f.int("exp")?)
            } else {
                None
            },
            fingerprint: if f.optional("fp") {
                Some(f.text("fp")?)
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

/// A stream entry id, `<ms>-<seq>`, ordered numerically.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EntryId {
    pub ms: u64,
    pub seq: u64,
}

impl EntryId {
    pub const ZERO: EntryId = EntryId { ms: 0, seq: 0 };

    /// `<ms>-<seq>` with both parts decimal; nothing else.
    pub fn parse(s: &str) -> Option<Self> {
        let (ms, seq) = s.split_once('-')?;
        let digits =
            |t: &str| !t.is_empty() && t.len() <= 20 && t.bytes().all(|b| b.is_ascii_digit());
        if !digits(ms) || !digits(seq) {
            return None;
        }
        Some(EntryId {
            ms: ms.parse().ok()?,
            seq: seq.parse().ok()?,
        })
    }

    /// The first id of this id's millisecond.
    pub fn millisecond_start(self) -> Self {
        EntryId {
            ms: self.ms,
            seq: 0,
        }
    }

    /// The greatest id below this one (`0-0` stays `0-0`).
    pub fn predecessor(self) -> Self {
        match (self.ms, self.seq) {
            (0, 0) => self,
            (ms, 0) => EntryId {
                ms: ms - 1,
                seq: u64::MAX,
            },
            (ms, seq) => EntryId { ms, seq: seq - 1 },
        }
    }
}

impl EntryId {
    /// The id packed into one `u64` (milliseconds in the high 44 bits, the
    /// sequence saturated to 20 bits), for atomics that only move forward.
    /// Saturating errs low, so a comparison of packed ids never claims more
    /// than was seen.
    pub fn pack(self) -> u64 {
        (self.ms.min((1 << 44) - 1) << 20) | self.seq.min((1 << 20) - 1)
    }

    /// The inverse of `pack` (`None` for 0: nothing seen yet).
    pub fn unpack(packed: u64) -> Option<Self> {
        (packed != 0).then_some(EntryId {
            ms: packed >> 20,
            seq: packed & ((1 << 20) - 1),
        })
    }
}

impl fmt::Display for EntryId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(pairs: &[(&str, &str)]) -> Vec<Value> {
        pairs
            .iter()
            .flat_map(|(k, v)| [k, v])
            .map(|s| Value::BulkString(s.as_bytes().to_vec()))
            .collect()
    }

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn read_replies_decode_in_both_protocols() {
        let entry = |id: &str, fields: Value| Value::Array(vec![bulk(id), fields]);
        let entries = Value::Array(vec![
            entry("1-0", Value::Array(vec![bulk("op"), bulk("set")])),
            // a pending entry deleted from the stream
            entry("2-0", Value::Nil),
        ]);
        let expected = vec![(
            "s".to_owned(),
            vec![
                RawEntry {
                    id: "1-0".into(),
                    fields: vec![bulk("op"), bulk("set")],
                },
                RawEntry {
                    id: "2-0".into(),
                    fields: Vec::new(),
                },
            ],
        )];
        let resp2 = Value::Array(vec![Value::Array(vec![bulk("s"), entries.clone()])]);
        assert_eq!(read_reply(resp2).unwrap(), expected);
        let resp3 = Value::Map(vec![(bulk("s"), entries)]);
        assert_eq!(read_reply(resp3).unwrap(), expected);
        assert_eq!(read_reply(Value::Nil).unwrap(), Vec::new());
        assert!(read_reply(Value::Int(3)).is_err());
        assert!(read_reply(Value::Array(vec![Value::Array(vec![bulk("s")])])).is_err());
    }

    const ID: EntryId = EntryId { ms: 1, seq: 0 };

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
        let e = ChangeEvent::parse(3, ID, &fields(&GOOD)).unwrap();
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
            ChangeEvent::parse(0, ID, &fields(&bad))
                .unwrap_err()
                .contains("unknown op")
        );
        let mut bad = GOOD.to_vec();
        bad[7] = ("ver", "x");
        assert!(
            ChangeEvent::parse(0, ID, &fields(&bad))
                .unwrap_err()
                .contains("ver")
        );
        let mut bad = GOOD.to_vec();
        bad[5] = ("avail", "-1");
        assert!(
            ChangeEvent::parse(0, ID, &fields(&bad))
                .unwrap_err()
                .contains("negative")
        );
        assert!(
            ChangeEvent::parse(0, ID, &fields(&GOOD[..9]))
                .unwrap_err()
                .contains("ts")
        );
    }

    #[test]
    fn extend_entries_are_records_not_changes() {
        let entry = StreamEntry::parse(
            2,
            ID,
            &fields(&[
                ("op", "extend"),
                ("ref", "r1"),
                ("fp", "abc"),
                ("exp", "99"),
                ("ts", "5"),
            ]),
        )
        .unwrap();
        assert!(matches!(
            entry,
            StreamEntry::Extend(ExtendRecord {
                expires_at_ms: 99,
                ..
            })
        ));
        assert!(matches!(
            StreamEntry::parse(2, ID, &fields(&GOOD)).unwrap(),
            StreamEntry::Change(_)
        ));
    }

    #[test]
    fn packed_ids_order_like_ids() {
        let a = EntryId {
            ms: 1_764_000_000_000,
            seq: 3,
        };
        let b = EntryId {
            ms: 1_764_000_000_000,
            seq: 4,
        };
        let c = EntryId {
            ms: 1_764_000_000_001,
            seq: 0,
        };
        assert!(a.pack() < b.pack() && b.pack() < c.pack());
        assert_eq!(EntryId::unpack(a.pack()), Some(a));
        assert_eq!(EntryId::unpack(0), None);
    }

    #[test]
    fn entry_ids_parse_strictly_and_order_numerically() {
        assert_eq!(
            EntryId::parse("1700000000000-3"),
            Some(EntryId {
                ms: 1_700_000_000_000,
                seq: 3
            })
        );
        for bad in [
            "", "1", "-1", "1-", "a-1", "1-b", "1-2-3", " 1-2", "+1-2", "$",
        ] {
            assert_eq!(EntryId::parse(bad), None, "{bad:?}");
        }
        assert!(EntryId::parse("10-0") > EntryId::parse("9-99"));
        assert_eq!(EntryId::parse("5-0").unwrap().to_string(), "5-0");
    }

    #[test]
    fn predecessor_and_millisecond_start() {
        let id = EntryId { ms: 5, seq: 0 };
        assert_eq!(
            id.predecessor(),
            EntryId {
                ms: 4,
                seq: u64::MAX
            }
        );
        assert_eq!(
            EntryId { ms: 5, seq: 3 }.predecessor(),
            EntryId { ms: 5, seq: 2 }
        );
        assert_eq!(EntryId::ZERO.predecessor(), EntryId::ZERO);
        assert_eq!(
            EntryId { ms: 5, seq: 3 }.millisecond_start(),
            EntryId { ms: 5, seq: 0 }
        );
    }
}
