//! Operability and security: metrics, TLS and mutual TLS, request size and
//! concurrency limits, least-privilege Redis and Postgres users, and secrets
//! kept out of logs (the tokens: tests/it/auth.rs).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use futures::future::join_all;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
};
use stockd::pb;
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

use crate::support::metrics::{sample, scrape};
use crate::support::own_redis::OwnRedis;
use crate::support::process::Stockd;
use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_are_exported_and_move_after_traffic() {
    let namespace = unique_namespace("metrics");
    let database = namespace.replace('-', "_");
    let leftovers = Leftovers::new(&namespace, &database);
    let port = free_port();
    let stockd = Stockd::start_with(
        &namespace,
        &postgres_url(&database),
        "metrics",
        false,
        &[
            "--metrics-addr".into(),
            format!("127.0.0.1:{port}"),
            "--reaper-interval-ms".into(),
            "50".into(),
        ],
    )
    .await;
    let rpc = stockd.clients();
    rpc.set("s", "m", "", 5).await.unwrap();
    let hold = |qty: i64| vec![line("m", "", qty)];
    rpc.reserve("lapses", hold(1), 1).await.unwrap();
    rpc.reserve("sold", hold(1), 600).await.unwrap();
    rpc.commit("sold").await.unwrap();
    assert_eq!(
        code_of(rpc.reserve("too-many", hold(99), 600).await),
        Code::FailedPrecondition
    );

    eventually(
        Duration::from_secs(20),
        "the hold to expire and the flush to show",
        || async {
            let text = scrape(port).await;
            let expired = sample(&text, "stockd_reservations_expired_total", &[])?;
            let flushed = sample(&text, "stockd_flushed_events_total", &[])?;
            (expired >= 1.0 && flushed >= 5.0).then_some(text)
        },
    )
    .await;
    // Once flushed, a reconcile finds the item in sync.
    let report = rpc
        .reconcile_all(pb::ReconcileMode::Unspecified)
        .await
        .unwrap();
    assert_eq!(report.in_sync, 1, "{report:?}");
    let text = scrape(port).await;
    assert!(
        sample(
            &text,
            "stockd_requests_total",
            &["rpc=\"Reserve\"", "code=\"Ok\""]
        )
        .unwrap()
            >= 2.0
    );
    assert_eq!(
        sample(
            &text,
            "stockd_requests_total",
            &["rpc=\"Reserve\"", "code=\"FailedPrecondition\""]
        ),
        Some(1.0)
    );
    assert!(
        sample(
            &text,
            "stockd_request_duration_seconds_bucket",
            &["rpc=\"Commit\"", "le=\"+Inf\""]
        )
        .unwrap()
            >= 1.0
    );
    assert!(sample(&text, "stockd_flush_batch_duration_seconds_count", &[]).unwrap() >= 1.0);
    assert_eq!(
        sample(&text, "stockd_reconcile_items", &["class=\"in_sync\""]),
        Some(1.0)
    );
    for name in [
        "stockd_unflushed_events",
        "stockd_oldest_unflushed_age_seconds",
        "stockd_flush_retries_total",
        "stockd_dead_letters_total",
        "stockd_redis_epoch_changes_total",
    ] {
        assert!(
            sample(&text, name, &[]).is_some(),
            "{name} missing from:\n{text}"
        );
    }
    let mut stockd = stockd;
    assert_eq!(stockd.terminate().await.code(), Some(0));
    leftovers.remove().await;
}

/// A certificate authority for the test, and leaf certificates it signs.
struct TestCa {
    params: CertificateParams,
    key: KeyPair,
    pem: String,
}

impl TestCa {
    fn new(name: &str) -> Self {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let pem = params.self_signed(&key).unwrap().pem();
        Self { params, key, pem }
    }

    /// (certificate PEM, key PEM) for `name`, for a server or a client.
    fn leaf(&self, name: &str, usage: ExtendedKeyUsagePurpose) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec![name.to_owned()]).unwrap();
        params.extended_key_usages = vec![usage];
        let issuer = Issuer::from_params(&self.params, &self.key);
        (
            params.signed_by(&key, &issuer).unwrap().pem(),
            key.serialize_pem(),
        )
    }
}

fn write(dir: &std::path::Path, name: &str, content: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, content).unwrap();
    path.to_string_lossy().into_owned()
}

