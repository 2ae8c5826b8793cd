//! The stockd target: calls over gRPC, seeding through Admin.SetStock,
//! FlushStatus, and reading the final state back (GetStock, Postgres).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

use super::ledger::Level;
use super::workload::{Line, Op};
use super::{Names, fail};
use crate::commands::{self, Admin, Failure, Inventory};
use stockd::pb;

/// SetStock calls in flight while seeding.
const SEED_CONCURRENCY: usize = 64;
/// Items per GetStock call (the server's limit).
const GET_BATCH: usize = 100;

/// One HTTP/2 connection; requests of many clients are multiplexed on it.
pub async fn connect(endpoint: &Endpoint) -> Result<Channel, Failure> {
    commands::connect(endpoint.clone().tcp_nodelay(true)).await
}

/// One client's calls.
pub struct Caller {
    pub client: Inventory,
    pub names: Names,
    pub ttl_seconds: u32,
}

fn wire_lines(names: &Names, lines: &[Line]) -> Vec<pb::Line> {
    lines
        .iter()
        .map(|&(sku, quantity)| pb::Line {
            sku: names.sku(sku).to_owned(),
            location: String::new(),
            quantity,
        })
        .collect()
}

impl Caller {
    /// Sends `op`; its status code.
    pub async fn call(&mut self, op: &Op) -> Code {
        let c = &mut self.client;
        let result = match op {
            Op::Reserve { id, lines } => {
                let req = pb::ReserveRequest {
                    reservation_id: id.clone(),
                    lines: wire_lines(&self.names, lines),
                    ttl_seconds: self.ttl_seconds,
                };
                c.reserve(req).await.map(drop)
            }
            Op::Commit { id, .. } => c
                .commit(pb::CommitRequest {
                    reservation_id: id.clone(),
                })
                .await
                .map(drop),
            Op::Release { id, .. } => c
                .release(pb::ReleaseRequest {
                    reservation_id: id.clone(),
                })
                .await
                .map(drop),
            Op::Decrement { id, lines } => {
                let req = pb::DecrementRequest {
                    request_id: id.clone(),
                    lines: wire_lines(&self.names, lines),
                };
                c.decrement(req).await.map(drop)
            }
            Op::Adjust { id, sku, delta } => {
                let req = pb::AdjustRequest {
                    request_id: id.clone(),
                    sku: self.names.sku(*sku).to_owned(),
                    location: String::new(),
                    delta: *delta,
                    reason: "bench".into(),
                };
                c.adjust(req).await.map(drop)
            }
        };
        match result {
            Ok(()) => Code::Ok,
            Err(status) => status.code(),
        }
    }
}

/// Sets every SKU of the run to `stock` (version 1: the SKUs are new).
pub async fn seed(admin: &Admin, names: &Names, stock: i64) -> Result<(), Failure> {
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..SEED_CONCURRENCY.min(names.len()) {
        let (mut admin, names, next) = (admin.clone(), names.clone(), next.clone());
        tasks.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= names.len() {
                    return Ok(());
                }
                let sku = names.sku(i as u32);
                let r = admin
                    .set_stock(pb::SetStockRequest {
                        request_id: format!("{}-seed-{i}", names.run_id()),
                        sku: sku.to_owned(),
                        location: String::new(),
                        available: stock,
                        expected_version: Some(0),
                    })
                    .await
                    .map_err(|s| seed_failure(sku, &s))?
                    .into_inner();
                if r.replayed || r.level.as_ref().map(|l| l.version) != Some(1) {
                    return Err(fail(format!(
                        "seeding {sku}: it existed already (run id reused?)"
                    )));
                }
            }
        });
    }
    while let Some(joined) = tasks.join_next().await {
        joined.map_err(|e| fail(format!("seeding task: {e}")))??;
    }
    Ok(())
}

fn seed_failure(sku: &str, s: &Status) -> Failure {
    if s.code() == Code::Aborted {
        return fail(format!("seeding {sku}: it exists already (run id reused?)"));
    }
    Failure::from(Status::new(
        s.code(),
        format!("seeding {sku}: {}", s.message()),
    ))
}

/// What FlushStatus says, summed over the partitions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FlushSnapshot {
    pub pending: u64,
    pub oldest_unflushed_age_ms: i64,
}

/// `None` when the server does not implement FlushStatus.
pub async fn flush_status(admin: &mut Admin) -> Result<Option<FlushSnapshot>, Status> {
    match admin.flush_status(pb::FlushStatusRequest {}).await {
        Ok(r) => Ok(Some(snapshot(&r.into_inner()))),
        Err(s) if s.code() == Code::Unimplemented => Ok(None),
        Err(s) => Err(s),
    }
}

pub fn snapshot(r: &pb::FlushStatusResponse) -> FlushSnapshot {
    FlushSnapshot {
        pending: r.partitions.iter().map(|p| p.pending).sum(),
        oldest_unflushed_age_ms: r
            .partitions
            .iter()
            .map(|p| p.oldest_unflushed_age_ms)
            .max()
            .unwrap_or(0),
    }
}

/// The level of every SKU of the run as GetStock reports it.
pub async fn read_levels(
    client: &mut Inventory,
    names: &Names,
) -> Result<Vec<Option<Level>>, Failure> {
    let mut levels = vec![None; names.len()];
    let all: Vec<u32> = (0..names.len() as u32).collect();
    for batch in all.chunks(GET_BATCH) {
        let r = client
            .get_stock(pb::GetStockRequest {
                items: batch
                    .iter()
                    .map(|&i| pb::ItemRef {
                        sku: names.sku(i).to_owned(),
                        location: String::new(),
                    })
                    .collect(),
            })
            .await
            .map_err(Failure::from)?
            .into_inner();
        for l in r.levels {
            if let Some(i) = names.index_of(&l.sku)
                && l.location == "default"
            {
                levels[i as usize] = Some(Level {
                    available: l.available,
                    reserved: l.reserved,
                    version: Some(l.version),
                });
            }
        }
    }
    Ok(levels)
}

/// The `stock` rows of the run's SKUs in stockd's Postgres.
pub async fn read_postgres(url: &str, names: &Names) -> Result<Vec<Option<Level>>, sqlx::Error> {
    use sqlx::Row;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(10))
        .connect(url)
        .await?;
    let rows = sqlx::query(
        "SELECT sku, available, reserved, version FROM stock
         WHERE location = 'default' AND sku LIKE $1",
    )
    .bind(format!("{}%", names.prefix()))
    .fetch_all(&pool)
    .await?;
    pool.close().await;
    let mut levels = vec![None; names.len()];
    for row in rows {
        let sku: String = row.try_get(0)?;
        if let Some(i) = names.index_of(&sku) {
            levels[i as usize] = Some(Level {
                available: row.try_get(1)?,
                reserved: row.try_get(2)?,
                version: Some(row.try_get(3)?),
            });
        }
    }
    Ok(levels)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_sums_pending_and_takes_the_oldest_age() {
        let p = |partition, pending, age| pb::PartitionFlushStatus {
            partition,
            pending,
            oldest_unflushed_age_ms: age,
            ..Default::default()
        };
        let r = pb::FlushStatusResponse {
            partitions: vec![p(0, 3, 40), p(1, 0, 0), p(2, 5, 900)],
        };
        assert_eq!(
            snapshot(&r),
            FlushSnapshot {
                pending: 8,
                oldest_unflushed_age_ms: 900
            }
        );
        assert_eq!(snapshot(&Default::default()), FlushSnapshot::default());
    }
}
