//! The store of record: sessions, rooms and the message log. Only this module holds SQL.
//!
//! `Store` is the one interface; `sqlite` is the embedded implementation. Each message's
//! per-room `seq` is assigned inside the transaction that inserts it, by bumping the room's
//! counter row, and `commit_batch` commits many messages (of many rooms) in one transaction,
//! taking the rooms in a fixed (name) order.

pub mod keys;
pub mod postgres;
pub mod sqlite;
mod sqlite_reader;
mod sqlite_threads;
mod sqlite_writer;

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use wschat_protocol::RoomName;

pub use keys::{generate_key, hash_key, KeyHash};

/// Which engine a store runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreKind {
    Sqlite,
    Postgres,
}

/// A session row, as the embedding application wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    /// The key's hash, as stored (what the session checker asks about).
    pub key: KeyHash,
    pub user: String,
    /// The one room this session may use (nodejschat's `room` column).
    pub room: Option<i64>,
}

impl Session {
    /// The room of this session's legacy connections: its `room`, or room 0 without one
    /// (named as the legacy protocol names rooms: `"0"`, `"3"`).
    pub fn legacy_room(&self) -> RoomName {
        RoomName::legacy(self.room.unwrap_or(0))
    }
}

/// A message to commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewMessage {
    pub room: RoomName,
    pub user: String,
    pub text: String,
    pub client_msg_id: Option<String>,
}

impl NewMessage {
    /// This message, committed as `seq` with `id` at `time_ms`.
    pub fn stored(&self, seq: u64, id: i64, time_ms: i64) -> CommitOutcome {
        CommitOutcome::Stored(Arc::new(StoredMessage {
            room: self.room.clone(),
            seq,
            id,
            user: self.user.clone(),
            text: self.text.clone(),
            time_ms,
            client_msg_id: self.client_msg_id.clone(),
        }))
    }
}

/// A committed message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    pub room: RoomName,
    pub seq: u64,
    pub id: i64,
    pub user: String,
    pub text: String,
    /// Unix milliseconds, UTC.
    pub time_ms: i64,
    pub client_msg_id: Option<String>,
}

/// What became of one message of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommitOutcome {
    /// Newly stored.
    Stored(Arc<StoredMessage>),
    /// The same user already sent this `client_msg_id`: the first message, unchanged.
    Duplicate(Arc<StoredMessage>),
}

impl CommitOutcome {
    pub fn message(&self) -> &Arc<StoredMessage> {
        match self {
            Self::Stored(m) | Self::Duplicate(m) => m,
        }
    }
}

/// A node serving the database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    pub id: String,
    /// The broker it fans out with (`local`, `postgres`, `nats`).
    pub broker: String,
}

