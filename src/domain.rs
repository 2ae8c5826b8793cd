//! Validated domain types. A value of these types has passed every input rule
//! of DESIGN.md, so the code behind the gRPC boundary never re-checks input
//! and a rejected request never reaches Redis (so it cannot change anything).

use std::collections::HashSet;
use std::fmt;
use std::time::Duration;

use crate::error::Error;

/// Largest quantity of one line, and largest |delta| of one adjustment.
pub const MAX_QUANTITY: i64 = 1_000_000;
/// Largest absolute level a `SetStock` may write.
pub const MAX_AVAILABLE: i64 = 1_000_000_000;
/// Most lines in one request.
pub const MAX_LINES: usize = 100;
pub const DEFAULT_RESERVATION_TTL: Duration = Duration::from_secs(900);
pub const MAX_RESERVATION_TTL: Duration = Duration::from_secs(86_400);
pub const DEFAULT_LOCATION: &str = "default";
const MAX_SKU_BYTES: usize = 128;
const MAX_LOCATION_BYTES: usize = 64;
const MAX_ID_BYTES: usize = 128;
const MAX_REASON_BYTES: usize = 256;

/// Printable UTF-8 of bounded length, in NFC, where every character prints
/// as itself: two identifiers that look alike are then the same identifier
/// (`order-1001` and `order-1001` + U+200B would otherwise be two
/// reservations, `default` + U+FEFF a second location printing as `default`).
fn check_token(field: &str, value: &str, max_bytes: usize) -> Result<(), Error> {
    if value.is_empty() {
        return Err(Error::invalid(field, "must not be empty"));
    }
    if value.len() > max_bytes {
        return Err(Error::invalid(
            field,
            format!("must be at most {max_bytes} bytes, got {}", value.len()),
        ));
    }
    // Printable ASCII without spaces prints as itself and is NFC: the usual
    // identifier passes without the Unicode tables (a hot-path cost).
    if value.bytes().all(|b| b.is_ascii_graphic()) {
        return Ok(());
    }
    if let Some((c, what)) = value.chars().find_map(|c| unprintable(c).map(|w| (c, w))) {
        return Err(Error::invalid(
            field,
            format!(
                "must hold printable characters only, found U+{:04X} ({what})",
                u32::from(c)
            ),
        ));
    }
    if !unicode_normalization::is_nfc(value) {
        return Err(Error::invalid(
            field,
            "must be in Unicode normalization form C (NFC): the same text can be \
             spelled with different code points; normalize it before sending",
        ));
    }
    Ok(())
}

/// Why `c` does not print as itself, if it does not: the general categories
/// Z* (whitespace, line and paragraph separators) and C* (control, format
/// such as zero-width and bidi characters, surrogate, private use,
/// unassigned). A character assigned by a Unicode version newer than the
/// tables of `unicode-properties` counts as unassigned until they catch up.
fn unprintable(c: char) -> Option<&'static str> {
    use unicode_properties::{GeneralCategory as Gc, UnicodeGeneralCategory};
    Some(match c.general_category() {
        Gc::SpaceSeparator => "whitespace",
        Gc::LineSeparator | Gc::ParagraphSeparator => "a line or paragraph separator",
        Gc::Control => "a control character",
        Gc::Format => "an invisible format character",
        Gc::Surrogate => "a surrogate",
        Gc::PrivateUse => "a private-use character",
        Gc::Unassigned => "an unassigned code point",
        _ => return None,
    })
}

