//! Everything `stockctl` prints: the serde-serializable output documents, the
//! readable tables, and error reports.
//!
//! The JSON documents are our own structs (the prost types do not implement
//! serde); their field names are the wire names of DESIGN.md.

use std::collections::BTreeMap;
use std::io::{self, Write};

use serde::Serialize;
use tonic::{Code, Status};
use tonic_types::StatusExt;

use super::commands::RpcContext;
use stockd::pb;

/// How responses are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Table,
    Json,
}

// ------------------------------------------------------------ documents

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Level {
    pub sku: String,
    pub location: String,
    pub available: i64,
    pub reserved: i64,
    pub version: i64,
}

impl From<pb::StockLevel> for Level {
    fn from(l: pb::StockLevel) -> Self {
        Level {
            sku: l.sku,
            location: l.location,
            available: l.available,
            reserved: l.reserved,
            version: l.version,
        }
    }
}

fn levels(v: Vec<pb::StockLevel>) -> Vec<Level> {
    v.into_iter().map(Level::from).collect()
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Item {
    pub sku: String,
    pub location: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GetOut {
    pub levels: Vec<Level>,
    pub missing: Vec<Item>,
}

impl From<pb::GetStockResponse> for GetOut {
    fn from(r: pb::GetStockResponse) -> Self {
        GetOut {
            levels: levels(r.levels),
            missing: r
                .missing
                .into_iter()
                .map(|i| Item {
                    sku: i.sku,
                    location: i.location,
                })
                .collect(),
        }
    }
}

/// The id a mutating request was sent with; `generated` when stockctl made
/// it up, so the table output can tell the user how to replay it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RequestId {
    #[serde(rename = "request_id")]
    pub id: String,
    #[serde(skip)]
    pub generated: bool,
}

/// The answer of a change to one item: set, adjust.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LevelOut {
    #[serde(flatten)]
    pub request_id: RequestId,
    pub replayed: bool,
    pub level: Option<Level>,
}

impl LevelOut {
    pub fn from_set(request_id: RequestId, r: pb::SetStockResponse) -> Self {
        LevelOut {
            request_id,
            replayed: r.replayed,
            level: r.level.map(Level::from),
        }
    }

    pub fn from_adjust(request_id: RequestId, r: pb::AdjustResponse) -> Self {
        LevelOut {
            request_id,
            replayed: r.replayed,
            level: r.level.map(Level::from),
        }
    }
}

/// The answer of a decrement.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DecrementOut {
    #[serde(flatten)]
    pub request_id: RequestId,
    pub replayed: bool,
    pub levels: Vec<Level>,
}

