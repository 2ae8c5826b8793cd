//! The dispatcher: POSTs the `webhook_deliveries` outbox.
//!
//! Order: only the HEAD of each (subscription, item) — its pending delivery
//! of the lowest version — is ever sent, so a later transition of an item
//! never overtakes an earlier one while that one is retried. Different items
//! and subscriptions go in parallel (`STOCKD_WEBHOOK_CONCURRENCY` in flight,
//! at most a few per subscription, so a slow endpoint cannot take every
//! slot). Several instances share the outbox: a delivery being sent is
//! leased (`leased_until`) by the instance that sends it.
//!
//! An attempt is counted when it starts. A 2xx answer delivers; anything
//! else (an error status, a refused connection, a timeout) schedules the
//! next attempt after a capped exponential backoff with jitter, and after
//! `STOCKD_WEBHOOK_MAX_ATTEMPTS` attempts parks the delivery in the dead
//! letters, which no longer holds up the item's later deliveries.

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use metrics::counter;
use rand::Rng;
use sqlx::Row;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::destinations::PinnedResolver;
use super::signing::{
    self, ATTEMPT_HEADER, DELIVERY_HEADER, EVENT_HEADER, ID_HEADER, IDEMPOTENCY_HEADER,
    SIGNATURE_HEADER, TIMESTAMP_HEADER, legacy, webhook_id,
};
use super::{Wakeup, WebhookError, WebhookSettings, retry_ceiling};
use crate::store::Store;

/// What one `deliver_once` did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DeliverOutcome {
    pub delivered: usize,
    /// Failed attempts that will be retried.
    pub retrying: usize,
    /// Failed attempts that were the last allowed: parked in dead letters.
    pub dead: usize,
}

impl DeliverOutcome {
    pub fn attempts(&self) -> usize {
        self.delivered + self.retrying + self.dead
    }

    fn add(&mut self, result: Attempted) {
        match result {
            Attempted::Delivered => self.delivered += 1,
            Attempted::Retrying => self.retrying += 1,
            Attempted::Dead => self.dead += 1,
        }
    }
}

/// One claimed delivery.
#[derive(Debug, Clone)]
struct Claimed {
    id: i64,
    subscription_id: i64,
    url: String,
    /// None: sign with the server-wide secret.
    secret: Option<String>,
    kind: String,
    idempotency_key: String,
    body: String,
    attempts: i32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Attempted {
    Delivered,
    Retrying,
    Dead,
}

#[derive(Clone)]
pub struct Dispatcher {
    /// Postgres, every call bounded (see `Store::bounded`).
    store: Store,
    http: reqwest::Client,
    settings: WebhookSettings,
    wakeup: Wakeup,
}

/// The heads of the (subscription, item) queues that are due and not being
/// sent, at most $1 in all and $2 per subscription less what this instance
/// already has in flight for it ($3, $4); leased for $5 seconds.
const CLAIM_SQL: &str = "
WITH heads AS (
    SELECT DISTINCT ON (subscription_id, sku, location)
           id, subscription_id, next_attempt_at, leased_until
    FROM webhook_deliveries
    WHERE state = 'pending'
    ORDER BY subscription_id, sku, location, version, id
), due AS (
    SELECT h.id,
           row_number() OVER (PARTITION BY h.subscription_id ORDER BY h.next_attempt_at, h.id) AS n,
           COALESCE(b.busy, 0) AS busy
    FROM heads h
    LEFT JOIN UNNEST($3::bigint[], $4::bigint[]) AS b(subscription_id, busy)
           ON b.subscription_id = h.subscription_id
    WHERE h.next_attempt_at <= now()
      AND (h.leased_until IS NULL OR h.leased_until < now())
), picked AS (
    SELECT id FROM due WHERE n + busy <= $2 ORDER BY n, id LIMIT $1
)
UPDATE webhook_deliveries d
   SET leased_until = now() + make_interval(secs => $5), attempts = d.attempts + 1
  FROM picked, webhook_subscriptions s
 WHERE d.id = picked.id AND s.id = d.subscription_id
   AND d.state = 'pending' AND (d.leased_until IS NULL OR d.leased_until < now())
RETURNING d.id, d.subscription_id, s.url, s.secret, d.kind, d.idempotency_key,
          d.payload::text AS body, d.attempts";

impl Dispatcher {
    pub fn new(store: Store, settings: WebhookSettings, wakeup: Wakeup) -> Result<Self, String> {
        let http = http_client(&settings)?;
        super::describe_metrics();
        Ok(Self {
            store,
            http,
            settings,
            wakeup,
        })
    }

