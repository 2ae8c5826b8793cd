//! Webhook subscriptions and dead letters: the Admin rpcs behind
//! `stockctl webhook add|list|remove|dead-letters|redeliver`.

use std::collections::BTreeSet;

use prost::Message;
use rand::Rng;
use sqlx::Row;

use super::{Destinations, KINDS, Wakeup};
use crate::domain::Sku;
use crate::error::Error;
use crate::pb::{self, ShortName};
use crate::store::Store;

/// Most SKUs one subscription may name.
pub const MAX_SUBSCRIPTION_SKUS: usize = 1_000;
const MAX_URL_BYTES: usize = 2_048;
const MIN_SECRET_BYTES: usize = 16;
const MAX_SECRET_BYTES: usize = 256;
const DEFAULT_DEAD_LETTERS: u32 = 100;
const MAX_DEAD_LETTERS: u32 = 1_000;
/// Subscriptions per ListWebhooks page: the default and the most.
const DEFAULT_PAGE_SIZE: u32 = 50;
const MAX_PAGE_SIZE: u32 = 100;
/// A page's encoded subscriptions stay under this, well below the 4 MiB
/// message limit gRPC clients have by default (one subscription is at most
/// about 130 KiB: 1,000 SKUs of 128 bytes and a 2 KiB URL).
const MAX_PAGE_BYTES: usize = 1024 * 1024;

#[derive(Clone)]
pub struct Subscriptions {
    /// Postgres, every call bounded (see `Store::bounded`).
    store: Store,
    server_secret: bool,
    destinations: Destinations,
    wakeup: Wakeup,
}

/// The columns of a `pb::Webhook`, from `webhook_subscriptions s`.
macro_rules! webhook_columns {
    () => {
        "
    s.id, s.url, s.events, s.low_stock_threshold, s.skus, s.secret IS NULL AS server_secret,
    (extract(epoch FROM s.created_at) * 1000)::bigint AS created_at_ms,
    (SELECT count(*) FROM webhook_deliveries d
      WHERE d.subscription_id = s.id AND d.state = 'pending') AS pending,
    (SELECT count(*) FROM webhook_deliveries d
      WHERE d.subscription_id = s.id AND d.state = 'dead') AS dead"
    };
}

fn webhook(r: &sqlx::postgres::PgRow) -> pb::Webhook {
    pb::Webhook {
        id: r.get::<i64, _>("id") as u64,
        url: r.get("url"),
        events: r
            .get::<Vec<String>, _>("events")
            .iter()
            .map(|kind| event_of_kind(kind))
            .collect(),
        low_stock_threshold: r.get::<Option<i64>, _>("low_stock_threshold").unwrap_or(0),
        skus: r.get::<Option<Vec<String>>, _>("skus").unwrap_or_default(),
        secret_source: if r.get::<bool, _>("server_secret") {
            pb::WebhookSecretSource::Server.into()
        } else {
            pb::WebhookSecretSource::Subscription.into()
        },
        created_at_ms: r.get("created_at_ms"),
        pending: r.get::<i64, _>("pending") as u64,
        dead_letters: r.get::<i64, _>("dead") as u64,
    }
}

/// A webhook URL: `http[s]://host[:port][/path]`, without credentials.
/// Where it points is checked apart ([`Destinations::check_url`]).
fn parse_url(field: &str, url: &str) -> Result<reqwest::Url, Error> {
    if url.is_empty() || url.len() > MAX_URL_BYTES {
        return Err(Error::invalid(
            field,
            format!("must be 1 to {MAX_URL_BYTES} bytes"),
        ));
    }
    let parsed = reqwest::Url::parse(url).map_err(|e| Error::invalid(field, e.to_string()))?;
    match parsed.scheme() {
        "http" | "https" => {}
        other => {
            return Err(Error::invalid(
                field,
                format!("scheme {other:?}: expected http[s]://host[:port]/path"),
            ));
        }
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err(Error::invalid(field, "the URL has no host"));
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(Error::invalid(
            field,
            "credentials in the URL are not allowed; the signature authenticates stockd",
        ));
    }
    Ok(parsed)
}

/// The wire value of a kind as stored (`out_of_stock`, one of KINDS).
fn event_of_kind(kind: &str) -> i32 {
    pb::WebhookEvent::from_short_name(kind)
        .unwrap_or(pb::WebhookEvent::Unspecified)
        .into()
}

