//! Start-up and shutdown: `Application::build` opens the store, applies migrations, wires
//! hub, broker and committer, and binds its own listener (port 0 in tests);
//! `Application::run` serves until the shutdown token is cancelled, then drains.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpSocket};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::broker::{self, Broker, BrokerError};
use crate::commit::Committer;
use crate::config::Settings;
use crate::hub::Hub;
use crate::store::{self, NodeInfo, Store, StoreError, StoreKind};

/// A node whose heartbeat is older than this is gone.
pub const NODE_TTL: Duration = Duration::from_secs(15);
/// How often a node refreshes its heartbeat and its presence on the other nodes.
const HEARTBEAT: Duration = Duration::from_secs(4);
/// Another node's presence not refreshed for this long is forgotten: with refreshes every
/// `HEARTBEAT` and checks every second, a node that dies without a goodbye leaves the
/// presence lists within 13 s.
const PRESENCE_TTL: Duration = Duration::from_secs(12);
/// How often the rooms whose users changed on this node are told to the other nodes.
const PRESENCE_TELL: Duration = Duration::from_millis(50);

/// What every request handler and connection shares.
pub struct Shared {
    pub settings: Settings,
    pub store: Arc<dyn Store>,
    pub hub: Arc<Hub>,
    pub broker: Arc<dyn Broker>,
    pub committer: Committer,
    /// This node, as registered in the store.
    pub node: NodeInfo,
    /// Open connections by session, checked against the store.
    pub sessions: Arc<crate::sessions::Sessions>,
    /// Cancelled to stop the server.
    pub shutdown: CancellationToken,
    /// Cancelled during a stop to stop waiting (an operator's second signal): for the
    /// connections, the committer's last batch, the last events for the other nodes.
    /// Nothing acknowledged is lost by it: acks follow commits.
    pub hurry: CancellationToken,
    /// Every WebSocket connection holds a token of this tracker.
    pub tracker: TaskTracker,
    /// Handshake admission: Origin, connections per address and session, failed keys.
    pub limits: crate::limits::Limits,
    /// Whether busy connections hold their writes now (the node's frame rate).
    pub pacing: Arc<crate::hub::pacing::WritePacing>,
    /// When a stop must be over (`shutdown_grace_secs` + 1 s from when it began): set
    /// once the stop begins.
    stop_deadline: std::sync::OnceLock<tokio::time::Instant>,
    draining: AtomicBool,
    next_conn: AtomicU64,
}

impl Shared {
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire) || self.shutdown.is_cancelled()
    }

    pub fn next_conn_id(&self) -> u64 {
        self.next_conn.fetch_add(1, Ordering::Relaxed)
    }

    /// The stop's deadline: set (once, the first caller's `at` wins) from when the stop
    /// began.
    pub(crate) fn stop_began(&self, at: tokio::time::Instant) -> tokio::time::Instant {
        *self
            .stop_deadline
            .get_or_init(|| at + self.settings.shutdown_grace() + Duration::from_secs(1))
    }

    /// Once the server is stopping: until when a connection may still spend time on its
    /// own close, up to `want` from now and never into the last second before the stop's
    /// deadline, which the steps after the connections (the committer, the other nodes,
    /// deregistering) need.
    pub fn stop_budget(&self, want: Duration) -> tokio::time::Instant {
        let now = tokio::time::Instant::now();
        let deadline = self.stop_began(now);
        (now + want).min(deadline.checked_sub(Duration::from_secs(1)).unwrap_or(now))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error("{0}")]
    Topology(String),
    #[error("invalid settings: {0}")]
    Settings(String),
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error(
        "no_migrate is set, and the database lacks this build's migrations {0:?}: run `wschat migrate` first"
    )]
    MigrationsPending(Vec<i64>),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

pub struct Application {
    listener: TcpListener,
    shared: Arc<Shared>,
    commit_task: tokio::task::JoinHandle<()>,
    /// Stops the broker's tasks and the periodic ones once the server has drained.
    background: CancellationToken,
    /// Publishes to the other nodes; after `background` stops it, it publishes what was
    /// queued by then, and a graceful stop waits for that.
    forwarder: tokio::task::JoinHandle<()>,
    /// Heartbeats; a stop waits for a heartbeat in flight before deregistering the node
    /// (else it could land after, and register the stopped node again).
    upkeep: tokio::task::JoinHandle<()>,
    demo_key: Option<String>,
    tls: Option<crate::tls::Tls>,
}

