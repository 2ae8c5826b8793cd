//! The command line of `stockctl` (clap derive).

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use clap::{ArgGroup, Args, Parser, Subcommand};
use clap_complete::Shell;

use super::syntax::{ItemSpec, LineSpec};

/// The default server address.
pub const DEFAULT_ADDR: &str = "http://127.0.0.1:50051";

/// What `--help` says about exit codes (README, "Exit codes", says the same).
const EXIT_CODES_HELP: &str = "\
Exit codes:
  0       success
  1       any other failure (output not writable, bench checks failed)
  2       usage error (with --json, reported as JSON on stderr)
  3       reconcile found items out of sync (other than in_sync, pending_flush)
  64+N    the rpc failed with gRPC status code N (grpcurl's convention), e.g.
          67 INVALID_ARGUMENT, 68 DEADLINE_EXCEEDED, 69 NOT_FOUND,
          70 ALREADY_EXISTS, 72 RESOURCE_EXHAUSTED, 73 FAILED_PRECONDITION,
          74 ABORTED, 77 INTERNAL, 78 UNAVAILABLE (also: cannot connect),
          80 UNAUTHENTICATED
  130     preload/reconcile --all interrupted (Ctrl-C); resume with --cursor";

/// stockctl — command-line client of the stockd inventory server.
#[derive(Debug, Parser)]
#[command(name = "stockctl", version, after_help = EXIT_CODES_HELP)]
pub struct Cli {
    /// Server address: HOST:PORT or http://HOST:PORT, or https://HOST:PORT
    /// for TLS.
    #[arg(
        long,
        env = "STOCKD_ADDR",
        default_value = DEFAULT_ADDR,
        value_parser = parse_addr,
        global = true
    )]
    pub addr: String,

    /// Print one JSON document per response (watch: one JSON object per line).
    #[arg(long, global = true)]
    pub json: bool,

    /// Deadline of each rpc, e.g. 5s, 500ms, 1m or 2.5 (seconds); sent to
    /// the server too. Watch: the time to start the stream. Default: none.
    #[arg(long, global = true, value_name = "DURATION", value_parser = parse_duration)]
    pub timeout: Option<Duration>,

    /// Bearer token sent with Admin rpcs (set, preload, reconcile, flush-status).
    #[arg(
        long,
        env = "STOCKD_ADMIN_TOKEN",
        hide_env_values = true,
        global = true,
        value_name = "TOKEN"
    )]
    pub admin_token: Option<Secret>,

    /// Bearer token sent with Inventory rpcs (get, reserve, commit, ...).
    #[arg(
        long,
        env = "STOCKD_CLIENT_TOKEN",
        hide_env_values = true,
        global = true,
        value_name = "TOKEN"
    )]
    pub client_token: Option<Secret>,

    /// With https://: the CA that signed the server's certificate (PEM).
    #[arg(long, env = "STOCKD_TLS_CA", global = true, value_name = "PEM")]
    pub tls_ca: Option<std::path::PathBuf>,

    /// With https://: this client's certificate (PEM), for servers that
    /// require one (mutual TLS); needs --tls-key.
    #[arg(
        long,
        env = "STOCKD_TLS_CLIENT_CERT",
        global = true,
        value_name = "PEM",
        requires = "tls_key"
    )]
    pub tls_cert: Option<std::path::PathBuf>,

    /// The private key of --tls-cert (PEM).
    #[arg(
        long,
        env = "STOCKD_TLS_CLIENT_KEY",
        global = true,
        value_name = "PEM",
        requires = "tls_cert"
    )]
    pub tls_key: Option<std::path::PathBuf>,

    /// With https://: the server name its certificate must carry, when it
    /// differs from the address's host.
    #[arg(long, env = "STOCKD_TLS_DOMAIN", global = true, value_name = "NAME")]
    pub tls_domain: Option<String>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Read stock levels (GetStock). ITEM is SKU or SKU@LOCATION.
    Get {
        #[arg(required = true, value_name = "ITEM")]
        items: Vec<ItemSpec>,
    },
    /// Set the available quantity of an item (Admin.SetStock).
    Set {
        /// SKU or SKU@LOCATION.
        #[arg(value_name = "ITEM")]
        item: ItemSpec,
        /// The new available quantity.
        #[arg(allow_negative_numbers = true)]
        available: i64,
        /// Apply only if the item's version equals N (0 = must not exist yet).
        #[arg(long, value_name = "N")]
        expected_version: Option<i64>,
        #[command(flatten)]
        request_id: RequestIdArg,
    },
    /// Hold stock for a reservation (Reserve). LINE is SKU[@LOCATION]:QTY.
    Reserve {
        reservation_id: String,
        #[arg(required = true, value_name = "LINE")]
        lines: Vec<LineSpec>,
        /// Hold time in seconds (server default 900 when omitted).
        #[arg(long, value_name = "SECONDS")]
        ttl: Option<u32>,
    },
    /// Sell the units held by a reservation (Commit).
    Commit { reservation_id: String },
    /// Return the units held by a reservation (Release).
    Release { reservation_id: String },
    /// Make a held reservation expire SECONDS from now (Extend).
    Extend {
        reservation_id: String,
        #[arg(long, value_name = "SECONDS")]
        ttl: u32,
    },
    /// Direct sale without a hold (Decrement). LINE is SKU[@LOCATION]:QTY.
    Decrement {
        #[arg(required = true, value_name = "LINE")]
        lines: Vec<LineSpec>,
        #[command(flatten)]
        request_id: RequestIdArg,
    },
    /// Restock or return (+DELTA) or shrinkage (-DELTA) of an item (Adjust).
    Adjust {
        /// SKU or SKU@LOCATION.
        #[arg(value_name = "ITEM")]
        item: ItemSpec,
        /// Change of the available quantity; may be negative, e.g. -3.
        #[arg(allow_negative_numbers = true)]
        delta: i64,
        /// Why the stock changed (recorded with the change).
        #[arg(long, value_name = "TEXT", default_value = "")]
        reason: String,
        #[command(flatten)]
        request_id: RequestIdArg,
    },
    /// Load items from Postgres into Redis (Admin.Preload).
    #[command(group(ArgGroup::new("target").required(true).args(["skus", "all"])))]
    Preload {
        #[arg(value_name = "SKU")]
        skus: Vec<String>,
        /// Every item in Postgres, page by page with progress on stderr.
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        paging: PagingArgs,
    },
    /// Compare Redis and Postgres (Admin.Reconcile); report, or repair with --repair.
    #[command(group(ArgGroup::new("target").required(true).args(["skus", "all"])))]
    Reconcile {
        #[arg(value_name = "SKU")]
        skus: Vec<String>,
        /// Every item, page by page with progress on stderr.
        #[arg(long)]
        all: bool,
        /// Repair what differs instead of only reporting it.
        #[arg(long)]
        repair: bool,
        #[command(flatten)]
        paging: PagingArgs,
    },
    /// Write-behind state per partition (Admin.FlushStatus).
    FlushStatus,
    /// Stream change events until Ctrl-C (Watch). No SKU = every SKU.
    Watch {
        #[arg(value_name = "SKU")]
        skus: Vec<String>,
        /// Resume after this event id (default: only new events).
        #[arg(long = "from", value_name = "EVENT_ID")]
        from_event_id: Option<String>,
    },
    /// Load the server with a workload; report throughput, latency, flush lag,
    /// and check that nothing was oversold (see docs/benchmarks.md).
    Bench(super::bench::BenchArgs),
    /// Webhook subscriptions and their dead letters (Admin.*Webhook*).
    #[command(subcommand)]
    Webhook(super::webhook::WebhookCommand),
    /// Print a completion script for SHELL, e.g.
    /// `stockctl completions bash > /etc/bash_completion.d/stockctl`.
    Completions { shell: Shell },
}