/// The kinds (as stored) of the requested events.
fn parse_events(field: &str, events: Vec<i32>) -> Result<Vec<String>, Error> {
    if events.is_empty() {
        return Err(Error::invalid(
            field,
            format!("name at least one of {}", KINDS.join(", ")),
        ));
    }
    let mut set = BTreeSet::new();
    for (i, e) in events.into_iter().enumerate() {
        let kind = pb::WebhookEvent::try_from(e)
            .map(ShortName::short_name)
            .ok()
            .filter(|kind| KINDS.contains(&kind.as_str()))
            .ok_or_else(|| {
                Error::invalid(
                    format!("{field}[{i}]"),
                    format!("unknown event {e}; expected one of {}", KINDS.join(", ")),
                )
            })?;
        set.insert(kind);
    }
    // In the documented order.
    Ok(KINDS
        .iter()
        .filter(|k| set.contains(**k))
        .map(|k| (*k).to_owned())
        .collect())
}

fn parse_secret(field: &str, secret: &str) -> Result<(), Error> {
    if secret.len() < MIN_SECRET_BYTES || secret.len() > MAX_SECRET_BYTES {
        return Err(Error::invalid(
            field,
            format!("must be {MIN_SECRET_BYTES} to {MAX_SECRET_BYTES} bytes"),
        ));
    }
    if !secret.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(Error::invalid(
            field,
            "must be printable ASCII without spaces",
        ));
    }
    Ok(())
}

/// 32 random bytes, hex, with a prefix that says what it is.
fn generate_secret() -> String {
    let bytes: [u8; 32] = rand::rng().random();
    format!("whsec_{}", hex::encode(bytes))
}

impl Subscriptions {
    pub fn new(
        store: Store,
        server_secret: bool,
        destinations: Destinations,
        wakeup: Wakeup,
    ) -> Self {
        Self {
            store,
            server_secret,
            destinations,
            wakeup,
        }
    }

