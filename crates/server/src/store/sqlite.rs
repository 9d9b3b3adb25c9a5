//! The embedded store: SQLite in WAL mode with `synchronous = FULL` (an acknowledged
//! message survives a crash). Message batches are committed by a thread of their own
//! (`sqlite_writer`); one sqlx connection does the other, rare, writes (SQLite has one
//! writer at a time; `BEGIN IMMEDIATE` and the busy timeout order them). The reads of a
//! connect (session, history) run on read threads of their own (`sqlite_reader`), the
//! other reads on a small pool; in WAL mode no read waits for a commit.

use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::Row;
use wschat_protocol::RoomName;

use super::sqlite_reader::Reader;
use super::sqlite_writer::Writer;
use super::{
    now_ms, CommitOutcome, KeyHash, NewMessage, NodeInfo, RoomHead, Session, Store, StoreError,
    StoreKind, StoredMessage,
};

/// Most messages one prune transaction deletes (see `prune`).
const PRUNE_CHUNK: i64 = 5_000;

pub struct SqliteStore {
    /// Every write but message batches (sessions, nodes, pruning).
    writer: SqlitePool,
    reader: SqlitePool,
    /// Message batches: the commit thread.
    commit: Writer,
    /// The reads of a connect: the read threads.
    connect_reads: Reader,
}

impl SqliteStore {
    /// Open (creating the file and its folder when missing) the database at `url`.
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        const BUSY_TIMEOUT: Duration = Duration::from_secs(10);
        let options = SqliteConnectOptions::from_str(url)
            .map_err(|e| StoreError::BadUrl(format!("{url}: {e}")))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(BUSY_TIMEOUT);
        if let Some(problem) = super::url_problem(url) {
            return Err(StoreError::BadUrl(format!("{url}: {problem}")));
        }
        let path = options.get_filename().to_owned();
        if let Some(parent) = path.parent() {
            if parent != Path::new("") && !parent.exists() {
                std::fs::create_dir_all(parent)?;
            }
        }
        // No ping before each acquire: a connection to a local file does not go away, and
        // on SQLite a ping is a round trip to the connection's worker thread, as much as
        // the query it would precede.
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .test_before_acquire(false)
            .connect_with(options.clone())
            .await
            .map_err(StoreError::Unavailable)?;
        let reader = SqlitePoolOptions::new()
            .max_connections(4)
            .test_before_acquire(false)
            .connect_with(options)
            .await
            .map_err(StoreError::Unavailable)?;
        // The file exists now (the writer created it).
        let connect_reads = Reader::start(path.clone(), BUSY_TIMEOUT)?;
        let commit = Writer::start(path, BUSY_TIMEOUT)?;
        Ok(Self {
            writer,
            reader,
            commit,
            connect_reads,
        })
    }
}

/// The migrations this build carries.
const MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "init",
        include_str!("../../../../migrations/sqlite/0001_init.sql"),
    ),
    (
        3,
        "nodes",
        include_str!("../../../../migrations/sqlite/0003_nodes.sql"),
    ),
];

