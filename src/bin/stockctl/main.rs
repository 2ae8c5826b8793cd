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
//!
//! Exit codes: 0 on success, 1 on an rpc error, 2 on a usage error.

mod args;
mod bench;
mod commands;
mod render;
mod syntax;
mod webhook;

use std::io::{self, Write};
use std::process::ExitCode;

use args::Cli;
use clap::Parser;

use commands::{Failure, Target};
use render::Format;

/// The command succeeded.
const EXIT_OK: u8 = 0;
/// The server answered with an error (or could not be reached).
const EXIT_RPC_ERROR: u8 = 1;
/// The command line was wrong (clap uses the same code).
const EXIT_USAGE: u8 = 2;

fn main() -> ExitCode {
    // Usage errors exit with 2 here (clap's default).
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(EXIT_RPC_ERROR);
        }
    };
    let code = runtime.block_on(run(cli, &mut io::stdout(), &mut io::stderr()));
    ExitCode::from(code)
}

/// Runs a parsed command line; output goes to `out`, messages to `err`.
/// Returns the process exit code.
async fn run(cli: Cli, out: &mut dyn Write, err: &mut dyn Write) -> u8 {
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
    };
    let result = commands::execute(cli.command, &target, format, out, err).await;
    match result {
        Ok(()) => EXIT_OK,
        Err(Failure::Rpc(status, request_id)) => {
            // Nothing better to do if even the error cannot be written.
            let _ = render::write_error(&status, request_id.as_ref(), format, out, err);
            let _ = out.flush();
            EXIT_RPC_ERROR
        }
        Err(Failure::Usage(message)) => {
            let _ = writeln!(err, "error: {message}");
            EXIT_USAGE
        }
        // `stockctl watch | head`: the reader is gone, which is not an error.
        Err(Failure::Io(e)) if e.kind() == io::ErrorKind::BrokenPipe => EXIT_OK,
        Err(Failure::Io(e)) => {
            let _ = writeln!(err, "error: cannot write the output: {e}");
            EXIT_RPC_ERROR
        }
        Err(Failure::Other(message)) => {
            let _ = writeln!(err, "error: {message}");
            EXIT_RPC_ERROR
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
            Err(Status::with_error_details(
                Code::FailedPrecondition,
                "not enough stock",
                ErrorDetails::with_precondition_failure(violations),
            ))
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
        let code = run(cli, &mut out, &mut err).await;
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
    async fn precondition_failure_exits_1_with_one_line_per_violation() {
        let addr = serve(Fake::default()).await;
        let r = ctl(
            addr,
            &["decrement", "a@berlin:3", "b:2", "--request-id", "r-1"],
        )
        .await;
        assert_eq!(r.code, EXIT_RPC_ERROR);
        assert_eq!(r.out, "");
        assert_eq!(
            r.err,
            "error: FAILED_PRECONDITION: not enough stock\n\
             \x20 berlin/a: requested 3, available 1\n\
             \x20 /b: requested 2, available 1\n\
             request_id: r-1\n"
        );

        let r = ctl(addr, &["--json", "decrement", "a:3"]).await;
        assert_eq!(r.code, EXIT_RPC_ERROR);
        let v: serde_json::Value = serde_json::from_str(&r.out).unwrap();
        assert_eq!(v["error"]["code"], "FAILED_PRECONDITION");
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
        assert_eq!(r.code, EXIT_RPC_ERROR);
        assert!(r.err.starts_with("error: UNIMPLEMENTED"), "{}", r.err);
        assert_eq!(r.err.lines().count(), 1, "{}", r.err);

        let r = ctl(addr, &["--json", "reconcile", "a", "--repair"]).await;
        assert_eq!(r.code, EXIT_RPC_ERROR);
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
            commands::BearerAuth::default(),
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
        assert_eq!(r.code, EXIT_RPC_ERROR);
        assert!(
            r.err.starts_with("error: UNAVAILABLE: cannot connect to"),
            "{}",
            r.err
        );
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
