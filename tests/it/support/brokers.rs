//! The message brokers the export tests publish to: the test NATS (with
//! JetStream) and RabbitMQ, and the cleanup of what a test's namespace
//! left in them.

/// The test NATS server (`STOCKD_TEST_NATS_URL`).
pub fn nats_url() -> String {
    std::env::var("STOCKD_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

/// The test RabbitMQ (`STOCKD_TEST_AMQP_URL`).
pub fn amqp_url() -> String {
    std::env::var("STOCKD_TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// Deletes the JetStream stream of `namespace` (stockd creates it on its
/// first export; none is fine).
pub async fn delete_nats_stream(namespace: &str) {
    let client = async_nats::connect(nats_url())
        .await
        .expect("the test NATS");
    let js = async_nats::jetstream::new(client);
    let _ = js
        .delete_stream(stockd::export::stream_name(namespace))
        .await;
}