/// How `--all` walks the catalogue. (`conflicts_with = "skus"` rather than
/// `requires = "all"`: a flag counts as present through its default.)
#[derive(Debug, Args)]
pub struct PagingArgs {
    /// With --all: start where an interrupted run stopped (it prints the
    /// cursor with its progress); the totals then cover this run only.
    #[arg(long, conflicts_with = "skus", value_name = "CURSOR")]
    pub cursor: Option<String>,
    /// With --all: items per rpc.
    #[arg(long, conflicts_with = "skus", value_name = "N", default_value_t = 50_000,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub page_size: u32,
}

#[derive(Debug, Args)]
pub struct RequestIdArg {
    /// Idempotency key; generated (and printed) when omitted, so the request can be replayed.
    #[arg(long = "request-id", value_name = "ID")]
    pub request_id: Option<String>,
}

/// A token that never shows up in `Debug` output.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        // Never fails here: clap would echo a rejected value in its usage
        // error. The token is checked when it is turned into a header.
        Ok(Secret(s.to_owned()))
    }
}

impl Secret {
    /// The `authorization` header value, `Bearer <token>`. The error never
    /// contains the token.
    pub fn bearer(
        &self,
    ) -> Result<tonic::metadata::MetadataValue<tonic::metadata::Ascii>, &'static str> {
        if self.0.is_empty() {
            return Err("the token is empty");
        }
        if !self.0.bytes().all(|b| b.is_ascii_graphic()) {
            return Err("the token must be printable ASCII without spaces");
        }
        format!("Bearer {}", self.0)
            .parse()
            .map_err(|_| "the token is not a valid header value")
    }
}

