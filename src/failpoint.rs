//! Test-only fail points: `STOCKD_FAILPOINT=<name>` makes the process abort
//! (as a kill -9 would stop it: no cleanup, nothing flushed) the first time
//! it reaches the point of that name, so crash tests can stop stockd in the
//! exact window they cover. Compiled out of release builds.
//!
//! Points: `crash-after-commit` (the flusher, between a batch's Postgres
//! commit and its XACK), `after-first-part` (a request spanning partitions
//! on a cluster, once its first part is applied and before its coordinator
//! decides), `export-crash-after-publish:<exporter>` (`nats`, `amqp`: once
//! the broker acknowledged a batch, before the XACK).

/// Aborts the process when `STOCKD_FAILPOINT` names `point`.
pub(crate) fn hit(point: &str) {
    #[cfg(debug_assertions)]
    {
        use std::sync::OnceLock;
        static ARMED: OnceLock<Option<String>> = OnceLock::new();
        let armed = ARMED.get_or_init(|| std::env::var("STOCKD_FAILPOINT").ok());
        if armed.as_deref() == Some(point) {
            eprintln!("failpoint {point}: aborting");
            std::process::abort();
        }
    }
    #[cfg(not(debug_assertions))]
    let _ = point;
}
