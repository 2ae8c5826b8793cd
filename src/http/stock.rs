//! JSON reads: `GET /v1/stock/{sku}?location=L` and
//! `GET /v1/stock?item=SKU[@LOC]&item=...`, through the same
//! [`Engine::get`] as gRPC `GetStock` (an item Redis lacks is loaded from
//! Postgres), with the same validation.

use axum::Json;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, RawQuery, State};
use serde::Serialize;

use super::AppState;
use super::access::Access;
use super::error::ApiError;
use super::view::LevelView;
use crate::domain::{Item, Location, MAX_LINES, Sku};
use crate::error::Error;

/// The query string's `(name, value)` pairs; a name outside `allowed` is
/// refused, so that a misspelt parameter is not silently ignored.
pub(crate) fn query_pairs(
    query: Option<&str>,
    allowed: &[&str],
) -> Result<Vec<(String, String)>, Error> {
    let pairs: Vec<(String, String)> = form_urlencoded::parse(query.unwrap_or("").as_bytes())
        .into_owned()
        .collect();
    if let Some((name, _)) = pairs.iter().find(|(n, _)| !allowed.contains(&n.as_str())) {
        return Err(Error::invalid(
            name.as_str(),
            format!("unknown query parameter; expected {}", allowed.join(", ")),
        ));
    }
    Ok(pairs)
}

/// The values of `name` in `pairs`, in order.
pub(crate) fn values_of(pairs: Vec<(String, String)>, name: &str) -> Vec<String> {
    pairs
        .into_iter()
        .filter(|(n, _)| n == name)
        .map(|(_, v)| v)
        .collect()
}

/// `GET /v1/stock/{sku}?location=L`: the item, or 404.
pub(crate) async fn one(
    State(app): State<AppState>,
    access: Access,
    sku: Result<Path<String>, PathRejection>,
    RawQuery(query): RawQuery,
) -> Result<Json<LevelView>, ApiError> {
    let Path(sku) = sku.map_err(|e| Error::invalid("sku", e.body_text()))?;
    let pairs = query_pairs(query.as_deref(), &["location"])?;
    let mut locations = values_of(pairs, "location");
    if locations.len() > 1 {
        return Err(Error::invalid("location", "give it at most once").into());
    }
    let item = Item::parse("", sku, locations.pop().unwrap_or_default())?;
    let (levels, _missing) = app.engine.get(std::slice::from_ref(&item)).await?;
    match levels.into_iter().next() {
        Some(level) => Ok(Json(LevelView::new(level, access, app.live.low_stock()))),
        None => Err(Error::NotFound(format!("unknown item {item}")).into()),
    }
}

#[derive(Debug, Serialize)]
pub(crate) struct Levels {
    levels: Vec<LevelView>,
    missing: Vec<ItemRef>,
}

#[derive(Debug, Serialize)]
struct ItemRef {
    sku: String,
    location: String,
}

/// `GET /v1/stock?item=SKU[@LOC]&...`: the known items' levels and the
/// unknown ones. The location follows the LAST `@` (`A@B` is SKU `A` at
/// `B`; a SKU that contains `@` is written with its location,
/// `A@B@default`).
pub(crate) async fn many(
    State(app): State<AppState>,
    access: Access,
    RawQuery(query): RawQuery,
) -> Result<Json<Levels>, ApiError> {
    let specs = values_of(query_pairs(query.as_deref(), &["item"])?, "item");
    if specs.is_empty() {
        return Err(Error::invalid("item", "name at least one item: ?item=SKU[@LOCATION]").into());
    }
    if specs.len() > MAX_LINES {
        return Err(Error::invalid(
            "item",
            format!("at most {MAX_LINES} items, got {}", specs.len()),
        )
        .into());
    }
    let items = specs
        .into_iter()
        .enumerate()
        .map(|(i, spec)| {
            let field = format!("item[{i}]");
            match spec.rsplit_once('@') {
                // A location that is written must be one.
                Some((sku, location)) => Ok(Item {
                    sku: Sku::parse(&format!("{field}.sku"), sku)?,
                    location: Location::parse(&format!("{field}.location"), location)?,
                }),
                None => Item::parse(&field, spec, String::new()),
            }
        })
        .collect::<Result<Vec<Item>, Error>>()?;
    let (levels, missing) = app.engine.get(&items).await?;
    let low = app.live.low_stock();
    Ok(Json(Levels {
        levels: levels
            .into_iter()
            .map(|level| LevelView::new(level, access, low))
            .collect(),
        missing: missing
            .into_iter()
            .map(|item| ItemRef {
                sku: item.sku.to_string(),
                location: item.location.to_string(),
            })
            .collect(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_pairs_keep_order_and_refuse_unknown_names() {
        let pairs = query_pairs(Some("sku=A&sku=B%20C&sku=D"), &["sku"]).unwrap();
        assert_eq!(values_of(pairs, "sku"), ["A", "B C", "D"]);
        let err = query_pairs(Some("sku=A&skus=B"), &["sku"]).unwrap_err();
        assert!(err.to_string().contains("invalid skus"), "{err}");
        assert!(query_pairs(None, &["sku"]).unwrap().is_empty());
    }
}
