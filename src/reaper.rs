//! The reservation reaper: releases lapsed holds with op `expire`.
//!
//! Every stockd instance runs one. They may look at the same reservation at
//! the same time: the `finish` script only moves a held, lapsed reservation,
//! atomically, so exactly one of them expires it and the others see "not due".

use std::time::Duration;

use metrics::counter;
use tokio_util::sync::CancellationToken;

use crate::engine::{Engine, Expiry};
use crate::error::Error;
use crate::keys::Partition;

/// Most reservations one partition hands the reaper per pass.
const BATCH: usize = 256;

/// What one pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ReapOutcome {
    /// Holds this pass released with op `expire`.
    pub expired: u64,
    /// Lapsed holds another instance (or a client's release) finished first.
    pub raced: u64,
    /// Reservations that cannot be finished (their records and the stock
    /// disagree): parked in the partition's dead letters, left for an
    /// operator, and no longer looked at.
    pub broken: u64,
    /// Partitions this pass could not look at (Redis failing); the next
    /// pass tries again.
    pub failed_partitions: u64,
}

#[derive(Clone)]
pub struct Reaper {
    engine: Engine,
    interval: Duration,
}

impl Reaper {
    pub fn new(engine: Engine, interval: Duration) -> Self {
        Self { engine, interval }
    }

    /// One pass over every partition's expiry index. A broken reservation
    /// or a failing partition does not stop the others.
    pub async fn reap_once(&self) -> ReapOutcome {
        let mut outcome = ReapOutcome::default();
        for partition in self.engine.keys().partitions() {
            if let Err(err) = self.reap_partition(partition, &mut outcome).await {
                outcome.failed_partitions += 1;
                tracing::warn!(%partition, error = %err, "reaper: partition skipped this pass");
            }
        }
        outcome
    }

    async fn reap_partition(
        &self,
        partition: Partition,
        outcome: &mut ReapOutcome,
    ) -> Result<(), Error> {
        loop {
            let due = self.engine.due_reservations(partition, BATCH).await?;
            let full = due.len() == BATCH;
            for raw in due {
                // Ids in the expiry index were put there by our own scripts
                // (internal ones included): no validation of client input.
                let result = match self.engine.expire(partition, &raw).await {
                    Ok(expiry) => expiry,
                    // Redis or Postgres failing: the next pass retries.
                    Err(err @ (Error::Unavailable(_) | Error::Backlogged(_))) => {
                        return Err(err);
                    }
                    Err(err) => Expiry::Broken(err.to_string()),
                };
                match result {
                    Expiry::Expired => {
                        outcome.expired += 1;
                        counter!("stockd_reservations_expired_total").increment(1);
                    }
                    Expiry::NotDue => outcome.raced += 1,
                    Expiry::Unknown => {
                        tracing::debug!(%partition, reservation = %raw, "reaper: no such reservation here any more");
                        self.engine.forget_expiry(partition, &raw).await?
                    }
                    Expiry::Broken(detail) => {
                        outcome.broken += 1;
                        counter!("stockd_broken_reservations_total").increment(1);
                        tracing::error!(%partition, reservation = %raw, %detail,
                            "reaper: a reservation cannot be expired; parked in the dead letters for an operator");
                        self.engine
                            .park_broken_reservation(partition, &raw, &detail)
                            .await?;
                    }
                }
            }
            if !full {
                return Ok(());
            }
        }
    }

    /// Reaps every `interval` until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut ticker = tokio::time::interval(self.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = ticker.tick() => {}
            }
            let outcome = self.reap_once().await;
            if outcome.expired > 0 {
                tracing::debug!(expired = outcome.expired, "released lapsed reservations");
            }
        }
        tracing::debug!("reaper stopped");
    }
}