    /// Claims what is due (up to the concurrency), sends it all at once,
    /// records the outcomes. For tests and tools; `run` keeps a pipeline.
    pub async fn deliver_once(&self) -> Result<DeliverOutcome, WebhookError> {
        let claimed = self
            .claim(self.settings.concurrency, &HashMap::new())
            .await?;
        let mut outcome = DeliverOutcome::default();
        let mut set = JoinSet::new();
        for delivery in claimed {
            let this = self.clone();
            set.spawn(async move { this.attempt(delivery).await });
        }
        while let Some(done) = set.join_next().await {
            match done {
                Ok(Ok((_, result))) => outcome.add(result),
                Ok(Err(err)) => return Err(err),
                Err(err) => tracing::error!(error = %err, "webhook delivery task panicked"),
            }
        }
        Ok(outcome)
    }

    /// Sends until `shutdown`, then waits for the attempts in flight (each
    /// bounded by the timeout) and records them.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut in_flight: JoinSet<Result<(i64, Attempted), WebhookError>> = JoinSet::new();
        let mut busy: HashMap<i64, i64> = HashMap::new();
        let mut ids: HashMap<tokio::task::Id, i64> = HashMap::new();
        let mut last_cleanup = tokio::time::Instant::now();
        let mut backoff = super::Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        loop {
            let free = self.settings.concurrency.saturating_sub(in_flight.len());
            if free > 0 && !shutdown.is_cancelled() {
                match self.claim(free, &busy).await {
                    Ok(claimed) => {
                        backoff.reset();
                        for delivery in claimed {
                            let sub = delivery.subscription_id;
                            *busy.entry(sub).or_default() += 1;
                            let this = self.clone();
                            let handle =
                                in_flight.spawn(async move { this.attempt(delivery).await });
                            ids.insert(handle.id(), sub);
                        }
                    }
                    Err(err) => {
                        tracing::warn!(error = %err, "webhook dispatcher: claiming deliveries failed; backing off");
                        backoff.wait(&shutdown).await;
                        continue;
                    }
                }
            }
            if last_cleanup.elapsed() >= Duration::from_secs(60) {
                last_cleanup = tokio::time::Instant::now();
                if let Err(err) = self.cleanup().await {
                    tracing::warn!(error = %err, "webhook dispatcher: deleting old delivered rows failed");
                }
            }
            if shutdown.is_cancelled() && in_flight.is_empty() {
                tracing::debug!("webhook dispatcher stopped");
                return;
            }
            // Everything due was claimed (or the slots are full): wait for a
            // slot, new work, the next look, or shutdown.
            tokio::select! {
                done = in_flight.join_next_with_id(), if !in_flight.is_empty() => {
                    let task = match &done {
                        Some(Ok((id, _))) => Some(*id),
                        Some(Err(err)) => Some(err.id()),
                        None => None,
                    };
                    if let Some(sub) = task.and_then(|t| ids.remove(&t))
                        && let Some(n) = busy.get_mut(&sub)
                    {
                        *n -= 1;
                        if *n <= 0 {
                            busy.remove(&sub);
                        }
                    }
                    match done {
                        Some(Ok((_, Err(err)))) => tracing::warn!(error = %err,
                            "webhook dispatcher: recording an attempt failed (tried again when its lease expires)"),
                        Some(Err(err)) => tracing::error!(error = %err, "webhook delivery task panicked"),
                        _ => {}
                    }
                }
                _ = self.wakeup.woken(), if !shutdown.is_cancelled() => {}
                _ = tokio::time::sleep(self.settings.poll), if !shutdown.is_cancelled() => {}
                _ = shutdown.cancelled(), if !shutdown.is_cancelled() => {}
            }
        }
    }

