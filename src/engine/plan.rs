//! How a request maps onto partitions and keys: its groups (one per
//! partition its lines touch, in order of first appearance), its
//! coordinator record and, when that is elsewhere, its locator.

use crate::keys::{Keyspace, Partition};
use crate::markers::Markers;
use crate::scripts::{Flags, Group, Layout, Records, ScriptLine};

/// The records a request id names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    /// `NS:{pNN}:resv:<id>`
    Reservation,
    /// `NS:{pNN}:idem:<id>`
    Request,
    /// `NS:{pNN}:part:<id>`: a part of a reservation spanning partitions on
    /// a cluster.
    Part,
}

impl Kind {
    pub fn record(self, keys: &Keyspace, partition: Partition, id: &str) -> String {
        match self {
            Kind::Reservation => keys.reservation(partition, id),
            Kind::Request => keys.idempotency(partition, id),
            Kind::Part => keys.part(partition, id),
        }
    }
}

/// A request laid out over partitions, computed once per request.
pub(super) struct Plan {
    pub kind: Kind,
    pub id: String,
    /// The partitions of the lines, in order of first appearance.
    pub parts: Vec<Partition>,
    /// Every line with the index of its partition in `parts`.
    pub lines: Vec<(ScriptLine, usize)>,
    pub stock_keys: Vec<String>,
    /// The id's own partition: where its locator lives.
    pub home: Partition,
}

impl Plan {
    /// Groups the lines by partition in order of first appearance.
    pub fn new(keys: &Keyspace, kind: Kind, id: &str, lines: Vec<ScriptLine>) -> Self {
        let mut parts: Vec<Partition> = Vec::new();
        let mut grouped = Vec::with_capacity(lines.len());
        // At most 100 lines: a linear search beats hashing.
        for line in lines {
            let p = keys.partition_of(&line.sku);
            let j = match parts.iter().position(|g| *g == p) {
                Some(j) => j,
                None => {
                    parts.push(p);
                    parts.len() - 1
                }
            };
            grouped.push((line, j));
        }
        Self::with_groups(keys, kind, id, parts, grouped)
    }

    /// A reservation as its locator describes it: `parts` in the order it
    /// was reserved with.
    pub fn of_parts(
        keys: &Keyspace,
        kind: Kind,
        id: &str,
        parts: Vec<Partition>,
        lines: Vec<ScriptLine>,
    ) -> Option<Self> {
        let grouped = lines
            .into_iter()
            .map(|line| {
                let p = keys.partition_of(&line.sku);
                parts.iter().position(|g| *g == p).map(|j| (line, j))
            })
            .collect::<Option<Vec<_>>>()?;
        Some(Self::with_groups(keys, kind, id, parts, grouped))
    }

    fn with_groups(
        keys: &Keyspace,
        kind: Kind,
        id: &str,
        parts: Vec<Partition>,
        lines: Vec<(ScriptLine, usize)>,
    ) -> Self {
        let stock_keys = lines
            .iter()
            .map(|(l, _)| keys.stock(&l.sku, &l.location))
            .collect();
        Self {
            kind,
            id: id.to_owned(),
            parts,
            lines,
            stock_keys,
            home: keys.partition_of(id),
        }
    }

    /// Where the request's outcome is stored: its one partition, or the
    /// id's own partition when the lines span partitions.
    pub fn coordinator(&self) -> Partition {
        match self.parts.as_slice() {
            [only] => *only,
            _ => self.home,
        }
    }

    /// The locator is a record of its own only when the coordinator is not
    /// in the id's partition.
    pub fn separate_locator(&self) -> bool {
        self.coordinator() != self.home
    }

    /// The groups of a reservation script: record, rexp, events, marker.
    pub fn reservation_groups(&self, keys: &Keyspace, markers: &Markers) -> Vec<Group> {
        self.groups(markers, |p| {
            vec![
                self.kind.record(keys, p, &self.id),
                keys.reservation_expiry(p),
                keys.events(p),
                keys.marker(p),
            ]
        })
    }

    /// The groups of apply and set: events, marker.
    pub fn change_groups(&self, keys: &Keyspace, markers: &Markers) -> Vec<Group> {
        self.groups(markers, |p| vec![keys.events(p), keys.marker(p)])
    }

    fn groups(&self, markers: &Markers, keys_of: impl Fn(Partition) -> Vec<String>) -> Vec<Group> {
        self.parts
            .iter()
            .map(|&partition| Group {
                partition,
                keys: keys_of(partition),
                min_flushed: markers.seen(partition),
            })
            .collect()
    }

    /// The script layout for one attempt.
    pub fn layout<'a>(
        &'a self,
        keys: &Keyspace,
        fingerprint: &'a str,
        groups: &'a [Group],
        with_locator: bool,
        flags: Flags,
        params: [String; 2],
    ) -> Layout<'a> {
        let coordinator = self.coordinator();
        let locator = (with_locator && self.separate_locator()).then(|| {
            (
                self.kind.record(keys, self.home, &self.id),
                keys.marker(self.home),
            )
        });
        Layout {
            id: &self.id,
            fingerprint,
            records: Records {
                coordinator: self.kind.record(keys, coordinator, &self.id),
                coordinator_marker: keys.marker(coordinator),
                coordinator_seen: keys.seen(coordinator),
                locator,
            },
            groups,
            lines: &self.lines,
            flags,
            params,
            stock_keys: &self.stock_keys,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(sku: &str) -> ScriptLine {
        ScriptLine {
            sku: sku.into(),
            location: "default".into(),
            amount: 1,
        }
    }

    #[test]
    fn groups_follow_first_appearance_and_coordinate_at_home_when_spanning() {
        let keys = Keyspace::new("t", 16);
        let skus: Vec<String> = (0..)
            .map(|i| format!("s{i}"))
            .scan(Vec::new(), |seen: &mut Vec<Partition>, s| {
                let p = keys.partition_of(&s);
                let fresh = !seen.contains(&p);
                seen.push(p);
                Some((s, fresh))
            })
            .filter(|(_, fresh)| *fresh)
            .map(|(s, _)| s)
            .take(2)
            .collect();
        let plan = Plan::new(
            &keys,
            Kind::Reservation,
            "r1",
            vec![line(&skus[1]), line(&skus[0]), line(&skus[1])],
        );
        assert_eq!(
            plan.parts,
            vec![keys.partition_of(&skus[1]), keys.partition_of(&skus[0])]
        );
        assert_eq!(
            plan.lines.iter().map(|(_, j)| *j).collect::<Vec<_>>(),
            [0, 1, 0]
        );
        assert_eq!(plan.coordinator(), keys.partition_of("r1"));
        assert!(!plan.separate_locator());

        let single = Plan::new(&keys, Kind::Request, "q", vec![line(&skus[0])]);
        assert_eq!(single.coordinator(), keys.partition_of(&skus[0]));
        assert_eq!(
            single.separate_locator(),
            keys.partition_of(&skus[0]) != keys.partition_of("q")
        );
    }
}
