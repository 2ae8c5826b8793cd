//! Partitions and Redis key names: the only place a key is spelled out.
//!
//! A SKU belongs to partition `fnv1a_64(utf8(sku)) mod P`. The partition is
//! the unit of atomicity on a Redis Cluster, of event ordering and of
//! flushing, so every key carries the partition's hash tag `{pNN}` and a
//! script only ever touches keys of the partitions it is handed.
//!
//! Every part of a key that comes from a request (location, SKU,
//! reservation id, request id) is percent-encoded for `%`, `:`, `{`, `}`,
//! space and control bytes, so that no two distinct values or tuples can
//! meet in one key (`Z:X`@`wh` and `X`@`wh:Z` were once the same key) and a
//! user value can never change a key's hash tag. Everything else stays as it
//! is, so keys remain readable for an operator. Key names are never parsed
//! back: the stock hash carries its own `sku` and `loc`.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

const FNV_OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// FNV-1a, 64 bit. Stable across Rust versions and platforms, unlike
/// `std::hash`, which matters because partitions and request fingerprints are
/// persisted in Redis and Postgres.
pub fn fnv1a_64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(FNV_OFFSET_BASIS, |hash, &byte| {
        (hash ^ u64::from(byte)).wrapping_mul(FNV_PRIME)
    })
}

/// A partition number, `0..P`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Partition(pub u32);

impl Partition {
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

impl fmt::Display for Partition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Whether a byte of a user value must be escaped inside a key.
fn needs_escape(byte: u8) -> bool {
    matches!(byte, b'%' | b':' | b'{' | b'}' | b' ') || byte < 0x20 || byte == 0x7f
}

/// Percent-encodes the bytes of `value` that could change a key's shape.
/// Injective: `%` itself is encoded, so an encoded string decodes to one
/// value only.
pub fn encode_part(value: &str) -> Cow<'_, str> {
    if !value.bytes().any(needs_escape) {
        return Cow::Borrowed(value);
    }
    let mut out = String::with_capacity(value.len() + 8);
    for ch in value.chars() {
        if ch.is_ascii() && needs_escape(ch as u8) {
            out.push_str(&format!("%{:02X}", ch as u8));
        } else {
            out.push(ch);
        }
    }
    Cow::Owned(out)
}

/// Builds every key of one deployment: a namespace and a partition count.
/// Cheap to clone; the partition prefixes are built once.
#[derive(Debug, Clone)]
pub struct Keyspace {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    namespace: String,
    partitions: u32,
    /// `NS:{pNN}:` of every partition.
    prefixes: Vec<String>,
    /// `NS:{meta}`.
    meta: String,
}

impl Keyspace {
    /// `partitions` must be at least 1 (the config refuses 0).
    pub fn new(namespace: impl Into<String>, partitions: u32) -> Self {
        assert!(partitions >= 1, "a deployment has at least one partition");
        let namespace = namespace.into();
        // Digits in a partition tag: the width of `P - 1`, at least two.
        let width = (partitions - 1).to_string().len().max(2);
        let prefixes = (0..partitions)
            .map(|p| format!("{namespace}:{{p{p:0width$}}}:"))
            .collect();
        let meta = format!("{namespace}:{{meta}}");
        Self {
            inner: Arc::new(Inner {
                namespace,
                partitions,
                prefixes,
                meta,
            }),
        }
    }

    pub fn namespace(&self) -> &str {
        &self.inner.namespace
    }

    pub fn partition_count(&self) -> u32 {
        self.inner.partitions
    }

    pub fn partitions(&self) -> impl Iterator<Item = Partition> + use<> {
        (0..self.inner.partitions).map(Partition)
    }

    /// The partition of a SKU, and also of a reservation or request id (its
    /// "home", where the id's locator lives).
    pub fn partition_of(&self, name: &str) -> Partition {
        Partition((fnv1a_64(name.as_bytes()) % u64::from(self.inner.partitions)) as u32)
    }

    /// `NS:{pNN}:` followed by `parts` joined with `:`, each part encoded.
    fn key(&self, partition: Partition, kind: &str, parts: &[&str]) -> String {
        let prefix = &self.inner.prefixes[partition.index()];
        let len = prefix.len() + kind.len() + parts.iter().map(|p| p.len() + 1).sum::<usize>();
        let mut key = String::with_capacity(len + 8);
        key.push_str(prefix);
        key.push_str(kind);
        for part in parts {
            key.push(':');
            key.push_str(&encode_part(part));
        }
        key
    }

