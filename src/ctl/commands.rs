//! Runs one `stockctl` command against the server.

use std::io::{self, Write};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tonic::codegen::InterceptedService;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Status};

use super::args::{Command, RequestIdArg, Secret};
use super::render::{
    self, DecrementOut, EventOut, ExtendOut, Format, GetOut, LevelOut, Output, PreloadOut,
    ReconcileOut, RequestId, ReserveOut, SettleOut,
};
use crate::pb;
use crate::pb::admin_client::AdminClient;
use crate::pb::inventory_client::InventoryClient;

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

async fn connect(addr: &str) -> Result<Channel, Status> {
    let endpoint = Endpoint::from_shared(addr.to_owned())
        .map_err(|e| Status::invalid_argument(format!("bad address {addr}: {e}")))?
        .connect_timeout(CONNECT_TIMEOUT);
    endpoint
        .connect()
        .await
        .map_err(|e| Status::unavailable(format!("cannot connect to {addr}: {}", error_chain(&e))))
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
        | Command::FlushStatus => true,
        Command::Get { .. }
        | Command::Reserve { .. }
        | Command::Commit { .. }
        | Command::Release { .. }
        | Command::Extend { .. }
        | Command::Decrement { .. }
        | Command::Adjust { .. }
        | Command::Watch { .. } => false,
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
    let channel = connect(&target.addr).await?;
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
            let r = admin
                .preload(pb::PreloadRequest {
                    skus,
                    all,
                    ..Default::default()
                })
                .await?
                .into_inner();
            Output::Preload(PreloadOut::from(r))
        }
        Command::Reconcile { skus, all, repair } => {
            let mode = if repair {
                pb::ReconcileMode::Repair
            } else {
                pb::ReconcileMode::Report
            };
            let r = admin
                .reconcile(pb::ReconcileRequest {
                    skus,
                    all,
                    mode: mode as i32,
                    ..Default::default()
                })
                .await?
                .into_inner();
            Output::Reconcile(ReconcileOut::from(r))
        }
        Command::FlushStatus => {
            let r = admin
                .flush_status(pb::FlushStatusRequest {})
                .await?
                .into_inner();
            Output::FlushStatus(r.into())
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
