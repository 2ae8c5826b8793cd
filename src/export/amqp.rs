//! The RabbitMQ (AMQP 0-9-1) exporter's broker: durable topic exchange
//! `stockd.<ns>.events`, routing key `<location>.<sku>`, persistent
//! messages with `message_id` = the change's id, publisher confirms.
//!
//! One connection and one confirm-mode channel, made on first use and again
//! after any failure (no automatic recovery: a channel that failed is
//! dropped, and the batch is published again on a fresh one). Messages of
//! one channel reach the exchange in order, and nothing published after a
//! lost one on a dead connection can arrive, so the whole batch is
//! pipelined and the confirms are awaited in order.

use std::time::Duration;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use tokio::sync::Mutex;

use super::{Acked, Broker, Message, exchange};

/// How long connecting, and the wait for a batch's confirms, may take.
const TIMEOUT: Duration = Duration::from_secs(5);
/// `delivery_mode` of a persistent message.
const PERSISTENT: u8 = 2;

pub struct AmqpBroker {
    url: String,
    exchange: String,
    /// The connection (kept so it lives as long as its channel) and a
    /// confirm-mode channel on which the exchange was declared.
    channel: Mutex<Option<(Connection, Channel)>>,
}

impl AmqpBroker {
    pub fn new(url: &str, namespace: &str) -> Self {
        Self {
            url: url.to_owned(),
            exchange: exchange(namespace),
            channel: Mutex::new(None),
        }
    }

    /// Connects into `slot` when it holds no channel.
    async fn ensure_connected(
        &self,
        slot: &mut Option<(Connection, Channel)>,
    ) -> Result<(), String> {
        if slot.is_none() {
            let connected = tokio::time::timeout(TIMEOUT, self.connect())
                .await
                .map_err(|_| "connecting timed out".to_owned())??;
            *slot = Some(connected);
        }
        Ok(())
    }

    async fn connect(&self) -> Result<(Connection, Channel), String> {
        let redacted = crate::config::ServiceUrl::new(&self.url).redacted();
        let connection = Connection::connect(&self.url, ConnectionProperties::default())
            .await
            .map_err(|e| format!("connecting to {redacted}: {e}"))?;
        let channel = connection
            .create_channel()
            .await
            .map_err(|e| format!("opening a channel: {e}"))?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|e| format!("confirm mode: {e}"))?;
        channel
            .exchange_declare(
                self.exchange.as_str().into(),
                ExchangeKind::Topic,
                ExchangeDeclareOptions {
                    durable: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|e| format!("declaring exchange {}: {e}", self.exchange))?;
        Ok((connection, channel))
    }

    async fn publish_on(
        &self,
        channel: &Channel,
        messages: &[&Message],
        on_ack: &mut (dyn FnMut(usize, Acked) + Send),
    ) -> Result<(), String> {
        let mut confirms = Vec::with_capacity(messages.len());
        for m in messages {
            let properties = BasicProperties::default()
                .with_delivery_mode(PERSISTENT)
                .with_message_id(m.id.as_str().into())
                .with_content_type("application/json".into());
            let confirm = channel
                .basic_publish(
                    self.exchange.as_str().into(),
                    m.item_key.as_str().into(),
                    BasicPublishOptions::default(),
                    &m.payload,
                    properties,
                )
                .await
                .map_err(|e| format!("publishing {}: {e}", m.id))?;
            confirms.push(confirm);
        }
        for (i, confirm) in confirms.into_iter().enumerate() {
            let confirmation = confirm
                .await
                .map_err(|e| format!("confirm of {}: {e}", messages[i].id))?;
            if !confirmation.is_ack() {
                return Err(format!("the broker refused {} (nack)", messages[i].id));
            }
            on_ack(i, Acked::Stored);
        }
        Ok(())
    }
}

impl Broker for AmqpBroker {
    const NAME: &'static str = "amqp";

    async fn publish(
        &self,
        messages: &[&Message],
        on_ack: &mut (dyn FnMut(usize, Acked) + Send),
    ) -> Result<(), String> {
        let mut slot = self.channel.lock().await;
        self.ensure_connected(&mut slot).await?;
        let (_, channel) = slot.as_ref().expect("connected above");
        let sent = tokio::time::timeout(
            TIMEOUT + TIMEOUT,
            self.publish_on(channel, messages, on_ack),
        )
        .await
        .unwrap_or_else(|_| Err("publisher confirms timed out".to_owned()));
        if sent.is_err()
            && let Some((connection, _)) = slot.take()
        {
            // Best effort: the connection may be dead already.
            let _ = tokio::time::timeout(
                Duration::from_secs(1),
                connection.close(0, "stockd exporter reconnects".into()),
            )
            .await;
        }
        sent
    }

    async fn prepare(&self) -> Result<(), String> {
        self.ensure_connected(&mut *self.channel.lock().await).await
    }
}