/// Where a room's log stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoomHead {
    /// The newest seq (0 for a room with no messages).
    pub last_seq: u64,
    /// The oldest seq still kept (`last_seq + 1` when none is kept).
    pub first_seq: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("bad database URL: {0}")]
    BadUrl(String),
    #[error("database unavailable: {0}")]
    Unavailable(#[source] sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// The database cannot hold wschat's schema (too old a PostgreSQL).
    #[error("{0}")]
    Unsupported(String),
    #[error("database error: {0}")]
    Query(#[source] sqlx::Error),
    #[error("no answer from the database within {0:?}")]
    NoAnswer(std::time::Duration),
    #[error("i/o error preparing the database: {0}")]
    Io(#[from] std::io::Error),
    /// From the SQLite commit thread.
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("the SQLite commit thread is gone")]
    WriterGone,
    /// A commit on a commit thread panicked (a bug): that batch failed, rolled back.
    #[error("the commit failed unexpectedly (see the server's log)")]
    CommitPanicked,
    #[error("the SQLite read thread is gone")]
    ReaderGone,
    #[error("the session lookup task is gone")]
    LookupsGone,
    /// One failure answered to every caller that shared the query.
    #[error(transparent)]
    Shared(Arc<StoreError>),
    /// A commit whose answer was lost after the batch went out (the connection failed, or
    /// the database stopped answering): it may have been committed. A database's own
    /// error (a constraint, the statement timeout) is not this: it rolled the batch back.
    #[error("{0}, after the batch was sent: it may have been stored")]
    Unconfirmed(Box<StoreError>),
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        match e {
            sqlx::Error::Io(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed
            | sqlx::Error::Tls(_) => Self::Unavailable(e),
            other => Self::Query(other),
        }
    }
}

/// A commit thread's connection, as the commit loop on it sees it (see `CommitThread`).
pub trait CommitOn {
    /// Commit one batch; the outcomes are in the batch's order.
    fn commit(&mut self, batch: &[NewMessage]) -> Result<Vec<CommitOutcome>, StoreError>;

    /// The store's upkeep after a batch's outcomes are handed on, before the next commit
    /// (SQLite: the checkpoint the last commit called for), so that no batch's answers
    /// wait for it.
    fn upkeep(&mut self) {}
}

/// A commit loop to run on a store's commit thread: it gets that thread's connection
/// (`CommitOn`) and keeps the thread until it returns.
pub type CommitLoop = Box<dyn for<'a> FnOnce(&'a mut dyn CommitOn) + Send>;

/// A store that commits on an OS thread of its own (SQLite) lends that thread to the
/// committer's whole loop, so that the next commit starts the moment the last one ends,
/// not when the async side gets round to asking for it (`crate::commit`).
pub trait CommitThread {
    /// Start `body` on the commit thread. While it runs, `Store::commit_batch` waits for
    /// it (the thread is busy): the committer runs it only in place of its own loop.
    fn run_loop(&self, body: CommitLoop) -> Result<(), StoreError>;
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    fn kind(&self) -> StoreKind;

    /// Apply the migrations this build carries.
    async fn migrate(&self) -> Result<(), StoreError>;

    /// The versions of this build's migrations the database has not applied (all of them
    /// when it has none): a server told not to migrate refuses to start on them.
    async fn pending_migrations(&self) -> Result<Vec<i64>, StoreError>;

    /// Answers when the store can serve.
    async fn ping(&self) -> Result<(), StoreError>;

    /// The session whose key hashes to `hash`, unless missing or expired.
    async fn session(&self, hash: &KeyHash) -> Result<Option<Session>, StoreError>;

    async fn create_session(
        &self,
        hash: &KeyHash,
        user: &str,
        room: Option<i64>,
    ) -> Result<(), StoreError>;

    /// Those of `keys` whose session row is gone or has expired (one query; a check of
    /// live sessions finds few or none, so few rows come back).
    async fn revoked_sessions(&self, keys: &[KeyHash]) -> Result<Vec<KeyHash>, StoreError>;

    async fn count_sessions(&self) -> Result<i64, StoreError>;

    /// Commit `batch` in one transaction; the outcomes are in the batch's order. Shared,
    /// so a store that commits on a thread of its own takes it there without a copy.
    async fn commit_batch(
        &self,
        batch: Arc<[NewMessage]>,
    ) -> Result<Vec<CommitOutcome>, StoreError>;

    /// The store's commit thread, where it has one (SQLite); `None` commits through
    /// `commit_batch` from a task (PostgreSQL, where the commit's work is the server's).
    fn commit_thread(&self) -> Option<&dyn CommitThread> {
        None
    }

    async fn room_head(&self, room: &RoomName) -> Result<RoomHead, StoreError>;

    /// Messages with `seq > after`, oldest first, at most `limit`.
    async fn messages_after(
        &self,
        room: &RoomName,
        after: u64,
        limit: u32,
    ) -> Result<Vec<StoredMessage>, StoreError>;

    /// The newest seq of each of `rooms` that has messages.
    async fn room_heads(&self, rooms: &[RoomName]) -> Result<Vec<(RoomName, u64)>, StoreError>;