impl DecrementOut {
    pub fn new(request_id: RequestId, r: pb::DecrementResponse) -> Self {
        DecrementOut {
            request_id,
            replayed: r.replayed,
            levels: levels(r.levels),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReserveOut {
    pub reservation_id: String,
    pub expires_at_ms: i64,
    pub expires_at: String,
    pub replayed: bool,
    pub levels: Vec<Level>,
}

impl From<pb::ReserveResponse> for ReserveOut {
    fn from(r: pb::ReserveResponse) -> Self {
        ReserveOut {
            reservation_id: r.reservation_id,
            expires_at_ms: r.expires_at_ms,
            expires_at: format_ms(r.expires_at_ms),
            replayed: r.replayed,
            levels: levels(r.levels),
        }
    }
}

/// The answer of a commit or a release.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SettleOut {
    pub reservation_id: String,
    pub replayed: bool,
    pub levels: Vec<Level>,
}

impl SettleOut {
    pub fn from_commit(reservation_id: String, r: pb::CommitResponse) -> Self {
        SettleOut {
            reservation_id,
            replayed: r.replayed,
            levels: levels(r.levels),
        }
    }

    pub fn from_release(reservation_id: String, r: pb::ReleaseResponse) -> Self {
        SettleOut {
            reservation_id,
            replayed: r.replayed,
            levels: levels(r.levels),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ExtendOut {
    pub reservation_id: String,
    pub expires_at_ms: i64,
    pub expires_at: String,
}

impl ExtendOut {
    pub fn new(reservation_id: String, r: pb::ExtendResponse) -> Self {
        ExtendOut {
            reservation_id,
            expires_at_ms: r.expires_at_ms,
            expires_at: format_ms(r.expires_at_ms),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PreloadOut {
    pub loaded: u64,
    pub skipped: u64,
    pub not_found: u64,
}

impl From<pb::PreloadResponse> for PreloadOut {
    fn from(r: pb::PreloadResponse) -> Self {
        PreloadOut {
            loaded: r.loaded,
            skipped: r.skipped,
            not_found: r.not_found,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReconcileItemOut {
    pub sku: String,
    pub location: String,
    pub class: String,
    pub redis: Option<Level>,
    pub postgres: Option<Level>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReconcileOut {
    pub checked: u64,
    pub in_sync: u64,
    pub pending_flush: u64,
    pub redis_stale: u64,
    pub drift: u64,
    pub missing_in_redis: u64,
    pub missing_in_postgres: u64,
    pub ledger_mismatch: u64,
    pub repaired: u64,
    pub held_back: u64,
    pub items: Vec<ReconcileItemOut>,
}

impl From<pb::ReconcileResponse> for ReconcileOut {
    fn from(r: pb::ReconcileResponse) -> Self {
        ReconcileOut {
            checked: r.checked,
            in_sync: r.in_sync,
            pending_flush: r.pending_flush,
            redis_stale: r.redis_stale,
            drift: r.drift,
            missing_in_redis: r.missing_in_redis,
            missing_in_postgres: r.missing_in_postgres,
            ledger_mismatch: r.ledger_mismatch,
            repaired: r.repaired,
            held_back: r.held_back,
            items: r
                .items
                .into_iter()
                .map(|i| ReconcileItemOut {
                    sku: i.sku,
                    location: i.location,
                    class: pb::short_name_of::<pb::ItemState>(i.state),
                    redis: i.redis.map(Level::from),
                    postgres: i.postgres.map(Level::from),
                })
                .collect(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PartitionOut {
    pub partition: u32,
    pub stream_length: u64,
    pub pending: u64,
    pub last_flushed_id: String,
    pub oldest_unflushed_age_ms: i64,
    pub dead_letters: u64,
    /// The broker exporters' backlog and lag (absent when none runs).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub exports: Vec<ExportOut>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ExportOut {
    pub exporter: String,
    pub backlog: u64,
    pub lag_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FlushStatusOut {
    pub partitions: Vec<PartitionOut>,
}

impl From<pb::FlushStatusResponse> for FlushStatusOut {
    fn from(r: pb::FlushStatusResponse) -> Self {
        FlushStatusOut {
            partitions: r
                .partitions
                .into_iter()
                .map(|p| PartitionOut {
                    partition: p.partition,
                    stream_length: p.stream_length,
                    pending: p.pending,
                    last_flushed_id: p.last_flushed_id,
                    oldest_unflushed_age_ms: p.oldest_unflushed_age_ms,
                    dead_letters: p.dead_letters,
                    exports: p
                        .exports
                        .into_iter()
                        .map(|e| ExportOut {
                            exporter: e.exporter,
                            backlog: e.backlog,
                            lag_ms: e.lag_ms,
                        })
                        .collect(),
                })
                .collect(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EventOut {
    pub event_id: String,
    pub partition: u32,
    pub sku: String,
    pub location: String,
    pub op: String,
    pub delta_available: i64,
    pub delta_reserved: i64,
    pub available: i64,
    pub reserved: i64,
    pub version: i64,
    pub reference: String,
    pub ts_ms: i64,
}

impl From<pb::StockEvent> for EventOut {
    fn from(e: pb::StockEvent) -> Self {
        EventOut {
            event_id: e.event_id,
            partition: e.partition,
            sku: e.sku,
            location: e.location,
            op: pb::short_name_of::<pb::StockOp>(e.op),
            delta_available: e.delta_available,
            delta_reserved: e.delta_reserved,
            available: e.available,
            reserved: e.reserved,
            version: e.version,
            reference: e.reference,
            ts_ms: e.ts_ms,
        }
    }
}

/// One response of a unary command.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    Get(GetOut),
    Level(LevelOut),
    Decrement(DecrementOut),
    Reserve(ReserveOut),
    Settle(SettleOut),
    Extend(ExtendOut),
    Preload(PreloadOut),
    Reconcile(ReconcileOut),
    FlushStatus(FlushStatusOut),
}

impl Output {
    pub fn write(&self, format: Format, w: &mut dyn Write) -> io::Result<()> {
        match format {
            Format::Json => {
                match self {
                    Output::Get(o) => serde_json::to_writer_pretty(&mut *w, o),
                    Output::Level(o) => serde_json::to_writer_pretty(&mut *w, o),
                    Output::Decrement(o) => serde_json::to_writer_pretty(&mut *w, o),
                    Output::Reserve(o) => serde_json::to_writer_pretty(&mut *w, o),
                    Output::Settle(o) => serde_json::to_writer_pretty(&mut *w, o),
                    Output::Extend(o) => serde_json::to_writer_pretty(&mut *w, o),
                    Output::Preload(o) => serde_json::to_writer_pretty(&mut *w, o),
                    Output::Reconcile(o) => serde_json::to_writer_pretty(&mut *w, o),
                    Output::FlushStatus(o) => serde_json::to_writer_pretty(&mut *w, o),
                }
                .map_err(io::Error::other)?;
                writeln!(w)
            }
            Format::Table => self.write_table(w),
        }
    }

    fn write_table(&self, w: &mut dyn Write) -> io::Result<()> {
        match self {
            Output::Get(o) => {
                if o.levels.is_empty() {
                    writeln!(w, "no stock levels found")?;
                } else {
                    levels_table(&o.levels).write(w)?;
                }
                if !o.missing.is_empty() {
                    let missing: Vec<String> = o
                        .missing
                        .iter()
                        .map(|i| format!("{}@{}", clean(&i.sku), location(&i.location)))
                        .collect();
                    writeln!(w, "missing: {}", missing.join(", "))?;
                }
                Ok(())
            }
            Output::Level(o) => {
                write_fields(w, &[request_id_field(&o.request_id), replayed(o.replayed)])?;
                levels_table(o.level.as_slice()).write(w)
            }
            Output::Decrement(o) => {
                write_fields(w, &[request_id_field(&o.request_id), replayed(o.replayed)])?;
                levels_table(&o.levels).write(w)
            }
            Output::Reserve(o) => {
                write_fields(
                    w,
                    &[
                        ("reservation_id", clean(&o.reservation_id)),
                        ("expires_at", expires(o.expires_at_ms, &o.expires_at)),
                        replayed(o.replayed),
                    ],
                )?;
                levels_table(&o.levels).write(w)
            }
            Output::Settle(o) => {
                write_fields(
                    w,
                    &[
                        ("reservation_id", clean(&o.reservation_id)),
                        replayed(o.replayed),
                    ],
                )?;
                levels_table(&o.levels).write(w)
            }
            Output::Extend(o) => write_fields(
                w,
                &[
                    ("reservation_id", clean(&o.reservation_id)),
                    ("expires_at", expires(o.expires_at_ms, &o.expires_at)),
                ],
            ),
            Output::Preload(o) => write_fields(
                w,
                &[
                    ("loaded", o.loaded.to_string()),
                    ("skipped", o.skipped.to_string()),
                    ("not_found", o.not_found.to_string()),
                ],
            ),
            Output::Reconcile(o) => {
                write_fields(
                    w,
                    &[
                        ("checked", o.checked.to_string()),
                        ("in_sync", o.in_sync.to_string()),
                        ("pending_flush", o.pending_flush.to_string()),
                        ("redis_stale", o.redis_stale.to_string()),
                        ("drift", o.drift.to_string()),
                        ("missing_in_redis", o.missing_in_redis.to_string()),
                        ("missing_in_postgres", o.missing_in_postgres.to_string()),
                        ("ledger_mismatch", o.ledger_mismatch.to_string()),
                        ("repaired", o.repaired.to_string()),
                        ("held_back", o.held_back.to_string()),
                    ],
                )?;
                if o.items.is_empty() {
                    return Ok(());
                }
                let mut t = Table::new(&[
                    ("SKU", Align::Left),
                    ("LOCATION", Align::Left),
                    ("CLASS", Align::Left),
                    ("REDIS_AVAIL", Align::Right),
                    ("REDIS_RESV", Align::Right),
                    ("REDIS_VER", Align::Right),
                    ("PG_AVAIL", Align::Right),
                    ("PG_RESV", Align::Right),
                    ("PG_VER", Align::Right),
                ]);
                for i in &o.items {
                    let mut row = vec![clean(&i.sku), location(&i.location), clean(&i.class)];
                    row.extend(level_cells(i.redis.as_ref()));
                    row.extend(level_cells(i.postgres.as_ref()));
                    t.row(row);
                }
                writeln!(w)?;
                t.write(w)
            }
            Output::FlushStatus(o) => {
                let mut t = Table::new(&[
                    ("PARTITION", Align::Right),
                    ("STREAM_LENGTH", Align::Right),
                    ("PENDING", Align::Right),
                    ("LAST_FLUSHED_ID", Align::Left),
                    ("OLDEST_UNFLUSHED_AGE_MS", Align::Right),
                    ("DEAD_LETTERS", Align::Right),
                ]);
                for p in &o.partitions {
                    t.row(vec![
                        p.partition.to_string(),
                        p.stream_length.to_string(),
                        p.pending.to_string(),
                        or_dash(&clean(&p.last_flushed_id)),
                        p.oldest_unflushed_age_ms.to_string(),
                        p.dead_letters.to_string(),
                    ]);
                }
                t.write(w)?;
                // The exporters, when any runs: backlog and lag per partition.
                let mut exports = Table::new(&[
                    ("EXPORTER", Align::Left),
                    ("PARTITION", Align::Right),
                    ("BACKLOG", Align::Right),
                    ("LAG_MS", Align::Right),
                ]);
                let mut any = false;
                for p in &o.partitions {
                    for e in &p.exports {
                        any = true;
                        exports.row(vec![
                            clean(&e.exporter),
                            p.partition.to_string(),
                            e.backlog.to_string(),
                            e.lag_ms.to_string(),
                        ]);
                    }
                }
                if any {
                    writeln!(w)?;
                    exports.write(w)?;
                }
                Ok(())
            }
        }
    }
}

/// Prints one watched event: a JSON object on one line, or one readable line.
pub fn write_event(e: &EventOut, format: Format, w: &mut dyn Write) -> io::Result<()> {
    match format {
        Format::Json => {
            serde_json::to_writer(&mut *w, e).map_err(io::Error::other)?;
            writeln!(w)
        }
        Format::Table => writeln!(
            w,
            "{} {} p{:02} {:<9} {}@{} available={} ({:+}) reserved={} ({:+}) version={} ref={}",
            format_ms(e.ts_ms),
            clean(&e.event_id),
            e.partition,
            clean(&e.op),
            clean(&e.sku),
            location(&e.location),
            e.available,
            e.delta_available,
            e.reserved,
            e.delta_reserved,
            e.version,
            or_dash(&clean(&e.reference)),
        ),
    }
}

// --------------------------------------------------------------- errors

/// The `{ "error": ... }` document of a failed rpc.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ErrorDoc {
    pub error: ErrorOut,
    /// The id a failed decrement/adjust/set was sent with.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// Where a paged job that failed midway resumes (`--cursor`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resume_cursor: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ErrorOut {
    pub code: &'static str,
    /// The `google.rpc.ErrorInfo` reason, e.g. `OUT_OF_STOCK` (none when
    /// the status did not come from stockd, e.g. a connection failure).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub message: String,
    /// The ErrorInfo metadata, e.g. `reservation_id`.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
    /// From `google.rpc.RetryInfo`: the server advises a retry after this.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u128>,
    pub details: Vec<DetailOut>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum DetailOut {
    /// One `google.rpc.PreconditionFailure` violation.
    PreconditionFailure {
        violation_type: String,
        subject: String,
        description: String,
    },
    /// One `google.rpc.BadRequest` field violation.
    BadRequest { field: String, description: String },
}

impl ErrorOut {
    pub fn from_status(status: &Status) -> Self {
        let all = status.get_error_details();
        let mut details = Vec::new();
        if let Some(pf) = all.precondition_failure() {
            details.extend(
                pf.violations
                    .iter()
                    .map(|v| DetailOut::PreconditionFailure {
                        violation_type: v.r#type.clone(),
                        subject: v.subject.clone(),
                        description: v.description.clone(),
                    }),
            );
        }
        if let Some(br) = all.bad_request() {
            details.extend(br.field_violations.iter().map(|v| DetailOut::BadRequest {
                field: v.field.clone(),
                description: v.description.clone(),
            }));
        }
        let info = all.error_info();
        ErrorOut {
            code: code_name(status.code()),
            reason: info.map(|i| i.reason.clone()),
            message: status.message().to_owned(),
            metadata: info
                .map(|i| i.metadata.clone().into_iter().collect())
                .unwrap_or_default(),
            retry_after_ms: all
                .retry_info()
                .and_then(|r| r.retry_delay)
                .map(|d| d.as_millis()),
            details,
        }
    }
}

/// Prints a failed rpc: the JSON document on `out` with `--json`, otherwise
/// `error: CODE (REASON): message` and one line per detail on `err`.
pub fn write_error(
    status: &Status,
    context: &RpcContext,
    format: Format,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> io::Result<()> {
    let e = ErrorOut::from_status(status);
    match format {
        Format::Json => {
            let doc = ErrorDoc {
                error: e,
                request_id: context.request_id.as_ref().map(|r| r.id.clone()),
                resume_cursor: context.resume_cursor.clone(),
            };
            serde_json::to_writer_pretty(&mut *out, &doc).map_err(io::Error::other)?;
            writeln!(out)
        }
        Format::Table => {
            let code = match &e.reason {
                // The reason adds nothing when it only repeats the code.
                Some(reason) if reason != e.code => format!("{} ({})", e.code, clean(reason)),
                _ => e.code.to_owned(),
            };
            if e.message.is_empty() {
                writeln!(err, "error: {code}")?;
            } else {
                writeln!(err, "error: {code}: {}", clean(&e.message))?;
            }
            for d in &e.details {
                match d {
                    DetailOut::PreconditionFailure {
                        subject,
                        description,
                        ..
                    } => writeln!(err, "  {}: {}", clean(subject), clean(description))?,
                    DetailOut::BadRequest { field, description } => {
                        writeln!(err, "  field {}: {}", clean(field), clean(description))?
                    }
                }
            }
            if let Some(ms) = e.retry_after_ms {
                writeln!(err, "retry after: {ms} ms")?;
            }
            if let Some(r) = &context.request_id {
                let (k, v) = request_id_field(r);
                writeln!(err, "{k}: {v}")?;
            }
            if let Some(cursor) = &context.resume_cursor {
                writeln!(err, "resume with: --cursor {}", shell_word(cursor))?;
            }
            Ok(())
        }
    }
}

/// The `{ "error": ... }` document of a command line that cannot work.
#[derive(Debug, Clone, PartialEq, Serialize)]
struct UsageErrorDoc<'a> {
    error: UsageErrorOut<'a>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
struct UsageErrorOut<'a> {
    code: &'static str,
    message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<&'a str>,
}

/// Prints a usage error on `err`: `error: message`, or with `--json` a JSON
/// document `{"error": {"code": "USAGE", "message", "usage"}}`. `text` may
/// be clap's whole report (`error: ...`, then `Usage: ...`).
pub fn write_usage_error(text: &str, format: Format, err: &mut dyn Write) -> io::Result<()> {
    let mut lines = text.lines();
    let first = lines.next().unwrap_or_default();
    let message = first.strip_prefix("error: ").unwrap_or(first);
    match format {
        Format::Table => writeln!(
            err,
            "error: {}",
            text.strip_prefix("error: ").unwrap_or(text)
        ),
        Format::Json => {
            let doc = UsageErrorDoc {
                error: UsageErrorOut {
                    code: "USAGE",
                    message,
                    usage: lines.find_map(|l| l.strip_prefix("Usage: ")),
                },
            };
            serde_json::to_writer(&mut *err, &doc).map_err(io::Error::other)?;
            writeln!(err)
        }
    }
}

/// The canonical name of a gRPC status code, e.g. `FAILED_PRECONDITION`.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

// ---------------------------------------------------------------- table

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Align {
    Left,
    Right,
}

/// A plain text table: columns padded to their widest cell, two spaces apart.
#[derive(Debug, Clone)]
pub struct Table {
    headers: Vec<(&'static str, Align)>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(headers: &[(&'static str, Align)]) -> Self {
        Table {
            headers: headers.to_vec(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        assert_eq!(cells.len(), self.headers.len(), "table row width");
        self.rows.push(cells);
    }

    pub fn write(&self, w: &mut dyn Write) -> io::Result<()> {
        let widths: Vec<usize> = self
            .headers
            .iter()
            .enumerate()
            .map(|(i, (h, _))| {
                self.rows
                    .iter()
                    .map(|r| r[i].chars().count())
                    .chain([h.chars().count()])
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let header: Vec<String> = self.headers.iter().map(|(h, _)| (*h).to_owned()).collect();
        for cells in std::iter::once(&header).chain(&self.rows) {
            let mut line = String::new();
            for (i, cell) in cells.iter().enumerate() {
                if i > 0 {
                    line.push_str("  ");
                }
                let pad = widths[i] - cell.chars().count();
                match self.headers[i].1 {
                    Align::Left => {
                        line.push_str(cell);
                        line.extend(std::iter::repeat_n(' ', pad));
                    }
                    Align::Right => {
                        line.extend(std::iter::repeat_n(' ', pad));
                        line.push_str(cell);
                    }
                }
            }
            writeln!(w, "{}", line.trim_end())?;
        }
        Ok(())
    }
}

fn levels_table(levels: &[Level]) -> Table {
    let mut t = Table::new(&[
        ("SKU", Align::Left),
        ("LOCATION", Align::Left),
        ("AVAILABLE", Align::Right),
        ("RESERVED", Align::Right),
        ("VERSION", Align::Right),
    ]);
    for l in levels {
        t.row(vec![
            clean(&l.sku),
            location(&l.location),
            l.available.to_string(),
            l.reserved.to_string(),
            l.version.to_string(),
        ]);
    }
    t
}

fn level_cells(l: Option<&Level>) -> [String; 3] {
    match l {
        Some(l) => [
            l.available.to_string(),
            l.reserved.to_string(),
            l.version.to_string(),
        ],
        None => ["-".into(), "-".into(), "-".into()],
    }
}

/// `key: value` lines with the values aligned.
fn write_fields(w: &mut dyn Write, fields: &[(&str, String)]) -> io::Result<()> {
    let width = fields.iter().map(|(k, _)| k.len()).max().unwrap_or(0) + 1;
    for (k, v) in fields {
        writeln!(w, "{:<width$} {v}", format!("{k}:"))?;
    }
    Ok(())
}

fn request_id_field(r: &RequestId) -> (&'static str, String) {
    let id = clean(&r.id);
    if r.generated {
        (
            "request_id",
            format!("{id} (generated; replay with --request-id {id})"),
        )
    } else {
        ("request_id", id)
    }
}

fn replayed(b: bool) -> (&'static str, String) {
    ("replayed", b.to_string())
}

fn expires(ms: i64, formatted: &str) -> String {
    format!("{formatted} ({ms} ms)")
}

/// An empty location is the server's `default`.
fn location(l: &str) -> String {
    if l.is_empty() {
        "default".to_owned()
    } else {
        clean(l)
    }
}

fn or_dash(s: &str) -> String {
    if s.is_empty() {
        "-".to_owned()
    } else {
        s.to_owned()
    }
}

/// Escapes control characters so a value from the server cannot drive the
/// terminal or break the table layout.
pub fn clean(s: &str) -> String {
    if !s.chars().any(char::is_control) {
        return s.to_owned();
    }
    s.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// `s` as one shell word, single-quoted when it holds anything but plain
/// characters (a resume cursor holds a tab), so it can be pasted back.
pub fn shell_word(s: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "-_.,:/=@%+".contains(c);
    if !s.is_empty() && s.chars().all(plain) {
        return s.to_owned();
    }
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Unix milliseconds as an RFC 3339 UTC timestamp, e.g.
/// `2024-03-01T12:00:00.250Z`.
pub fn format_ms(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let millis = ms.rem_euclid(1000);
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        sod / 3600,
        sod % 3600 / 60,
        sod % 60
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian (year, month, day)
/// (H. Hinnant's `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic_types::{ErrorDetails, FieldViolation, PreconditionViolation};

    fn to_string(f: impl FnOnce(&mut Vec<u8>) -> io::Result<()>) -> String {
        let mut buf = Vec::new();
        f(&mut buf).unwrap();
        String::from_utf8(buf).unwrap()
    }

    fn level(sku: &str, location: &str, a: i64, r: i64, v: i64) -> pb::StockLevel {
        pb::StockLevel {
            sku: sku.into(),
            location: location.into(),
            available: a,
            reserved: r,
            version: v,
        }
    }

    #[test]
    fn format_ms_known_instants() {
        assert_eq!(format_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(format_ms(1_709_294_400_250), "2024-03-01T12:00:00.250Z");
        // Leap day, end of day.
        assert_eq!(format_ms(1_709_251_199_999), "2024-02-29T23:59:59.999Z");
        assert_eq!(format_ms(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(format_ms(-1), "1969-12-31T23:59:59.999Z");
    }

    #[test]
    fn table_aligns_columns() {
        let out = to_string(|w| {
            let o = Output::Get(GetOut::from(pb::GetStockResponse {
                levels: vec![
                    level("tshirt-red-m", "berlin", 12, 3, 17),
                    level("a", "default", 1000, 0, 1),
                ],
                missing: vec![pb::ItemRef {
                    sku: "nope".into(),
                    location: String::new(),
                }],
            }));
            o.write(Format::Table, w)
        });
        let expected = "\
SKU           LOCATION  AVAILABLE  RESERVED  VERSION
tshirt-red-m  berlin           12         3       17
a             default        1000         0        1
missing: nope@default
";
        assert_eq!(out, expected);
    }

    #[test]
    fn get_json_document() {
        let out = to_string(|w| {
            Output::Get(GetOut::from(pb::GetStockResponse {
                levels: vec![level("a", "b", 1, 2, 3)],
                missing: vec![pb::ItemRef {
                    sku: "x".into(),
                    location: "y".into(),
                }],
            }))
            .write(Format::Json, w)
        });
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "levels": [{"sku": "a", "location": "b", "available": 1, "reserved": 2, "version": 3}],
                "missing": [{"sku": "x", "location": "y"}],
            })
        );
    }

    #[test]
    fn generated_request_id_is_shown_with_replay_hint() {
        let o = Output::Level(LevelOut::from_adjust(
            RequestId {
                id: "ctl-1-2".into(),
                generated: true,
            },
            pb::AdjustResponse {
                level: Some(level("a", "", 5, 0, 2)),
                replayed: false,
            },
        ));
        let table = to_string(|w| o.write(Format::Table, w));
        assert!(
            table.starts_with(
                "request_id: ctl-1-2 (generated; replay with --request-id ctl-1-2)\nreplayed:   false\n"
            ),
            "{table}"
        );
        assert!(table.contains("a    default"), "{table}");
        let json: serde_json::Value =
            serde_json::from_str(&to_string(|w| o.write(Format::Json, w))).unwrap();
        assert_eq!(json["request_id"], "ctl-1-2");
        assert_eq!(json["replayed"], false);
        assert_eq!(json["level"]["available"], 5);
        assert!(json.get("generated").is_none());
    }

    #[test]
    fn reserve_shows_expiry() {
        let o = Output::Reserve(ReserveOut::from(pb::ReserveResponse {
            reservation_id: "r1".into(),
            expires_at_ms: 1_709_294_400_250,
            levels: vec![level("a", "b", 1, 2, 3)],
            replayed: true,
        }));
        let table = to_string(|w| o.write(Format::Table, w));
        assert!(
            table.contains("expires_at:     2024-03-01T12:00:00.250Z (1709294400250 ms)"),
            "{table}"
        );
        assert!(table.contains("replayed:       true"), "{table}");
        let json: serde_json::Value =
            serde_json::from_str(&to_string(|w| o.write(Format::Json, w))).unwrap();
        assert_eq!(json["expires_at"], "2024-03-01T12:00:00.250Z");
        assert_eq!(json["levels"][0]["reserved"], 2);
    }

    #[test]
    fn reconcile_missing_side_is_dash_and_null() {
        let o = Output::Reconcile(ReconcileOut::from(pb::ReconcileResponse {
            checked: 1,
            missing_in_postgres: 1,
            items: vec![pb::ReconcileItem {
                sku: "a".into(),
                location: "b".into(),
                state: pb::ItemState::MissingInPostgres.into(),
                redis: Some(level("a", "b", 4, 0, 9)),
                postgres: None,
            }],
            ..Default::default()
        }));
        let table = to_string(|w| o.write(Format::Table, w));
        let last = table.lines().last().unwrap();
        assert_eq!(
            last.split_whitespace().collect::<Vec<_>>(),
            [
                "a",
                "b",
                "missing_in_postgres",
                "4",
                "0",
                "9",
                "-",
                "-",
                "-"
            ]
        );
        let json: serde_json::Value =
            serde_json::from_str(&to_string(|w| o.write(Format::Json, w))).unwrap();
        assert!(json["items"][0]["postgres"].is_null());
        assert_eq!(json["items"][0]["redis"]["version"], 9);
        assert_eq!(json["missing_in_postgres"], 1);
    }

    #[test]
    fn event_json_is_one_line() {
        let e = EventOut::from(pb::StockEvent {
            event_id: "1-0".into(),
            partition: 3,
            sku: "a".into(),
            location: "b".into(),
            op: pb::StockOp::Reserve.into(),
            delta_available: -2,
            delta_reserved: 2,
            available: 8,
            reserved: 2,
            version: 5,
            reference: "r1".into(),
            ts_ms: 0,
        });
        let json = to_string(|w| write_event(&e, Format::Json, w));
        assert_eq!(json.lines().count(), 1);
        assert!(json.ends_with('\n'));
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["delta_available"], -2);
        assert_eq!(v["op"], "reserve");
        let line = to_string(|w| write_event(&e, Format::Table, w));
        assert_eq!(
            line,
            "1970-01-01T00:00:00.000Z 1-0 p03 reserve   a@b available=8 (-2) reserved=2 (+2) version=5 ref=r1\n"
        );
    }

    /// What `write_error` prints: (stdout, stderr).
    fn printed(status: &Status, context: &RpcContext, format: Format) -> (String, String) {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        write_error(status, context, format, &mut out, &mut err).unwrap();
        (
            String::from_utf8(out).unwrap(),
            String::from_utf8(err).unwrap(),
        )
    }

    fn printed_table(status: &Status) -> String {
        let (out, err) = printed(status, &RpcContext::default(), Format::Table);
        assert!(out.is_empty(), "{out}");
        err
    }

    #[test]
    fn precondition_failure_one_line_per_violation() {
        let status = Status::with_error_details(
            Code::FailedPrecondition,
            "not enough stock",
            ErrorDetails::with_precondition_failure(vec![
                PreconditionViolation::new("STOCK", "berlin/a", "requested 3, available 1"),
                PreconditionViolation::new("STOCK", "default/b", "requested 2, available 0"),
            ]),
        );
        assert_eq!(
            printed_table(&status),
            "error: FAILED_PRECONDITION: not enough stock\n  berlin/a: requested 3, available 1\n  default/b: requested 2, available 0\n"
        );

        let (out, err) = printed(&status, &RpcContext::default(), Format::Json);
        assert!(err.is_empty());
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["error"]["code"], "FAILED_PRECONDITION");
        assert_eq!(v["error"]["message"], "not enough stock");
        assert_eq!(
            v["error"]["details"][1],
            serde_json::json!({
                "type": "precondition_failure",
                "violation_type": "STOCK",
                "subject": "default/b",
                "description": "requested 2, available 0",
            })
        );
    }

    #[test]
    fn bad_request_field_violations() {
        let status = Status::with_error_details(
            Code::InvalidArgument,
            "lines[0].quantity out of range",
            ErrorDetails::with_bad_request(vec![FieldViolation::new(
                "lines[0].quantity",
                "must be 1..=1000000",
            )]),
        );
        assert_eq!(
            printed_table(&status),
            "error: INVALID_ARGUMENT: lines[0].quantity out of range\n  field lines[0].quantity: must be 1..=1000000\n"
        );
    }

    #[test]
    fn plain_error_and_control_characters() {
        let status = Status::new(Code::Unimplemented, "");
        assert_eq!(printed_table(&status), "error: UNIMPLEMENTED\n");
        let status = Status::not_found("unknown sku \u{1b}[31mred");
        assert_eq!(
            printed_table(&status),
            "error: NOT_FOUND: unknown sku \\u{1b}[31mred\n"
        );
    }

    #[test]
    fn reason_and_retry_advice() {
        let mut details = ErrorDetails::with_retry_info(Some(std::time::Duration::from_secs(2)));
        details.set_error_info("BACKLOG", "stockd.v1", std::collections::HashMap::new());
        let status = Status::with_error_details(Code::Unavailable, "retry later", details);
        let context = RpcContext {
            request_id: None,
            resume_cursor: Some("pg:42".into()),
        };
        let (_, err) = printed(&status, &context, Format::Table);
        assert_eq!(
            err,
            "error: UNAVAILABLE (BACKLOG): retry later\nretry after: 2000 ms\nresume with: --cursor pg:42\n"
        );
        let (out, _) = printed(&status, &context, Format::Json);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["error"]["reason"], "BACKLOG");
        assert_eq!(v["error"]["retry_after_ms"], 2000);
        assert_eq!(v["resume_cursor"], "pg:42");
        assert!(
            v["error"].get("metadata").is_none(),
            "empty metadata is left out"
        );
    }

    #[test]
    fn shell_words_paste_back() {
        assert_eq!(shell_word("redis:42"), "redis:42");
        assert_eq!(shell_word("pg:a\tdefault"), "'pg:a\tdefault'");
        assert_eq!(shell_word("it's"), r"'it'\''s'");
        assert_eq!(shell_word(""), "''");
    }

    #[test]
    fn usage_error_documents() {
        let clap_text = "error: unexpected argument '--nope' found\n\nUsage: stockctl get <ITEM>...\n\nFor more information, try '--help'.\n";
        let mut err = Vec::new();
        write_usage_error(clap_text, Format::Json, &mut err).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&err).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"error": {
                "code": "USAGE",
                "message": "unexpected argument '--nope' found",
                "usage": "stockctl get <ITEM>...",
            }})
        );
        let mut err = Vec::new();
        write_usage_error("invalid --admin-token: empty", Format::Table, &mut err).unwrap();
        assert_eq!(
            String::from_utf8(err).unwrap(),
            "error: invalid --admin-token: empty\n"
        );
    }

    #[test]
    fn code_names_are_canonical() {
        assert_eq!(code_name(Code::FailedPrecondition), "FAILED_PRECONDITION");
        assert_eq!(code_name(Code::AlreadyExists), "ALREADY_EXISTS");
        assert_eq!(code_name(Code::Unauthenticated), "UNAUTHENTICATED");
        assert_eq!(code_name(Code::from_i32(6)), "ALREADY_EXISTS");
    }
}
