//! The NATS JetStream exporter's broker: stream `STOCKD_<NS>` over
//! `stockd.<ns>.stock.>` (created when missing), one subject per item,
//! `Nats-Msg-Id` per change so that the stream's duplicate window drops
//! replays.
//!
//! Order: async-nats reconnects by itself and sends what was buffered
//! meanwhile, so a message lost with a broken connection can be followed by
//! later ones that arrive. Publishing two changes of one item at once could
//! then store the newer one first and the older one at the retry. So a
//! batch goes out in rounds: each round holds at most one change per item
//! (the batch's first changes of every item, then the second ones, ...),
//! pipelined, and the next round starts only once every ack of this one is
//! in. Under a spread load that is one round per batch.

use std::collections::HashMap;
use std::time::Duration;

use async_nats::jetstream::{self, context::PublishAckFuture, stream};
use tokio::sync::Mutex;

use super::{Acked, Broker, Message, stream_name, subject_prefix};

/// How long a connection attempt, and the wait for one publish ack, may take.
const TIMEOUT: Duration = Duration::from_secs(5);
/// The stream's duplicate window: replays within it are dropped. A replay
/// comes from a crash (claimed after the claim timeout) or a failed
/// publish, both far shorter.
const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);

pub struct NatsBroker {
    url: String,
    namespace: String,
    /// A JetStream context whose stream is known to exist; dropped after a
    /// failure so that the next attempt checks the stream again.
    context: Mutex<Option<jetstream::Context>>,
}

impl NatsBroker {
    pub fn new(url: &str, namespace: &str) -> Self {
        Self {
            url: url.to_owned(),
            namespace: namespace.to_owned(),
            context: Mutex::new(None),
        }
    }

    /// The context in `slot`, connecting first when there is none.
    async fn connected(
        &self,
        slot: &mut Option<jetstream::Context>,
    ) -> Result<jetstream::Context, String> {
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        let c = self.connect().await?;
        *slot = Some(c.clone());
        Ok(c)
    }

    async fn connect(&self) -> Result<jetstream::Context, String> {
        let client = async_nats::ConnectOptions::new()
            .connection_timeout(TIMEOUT)
            .name("stockd exporter")
            .connect(&self.url)
            .await
            .map_err(|e| format!("connecting to {}: {e}", redact(&self.url)))?;
        let mut context = jetstream::new(client);
        context.set_timeout(TIMEOUT);
        let name = stream_name(&self.namespace);
        context
            .get_or_create_stream(stream::Config {
                name: name.clone(),
                subjects: vec![format!("{}.>", subject_prefix(&self.namespace))],
                duplicate_window: DUPLICATE_WINDOW,
                storage: stream::StorageType::File,
                ..Default::default()
            })
            .await
            .map_err(|e| format!("creating stream {name}: {e}"))?;
        Ok(context)
    }
}

impl Broker for NatsBroker {
    const NAME: &'static str = "nats";

    async fn publish(
        &self,
        messages: &[&Message],
        on_ack: &mut (dyn FnMut(usize, Acked) + Send),
    ) -> Result<(), String> {
        let mut slot = self.context.lock().await;
        let context = self.connected(&mut slot).await?;
        let result = publish_in_rounds(&context, &self.namespace, messages, on_ack).await;
        if result.is_err() {
            *slot = None;
        }
        result
    }

    async fn prepare(&self) -> Result<(), String> {
        self.connected(&mut *self.context.lock().await)
            .await
            .map(drop)
    }
}

async fn publish_in_rounds(
    context: &jetstream::Context,
    namespace: &str,
    messages: &[&Message],
    on_ack: &mut (dyn FnMut(usize, Acked) + Send),
) -> Result<(), String> {
    let prefix = subject_prefix(namespace);
    for round in rounds(messages) {
        let mut acks: Vec<(usize, PublishAckFuture)> = Vec::with_capacity(round.len());
        for i in round {
            let m = messages[i];
            let mut headers = async_nats::HeaderMap::new();
            headers.insert(async_nats::header::NATS_MESSAGE_ID, m.id.as_str());
            let ack = context
                .publish_with_headers(
                    format!("{prefix}.{}", m.item_key),
                    headers,
                    m.payload.clone().into(),
                )
                .await
                .map_err(|e| format!("publishing {}: {e}", m.id))?;
            acks.push((i, ack));
        }
        for (i, ack) in acks {
            let ack = ack
                .await
                .map_err(|e| format!("ack of {}: {e}", messages[i].id))?;
            on_ack(
                i,
                if ack.duplicate {
                    Acked::Duplicate
                } else {
                    Acked::Stored
                },
            );
        }
    }
    Ok(())
}

/// Splits the indices of `messages` into rounds holding at most one
/// message per item, each item's messages in their order across rounds.
fn rounds(messages: &[&Message]) -> Vec<Vec<usize>> {
    let mut seen: HashMap<&str, usize> = HashMap::new();
    let mut rounds: Vec<Vec<usize>> = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        let n = seen.entry(m.item_key.as_str()).or_insert(0);
        if rounds.len() <= *n {
            rounds.push(Vec::new());
        }
        rounds[*n].push(i);
        *n += 1;
    }
    rounds
}

/// The URL without its credentials, for error messages.
fn redact(url: &str) -> String {
    crate::config::ServiceUrl::new(url).redacted()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_hold_one_change_per_item_in_order() {
        let m = |key: &str, id: &str| Message {
            item_key: key.into(),
            id: id.into(),
            payload: Vec::new(),
        };
        let msgs = [
            m("a", "a1"),
            m("b", "b1"),
            m("a", "a2"),
            m("a", "a3"),
            m("c", "c1"),
        ];
        let refs: Vec<&Message> = msgs.iter().collect();
        assert_eq!(rounds(&refs), vec![vec![0, 1, 4], vec![2], vec![3]]);
    }
}