pub(super) fn to_seq(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

pub(super) fn to_db(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// The columns `message_from_row` reads, in its order.
macro_rules! message_columns {
    () => {
        r#"m.id, m.seq, m."user", m.text, m.created_at, m.client_msg_id"#
    };
}
// The read threads read messages in the same order (`sqlite_reader::message`).
pub(super) use message_columns;

// A bound LIMIT is written `LIMIT +?n`. SQLite's planner reads the value bound to a bare
// `LIMIT ?n` and marks the statement expired whenever it is bound again, so each run of a
// cached statement parsed and planned it anew (5,000 times in 5,000 connects, each
// sending its room's history). The unary plus hides the value from the planner; the limit
// is applied as before. `tests::no_statement_is_planned_again_for_its_limit` holds to it.

/// A page of a room's messages after a seq, oldest first (resume).
const MESSAGES_AFTER: &str = concat!(
    "SELECT ",
    message_columns!(),
    " FROM wschat_messages m JOIN wschat_rooms r ON r.id = m.room_id
      WHERE r.name = ?1 AND m.seq > ?2 ORDER BY m.seq LIMIT +?3"
);

/// A page of rooms by name, after a name.
const ROOMS_AFTER: &str =
    "SELECT name, last_seq FROM wschat_rooms WHERE name > ?1 ORDER BY name LIMIT +?2";

fn message_from_row(room: &RoomName, row: &SqliteRow) -> Result<StoredMessage, sqlx::Error> {
    Ok(StoredMessage {
        room: room.clone(),
        id: row.try_get(0)?,
        seq: to_seq(row.try_get(1)?),
        user: row.try_get(2)?,
        text: row.try_get(3)?,
        time_ms: row.try_get(4)?,
        client_msg_id: row.try_get(5)?,
    })
}

#[async_trait]
impl Store for SqliteStore {
    fn kind(&self) -> StoreKind {
        StoreKind::Sqlite
    }

    async fn pending_migrations(&self) -> Result<Vec<i64>, StoreError> {
        let exists: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'wschat_migrations'",
        )
        .fetch_one(&self.writer)
        .await?;
        let applied: Vec<i64> = if exists > 0 {
            sqlx::query_scalar("SELECT version FROM wschat_migrations WHERE success")
                .fetch_all(&self.writer)
                .await?
        } else {
            Vec::new()
        };
        Ok(super::pending(MIGRATIONS, &applied))
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        super::migrator(MIGRATIONS).run(&self.writer).await?;
        // `sessions` belongs to the embedding application, which may have made it before
        // wschat did (the migration then leaves it as it is): add the columns wschat reads
        // that it lacks, as the PostgreSQL migration does.
        let columns: Vec<String> =
            sqlx::query_scalar("SELECT name FROM pragma_table_info('sessions')")
                .fetch_all(&self.writer)
                .await?;
        for (column, add) in [
            ("room", "ALTER TABLE sessions ADD COLUMN room INTEGER"),
            (
                "expires_at",
                "ALTER TABLE sessions ADD COLUMN expires_at INTEGER",
            ),
        ] {
            if !columns.iter().any(|c| c == column) {
                sqlx::query(add).execute(&self.writer).await?;
            }
        }
        Ok(())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.reader).await?;
        Ok(())
    }

    async fn session(&self, hash: &KeyHash) -> Result<Option<Session>, StoreError> {
        self.connect_reads.session(hash).await
    }

    async fn create_session(
        &self,
        hash: &KeyHash,
        user: &str,
        room: Option<i64>,
    ) -> Result<(), StoreError> {
        sqlx::query(r#"INSERT INTO sessions (key, "user", room) VALUES (?1, ?2, ?3)"#)
            .bind(hash.as_str())
            .bind(user)
            .bind(room)
            .execute(&self.writer)
            .await?;
        Ok(())
    }

    async fn revoked_sessions(&self, keys: &[KeyHash]) -> Result<Vec<KeyHash>, StoreError> {
        let wanted = serde_json::to_string(&keys.iter().map(KeyHash::as_str).collect::<Vec<_>>())
            .map_err(|e| StoreError::Query(sqlx::Error::Protocol(e.to_string())))?;
        let rows: Vec<String> = sqlx::query_scalar(
            "SELECT j.value FROM json_each(?1) AS j
             WHERE NOT EXISTS (SELECT 1 FROM sessions s WHERE s.key = j.value
                               AND (s.expires_at IS NULL OR s.expires_at > ?2))",
        )
        .bind(wanted)
        .bind(now_ms())
        .fetch_all(&self.reader)
        .await?;
        Ok(crate::sessions::among(rows, keys))
    }

    async fn count_sessions(&self) -> Result<i64, StoreError> {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM sessions")
            .fetch_one(&self.reader)
            .await?;
        Ok(n)
    }

    async fn commit_batch(
        &self,
        batch: Arc<[NewMessage]>,
    ) -> Result<Vec<CommitOutcome>, StoreError> {
        self.commit.commit(batch).await
    }

    fn commit_thread(&self) -> Option<&dyn super::CommitThread> {
        Some(&self.commit)
    }

    async fn room_head(&self, room: &RoomName) -> Result<RoomHead, StoreError> {
        let row = sqlx::query(
            r#"SELECT r.last_seq,
                      (SELECT min(seq) FROM wschat_messages m WHERE m.room_id = r.id)
               FROM wschat_rooms r WHERE r.name = ?1"#,
        )
        .bind(room.as_str())
        .fetch_optional(&self.reader)
        .await?;
        Ok(match row {
            None => RoomHead {
                last_seq: 0,
                first_seq: 1,
            },
            Some(row) => {
                let last_seq = to_seq(row.try_get(0)?);
                let first: Option<i64> = row.try_get(1)?;
                RoomHead {
                    last_seq,
                    first_seq: first.map(to_seq).unwrap_or(last_seq + 1),
                }
            }
        })
    }

    async fn messages_after(
        &self,
        room: &RoomName,
        after: u64,
        limit: u32,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        let rows = sqlx::query(MESSAGES_AFTER)
            .bind(room.as_str())
            .bind(to_db(after))
            .bind(i64::from(limit))
            .fetch_all(&self.reader)
            .await?;
        rows.iter()
            .map(|r| message_from_row(room, r).map_err(StoreError::from))
            .collect()
    }

    async fn room_heads(&self, rooms: &[RoomName]) -> Result<Vec<(RoomName, u64)>, StoreError> {
        let mut heads = Vec::with_capacity(rooms.len());
        for room in rooms {
            let last: Option<i64> =
                sqlx::query_scalar("SELECT last_seq FROM wschat_rooms WHERE name = ?1")
                    .bind(room.as_str())
                    .fetch_optional(&self.reader)
                    .await?;
            if let Some(last) = last {
                heads.push((room.clone(), to_seq(last)));
            }
        }
        Ok(heads)
    }

    async fn heartbeat_node(&self, node: &NodeInfo) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO wschat_nodes (id, broker, started_at, heartbeat_at) VALUES (?1, ?2, ?3, ?3)
             ON CONFLICT (id) DO UPDATE SET heartbeat_at = excluded.heartbeat_at",
        )
        .bind(&node.id)
        .bind(&node.broker)
        .bind(now_ms())
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    async fn live_nodes(&self, max_age: Duration) -> Result<Vec<NodeInfo>, StoreError> {
        let oldest = now_ms() - i64::try_from(max_age.as_millis()).unwrap_or(i64::MAX);
        let rows = sqlx::query("SELECT id, broker FROM wschat_nodes WHERE heartbeat_at >= ?1")
            .bind(oldest)
            .fetch_all(&self.reader)
            .await?;
        rows.iter()
            .map(|r| {
                Ok(NodeInfo {
                    id: r.try_get(0)?,
                    broker: r.try_get(1)?,
                })
            })
            .collect()
    }

    async fn remove_node(&self, id: &str) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM wschat_nodes WHERE id = ?1")
            .bind(id)
            .execute(&self.writer)
            .await?;
        Ok(())
    }

    /// In transactions of at most `PRUNE_CHUNK` rows: SQLite has one writer, and the first
    /// prune of a large log in one transaction would hold the commits back for as long as
    /// it took (past their busy timeout, failing them).
    async fn prune(&self, keep: u64) -> Result<u64, StoreError> {
        let mut pruned = 0;
        loop {
            let done = sqlx::query(
                "DELETE FROM wschat_messages WHERE id IN (
                   SELECT m.id FROM wschat_messages m JOIN wschat_rooms r ON r.id = m.room_id
                   WHERE m.seq <= r.last_seq - ?1 LIMIT ?2)",
            )
            .bind(to_db(keep))
            .bind(PRUNE_CHUNK)
            .execute(&self.writer)
            .await?
            .rows_affected();
            pruned += done;
            if done < PRUNE_CHUNK as u64 {
                return Ok(pruned);
            }
        }
    }

    async fn messages_before(
        &self,
        room: &RoomName,
        before: Option<u64>,
        limit: u32,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        self.connect_reads
            .messages_before(room, before, limit)
            .await
    }

    async fn revoke_session(&self, hash: &KeyHash) -> Result<u64, StoreError> {
        let done = sqlx::query("DELETE FROM sessions WHERE key = ?1")
            .bind(hash.as_str())
            .execute(&self.writer)
            .await?;
        Ok(done.rows_affected())
    }

    async fn revoke_user_sessions(&self, user: &str) -> Result<u64, StoreError> {
        let done = sqlx::query(r#"DELETE FROM sessions WHERE "user" = ?1"#)
            .bind(user)
            .execute(&self.writer)
            .await?;
        Ok(done.rows_affected())
    }

    async fn list_rooms(
        &self,
        after: Option<&RoomName>,
        limit: u32,
    ) -> Result<Vec<(RoomName, u64)>, StoreError> {
        let rows = sqlx::query(ROOMS_AFTER)
            .bind(after.map(RoomName::as_str).unwrap_or(""))
            .bind(i64::from(limit))
            .fetch_all(&self.reader)
            .await?;
        let mut rooms = Vec::with_capacity(rows.len());
        for row in &rows {
            if let Ok(room) = RoomName::new(row.try_get::<String, _>(0)?) {
                rooms.push((room, to_seq(row.try_get(1)?)));
            }
        }
        Ok(rooms)
    }
}