/// `HOST:PORT` (plaintext, so `http://` is assumed) or an http(s) URL; the URL.
fn parse_addr(s: &str) -> Result<String, String> {
    let url = if s.contains("://") {
        s.to_owned()
    } else {
        format!("http://{s}")
    };
    let uri: tonic::transport::Uri = url.parse().map_err(|e| format!("not an address: {e}"))?;
    match uri.scheme_str() {
        Some("http") | Some("https") => {}
        _ => {
            return Err(
                "expected HOST:PORT or an http:// or https:// URL, e.g. 127.0.0.1:50051".into(),
            );
        }
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err("the address has no host".into());
    }
    Ok(url)
}

/// `5s`, `500ms`, `1m`, or plain seconds (`2.5`); more than 0, at most a day.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let (number, unit_secs) = if let Some(n) = s.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60.0)
    } else {
        (s, 1.0)
    };
    match number.trim().parse::<f64>() {
        Ok(n) if n > 0.0 && n * unit_secs <= 86_400.0 => Ok(Duration::from_secs_f64(n * unit_secs)),
        _ => Err("expected a duration such as 5s, 500ms, 1m or 2.5, at most a day".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;
    use clap::error::ErrorKind;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("stockctl").chain(args.iter().copied()))
    }

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn adjust_accepts_negative_delta() {
        let cli = parse(&["adjust", "tshirt@berlin", "-3", "--reason", "broken"]).unwrap();
        match cli.command {
            Command::Adjust {
                item,
                delta,
                reason,
                request_id,
            } => {
                assert_eq!(item.sku, "tshirt");
                assert_eq!(item.location, "berlin");
                assert_eq!(delta, -3);
                assert_eq!(reason, "broken");
                assert_eq!(request_id.request_id, None);
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn set_accepts_negative_available_for_the_server_to_judge() {
        let cli = parse(&["set", "a", "-1", "--expected-version", "4"]).unwrap();
        match cli.command {
            Command::Set {
                available,
                expected_version,
                ..
            } => {
                assert_eq!(available, -1);
                assert_eq!(expected_version, Some(4));
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn reserve_parses_lines_and_ttl() {
        let cli = parse(&["reserve", "r1", "a@b:2", "c:1", "--ttl", "60"]).unwrap();
        match cli.command {
            Command::Reserve {
                reservation_id,
                lines,
                ttl,
            } => {
                assert_eq!(reservation_id, "r1");
                assert_eq!(lines.len(), 2);
                assert_eq!(lines[0].item.location, "b");
                assert_eq!(lines[1].quantity, 1);
                assert_eq!(ttl, Some(60));
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn bad_line_is_a_usage_error() {
        let err = parse(&["decrement", "a@:3"]).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::ValueValidation);
        assert_eq!(err.exit_code(), 2);
        let err = parse(&["decrement", "a:x"]).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::ValueValidation);
    }

    #[test]
    fn reserve_needs_a_line() {
        let err = parse(&["reserve", "r1"]).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::MissingRequiredArgument);
    }

    #[test]
    fn preload_needs_skus_or_all_but_not_both() {
        assert!(parse(&["preload"]).is_err());
        assert!(parse(&["preload", "a", "--all"]).is_err());
        assert!(parse(&["preload", "--all"]).is_ok());
        assert!(parse(&["preload", "a", "b"]).is_ok());
    }

    #[test]
    fn reconcile_repair_flag() {
        let cli = parse(&["reconcile", "--all", "--repair"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Reconcile {
                all: true,
                repair: true,
                ..
            }
        ));
    }

    #[test]
    fn global_flags_after_the_subcommand() {
        let cli = parse(&["get", "a", "--json", "--addr", "http://example:1"]).unwrap();
        assert!(cli.json);
        assert_eq!(cli.addr, "http://example:1");
    }

    #[test]
    fn addr_is_host_port_or_an_http_or_https_url() {
        let cli = parse(&["--addr", "127.0.0.1:50051", "flush-status"]).unwrap();
        assert_eq!(cli.addr, "http://127.0.0.1:50051");
        let cli = parse(&["--addr", "stock.internal:7000", "flush-status"]).unwrap();
        assert_eq!(cli.addr, "http://stock.internal:7000");
        assert!(parse(&["--addr", ":50051", "flush-status"]).is_err());
        assert!(parse(&["--addr", "ftp://x", "flush-status"]).is_err());
        assert!(parse(&["--addr", "https://stock.example", "flush-status"]).is_ok());
        assert!(parse(&["--addr", "http://stock.example", "flush-status"]).is_ok());
    }

    #[test]
    fn timeouts_take_a_unit() {
        let timeout = |s: &str| parse(&["--timeout", s, "flush-status"]).map(|c| c.timeout);
        assert_eq!(timeout("5s").unwrap(), Some(Duration::from_secs(5)));
        assert_eq!(timeout("250ms").unwrap(), Some(Duration::from_millis(250)));
        assert_eq!(timeout("2m").unwrap(), Some(Duration::from_secs(120)));
        assert_eq!(timeout("1.5").unwrap(), Some(Duration::from_millis(1500)));
        for bad in ["0", "-1s", "soon", "2d", "100000s", ""] {
            assert!(timeout(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn cursor_and_page_size_only_with_all() {
        assert!(parse(&["preload", "a", "--cursor", "c"]).is_err());
        assert!(parse(&["reconcile", "a", "--page-size", "10"]).is_err());
        let cli = parse(&["reconcile", "--all", "--cursor", "c", "--page-size", "10"]).unwrap();
        match cli.command {
            Command::Reconcile { paging, .. } => {
                assert_eq!(paging.cursor.as_deref(), Some("c"));
                assert_eq!(paging.page_size, 10);
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn help_documents_the_exit_codes() {
        let help = Cli::command().render_help().to_string();
        assert!(help.contains("64+N"), "{help}");
        assert!(help.contains("reconcile found items out of sync"), "{help}");
    }

    #[test]
    fn a_client_certificate_needs_its_key() {
        assert!(parse(&["--tls-cert", "c.pem", "flush-status"]).is_err());
        let cli = parse(&[
            "--tls-ca",
            "ca.pem",
            "--tls-cert",
            "c.pem",
            "--tls-key",
            "k.pem",
            "flush-status",
        ])
        .unwrap();
        assert_eq!(cli.tls_key.unwrap().to_str(), Some("k.pem"));
    }

    #[test]
    fn watch_from() {
        let cli = parse(&["watch", "a", "b", "--from", "1-0"]).unwrap();
        match cli.command {
            Command::Watch {
                skus,
                from_event_id,
            } => {
                assert_eq!(skus, ["a", "b"]);
                assert_eq!(from_event_id.as_deref(), Some("1-0"));
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn tokens_are_redacted_in_debug_and_validated_without_echo() {
        let cli = parse(&["--admin-token", "s3cr3t", "flush-status"]).unwrap();
        let token = cli.admin_token.as_ref().unwrap();
        assert_eq!(token.expose(), "s3cr3t");
        assert_eq!(token.bearer().unwrap(), "Bearer s3cr3t");
        assert!(!format!("{cli:?}").contains("s3cr3t"));

        let cli = parse(&["--client-token", "has space", "flush-status"]).unwrap();
        let err = cli.client_token.unwrap().bearer().unwrap_err();
        assert!(!err.contains("has space"), "{err}");
        assert!("".parse::<Secret>().unwrap().bearer().is_err());
    }

    #[test]
    fn help_never_shows_token_values() {
        let cmd = Cli::command();
        for id in ["admin_token", "client_token"] {
            let arg = cmd.get_arguments().find(|a| a.get_id() == id).unwrap();
            assert!(arg.get_env().is_some(), "{id} reads the environment");
            assert!(arg.is_hide_env_values_set(), "{id} would show its value");
        }
    }
}
