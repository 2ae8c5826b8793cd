//! Runs one `stockctl` command against the server.

use std::io::{self, Write};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tonic::codegen::InterceptedService;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Code, Request, Status};

use super::args::{Command, PagingArgs, RequestIdArg, Secret};
use super::progress::{self, Progress};
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
    /// The server (or the connection to it) answered with an error status.
    Rpc(Status, RpcContext),
    /// The invocation cannot work (e.g. a token that is not a header value).
    Usage(String),
    /// Writing the output failed.
    Io(io::Error),
    /// The command ran but failed otherwise (e.g. a bench run's checks).
    Other(String),
    /// Reconcile found this many items out of sync (its report is printed).
    OutOfSync(u64),
    /// A paged job was stopped by the user; it resumes at this cursor
    /// (empty: it had not started).
    Interrupted { resume_cursor: String },
}

/// What to tell the user besides the status of a failed rpc.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct RpcContext {
    /// The id of a mutating request: a retry with the same id is safe (the
    /// server returns the first outcome).
    pub request_id: Option<RequestId>,
    /// Where a paged job that failed midway resumes.
    pub resume_cursor: Option<String>,
}

impl Failure {
    /// A failed rpc. tonic reports a deadline that passed on this side as
    /// CANCELLED: it is DEADLINE_EXCEEDED, as when the server notices first.
    pub fn rpc(status: Status, context: RpcContext) -> Self {
        let timed_out = std::iter::successors(std::error::Error::source(&status), |e| e.source())
            .any(|e| e.is::<tonic::TimeoutExpired>());
        let status = if status.code() == Code::Cancelled && timed_out {
            Status::deadline_exceeded("the deadline (--timeout) passed")
        } else {
            status
        };
        Failure::Rpc(status, context)
    }

    /// A failed mutating request sent with `request_id`.
    pub fn rpc_with_id(status: Status, request_id: &RequestId) -> Self {
        let context = RpcContext {
            request_id: Some(request_id.clone()),
            ..RpcContext::default()
        };
        Failure::rpc(status, context)
    }
}

impl From<Status> for Failure {
    fn from(s: Status) -> Self {
        Failure::rpc(s, RpcContext::default())
    }
}

impl From<io::Error> for Failure {
    fn from(e: io::Error) -> Self {
        Failure::Io(e)
    }
}

/// What every request of one client carries: `authorization: Bearer
/// <token>` when a token is set, and the deadline (`grpc-timeout`, which
/// the channel enforces too) when one is set.
#[derive(Clone, Default)]
pub struct CallSettings {
    authorization: Option<MetadataValue<Ascii>>,
    timeout: Option<Duration>,
}

impl CallSettings {
    /// `which` names the token's flag for the error message; the token is
    /// never shown. An empty token (e.g. `STOCKD_ADMIN_TOKEN=`) counts as
    /// unset.
    pub fn new(
        token: Option<&Secret>,
        which: &str,
        timeout: Option<Duration>,
    ) -> Result<Self, Failure> {
        let authorization = match token {
            None => None,
            Some(t) if t.expose().is_empty() => None,
            Some(t) => {
                let mut v = t
                    .bearer()
                    .map_err(|e| Failure::Usage(format!("invalid {which}: {e}")))?;
                v.set_sensitive(true);
                Some(v)
            }
        };
        Ok(CallSettings {
            authorization,
            timeout,
        })
    }

    /// For the Inventory service.
    pub fn client(target: &Target) -> Result<Self, Failure> {
        Self::new(
            target.client_token.as_ref(),
            "--client-token / STOCKD_CLIENT_TOKEN",
            target.timeout,
        )
    }

    /// For the Admin service.
    pub fn admin(target: &Target) -> Result<Self, Failure> {
        Self::new(
            target.admin_token.as_ref(),
            "--admin-token / STOCKD_ADMIN_TOKEN",
            target.timeout,
        )
    }
}

