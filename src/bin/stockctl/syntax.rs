//! The command-line syntax of items and lines, in one place.
//!
//! - ITEM is `SKU` or `SKU@LOCATION`.
//! - LINE is `SKU:QTY` or `SKU@LOCATION:QTY`, e.g. `tshirt-red-m@berlin:2`.
//!
//! The quantity is split off at the *last* `:` and the location at the *last*
//! `@`, so a SKU that contains `:`, or `@` followed by a location, can be
//! written as it is. Any name can be written by escaping: `\` makes the
//! next character literal (`a\@b` is the SKU `a@b`), and double quotes make
//! everything between them literal (`"a@b"@berlin:2`). A literal `\` or `"`
//! is written `\\` or `\"`. An omitted location is sent as the empty
//! string, which the server reads as `default`. [`ItemSpec`]'s `Display`
//! writes the form that parses back to the same item.
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
    UnclosedQuote,
    TrailingBackslash,
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
            SyntaxError::UnclosedQuote => f.write_str("a '\"' is not closed"),
            SyntaxError::TrailingBackslash => {
                f.write_str("a '\\' at the end escapes nothing (write '\\\\' for a backslash)")
            }
        }
    }
}

impl std::error::Error for SyntaxError {}

/// One character of an argument after unescaping; `literal` when it was
/// escaped or quoted, so it cannot separate parts.
#[derive(Clone, Copy)]
struct Char {
    c: char,
    literal: bool,
}

/// Removes the quotes and escapes, remembering which characters they made
/// literal.
fn unescape(s: &str) -> Result<Vec<Char>, SyntaxError> {
    let mut out = Vec::with_capacity(s.len());
    let mut chars = s.chars();
    let mut quoted = false;
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                let next = chars.next().ok_or(SyntaxError::TrailingBackslash)?;
                out.push(Char {
                    c: next,
                    literal: true,
                });
            }
            '"' => quoted = !quoted,
            c => out.push(Char { c, literal: quoted }),
        }
    }
    if quoted {
        return Err(SyntaxError::UnclosedQuote);
    }
    Ok(out)
}

/// Splits at the last separator `sep` that is not literal.
fn split_last(chars: &[Char], sep: char) -> Option<(&[Char], &[Char])> {
    let at = chars.iter().rposition(|ch| ch.c == sep && !ch.literal)?;
    Some((&chars[..at], &chars[at + 1..]))
}

fn text(chars: &[Char]) -> String {
    chars.iter().map(|ch| ch.c).collect()
}

fn item_of(chars: &[Char]) -> Result<ItemSpec, SyntaxError> {
    let (sku, location) = match split_last(chars, '@') {
        Some((_, [])) => return Err(SyntaxError::EmptyLocation),
        Some((sku, location)) => (sku, text(location)),
        None => (chars, String::new()),
    };
    if sku.is_empty() {
        return Err(SyntaxError::EmptySku);
    }
    Ok(ItemSpec {
        sku: text(sku),
        location,
    })
}

/// Parses `SKU` or `SKU@LOCATION`.
pub fn parse_item(s: &str) -> Result<ItemSpec, SyntaxError> {
    if s.is_empty() {
        return Err(SyntaxError::Empty);
    }
    item_of(&unescape(s)?)
}

/// Parses `SKU[@LOCATION]:QTY`.
pub fn parse_line(s: &str) -> Result<LineSpec, SyntaxError> {
    if s.is_empty() {
        return Err(SyntaxError::Empty);
    }
    let chars = unescape(s)?;
    let (item, qty) = split_last(&chars, ':').ok_or(SyntaxError::MissingQuantity)?;
    let qty = text(qty);
    if qty.is_empty() {
        return Err(SyntaxError::EmptyQuantity);
    }
    let quantity = qty
        .parse::<i64>()
        .map_err(|_| SyntaxError::BadQuantity(qty.clone()))?;
    Ok(LineSpec {
        item: item_of(item)?,
        quantity,
    })
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

/// Writes `name` with the characters that could be read as syntax escaped.
fn write_escaped(f: &mut fmt::Formatter<'_>, name: &str) -> fmt::Result {
    for c in name.chars() {
        // `:` needs no escape: the quantity is split off at the last `:`,
        // and a quantity has none.
        if matches!(c, '\\' | '"' | '@') {
            f.write_str("\\")?;
        }
        write!(f, "{c}")?;
    }
    Ok(())
}

impl fmt::Display for ItemSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_escaped(f, &self.sku)?;
        if !self.location.is_empty() {
            f.write_str("@")?;
            write_escaped(f, &self.location)?;
        }
        Ok(())
    }
}

impl fmt::Display for LineSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.item, self.quantity)
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
        for s in ["a", "a@b", "a\\@b@c", "ns:sku@x:y"] {
            assert_eq!(parse_item(s).unwrap().to_string(), s);
        }
    }

    #[test]
    fn backslash_makes_the_next_character_literal() {
        assert_eq!(parse_item("a\\@b"), Ok(item("a@b", "")));
        assert_eq!(parse_item("a@x\\@y"), Ok(item("a", "x@y")));
        assert_eq!(parse_item("a\\\\b"), Ok(item("a\\b", "")));
        assert_eq!(
            parse_line("a\\:3@b\\:c:2"),
            Ok(LineSpec {
                item: item("a:3", "b:c"),
                quantity: 2
            })
        );
        assert_eq!(parse_line("a\\:2"), Err(SyntaxError::MissingQuantity));
    }

    #[test]
    fn quotes_make_their_content_literal() {
        assert_eq!(
            parse_line("\"a@b\"@\"x@y:z\":4"),
            Ok(LineSpec {
                item: item("a@b", "x@y:z"),
                quantity: 4
            })
        );
        assert_eq!(parse_item("\"a\\\"b\""), Ok(item("a\"b", "")));
        assert_eq!(parse_item("pre\"@\"post"), Ok(item("pre@post", "")));
    }

    #[test]
    fn escapes_that_do_not_close() {
        assert_eq!(parse_item("\"a"), Err(SyntaxError::UnclosedQuote));
        assert_eq!(parse_item("a\\"), Err(SyntaxError::TrailingBackslash));
        assert_eq!(parse_item("\"\"@b"), Err(SyntaxError::EmptySku));
        assert_eq!(parse_item("a@\"\""), Err(SyntaxError::EmptyLocation));
    }

    /// Names with every character the syntax gives a meaning to.
    fn name() -> impl proptest::strategy::Strategy<Value = String> {
        proptest::string::string_regex("[a-z@:\\\\\"%é -]{1,12}").unwrap()
    }

    proptest::proptest! {
        #[test]
        fn items_and_lines_parse_back_from_their_rendering(
            sku in name(),
            location in proptest::option::of(name()),
            quantity in proptest::num::i64::ANY,
        ) {
            let item = ItemSpec { sku, location: location.unwrap_or_default() };
            proptest::prop_assert_eq!(parse_item(&item.to_string()), Ok(item.clone()));
            let line = LineSpec { item, quantity };
            proptest::prop_assert_eq!(parse_line(&line.to_string()), Ok(line));
        }
    }
}
