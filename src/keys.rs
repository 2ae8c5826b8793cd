//! Partitions and Redis key names: the only place a key is spelled out.
//!
//! A SKU belongs to partition `fnv1a_64(utf8(sku)) mod P`. The partition is the
//! unit of atomicity in a future Redis Cluster, of event ordering and of
//! flushing, so every key carries the partition's hash tag `{pNN}`. Key names
//! are never parsed back: the stock hash carries its own `sku` and `loc`.

use std::fmt;

const FNV_OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// FNV-1a, 64 bit. Stable across Rust versions and platforms, unlike
/// `std::hash`, which matters because partitions and request fingerprints are
/// persisted in Redis.
pub fn fnv1a_64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(FNV_OFFSET_BASIS, |hash, &byte| {
        (hash ^ u64::from(byte)).wrapping_mul(FNV_PRIME)
    })
}

/// A partition number, `0..P`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Partition(pub u32);

impl fmt::Display for Partition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Builds every key of one deployment: a namespace and a partition count.
#[derive(Debug, Clone)]
pub struct Keyspace {
    namespace: String,
    partitions: u32,
    /// Digits in a partition tag: the width of `P - 1`, at least two.
    tag_width: usize,
}

impl Keyspace {
    /// `partitions` must be at least 1 (the config refuses 0).
    pub fn new(namespace: impl Into<String>, partitions: u32) -> Self {
        assert!(partitions >= 1, "a deployment has at least one partition");
        let tag_width = (partitions - 1).to_string().len().max(2);
        Self {
            namespace: namespace.into(),
            partitions,
            tag_width,
        }
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn partition_count(&self) -> u32 {
        self.partitions
    }

    pub fn partitions(&self) -> impl Iterator<Item = Partition> + use<> {
        (0..self.partitions).map(Partition)
    }

    /// The partition of a SKU, and also of a reservation or request id (its
    /// "home", where the id's record lives).
    pub fn partition_of(&self, name: &str) -> Partition {
        Partition((fnv1a_64(name.as_bytes()) % u64::from(self.partitions)) as u32)
    }

    fn prefix(&self, partition: Partition) -> String {
        format!(
            "{}:{{p{:0width$}}}",
            self.namespace,
            partition.0,
            width = self.tag_width
        )
    }

    /// `NS:{pNN}:stock:<location>:<sku>`, a hash of `sku loc avail resv ver`.
    pub fn stock(&self, sku: &str, location: &str) -> String {
        format!(
            "{}:stock:{location}:{sku}",
            self.prefix(self.partition_of(sku))
        )
    }

    /// `NS:{pNN}:resv:<reservation_id>`: this partition's lines of a
    /// reservation, its state and expiry.
    pub fn reservation(&self, partition: Partition, reservation_id: &str) -> String {
        format!("{}:resv:{reservation_id}", self.prefix(partition))
    }

    /// `NS:{pNN}:rexp`: reservation ids of the partition scored by expiry (ms).
    pub fn reservation_expiry(&self, partition: Partition) -> String {
        format!("{}:rexp", self.prefix(partition))
    }

    /// `NS:{pNN}:idem:<request_id>`: the stored outcome of a decrement, adjust
    /// or set.
    pub fn idempotency(&self, request_id: &str) -> String {
        format!(
            "{}:idem:{request_id}",
            self.prefix(self.partition_of(request_id))
        )
    }

    /// `NS:{pNN}:events`: the partition's change stream.
    pub fn events(&self, partition: Partition) -> String {
        format!("{}:events", self.prefix(partition))
    }

    /// `NS:{pNN}:dead`: entries the flusher can never write, with the reason.
    pub fn dead_letters(&self, partition: Partition) -> String {
        format!("{}:dead", self.prefix(partition))
    }

    /// `NS:{pNN}:gate`: exists while the partition's unflushed backlog is
    /// over its limit; the scripts then refuse new demand (UNAVAILABLE).
    pub fn backlog_gate(&self, partition: Partition) -> String {
        format!("{}:gate", self.prefix(partition))
    }

    /// `NS:{meta}`: partition count, schema version, epoch id.
    pub fn meta(&self) -> String {
        format!("{}:{{meta}}", self.namespace)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(keys.meta(), "ns:{meta}");
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
}