    async fn claim(
        &self,
        limit: usize,
        busy: &HashMap<i64, i64>,
    ) -> Result<Vec<Claimed>, WebhookError> {
        let (subs, counts): (Vec<i64>, Vec<i64>) = busy.iter().map(|(s, n)| (*s, *n)).unzip();
        // Long enough for one attempt, however slow, to be recorded.
        let lease = self.settings.timeout.as_secs_f64() * 2.0 + 10.0;
        let rows = self
            .store
            .bounded("webhooks_claim", async |conn| {
                sqlx::query(CLAIM_SQL)
                    .bind(limit as i64)
                    .bind(self.settings.per_subscription as i64)
                    .bind(&subs)
                    .bind(&counts)
                    .bind(lease)
                    .fetch_all(conn)
                    .await
            })
            .await?;
        Ok(rows
            .into_iter()
            .map(|r| Claimed {
                id: r.get("id"),
                subscription_id: r.get("subscription_id"),
                url: r.get("url"),
                secret: r.get("secret"),
                kind: r.get("kind"),
                idempotency_key: r.get("idempotency_key"),
                body: r.get("body"),
                attempts: r.get("attempts"),
            })
            .collect())
    }

    /// One POST of `d`, and its outcome recorded.
    async fn attempt(&self, d: Claimed) -> Result<(i64, Attempted), WebhookError> {
        let sent = self.post(&d).await;
        let result = match sent {
            Ok(()) => {
                self.store
                    .bounded("webhooks_attempt", async |conn| {
                        sqlx::query(
                            "UPDATE webhook_deliveries
                             SET state = 'delivered', delivered_at = now(), leased_until = NULL,
                                 last_error = NULL
                           WHERE id = $1 AND state = 'pending'",
                        )
                        .bind(d.id)
                        .execute(conn)
                        .await
                    })
                    .await?;
                counter!("stockd_webhook_deliveries_total", "outcome" => "delivered").increment(1);
                Attempted::Delivered
            }
            Err(error) if d.attempts as u32 >= self.settings.max_attempts => {
                tracing::warn!(delivery = d.id, subscription = d.subscription_id, url = %d.url,
                    attempts = d.attempts, %error, "webhook delivery failed its last attempt: parked in dead letters");
                self.store
                    .bounded("webhooks_attempt", async |conn| {
                        sqlx::query(
                            "UPDATE webhook_deliveries
                             SET state = 'dead', dead_at = now(), leased_until = NULL, last_error = $2
                           WHERE id = $1 AND state = 'pending'",
                        )
                        .bind(d.id)
                        .bind(&error)
                        .execute(conn)
                        .await
                    })
                    .await?;
                counter!("stockd_webhook_deliveries_total", "outcome" => "dead").increment(1);
                Attempted::Dead
            }
            Err(error) => {
                let delay = self.retry_delay(d.attempts);
                tracing::debug!(delivery = d.id, url = %d.url, attempts = d.attempts, %error,
                    retry_in_ms = delay.as_millis() as u64, "webhook delivery failed; will retry");
                self.store
                    .bounded("webhooks_attempt", async |conn| {
                        sqlx::query(
                            "UPDATE webhook_deliveries
                             SET next_attempt_at = now() + make_interval(secs => $2),
                                 leased_until = NULL, last_error = $3
                           WHERE id = $1 AND state = 'pending'",
                        )
                        .bind(d.id)
                        .bind(delay.as_secs_f64())
                        .bind(&error)
                        .execute(conn)
                        .await
                    })
                    .await?;
                counter!("stockd_webhook_deliveries_total", "outcome" => "retry").increment(1);
                Attempted::Retrying
            }
        };
        Ok((d.id, result))
    }

    /// After the n-th failed attempt: between half and all of
    /// `backoff * 2^(n-1)`, capped (jitter spreads retries of many items).
    fn retry_delay(&self, attempts: i32) -> Duration {
        let ceiling = retry_ceiling(
            self.settings.backoff,
            self.settings.backoff_max,
            (attempts.max(1) - 1) as u32,
        );
        rand::rng().random_range(ceiling / 2..=ceiling)
    }

