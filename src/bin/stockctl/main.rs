//! `stockctl` — the command-line client of the stockd inventory server, for
//! people and scripts. It uses only the generated protocol types
//! (`stockd::pb`) of the server's library.
//!
//! - [`args`]: the command line (clap).
//! - [`syntax`]: the ITEM (`SKU[@LOCATION]`) and LINE (`SKU[@LOCATION]:QTY`)
//!   syntax, in one place.
//! - [`commands`]: one rpc per command, with bearer tokens and generated
//!   request ids.
//! - [`render`]: tables, JSON documents and error reports.
//! - [`bench`]: `stockctl bench`, the load generator and its checks.
//! - [`webhook`]: `stockctl webhook add|list|remove|dead-letters|redeliver`.
//! - [`progress`]: the progress of `preload --all` and `reconcile --all`.
//!
//! Exit codes (also in `--help` and the README): 0 success, 1 another
//! failure, 2 usage error, 3 reconcile found items out of sync, 64 + the
//! gRPC status code when an rpc failed (grpcurl's convention), 130 a paged
//! job interrupted.

mod args;
mod bench;
mod commands;
mod progress;
mod render;
mod syntax;
mod webhook;

use std::ffi::OsString;
use std::io::{self, IsTerminal, Write};
use std::process::ExitCode;

use args::Cli;
use clap::Parser;

use commands::{Failure, Target};
use render::Format;

/// The command succeeded.
const EXIT_OK: u8 = 0;
/// Any other failure: the output could not be written, a bench run's
/// checks failed.
const EXIT_FAILURE: u8 = 1;
/// The command line was wrong (clap uses the same code).
const EXIT_USAGE: u8 = 2;
/// Reconcile found items in a class other than in_sync and pending_flush.
const EXIT_OUT_OF_SYNC: u8 = 3;
/// An rpc failed: this plus its gRPC status code (grpcurl's convention).
const EXIT_RPC_BASE: u8 = 64;
/// A paged job was interrupted (128 + SIGINT, as shells report it).
const EXIT_INTERRUPTED: u8 = 130;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return ExitCode::from(usage_error(&e, std::env::args_os())),
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    let display = if io::stderr().is_terminal() {
        progress::Display::Bar
    } else {
        progress::Display::Lines
    };
    let code = runtime.block_on(run(cli, &mut io::stdout(), &mut io::stderr(), display));
    ExitCode::from(code)
}

/// Reports a command line clap refused (or `--help`, `--version`); the exit
/// code. With `--json` among the arguments a refusal is a JSON document on
/// standard error, so a script can read it too.
fn usage_error(e: &clap::Error, args: impl IntoIterator<Item = OsString>) -> u8 {
    let code = u8::try_from(e.exit_code()).unwrap_or(EXIT_USAGE);
    if !e.use_stderr() || !json_requested(args) {
        // Nothing better to do if even this cannot be written.
        let _ = e.print();
        return code;
    }
    let _ = render::write_usage_error(&e.render().to_string(), Format::Json, &mut io::stderr());
    code
}

/// Whether `--json` is among the options (before a `--`).
fn json_requested(args: impl IntoIterator<Item = OsString>) -> bool {
    args.into_iter()
        .skip(1)
        .take_while(|a| a != "--")
        .any(|a| a == "--json")
}

/// The exit code of a failed rpc: 64 + its status code.
fn rpc_exit_code(status: &tonic::Status) -> u8 {
    EXIT_RPC_BASE + status.code() as u8
}