impl Application {
    pub async fn build(settings: Settings) -> Result<Self, StartError> {
        // First: what the start records (a broker's connect, a migration) is counted.
        crate::http::install_metrics();
        let limits = crate::limits::Limits::new(&settings).map_err(StartError::Settings)?;
        let tls = crate::tls::Tls::from_settings(
            settings.tls_cert.as_deref(),
            settings.tls_key.as_deref(),
        )?;
        // Bound first: a port in use fails the start before this node is registered (a
        // registered node that never served would refuse the restart for the node TTL).
        let listener = listen(settings.listen).map_err(|source| StartError::Listen {
            addr: settings.listen,
            source,
        })?;
        let store = store::open(&settings.database).await?;
        if settings.no_migrate {
            // Told not to migrate, on a database that lacks this build's migrations: every
            // send and join would fail on the missing tables or columns, behind a healthy
            // `/healthz`. Refused here, by name.
            let pending = store.pending_migrations().await?;
            if !pending.is_empty() {
                return Err(StartError::MigrationsPending(pending));
            }
        } else {
            store.migrate().await?;
        }
        let demo_key = if settings.demo_session && store.kind() == StoreKind::Sqlite {
            create_demo_session(store.as_ref()).await?
        } else {
            None
        };
        let node = NodeInfo {
            id: hex::encode(rand::random::<[u8; 8]>()),
            broker: broker::kind(&settings.broker, &settings.database).to_owned(),
        };
        check_topology(store.as_ref(), &settings, &node).await?;
        store.heartbeat_node(&node).await?;
        let (outgoing, to_broker) = broker::queues();
        let hub = Hub::new(store.clone(), outgoing, node.broker != "local");
        let background = CancellationToken::new();
        let broker = match broker::open(
            &settings.broker,
            &settings.database,
            &settings.nats_subject,
            &node.id,
            hub.clone(),
            background.clone(),
        )
        .await
        {
            Ok(broker) => broker,
            Err(e) => {
                // This node never served: deregistered at once, not after the TTL.
                background.cancel();
                if let Err(gone) = store.remove_node(&node.id).await {
                    tracing::warn!(error = %gone, "could not deregister the node that failed to start");
                }
                return Err(e.into());
            }
        };
        let forwarder = broker::forward(broker.clone(), to_broker, background.clone());
        let upkeep = tokio::spawn(node_upkeep(
            store.clone(),
            hub.clone(),
            node.clone(),
            background.clone(),
        ));
        if settings.retention_per_room > 0 {
            tokio::spawn(apply_retention(
                store.clone(),
                settings.retention_per_room,
                Duration::from_secs(settings.retention_interval_secs.max(1)),
            ));
        }
        let pacing = crate::hub::pacing::WritePacing::new(
            settings.write_delay(),
            settings.write_delay_above_per_sec,
        );
        // On SQLite each commit's flush to disk costs this process a core's time (the
        // commit thread's waits and wake-ups); on PostgreSQL it is the database server's,
        // and holding commits only added latency (bench persist: p99 send→ack 22 ms
        // without, 35 ms with 2 ms).
        let spacing = crate::commit::Spacing {
            delay: match store.kind() {
                StoreKind::Sqlite => settings.commit_delay(),
                StoreKind::Postgres => Duration::ZERO,
            },
            pacing: pacing.clone(),
        };
        let (committer, commit_task) = Committer::start(
            store.clone(),
            hub.clone(),
            settings.max_commit_batch,
            spacing,
        );
        let shared = Arc::new(Shared {
            settings,
            store,
            hub,
            broker,
            committer,
            node,
            sessions: crate::sessions::Sessions::new(),
            shutdown: CancellationToken::new(),
            hurry: CancellationToken::new(),
            tracker: TaskTracker::new(),
            limits,
            pacing,
            stop_deadline: std::sync::OnceLock::new(),
            draining: AtomicBool::new(false),
            next_conn: AtomicU64::new(1),
        });
        // Pacing lasts as long as connections do: through the drain, when a connection
        // still writes its acks and a backfill its pages, until `background` stops.
        tokio::spawn(shared.pacing.clone().run(background.clone()));
        tokio::spawn(shared.pacing.clone().flush_held(background.clone()));
        tokio::spawn(shared.sessions.clone().run(
            shared.store.clone(),
            shared.settings.session_check_interval(),
            shared.shutdown.clone(),
        ));
        match &tls {
            Some(tls) => tls.reload_on_sighup(shared.shutdown.clone())?,
            None => crate::tls::ignore_sighup(shared.shutdown.clone())?,
        }
        Ok(Self {
            listener,
            shared,
            commit_task,
            background,
            forwarder,
            upkeep,
            demo_key,
            tls,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Cancel this token to stop the server gracefully.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shared.shutdown.clone()
    }

    /// Cancel it during a stop to end the stop without waiting any longer (`Shared::hurry`).
    pub fn hurry_token(&self) -> CancellationToken {
        self.shared.hurry.clone()
    }

    /// The key of the demo session created at start, if one was.
    pub fn demo_key(&self) -> Option<&str> {
        self.demo_key.as_deref()
    }

    pub fn shared(&self) -> Arc<Shared> {
        self.shared.clone()
    }

    /// The server's TLS (to reload it without a signal), when it serves TLS.
    pub fn tls(&self) -> Option<crate::tls::Tls> {
        self.tls.clone()
    }

    /// Serve until the shutdown token is cancelled; then stop accepting, close every
    /// WebSocket with 1012 once its in-flight sends are answered, drain the committer,
    /// and return.
    pub async fn run(self) -> std::io::Result<()> {
        let Self {
            listener,
            shared,
            commit_task,
            background,
            forwarder,
            upkeep,
            demo_key: _,
            tls,
        } = self;
        let router = crate::http::router(shared.clone());
        // TLS, TCP_NODELAY, the header size and handshake time limits: `serve.rs`, which
        // also records when a stop by the token began.
        let served = crate::serve::serve(listener, router, &shared, tls).await;
        // The grace bounds the whole stop from when it began, not each step; when serving
        // failed, the stop begins now, and the connections are told to stop too.
        let deadline = shared.stop_began(tokio::time::Instant::now());
        shared.shutdown.cancel();
        shared.draining.store(true, Ordering::Release);
        tracing::info!("draining: closing WebSockets with 1012");
        shared.tracker.close();
        let hurry = &shared.hurry;
        if bounded(deadline, hurry, shared.tracker.wait())
            .await
            .is_none()
        {
            tracing::warn!("some connections outlived the grace period, or the stop was hurried");
        }
        // The other nodes hear that this node's users left: queued here, published by the
        // forwarder before it stops (below).
        shared.hub.tell_all_changed_presence();
        shared.committer.stop();
        if bounded(deadline, hurry, commit_task).await.is_none() {
            tracing::warn!("the committer's last batch was not waited for");
        }
        background.cancel();
        if bounded(deadline, hurry, forwarder).await.is_none() {
            tracing::warn!("the last events for the other nodes were not all published in time");
        }
        if bounded(deadline, hurry, upkeep).await.is_none() {
            tracing::warn!(
                "a heartbeat was still running; the node may stay registered until it expires"
            );
        }
        // Past the grace too, a moment to deregister (else the node stays registered for
        // its TTL, and a local-broker restart is refused meanwhile).
        let last = deadline.max(tokio::time::Instant::now() + Duration::from_secs(1));
        // Hurried (already, or meanwhile): a second more at most.
        let hurried = async {
            hurry.cancelled().await;
            tokio::time::sleep(Duration::from_secs(1)).await;
        };
        let deregistered = tokio::select! {
            r = tokio::time::timeout_at(last, shared.store.remove_node(&shared.node.id)) => r.ok(),
            _ = hurried => None,
        };
        match deregistered {
            Some(Ok(())) => {}
            Some(Err(e)) => tracing::warn!(error = %e, "could not deregister this node"),
            None => tracing::warn!("deregistering this node took too long; it expires"),
        }
        tracing::info!("stopped");
        served
    }
}

/// `fut`'s output, unless `deadline` passes or the stop is hurried first.
async fn bounded<F: std::future::Future>(
    deadline: tokio::time::Instant,
    hurry: &CancellationToken,
    fut: F,
) -> Option<F::Output> {
    tokio::select! {
        r = tokio::time::timeout_at(deadline, fut) => r.ok(),
        _ = hurry.cancelled() => None,
    }
}

/// Bind with the listen backlog at the system maximum (tokio's default is 1024).
fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.set_nodelay(true)?;
    socket.bind(addr)?;
    let backlog = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .unwrap_or(4096);
    socket.listen(backlog)
}

/// Refuse set-ups that would lose messages: SQLite with a multi-node broker, or a local
/// broker on a database another live node serves (neither would see the other's
/// messages).
async fn check_topology(
    store: &dyn Store,
    settings: &Settings,
    node: &NodeInfo,
) -> Result<(), StartError> {
    if let Some(problem) = broker::setup_problem(&settings.broker, &settings.database) {
        return Err(StartError::Topology(format!(
            "--broker {}: {problem}",
            settings.broker
        )));
    }
    let others = store.live_nodes(NODE_TTL).await?;
    let conflict = others
        .iter()
        .find(|other| other.id != node.id && (node.broker == "local" || other.broker == "local"));
    if let Some(other) = conflict {
        return Err(StartError::Topology(format!(
            "node {} (broker {}) is serving this database; a local broker on either side cannot see the other's messages: \
             run every node with --broker postgres or --broker nats://…. If that node is gone, its registration expires {} s after its last heartbeat",
            other.id,
            other.broker,
            NODE_TTL.as_secs()
        )));
    }
    Ok(())
}

/// The node's periodic work: heartbeat, and (with a multi-node broker or on PostgreSQL)
/// read the store for any commit this node's hub did not hear of (a bell lost on the bus,
/// or a commit whose answer was lost); with a multi-node broker, also tell the other nodes of the rooms whose users here changed
/// (every `PRESENCE_TELL`), refresh presence on them, and forget theirs when they stop
/// refreshing.
async fn node_upkeep(
    store: Arc<dyn Store>,
    hub: Arc<Hub>,
    node: NodeInfo,
    stop: CancellationToken,
) {
    let multi_node = hub.has_others();
    // A PostgreSQL commit can be stored while its sender hears it failed (the connection
    // died during COMMIT): its bell never rings, so the rooms' heads are read now and then,
    // whatever the broker. SQLite's commit answers on the thread that committed: no such
    // commit, and no read of every room a heartbeat for it.
    let read_heads = multi_node || store.kind() == StoreKind::Postgres;
    let mut heartbeat = tokio::time::interval(HEARTBEAT);
    let mut expiry = tokio::time::interval(Duration::from_secs(1));
    let mut presence = tokio::time::interval(PRESENCE_TELL);
    presence.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut beating: Option<tokio::task::JoinHandle<()>> = None;
    loop {
        tokio::select! {
            _ = stop.cancelled() => {
                // The node is deregistered next: not before a heartbeat in flight, which
                // would register it again. The stop bounds this wait; a heartbeat that
                // outlives it (a database that stopped answering) may still register the
                // node again, until its TTL.
                if let Some(beat) = beating {
                    let _done = beat.await;
                }
                return;
            }
            _ = heartbeat.tick() => {
                // The store's write on its own task, one at a time: a database that stops
                // answering must not stop the presence upkeep below (the other nodes would
                // expire this node's users, and this node would keep dead nodes' users).
                if beating.as_ref().is_none_or(|beat| beat.is_finished()) {
                    let (store, node) = (store.clone(), node.clone());
                    beating = Some(tokio::spawn(async move {
                        if let Err(e) = store.heartbeat_node(&node).await {
                            tracing::warn!(error = %e, "heartbeat failed");
                        }
                    }));
                }
                hub.repair_presence();
                if multi_node {
                    hub.refresh_presence();
                }
                if read_heads {
                    tokio::spawn(hub.clone().resync());
                }
            }
            _ = expiry.tick(), if multi_node => hub.expire_presence(PRESENCE_TTL),
            _ = presence.tick(), if multi_node => hub.tell_changed_presence(),
        }
    }
}

/// Keep the newest `keep` messages per room, checked every `every`.
async fn apply_retention(store: Arc<dyn Store>, keep: u64, every: Duration) {
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        match store.prune(keep).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(deleted = n, "retention applied"),
            Err(e) => tracing::warn!(error = %e, "retention failed; will retry"),
        }
    }
}

