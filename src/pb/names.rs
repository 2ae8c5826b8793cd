//! The lower-case short names of the contract's enum values: a value's name
//! without its enum's prefix (`STOCK_OP_RESERVE` → `reserve`,
//! `ITEM_STATE_IN_SYNC` → `in_sync`, `WEBHOOK_EVENT_OUT_OF_STOCK` →
//! `out_of_stock`). The event streams, the ledger, webhook payloads, the
//! Postgres tables and stockd's output spell the values this way, so the
//! spelling is derived from the proto once, here, instead of written out
//! per enum.

use super::{ItemState, StockOp, WebhookEvent, WebhookSecretSource};

/// An enum of the contract whose value names share one prefix.
pub trait ShortName: Copy + Sized + TryFrom<i32> {
    /// What every value name starts with, e.g. `STOCK_OP_`.
    const PREFIX: &'static str;

    /// The value's name in the proto, e.g. `STOCK_OP_RESERVE`.
    fn proto_name(self) -> &'static str;

    /// The value of a name in the proto.
    fn from_proto_name(name: &str) -> Option<Self>;

    /// `reserve` for `STOCK_OP_RESERVE`.
    fn short_name(self) -> String {
        let name = self.proto_name();
        name.strip_prefix(Self::PREFIX)
            .unwrap_or(name)
            .to_ascii_lowercase()
    }

    /// The value spelled `short` (lower case); `None` for any other text,
    /// including `unspecified`: the zero value is never a choice.
    fn from_short_name(short: &str) -> Option<Self> {
        if short.is_empty() || short == "unspecified" || short != short.to_ascii_lowercase() {
            return None;
        }
        Self::from_proto_name(&format!("{}{}", Self::PREFIX, short.to_ascii_uppercase()))
    }
}

/// The short name of a value as received on the wire, or its number when
/// this build does not know it (a newer server may send new values).
pub fn short_name_of<E: ShortName>(value: i32) -> String {
    match E::try_from(value) {
        Ok(known) => known.short_name(),
        Err(_) => value.to_string(),
    }
}

macro_rules! short_names {
    ($($enum:ident => $prefix:literal),* $(,)?) => {
        $(
            impl ShortName for $enum {
                const PREFIX: &'static str = $prefix;

                fn proto_name(self) -> &'static str {
                    self.as_str_name()
                }

                fn from_proto_name(name: &str) -> Option<Self> {
                    Self::from_str_name(name)
                }
            }
        )*
    };
}

short_names!(
    StockOp => "STOCK_OP_",
    ItemState => "ITEM_STATE_",
    WebhookEvent => "WEBHOOK_EVENT_",
    WebhookSecretSource => "WEBHOOK_SECRET_SOURCE_",
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_names_drop_the_prefix_and_round_trip() {
        assert_eq!(StockOp::Reserve.short_name(), "reserve");
        assert_eq!(
            ItemState::MissingInPostgres.short_name(),
            "missing_in_postgres"
        );
        assert_eq!(WebhookEvent::BackInStock.short_name(), "back_in_stock");
        assert_eq!(WebhookSecretSource::Server.short_name(), "server");
        assert_eq!(
            WebhookEvent::from_short_name("low_stock"),
            Some(WebhookEvent::LowStock)
        );
        for refused in ["", "unspecified", "LOW_STOCK", "low stock", "lowstock"] {
            assert_eq!(WebhookEvent::from_short_name(refused), None, "{refused:?}");
        }
        for op in 1..=7 {
            let name = short_name_of::<StockOp>(op);
            assert_eq!(StockOp::from_short_name(&name).map(i32::from), Some(op));
        }
        assert_eq!(short_name_of::<StockOp>(99), "99");
    }
}
