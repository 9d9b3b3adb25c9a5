//! Fan-out between nodes. The broker is a doorbell, not the log: it carries "these
//! messages were committed" (with their payload when small, else only room and seq),
//! typing notices and presence snapshots to the other nodes. A node that misses a bell
//! finds out by seq (or by its periodic check, or because its broker connection came
//! back) and reads the store.
//!
//! - `local`: one node; nothing leaves the process.
//! - `nats://…`: core NATS (at-most-once is all a doorbell needs).
//! - `postgres`: LISTEN/NOTIFY on the store's own database.

mod nats;
mod pg;
pub mod wire;

use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use wschat_protocol::RoomName;

use crate::hub::Hub;
use crate::store::StoredMessage;

/// What this node tells the others.
#[derive(Debug, Clone)]
pub enum BusEvent {
    /// Messages committed by this node, each room's in seq order.
    Committed(Vec<Arc<StoredMessage>>),
    /// Someone on this node is typing in a room.
    Typing { room: RoomName, user: String },
    /// The users connected to this node who are in a room (a full snapshot).
    Presence { room: RoomName, users: Vec<String> },
    /// "Tell me who you have in this room" (sent when a room first gets a local member).
    PresenceQuery { room: RoomName },
}

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("unknown broker {0:?}: use local, postgres, or nats://HOST:PORT")]
    Unsupported(String),
    #[error("the postgres broker needs a PostgreSQL database")]
    NeedsPostgres,
    #[error("cannot connect to NATS at {url}: {reason}")]
    Nats { url: String, reason: String },
    #[error("NATS publish failed: {0}")]
    NatsPublish(String),
    #[error("NATS flush failed: {0}")]
    NatsFlush(String),
    #[error("PostgreSQL broker: {0}")]
    Postgres(#[from] sqlx::Error),
    #[error("broker unreachable: {0}")]
    Unreachable(String),
}

#[async_trait]
pub trait Broker: Send + Sync + 'static {
    /// `local`, `nats` or `postgres`.
    fn name(&self) -> &'static str;

    /// Ring the bell on the other nodes.
    async fn publish(&self, event: &BusEvent) -> Result<(), BrokerError>;

    /// Publish several events (typing and presence queued together), in order: one
    /// NOTIFY statement on PostgreSQL, where each statement is a commit of its own.
    async fn publish_all(&self, events: &[BusEvent]) -> Result<(), BrokerError> {
        // Each tried, as each was before they were batched; the first failure is told.
        let mut failed = Ok(());
        for event in events {
            if let Err(e) = self.publish(event).await {
                if failed.is_ok() {
                    failed = Err(e);
                }
            }
        }
        failed
    }

    /// Whether the other nodes can be reached now (`/readyz`). `local`: always.
    async fn ping(&self) -> Result<(), BrokerError> {
        Ok(())
    }

    /// Hand over everything published so far before the process may exit (NATS buffers
    /// publishes; a NOTIFY is sent when `publish` returns).
    async fn flush(&self) -> Result<(), BrokerError> {
        Ok(())
    }
}

/// One node: nothing to tell anyone.
pub struct LocalBroker;

#[async_trait]
impl Broker for LocalBroker {
    fn name(&self) -> &'static str {
        "local"
    }

    async fn publish(&self, _event: &BusEvent) -> Result<(), BrokerError> {
        Ok(())
    }
}

/// Which broker a `--broker` value names, given the database URL (`auto` is `local` on
/// SQLite and `postgres` on PostgreSQL).
pub fn kind(broker: &str, database: &str) -> &'static str {
    let on_postgres = database.starts_with("postgres");
    match broker {
        "auto" if on_postgres => "postgres",
        "auto" | "local" => "local",
        "postgres" => "postgres",
        url if url.starts_with("nats://") || url.starts_with("tls://") => "nats",
        _ => "unknown",
    }
}

