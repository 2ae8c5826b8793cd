//! Stock webhooks: transitions of `available` POSTed as signed JSON to
//! subscribed URLs.
//!
//! - [`Subscriptions`] (`subscriptions.rs`): the Admin rpcs that add, list
//!   and remove subscriptions, and list and redeliver dead letters, all in
//!   Postgres (`migrations/0002_webhooks.sql`).
//! - detection (`detect.rs`): in the flusher's transaction, the
//!   transitions of a flushed batch — `out_of_stock` (available reaches 0),
//!   `back_in_stock` (rises from 0), `low_stock` (falls from >= the
//!   subscription's threshold to below it) — become one delivery per
//!   (subscription, transition) in the `webhook_deliveries` outbox, in ONE
//!   statement (a replayed batch writes the same rows again, which the
//!   unique key ignores).
//! - [`Dispatcher`] (`deliver.rs`): POSTs the outbox, oldest version first
//!   per (subscription, item), retrying with capped exponential backoff,
//!   and parks a delivery in the dead letters after the last allowed
//!   attempt.
//! - `signing.rs`: the signature schemes (Standard Webhooks, and the
//!   earlier stockd one beside it).
//! - `destinations.rs`: where webhooks may go (no loopback, private,
//!   link-local, ... addresses unless allowed), checked at AddWebhook and
//!   on the addresses each delivery connects to.
//!
//! Checkout never waits for any of this: detection runs off the stream,
//! and a dead endpoint only grows its own rows in the outbox.

mod deliver;
mod destinations;
mod detect;
pub mod signing;
mod subscriptions;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;

pub use deliver::{DeliverOutcome, Dispatcher};
pub use destinations::{DestinationError, Destinations, parse_allowlist};
pub(crate) use detect::{any_subscription, queue_transitions};
pub use subscriptions::Subscriptions;

/// The transitions a subscription can ask for.
pub const KINDS: [&str; 3] = ["out_of_stock", "back_in_stock", "low_stock"];

#[derive(Clone)]
pub struct WebhookSettings {
    /// Signs deliveries of subscriptions without a secret of their own.
    pub server_secret: Option<String>,
    /// Attempts before a delivery is parked in the dead letters.
    pub max_attempts: u32,
    /// First retry delay, doubling per attempt up to `backoff_max`.
    pub backoff: Duration,
    pub backoff_max: Duration,
    /// Timeout of one POST (connect, send, answer).
    pub timeout: Duration,
    /// Which addresses webhooks may be sent to.
    pub destinations: Destinations,
    /// Trusted roots for https endpoints, in addition to the webpki roots.
    pub ca_file: Option<PathBuf>,
    /// POSTs in flight at once from this instance.
    pub concurrency: usize,
    /// POSTs in flight at once to one subscription, so that a slow
    /// endpoint cannot take every slot.
    pub per_subscription: usize,
    /// How often the dispatcher looks for due deliveries when nothing woke it.
    pub poll: Duration,
    /// Delivered rows are deleted after this long.
    pub keep_delivered: Duration,
}

impl std::fmt::Debug for WebhookSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookSettings")
            .field(
                "server_secret",
                &self.server_secret.as_ref().map(|_| "<set>"),
            )
            .field("max_attempts", &self.max_attempts)
            .field("backoff", &self.backoff)
            .field("backoff_max", &self.backoff_max)
            .field("timeout", &self.timeout)
            .field("destinations", &self.destinations)
            .field("ca_file", &self.ca_file)
            .field("concurrency", &self.concurrency)
            .finish_non_exhaustive()
    }
}

impl Default for WebhookSettings {
    fn default() -> Self {
        Self {
            server_secret: None,
            max_attempts: 8,
            backoff: Duration::from_secs(1),
            backoff_max: Duration::from_secs(300),
            timeout: Duration::from_secs(5),
            destinations: Destinations::default(),
            ca_file: None,
            concurrency: 32,
            per_subscription: 4,
            poll: Duration::from_millis(250),
            keep_delivered: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

impl WebhookSettings {
    /// The settings of `config` (flags and environment).
    pub fn from_config(config: &crate::config::Config) -> Self {
        let hooks = &config.webhooks;
        Self {
            server_secret: hooks
                .webhook_secret
                .as_ref()
                .map(|s| s.expose().to_owned())
                .filter(|s| !s.is_empty()),
            max_attempts: hooks.webhook_max_attempts,
            backoff: Duration::from_millis(hooks.webhook_backoff_ms),
            backoff_max: Duration::from_millis(
                hooks.webhook_backoff_max_ms.max(hooks.webhook_backoff_ms),
            ),
            timeout: Duration::from_millis(hooks.webhook_timeout_ms.max(1)),
            destinations: hooks.webhook_allow_networks.clone(),
            ca_file: hooks.webhook_ca_file.clone(),
            concurrency: hooks.webhook_concurrency as usize,
            ..Self::default()
        }
    }
}

/// Describes the webhook metrics and registers them at zero.
pub fn describe_metrics() {
    use metrics::{counter, describe_counter};
    describe_counter!(
        "stockd_webhook_deliveries_queued_total",
        "webhook deliveries queued (one per subscription and transition)"
    );
    describe_counter!(
        "stockd_webhook_deliveries_total",
        "webhook attempts by outcome: delivered, retry, dead"
    );
    counter!("stockd_webhook_deliveries_queued_total").increment(0);
    for outcome in ["delivered", "retry", "dead"] {
        counter!("stockd_webhook_deliveries_total", "outcome" => outcome).increment(0);
    }
}

/// Wakes the dispatcher when the detector (or a redeliver) queued work.
#[derive(Clone, Default)]
pub struct Wakeup(Arc<Notify>);

impl Wakeup {
    pub fn wake(&self) {
        self.0.notify_one();
    }

    pub async fn woken(&self) {
        self.0.notified().await
    }
}

/// Errors of one step of the dispatcher; its loop logs them and retries.
pub type WebhookError = crate::consumer::StepError;

pub use crate::consumer::{Backoff, retry_ceiling};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_ceiling_doubles_up_to_the_cap() {
        let base = Duration::from_millis(100);
        let cap = Duration::from_secs(1);
        let ceilings: Vec<u128> = (0..6)
            .map(|a| retry_ceiling(base, cap, a).as_millis())
            .collect();
        assert_eq!(ceilings, [100, 200, 400, 800, 1000, 1000]);
        assert_eq!(retry_ceiling(base, cap, u32::MAX), cap);
    }
}
