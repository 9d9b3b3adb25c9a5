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
use crate::store::{self, Store, StoreError, StoreKind};

/// What every request handler and connection shares.
pub struct Shared {
    pub settings: Settings,
    pub store: Arc<dyn Store>,
    pub hub: Arc<Hub>,
    pub broker: Arc<dyn Broker>,
    pub committer: Committer,
    /// Cancelled to stop the server.
    pub shutdown: CancellationToken,
    /// Every WebSocket connection holds a token of this tracker.
    pub tracker: TaskTracker,
    /// Handshake admission: Origin, connections per address and session, failed keys.
    pub limits: crate::limits::Limits,
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
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error("invalid settings: {0}")]
    Settings(String),
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
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
    demo_key: Option<String>,
    tls: Option<crate::tls::Tls>,
}

impl Application {
    pub async fn build(settings: Settings) -> Result<Self, StartError> {
        let limits = crate::limits::Limits::new(&settings).map_err(StartError::Settings)?;
        let tls = crate::tls::Tls::from_settings(
            settings.tls_cert.as_deref(),
            settings.tls_key.as_deref(),
        )?;
        let store = store::open(&settings.database).await?;
        if !settings.no_migrate {
            store.migrate().await?;
        }
        let demo_key = if settings.demo_session && store.kind() == StoreKind::Sqlite {
            create_demo_session(store.as_ref()).await?
        } else {
            None
        };
        let hub = Hub::new(store.clone());
        let broker = broker::open(&settings.broker, hub.clone())?;
        if settings.retention_per_room > 0 {
            tokio::spawn(apply_retention(
                store.clone(),
                settings.retention_per_room,
                Duration::from_secs(settings.retention_interval_secs.max(1)),
            ));
        }
        let (committer, commit_task) =
            Committer::start(store.clone(), broker.clone(), settings.max_commit_batch);
        let listener = listen(settings.listen).map_err(|source| StartError::Listen {
            addr: settings.listen,
            source,
        })?;
        crate::http::install_metrics();
        let shared = Arc::new(Shared {
            settings,
            store,
            hub,
            broker,
            committer,
            shutdown: CancellationToken::new(),
            tracker: TaskTracker::new(),
            limits,
            draining: AtomicBool::new(false),
            next_conn: AtomicU64::new(1),
        });
        if let Some(tls) = &tls {
            tls.reload_on_sighup(shared.shutdown.clone())?;
        }
        Ok(Self {
            listener,
            shared,
            commit_task,
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
            demo_key: _,
            tls,
        } = self;
        let router = crate::http::router(shared.clone());
        // TLS, TCP_NODELAY, the header size and handshake time limits: `serve.rs`.
        let served = crate::serve::serve(listener, router, &shared, tls).await;
        shared.draining.store(true, Ordering::Release);
        tracing::info!("draining: closing WebSockets with 1012");
        shared.tracker.close();
        let grace = shared.settings.shutdown_grace() + Duration::from_secs(1);
        if tokio::time::timeout(grace, shared.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!("some connections outlived the grace period");
        }
        shared.committer.stop();
        let _finished = tokio::time::timeout(grace, commit_task).await;
        tracing::info!("stopped");
        served
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