/// What rules out `broker` on `database` before anything is opened: an unknown broker,
/// or a multi-node one on SQLite, which serves one node only (`config check` and the
/// start both ask).
pub fn setup_problem(broker: &str, database: &str) -> Option<&'static str> {
    match kind(broker, database) {
        "unknown" => Some("unknown broker: use auto, local, postgres, or nats://HOST:PORT"),
        "local" => None,
        _ if !crate::store::is_postgres(database) => Some(
            "the SQLite store serves one node only: a multi-node broker needs a PostgreSQL database (or use --broker local)",
        ),
        _ => None,
    }
}

/// Connect the broker, and start the task that hands other nodes' events to the hub.
pub async fn open(
    broker: &str,
    database: &str,
    nats_subject: &str,
    node: &str,
    hub: Arc<Hub>,
    stop: CancellationToken,
) -> Result<Arc<dyn Broker>, BrokerError> {
    match kind(broker, database) {
        "local" => Ok(Arc::new(LocalBroker)),
        "postgres" if database.starts_with("postgres") => Ok(Arc::new(
            pg::PgBroker::start(database, node, hub, stop).await?,
        )),
        "postgres" => Err(BrokerError::NeedsPostgres),
        "nats" => Ok(Arc::new(
            nats::NatsBroker::start(broker, nats_subject, node, hub, stop).await?,
        )),
        _ => Err(BrokerError::Unsupported(broker.to_owned())),
    }
}

/// Most events for the other nodes waiting for the forwarder in each of its two queues (a
/// commit's messages are one event, and commits queued together are published as one);
/// past it the hub drops them.
pub const QUEUE_EVENTS: usize = 4096;

/// Most typing and presence events waiting (a heartbeat's presence refresh is queued at the
/// rate this takes: `Hub::tell_changed_presence`).
pub const QUEUE_CHATTER: usize = 16_384;

/// Most typing and presence events the forwarder publishes together (`publish_all`).
const CHATTER_BATCH: usize = 512;

/// The hub's side of the queues to the other nodes. Commits have a queue of their own, and
/// the forwarder takes them first: typing notices and presence, dropped first when the
/// broker does not keep up, never crowd a commit's bell out.
#[derive(Clone, Debug)]
pub struct ToOthers {
    commits: mpsc::Sender<BusEvent>,
    chatter: mpsc::Sender<BusEvent>,
}

/// The forwarder's side of those queues.
#[derive(Debug)]
pub struct FromHub {
    pub(crate) commits: mpsc::Receiver<BusEvent>,
    pub(crate) chatter: mpsc::Receiver<BusEvent>,
}

/// The two queues: `QUEUE_EVENTS` commits, `QUEUE_CHATTER` typing and presence events.
pub fn queues() -> (ToOthers, FromHub) {
    let (commits, commits_rx) = mpsc::channel(QUEUE_EVENTS);
    let (chatter, chatter_rx) = mpsc::channel(QUEUE_CHATTER);
    (
        ToOthers { commits, chatter },
        FromHub {
            commits: commits_rx,
            chatter: chatter_rx,
        },
    )
}

impl ToOthers {
    /// Queue `event` on its queue; a full one hands it back.
    pub(crate) fn try_send(
        &self,
        event: BusEvent,
    ) -> Result<(), mpsc::error::TrySendError<BusEvent>> {
        match event {
            BusEvent::Committed(_) => self.commits.try_send(event),
            _ => self.chatter.try_send(event),
        }
    }
}

/// How long a stopping node waits for the broker to take its last events.
const LAST_FLUSH: std::time::Duration = std::time::Duration::from_secs(1);

/// Longest one publish may take. A NOTIFY on a connection whose server is gone without
/// closing it (a failover, a host lost) would never return, and the forwarder, which
/// publishes one at a time, would publish nothing more: this node's presence would expire
/// on the others for good. Past it the publish counts as failed (the other nodes find
/// commits by seq and by their periodic read of the store).
const PUBLISH_BOUND: std::time::Duration = std::time::Duration::from_secs(5);

