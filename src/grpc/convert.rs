//! Conversions between the wire (`pb`) and the domain. Parsing a request is
//! where validation happens: every `parse_*` names the offending field.

use crate::domain::{Item, Lines, MAX_LINES, StockLevel};
use crate::error::Error;
use crate::events::{ChangeEvent, Op};
use crate::pb;
use crate::reconcile::Class;

pub fn lines(field: &str, lines: Vec<pb::Line>) -> Result<Lines, Error> {
    Lines::parse(
        field,
        lines.into_iter().map(|l| (l.sku, l.location, l.quantity)),
    )
}

pub fn items(field: &str, items: Vec<pb::ItemRef>) -> Result<Vec<Item>, Error> {
    if items.is_empty() {
        return Err(Error::invalid(field, "must hold at least one item"));
    }
    if items.len() > MAX_LINES {
        return Err(Error::invalid(
            field,
            format!("must hold at most {MAX_LINES} items, got {}", items.len()),
        ));
    }
    items
        .into_iter()
        .enumerate()
        .map(|(i, item)| Item::parse(&format!("{field}[{i}]"), item.sku, item.location))
        .collect()
}

pub fn level(level: StockLevel) -> pb::StockLevel {
    pb::StockLevel {
        sku: level.sku,
        location: level.location,
        available: level.available,
        reserved: level.reserved,
        version: level.version,
    }
}

pub fn levels(levels: Vec<StockLevel>) -> Vec<pb::StockLevel> {
    levels.into_iter().map(level).collect()
}

/// The single level of a one-item change.
pub fn single_level(levels: Vec<StockLevel>) -> Result<pb::StockLevel, Error> {
    levels
        .into_iter()
        .next()
        .map(level)
        .ok_or_else(|| Error::Internal("a one-item change returned no level".into()))
}

pub fn item_ref(item: Item) -> pb::ItemRef {
    pb::ItemRef {
        sku: item.sku.to_string(),
        location: item.location.to_string(),
    }
}

impl From<Op> for pb::StockOp {
    fn from(op: Op) -> Self {
        match op {
            Op::Reserve => pb::StockOp::Reserve,
            Op::Commit => pb::StockOp::Commit,
            Op::Release => pb::StockOp::Release,
            Op::Expire => pb::StockOp::Expire,
            Op::Decrement => pb::StockOp::Decrement,
            Op::Adjust => pb::StockOp::Adjust,
            Op::Set => pb::StockOp::Set,
        }
    }
}

impl From<Class> for pb::ItemState {
    fn from(class: Class) -> Self {
        match class {
            Class::InSync => pb::ItemState::InSync,
            Class::PendingFlush => pb::ItemState::PendingFlush,
            Class::RedisStale => pb::ItemState::RedisStale,
            Class::Drift => pb::ItemState::Drift,
            Class::MissingInRedis => pb::ItemState::MissingInRedis,
            Class::MissingInPostgres => pb::ItemState::MissingInPostgres,
            Class::LedgerMismatch => pb::ItemState::LedgerMismatch,
        }
    }
}

/// The wire form of a change event (DESIGN.md wire names).
pub fn stock_event(e: &ChangeEvent) -> pb::StockEvent {
    pb::StockEvent {
        event_id: e.entry_id.to_string(),
        partition: e.partition,
        sku: e.sku.clone(),
        location: e.location.clone(),
        op: pb::StockOp::from(e.op).into(),
        delta_available: e.d_available,
        delta_reserved: e.d_reserved,
        available: e.available,
        reserved: e.reserved,
        version: e.version,
        reference: e.reference.clone(),
        ts_ms: e.ts_ms,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb::ShortName;

    /// The wire names the same operations and classes as the streams, the
    /// ledger and the metrics (`stockd_reconcile_items{class}`) do.
    #[test]
    fn wire_enums_spell_what_the_streams_and_metrics_spell() {
        for op in [
            Op::Reserve,
            Op::Commit,
            Op::Release,
            Op::Expire,
            Op::Decrement,
            Op::Adjust,
            Op::Set,
        ] {
            assert_eq!(pb::StockOp::from(op).short_name(), op.as_str());
        }
        for class in Class::ALL {
            assert_eq!(pb::ItemState::from(class).short_name(), class.as_str());
        }
    }
}