    /// Record (or refresh) this node's heartbeat.
    async fn heartbeat_node(&self, node: &NodeInfo) -> Result<(), StoreError>;

    /// Nodes whose heartbeat is at most `max_age` old.
    async fn live_nodes(&self, max_age: std::time::Duration) -> Result<Vec<NodeInfo>, StoreError>;

    /// This node is stopping.
    async fn remove_node(&self, id: &str) -> Result<(), StoreError>;

    /// Delete all but the newest `keep` messages of every room; returns how many went.
    async fn prune(&self, keep: u64) -> Result<u64, StoreError>;

    /// The newest `limit` messages with `seq < before` (all when `None`), oldest first.
    async fn messages_before(
        &self,
        room: &RoomName,
        before: Option<u64>,
        limit: u32,
    ) -> Result<Vec<StoredMessage>, StoreError>;

    /// Delete the session whose key hashes to `hash`; returns how many rows went (0 or 1).
    async fn revoke_session(&self, hash: &KeyHash) -> Result<u64, StoreError>;

    /// Delete every session of `user`; returns how many went.
    async fn revoke_user_sessions(&self, user: &str) -> Result<u64, StoreError>;

    /// Rooms the log knows, by name after `after`, at most `limit`, with their `last_seq`.
    async fn list_rooms(
        &self,
        after: Option<&RoomName>,
        limit: u32,
    ) -> Result<Vec<(RoomName, u64)>, StoreError>;
}

/// How a batch splits into retries and new messages; shared by the stores so both apply
/// the same idempotency rules.
pub(crate) struct BatchPlan {
    /// Messages whose `(user, client_msg_id)` may already be stored: look them up.
    pub lookups: Vec<usize>,
    /// `(i, first)`: message `i` repeats message `first` of the same batch.
    pub repeats: Vec<(usize, usize)>,
}

impl BatchPlan {
    pub fn new(batch: &[NewMessage]) -> Self {
        let mut first_in_batch: std::collections::HashMap<(&str, &str), usize> =
            std::collections::HashMap::new();
        let mut plan = Self {
            lookups: Vec::new(),
            repeats: Vec::new(),
        };
        for (i, msg) in batch.iter().enumerate() {
            let Some(cmid) = msg.client_msg_id.as_deref() else {
                continue;
            };
            match first_in_batch.entry((msg.user.as_str(), cmid)) {
                std::collections::hash_map::Entry::Occupied(first) => {
                    plan.repeats.push((i, *first.get()))
                }
                std::collections::hash_map::Entry::Vacant(slot) => {
                    slot.insert(i);
                    plan.lookups.push(i);
                }
            }
        }
        plan
    }

    /// The messages to insert (no outcome yet, not a repeat), by room in name order: the
    /// fixed order in which rooms are locked.
    pub fn new_by_room<'a>(
        &self,
        batch: &'a [NewMessage],
        outcomes: &[Option<CommitOutcome>],
    ) -> std::collections::BTreeMap<&'a RoomName, Vec<usize>> {
        let repeats: std::collections::HashSet<usize> = self.repeats.iter().map(|r| r.0).collect();
        let mut by_room: std::collections::BTreeMap<&RoomName, Vec<usize>> =
            std::collections::BTreeMap::new();
        for (i, msg) in batch.iter().enumerate() {
            if outcomes[i].is_none() && !repeats.contains(&i) {
                by_room.entry(&msg.room).or_default().push(i);
            }
        }
        by_room
    }

    /// Give repeats their first's outcome and check every message has one.
    pub fn finish(
        self,
        mut outcomes: Vec<Option<CommitOutcome>>,
    ) -> Result<Vec<CommitOutcome>, StoreError> {
        for (i, first) in self.repeats {
            let first = outcomes[first].as_ref().map(|o| o.message().clone());
            outcomes[i] = first.map(CommitOutcome::Duplicate);
        }
        outcomes
            .into_iter()
            .map(|o| o.ok_or_else(|| protocol_error("a batch message got no outcome".into())))
            .collect()
    }
}