/// Runs a parsed command line; output goes to `out`, messages to `err`.
/// Returns the process exit code.
async fn run(
    cli: Cli,
    out: &mut dyn Write,
    err: &mut dyn Write,
    progress: progress::Display,
) -> u8 {
    let format = if cli.json {
        Format::Json
    } else {
        Format::Table
    };
    let target = Target {
        addr: cli.addr,
        admin_token: cli.admin_token,
        client_token: cli.client_token,
        tls: commands::TlsFiles {
            ca: cli.tls_ca,
            cert: cli.tls_cert,
            key: cli.tls_key,
            domain: cli.tls_domain,
        },
        timeout: cli.timeout,
        progress,
    };
    let result = commands::execute(cli.command, &target, format, out, err).await;
    // Nothing better to do below if even the error cannot be written.
    match result {
        Ok(()) => EXIT_OK,
        Err(Failure::Rpc(status, context)) => {
            let _ = render::write_error(&status, &context, format, out, err);
            let _ = out.flush();
            rpc_exit_code(&status)
        }
        Err(Failure::Usage(message)) => {
            let _ = render::write_usage_error(&message, format, err);
            EXIT_USAGE
        }
        Err(Failure::OutOfSync(items)) => {
            let _ = writeln!(err, "reconcile: {items} items out of sync");
            EXIT_OUT_OF_SYNC
        }
        Err(Failure::Interrupted { resume_cursor }) => {
            let _ = if resume_cursor.is_empty() {
                writeln!(err, "interrupted before the first page was done")
            } else {
                let cursor = render::shell_word(&resume_cursor);
                writeln!(err, "interrupted; resume with --cursor {cursor}")
            };
            EXIT_INTERRUPTED
        }
        // `stockctl watch | head`: the reader is gone, which is not an error.
        Err(Failure::Io(e)) if e.kind() == io::ErrorKind::BrokenPipe => EXIT_OK,
        Err(Failure::Io(e)) => {
            let _ = writeln!(err, "error: cannot write the output: {e}");
            EXIT_FAILURE
        }
        Err(Failure::Other(message)) => {
            let _ = writeln!(err, "error: {message}");
            EXIT_FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    //! Runs whole commands against an in-process fake server.

    use std::net::SocketAddr;
    use std::sync::{Arc, Mutex};

    use clap::Parser;
    use tokio::net::TcpListener;
    use tokio_stream::StreamExt;
    use tokio_stream::wrappers::TcpListenerStream;
    use tonic::codegen::BoxStream;
    use tonic::{Code, Request, Response, Status};
    use tonic_types::{ErrorDetails, PreconditionViolation, StatusExt};

    use super::*;
    use stockd::pb;

    /// (rpc, authorization header) of each call, in order.
    type Calls = Vec<(String, Option<String>)>;

    /// Records what arrived; answers a few rpcs, the rest are UNIMPLEMENTED.
    #[derive(Default, Clone)]
    struct Fake {
        seen: Arc<Mutex<Calls>>,
    }

    impl Fake {
        fn record<T>(&self, rpc: &str, req: &Request<T>) {
            let auth = req
                .metadata()
                .get("authorization")
                .map(|v| v.to_str().unwrap().to_owned());
            self.seen.lock().unwrap().push((rpc.to_owned(), auth));
        }
    }

    fn level(sku: &str, location: &str, available: i64) -> pb::StockLevel {
        pb::StockLevel {
            sku: sku.into(),
            location: if location.is_empty() {
                "default".into()
            } else {
                location.into()
            },
            available,
            reserved: 0,
            version: 7,
        }
    }

    #[tonic::async_trait]
    impl pb::inventory_server::Inventory for Fake {
        async fn get_stock(
            &self,
            req: Request<pb::GetStockRequest>,
        ) -> Result<Response<pb::GetStockResponse>, Status> {
            self.record("get_stock", &req);
            let (found, missing): (Vec<pb::ItemRef>, Vec<pb::ItemRef>) = req
                .into_inner()
                .items
                .into_iter()
                .partition(|i| i.sku != "nope");
            let levels = found
                .into_iter()
                .map(|i| level(&i.sku, &i.location, 10))
                .collect();
            Ok(Response::new(pb::GetStockResponse { levels, missing }))
        }

        async fn decrement(
            &self,
            req: Request<pb::DecrementRequest>,
        ) -> Result<Response<pb::DecrementResponse>, Status> {
            self.record("decrement", &req);
            let violations: Vec<PreconditionViolation> = req
                .into_inner()
                .lines
                .iter()
                .map(|l| {
                    PreconditionViolation::new(
                        "STOCK",
                        format!("{}/{}", l.location, l.sku),
                        format!("requested {}, available 1", l.quantity),
                    )
                })
                .collect();
            let mut details = ErrorDetails::with_precondition_failure(violations);
            details.set_error_info(
                "OUT_OF_STOCK",
                "stockd.v1",
                [("short_lines".into(), "2".into())],
            );
            Err(Status::with_error_details(
                Code::FailedPrecondition,
                "not enough stock",
                details,
            ))
        }

        async fn extend(
            &self,
            req: Request<pb::ExtendRequest>,
        ) -> Result<Response<pb::ExtendResponse>, Status> {
            let timeout = req
                .metadata()
                .get("grpc-timeout")
                .map(|v| v.to_str().unwrap().to_owned());
            self.seen
                .lock()
                .unwrap()
                .push(("extend".to_owned(), timeout));
            // Slower than any deadline the tests set.
            tokio::time::sleep(std::time::Duration::from_secs(30)).await;
            Ok(Response::new(pb::ExtendResponse::default()))
        }

        async fn adjust(
            &self,
            req: Request<pb::AdjustRequest>,
        ) -> Result<Response<pb::AdjustResponse>, Status> {
            self.record("adjust", &req);
            let r = req.into_inner();
            Ok(Response::new(pb::AdjustResponse {
                level: Some(level(&r.sku, &r.location, 10 + r.delta)),
                // Echo the request id through `replayed` for the test to see
                // that the given id was sent.
                replayed: r.request_id == "replay-me",
            }))
        }

        async fn watch(
            &self,
            req: Request<pb::WatchRequest>,
        ) -> Result<Response<BoxStream<pb::StockEvent>>, Status> {
            self.record("watch", &req);
            let from = req.into_inner().from_event_id;
            let forever = from == "forever";
            let events = (1..=2).map(move |n| {
                Ok(pb::StockEvent {
                    event_id: format!("{from}+{n}"),
                    sku: "a".into(),
                    location: "default".into(),
                    op: pb::StockOp::Adjust.into(),
                    delta_available: n,
                    available: 10 + n,
                    version: n,
                    ..Default::default()
                })
            });
            let events = tokio_stream::iter(events);
            if forever {
                // Two events, then an open stream with nothing more.
                Ok(Response::new(Box::pin(
                    events.chain(tokio_stream::pending()),
                )))
            } else {
                Ok(Response::new(Box::pin(events)))
            }
        }
    }

    #[tonic::async_trait]
    impl pb::admin_server::Admin for Fake {
        async fn flush_status(
            &self,
            req: Request<pb::FlushStatusRequest>,
        ) -> Result<Response<pb::FlushStatusResponse>, Status> {
            self.record("flush_status", &req);
            Ok(Response::new(pb::FlushStatusResponse {
                partitions: vec![pb::PartitionFlushStatus {
                    partition: 3,
                    stream_length: 42,
                    ..Default::default()
                }],
            }))
        }
    }

    async fn serve(fake: Fake) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(pb::inventory_server::InventoryServer::new(fake.clone()))
                .add_service(pb::admin_server::AdminServer::new(fake))
                .serve_with_incoming(TcpListenerStream::new(listener)),
        );
        addr
    }

    struct Ran {
        code: u8,
        out: String,
        err: String,
    }

    async fn ctl(addr: SocketAddr, args: &[&str]) -> Ran {
        let url = format!("http://{addr}");
        let argv = ["stockctl", "--addr", url.as_str()]
            .into_iter()
            .chain(args.iter().copied());
        let cli = Cli::try_parse_from(argv).unwrap();
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let code = run(cli, &mut out, &mut err, progress::Display::Lines).await;
        Ran {
            code,
            out: String::from_utf8(out).unwrap(),
            err: String::from_utf8(err).unwrap(),
        }
    }

    #[tokio::test]
    async fn get_prints_levels_and_missing() {
        let addr = serve(Fake::default()).await;
        let r = ctl(addr, &["get", "a@berlin", "nope"]).await;
        assert_eq!(r.code, EXIT_OK, "{}", r.err);
        assert_eq!(
            r.out,
            "SKU  LOCATION  AVAILABLE  RESERVED  VERSION\n\
             a    berlin           10         0        7\n\
             missing: nope@default\n"
        );

        let r = ctl(addr, &["--json", "get", "a"]).await;
        assert_eq!(r.code, EXIT_OK);
        let v: serde_json::Value = serde_json::from_str(&r.out).unwrap();
        assert_eq!(v["levels"][0]["location"], "default");
        assert_eq!(v["missing"], serde_json::json!([]));
    }

    #[tokio::test]
    async fn precondition_failure_exits_73_with_one_line_per_violation() {
        let addr = serve(Fake::default()).await;
        let r = ctl(
            addr,
            &["decrement", "a@berlin:3", "b:2", "--request-id", "r-1"],
        )
        .await;
        assert_eq!(r.code, 73);
        assert_eq!(r.out, "");
        assert_eq!(
            r.err,
            "error: FAILED_PRECONDITION (OUT_OF_STOCK): not enough stock\n\
             \x20 berlin/a: requested 3, available 1\n\
             \x20 /b: requested 2, available 1\n\
             request_id: r-1\n"
        );

        let r = ctl(addr, &["--json", "decrement", "a:3"]).await;
        assert_eq!(r.code, 73);
        let v: serde_json::Value = serde_json::from_str(&r.out).unwrap();
        assert_eq!(v["error"]["code"], "FAILED_PRECONDITION");
        assert_eq!(v["error"]["reason"], "OUT_OF_STOCK");
        assert_eq!(v["error"]["metadata"]["short_lines"], "2");
        assert_eq!(v["error"]["details"][0]["subject"], "/a");
        assert!(
            v["request_id"].as_str().unwrap().starts_with("ctl-"),
            "the generated id is reported: {v}"
        );
    }

    #[tokio::test]
    async fn adjust_negative_delta_with_generated_and_given_ids() {
        let addr = serve(Fake::default()).await;
        let r = ctl(addr, &["adjust", "a", "-3", "--reason", "broken"]).await;
        assert_eq!(r.code, EXIT_OK, "{}", r.err);
        assert!(r.out.starts_with("request_id: ctl-"), "{}", r.out);
        assert!(r.out.contains("(generated; replay with --request-id ctl-"));
        assert!(
            r.out
                .ends_with("a    default           7         0        7\n"),
            "{}",
            r.out
        );

        let r = ctl(
            addr,
            &["--json", "adjust", "a", "1", "--request-id", "replay-me"],
        )
        .await;
        let v: serde_json::Value = serde_json::from_str(&r.out).unwrap();
        assert_eq!(v["request_id"], "replay-me");
        assert_eq!(v["replayed"], true);
        assert_eq!(v["level"]["available"], 11);
    }

    #[tokio::test]
    async fn tokens_go_only_to_their_service() {
        let fake = Fake::default();
        let addr = serve(fake.clone()).await;
        let tokens = ["--admin-token", "adm", "--client-token", "cli"];
        let r = ctl(addr, &[&tokens[..], &["flush-status"]].concat()).await;
        assert_eq!(r.code, EXIT_OK, "{}", r.err);
        assert!(r.out.contains("PARTITION"), "{}", r.out);
        let r = ctl(addr, &[&tokens[..], &["get", "a"]].concat()).await;
        assert_eq!(r.code, EXIT_OK, "{}", r.err);
        let r = ctl(addr, &["get", "a"]).await;
        assert_eq!(r.code, EXIT_OK, "{}", r.err);
        assert!(!r.out.contains("adm") && !r.out.contains("cli"));

        let seen = fake.seen.lock().unwrap().clone();
        assert_eq!(
            seen,
            [
                ("flush_status".to_owned(), Some("Bearer adm".to_owned())),
                ("get_stock".to_owned(), Some("Bearer cli".to_owned())),
                ("get_stock".to_owned(), None),
            ]
        );
    }

    #[tokio::test]
    async fn unimplemented_rpc_is_reported_cleanly() {
        let addr = serve(Fake::default()).await;
        let r = ctl(addr, &["preload", "--all"]).await;
        assert_eq!(r.code, 76);
        assert!(r.err.starts_with("error: UNIMPLEMENTED"), "{}", r.err);
        assert_eq!(r.err.lines().count(), 1, "{}", r.err);

        let r = ctl(addr, &["--json", "reconcile", "a", "--repair"]).await;
        assert_eq!(r.code, 76);
        let v: serde_json::Value = serde_json::from_str(&r.out).unwrap();
        assert_eq!(v["error"]["code"], "UNIMPLEMENTED");
        assert!(v.get("request_id").is_none());
    }

    #[tokio::test]
    async fn watch_prints_one_json_object_per_event() {
        let fake = Fake::default();
        let addr = serve(fake).await;
        let r = ctl(addr, &["--json", "watch", "a", "--from", "5-0"]).await;
        assert_eq!(r.code, EXIT_OK, "{}", r.err);
        let lines: Vec<&str> = r.out.lines().collect();
        assert_eq!(lines.len(), 2, "{}", r.out);
        let first: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
        assert_eq!(first["event_id"], "5-0+1");
        assert_eq!(first["available"], 11);
    }

    #[tokio::test]
    async fn watch_table_lines_until_stopped() {
        let addr = serve(Fake::default()).await;
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut client = pb::inventory_client::InventoryClient::with_interceptor(
            channel,
            commands::CallSettings::default(),
        );
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let request = pb::WatchRequest {
            skus: vec![],
            from_event_id: "forever".into(),
        };
        // The stream stays open after two events: only `stop` ends the watch.
        let stop = async move {
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            let _ = tx.send(());
        };
        let watched = commands::watch(
            &mut client,
            request,
            Format::Table,
            &mut out,
            &mut err,
            async {
                let _ = rx.await;
            },
        );
        let (result, ()) = tokio::join!(watched, stop);
        assert!(result.is_ok());
        let out = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 2, "{out}");
        assert!(
            lines[1].contains(" forever+2 p00 adjust    a@default available=12 (+2)"),
            "{out}"
        );
        assert!(err.is_empty(), "stopped by the user, not by the server");
    }

    #[tokio::test]
    async fn unreachable_server_is_unavailable() {
        // Bind and drop to get a port nobody listens on.
        let addr = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap();
        let r = ctl(addr, &["get", "a"]).await;
        assert_eq!(r.code, 78);
        assert!(
            r.err.starts_with("error: UNAVAILABLE: cannot connect to"),
            "{}",
            r.err
        );
    }

    #[tokio::test]
    async fn the_timeout_is_each_calls_deadline() {
        let fake = Fake::default();
        let addr = serve(fake.clone()).await;
        let started = std::time::Instant::now();
        let r = ctl(addr, &["--timeout", "300ms", "extend", "r1", "--ttl", "60"]).await;
        assert_eq!(r.code, 64 + 4, "DEADLINE_EXCEEDED: {}", r.err);
        assert!(r.err.starts_with("error: DEADLINE_EXCEEDED"), "{}", r.err);
        assert!(started.elapsed() < std::time::Duration::from_secs(10));
        let seen = fake.seen.lock().unwrap().clone();
        let (_, timeout) = seen.iter().find(|(rpc, _)| rpc == "extend").unwrap();
        let timeout = timeout.as_deref().expect("grpc-timeout sent");
        // tonic sends the deadline in its finest unit that fits.
        assert!(
            ["300000u", "300m", "300000000n"].contains(&timeout),
            "{timeout}"
        );
    }

    #[tokio::test]
    async fn usage_errors_are_json_with_json() {
        let addr = serve(Fake::default()).await;
        let r = ctl(addr, &["--json", "--admin-token", "x y", "flush-status"]).await;
        assert_eq!(r.code, EXIT_USAGE);
        assert_eq!(r.out, "");
        let v: serde_json::Value = serde_json::from_str(&r.err).unwrap();
        assert_eq!(v["error"]["code"], "USAGE");
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("--admin-token"),
            "{v}"
        );
    }

    #[test]
    fn json_is_requested_before_a_double_dash_only() {
        let args = |a: &[&str]| a.iter().map(OsString::from).collect::<Vec<_>>();
        assert!(json_requested(args(&["stockctl", "get", "--json"])));
        assert!(!json_requested(args(&["stockctl", "get", "--", "--json"])));
        assert!(!json_requested(args(&["--json"])), "the program name");
    }

    #[tokio::test]
    async fn bad_token_is_a_usage_error_and_not_echoed() {
        let addr = serve(Fake::default()).await;
        let r = ctl(addr, &["--admin-token", "x y", "flush-status"]).await;
        assert_eq!(r.code, EXIT_USAGE);
        assert!(r.err.contains("--admin-token"), "{}", r.err);
        assert!(!r.err.contains("x y"), "{}", r.err);
        // The admin token is not used by inventory commands.
        let r = ctl(addr, &["--admin-token", "x y", "get", "a"]).await;
        assert_eq!(r.code, EXIT_OK, "{}", r.err);
    }
}
