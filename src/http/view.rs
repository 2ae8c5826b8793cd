//! What the HTTP API shows of a level or an event, by [`Access`]: the
//! quantities and event details to a full client, only the availability
//! bucket to a public one. Every JSON body, SSE event and GraphQL object
//! of the API is built from these, so public mode has one place to leak
//! from, and it does not.

use serde::Serialize;

use super::access::Access;
use crate::domain::StockLevel;
use crate::events::ChangeEvent;

/// How available an item is, without saying how many.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, async_graphql::Enum)]
#[serde(rename_all = "snake_case")]
#[allow(clippy::enum_variant_names)] // they spell the API's words
pub(crate) enum Availability {
    /// `available > low_stock`.
    InStock,
    /// `0 < available <= low_stock`.
    LowStock,
    /// `available == 0` (every unit sold or held by a reservation).
    OutOfStock,
}

/// The `low_stock` threshold (`STOCKD_LOW_STOCK`); 0 = no item is ever
/// `low_stock`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LowStock(pub i64);

impl LowStock {
    pub fn bucket(self, available: i64) -> Availability {
        if available <= 0 {
            Availability::OutOfStock
        } else if available <= self.0 {
            Availability::LowStock
        } else {
            Availability::InStock
        }
    }

    /// Whether a public client learns anything from `event`: only events
    /// that move the item to another bucket are shown to it (the level
    /// before an event is its level after, less the event's delta).
    pub fn changes_bucket(self, event: &ChangeEvent) -> bool {
        self.bucket(event.available - event.d_available) != self.bucket(event.available)
    }
}

/// One item, `GET /v1/stock...`.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct LevelView {
    pub sku: String,
    pub location: String,
    #[serde(flatten)]
    pub quantities: Option<Quantities>,
    pub availability: Availability,
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct Quantities {
    pub available: i64,
    pub reserved: i64,
    pub version: i64,
}

impl LevelView {
    pub fn new(level: StockLevel, access: Access, low: LowStock) -> Self {
        let availability = low.bucket(level.available);
        let quantities = (access == Access::Full).then_some(Quantities {
            available: level.available,
            reserved: level.reserved,
            version: level.version,
        });
        Self {
            sku: level.sku,
            location: level.location,
            quantities,
            availability,
        }
    }
}

/// One change, the `data:` of an SSE event: the fields of DESIGN.md
/// "Events" under the names of the gRPC `StockEvent` (and of `stockctl
/// watch --json`), plus the availability bucket.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct EventView {
    pub event_id: String,
    pub sku: String,
    pub location: String,
    #[serde(flatten)]
    pub details: Option<EventDetails>,
    pub availability: Availability,
    pub ts_ms: i64,
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct EventDetails {
    pub partition: u32,
    pub op: &'static str,
    pub delta_available: i64,
    pub delta_reserved: i64,
    pub available: i64,
    pub reserved: i64,
    pub version: i64,
    pub reference: String,
}

impl EventView {
    pub fn new(event: &ChangeEvent, access: Access, low: LowStock) -> Self {
        let details = (access == Access::Full).then(|| EventDetails {
            partition: event.partition,
            op: event.op.as_str(),
            delta_available: event.d_available,
            delta_reserved: event.d_reserved,
            available: event.available,
            reserved: event.reserved,
            version: event.version,
            reference: event.reference.clone(),
        });
        Self {
            event_id: event.entry_id.to_string(),
            sku: event.sku.clone(),
            location: event.location.clone(),
            details,
            availability: low.bucket(event.available),
            ts_ms: event.ts_ms,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::Op;

    fn event(available: i64, d_available: i64) -> ChangeEvent {
        ChangeEvent {
            entry_id: crate::events::EntryId { ms: 1, seq: 0 },
            partition: 3,
            sku: "A".into(),
            location: "default".into(),
            op: Op::Reserve,
            d_available,
            d_reserved: -d_available,
            available,
            reserved: -d_available,
            version: 7,
            reference: "cart-1".into(),
            ts_ms: 5,
            expires_at_ms: None,
            fingerprint: None,
        }
    }

    #[test]
    fn buckets_have_exact_edges() {
        let low = LowStock(5);
        assert_eq!(low.bucket(0), Availability::OutOfStock);
        assert_eq!(low.bucket(1), Availability::LowStock);
        assert_eq!(low.bucket(5), Availability::LowStock);
        assert_eq!(low.bucket(6), Availability::InStock);
        assert_eq!(LowStock(0).bucket(1), Availability::InStock);
        assert!(!low.changes_bucket(&event(9, -1)));
        assert!(low.changes_bucket(&event(5, -1)));
        assert!(low.changes_bucket(&event(0, -2)));
        assert!(!low.changes_bucket(&event(3, -1)));
    }

    #[test]
    fn public_views_hold_no_quantity() {
        let level = StockLevel {
            sku: "A".into(),
            location: "default".into(),
            available: 3,
            reserved: 2,
            version: 9,
        };
        let public =
            serde_json::to_value(LevelView::new(level.clone(), Access::Public, LowStock(5)))
                .unwrap();
        assert_eq!(
            public,
            serde_json::json!({"sku": "A", "location": "default", "availability": "low_stock"})
        );
        let full = serde_json::to_value(LevelView::new(level, Access::Full, LowStock(5))).unwrap();
        assert_eq!(full["available"], 3);
        assert_eq!(full["version"], 9);

        let public =
            serde_json::to_value(EventView::new(&event(5, -1), Access::Public, LowStock(5)))
                .unwrap();
        let keys: Vec<&str> = public
            .as_object()
            .unwrap()
            .keys()
            .map(|k| k.as_str())
            .collect();
        assert_eq!(keys.len(), 5, "{public}");
        for key in ["event_id", "sku", "location", "availability", "ts_ms"] {
            assert!(keys.contains(&key), "{public}");
        }
        let full =
            serde_json::to_value(EventView::new(&event(5, -1), Access::Full, LowStock(5))).unwrap();
        assert_eq!(full["op"], "reserve");
        assert_eq!(full["reference"], "cart-1");
        assert_eq!(full["delta_available"], -1);
    }
}