/// A row of a one-statement commit: a room's bumped counter, or a stored message.
pub(crate) enum CommitRow {
    Room {
        name: String,
        id: i64,
        last_seq: u64,
    },
    Message {
        room_id: i64,
        seq: u64,
        id: i64,
    },
}

impl CommitRow {
    /// Read a returned row: `(room id, last_seq, NULL, name)` for a room, `(room id, seq,
    /// id, NULL)` for a message.
    pub fn read<'r, R>(row: &'r R) -> Result<Self, sqlx::Error>
    where
        R: sqlx::Row,
        usize: sqlx::ColumnIndex<R>,
        i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
        String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    {
        let room_id: i64 = row.try_get(0)?;
        let seq = u64::try_from(row.try_get::<i64, _>(1)?).unwrap_or(0);
        Ok(match row.try_get::<Option<i64>, _>(2)? {
            Some(id) => Self::Message { room_id, seq, id },
            None => Self::Room {
                name: row.try_get(3)?,
                id: room_id,
                last_seq: seq,
            },
        })
    }
}

/// Outcomes of a batch committed in one statement, from its rows: each room's messages are
/// numbered in batch order, from the room's bumped counter back, as the statement numbered
/// them, and each gets the id its row returned. (Joining the inserted rows back to the
/// input in SQL would be quadratic.)
pub(crate) fn outcomes_from_rows(
    batch: &[NewMessage],
    plan: BatchPlan,
    rows: Vec<CommitRow>,
    time_ms: i64,
) -> Result<Vec<CommitOutcome>, StoreError> {
    // room name -> (room id, last seq after this batch); (room id, seq) -> message id
    let mut heads: HashMap<String, (i64, u64)> = HashMap::new();
    let mut ids: HashMap<(i64, u64), i64> = HashMap::with_capacity(batch.len());
    for row in rows {
        match row {
            CommitRow::Room { name, id, last_seq } => {
                heads.insert(name, (id, last_seq));
            }
            CommitRow::Message { room_id, seq, id } => {
                ids.insert((room_id, seq), id);
            }
        }
    }
    let mut by_room: HashMap<&str, Vec<usize>> = HashMap::new();
    for (i, m) in batch.iter().enumerate() {
        by_room.entry(m.room.as_str()).or_default().push(i);
    }
    let mut outcomes: Vec<Option<CommitOutcome>> = vec![None; batch.len()];
    for (room, indices) in by_room {
        let &(room_id, last_seq) = heads
            .get(room)
            .ok_or_else(|| protocol_error(format!("commit returned no counter for {room}")))?;
        let first_seq = (last_seq + 1)
            .checked_sub(indices.len() as u64)
            .ok_or_else(|| protocol_error("a room counter below its batch".into()))?;
        for (seq, i) in (first_seq..).zip(indices) {
            let id = *ids
                .get(&(room_id, seq))
                .ok_or_else(|| protocol_error(format!("commit returned no id for seq {seq}")))?;
            outcomes[i] = Some(batch[i].stored(seq, id, time_ms));
        }
    }
    plan.finish(outcomes)
}

fn protocol_error(what: String) -> StoreError {
    StoreError::Query(sqlx::Error::Protocol(what))
}

/// The table that records applied migrations: not sqlx's default name, so that wschat's
/// history never clashes with an embedding application's own sqlx migrations.
pub const MIGRATIONS_TABLE: &str = "wschat_migrations";

/// Of `migrations`, the versions missing from `applied` (the successful rows of
/// [`MIGRATIONS_TABLE`]).
pub(crate) fn pending(
    migrations: &[(i64, &'static str, &'static str)],
    applied: &[i64],
) -> Vec<i64> {
    migrations
        .iter()
        .map(|&(version, _, _)| version)
        .filter(|v| !applied.contains(v))
        .collect()
}

