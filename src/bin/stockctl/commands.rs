//! Runs one `stockctl` command against the server.

use std::io::{self, Write};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tonic::codegen::InterceptedService;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Request, Status};

use super::args::{Command, RequestIdArg, Secret};
use super::render::{
    self, DecrementOut, EventOut, ExtendOut, Format, GetOut, LevelOut, Output, PreloadOut,
    ReconcileOut, RequestId, ReserveOut, SettleOut,
};
use stockd::pb;
use stockd::pb::admin_client::AdminClient;
use stockd::pb::inventory_client::InventoryClient;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a command did not succeed.
#[derive(Debug)]
pub enum Failure {
    /// The server (or the connection to it) answered with an error status;
    /// with the request id of a mutating request, since a retry with the
    /// same id is safe (the server returns the first outcome).
    Rpc(Status, Option<RequestId>),
    /// The invocation cannot work (e.g. a token that is not a header value).
    Usage(String),
    /// Writing the output failed.
    Io(io::Error),
    /// The command ran but failed otherwise (e.g. a bench run's checks).
    Other(String),
}

impl From<Status> for Failure {
    fn from(s: Status) -> Self {
        Failure::Rpc(s, None)
    }
}

impl From<io::Error> for Failure {
    fn from(e: io::Error) -> Self {
        Failure::Io(e)
    }
}

/// Adds `authorization: Bearer <token>` to every request when a token is set.
#[derive(Clone, Default)]
pub struct BearerAuth(Option<MetadataValue<Ascii>>);

impl BearerAuth {
    /// `which` names the flag for the error message; the token is never
    /// shown. An empty token (e.g. `STOCKD_ADMIN_TOKEN=`) counts as unset.
    pub fn new(token: Option<&Secret>, which: &str) -> Result<Self, Failure> {
        match token {
            None => Ok(BearerAuth(None)),
            Some(t) if t.expose().is_empty() => Ok(BearerAuth(None)),
            Some(t) => {
                let mut v = t
                    .bearer()
                    .map_err(|e| Failure::Usage(format!("invalid {which}: {e}")))?;
                v.set_sensitive(true);
                Ok(BearerAuth(Some(v)))
            }
        }
    }
}

impl Interceptor for BearerAuth {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// What a command needs to reach the server.
pub struct Target {
    pub addr: String,
    pub admin_token: Option<Secret>,
    pub client_token: Option<Secret>,
    /// TLS settings for an https:// address.
    pub tls: TlsFiles,
}

/// Where the client's TLS material is.
#[derive(Debug, Default, Clone)]
pub struct TlsFiles {
    pub ca: Option<std::path::PathBuf>,
    pub cert: Option<std::path::PathBuf>,
    pub key: Option<std::path::PathBuf>,
    pub domain: Option<String>,
}

impl TlsFiles {
    /// The TLS configuration of an https:// channel.
    fn config(&self) -> Result<ClientTlsConfig, Failure> {
        let read = |path: &std::path::Path| {
            std::fs::read(path)
                .map_err(|e| Failure::Usage(format!("cannot read {}: {e}", path.display())))
        };
        let mut tls = ClientTlsConfig::new().with_enabled_roots();
        if let Some(ca) = &self.ca {
            tls = tls.ca_certificate(Certificate::from_pem(read(ca)?));
        }
        if let (Some(cert), Some(key)) = (&self.cert, &self.key) {
            tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
        }
        if let Some(domain) = &self.domain {
            tls = tls.domain_name(domain.clone());
        }
        Ok(tls)
    }
}

/// A fresh request id: `ctl-<unix-nanos>-<pid>`.
pub fn generate_request_id() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("ctl-{nanos}-{}", std::process::id())
}

fn request_id(arg: RequestIdArg) -> RequestId {
    match arg.request_id {
        Some(id) => RequestId {
            id,
            generated: false,
        },
        None => RequestId {
            id: generate_request_id(),
            generated: true,
        },
    }
}

async fn connect(addr: &str, tls: &TlsFiles) -> Result<Channel, Failure> {
    let mut endpoint = Endpoint::from_shared(addr.to_owned())
        .map_err(|e| Status::invalid_argument(format!("bad address {addr}: {e}")))?
        .connect_timeout(CONNECT_TIMEOUT);
    if addr.starts_with("https://") {
        endpoint = endpoint
            .tls_config(tls.config()?)
            .map_err(|e| Failure::Usage(format!("TLS settings: {}", error_chain(&e))))?;
    }
    endpoint.connect().await.map_err(|e| {
        Status::unavailable(format!("cannot connect to {addr}: {}", error_chain(&e))).into()
    })
}

