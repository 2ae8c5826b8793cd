//! The command-line syntax of items and lines, in one place.
//!
//! - ITEM is `SKU` or `SKU@LOCATION`.
//! - LINE is `SKU:QTY` or `SKU@LOCATION:QTY`, e.g. `tshirt-red-m@berlin:2`.
//!
//! The quantity is split off at the *last* `:` and the location at the *last*
//! `@`, so a SKU that itself contains `:` or `@` can still be written (a SKU
//! with `@` then needs an explicit location: `a@b@default`). An omitted
//! location is sent as the empty string, which the server reads as `default`.
//!
//! Only the syntax is checked here. Length limits, allowed characters and the
//! quantity range are the server's to judge (it answers `INVALID_ARGUMENT`),
//! so that the contract has one enforcer and the client cannot drift from it.

use std::fmt;
use std::str::FromStr;

use stockd::pb;

/// A parsed ITEM: `SKU` or `SKU@LOCATION`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ItemSpec {
    pub sku: String,
    /// Empty when the user did not name one (the server's `default`).
    pub location: String,
}

/// A parsed LINE: `SKU[@LOCATION]:QTY`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineSpec {
    pub item: ItemSpec,
    pub quantity: i64,
}

/// Why an ITEM or LINE argument could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SyntaxError {
    Empty,
    EmptySku,
    EmptyLocation,
    MissingQuantity,
    EmptyQuantity,
    BadQuantity(String),
}

impl fmt::Display for SyntaxError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SyntaxError::Empty => f.write_str("empty value"),
            SyntaxError::EmptySku => f.write_str("the SKU is empty"),
            SyntaxError::EmptyLocation => {
                f.write_str("the location after '@' is empty (leave out '@' for the default)")
            }
            SyntaxError::MissingQuantity => {
                f.write_str("missing ':QTY' (expected SKU[@LOCATION]:QTY)")
            }
            SyntaxError::EmptyQuantity => f.write_str("the quantity after ':' is empty"),
            SyntaxError::BadQuantity(q) => write!(f, "the quantity '{q}' is not an integer"),
        }
    }
}

impl std::error::Error for SyntaxError {}

/// Parses `SKU` or `SKU@LOCATION`.
pub fn parse_item(s: &str) -> Result<ItemSpec, SyntaxError> {
    if s.is_empty() {
        return Err(SyntaxError::Empty);
    }
    let (sku, location) = match s.rsplit_once('@') {
        Some((sku, location)) => {
            if location.is_empty() {
                return Err(SyntaxError::EmptyLocation);
            }
            (sku, location)
        }
        None => (s, ""),
    };
    if sku.is_empty() {
        return Err(SyntaxError::EmptySku);
    }
    Ok(ItemSpec {
        sku: sku.to_owned(),
        location: location.to_owned(),
    })
}

/// Parses `SKU[@LOCATION]:QTY`.
pub fn parse_line(s: &str) -> Result<LineSpec, SyntaxError> {
    if s.is_empty() {
        return Err(SyntaxError::Empty);
    }
    let (item, qty) = s.rsplit_once(':').ok_or(SyntaxError::MissingQuantity)?;
    if qty.is_empty() {
        return Err(SyntaxError::EmptyQuantity);
    }
    let quantity = qty
        .parse::<i64>()
        .map_err(|_| SyntaxError::BadQuantity(qty.to_owned()))?;
    let item = parse_item(item).map_err(|e| match e {
        SyntaxError::Empty => SyntaxError::EmptySku,
        other => other,
    })?;
    Ok(LineSpec { item, quantity })
}

impl FromStr for ItemSpec {
    type Err = SyntaxError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_item(s)
    }
}

impl FromStr for LineSpec {
    type Err = SyntaxError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_line(s)
    }
}

impl fmt::Display for ItemSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.location.is_empty() {
            f.write_str(&self.sku)
        } else {
            write!(f, "{}@{}", self.sku, self.location)
        }
    }
}

impl From<ItemSpec> for pb::ItemRef {
    fn from(i: ItemSpec) -> Self {
        pb::ItemRef {
            sku: i.sku,
            location: i.location,
        }
    }
}