async fn create_demo_session(store: &dyn Store) -> Result<Option<String>, StoreError> {
    if store.count_sessions().await? > 0 {
        return Ok(None);
    }
    let key = store::generate_key();
    store
        .create_session(&store::hash_key(&key), "demo", None)
        .await?;
    Ok(Some(key))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::BusEvent;
    use crate::hub::tests::{one_member, GatedStore, OneMember};
    use std::sync::atomic::AtomicUsize;

    /// A heartbeat the database never answers (its host gone, or paused) does not stop
    /// the presence upkeep: this node's users are still told to the other nodes every
    /// heartbeat, or the others would expire them while they are connected.
    #[tokio::test]
    async fn presence_is_kept_up_while_a_heartbeat_never_answers() {
        let OneMember {
            _dir,
            store: inner,
            room,
            member,
            ..
        } = one_member().await;
        let store = Arc::new(GatedStore {
            inner,
            calls: AtomicUsize::new(0),
            gate: tokio::sync::Semaphore::new(tokio::sync::Semaphore::MAX_PERMITS),
            hang_heartbeats: true,
        });
        let (outgoing, mut events) = crate::broker::queues();
        let hub = Hub::new(store.clone(), outgoing, true);
        hub.subscribe(&room, &member, 0).await.unwrap();
        let node = NodeInfo {
            id: "n1".into(),
            broker: "nats".into(),
        };
        let stop = CancellationToken::new();
        let upkeep = tokio::spawn(node_upkeep(store, hub.clone(), node, stop.clone()));
        // The change at the start, then a refresh every heartbeat.
        let deadline = tokio::time::Instant::now() + 3 * HEARTBEAT;
        let mut told = 0;
        while told < 3 {
            let event = tokio::time::timeout_at(deadline, events.chatter.recv())
                .await
                .unwrap_or_else(|_| panic!("presence told {told} times, then no more"));
            if matches!(event, Some(BusEvent::Presence { .. })) {
                told += 1;
            }
        }
        stop.cancel();
        upkeep.abort();
    }
}