/// `e: cause: cause` — tonic's transport error alone says only "transport
/// error". A cause that repeats the one before it is left out.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut parts = vec![e.to_string()];
    let mut source = e.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if parts.last() != Some(&text) {
            parts.push(text);
        }
        source = cause.source();
    }
    parts.join(": ")
}

pub type Inventory = InventoryClient<InterceptedService<Channel, BearerAuth>>;
pub type Admin = AdminClient<InterceptedService<Channel, BearerAuth>>;

/// Whether `command` calls the Admin service (and so sends the admin token).
pub fn is_admin(command: &Command) -> bool {
    match command {
        Command::Set { .. }
        | Command::Preload { .. }
        | Command::Reconcile { .. }
        | Command::FlushStatus
        | Command::Webhook(_) => true,
        Command::Get { .. }
        | Command::Reserve { .. }
        | Command::Commit { .. }
        | Command::Release { .. }
        | Command::Extend { .. }
        | Command::Decrement { .. }
        | Command::Adjust { .. }
        | Command::Watch { .. }
        | Command::Bench(_) => false,
    }
}

/// Items per page of `preload --all` and `reconcile --all`: each page is one
/// rpc, so progress shows between them.
const PAGE_SIZE: u32 = 50_000;
/// Items of a paged reconcile shown with both sides.
const MAX_RECONCILE_ITEMS: usize = 100;

/// One progress line on standard error (tables only: JSON output stays clean).
fn progress(
    err: &mut dyn Write,
    format: Format,
    started: Instant,
    done: u64,
    what: &str,
) -> Result<(), Failure> {
    if format == Format::Table {
        let secs = started.elapsed().as_secs_f64().max(0.001);
        writeln!(
            err,
            "{what}: {done} items, {:.1} s, {:.0} items/s",
            secs,
            done as f64 / secs
        )?;
    }
    Ok(())
}

/// `preload --all`, page by page with progress; the totals.
async fn preload_everything(
    admin: &mut Admin,
    format: Format,
    err: &mut dyn Write,
) -> Result<pb::PreloadResponse, Failure> {
    let started = Instant::now();
    let mut total = pb::PreloadResponse::default();
    let mut cursor = String::new();
    loop {
        let page = admin
            .preload(pb::PreloadRequest {
                all: true,
                page_size: PAGE_SIZE,
                cursor,
                ..Default::default()
            })
            .await?
            .into_inner();
        total.loaded += page.loaded;
        total.skipped += page.skipped;
        total.not_found += page.not_found;
        progress(
            err,
            format,
            started,
            total.loaded + total.skipped,
            "preloaded",
        )?;
        if page.next_cursor.is_empty() {
            return Ok(total);
        }
        cursor = page.next_cursor;
    }
}

/// `reconcile --all`, page by page with progress; the totals and the first
/// items that are not in sync.
async fn reconcile_everything(
    admin: &mut Admin,
    mode: pb::ReconcileMode,
    format: Format,
    err: &mut dyn Write,
) -> Result<pb::ReconcileResponse, Failure> {
    let started = Instant::now();
    let mut total = pb::ReconcileResponse::default();
    let mut cursor = String::new();
    loop {
        let page = admin
            .reconcile(pb::ReconcileRequest {
                all: true,
                mode: mode as i32,
                page_size: PAGE_SIZE,
                cursor,
                ..Default::default()
            })
            .await?
            .into_inner();
        total.checked += page.checked;
        total.in_sync += page.in_sync;
        total.pending_flush += page.pending_flush;
        total.redis_stale += page.redis_stale;
        total.drift += page.drift;
        total.missing_in_redis += page.missing_in_redis;
        total.missing_in_postgres += page.missing_in_postgres;
        total.ledger_mismatch += page.ledger_mismatch;
        total.repaired += page.repaired;
        let room = MAX_RECONCILE_ITEMS.saturating_sub(total.items.len());
        total.items.extend(page.items.into_iter().take(room));
        progress(err, format, started, total.checked, "reconciled")?;
        if page.next_cursor.is_empty() {
            return Ok(total);
        }
        cursor = page.next_cursor;
    }
}