    /// `NS:{pNN}:stock:<location>:<sku>`, a hash of `sku loc avail resv ver`.
    pub fn stock(&self, sku: &str, location: &str) -> String {
        self.key(self.partition_of(sku), "stock", &[location, sku])
    }

    /// `NS:{pNN}:resv:<reservation_id>`: this partition's part of a
    /// reservation (its lines, state and expiry); in the reservation's
    /// coordinating partition also its outcome, and in the id's own
    /// partition its locator (every line and partition).
    pub fn reservation(&self, partition: Partition, reservation_id: &str) -> String {
        self.key(partition, "resv", &[reservation_id])
    }

    /// `NS:{pNN}:part:<reservation_id>`: on a Redis Cluster, this
    /// partition's part of a reservation spanning partitions, which follows
    /// the coordinator (the `resv` record in the id's own partition).
    pub fn part(&self, partition: Partition, reservation_id: &str) -> String {
        self.key(partition, "part", &[reservation_id])
    }

    /// `NS:{pNN}:rexp`: reservation ids of the partition scored by expiry (ms).
    pub fn reservation_expiry(&self, partition: Partition) -> String {
        self.key(partition, "rexp", &[])
    }

    /// `NS:{pNN}:idem:<request_id>`: the stored outcome of a decrement,
    /// adjust or set in the partition of its items (and the request id's
    /// locator in the id's own partition).
    pub fn idempotency(&self, partition: Partition, request_id: &str) -> String {
        self.key(partition, "idem", &[request_id])
    }

    /// `NS:{pNN}:events`: the partition's change stream.
    pub fn events(&self, partition: Partition) -> String {
        self.key(partition, "events", &[])
    }

    /// `NS:{pNN}:dead`: entries that can never be written, with the reason
    /// (malformed entries, forks, broken reservations).
    pub fn dead_letters(&self, partition: Partition) -> String {
        self.key(partition, "dead", &[])
    }

    /// `NS:{pNN}:marker`: proof that this Redis holds the partition (the
    /// deployment epoch), the newest entry flushed to Postgres, when the
    /// partition was last re-established, a healing deadline and the
    /// backlog gate. Every script reads it first (scripts/prelude.lua).
    pub fn marker(&self, partition: Partition) -> String {
        self.key(partition, "marker", &[])
    }

    /// `NS:{pNN}:seen`: after the partition was re-established from
    /// Postgres, a Bloom filter of the ids Postgres knew then (see the
    /// marker's `seen_until`).
    pub fn seen(&self, partition: Partition) -> String {
        self.key(partition, "seen", &[])
    }

    /// `NS:{meta}`: partition count, schema version, epoch id.
    pub fn meta(&self) -> &str {
        &self.inner.meta
    }

    /// A SCAN pattern of the namespace's keys: `NS:` (the namespace matched
    /// literally) followed by `rest`, a glob.
    pub fn pattern(&self, rest: &str) -> String {
        let literal: String = self
            .inner
            .namespace
            .chars()
            .flat_map(|c| match c {
                '*' | '?' | '[' | ']' | '\\' => vec!['\\', c],
                c => vec![c],
            })
            .collect();
        format!("{literal}:{rest}")
    }

    /// `NS:{meta}:<name>`: a deployment-wide lock (`rewarm`, `reconcile`,
    /// `heal`).
    pub fn lock(&self, name: &str) -> String {
        format!("{}:{}", self.inner.meta, encode_part(name))
    }
}