/// Publish what the hub and the committer queue, in order, until `stop`; then what was
/// queued by then, so that a node stopping gracefully still tells the others its last
/// commits and that its users left (the caller bounds how long that may take).
pub fn forward(
    broker: Arc<dyn Broker>,
    mut from: FromHub,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            // Commits first; queued events before the stop: a stop does not drop what
            // waits beside it.
            tokio::select! {
                biased;
                Some(event) = from.commits.recv() => {
                    publish_merged(broker.as_ref(), event, &mut from.commits).await;
                    // Commits that keep coming during each publish (a NOTIFY is a commit
                    // of its own) must not starve typing and presence for good: what of
                    // those waits goes after each commit.
                    if let Ok(event) = from.chatter.try_recv() {
                        publish_chatter(broker.as_ref(), event, &mut from.chatter).await;
                    }
                }
                Some(event) = from.chatter.recv() => {
                    publish_chatter(broker.as_ref(), event, &mut from.chatter).await;
                }
                _ = stop.cancelled() => break,
            }
        }
        while let Ok(event) = from.commits.try_recv() {
            publish_merged(broker.as_ref(), event, &mut from.commits).await;
        }
        while let Ok(event) = from.chatter.try_recv() {
            publish_chatter(broker.as_ref(), event, &mut from.chatter).await;
        }
        // A broker that is down does not hold the stop up for long.
        match tokio::time::timeout(LAST_FLUSH, broker.flush()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "the last events for the other nodes may not have left");
            }
            Err(_) => tracing::warn!("the broker did not take the last events in time"),
        }
    })
}

/// Publish the commit `event` with the commits queued behind it, as one event (in commit
/// order, so each room's seqs still rise).
async fn publish_merged(
    broker: &dyn Broker,
    mut event: BusEvent,
    commits: &mut mpsc::Receiver<BusEvent>,
) {
    if let BusEvent::Committed(messages) = &mut event {
        while let Ok(more) = commits.try_recv() {
            if let BusEvent::Committed(more) = more {
                messages.extend(more);
            }
        }
    }
    // Other nodes find the gap by seq or by their periodic check.
    published(broker.publish(&event)).await;
}

/// Await `publish` for `PUBLISH_BOUND` at most; a failure is counted and logged.
async fn published(publish: impl std::future::Future<Output = Result<(), BrokerError>>) {
    let failure = match tokio::time::timeout(PUBLISH_BOUND, publish).await {
        Ok(Ok(())) => return,
        Ok(Err(e)) => e.to_string(),
        Err(_) => format!("no answer within {PUBLISH_BOUND:?}"),
    };
    metrics::counter!("wschat_broker_publish_errors_total").increment(1);
    tracing::warn!(error = %failure, "broker publish failed");
}

/// Publish `event` and the typing and presence events queued behind it, up to
/// `CHATTER_BATCH`, together.
async fn publish_chatter(
    broker: &dyn Broker,
    event: BusEvent,
    chatter: &mut mpsc::Receiver<BusEvent>,
) {
    let mut events = vec![event];
    while events.len() < CHATTER_BATCH {
        match chatter.try_recv() {
            Ok(event) => events.push(event),
            Err(_) => break,
        }
    }
    let events = newest_presence_only(events);
    published(broker.publish_all(&events)).await;
}

/// Of a batch, each room's newest presence list only (a list is whole: the older ones say
/// nothing it does not). PostgreSQL delivers one copy of identical notifications sent in
/// one transaction, the first: a room's lists A, B, A in one batch would reach the other
/// nodes as A, B, and leave them at B.
fn newest_presence_only(events: Vec<BusEvent>) -> Vec<BusEvent> {
    let mut seen = std::collections::HashSet::new();
    let mut kept: Vec<BusEvent> = events
        .into_iter()
        .rev()
        .filter(|event| match event {
            BusEvent::Presence { room, .. } => seen.insert(room.clone()),
            _ => true,
        })
        .collect();
    kept.reverse();
    kept
}