#[cfg(test)]
mod tests {
    use rusqlite::{Connection, StatementStatus};

    /// A prune larger than one chunk deletes all it should, chunk after chunk, and keeps
    /// the newest messages of each room.
    #[tokio::test]
    async fn a_prune_larger_than_a_chunk_deletes_everything_past_what_is_kept() {
        use crate::store::commit_unheard;
        use wschat_protocol::RoomName;
        let dir = tempfile::tempdir().expect("a temporary folder");
        let url = format!("sqlite://{}", dir.path().join("prune.db").display());
        let store = crate::store::open(&url).await.expect("the store opens");
        store.migrate().await.expect("the schema applies");
        let (big, small) = (
            RoomName::new("big").expect("a name"),
            RoomName::new("small").expect("a name"),
        );
        let per_room = u64::try_from(super::PRUNE_CHUNK).expect("positive") + 1_000;
        commit_unheard(store.as_ref(), &big, per_room).await;
        commit_unheard(store.as_ref(), &small, 30).await;
        assert_eq!(
            store.prune(10).await.expect("the prune"),
            per_room - 10 + 20
        );
        let left = store.messages_after(&big, 0, 100).await.expect("a read");
        let seqs: Vec<u64> = left.iter().map(|m| m.seq).collect();
        assert_eq!(seqs, (per_room - 9..=per_room).collect::<Vec<_>>());
        assert_eq!(
            store
                .messages_after(&small, 0, 100)
                .await
                .expect("a read")
                .len(),
            10
        );
        assert_eq!(store.prune(10).await.expect("a second prune"), 0);
    }

