//! The reservation reaper: releases lapsed holds with op `expire`.
//!
//! Every stockd instance runs one. They may look at the same reservation at
//! the same time: the `finish` script only moves a held, lapsed reservation,
//! atomically, so exactly one of them expires it and the others see "not due".

use std::time::Duration;

use metrics::counter;
use tokio_util::sync::CancellationToken;

use crate::domain::RequestId;
use crate::engine::{Engine, Expiry};
use crate::error::Error;

/// Most reservations one partition hands the reaper per pass.
const BATCH: usize = 256;

/// What one pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ReapOutcome {
    /// Holds this pass released with op `expire`.
    pub expired: u64,
    /// Lapsed holds another instance (or a client's release) finished first.
    pub raced: u64,
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

    /// One pass over every partition's expiry index.
    pub async fn reap_once(&self) -> Result<ReapOutcome, Error> {
        let mut outcome = ReapOutcome::default();
        for partition in self.engine.keys().partitions() {
            loop {
                let due = self.engine.due_reservations(partition, BATCH).await?;
                let full = due.len() == BATCH;
                for raw in due {
                    let result = match RequestId::parse("reservation_id", raw.as_str()) {
                        Ok(id) => self.engine.expire(&id).await?,
                        Err(_) => Expiry::Unknown,
                    };
                    match result {
                        Expiry::Expired => {
                            outcome.expired += 1;
                            counter!("stockd_reservations_expired_total").increment(1);
                        }
                        Expiry::NotDue => outcome.raced += 1,
                        Expiry::Unknown => self.engine.forget_expiry(partition, &raw).await?,
                    }
                }
                if !full {
                    break;
                }
            }
        }
        Ok(outcome)
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
            match self.reap_once().await {
                Ok(outcome) if outcome.expired > 0 => {
                    tracing::info!(expired = outcome.expired, "released lapsed reservations");
                }
                Ok(_) => {}
                Err(err) => tracing::warn!(error = %err, "reaper pass failed; retrying next tick"),
            }
        }
        tracing::debug!("reaper stopped");
    }
}