/// A migrator over embedded `(version, name, sql)` migrations, recorded in
/// [`MIGRATIONS_TABLE`].
pub(crate) fn migrator(
    migrations: &[(i64, &'static str, &'static str)],
) -> sqlx::migrate::Migrator {
    let mut migrator = sqlx::migrate::Migrator::with_migrations(
        migrations
            .iter()
            .map(|&(version, name, sql)| {
                sqlx::migrate::Migration::new(
                    version,
                    name.into(),
                    sqlx::migrate::MigrationType::Simple,
                    sqlx::SqlSafeStr::into_sql_str(sql),
                    false,
                )
            })
            .collect(),
    );
    migrator.dangerous_set_table_name(MIGRATIONS_TABLE);
    migrator
}

/// Whether `url` names a PostgreSQL database.
pub fn is_postgres(url: &str) -> bool {
    url.starts_with("postgres://") || url.starts_with("postgresql://")
}

/// What rules out `url` as the store of record before anything is opened: an unknown
/// scheme, or an in-memory SQLite database (`config check` and `open` both ask).
pub fn url_problem(url: &str) -> Option<&'static str> {
    if is_postgres(url) {
        None
    } else if !url.starts_with("sqlite:") {
        Some("unsupported database URL scheme; use sqlite://FILE or postgres://…")
    } else if url.contains(":memory:") || url.contains("mode=memory") {
        // The store of record must outlive the process, and the commit thread's
        // connection could not see a private in-memory database anyway.
        Some("an in-memory database loses every message when the server stops; use sqlite://FILE")
    } else {
        None
    }
}

/// Open the store a URL names: `sqlite://…` (a relative or absolute path; not in memory)
/// or `postgres://…`.
pub async fn open(url: &str) -> Result<Arc<dyn Store>, StoreError> {
    if let Some(problem) = url_problem(url) {
        return Err(StoreError::BadUrl(format!(
            "{:?}: {problem}",
            redact_url(url)
        )));
    }
    if is_postgres(url) {
        Ok(Arc::new(postgres::PgStore::open(url).await?))
    } else {
        Ok(Arc::new(sqlite::SqliteStore::open(url).await?))
    }
}

/// A URL with any password replaced, fit for logs and errors.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let userinfo = &url[scheme_end + 3..at];
            match userinfo.find(':') {
                Some(colon) => format!(
                    "{}{}:***{}",
                    &url[..scheme_end + 3],
                    &userinfo[..colon],
                    &url[at..]
                ),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

/// Unix milliseconds now.
pub fn now_ms() -> i64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(now.as_millis()).unwrap_or(i64::MAX)
}

/// RFC 3339, UTC, milliseconds: `2016-08-08T17:20:32.421Z`.
pub fn format_time(ms: i64) -> String {
    const FORMAT: &[time::format_description::FormatItem<'static>] = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| t.format(FORMAT).ok())
        .unwrap_or_else(|| "1970-01-01T00:00:00.000Z".into())
}

/// Tests elsewhere: commit `n` messages to `room` (`text-01` on, by user `u`) straight to
/// the store, as another node would, with no hub told.
#[cfg(test)]
pub(crate) async fn commit_unheard(store: &dyn Store, room: &RoomName, n: u64) {
    let batch: Vec<NewMessage> = (1..=n)
        .map(|i| NewMessage {
            room: room.clone(),
            user: "u".into(),
            text: format!("text-{i:02}"),
            client_msg_id: None,
        })
        .collect();
    store
        .commit_batch(Arc::from(batch))
        .await
        .expect("the messages are committed");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_like_nodejschat() {
        assert_eq!(format_time(1_470_676_832_421), "2016-08-08T17:20:32.421Z");
        assert_eq!(format_time(0), "1970-01-01T00:00:00.000Z");
    }

    #[test]
    fn redacts_passwords() {
        assert_eq!(
            redact_url("postgres://u:secret@h/db"),
            "postgres://u:***@h/db"
        );
        assert_eq!(redact_url("sqlite://x.db"), "sqlite://x.db");
    }
}