/// A GetStock over a new connection to `addr`: plaintext, or TLS with
/// `tls`; the error says which step failed.
async fn get_stock(addr: SocketAddr, tls: Option<ClientTlsConfig>) -> Result<(), String> {
    let endpoint = match tls {
        None => Channel::from_shared(format!("http://{addr}")).unwrap(),
        Some(tls) => Channel::from_shared(format!("https://{addr}"))
            .unwrap()
            .tls_config(tls)
            .unwrap(),
    };
    let channel = endpoint.connect().await.map_err(|e| e.to_string())?;
    Clients::new(channel)
        .get(&[("x", "")])
        .await
        .map(drop)
        .map_err(|s| s.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_and_mutual_tls_refuse_plaintext_and_untrusted_clients() {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(unique_namespace("tls"));
    std::fs::create_dir_all(&dir).unwrap();
    let ca = TestCa::new("stockd test CA");
    let stranger = TestCa::new("someone else");
    let (server_cert, server_key) = ca.leaf("localhost", ExtendedKeyUsagePurpose::ServerAuth);
    let (client_cert, client_key) = ca.leaf("checkout", ExtendedKeyUsagePurpose::ClientAuth);
    let (rogue_cert, rogue_key) = stranger.leaf("rogue", ExtendedKeyUsagePurpose::ClientAuth);
    let server_tls = |identity: Option<(&str, &str)>| {
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&ca.pem))
            .domain_name("localhost");
        match identity {
            Some((cert, key)) => tls.identity(Identity::from_pem(cert, key)),
            None => tls,
        }
    };
    let args = vec![
        "--tls-cert".into(),
        write(&dir, "server.pem", &server_cert),
        "--tls-key".into(),
        write(&dir, "server.key", &server_key),
        "--tls-client-ca".into(),
        write(&dir, "ca.pem", &ca.pem),
    ];
    let app = spawn_app_with(Options {
        extra_args: args,
        client_tls: Some(server_tls(Some((&client_cert, &client_key)))),
        ..Options::default()
    })
    .await;

    // mutual TLS: a trusted client certificate is let in...
    let trusted = server_tls(Some((&client_cert, &client_key)));
    get_stock(app.addr, Some(trusted)).await.unwrap();
    // ...plaintext, no certificate, or one from another CA are not.
    assert!(get_stock(app.addr, None).await.is_err());
    assert!(get_stock(app.addr, Some(server_tls(None))).await.is_err());
    let rogue = server_tls(Some((&rogue_cert, &rogue_key)));
    assert!(get_stock(app.addr, Some(rogue)).await.is_err());
    // stockctl speaks TLS too.
    let stockctl_run = |extra: &[&str], command: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_stockctl"))
            .args([
                "--addr",
                &format!("https://{}", app.addr),
                "--tls-domain",
                "localhost",
            ])
            .args(extra)
            .args(command)
            .env_remove("STOCKD_CLIENT_TOKEN")
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let stockctl = |extra: &[&str]| stockctl_run(extra, &["get", "x"]);
    let ca_file = write(&dir, "ca.pem", &ca.pem);
    let cert_file = write(&dir, "client.pem", &client_cert);
    let key_file = write(&dir, "client.key", &client_key);
    let mutual = [
        "--tls-ca",
        &ca_file,
        "--tls-cert",
        &cert_file,
        "--tls-key",
        &key_file,
    ];
    let ok = stockctl(&mutual);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(
        String::from_utf8_lossy(&ok.stdout).contains("missing"),
        "{}",
        String::from_utf8_lossy(&ok.stdout)
    );
    // The server cuts the connection: UNAVAILABLE or UNKNOWN, depending on
    // when the client notices.
    let refused = stockctl(&["--tls-ca", &ca_file]).status.code();
    assert!(
        matches!(refused, Some(65..=80)),
        "no client certificate: an rpc error, got {refused:?}"
    );
    // So does its bench, with the same flags.
    let bench = stockctl_run(
        &[&mutual[..], &["--json"]].concat(),
        &[
            "bench",
            "--workload",
            "hot",
            "--requests",
            "20",
            "--clients",
            "2",
            "--no-postgres-check",
        ],
    );
    let report = String::from_utf8_lossy(&bench.stdout);
    assert!(
        bench.status.success(),
        "{report}{}",
        String::from_utf8_lossy(&bench.stderr)
    );
    let report: serde_json::Value = serde_json::from_str(&report).unwrap();
    assert_eq!(report["outcomes"]["OK"], 20, "{report}");
    app.stop().await;

    // TLS without client certificates: any client that trusts the server.
    let app = spawn_app_with(Options {
        extra_args: vec![
            "--tls-cert".into(),
            write(&dir, "server.pem", &server_cert),
            "--tls-key".into(),
            write(&dir, "server.key", &server_key),
        ],
        client_tls: Some(server_tls(None)),
        ..Options::default()
    })
    .await;
    get_stock(app.addr, Some(server_tls(None))).await.unwrap();
    assert!(get_stock(app.addr, None).await.is_err());
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn oversized_requests_and_floods_are_refused_fast() {
    let app = spawn_app_with(Options::with_args(&["--max-concurrent-requests", "2"])).await;
    app.seed("limit", "", 1_000_000).await;
    let before = app.level("limit", "").await.unwrap();
    let status = app
        .adjust("big", "limit", "", 1, &"x".repeat(300 * 1024))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert_eq!(
        app.level("limit", "").await.unwrap(),
        before,
        "a refused request changes nothing"
    );

    // A flood far beyond the limit: some are refused at once, none queue
    // forever, none fail otherwise.
    let flood = (0..400).map(|i| {
        let rpc = app.clients();
        async move {
            rpc.reserve(&format!("f{i}"), vec![line("limit", "", 1)], 600)
                .await
        }
    });
    let results = join_all(flood).await;
    let shed = results
        .iter()
        .filter(|r| matches!(r, Err(s) if s.code() == Code::ResourceExhausted))
        .count();
    let served = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(shed + served, 400, "only refusals or successes");
    assert!(shed > 0, "the flood was shed");
    for refusal in results.iter().filter_map(|r| r.as_ref().err()) {
        assert_eq!(reason(refusal), "OVERLOADED");
        assert!(
            retry_delay(refusal).is_some(),
            "worth retrying: {refusal:?}"
        );
    }
    let level = app.level("limit", "").await.unwrap();
    assert_eq!(
        level.reserved, served as i64,
        "every served reservation counted, no refused one"
    );

    // A well-behaved client backs off on RESOURCE_EXHAUSTED and gets through.
    let mut backoff = POLL_INTERVAL;
    let mut attempts = 0;
    loop {
        attempts += 1;
        match app.reserve("polite", vec![line("limit", "", 1)], 600).await {
            Ok(_) => break,
            Err(s) if s.code() == Code::ResourceExhausted && attempts < 50 => {
                tokio::time::sleep(backoff).await;
                backoff *= 2;
            }
            Err(s) => panic!("{s:?}"),
        }
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stockd_runs_as_a_restricted_redis_user() {
    let redis = OwnRedis::start().await;
    let namespace = unique_namespace("acl");
    let admin_url = redis.url();
    let client = redis::Client::open(admin_url.as_str()).unwrap();
    let mut root = client.get_multiplexed_async_connection().await.unwrap();
    // deploy/redis-acl.txt, with this test's namespace for `stockd`.
    let rules =
        include_str!("../../deploy/redis-acl.txt").replace("~stockd:*", &format!("~{namespace}:*"));
    let mut setuser = redis::cmd("ACL");
    setuser.arg("SETUSER").arg("stockd").arg(">s3cret-acl");
    for rule in rules.split_whitespace() {
        setuser.arg(rule);
    }
    let () = setuser.query_async(&mut root).await.unwrap();
    let restricted = format!("redis://stockd:s3cret-acl@127.0.0.1:{}", redis.port);

    let app = spawn_app_with(Options {
        namespace,
        redis_url: Some(admin_url),
        extra_args: vec!["--redis-url".into(), restricted.clone()],
        ..Options::default()
    })
    .await;
    // The full path: stock, holds, expiry, flush, warming, reconcile, status.
    app.seed("acl", "", 10).await;
    app.reserve("a", vec![line("acl", "", 1)], 600)
        .await
        .unwrap();
    app.commit("a").await.unwrap();
    app.reserve("b", vec![line("acl", "", 1)], 1).await.unwrap();
    app.decrement("d", vec![line("acl", "", 2)]).await.unwrap();
    eventually(Duration::from_secs(15), "the hold to expire", || async {
        (app.level("acl", "").await.unwrap().reserved == 0).then_some(())
    })
    .await;
    let pool = app.postgres().await;
    app.converged(&pool).await;
    app.preload_all().await.unwrap();
    let report = app
        .reconcile_all(pb::ReconcileMode::Unspecified)
        .await
        .unwrap();
    assert_eq!((report.checked, report.in_sync), (1, 1));
    app.flush_status().await.unwrap();

    // What the user may not do.
    let mut user = redis::Client::open(restricted.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    for cmd in [
        redis::cmd("FLUSHALL"),
        // Reading the persistence and eviction settings is allowed (stockd
        // checks them); changing any setting is not.
        redis::cmd("CONFIG")
            .arg("SET")
            .arg("maxmemory-policy")
            .arg("allkeys-lru")
            .to_owned(),
        redis::cmd("GET").arg("other:key").to_owned(),
    ] {
        let err = cmd
            .query_async::<redis::Value>(&mut user)
            .await
            .unwrap_err();
        assert_eq!(err.code(), Some("NOPERM"), "{err:?}");
    }
    pool.close().await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stockd_runs_as_a_postgres_role_without_ddl_rights() {
    // The first start creates the schema as the owner...
    let first = spawn_app().await;
    first.seed("pg", "", 10).await;
    let namespace = first.namespace.clone();
    let database = first.database.clone();
    first.stop_keep_data().await;
    // ...then deploy/postgres-grants.sql gives a role what it needs.
    let role = format!("stockd_app_{}", database.rsplit('_').next().unwrap());
    let grants = include_str!("../../deploy/postgres-grants.sql")
        .replace("stockd_app", &role)
        .replace("DATABASE stockd", &format!("DATABASE \"{database}\""));
    let owner = sqlx::PgPool::connect(&postgres_url(&database))
        .await
        .unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(grants))
        .execute(&owner)
        .await
        .unwrap();

    let app = spawn_app_with(Options {
        namespace,
        database_url: Some(format!("postgres://{role}@127.0.0.1:5432/{database}")),
        ..Options::default()
    })
    .await;
    app.reserve("r", vec![line("pg", "", 2)], 600)
        .await
        .unwrap();
    app.release("r").await.unwrap();
    app.converged(&owner).await;
    app.reconcile_all(pb::ReconcileMode::Unspecified)
        .await
        .unwrap();
    app.preload_all().await.unwrap();
    let denied = sqlx::query("DELETE FROM stock")
        .execute(
            &sqlx::PgPool::connect(&format!("postgres://{role}@127.0.0.1:5432/{database}"))
                .await
                .unwrap(),
        )
        .await
        .unwrap_err();
    assert!(denied.to_string().contains("permission denied"), "{denied}");
    owner.close().await;
    app.stop().await;
    let server = sqlx::PgPool::connect(&postgres_url("postgres"))
        .await
        .unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP ROLE IF EXISTS \"{role}\""
    )))
    .execute(&server)
    .await
    .unwrap();
}

#[tokio::test]
async fn passwords_never_reach_the_logs() {
    let closed = free_port();
    for (redis, database) in [
        (
            format!("redis://:Sup3rS3cretR@127.0.0.1:{closed}"),
            postgres_url("unused"),
        ),
        (
            redis_url(),
            format!("postgres://postgres:Sup3rS3cretP@127.0.0.1:{closed}/x"),
        ),
    ] {
        let namespace = unique_namespace("secret");
        let output = Command::new(env!("CARGO_BIN_EXE_stockd"))
            .args(["--grpc-addr", "127.0.0.1:0", "--metrics-addr", ""])
            .args(["--namespace", &namespace])
            .args(["--redis-url", &redis, "--database-url", &database])
            .args(["--redis-timeout-ms", "500"])
            .env("STOCKD_LOG", "debug")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(
            !output.status.success(),
            "stockd cannot start without its stores"
        );
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(!text.contains("Sup3rS3cret"), "a password leaked:\n{text}");
        assert!(text.contains("cannot"), "the failure is explained:\n{text}");
        // The run with a reachable Redis got as far as the deployment record.
        delete_namespace(&mut shared_redis().await, &namespace).await;
    }
}

/// The `stockd_requests_total` and `stockd_request_duration_seconds` series
/// of a scrape (names with their labels, without values).
fn request_series(scrape: &str) -> std::collections::BTreeSet<String> {
    scrape
        .lines()
        .filter(|l| {
            l.starts_with("stockd_requests_total")
                || l.starts_with("stockd_request_duration_seconds")
        })
        .filter_map(|l| l.rsplit_once(' ').map(|(series, _)| series.to_owned()))
        .collect()
}

/// A unary call to any path, as a client with another proto would make.
async fn call_path(channel: Channel, path: &str) -> Code {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let path = http::uri::PathAndQuery::try_from(path).unwrap();
    let answer: Result<tonic::Response<pb::GetStockResponse>, _> = grpc
        .unary(
            tonic::Request::new(pb::GetStockRequest::default()),
            path,
            tonic_prost::ProstCodec::default(),
        )
        .await;
    code_of(answer)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn request_metrics_name_known_rpcs_and_count_final_statuses() {
    let namespace = unique_namespace("rpcmetrics");
    let database = namespace.replace('-', "_");
    let leftovers = Leftovers::new(&namespace, &database);
    let port = free_port();
    let mut stockd = Stockd::start_with(
        &namespace,
        &postgres_url(&database),
        "rpcmetrics",
        false,
        &[
            "--metrics-addr".into(),
            format!("127.0.0.1:{port}"),
            "--watch-buffer".into(),
            "1".into(),
        ],
    )
    .await;
    let channel = stockd.channel();
    let rpc = Clients::new(channel.clone());
    rpc.set("s", "w", "", 1_000).await.unwrap();

    // Unknown paths: UNIMPLEMENTED, counted in the one series that was
    // there from the start.
    let before = scrape(port).await;
    let unknown = [
        "/stockd.v1.Inventory/Nope",
        "/x.Y/Reserve",
        "/zz-random-9f3a/whatever",
    ];
    for path in unknown {
        assert_eq!(
            call_path(channel.clone(), path).await,
            Code::Unimplemented,
            "{path}"
        );
    }
    let after = scrape(port).await;
    assert_eq!(
        request_series(&before),
        request_series(&after),
        "unknown paths added series"
    );
    assert_eq!(
        sample(
            &after,
            "stockd_requests_total",
            &["rpc=\"unknown\"", "code=\"Unimplemented\""]
        ),
        Some(unknown.len() as f64)
    );
    assert!(!after.contains("Nope") && !after.contains("zz-random"));

    // A Watch whose client reads nothing is cut: counted as
    // RESOURCE_EXHAUSTED, its final status, not as its OK headers.
    let slow_client = Clients::small_window(stockd.addr).await;
    let mut slow = slow_client.watch(&["w"], "").await.unwrap();
    for i in 0..150 {
        let id = format!("w-{i}");
        rpc.reserve(&id, vec![line("w", "", 1)], 600).await.unwrap();
        rpc.release(&id).await.unwrap();
    }
    let status = loop {
        match tokio::time::timeout(Duration::from_secs(20), slow.message()).await {
            Ok(Ok(Some(_))) => {}
            Ok(Ok(None)) => panic!("the stream ended without a status"),
            Ok(Err(status)) => break status,
            Err(_) => panic!("no status within 20 s"),
        }
    };
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    let text = eventually(
        Duration::from_secs(10),
        "the cut Watch to be counted",
        || async {
            let text = scrape(port).await;
            sample(
                &text,
                "stockd_requests_total",
                &["rpc=\"Watch\"", "code=\"ResourceExhausted\""],
            )
            .filter(|n| *n == 1.0)
            .map(|_| text)
        },
    )
    .await;
    assert_eq!(
        sample(
            &text,
            "stockd_requests_total",
            &["rpc=\"Watch\"", "code=\"Ok\""]
        ),
        None,
        "the cut Watch was not counted as OK"
    );
    assert_eq!(
        sample(
            &text,
            "stockd_requests_total",
            &["rpc=\"Reserve\"", "code=\"Ok\""]
        ),
        Some(150.0)
    );

    // Build, process, Redis, Postgres and pool metrics.
    assert_eq!(
        sample(
            &text,
            "stockd_build_info",
            &[&format!("version=\"{}\"", env!("CARGO_PKG_VERSION"))]
        ),
        Some(1.0)
    );
    assert_eq!(sample(&text, "stockd_requests_in_flight", &[]), Some(0.0));
    assert!(sample(&text, "process_resident_memory_bytes", &[]).unwrap() > 1e6);
    assert!(
        sample(&text, "process_cpu_seconds_total", &[]).is_some(),
        "{text}"
    );
    assert!(
        sample(
            &text,
            "stockd_redis_duration_seconds_count",
            &["kind=\"command\"", "outcome=\"ok\""]
        )
        .unwrap()
            >= 300.0
    );
    eventually(Duration::from_secs(10), "a flush to be timed", || async {
        let text = scrape(port).await;
        sample(
            &text,
            "stockd_postgres_duration_seconds_count",
            &["call=\"write_batch\""],
        )
        .filter(|n| *n >= 1.0)
    })
    .await;
    assert_eq!(
        sample(&text, "stockd_postgres_pool_max_connections", &[]),
        Some(4.0)
    );
    assert!(
        sample(
            &text,
            "stockd_postgres_pool_connections",
            &["state=\"idle\""]
        )
        .is_some()
    );
    assert_eq!(stockd.terminate().await.code(), Some(0));
    leftovers.remove().await;
}
