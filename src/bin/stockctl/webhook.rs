//! `stockctl webhook add|list|remove|dead-letters|redeliver`: the webhook
//! Admin rpcs, their command line and their output.

use std::io::{self, Write};

use clap::{ArgGroup, Subcommand};
use serde::Serialize;

use super::args::Secret;
use super::commands::{Admin, Failure};
use super::render::{Align, Format, Table, clean, format_ms};
use stockd::pb;

/// `--events` names: out_of_stock, back_in_stock, low_stock.
fn webhook_event(name: &str) -> Result<pb::WebhookEvent, String> {
    use pb::ShortName;
    pb::WebhookEvent::from_short_name(name)
        .ok_or_else(|| "expected out_of_stock, back_in_stock or low_stock".to_owned())
}

#[derive(Debug, Subcommand)]
pub enum WebhookCommand {
    /// Subscribe URL to stock transitions (Admin.AddWebhook).
    Add {
        /// http://host[:port]/path that receives the signed JSON POSTs.
        url: String,
        /// Comma-separated: out_of_stock, back_in_stock, low_stock.
        #[arg(long, value_delimiter = ',', required = true, value_name = "EVENT,...",
              value_parser = webhook_event)]
        events: Vec<pb::WebhookEvent>,
        /// low_stock fires when available falls from >= N to below N.
        #[arg(long, value_name = "N")]
        low_stock_threshold: Option<i64>,
        /// Only these SKUs (repeat the flag); default every SKU.
        #[arg(long = "sku", value_name = "SKU")]
        skus: Vec<String>,
        /// The subscription's signing secret (16-256 printable bytes). Default:
        /// the server-wide secret if the server has one, else the server
        /// generates one and prints it once.
        #[arg(
            long,
            env = "STOCKD_WEBHOOK_SUBSCRIPTION_SECRET",
            hide_env_values = true,
            value_name = "SECRET"
        )]
        secret: Option<Secret>,
    },
    /// Every subscription with its pending deliveries and dead letters.
    List,
    /// Delete a subscription with its pending deliveries and dead letters.
    Remove { id: u64 },
    /// Deliveries that failed every attempt, newest first.
    DeadLetters {
        /// Only this subscription's.
        #[arg(long = "subscription", value_name = "ID")]
        subscription_id: Option<u64>,
        /// At most N (default 100, max 1000).
        #[arg(long, value_name = "N")]
        limit: Option<u32>,
    },
    /// Queue dead letters again, attempts starting over.
    #[command(group(ArgGroup::new("which").required(true).args(["ids", "subscription_id"])))]
    Redeliver {
        /// Dead-letter ids (see dead-letters).
        #[arg(value_name = "ID")]
        ids: Vec<u64>,
        /// Every dead letter of this subscription instead.
        #[arg(long = "subscription", value_name = "ID")]
        subscription_id: Option<u64>,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WebhookOut {
    pub id: u64,
    pub url: String,
    pub events: Vec<String>,
    pub low_stock_threshold: Option<i64>,
    pub skus: Vec<String>,
    pub secret_source: String,
    pub created_at_ms: i64,
    pub pending: u64,
    pub dead_letters: u64,
}

impl From<pb::Webhook> for WebhookOut {
    fn from(w: pb::Webhook) -> Self {
        WebhookOut {
            id: w.id,
            url: w.url,
            events: w
                .events
                .into_iter()
                .map(pb::short_name_of::<pb::WebhookEvent>)
                .collect(),
            low_stock_threshold: (w.low_stock_threshold > 0).then_some(w.low_stock_threshold),
            skus: w.skus,
            secret_source: pb::short_name_of::<pb::WebhookSecretSource>(w.secret_source),
            created_at_ms: w.created_at_ms,
            pending: w.pending,
            dead_letters: w.dead_letters,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AddedOut {
    pub webhook: Option<WebhookOut>,
    /// Only when the server generated it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub generated_secret: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeadLetterOut {
    pub id: u64,
    pub subscription_id: u64,
    pub url: String,
    pub event: String,
    pub sku: String,
    pub location: String,
    pub version: i64,
    pub idempotency_key: String,
    pub attempts: u32,
    pub last_error: String,
    pub created_at_ms: i64,
    pub dead_at_ms: i64,
}

impl From<pb::WebhookDeadLetter> for DeadLetterOut {
    fn from(d: pb::WebhookDeadLetter) -> Self {
        DeadLetterOut {
            id: d.id,
            subscription_id: d.subscription_id,
            url: d.url,
            event: pb::short_name_of::<pb::WebhookEvent>(d.event),
            sku: d.sku,
            location: d.location,
            version: d.version,
            idempotency_key: d.idempotency_key,
            attempts: d.attempts,
            last_error: d.last_error,
            created_at_ms: d.created_at_ms,
            dead_at_ms: d.dead_at_ms,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum WebhookOutput {
    Added(AddedOut),
    List { webhooks: Vec<WebhookOut> },
    Removed { id: u64, dropped_deliveries: u64 },
    DeadLetters { dead_letters: Vec<DeadLetterOut> },
    Redelivered { requeued: u64, not_found: Vec<u64> },
}

/// Runs one webhook command on the Admin service.
pub async fn execute(
    admin: &mut Admin,
    command: WebhookCommand,
    format: Format,
    out: &mut dyn Write,
) -> Result<(), Failure> {
    let output = match command {
        WebhookCommand::Add {
            url,
            events,
            low_stock_threshold,
            skus,
            secret,
        } => {
            let r = admin
                .add_webhook(pb::AddWebhookRequest {
                    url,
                    events: events.into_iter().map(i32::from).collect(),
                    low_stock_threshold: low_stock_threshold.unwrap_or(0),
                    skus,
                    secret: secret.map(|s| s.expose().to_owned()).unwrap_or_default(),
                })
                .await?
                .into_inner();
            WebhookOutput::Added(AddedOut {
                webhook: r.webhook.map(Into::into),
                generated_secret: (!r.generated_secret.is_empty()).then_some(r.generated_secret),
            })
        }
        WebhookCommand::List => WebhookOutput::List {
            webhooks: list_every_page(admin).await?,
        },
        WebhookCommand::Remove { id } => {
            let r = admin
                .remove_webhook(pb::RemoveWebhookRequest { id })
                .await?
                .into_inner();
            WebhookOutput::Removed {
                id,
                dropped_deliveries: r.dropped_deliveries,
            }
        }
        WebhookCommand::DeadLetters {
            subscription_id,
            limit,
        } => {
            let r = admin
                .list_webhook_dead_letters(pb::ListWebhookDeadLettersRequest {
                    subscription_id: subscription_id.unwrap_or(0),
                    limit: limit.unwrap_or(0),
                })
                .await?
                .into_inner();
            WebhookOutput::DeadLetters {
                dead_letters: r.dead_letters.into_iter().map(Into::into).collect(),
            }
        }
        WebhookCommand::Redeliver {
            ids,
            subscription_id,
        } => {
            let r = admin
                .redeliver_webhook(pb::RedeliverWebhookRequest {
                    ids,
                    subscription_id: subscription_id.unwrap_or(0),
                })
                .await?
                .into_inner();
            WebhookOutput::Redelivered {
                requeued: r.requeued,
                not_found: r.not_found,
            }
        }
    };
    output.write(format, out)?;
    out.flush()?;
    Ok(())
}

/// Every subscription, page by page (a page stays under the message limit
/// however large the subscriptions are).
async fn list_every_page(admin: &mut Admin) -> Result<Vec<WebhookOut>, Failure> {
    let mut webhooks = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = admin
            .list_webhooks(pb::ListWebhooksRequest {
                page_size: 0,
                page_token,
            })
            .await?
            .into_inner();
        webhooks.extend(page.webhooks.into_iter().map(WebhookOut::from));
        if page.next_page_token.is_empty() {
            return Ok(webhooks);
        }
        page_token = page.next_page_token;
    }
}

fn or_dash(s: String) -> String {
    if s.is_empty() { "-".into() } else { s }
}

impl WebhookOutput {
    pub fn write(&self, format: Format, w: &mut dyn Write) -> io::Result<()> {
        if format == Format::Json {
            serde_json::to_writer_pretty(&mut *w, self).map_err(io::Error::other)?;
            return writeln!(w);
        }
        match self {
            WebhookOutput::Added(a) => {
                if let Some(h) = &a.webhook {
                    webhooks_table(std::slice::from_ref(h)).write(w)?;
                }
                if let Some(secret) = &a.generated_secret {
                    writeln!(w)?;
                    writeln!(w, "secret: {}", clean(secret))?;
                    writeln!(
                        w,
                        "(generated; store it now, it is not shown again: receivers verify \
                         stockd-signature with it)"
                    )?;
                }
                Ok(())
            }
            WebhookOutput::List { webhooks } => {
                if webhooks.is_empty() {
                    return writeln!(w, "no webhooks");
                }
                webhooks_table(webhooks).write(w)
            }
            WebhookOutput::Removed {
                id,
                dropped_deliveries,
            } => writeln!(
                w,
                "removed webhook {id} ({dropped_deliveries} pending deliveries and dead letters dropped)"
            ),
            WebhookOutput::DeadLetters { dead_letters } => {
                if dead_letters.is_empty() {
                    return writeln!(w, "no dead letters");
                }
                let mut t = Table::new(&[
                    ("ID", Align::Right),
                    ("WEBHOOK", Align::Right),
                    ("EVENT", Align::Left),
                    ("ITEM", Align::Left),
                    ("VERSION", Align::Right),
                    ("ATTEMPTS", Align::Right),
                    ("DEAD_AT", Align::Left),
                    ("LAST_ERROR", Align::Left),
                ]);
                for d in dead_letters {
                    t.row(vec![
                        d.id.to_string(),
                        d.subscription_id.to_string(),
                        clean(&d.event),
                        format!("{}@{}", clean(&d.sku), clean(&d.location)),
                        d.version.to_string(),
                        d.attempts.to_string(),
                        format_ms(d.dead_at_ms),
                        or_dash(clean(&d.last_error)),
                    ]);
                }
                t.write(w)
            }
            WebhookOutput::Redelivered {
                requeued,
                not_found,
            } => {
                writeln!(w, "requeued: {requeued}")?;
                if !not_found.is_empty() {
                    let ids: Vec<String> = not_found.iter().map(u64::to_string).collect();
                    writeln!(w, "not dead letters: {}", ids.join(", "))?;
                }
                Ok(())
            }
        }
    }
}

fn webhooks_table(webhooks: &[WebhookOut]) -> Table {
    let mut t = Table::new(&[
        ("ID", Align::Right),
        ("URL", Align::Left),
        ("EVENTS", Align::Left),
        ("LOW_STOCK", Align::Right),
        ("SKUS", Align::Left),
        ("SECRET", Align::Left),
        ("PENDING", Align::Right),
        ("DEAD", Align::Right),
    ]);
    for h in webhooks {
        t.row(vec![
            h.id.to_string(),
            clean(&h.url),
            clean(&h.events.join(",")),
            h.low_stock_threshold
                .map(|n| n.to_string())
                .unwrap_or_else(|| "-".into()),
            if h.skus.is_empty() {
                "(all)".into()
            } else {
                clean(&h.skus.join(","))
            },
            clean(&h.secret_source),
            h.pending.to_string(),
            h.dead_letters.to_string(),
        ]);
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(o: &WebhookOutput, format: Format) -> String {
        let mut v = Vec::new();
        o.write(format, &mut v).unwrap();
        String::from_utf8(v).unwrap()
    }

    fn hook() -> WebhookOut {
        WebhookOut {
            id: 3,
            url: "http://127.0.0.1:9000/hook".into(),
            events: vec!["out_of_stock".into(), "low_stock".into()],
            low_stock_threshold: Some(5),
            skus: vec![],
            secret_source: "subscription".into(),
            created_at_ms: 0,
            pending: 2,
            dead_letters: 1,
        }
    }

    #[test]
    fn added_shows_a_generated_secret_once_and_json_omits_it_when_absent() {
        let added = WebhookOutput::Added(AddedOut {
            webhook: Some(hook()),
            generated_secret: Some("whsec_abc".into()),
        });
        let t = text(&added, Format::Table);
        assert!(t.contains("secret: whsec_abc"), "{t}");
        assert!(t.contains("out_of_stock,low_stock"), "{t}");
        let plain = WebhookOutput::Added(AddedOut {
            webhook: Some(hook()),
            generated_secret: None,
        });
        let v: serde_json::Value = serde_json::from_str(&text(&plain, Format::Json)).unwrap();
        assert_eq!(v["webhook"]["low_stock_threshold"], 5);
        assert!(v.get("generated_secret").is_none(), "{v}");
    }

    #[test]
    fn dead_letters_table() {
        let out = WebhookOutput::DeadLetters {
            dead_letters: vec![DeadLetterOut {
                id: 9,
                subscription_id: 3,
                url: "http://x/".into(),
                event: "out_of_stock".into(),
                sku: "mug".into(),
                location: "default".into(),
                version: 4,
                idempotency_key: "mug/default/4/out_of_stock/3".into(),
                attempts: 8,
                last_error: "HTTP 500 Internal Server Error:\nboom".into(),
                created_at_ms: 0,
                dead_at_ms: 1_000,
            }],
        };
        let t = text(&out, Format::Table);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 2, "{t}");
        assert!(lines[1].contains("mug@default"), "{t}");
        assert!(
            lines[1].contains("\\n"),
            "control characters are escaped: {t}"
        );
    }
}
