//! The PostgreSQL broker: NOTIFY on the store's database, one LISTEN connection per node.
//! Notifications are lost while the listening connection is down; when it comes back
//! (sqlx's `PgListener` reconnects by itself and says so with `Ok(None)`; when it cannot,
//! the broker listens on a new connection, tried every second), the hub re-reads the store
//! for every room it serves. While it is down and could not be made again, `/readyz`
//! says so: the node would hear the other nodes only through its periodic reads.
//!
//! A LISTEN connection whose server is gone without closing it (a failover, a host lost,
//! a paused backend) would wait for good with nothing to tell: a node that has heard
//! nothing for `PROBE_EVERY` NOTIFYs `PROBE_CHANNEL`, which every node listens to, and a
//! listener that hears nothing at all for `DEAD_AFTER` is taken for lost.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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

/// The probes' channel (its payload is the probing node's id; only hearing it matters).
const PROBE_CHANNEL: &str = "wschat_probe";
/// A listener that heard nothing for this long is probed.
const PROBE_EVERY: Duration = Duration::from_secs(2);
/// A listener that heard nothing, probes included, for this long is lost.
const DEAD_AFTER: Duration = Duration::from_secs(7);

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
        let mut listener = Some(listen(url).await?);
        let listening = Arc::new(AtomicBool::new(true));
        let up = Arc::clone(&listening);
        let own = node.to_owned();
        let heard = Arc::new(Heard::default());
        let probing = Arc::clone(&heard);
        let url = url.to_owned();
        tokio::spawn(probe(pool.clone(), node.to_owned(), probing, stop.clone()));
        tokio::spawn(async move {
            // `None` only between a failure and the next listener (see below).
            while let Some(current) = listener.as_mut() {
                let received = tokio::select! {
                    r = current.try_recv() => r,
                    // Not even a probe: the connection is gone without saying so.
                    _ = tokio::time::sleep(DEAD_AFTER) => Err(sqlx::Error::Io(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("nothing heard for {DEAD_AFTER:?}, probes included"),
                    ))),
                    _ = stop.cancelled() => break,
                };
                match received {
                    Ok(Some(notification)) => {
                        heard.now();
                        if notification.channel() != PROBE_CHANNEL {
                            super::receive(&hub, &own, notification.payload().as_bytes());
                        }
                    }
                    Ok(None) => {
                        // The LISTEN connection was lost and sqlx has listened again on a
                        // new one: whatever was notified meanwhile is read from the store.
                        tracing::warn!(
                            "LISTEN connection lost; listening again and reading the store"
                        );
                        heard.now();
                        spawn_resync(&hub);
                    }
                    Err(e) => {
                        // sqlx would connect again silently at the next `try_recv`, and
                        // nothing would read the store until a notification came: listen
                        // again here, then read the store.
                        tracing::warn!(error = %e, "LISTEN failed; listening again");
                        up.store(false, Ordering::Release);
                        // Its connection's pool is its own: a connection that never
                        // answers again (its UNLISTEN at drop would wait for good) keeps
                        // no new listener from connecting.
                        drop(listener.take());
                        listener = listen_again(&url, &stop).await;
                        if listener.is_none() {
                            break;
                        }
                        heard.now();
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

/// When the listener last heard anything (ms since `start`).
struct Heard {
    start: tokio::time::Instant,
    at_ms: AtomicU64,
}

impl Default for Heard {
    fn default() -> Self {
        Self {
            start: tokio::time::Instant::now(),
            at_ms: AtomicU64::new(0),
        }
    }
}

impl Heard {
    fn now(&self) {
        self.at_ms
            .store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn silence(&self) -> Duration {
        self.start
            .elapsed()
            .saturating_sub(Duration::from_millis(self.at_ms.load(Ordering::Relaxed)))
    }
}

/// NOTIFY `PROBE_CHANNEL` whenever the listener has heard nothing for `PROBE_EVERY`: a
/// live LISTEN connection hears it (or another node's) within `DEAD_AFTER`.
async fn probe(pool: PgPool, node: String, heard: Arc<Heard>, stop: CancellationToken) {
    let mut every = tokio::time::interval(PROBE_EVERY);
    loop {
        tokio::select! {
            _ = every.tick() => {}
            _ = stop.cancelled() => return,
        }
        if heard.silence() < PROBE_EVERY {
            continue;
        }
        let probe = sqlx::query("SELECT pg_notify($1, $2)")
            .bind(PROBE_CHANNEL)
            .bind(&node)
            .execute(&pool);
        // A probe that fails or hangs is a silence that grows: the listener decides.
        match tokio::time::timeout(PROBE_EVERY, probe).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::debug!(error = %e, "LISTEN probe not sent"),
            Err(_) => tracing::debug!("LISTEN probe not sent in time"),
        }
    }
}

/// A connection of its own (in a pool of its own), listening on `CHANNEL` and
/// `PROBE_CHANNEL`.
async fn listen(url: &str) -> Result<PgListener, sqlx::Error> {
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(5))
        .connect(url)
        .await?;
    let mut listener = PgListener::connect_with(&pool).await?;
    listener.listen_all([CHANNEL, PROBE_CHANNEL]).await?;
    Ok(listener)
}

/// A new LISTEN connection, tried every second until one listens; `None` on a stop.
async fn listen_again(url: &str, stop: &CancellationToken) -> Option<PgListener> {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = stop.cancelled() => return None,
        }
        // A server that accepts and then never answers: the attempt ends, another follows.
        let attempt = tokio::time::timeout(DEAD_AFTER, listen(url));
        let attempted = tokio::select! {
            a = attempt => a.unwrap_or_else(|_| Err(sqlx::Error::PoolTimedOut)),
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
