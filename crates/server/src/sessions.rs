//! Live sessions: which connections each session (by key hash) has open on this node, and
//! the periodic check that closes those whose session row was deleted or expired.
//!
//! The embedding application owns the `sessions` table and revokes a session by deleting
//! its row (or letting its `expires_at` pass). Every `session_check_secs` the checker asks
//! the store which of the live hashes are gone or expired (500 a query, a short pause
//! between queries), and closes their connections with 1008 (`session revoked`). A check
//! that fails (store away) closes nothing: the next one decides.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use wschat_protocol::close;

use crate::hub::Conn;
use crate::store::{KeyHash, Store, StoreError};

/// Close reason sent with 1008.
pub const REVOKED_REASON: &str = "session revoked";

/// Most hashes asked about in one query.
const CHECK_CHUNK: usize = 500;

/// The pause between two queries of one check.
const CHECK_PAUSE: Duration = Duration::from_millis(5);

#[derive(Default)]
pub struct Sessions {
    live: Mutex<HashMap<KeyHash, Vec<Weak<Conn>>>>,
}

impl Sessions {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn live(&self) -> MutexGuard<'_, HashMap<KeyHash, Vec<Weak<Conn>>>> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Remember that `conn` was opened with the session `key`. Ended connections are
    /// forgotten by the next check.
    pub fn register(&self, key: &KeyHash, conn: &Arc<Conn>) {
        self.live()
            .entry(key.clone())
            .or_default()
            .push(Arc::downgrade(conn));
    }

    /// The hashes with at least one open connection (ended ones are dropped here).
    pub fn live_keys(&self) -> Vec<KeyHash> {
        let mut live = self.live();
        live.retain(|_, conns| {
            conns.retain(|c| c.strong_count() > 0);
            !conns.is_empty()
        });
        live.keys().cloned().collect()
    }

    /// Open connections, over all sessions.
    pub fn connection_count(&self) -> usize {
        self.live()
            .values()
            .map(|conns| conns.iter().filter(|c| c.strong_count() > 0).count())
            .sum()
    }

    /// Close every connection of `key` with 1008; returns how many were open.
    pub fn revoke(&self, key: &KeyHash) -> usize {
        let conns = self.live().remove(key).unwrap_or_default();
        let mut closed = 0;
        for conn in conns.iter().filter_map(Weak::upgrade) {
            tracing::info!(
                conn = conn.id,
                "session revoked or expired: closing with 1008"
            );
            conn.outbox.close(close::POLICY_VIOLATION, REVOKED_REASON);
            conn.outbox.cancel.cancel();
            closed += 1;
        }
        closed
    }

    /// One check: ask the store which live sessions are gone or expired, and close their
    /// connections. Returns how many connections were closed. The keys go in chunks with
    /// a pause between them, so that a node with many sessions spreads the check's reads
    /// instead of holding the store (and, on SQLite, a core) for one long query.
    pub async fn check(&self, store: &dyn Store) -> Result<usize, StoreError> {
        let keys = self.live_keys();
        let mut closed = 0;
        for (i, chunk) in keys.chunks(CHECK_CHUNK).enumerate() {
            if i > 0 {
                tokio::time::sleep(CHECK_PAUSE).await;
            }
            for key in store.revoked_sessions(chunk).await? {
                closed += self.revoke(&key);
            }
        }
        if closed > 0 {
            metrics::counter!("wschat_sessions_revoked_connections_total").increment(closed as u64);
        }
        Ok(closed)
    }

    /// Check every `every` until `stop`.
    pub async fn run(
        self: Arc<Self>,
        store: Arc<dyn Store>,
        every: Duration,
        stop: CancellationToken,
    ) {
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            if let Err(e) = self.check(store.as_ref()).await {
                tracing::warn!(error = %e, "session check failed; will retry");
            }
        }
    }
}

/// Those of `keys` that a store returned (as stored strings).
pub(crate) fn among(rows: Vec<String>, keys: &[KeyHash]) -> Vec<KeyHash> {
    if rows.is_empty() {
        return Vec::new();
    }
    let rows: HashSet<String> = rows.into_iter().collect();
    keys.iter()
        .filter(|k| rows.contains(k.as_str()))
        .cloned()
        .collect()
}
