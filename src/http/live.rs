//! Live changes for the HTTP API's subscribers (SSE and GraphQL): a watch
//! on the instance's one [`Hub`], narrowed to what the subscriber may see.

use std::sync::Arc;

use tokio_stream::{Stream, StreamExt};

use super::access::Access;
use super::view::LowStock;
use crate::error::Error;
use crate::events::ChangeEvent;
use crate::events::EntryId;
use crate::watch::{Filter, Hub, Interrupted};

/// Subscriptions of the HTTP API.
#[derive(Clone)]
pub(crate) struct Live {
    hub: Hub,
    /// Most SKUs per subscription (`STOCKD_HTTP_MAX_SKUS`).
    max_skus: usize,
    low: LowStock,
}

/// The changes a subscriber is shown, then at most one interruption.
pub(crate) type LiveStream =
    std::pin::Pin<Box<dyn Stream<Item = Result<Arc<ChangeEvent>, Interrupted>> + Send>>;

impl Live {
    pub fn new(hub: Hub, max_skus: usize, low: LowStock) -> Self {
        Self { hub, max_skus, low }
    }

    pub fn low_stock(&self) -> LowStock {
        self.low
    }

    /// Changes of `skus` (named by `field` in errors) after `from`, or from
    /// now on. A public subscriber sees only the changes that move an item
    /// to another availability bucket.
    pub async fn subscribe(
        &self,
        field: &str,
        skus: Vec<String>,
        from: Option<EntryId>,
        access: Access,
    ) -> Result<LiveStream, Error> {
        let filter = Filter::skus(field, skus, self.max_skus)?;
        let events = self.hub.watch(filter, from).await?;
        Ok(match access {
            Access::Full => Box::pin(events),
            Access::Public => {
                let low = self.low;
                Box::pin(events.filter(move |item| match item {
                    Ok(event) => low.changes_bucket(event),
                    Err(_) => true,
                }))
            }
        })
    }
}
