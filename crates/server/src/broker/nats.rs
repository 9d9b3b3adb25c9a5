//! The NATS broker: every node publishes to and subscribes to one subject. Core NATS is
//! at-most-once, which is all a doorbell needs: the client reconnects and resubscribes by
//! itself, and after each reconnect the hub re-reads the store for every room it serves.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::stream::BoxStream;
use futures_util::{FutureExt, StreamExt};
use tokio_util::sync::CancellationToken;

use super::{wire, Broker, BrokerError, BusEvent};
use crate::hub::Hub;

/// NATS refuses payloads over its max_payload (1 MiB by default); stay well below.
const MAX_PAYLOAD: usize = 256 * 1024;

/// How long a flush may take before the store is read anyway (after a connect or a new
/// subscription).
const FLUSH_WAIT: Duration = Duration::from_secs(5);

/// The wait before subscribing again after an attempt failed.
const RESUBSCRIBE_WAIT: Duration = Duration::from_secs(1);

pub struct NatsBroker {
    client: async_nats::Client,
    subject: String,
    node: String,
    /// False while the subscription is lost and being made again (the node is not ready).
    subscribed: Arc<AtomicBool>,
}

/// The payloads of the subject's messages.
type Payloads = BoxStream<'static, Bytes>;

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
        // The first `Connected` is the start's own connect, not a reconnect.
        let connects = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let client = async_nats::ConnectOptions::new()
            .subscription_capacity(65_536)
            .event_callback(move |event| {
                let hub = on_event.clone();
                let connected = connected_tx.clone();
                let connects = Arc::clone(&connects);
                async move {
                    match event {
                        async_nats::Event::Connected => {
                            if connects.fetch_add(1, Ordering::Relaxed) > 0 {
                                metrics::counter!("wschat_broker_reconnects_total").increment(1);
                            }
                            tracing::info!("NATS connected: reading the store for missed messages");
                            let _ended_with_the_node = connected.send(());
                        }
                        async_nats::Event::Disconnected => tracing::warn!("NATS disconnected"),
                        async_nats::Event::SlowConsumer(_) => {
                            tracing::warn!("NATS slow consumer: reading the store");
                            tokio::spawn(async move { hub.resync().await });
                        }
                        // A refused subscription or publish (permissions): no error reaches
                        // the subscription's stream, which only goes quiet.
                        async_nats::Event::ServerError(e) => {
                            tracing::warn!(error = %e, "NATS server error")
                        }
                        async_nats::Event::ClientError(e) => {
                            tracing::warn!(error = %e, "NATS client error")
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
        let mut subscribe = subscriber(client.clone(), subject.to_owned());
        let first = subscribe().await.map_err(|reason| BrokerError::Nats {
            url: url.to_owned(),
            reason,
        })?;
        tokio::spawn(resync_when_subscribed(
            client.clone(),
            hub.clone(),
            connected_rx,
            stop.clone(),
        ));
        let subscribed = Arc::new(AtomicBool::new(true));
        tokio::spawn(receive_loop(
            first,
            subscribe,
            hub,
            node.to_owned(),
            Arc::clone(&subscribed),
            stop,
        ));
        Ok(Self {
            client,
            subject: subject.to_owned(),
            node: node.to_owned(),
            subscribed,
        })
    }
}

/// Subscribe to `subject`, as often as called: the subscription's payloads, once the
/// server has it (`flushed`), so that a read of the store after it misses nothing.
fn subscriber(
    client: async_nats::Client,
    subject: String,
) -> impl FnMut() -> BoxFuture<'static, Result<Payloads, String>> {
    move || {
        let (client, subject) = (client.clone(), subject.clone());
        async move {
            let subscriber = client.subscribe(subject).await.map_err(|e| e.to_string())?;
            flushed(&client, "a subscription").await;
            Ok(subscriber.map(|m| m.payload).boxed())
        }
        .boxed()
    }
}

/// Wait (at most `FLUSH_WAIT`) until the server has taken everything this client sent
/// before, its subscriptions included: a flush is answered only then.
async fn flushed(client: &async_nats::Client, after: &str) {
    match tokio::time::timeout(FLUSH_WAIT, client.flush()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::debug!(error = %e, after, "NATS flush failed; reading the store anyway")
        }
        Err(_) => tracing::debug!(after, "NATS flush timed out; reading the store anyway"),
    }
}

/// Hand the subject's messages to the hub while the node runs. Should the subscription's
/// stream end (the client closed it, or the server dropped the subscription), the node
/// would hear no other node again and say nothing: it says so, counts it, is not ready
/// (`ping` fails) until `subscribe` has made the subscription again (tried every
/// `RESUBSCRIBE_WAIT`), then reads the store for what it missed. A message the hub
/// cannot handle (a bug's panic) is skipped, not the end of the loop.
async fn receive_loop<F>(
    mut payloads: Payloads,
    mut subscribe: F,
    hub: Arc<Hub>,
    own: String,
    subscribed: Arc<AtomicBool>,
    stop: CancellationToken,
) where
    F: FnMut() -> BoxFuture<'static, Result<Payloads, String>>,
{
    loop {
        let payload = tokio::select! {
            p = payloads.next() => p,
            _ = stop.cancelled() => return,
        };
        if let Some(payload) = payload {
            super::receive(&hub, &own, &payload);
            continue;
        }
        subscribed.store(false, Ordering::Release);
        metrics::counter!("wschat_broker_subscription_ends_total").increment(1);
        tracing::error!("the NATS subscription ended; subscribing again");
        payloads = loop {
            match subscribe().await {
                Ok(payloads) => break payloads,
                Err(e) => tracing::warn!(error = %e, "NATS subscribe failed; retrying"),
            }
            tokio::select! {
                _ = tokio::time::sleep(RESUBSCRIBE_WAIT) => {}
                _ = stop.cancelled() => return,
            }
        };
        subscribed.store(true, Ordering::Release);
        tracing::info!("NATS subscribed again: reading the store for missed messages");
        // Not awaited: a resync runs as long as more are asked meanwhile (a slow database,
        // the heartbeat's), and the subscription must be read all the while.
        tokio::spawn(hub.clone().resync());
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
    loop {
        tokio::select! {
            told = connected.recv() => if told.is_none() { return },
            _ = stop.cancelled() => return,
        }
        // Several connects told at once need one read.
        while connected.try_recv().is_ok() {}
        flushed(&client, "a connect").await;
        tokio::spawn(hub.clone().resync());
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
        if !self.subscribed.load(Ordering::Acquire) {
            return Err(BrokerError::Unreachable(
                "NATS subscription lost; subscribing again".into(),
            ));
        }
        match self.client.connection_state() {
            async_nats::connection::State::Connected => Ok(()),
            state => Err(BrokerError::Unreachable(format!("NATS {state}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::tests::{one_member, read_for, OneMember};
    use crate::store::commit_unheard;

    /// A subscription whose stream ends is made again (the node not ready meanwhile, a
    /// failed attempt retried), then the store is read for what the node missed.
    #[tokio::test]
    async fn a_subscription_that_ends_is_made_again_then_the_store_is_read() {
        let OneMember {
            _dir,
            hub,
            store,
            room,
            mut client,
            ..
        } = one_member().await;
        let subscribed = Arc::new(AtomicBool::new(true));
        let (attempted, mut attempts) = tokio::sync::mpsc::unbounded_channel();
        let watched = Arc::clone(&subscribed);
        let mut made = 0;
        let subscribe = move || -> BoxFuture<'static, Result<Payloads, String>> {
            made += 1;
            let _ = attempted.send((made, watched.load(Ordering::Acquire)));
            // The first attempt fails; the second's subscription stays open.
            let answer = match made {
                1 => Err("refused".to_owned()),
                _ => Ok(futures_util::stream::pending().boxed()),
            };
            async move { answer }.boxed()
        };
        // What another node committed while this one heard nothing.
        commit_unheard(store.as_ref(), &room, 2).await;
        let stop = CancellationToken::new();
        let ended: Payloads = futures_util::stream::empty().boxed();
        let receiving = tokio::spawn(receive_loop(
            ended,
            subscribe,
            hub,
            "this".into(),
            Arc::clone(&subscribed),
            stop.clone(),
        ));
        let got = read_for(&mut client, "text-02").await;
        assert!(got.contains("text-01") && got.contains("text-02"), "{got}");
        assert_eq!(
            attempts.recv().await,
            Some((1, false)),
            "not ready while lost"
        );
        assert_eq!(attempts.recv().await, Some((2, false)));
        assert!(subscribed.load(Ordering::Acquire), "ready again");
        stop.cancel();
        receiving.await.unwrap();
        assert!(attempts.try_recv().is_err(), "no more attempts");
    }
}