    /// POSTs the delivery's body, signed; Ok on a 2xx answer, else why not
    /// (the status line only: what a receiver answers is not kept).
    async fn post(&self, d: &Claimed) -> Result<(), String> {
        let url = reqwest::Url::parse(&d.url).map_err(|e| format!("invalid URL: {e}"))?;
        // A literal address is connected to without resolving, so it is
        // checked here; names are checked by the client's resolver.
        self.settings
            .destinations
            .check_literal(&url)
            .map_err(|e| e.to_string())?;
        let secret = match (&d.secret, &self.settings.server_secret) {
            (Some(own), _) => own.as_str(),
            (None, Some(server)) => server.as_str(),
            (None, None) => {
                return Err(
                    "no signing secret: the subscription uses the server-wide secret and \
                     STOCKD_WEBHOOK_SECRET is not set"
                        .into(),
                );
            }
        };
        let timestamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|t| t.as_secs() as i64)
            .unwrap_or(0);
        let id = webhook_id(&d.idempotency_key);
        let body = d.body.as_bytes();
        let response = self
            .http
            .post(url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(ID_HEADER, &id)
            .header(TIMESTAMP_HEADER, timestamp.to_string())
            .header(
                SIGNATURE_HEADER,
                signing::sign(secret, &id, timestamp, body),
            )
            .header(legacy::TIMESTAMP_HEADER, timestamp.to_string())
            .header(
                legacy::SIGNATURE_HEADER,
                legacy::sign(secret.as_bytes(), timestamp, body),
            )
            .header(IDEMPOTENCY_HEADER, &id)
            .header(EVENT_HEADER, &d.kind)
            .header(DELIVERY_HEADER, d.id.to_string())
            .header(ATTEMPT_HEADER, d.attempts.to_string())
            .body(d.body.clone())
            .send()
            .await
            .map_err(|e| error_chain(&e))?;
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        // The body is neither read nor stored: it may be anything the
        // endpoint has (an internal page, a credential), and dead letters
        // are shown to Admin clients.
        Err(format!("HTTP {status}"))
    }

    async fn cleanup(&self) -> Result<(), WebhookError> {
        let deleted = self
            .store
            .bounded("webhooks_cleanup", async |conn| {
                sqlx::query(
                    "DELETE FROM webhook_deliveries
                     WHERE state = 'delivered' AND delivered_at < now() - make_interval(secs => $1)",
                )
                .bind(self.settings.keep_delivered.as_secs_f64())
                .execute(conn)
                .await
            })
            .await?
            .rows_affected();
        if deleted > 0 {
            tracing::debug!(deleted, "deleted old delivered webhook rows");
        }
        Ok(())
    }
}

/// The client every delivery goes through: HTTP/1.1 or HTTPS (rustls, the
/// webpki roots and those of `--webhook-ca-file`), no redirects, no proxy,
/// and names resolved only to addresses the destination policy accepts.
fn http_client(settings: &WebhookSettings) -> Result<reqwest::Client, String> {
    let mut builder = reqwest::Client::builder()
        .timeout(settings.timeout)
        .connect_timeout(settings.timeout)
        // Deliveries go where the subscription says, never elsewhere.
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .dns_resolver(std::sync::Arc::new(PinnedResolver(
            settings.destinations.clone(),
        )))
        .user_agent(concat!("stockd-webhooks/", env!("CARGO_PKG_VERSION")));
    if let Some(path) = &settings.ca_file {
        let pem = std::fs::read(path)
            .map_err(|e| format!("cannot read --webhook-ca-file {}: {e}", path.display()))?;
        let roots = reqwest::Certificate::from_pem_bundle(&pem)
            .map_err(|e| format!("--webhook-ca-file {}: {e}", path.display()))?;
        if roots.is_empty() {
            return Err(format!(
                "--webhook-ca-file {}: no PEM certificate in it",
                path.display()
            ));
        }
        for root in roots {
            builder = builder.add_root_certificate(root);
        }
    }
    builder
        .build()
        .map_err(|e| format!("cannot build the webhook HTTP client: {}", error_chain(&e)))
}

/// `error: cause: cause`, each cause once.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut parts = vec![e.to_string()];
    let mut source = e.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        source = cause.source();
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ca_file_must_hold_certificates() {
        assert!(http_client(&WebhookSettings::default()).is_ok());
        let dir = std::env::temp_dir().join(format!("stockd-ca-file-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let client_with = |name: &str, content: Option<&[u8]>| {
            let path = dir.join(name);
            if let Some(content) = content {
                std::fs::write(&path, content).unwrap();
            }
            http_client(&WebhookSettings {
                ca_file: Some(path),
                ..WebhookSettings::default()
            })
        };

        let missing = client_with("missing.pem", None).unwrap_err();
        assert!(
            missing.contains("cannot read --webhook-ca-file"),
            "{missing}"
        );
        let empty = client_with("empty.pem", Some(b"not a certificate\n")).unwrap_err();
        assert!(empty.contains("no PEM certificate"), "{empty}");

        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = params.self_signed(&key).unwrap().pem();
        assert!(client_with("ca.pem", Some(ca.as_bytes())).is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
