//! The NATS broker: every node publishes to and subscribes to one subject. Core NATS is
//! at-most-once, which is all a doorbell needs: the client reconnects and resubscribes by
//! itself, and after each reconnect the hub re-reads the store for every room it serves.

use std::sync::Arc;

use async_trait::async_trait;
use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;

use super::{wire, Broker, BrokerError, BusEvent};
use crate::hub::Hub;

/// NATS refuses payloads over its max_payload (1 MiB by default); stay well below.
const MAX_PAYLOAD: usize = 256 * 1024;

pub struct NatsBroker {
    client: async_nats::Client,
    subject: String,
    node: String,
}

impl NatsBroker {
    pub async fn start(
        url: &str,
        subject: &str,
        node: &str,
        hub: Arc<Hub>,
        stop: CancellationToken,
    ) -> Result<Self, BrokerError> {
        let on_event = hub.clone();
        // Told of each (re)connect; the store is read once the subscription is back.
        let (connected_tx, connected_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
        let client = async_nats::ConnectOptions::new()
            .subscription_capacity(65_536)
            .event_callback(move |event| {
                let hub = on_event.clone();
                let connected = connected_tx.clone();
                async move {
                    match event {
                        async_nats::Event::Connected => {
                            metrics::counter!("wschat_broker_reconnects_total").increment(1);
                            tracing::info!("NATS connected: reading the store for missed messages");
                            let _ended_with_the_node = connected.send(());
                        }
                        async_nats::Event::Disconnected => tracing::warn!("NATS disconnected"),
                        async_nats::Event::SlowConsumer(_) => {
                            tracing::warn!("NATS slow consumer: reading the store");
                            tokio::spawn(async move { hub.resync().await });
                        }
                        other => tracing::debug!(event = %other, "NATS event"),
                    }
                }
            })
            .connect(url)
            .await
            .map_err(|e| BrokerError::Nats {
                url: url.to_owned(),
                reason: e.to_string(),
            })?;
        let mut subscriber =
            client
                .subscribe(subject.to_owned())
                .await
                .map_err(|e| BrokerError::Nats {
                    url: url.to_owned(),
                    reason: e.to_string(),
                })?;
        tokio::spawn(resync_when_subscribed(
            client.clone(),
            hub.clone(),
            connected_rx,
            stop.clone(),
        ));
        let own = node.to_owned();
        tokio::spawn(async move {
            loop {
                let message = tokio::select! {
                    m = subscriber.next() => m,
                    _ = stop.cancelled() => None,
                };
                let Some(message) = message else { break };
                super::receive(&hub, &own, &message.payload);
            }
        });
        Ok(Self {
            client,
            subject: subject.to_owned(),
            node: node.to_owned(),
        })
    }
}

/// After each (re)connect, read the store for what the other nodes rang meanwhile, once
/// the subscription is in place again: the client tells of the connect before it sends
/// its subscriptions again, so a read at once could miss a message rung between the read
/// and the subscription (until the next bell of that room, or the heartbeat's read). A
/// flush is answered after the server has taken everything sent before it, those
/// subscriptions included.
async fn resync_when_subscribed(
    client: async_nats::Client,
    hub: Arc<Hub>,
    mut connected: tokio::sync::mpsc::UnboundedReceiver<()>,
    stop: CancellationToken,
) {
    const FLUSH_WAIT: std::time::Duration = std::time::Duration::from_secs(5);
    loop {
        tokio::select! {
            told = connected.recv() => if told.is_none() { return },
            _ = stop.cancelled() => return,
        }
        // Several connects told at once need one read.
        while connected.try_recv().is_ok() {}
        match tokio::time::timeout(FLUSH_WAIT, client.flush()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "NATS flush after a connect failed; reading the store anyway")
            }
            Err(_) => {
                tracing::debug!("NATS flush after a connect timed out; reading the store anyway")
            }
        }
        hub.clone().resync().await;
    }
}

#[async_trait]
impl Broker for NatsBroker {
    fn name(&self) -> &'static str {
        "nats"
    }

    async fn publish(&self, event: &BusEvent) -> Result<(), BrokerError> {
        for payload in wire::encode(&self.node, event, MAX_PAYLOAD) {
            self.client
                .publish(self.subject.clone(), payload.into())
                .await
                .map_err(|e| BrokerError::NatsPublish(e.to_string()))?;
        }
        Ok(())
    }

    async fn flush(&self) -> Result<(), BrokerError> {
        self.client
            .flush()
            .await
            .map_err(|e| BrokerError::NatsFlush(e.to_string()))
    }

    async fn ping(&self) -> Result<(), BrokerError> {
        match self.client.connection_state() {
            async_nats::connection::State::Connected => Ok(()),
            state => Err(BrokerError::Unreachable(format!("NATS {state}"))),
        }
    }
}