/// Hand one envelope from another node to the hub; answer presence queries.
pub(crate) fn receive(hub: &Arc<Hub>, own_node: &str, payload: &[u8]) {
    let Ok(envelope) = serde_json::from_slice::<wire::Envelope>(payload) else {
        tracing::warn!(bytes = payload.len(), "undecodable broker message ignored");
        return;
    };
    if envelope.node == own_node {
        return;
    }
    // A panic here (a bug) would end the broker's receiving task, and the node would hear
    // no other node again: the message is skipped instead.
    let handled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        hub.on_remote(&envelope.node, envelope.body);
    }));
    if handled.is_err() {
        tracing::error!("a message from another node could not be handled (a bug); skipped");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;

    /// A broker whose every commit publish sees another commit queued meanwhile (a
    /// steady stream, as under load), for `rounds` publishes.
    struct Busy {
        to: ToOthers,
        rounds: Mutex<u32>,
        published: Mutex<Vec<&'static str>>,
    }

    #[async_trait]
    impl Broker for Busy {
        fn name(&self) -> &'static str {
            "busy"
        }
        async fn publish(&self, event: &BusEvent) -> Result<(), BrokerError> {
            let kind = match event {
                BusEvent::Committed(_) => "commit",
                _ => "presence",
            };
            self.published.lock().unwrap().push(kind);
            let more = {
                let mut rounds = self.rounds.lock().unwrap();
                *rounds = rounds.saturating_sub(1);
                *rounds > 0
            };
            if more && kind == "commit" {
                let _ = self.to.try_send(BusEvent::Committed(Vec::new()));
            }
            Ok(())
        }
    }

    /// A broker that records the size of each `publish_all`.
    #[derive(Default)]
    struct Batches(Mutex<Vec<usize>>);

    #[async_trait]
    impl Broker for Batches {
        fn name(&self) -> &'static str {
            "batches"
        }
        async fn publish(&self, _event: &BusEvent) -> Result<(), BrokerError> {
            self.0.lock().unwrap().push(1);
            Ok(())
        }
        async fn publish_all(&self, events: &[BusEvent]) -> Result<(), BrokerError> {
            self.0.lock().unwrap().push(events.len());
            Ok(())
        }
    }

    /// A broker whose first `publish_all` never answers (a NOTIFY on a connection whose
    /// server is gone); it records the rooms of the later ones.
    #[derive(Default)]
    struct StuckOnce {
        calls: AtomicUsize,
        rooms: Mutex<Vec<String>>,
    }

    #[async_trait]
    impl Broker for StuckOnce {
        fn name(&self) -> &'static str {
            "stuck once"
        }
        async fn publish(&self, event: &BusEvent) -> Result<(), BrokerError> {
            self.publish_all(std::slice::from_ref(event)).await
        }
        async fn publish_all(&self, events: &[BusEvent]) -> Result<(), BrokerError> {
            if self.calls.fetch_add(1, Ordering::AcqRel) == 0 {
                std::future::pending::<()>().await;
            }
            for event in events {
                if let BusEvent::Presence { room, .. } = event {
                    self.rooms.lock().unwrap().push(room.to_string());
                }
            }
            Ok(())
        }
    }

    /// A publish that never answers ends at the bound: what is queued after it goes out.
    /// (The clock is paused: it runs on to the bound when nothing else can.)
    #[tokio::test(start_paused = true)]
    async fn a_publish_that_never_answers_does_not_stop_the_ones_after_it() {
        let (to, from) = queues();
        let broker = Arc::new(StuckOnce::default());
        let stop = CancellationToken::new();
        let forwarder = forward(broker.clone(), from, stop.clone());
        let presence = |room: &str| BusEvent::Presence {
            room: RoomName::new(room).unwrap(),
            users: vec!["ada".into()],
        };
        to.try_send(presence("stuck")).expect("queued");
        while broker.calls.load(Ordering::Acquire) == 0 {
            tokio::task::yield_now().await;
        }
        to.try_send(presence("after")).expect("queued");
        tokio::time::timeout(PUBLISH_BOUND * 4, async {
            while broker.rooms.lock().unwrap().is_empty() {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("the next publish went out");
        assert_eq!(*broker.rooms.lock().unwrap(), ["after"]);
        stop.cancel();
        forwarder.await.unwrap();
    }

    /// A heartbeat's presence refresh (one event per room) is queued whole and goes out
    /// in batches, not one NOTIFY transaction per room.
    #[tokio::test]
    async fn a_presence_refresh_of_many_rooms_goes_out_in_batches() {
        let (to, from) = queues();
        let rooms = 10_000;
        for i in 0..rooms {
            to.try_send(BusEvent::Presence {
                room: RoomName::new(format!("r{i}")).unwrap(),
                users: vec!["ada".into()],
            })
            .expect("queued");
        }
        // A room's list again, twice (a join and a leave since), both in the last batch:
        // that batch carries one of them, the newest.
        for users in [
            vec!["ada".to_owned(), "bob".to_owned()],
            vec!["ada".to_owned()],
        ] {
            to.try_send(BusEvent::Presence {
                room: RoomName::new("r1").unwrap(),
                users,
            })
            .expect("queued");
        }
        let broker = Arc::new(Batches::default());
        let stop = CancellationToken::new();
        stop.cancel();
        forward(broker.clone(), from, stop).await.unwrap();
        let batches = broker.0.lock().unwrap().clone();
        assert_eq!(batches.iter().sum::<usize>(), rooms + 1, "{batches:?}");
        // Hundreds of events a publish, not one.
        assert!(batches.len() * 100 <= rooms, "{} publishes", batches.len());
    }

    /// A batch carries each room's newest presence list only: PostgreSQL would deliver
    /// a repeated list once, and a room's A, B, A would leave the other nodes at B.
    #[test]
    fn a_batch_keeps_each_rooms_newest_presence_only() {
        let presence = |room: &str, users: &[&str]| BusEvent::Presence {
            room: RoomName::new(room).unwrap(),
            users: users.iter().map(|u| u.to_string()).collect(),
        };
        let typing = BusEvent::Typing {
            room: RoomName::new("r").unwrap(),
            user: "bob".into(),
        };
        let kept = newest_presence_only(vec![
            presence("r", &["ada"]),
            presence("q", &["cy"]),
            presence("r", &["ada", "bob"]),
            typing,
            presence("r", &["ada"]),
        ]);
        let shown: Vec<String> = kept
            .iter()
            .map(|e| match e {
                BusEvent::Presence { room, users } => format!("{room}:{}", users.join(",")),
                BusEvent::Typing { user, .. } => format!("typing:{user}"),
                _ => "other".into(),
            })
            .collect();
        assert_eq!(shown, ["q:cy", "typing:bob", "r:ada"]);
    }

    /// Commits go first, but a steady stream of them does not keep a presence event
    /// waiting for good: it goes after the next commit.
    #[tokio::test]
    async fn commits_that_keep_coming_do_not_starve_presence() {
        let (to, from) = queues();
        let busy = Arc::new(Busy {
            to: to.clone(),
            rounds: Mutex::new(50),
            published: Mutex::new(Vec::new()),
        });
        to.try_send(BusEvent::Committed(Vec::new())).unwrap();
        to.try_send(BusEvent::Presence {
            room: RoomName::new("r").unwrap(),
            users: vec!["ada".into()],
        })
        .unwrap();
        let stop = CancellationToken::new();
        let forwarder = forward(busy.clone(), from, stop.clone());
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        stop.cancel();
        forwarder.await.unwrap();
        let published = busy.published.lock().unwrap().clone();
        let at = published.iter().position(|k| *k == "presence");
        assert_eq!(at, Some(1), "{published:?}");
    }
}
