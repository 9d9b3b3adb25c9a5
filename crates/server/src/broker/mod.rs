//! Fan-out between nodes: the broker carries "these messages were committed" (and typing
//! notices) to every node's hub. It is a doorbell, not the log: a node that misses a bell
//! finds the gap by seq and reads the store.
//!
//! `local` is the in-process broker of a single node.

use std::sync::Arc;

use async_trait::async_trait;
use wschat_protocol::RoomName;

use crate::hub::Hub;
use crate::store::StoredMessage;

/// What travels between nodes.
#[derive(Debug, Clone)]
pub enum BusEvent {
    /// Messages committed, each room's in seq order.
    Committed(Vec<Arc<StoredMessage>>),
    /// Someone is typing; `origin` is the connection it came from (not echoed to it).
    Typing {
        room: RoomName,
        user: String,
        origin: Option<u64>,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("unsupported broker {0:?}; use \"local\"")]
    Unsupported(String),
}

#[async_trait]
pub trait Broker: Send + Sync + 'static {
    fn name(&self) -> &'static str;

    /// Ring the bell on every node, this one included.
    async fn publish(&self, event: BusEvent) -> Result<(), BrokerError>;
}

/// One node: events go straight to this node's hub.
pub struct LocalBroker {
    hub: Arc<Hub>,
}

impl LocalBroker {
    pub fn new(hub: Arc<Hub>) -> Self {
        Self { hub }
    }
}

#[async_trait]
impl Broker for LocalBroker {
    fn name(&self) -> &'static str {
        "local"
    }

    async fn publish(&self, event: BusEvent) -> Result<(), BrokerError> {
        match event {
            BusEvent::Committed(messages) => self.hub.deliver(&messages),
            BusEvent::Typing { room, user, origin } => self.hub.typing(&room, &user, origin),
        }
        Ok(())
    }
}

/// The broker a `--broker` value names.
pub fn open(url: &str, hub: Arc<Hub>) -> Result<Arc<dyn Broker>, BrokerError> {
    match url {
        "local" => Ok(Arc::new(LocalBroker::new(hub))),
        other => Err(BrokerError::Unsupported(other.to_owned())),
    }
}