/// Runs `command`; prints its output on `out` (watch: as events arrive).
pub async fn execute(
    command: Command,
    target: &Target,
    format: Format,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<(), Failure> {
    // bench connects by itself, with both tokens.
    let command = match command {
        Command::Bench(args) => return super::bench::run(args, target, format, out, err).await,
        command => command,
    };
    // Only the token of the service the command uses is checked and sent,
    // before connecting, so a bad token is reported as such.
    let (client_auth, admin_auth) = if is_admin(&command) {
        let auth = BearerAuth::new(
            target.admin_token.as_ref(),
            "--admin-token / STOCKD_ADMIN_TOKEN",
        )?;
        (BearerAuth::default(), auth)
    } else {
        let auth = BearerAuth::new(
            target.client_token.as_ref(),
            "--client-token / STOCKD_CLIENT_TOKEN",
        )?;
        (auth, BearerAuth::default())
    };
    let channel = connect(&target.addr, &target.tls).await?;
    let mut inventory: Inventory = InventoryClient::with_interceptor(channel.clone(), client_auth);
    let mut admin: Admin = AdminClient::with_interceptor(channel, admin_auth);

    let output = match command {
        Command::Get { items } => {
            let r = inventory
                .get_stock(pb::GetStockRequest {
                    items: items.into_iter().map(Into::into).collect(),
                })
                .await?
                .into_inner();
            Output::Get(GetOut::from(r))
        }
        Command::Set {
            item,
            available,
            expected_version,
            request_id: rid,
        } => {
            let rid = request_id(rid);
            let r = admin
                .set_stock(pb::SetStockRequest {
                    request_id: rid.id.clone(),
                    sku: item.sku,
                    location: item.location,
                    available,
                    expected_version,
                })
                .await
                .map_err(|s| Failure::Rpc(s, Some(rid.clone())))?
                .into_inner();
            Output::Level(LevelOut::from_set(rid, r))
        }
        Command::Reserve {
            reservation_id,
            lines,
            ttl,
        } => {
            let r = inventory
                .reserve(pb::ReserveRequest {
                    reservation_id,
                    lines: lines.into_iter().map(Into::into).collect(),
                    ttl_seconds: ttl.unwrap_or(0),
                })
                .await?
                .into_inner();
            Output::Reserve(ReserveOut::from(r))
        }
        Command::Commit { reservation_id } => {
            let r = inventory
                .commit(pb::CommitRequest {
                    reservation_id: reservation_id.clone(),
                })
                .await?
                .into_inner();
            Output::Settle(SettleOut::from_commit(reservation_id, r))
        }
        Command::Release { reservation_id } => {
            let r = inventory
                .release(pb::ReleaseRequest {
                    reservation_id: reservation_id.clone(),
                })
                .await?
                .into_inner();
            Output::Settle(SettleOut::from_release(reservation_id, r))
        }
        Command::Extend {
            reservation_id,
            ttl,
        } => {
            let r = inventory
                .extend(pb::ExtendRequest {
                    reservation_id: reservation_id.clone(),
                    ttl_seconds: ttl,
                })
                .await?
                .into_inner();
            Output::Extend(ExtendOut::new(reservation_id, r))
        }
        Command::Decrement {
            lines,
            request_id: rid,
        } => {
            let rid = request_id(rid);
            let r = inventory
                .decrement(pb::DecrementRequest {
                    request_id: rid.id.clone(),
                    lines: lines.into_iter().map(Into::into).collect(),
                })
                .await
                .map_err(|s| Failure::Rpc(s, Some(rid.clone())))?
                .into_inner();
            Output::Decrement(DecrementOut::new(rid, r))
        }
        Command::Adjust {
            item,
            delta,
            reason,
            request_id: rid,
        } => {
            let rid = request_id(rid);
            let r = inventory
                .adjust(pb::AdjustRequest {
                    request_id: rid.id.clone(),
                    sku: item.sku,
                    location: item.location,
                    delta,
                    reason,
                })
                .await
                .map_err(|s| Failure::Rpc(s, Some(rid.clone())))?
                .into_inner();
            Output::Level(LevelOut::from_adjust(rid, r))
        }
        Command::Preload { skus, all } => {
            let r = if all {
                preload_everything(&mut admin, format, err).await?
            } else {
                admin
                    .preload(pb::PreloadRequest {
                        skus,
                        ..Default::default()
                    })
                    .await?
                    .into_inner()
            };
            Output::Preload(PreloadOut::from(r))
        }
        Command::Reconcile { skus, all, repair } => {
            let mode = if repair {
                pb::ReconcileMode::Repair
            } else {
                pb::ReconcileMode::Report
            };
            let r = if all {
                reconcile_everything(&mut admin, mode, format, err).await?
            } else {
                admin
                    .reconcile(pb::ReconcileRequest {
                        skus,
                        mode: mode as i32,
                        ..Default::default()
                    })
                    .await?
                    .into_inner()
            };
            Output::Reconcile(ReconcileOut::from(r))
        }
        Command::FlushStatus => {
            let r = admin
                .flush_status(pb::FlushStatusRequest {})
                .await?
                .into_inner();
            Output::FlushStatus(r.into())
        }
        Command::Bench(_) => unreachable!("handled above"),
        Command::Webhook(command) => {
            return super::webhook::execute(&mut admin, command, format, out).await;
        }
        Command::Watch {
            skus,
            from_event_id,
        } => {
            return watch(
                &mut inventory,
                pb::WatchRequest {
                    skus,
                    from_event_id: from_event_id.unwrap_or_default(),
                },
                format,
                out,
                err,
                ctrl_c(),
            )
            .await;
        }
    };
    output.write(format, out)?;
    out.flush()?;
    Ok(())
}

/// Resolves on Ctrl-C; never, if the handler cannot be installed.
async fn ctrl_c() {
    if tokio::signal::ctrl_c().await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Streams events until the server ends the stream, it fails, or `stop`
/// resolves (Ctrl-C for the command).
pub async fn watch(
    inventory: &mut Inventory,
    request: pb::WatchRequest,
    format: Format,
    out: &mut dyn Write,
    err: &mut dyn Write,
    stop: impl Future<Output = ()>,
) -> Result<(), Failure> {
    let mut stream = inventory.watch(request).await?.into_inner();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            () = &mut stop => return Ok(()),
            next = stream.message() => match next? {
                Some(event) => {
                    render::write_event(&EventOut::from(event), format, out)?;
                    out.flush()?;
                }
                None => {
                    if format == Format::Table {
                        writeln!(err, "watch: the server ended the stream")?;
                    }
                    return Ok(());
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_request_ids_have_the_documented_shape() {
        let id = generate_request_id();
        let parts: Vec<&str> = id.split('-').collect();
        assert_eq!(parts.len(), 3, "{id}");
        assert_eq!(parts[0], "ctl");
        assert!(parts[1].parse::<u128>().unwrap() > 1_600_000_000_000_000_000);
        assert_eq!(parts[2], std::process::id().to_string());
        assert!(id.len() <= 128, "ids are at most 128 bytes");
    }

    #[test]
    fn request_id_given_is_kept() {
        let r = request_id(RequestIdArg {
            request_id: Some("mine".into()),
        });
        assert_eq!(
            r,
            RequestId {
                id: "mine".into(),
                generated: false
            }
        );
        assert!(
            request_id(RequestIdArg { request_id: None }).generated,
            "omitted ids are generated"
        );
    }

    #[test]
    fn interceptor_adds_bearer_only_when_set() {
        let token: Secret = "tok".parse().unwrap();
        let mut auth = BearerAuth::new(Some(&token), "--admin-token").unwrap();
        let req = auth.call(Request::new(())).unwrap();
        assert_eq!(req.metadata().get("authorization").unwrap(), "Bearer tok");

        let mut none = BearerAuth::new(None, "--admin-token").unwrap();
        let req = none.call(Request::new(())).unwrap();
        assert!(req.metadata().get("authorization").is_none());
    }

    #[test]
    fn invalid_token_is_a_usage_error_without_the_token() {
        let token: Secret = "bad token".parse().unwrap();
        match BearerAuth::new(Some(&token), "--admin-token") {
            Err(Failure::Usage(m)) => {
                assert!(m.contains("--admin-token"), "{m}");
                assert!(!m.contains("bad token"), "{m}");
            }
            _ => panic!("expected a usage error"),
        }
    }
}