/// Deletes every key of `keys`' namespace (SCAN over every primary,
/// UNLINK per key); returns how many. Only for `--reset-redis`, with every
/// stockd stopped.
pub async fn delete_namespace(
    conn: &crate::redis_conn::RedisConn,
    keys: &Keyspace,
) -> Result<u64, redis::RedisError> {
    let pattern = keys.pattern("*");
    let mut at = Some(crate::redis_conn::ScanCursor::default());
    let mut deleted = 0;
    while let Some(cursor) = at {
        let (batch, next) = conn.scan_step(cursor, &pattern, 1000).await?;
        let mut unlink = crate::redis_conn::CommandBatch::new();
        for key in batch {
            let mut cmd = redis::cmd("UNLINK");
            cmd.arg(&key);
            unlink.cmd(key, cmd);
        }
        for n in unlink.query(conn).await? {
            deleted += redis::from_redis_value::<u64>(n)?;
        }
        at = next;
    }
    Ok(deleted)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn fnv1a_matches_reference_vectors() {
        // Vectors from the FNV reference (http://www.isthe.com/chongo/tech/comp/fnv/).
        assert_eq!(fnv1a_64(b""), 0xcbf29ce484222325);
        assert_eq!(fnv1a_64(b"a"), 0xaf63dc4c8601ec8c);
        assert_eq!(fnv1a_64(b"foobar"), 0x85944171f73967e8);
    }

    #[test]
    fn keys_carry_a_zero_padded_partition_tag() {
        let keys = Keyspace::new("ns", 16);
        let p = keys.partition_of("sku-1");
        assert_eq!(p.0 as u64, fnv1a_64(b"sku-1") % 16);
        assert_eq!(
            keys.stock("sku-1", "default"),
            format!("ns:{{p{:02}}}:stock:default:sku-1", p.0)
        );
        assert_eq!(keys.events(Partition(3)), "ns:{p03}:events");
        assert_eq!(keys.marker(Partition(3)), "ns:{p03}:marker");
        assert_eq!(keys.meta(), "ns:{meta}");
        assert_eq!(keys.lock("rewarm"), "ns:{meta}:rewarm");
    }

    #[test]
    fn tag_width_follows_the_largest_partition() {
        assert_eq!(Keyspace::new("n", 1).events(Partition(0)), "n:{p00}:events");
        assert_eq!(
            Keyspace::new("n", 100).events(Partition(7)),
            "n:{p07}:events"
        );
        assert_eq!(
            Keyspace::new("n", 101).events(Partition(7)),
            "n:{p007}:events"
        );
    }

    #[test]
    fn user_parts_cannot_alias_or_move_the_hash_tag() {
        let keys = Keyspace::new("ns", 1);
        // The pair of the Redis-failure issue: one key before encoding.
        assert_ne!(keys.stock("Z:X", "wh"), keys.stock("X", "wh:Z"));
        assert_eq!(keys.stock("Z:X", "wh"), "ns:{p00}:stock:wh:Z%3AX");
        assert_eq!(keys.stock("a}b", "{x}"), "ns:{p00}:stock:%7Bx%7D:a%7Db");
        assert_eq!(keys.stock("100%", "é"), "ns:{p00}:stock:é:100%25");
        assert_eq!(encode_part("plain-sku_1.2/ü"), "plain-sku_1.2/ü");
    }

    fn decode(part: &str) -> String {
        let bytes = part.as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i] == b'%' {
                out.push(u8::from_str_radix(&part[i + 1..i + 3], 16).unwrap());
                i += 3;
            } else {
                out.push(bytes[i]);
                i += 1;
            }
        }
        String::from_utf8(out).unwrap()
    }

    proptest! {
        /// Distinct (sku, location) pairs give distinct stock keys, and
        /// distinct ids distinct records, whatever characters they hold.
        #[test]
        fn distinct_tuples_give_distinct_keys(
            a in ("[a-z:%{} ]{1,6}", "[a-z:%{} ]{1,6}"),
            b in ("[a-z:%{} ]{1,6}", "[a-z:%{} ]{1,6}"),
            id1 in "\\PC{1,8}",
            id2 in "\\PC{1,8}",
        ) {
            // One partition: only the encoding keeps the keys apart.
            let keys = Keyspace::new("ns", 1);
            prop_assert_eq!(a == b, keys.stock(&a.0, &a.1) == keys.stock(&b.0, &b.1));
            let p = Partition(0);
            prop_assert_eq!(id1 == id2, keys.reservation(p, &id1) == keys.reservation(p, &id2));
            prop_assert_eq!(id1 == id2, keys.idempotency(p, &id1) == keys.idempotency(p, &id2));
        }

        /// Encoding is reversible and leaves no separator or brace behind.
        #[test]
        fn encoding_round_trips(value in "\\PC{0,12}|[%:{} \\x00-\\x1f]{0,6}") {
            let encoded = encode_part(&value);
            let clean = !encoded.contains([':', '{', '}', ' ']);
            prop_assert!(clean, "separator or brace left in {:?}", encoded);
            prop_assert_eq!(decode(&encoded), value);
        }
    }
}