impl From<LineSpec> for pb::Line {
    fn from(l: LineSpec) -> Self {
        pb::Line {
            sku: l.item.sku,
            location: l.item.location,
            quantity: l.quantity,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(sku: &str, location: &str) -> ItemSpec {
        ItemSpec {
            sku: sku.into(),
            location: location.into(),
        }
    }

    #[test]
    fn item_without_location_has_empty_location() {
        assert_eq!(parse_item("tshirt-red-m"), Ok(item("tshirt-red-m", "")));
    }

    #[test]
    fn item_with_location() {
        assert_eq!(
            parse_item("tshirt-red-m@berlin"),
            Ok(item("tshirt-red-m", "berlin"))
        );
    }

    #[test]
    fn item_splits_at_last_at_sign() {
        assert_eq!(parse_item("a@b@c"), Ok(item("a@b", "c")));
    }

    #[test]
    fn item_may_contain_colon() {
        assert_eq!(parse_item("a:3"), Ok(item("a:3", "")));
    }

    #[test]
    fn item_invalid_forms() {
        assert_eq!(parse_item(""), Err(SyntaxError::Empty));
        assert_eq!(parse_item("a@"), Err(SyntaxError::EmptyLocation));
        assert_eq!(parse_item("@b"), Err(SyntaxError::EmptySku));
        assert_eq!(parse_item("@"), Err(SyntaxError::EmptyLocation));
    }

    #[test]
    fn line_with_location() {
        assert_eq!(
            parse_line("a@b:3"),
            Ok(LineSpec {
                item: item("a", "b"),
                quantity: 3
            })
        );
        assert_eq!(
            parse_line("tshirt-red-m@berlin:2"),
            Ok(LineSpec {
                item: item("tshirt-red-m", "berlin"),
                quantity: 2
            })
        );
    }

    #[test]
    fn line_without_location() {
        assert_eq!(
            parse_line("a:3"),
            Ok(LineSpec {
                item: item("a", ""),
                quantity: 3
            })
        );
    }

    #[test]
    fn line_splits_quantity_at_last_colon() {
        assert_eq!(
            parse_line("ns:sku@x:10"),
            Ok(LineSpec {
                item: item("ns:sku", "x"),
                quantity: 10
            })
        );
    }

    #[test]
    fn line_out_of_range_quantity_is_left_to_the_server() {
        // Syntax only: zero and negatives parse, the server refuses them.
        assert_eq!(parse_line("a:0").map(|l| l.quantity), Ok(0));
        assert_eq!(parse_line("a:-2").map(|l| l.quantity), Ok(-2));
    }

    #[test]
    fn line_invalid_forms() {
        assert_eq!(parse_line(""), Err(SyntaxError::Empty));
        assert_eq!(parse_line("a@:3"), Err(SyntaxError::EmptyLocation));
        assert_eq!(parse_line("a:x"), Err(SyntaxError::BadQuantity("x".into())));
        assert_eq!(parse_line("a"), Err(SyntaxError::MissingQuantity));
        assert_eq!(parse_line("a@b"), Err(SyntaxError::MissingQuantity));
        assert_eq!(parse_line("a:"), Err(SyntaxError::EmptyQuantity));
        assert_eq!(parse_line(":3"), Err(SyntaxError::EmptySku));
        assert_eq!(parse_line("@b:3"), Err(SyntaxError::EmptySku));
        assert_eq!(
            parse_line("a:1.5"),
            Err(SyntaxError::BadQuantity("1.5".into()))
        );
        assert_eq!(
            parse_line("a:99999999999999999999"),
            Err(SyntaxError::BadQuantity("99999999999999999999".into()))
        );
    }

    #[test]
    fn converts_to_wire_types() {
        let l: pb::Line = parse_line("a@b:3").unwrap().into();
        assert_eq!(
            l,
            pb::Line {
                sku: "a".into(),
                location: "b".into(),
                quantity: 3
            }
        );
        let i: pb::ItemRef = parse_item("a").unwrap().into();
        assert_eq!(
            i,
            pb::ItemRef {
                sku: "a".into(),
                location: String::new()
            }
        );
    }

    #[test]
    fn display_round_trips() {
        for s in ["a", "a@b", "a@b@c"] {
            assert_eq!(parse_item(s).unwrap().to_string(), s);
        }
    }
}