    pub async fn add(&self, req: pb::AddWebhookRequest) -> Result<pb::AddWebhookResponse, Error> {
        let url = parse_url("url", &req.url)?;
        self.destinations
            .check_url(&url)
            .await
            .map_err(|e| Error::invalid("url", e.to_string()))?;
        let url = url.to_string();
        let events = parse_events("events", req.events)?;
        let low_stock = events.iter().any(|e| e == "low_stock");
        let threshold = match (low_stock, req.low_stock_threshold) {
            (true, t) if t >= 1 => Some(t),
            (true, _) => {
                return Err(Error::invalid(
                    "low_stock_threshold",
                    "low_stock needs a threshold of at least 1",
                ));
            }
            (false, 0) => None,
            (false, _) => {
                return Err(Error::invalid(
                    "low_stock_threshold",
                    "only used with the low_stock event",
                ));
            }
        };
        if req.skus.len() > MAX_SUBSCRIPTION_SKUS {
            return Err(Error::invalid(
                "skus",
                format!(
                    "at most {MAX_SUBSCRIPTION_SKUS} SKUs, got {}",
                    req.skus.len()
                ),
            ));
        }
        let mut skus = BTreeSet::new();
        for (i, sku) in req.skus.into_iter().enumerate() {
            skus.insert(Sku::parse(&format!("skus[{i}]"), sku)?.to_string());
        }
        let skus: Option<Vec<String>> = (!skus.is_empty()).then(|| skus.into_iter().collect());
        let (secret, generated) = if !req.secret.is_empty() {
            parse_secret("secret", &req.secret)?;
            (Some(req.secret), None)
        } else if self.server_secret {
            (None, None)
        } else {
            let s = generate_secret();
            (Some(s.clone()), Some(s))
        };
        let row = self
            .store
            .bounded("webhooks_add", async |conn| {
                sqlx::query(concat!(
                    "WITH s AS (
                     INSERT INTO webhook_subscriptions (url, events, low_stock_threshold, skus, secret)
                     VALUES ($1, $2, $3, $4, $5) RETURNING *
                 )
                 SELECT ",
                    webhook_columns!(),
                    " FROM s"
                ))
                .bind(&url)
                .bind(&events)
                .bind(threshold)
                .bind(&skus)
                .bind(&secret)
                .fetch_one(conn)
                .await
            })
            .await
            .map_err(Error::from)?;
        let webhook = webhook(&row);
        tracing::info!(id = webhook.id, %url, ?events, "webhook subscription added");
        Ok(pb::AddWebhookResponse {
            webhook: Some(webhook),
            generated_secret: generated.unwrap_or_default(),
        })
    }

    /// One page of subscriptions in id order: at most `page_size` (0 = the
    /// default), and fewer rather than pass [`MAX_PAGE_BYTES`] (always at
    /// least one), so a page fits any client's message limit.
    pub async fn list(
        &self,
        req: pb::ListWebhooksRequest,
    ) -> Result<pb::ListWebhooksResponse, Error> {
        let page_size = match req.page_size {
            0 => DEFAULT_PAGE_SIZE,
            n => n.min(MAX_PAGE_SIZE),
        };
        let after: i64 = if req.page_token.is_empty() {
            0
        } else {
            req.page_token
                .parse()
                .map_err(|_| Error::invalid("page_token", "not a token this server gave"))?
        };
        // One more than the page, to know whether another page follows.
        let rows = self
            .store
            .bounded("webhooks_list", async |conn| {
                sqlx::query(concat!(
                    "SELECT ",
                    webhook_columns!(),
                    " FROM webhook_subscriptions s WHERE s.id > $1 ORDER BY s.id LIMIT $2"
                ))
                .bind(after)
                .bind(i64::from(page_size) + 1)
                .fetch_all(conn)
                .await
            })
            .await
            .map_err(Error::from)?;
        let mut webhooks = Vec::new();
        let mut bytes = 0;
        for row in rows.iter().take(page_size as usize) {
            let webhook = webhook(row);
            bytes += webhook.encoded_len();
            if !webhooks.is_empty() && bytes > MAX_PAGE_BYTES {
                break;
            }
            webhooks.push(webhook);
        }
        let next_page_token = if rows.len() > webhooks.len() {
            webhooks
                .last()
                .map(|w| w.id.to_string())
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok(pb::ListWebhooksResponse {
            webhooks,
            next_page_token,
        })
    }

    pub async fn remove(
        &self,
        req: pb::RemoveWebhookRequest,
    ) -> Result<pb::RemoveWebhookResponse, Error> {
        let id = i64::try_from(req.id)
            .ok()
            .filter(|id| *id >= 1)
            .ok_or_else(|| Error::invalid("id", "not a webhook id"))?;
        let row = self
            .store
            .bounded("webhooks_remove", async |conn| {
                sqlx::query(
                    "WITH dropped AS (
                     SELECT count(*) AS n FROM webhook_deliveries
                      WHERE subscription_id = $1 AND state IN ('pending', 'dead')
                 ), gone AS (
                     DELETE FROM webhook_subscriptions WHERE id = $1 RETURNING id
                 )
                 SELECT (SELECT count(*) FROM gone) AS removed, (SELECT n FROM dropped) AS dropped",
                )
                .bind(id)
                .fetch_one(conn)
                .await
            })
            .await
            .map_err(Error::from)?;
        if row.get::<i64, _>("removed") == 0 {
            return Err(Error::NotFound(format!("webhook {id} does not exist")));
        }
        tracing::info!(id, "webhook subscription removed");
        Ok(pb::RemoveWebhookResponse {
            dropped_deliveries: row.get::<i64, _>("dropped") as u64,
        })
    }

    pub async fn dead_letters(
        &self,
        req: pb::ListWebhookDeadLettersRequest,
    ) -> Result<pb::ListWebhookDeadLettersResponse, Error> {
        let limit = match req.limit {
            0 => DEFAULT_DEAD_LETTERS,
            n if n <= MAX_DEAD_LETTERS => n,
            n => {
                return Err(Error::invalid(
                    "limit",
                    format!("at most {MAX_DEAD_LETTERS}, got {n}"),
                ));
            }
        };
        let rows =
            self.store
                .bounded("webhooks_dead_letters", async |conn| {
                    sqlx::query(
            "SELECT d.id, d.subscription_id, s.url, d.kind, d.sku, d.location, d.version,
                    d.idempotency_key, d.attempts, COALESCE(d.last_error, '') AS last_error,
                    (extract(epoch FROM d.created_at) * 1000)::bigint AS created_at_ms,
                    (extract(epoch FROM d.dead_at) * 1000)::bigint AS dead_at_ms
               FROM webhook_dead_letters d
               JOIN webhook_subscriptions s ON s.id = d.subscription_id
              WHERE $1 = 0 OR d.subscription_id = $1
              ORDER BY d.dead_at DESC, d.id DESC
              LIMIT $2",
        )
        .bind(req.subscription_id as i64)
        .bind(i64::from(limit))
        .fetch_all(conn).await
                })
                .await
                .map_err(Error::from)?;
        Ok(pb::ListWebhookDeadLettersResponse {
            dead_letters: rows
                .into_iter()
                .map(|r| pb::WebhookDeadLetter {
                    id: r.get::<i64, _>("id") as u64,
                    subscription_id: r.get::<i64, _>("subscription_id") as u64,
                    url: r.get("url"),
                    event: event_of_kind(r.get("kind")),
                    sku: r.get("sku"),
                    location: r.get("location"),
                    version: r.get("version"),
                    idempotency_key: r.get("idempotency_key"),
                    attempts: r.get::<i32, _>("attempts") as u32,
                    last_error: r.get("last_error"),
                    created_at_ms: r.get("created_at_ms"),
                    dead_at_ms: r.get::<Option<i64>, _>("dead_at_ms").unwrap_or(0),
                })
                .collect(),
        })
    }

    /// Queues dead letters again, attempts starting over. The delivery keeps
    /// its idempotency key, so a receiver that did process an earlier
    /// attempt can tell.
    pub async fn redeliver(
        &self,
        req: pb::RedeliverWebhookRequest,
    ) -> Result<pb::RedeliverWebhookResponse, Error> {
        if req.ids.is_empty() == (req.subscription_id == 0) {
            return Err(Error::invalid(
                "ids",
                "give dead-letter ids or a subscription_id, not both",
            ));
        }
        let ids: Vec<i64> = req.ids.iter().map(|&id| id as i64).collect();
        let rows = self
            .store
            .bounded("webhooks_redeliver", async |conn| {
                sqlx::query(
                    "UPDATE webhook_deliveries
                     SET state = 'pending', attempts = 0, next_attempt_at = now(),
                         leased_until = NULL, dead_at = NULL
                   WHERE state = 'dead' AND (id = ANY ($1) OR subscription_id = $2)
                   RETURNING id",
                )
                .bind(&ids)
                .bind(req.subscription_id as i64)
                .fetch_all(conn)
                .await
            })
            .await
            .map_err(Error::from)?;
        let requeued: BTreeSet<u64> = rows.iter().map(|r| r.get::<i64, _>("id") as u64).collect();
        if !requeued.is_empty() {
            tracing::info!(
                requeued = requeued.len(),
                "webhook dead letters queued again"
            );
            self.wakeup.wake();
        }
        Ok(pb::RedeliverWebhookResponse {
            requeued: requeued.len() as u64,
            not_found: req
                .ids
                .into_iter()
                .filter(|id| !requeued.contains(id))
                .collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_must_be_http_or_https_with_a_host() {
        assert_eq!(
            parse_url("url", "http://127.0.0.1:8080/hook")
                .unwrap()
                .as_str(),
            "http://127.0.0.1:8080/hook"
        );
        assert_eq!(
            parse_url("url", "HTTPS://Shop.Example/hook")
                .unwrap()
                .as_str(),
            "https://shop.example/hook"
        );
        for bad in [
            "",
            "127.0.0.1:8080",
            "ftp://x/",
            "file:///etc/passwd",
            "http://user:pw@shop.example/",
        ] {
            assert!(parse_url("url", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn events_are_known_deduplicated_and_ordered() {
        assert_eq!(
            parse_events(
                "events",
                vec![
                    pb::WebhookEvent::LowStock.into(),
                    pb::WebhookEvent::OutOfStock.into(),
                    pb::WebhookEvent::LowStock.into()
                ]
            )
            .unwrap(),
            ["out_of_stock", "low_stock"]
        );
        assert!(parse_events("events", vec![]).is_err());
        for unknown in [pb::WebhookEvent::Unspecified.into(), 99] {
            let err = parse_events("events", vec![1, unknown]).unwrap_err();
            assert!(err.to_string().contains("events[1]"), "{err}");
        }
        // Every kind a subscription can ask for has its wire value.
        for kind in KINDS {
            assert_ne!(event_of_kind(kind), 0, "{kind}");
        }
    }

    #[test]
    fn secrets() {
        assert!(parse_secret("secret", "short").is_err());
        assert!(parse_secret("secret", "sixteen-bytes-ok").is_ok());
        assert!(parse_secret("secret", "sixteen bytes no").is_err());
        let s = generate_secret();
        assert!(s.starts_with("whsec_") && s.len() == 6 + 64, "{s}");
        assert_ne!(s, generate_secret());
    }
}