    use super::{MESSAGES_AFTER, ROOMS_AFTER};
    use crate::store::sqlite_reader::MESSAGES_BEFORE;

    /// A connection on the schema, with one room.
    fn schema() -> Connection {
        let conn = Connection::open_in_memory().expect("in-memory database");
        conn.execute_batch(include_str!("../../../../migrations/sqlite/0001_init.sql"))
            .expect("the schema applies");
        conn.execute("INSERT INTO wschat_rooms (name) VALUES ('lobby')", [])
            .expect("a room");
        conn
    }

    /// How often `sql` was prepared again over three runs with three limits.
    fn reprepares(conn: &Connection, sql: &str) -> i32 {
        let mut statement = conn.prepare(sql).expect("the statement prepares");
        let parameters = statement.parameter_count();
        for limit in [10, 20, 30] {
            let mut rows = if parameters == 3 {
                statement.query(("lobby", 0_i64, limit))
            } else {
                statement.query(("", limit))
            }
            .expect("the statement runs");
            while rows.next().expect("a row or the end").is_some() {}
        }
        statement.get_status(StatementStatus::RePrepare)
    }

    /// An application that made `sessions` before wschat, with only the key and the user:
    /// the migration adds `room` and `expires_at`, and its sessions work.
    #[tokio::test]
    async fn a_sessions_table_made_by_the_application_gets_wschats_columns() {
        use crate::store::{hash_key, Store};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("app.db");
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(
            r#"CREATE TABLE sessions (key TEXT NOT NULL UNIQUE, "user" TEXT NOT NULL)"#,
        )
        .unwrap();
        let key = hash_key("k1");
        conn.execute(
            r#"INSERT INTO sessions (key, "user") VALUES (?1, 'Michael Redman')"#,
            [key.as_str()],
        )
        .unwrap();
        drop(conn);
        let store = super::SqliteStore::open(&format!("sqlite://{}", path.display()))
            .await
            .unwrap();
        store.migrate().await.unwrap();
        store.migrate().await.unwrap();
        let session = store
            .session(&key)
            .await
            .unwrap()
            .expect("the session is found");
        assert_eq!(
            (session.user.as_str(), session.room),
            ("Michael Redman", None)
        );
        assert!(store.revoked_sessions(&[key]).await.unwrap().is_empty());
    }

    #[test]
    fn no_statement_is_planned_again_for_its_limit() {
        let conn = schema();
        // The cause: a bare bound LIMIT is prepared again each time it is bound.
        assert_eq!(
            reprepares(&conn, &MESSAGES_AFTER.replace("LIMIT +?3", "LIMIT ?3")),
            3
        );
        for sql in [MESSAGES_AFTER, MESSAGES_BEFORE, ROOMS_AFTER] {
            assert_eq!(reprepares(&conn, sql), 0, "{sql}");
        }
    }
}
