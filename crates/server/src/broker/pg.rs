//! The PostgreSQL broker: NOTIFY on the store's database, one LISTEN connection per node.
//! Notifications are lost while the listening connection is down; when it comes back
//! (sqlx's `PgListener` reconnects by itself and says so with `Ok(None)`; when it cannot,
//! the broker listens on a new connection, tried every second), the hub re-reads the store
//! for every room it serves. While it is down and could not be made again, `/readyz`
//! says so: the node would hear the other nodes only through its periodic reads.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::postgres::{PgListener, PgPool, PgPoolOptions};
use tokio_util::sync::CancellationToken;

use super::{wire, Broker, BrokerError, BusEvent};
use crate::hub::Hub;

/// The NOTIFY channel.
pub const CHANNEL: &str = "wschat_events";

/// NOTIFY payloads must stay under 8000 bytes.
const MAX_PAYLOAD: usize = 7900;

pub struct PgBroker {
    pool: PgPool,
    node: String,
    /// The LISTEN connection is up (false from its loss until a new one listens).
    listening: Arc<AtomicBool>,
}

impl PgBroker {
    pub async fn start(
        url: &str,
        node: &str,
        hub: Arc<Hub>,
        stop: CancellationToken,
    ) -> Result<Self, BrokerError> {
        let pool = PgPoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(5))
            .connect(url)
            .await?;
        // A pool of its own for the LISTEN connection: it holds that connection for good,
        // and when it is lost a new one is made, not a NOTIFY connection taken over (so
        // the state `/readyz` reports is the listener's own).
        let listen_pool = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(5))
            .connect(url)
            .await?;
        let mut listener = Some(listen(&listen_pool).await?);
        let listening = Arc::new(AtomicBool::new(true));
        let up = Arc::clone(&listening);
        let own = node.to_owned();
        tokio::spawn(async move {
            // `None` only between a failure and the next listener (see below).
            while let Some(current) = listener.as_mut() {
                let received = tokio::select! {
                    r = current.try_recv() => r,
                    _ = stop.cancelled() => break,
                };
                match received {
                    Ok(Some(notification)) => {
                        super::receive(&hub, &own, notification.payload().as_bytes());
                    }
                    Ok(None) => {
                        // The LISTEN connection was lost and sqlx has listened again on a
                        // new one: whatever was notified meanwhile is read from the store.
                        tracing::warn!(
                            "LISTEN connection lost; listening again and reading the store"
                        );
                        spawn_resync(&hub);
                    }
                    Err(e) => {
                        // sqlx would connect again silently at the next `try_recv`, and
                        // nothing would read the store until a notification came: listen
                        // again here, then read the store.
                        tracing::warn!(error = %e, "LISTEN failed; listening again");
                        up.store(false, Ordering::Release);
                        // The failed listener may still hold the pool's one connection
                        // (sqlx lets go of it only on some I/O errors): given back first.
                        drop(listener.take());
                        listener = listen_again(&listen_pool, &stop).await;
                        if listener.is_none() {
                            break;
                        }
                        up.store(true, Ordering::Release);
                        spawn_resync(&hub);
                    }
                }
            }
        });
        Ok(Self {
            pool,
            node: node.to_owned(),
            listening,
        })
    }
}

/// A connection of its own, listening on `CHANNEL`.
async fn listen(pool: &PgPool) -> Result<PgListener, sqlx::Error> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener.listen(CHANNEL).await?;
    Ok(listener)
}

/// A new LISTEN connection, tried every second until one listens; `None` on a stop.
async fn listen_again(pool: &PgPool, stop: &CancellationToken) -> Option<PgListener> {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = stop.cancelled() => return None,
        }
        let attempted = tokio::select! {
            a = listen(pool) => a,
            _ = stop.cancelled() => return None,
        };
        match attempted {
            Ok(listener) => return Some(listener),
            Err(e) => tracing::warn!(error = %e, "LISTEN failed again; retrying"),
        }
    }
}

fn spawn_resync(hub: &Arc<Hub>) {
    metrics::counter!("wschat_broker_reconnects_total").increment(1);
    let hub = hub.clone();
    tokio::spawn(async move { hub.resync().await });
}

#[async_trait]
impl Broker for PgBroker {
    fn name(&self) -> &'static str {
        "postgres"
    }

    async fn publish(&self, event: &BusEvent) -> Result<(), BrokerError> {
        self.publish_all(std::slice::from_ref(event)).await
    }

    async fn publish_all(&self, events: &[BusEvent]) -> Result<(), BrokerError> {
        // Each NOTIFY transaction is a commit (a WAL flush): one statement for the events,
        // and bells instead of payloads when they would not fit in one notification.
        let payloads: Vec<String> = events
            .iter()
            .flat_map(|event| wire::encode_compact(&self.node, event, MAX_PAYLOAD))
            .collect();
        sqlx::query(
            "SELECT pg_notify($1, p) FROM UNNEST($2::text[]) WITH ORDINALITY AS x(p, o) ORDER BY o",
        )
        .bind(CHANNEL)
        .bind(&payloads)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn ping(&self) -> Result<(), BrokerError> {
        if !self.listening.load(Ordering::Acquire) {
            return Err(BrokerError::Unreachable(
                "the LISTEN connection was lost; listening again".into(),
            ));
        }
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }
}