macro_rules! token_type {
    ($(#[$doc:meta])* $name:ident, $max:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(String);

        impl $name {
            /// Validates `value`; `field` names it in the error.
            pub fn parse(field: &str, value: impl Into<String>) -> Result<Self, Error> {
                let value = value.into();
                check_token(field, &value, $max)?;
                Ok(Self(value))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

token_type!(
    /// A stock keeping unit, 1–128 bytes.
    Sku,
    MAX_SKU_BYTES
);
token_type!(
    /// A stock location (warehouse, store), 1–64 bytes.
    Location,
    MAX_LOCATION_BYTES
);
token_type!(
    /// A reservation id or request id chosen by the client, 1–128 bytes; it is
    /// the idempotency key of the request.
    RequestId,
    MAX_ID_BYTES
);

impl Location {
    /// Like `parse`, but an empty location means `default`.
    pub fn parse_or_default(field: &str, value: impl Into<String>) -> Result<Self, Error> {
        let value = value.into();
        if value.is_empty() {
            Ok(Self(DEFAULT_LOCATION.to_owned()))
        } else {
            Self::parse(field, value)
        }
    }
}

/// One (sku, location).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Item {
    pub sku: Sku,
    pub location: Location,
}

impl Item {
    /// `prefix` locates the item in the request for error messages: `""` for
    /// top-level `sku`/`location` fields, `lines[3]` for `lines[3].sku`.
    pub fn parse(prefix: &str, sku: String, location: String) -> Result<Self, Error> {
        let field = |name: &str| {
            if prefix.is_empty() {
                name.to_owned()
            } else {
                format!("{prefix}.{name}")
            }
        };
        Ok(Item {
            sku: Sku::parse(&field("sku"), sku)?,
            location: Location::parse_or_default(&field("location"), location)?,
        })
    }
}

impl fmt::Display for Item {
    /// `location/sku`, the subject used in error details.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.location, self.sku)
    }
}

/// A quantity of one line: 1 to 1,000,000.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Quantity(i64);

impl Quantity {
    pub fn parse(field: &str, value: i64) -> Result<Self, Error> {
        if !(1..=MAX_QUANTITY).contains(&value) {
            return Err(Error::invalid(
                field,
                format!("must be between 1 and {MAX_QUANTITY}, got {value}"),
            ));
        }
        Ok(Self(value))
    }

    pub fn get(self) -> i64 {
        self.0
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    pub item: Item,
    pub quantity: Quantity,
}

/// 1 to 100 lines, no (sku, location) twice: all-or-nothing requests apply to
/// a set of distinct items.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lines(Vec<Line>);

impl Lines {
    /// `lines` yields (sku, location, quantity) as received on the wire.
    pub fn parse(
        field: &str,
        lines: impl ExactSizeIterator<Item = (String, String, i64)>,
    ) -> Result<Self, Error> {
        if lines.len() == 0 {
            return Err(Error::invalid(field, "must hold at least one line"));
        }
        if lines.len() > MAX_LINES {
            return Err(Error::invalid(
                field,
                format!("must hold at most {MAX_LINES} lines, got {}", lines.len()),
            ));
        }
        let mut seen = HashSet::new();
        let mut parsed = Vec::with_capacity(lines.len());
        for (i, (sku, location, quantity)) in lines.enumerate() {
            let at = format!("{field}[{i}]");
            let item = Item::parse(&at, sku, location)?;
            let quantity = Quantity::parse(&format!("{at}.quantity"), quantity)?;
            if !seen.insert(item.clone()) {
                return Err(Error::invalid(
                    at,
                    format!("duplicate item {item}: merge the quantities into one line"),
                ));
            }
            parsed.push(Line { item, quantity });
        }
        Ok(Self(parsed))
    }

    pub fn iter(&self) -> std::slice::Iter<'_, Line> {
        self.0.iter()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl<'a> IntoIterator for &'a Lines {
    type Item = &'a Line;
    type IntoIter = std::slice::Iter<'a, Line>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

/// How long a reservation holds its units: 1 s to 24 h; 0 on the wire means
/// the default of 900 s.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ttl(Duration);

impl Ttl {
    pub fn parse(field: &str, seconds: u32) -> Result<Self, Error> {
        if seconds == 0 {
            return Ok(Self(DEFAULT_RESERVATION_TTL));
        }
        let ttl = Duration::from_secs(u64::from(seconds));
        if ttl > MAX_RESERVATION_TTL {
            return Err(Error::invalid(
                field,
                format!(
                    "must be at most {} seconds, got {seconds}",
                    MAX_RESERVATION_TTL.as_secs()
                ),
            ));
        }
        Ok(Self(ttl))
    }

    /// Extend has no default: 0 would expire the hold at once.
    pub fn parse_required(field: &str, seconds: u32) -> Result<Self, Error> {
        if seconds == 0 {
            return Err(Error::invalid(field, "must be at least 1 second"));
        }
        Self::parse(field, seconds)
    }

    pub fn as_millis(self) -> u64 {
        self.0.as_millis() as u64
    }
}

/// A signed change of `available`: non-zero, |delta| ≤ 1,000,000.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delta(i64);

impl Delta {
    pub fn parse(field: &str, value: i64) -> Result<Self, Error> {
        if value == 0 || !(-MAX_QUANTITY..=MAX_QUANTITY).contains(&value) {
            return Err(Error::invalid(
                field,
                format!(
                    "must be non-zero and between -{MAX_QUANTITY} and {MAX_QUANTITY}, got {value}"
                ),
            ));
        }
        Ok(Self(value))
    }

    pub fn get(self) -> i64 {
        self.0
    }
}

/// An absolute `available` for SetStock: 0 to 1,000,000,000.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Level(i64);

impl Level {
    pub fn parse(field: &str, value: i64) -> Result<Self, Error> {
        if !(0..=MAX_AVAILABLE).contains(&value) {
            return Err(Error::invalid(
                field,
                format!("must be between 0 and {MAX_AVAILABLE}, got {value}"),
            ));
        }
        Ok(Self(value))
    }

    pub fn get(self) -> i64 {
        self.0
    }
}

/// The expected version of a compare-and-set: ≥ 0, where 0 means "the item
/// must not exist yet".
pub fn parse_expected_version(field: &str, value: Option<i64>) -> Result<Option<i64>, Error> {
    match value {
        Some(v) if v < 0 => Err(Error::invalid(field, format!("must be >= 0, got {v}"))),
        other => Ok(other),
    }
}

/// Free text explaining an adjustment: at most 256 bytes, no control characters.
pub fn parse_reason(field: &str, value: String) -> Result<String, Error> {
    if value.len() > MAX_REASON_BYTES {
        return Err(Error::invalid(
            field,
            format!("must be at most {MAX_REASON_BYTES} bytes"),
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(Error::invalid(field, "must not contain control characters"));
    }
    Ok(value)
}

/// The state of one item as stored in Redis (and later, Postgres).
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct StockLevel {
    pub sku: String,
    pub location: String,
    pub available: i64,
    pub reserved: i64,
    pub version: i64,
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn line(sku: &str, loc: &str, qty: i64) -> (String, String, i64) {
        (sku.to_owned(), loc.to_owned(), qty)
    }

    fn field_of(err: Error) -> String {
        match err {
            Error::InvalidArgument { field, .. } => field,
            other => panic!("expected InvalidArgument, got {other:?}"),
        }
    }

    #[test]
    fn tokens_refuse_empty_long_and_whitespace() {
        assert!(Sku::parse("sku", "tshirt-red-m").is_ok());
        assert!(Sku::parse("sku", "é-ü").is_ok());
        assert_eq!(field_of(Sku::parse("sku", "").unwrap_err()), "sku");
        assert!(Sku::parse("sku", "a".repeat(128)).is_ok());
        assert!(Sku::parse("sku", "a".repeat(129)).is_err());
        assert!(Sku::parse("sku", "a b").is_err());
        assert!(Sku::parse("sku", "a\u{7}").is_err());
        assert!(Location::parse("l", "x".repeat(65)).is_err());
        assert_eq!(
            Location::parse_or_default("l", "").unwrap().as_str(),
            "default"
        );
        assert!(RequestId::parse("id", "x".repeat(129)).is_err());
    }

    /// What the black-box probe found (issue 16), and one of each other
    /// refused category.
    const UNPRINTABLE: [&str; 14] = [
        "order-1001\u{200B}", // zero width space, Cf
        "default\u{FEFF}",    // byte order mark, Cf
        "a\u{202E}b",         // right-to-left override, Cf
        "a\u{2060}b",         // word joiner, Cf
        "a\u{AD}b",           // soft hyphen, Cf
        "\u{E000}",           // private use, Co
        "a\u{10FFFD}",        // supplementary private use, Co
        "a\u{378}",           // unassigned, Cn
        "a\u{FFFF}",          // noncharacter, Cn
        "a\u{2028}b",         // line separator, Zl
        "a\u{2029}b",         // paragraph separator, Zp
        "a\u{A0}b",           // no-break space, Zs
        "a\u{3000}b",         // ideographic space, Zs
        "a\u{85}b",           // next line, Cc
    ];

    #[test]
    fn tokens_refuse_what_does_not_print_as_itself() {
        for bad in UNPRINTABLE {
            let err = RequestId::parse("reservation_id", bad).unwrap_err();
            assert!(err.to_string().contains("printable"), "{bad:?}: {err}");
            assert_eq!(field_of(err), "reservation_id", "{bad:?}");
            assert_eq!(field_of(Sku::parse("sku", bad).unwrap_err()), "sku");
            assert_eq!(
                field_of(Location::parse_or_default("location", bad).unwrap_err()),
                "location"
            );
        }
    }

    #[test]
    fn tokens_must_be_nfc() {
        // é precomposed (NFC) and as e + combining acute (NFD).
        assert!(Sku::parse("sku", "caf\u{E9}").is_ok());
        let err = Sku::parse("sku", "cafe\u{301}").unwrap_err();
        assert!(err.to_string().contains("NFC"), "{err}");
        // Ω as OHM SIGN normalizes to GREEK CAPITAL OMEGA.
        assert!(Location::parse("location", "\u{2126}").is_err());
        assert!(Location::parse("location", "\u{3A9}").is_ok());
        // A mark with no precomposed form is NFC, and printable.
        assert!(RequestId::parse("id", "q\u{307}").is_ok());
    }

    proptest! {
        /// Letters, marks, numbers, punctuation and symbols all print; such a
        /// token is accepted exactly when it is NFC, and its NFC form is.
        #[test]
        fn printable_tokens_are_accepted_when_nfc(
            token in "[\\p{L}\\p{M}\\p{N}\\p{P}\\p{S}]{1,20}"
        ) {
            use unicode_normalization::UnicodeNormalization;
            let nfc: String = token.nfc().collect();
            prop_assert_eq!(
                Sku::parse("sku", token.as_str()).is_ok(),
                nfc == token,
                "{:?}", token
            );
            if nfc.len() <= MAX_SKU_BYTES {
                prop_assert!(Sku::parse("sku", nfc.as_str()).is_ok(), "{:?}", nfc);
            }
        }

        /// One character of a separator or "other" category anywhere in an
        /// otherwise good token gets the token refused, naming the field.
        #[test]
        fn one_unprintable_character_anywhere_is_refused(
            token in "[a-z0-9._-]{0,20}",
            bad in any::<char>().prop_filter("separator or other", |c| {
                use unicode_properties::{GeneralCategoryGroup as G, UnicodeGeneralCategory};
                matches!(c.general_category_group(), G::Separator | G::Other)
            }),
            at in 0usize..=20,
        ) {
            let mut token = token;
            token.insert(at.min(token.len()), bad);
            for (field, result) in [
                ("sku", Sku::parse("sku", token.as_str()).map(drop)),
                ("location", Location::parse_or_default("location", token.as_str()).map(drop)),
                ("request_id", RequestId::parse("request_id", token.as_str()).map(drop)),
            ] {
                prop_assert_eq!(field_of(result.unwrap_err()), field);
            }
        }
    }

    #[test]
    fn lines_name_the_offending_field() {
        let err = Lines::parse(
            "lines",
            vec![line("a", "", 1), line("b", "", 0)].into_iter(),
        )
        .unwrap_err();
        assert_eq!(field_of(err), "lines[1].quantity");
        let err =
            Lines::parse("lines", vec![line("a", "", 1), line("", "", 1)].into_iter()).unwrap_err();
        assert_eq!(field_of(err), "lines[1].sku");
        assert!(Lines::parse("lines", vec![line("a", "", 1_000_001)].into_iter()).is_err());
        assert!(Lines::parse("lines", vec![line("a", "", -1)].into_iter()).is_err());
        assert_eq!(
            field_of(Lines::parse("lines", Vec::new().into_iter()).unwrap_err()),
            "lines"
        );
        let many = (0..101)
            .map(|i| line(&format!("s{i}"), "", 1))
            .collect::<Vec<_>>();
        assert_eq!(
            field_of(Lines::parse("lines", many.into_iter()).unwrap_err()),
            "lines"
        );
    }

    #[test]
    fn duplicate_items_are_refused_even_via_the_default_location() {
        let err = Lines::parse(
            "lines",
            vec![line("a", "", 1), line("a", "default", 2)].into_iter(),
        )
        .unwrap_err();
        assert_eq!(field_of(err), "lines[1]");
        assert!(
            Lines::parse(
                "lines",
                vec![line("a", "x", 1), line("a", "y", 2)].into_iter()
            )
            .is_ok()
        );
    }

    #[test]
    fn ttl_defaults_and_bounds() {
        assert_eq!(Ttl::parse("ttl", 0).unwrap().as_millis(), 900_000);
        assert_eq!(Ttl::parse("ttl", 86_400).unwrap().as_millis(), 86_400_000);
        assert!(Ttl::parse("ttl", 86_401).is_err());
        assert!(Ttl::parse_required("ttl", 0).is_err());
    }

    #[test]
    fn deltas_and_levels() {
        assert!(Delta::parse("d", 0).is_err());
        assert!(Delta::parse("d", -1_000_000).is_ok());
        assert!(Delta::parse("d", 1_000_001).is_err());
        assert!(Level::parse("a", 0).is_ok());
        assert!(Level::parse("a", -1).is_err());
        assert!(parse_expected_version("v", Some(-1)).is_err());
        assert!(parse_reason("r", "damaged in transit".into()).is_ok());
        assert!(parse_reason("r", "a\nb".into()).is_err());
    }
}