impl Interceptor for CallSettings {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(v) = &self.authorization {
            req.metadata_mut().insert("authorization", v.clone());
        }
        if let Some(timeout) = self.timeout {
            req.set_timeout(timeout);
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
    /// The deadline of each rpc.
    pub timeout: Option<Duration>,
    /// How long jobs show their progress.
    pub progress: progress::Display,
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

/// The server's endpoint: TLS for an https:// address; connecting gives up
/// after 5 s, or after `--timeout` when that is shorter.
pub fn endpoint(target: &Target) -> Result<Endpoint, Failure> {
    let addr = &target.addr;
    let connect_timeout = target
        .timeout
        .map_or(CONNECT_TIMEOUT, |t| t.min(CONNECT_TIMEOUT));
    let mut endpoint = Endpoint::from_shared(addr.clone())
        .map_err(|e| Failure::Usage(format!("bad address {addr}: {e}")))?
        .connect_timeout(connect_timeout);
    if addr.starts_with("https://") {
        endpoint = endpoint
            .tls_config(target.tls.config()?)
            .map_err(|e| Failure::Usage(format!("TLS settings: {}", error_chain(&e))))?;
    }
    Ok(endpoint)
}

/// Connects `endpoint`; a failure is UNAVAILABLE, as if the server had said so.
pub async fn connect(endpoint: Endpoint) -> Result<Channel, Failure> {
    endpoint.connect().await.map_err(|e| {
        Status::unavailable(format!(
            "cannot connect to {}: {}",
            endpoint.uri(),
            error_chain(&e)
        ))
        .into()
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

pub type Inventory = InventoryClient<InterceptedService<Channel, CallSettings>>;
pub type Admin = AdminClient<InterceptedService<Channel, CallSettings>>;

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
        | Command::Bench(_)
        | Command::Completions { .. } => false,
    }
}

/// Items of a paged reconcile shown with both sides.
const MAX_RECONCILE_ITEMS: usize = 100;

/// A page of `--all`: how many items it covered, and where the next starts.
trait Page {
    fn items(&self) -> u64;
    /// Empty after the last page.
    fn next_cursor(&self) -> &str;
}

impl Page for pb::PreloadResponse {
    fn items(&self) -> u64 {
        self.loaded + self.skipped
    }
    fn next_cursor(&self) -> &str {
        &self.next_cursor
    }
}

impl Page for pb::ReconcileResponse {
    fn items(&self) -> u64 {
        self.checked
    }
    fn next_cursor(&self) -> &str {
        &self.next_cursor
    }
}

/// Fetches one page after another until the cursor comes back empty,
/// showing progress; `fetch` sends one rpc (cursor, page size), `add` takes
/// each page in. Ctrl-C, or a failed page, stops the job with the cursor to
/// resume from.
async fn every_page<P, Fut>(
    what: &'static str,
    paging: PagingArgs,
    display: progress::Display,
    err: &mut dyn Write,
    mut fetch: impl FnMut(String, u32) -> Fut,
    mut add: impl FnMut(P),
) -> Result<(), Failure>
where
    P: Page,
    Fut: Future<Output = Result<P, Status>>,
{
    let progress = Progress::start(what, display);
    let mut cursor = paging.cursor.unwrap_or_default();
    let mut done = 0;
    // One listener for the whole job, so a Ctrl-C between two pages counts.
    let interrupted = ctrl_c();
    tokio::pin!(interrupted);
    let result = loop {
        let fetched = tokio::select! {
            fetched = fetch(cursor.clone(), paging.page_size) => fetched,
            () = &mut interrupted => break Err(Failure::Interrupted { resume_cursor: cursor }),
        };
        let page = match fetched {
            Ok(page) => page,
            Err(status) => {
                let context = RpcContext {
                    resume_cursor: (!cursor.is_empty()).then_some(cursor),
                    ..RpcContext::default()
                };
                break Err(Failure::rpc(status, context));
            }
        };
        done += page.items();
        let next = page.next_cursor().to_owned();
        add(page);
        if let Err(e) = progress.page(done, &next, err) {
            break Err(e.into());
        }
        if next.is_empty() {
            break Ok(());
        }
        cursor = next;
    };
    progress.finish();
    result
}

/// `preload --all`, page by page; the totals.
async fn preload_everything(
    admin: &Admin,
    paging: PagingArgs,
    display: progress::Display,
    err: &mut dyn Write,
) -> Result<pb::PreloadResponse, Failure> {
    let mut total = pb::PreloadResponse::default();
    let fetch = |cursor, page_size| {
        let mut admin = admin.clone();
        async move {
            let request = pb::PreloadRequest {
                all: true,
                page_size,
                cursor,
                ..Default::default()
            };
            Ok(admin.preload(request).await?.into_inner())
        }
    };
    let add = |page: pb::PreloadResponse| {
        total.loaded += page.loaded;
        total.skipped += page.skipped;
        total.not_found += page.not_found;
    };
    every_page("preloaded", paging, display, err, fetch, add).await?;
    Ok(total)
}

/// `reconcile --all`, page by page; the totals and the first items that are
/// not in sync.
async fn reconcile_everything(
    admin: &Admin,
    mode: pb::ReconcileMode,
    paging: PagingArgs,
    display: progress::Display,
    err: &mut dyn Write,
) -> Result<pb::ReconcileResponse, Failure> {
    let mut total = pb::ReconcileResponse::default();
    let fetch = |cursor, page_size| {
        let mut admin = admin.clone();
        async move {
            let request = pb::ReconcileRequest {
                all: true,
                mode: mode as i32,
                page_size,
                cursor,
                ..Default::default()
            };
            Ok(admin.reconcile(request).await?.into_inner())
        }
    };
    let add = |page: pb::ReconcileResponse| {
        total.checked += page.checked;
        total.in_sync += page.in_sync;
        total.pending_flush += page.pending_flush;
        total.redis_stale += page.redis_stale;
        total.drift += page.drift;
        total.missing_in_redis += page.missing_in_redis;
        total.missing_in_postgres += page.missing_in_postgres;
        total.ledger_mismatch += page.ledger_mismatch;
        total.repaired += page.repaired;
        total.held_back += page.held_back;
        let room = MAX_RECONCILE_ITEMS.saturating_sub(total.items.len());
        total.items.extend(page.items.into_iter().take(room));
    };
    every_page("reconciled", paging, display, err, fetch, add).await?;
    Ok(total)
}

/// Items a reconcile found in a class other than in_sync and pending_flush.
fn out_of_sync(r: &pb::ReconcileResponse) -> u64 {
    r.redis_stale + r.drift + r.missing_in_redis + r.missing_in_postgres + r.ledger_mismatch
}

/// Runs `command`; prints its output on `out` (watch: as events arrive).
pub async fn execute(
    command: Command,
    target: &Target,
    format: Format,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<(), Failure> {
    let command = match command {
        // bench connects by itself, with both tokens.
        Command::Bench(args) => return super::bench::run(args, target, format, out, err).await,
        Command::Completions { shell } => {
            let mut cli = <super::args::Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cli, "stockctl", out);
            out.flush()?;
            return Ok(());
        }
        command => command,
    };
    // Only the token of the service the command uses is checked and sent,
    // before connecting, so a bad token is reported as such.
    let (client_settings, admin_settings) = if is_admin(&command) {
        (CallSettings::default(), CallSettings::admin(target)?)
    } else {
        (CallSettings::client(target)?, CallSettings::default())
    };
    let channel = connect(endpoint(target)?).await?;
    let mut inventory: Inventory =
        InventoryClient::with_interceptor(channel.clone(), client_settings);
    let mut admin: Admin = AdminClient::with_interceptor(channel, admin_settings);

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
                .map_err(|s| Failure::rpc_with_id(s, &rid))?
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
                .map_err(|s| Failure::rpc_with_id(s, &rid))?
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
                .map_err(|s| Failure::rpc_with_id(s, &rid))?
                .into_inner();
            Output::Level(LevelOut::from_adjust(rid, r))
        }
        Command::Preload { skus, all, paging } => {
            let r = if all {
                preload_everything(&admin, paging, target.progress, err).await?
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
        Command::Reconcile {
            skus,
            all,
            repair,
            paging,
        } => {
            let mode = if repair {
                pb::ReconcileMode::Repair
            } else {
                pb::ReconcileMode::Report
            };
            let r = if all {
                reconcile_everything(&admin, mode, paging, target.progress, err).await?
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
            let found = out_of_sync(&r);
            Output::Reconcile(ReconcileOut::from(r)).write(format, out)?;
            out.flush()?;
            return match found {
                0 => Ok(()),
                n => Err(Failure::OutOfSync(n)),
            };
        }
        Command::FlushStatus => {
            let r = admin
                .flush_status(pb::FlushStatusRequest {})
                .await?
                .into_inner();
            Output::FlushStatus(r.into())
        }
        Command::Bench(_) | Command::Completions { .. } => unreachable!("handled above"),
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
        let mut auth = CallSettings::new(Some(&token), "--admin-token", None).unwrap();
        let req = auth.call(Request::new(())).unwrap();
        assert_eq!(req.metadata().get("authorization").unwrap(), "Bearer tok");

        let mut none = CallSettings::new(None, "--admin-token", None).unwrap();
        let req = none.call(Request::new(())).unwrap();
        assert!(req.metadata().get("authorization").is_none());
    }

    #[test]
    fn invalid_token_is_a_usage_error_without_the_token() {
        let token: Secret = "bad token".parse().unwrap();
        match CallSettings::new(Some(&token), "--admin-token", None) {
            Err(Failure::Usage(m)) => {
                assert!(m.contains("--admin-token"), "{m}");
                assert!(!m.contains("bad token"), "{m}");
            }
            _ => panic!("expected a usage error"),
        }
    }
}
