//! The embedded store: SQLite in WAL mode with `synchronous = FULL` (an acknowledged
//! message survives a crash). One connection writes (SQLite has one writer anyway, and
//! `BEGIN IMMEDIATE` takes the write lock up front); a small pool reads beside it, so
//! history reads never wait for commits.

use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteRow, SqliteSynchronous,
};
use sqlx::{Connection, Row};
use wschat_protocol::RoomName;

use super::{
    now_ms, outcomes_from_rows, BatchPlan, CommitOutcome, CommitRow, KeyHash, NewMessage, NodeInfo,
    RoomHead, Session, Store, StoreError, StoreKind, StoredMessage,
};

pub struct SqliteStore {
    writer: SqlitePool,
    reader: SqlitePool,
}

impl SqliteStore {
    /// Open (creating the file and its folder when missing) the database at `url`.
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::from_str(url)
            .map_err(|e| StoreError::BadUrl(format!("{url}: {e}")))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(10));
        let in_memory = url.contains(":memory:") || url.contains("mode=memory");
        if !in_memory {
            if let Some(parent) = options.get_filename().parent() {
                if parent != Path::new("") && !parent.exists() {
                    std::fs::create_dir_all(parent)?;
                }
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
        // An in-memory database is private to its connection: read through the writer.
        let reader = if in_memory {
            writer.clone()
        } else {
            SqlitePoolOptions::new()
                .max_connections(4)
                .test_before_acquire(false)
                .connect_with(options)
                .await
                .map_err(StoreError::Unavailable)?
        };
        Ok(Self { writer, reader })
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

fn to_seq(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn to_db(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// The columns `message_from_row` reads, in its order.
macro_rules! message_columns {
    () => {
        r#"m.id, m.seq, m."user", m.text, m.created_at, m.client_msg_id"#
    };
}

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

    async fn migrate(&self) -> Result<(), StoreError> {
        super::migrator(MIGRATIONS).run(&self.writer).await?;
        Ok(())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.reader).await?;
        Ok(())
    }

    async fn session(&self, hash: &KeyHash) -> Result<Option<Session>, StoreError> {
        let row = sqlx::query(
            r#"SELECT "user", room FROM sessions
               WHERE key = ?1 AND (expires_at IS NULL OR expires_at > ?2)"#,
        )
        .bind(hash.as_str())
        .bind(now_ms())
        .fetch_optional(&self.reader)
        .await?;
        row.map(|r| -> Result<Session, StoreError> {
            Ok(Session {
                key: hash.clone(),
                user: r.try_get(0)?,
                room: r.try_get(1)?,
            })
        })
        .transpose()
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

    async fn valid_sessions(
        &self,
        keys: &[KeyHash],
    ) -> Result<std::collections::HashSet<KeyHash>, StoreError> {
        let wanted = serde_json::to_string(&keys.iter().map(KeyHash::as_str).collect::<Vec<_>>())
            .map_err(|e| StoreError::Query(sqlx::Error::Protocol(e.to_string())))?;
        let rows: Vec<String> = sqlx::query_scalar(
            "SELECT key FROM sessions
             WHERE key IN (SELECT value FROM json_each(?1))
               AND (expires_at IS NULL OR expires_at > ?2)",
        )
        .bind(wanted)
        .bind(now_ms())
        .fetch_all(&self.reader)
        .await?;
        Ok(crate::sessions::valid_set(rows, keys))
    }

    async fn count_sessions(&self) -> Result<i64, StoreError> {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM sessions")
            .fetch_one(&self.reader)
            .await?;
        Ok(n)
    }

    async fn commit_batch(&self, batch: &[NewMessage]) -> Result<Vec<CommitOutcome>, StoreError> {
        let mut conn = self.writer.acquire().await?;
        match commit_one_command(&mut conn, batch).await {
            Ok(Some(outcomes)) => return Ok(outcomes),
            // A repeat in the batch: the transaction path looks repeats up.
            Ok(None) => {}
            Err(e) => {
                // Whatever the command began is undone; "no transaction is active" when
                // it failed before its BEGIN.
                let _no_transaction = sqlx::query("ROLLBACK").execute(&mut *conn).await;
                match e {
                    // A `(user, client_msg_id)` already stored: nothing was committed.
                    StoreError::Query(sqlx::Error::Database(e)) if e.is_unique_violation() => {}
                    e => return Err(e),
                }
            }
        }
        commit_in_transaction(&mut conn, batch).await
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
        let rows = sqlx::query(concat!(
            "SELECT ",
            message_columns!(),
            " FROM wschat_messages m JOIN wschat_rooms r ON r.id = m.room_id
              WHERE r.name = ?1 AND m.seq > ?2 ORDER BY m.seq LIMIT ?3"
        ))
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

    async fn prune(&self, keep: u64) -> Result<u64, StoreError> {
        let done = sqlx::query(
            "DELETE FROM wschat_messages WHERE id IN (
               SELECT m.id FROM wschat_messages m JOIN wschat_rooms r ON r.id = m.room_id
               WHERE m.seq <= r.last_seq - ?1)",
        )
        .bind(to_db(keep))
        .execute(&self.writer)
        .await?;
        Ok(done.rows_affected())
    }

    async fn messages_before(
        &self,
        room: &RoomName,
        before: Option<u64>,
        limit: u32,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            message_columns!(),
            " FROM wschat_messages m JOIN wschat_rooms r ON r.id = m.room_id
              WHERE r.name = ?1 AND m.seq < ?2 ORDER BY m.seq DESC LIMIT ?3"
        ))
        .bind(room.as_str())
        .bind(before.map(to_db).unwrap_or(i64::MAX))
        .bind(i64::from(limit))
        .fetch_all(&self.reader)
        .await?;
        let mut messages = rows
            .iter()
            .map(|r| message_from_row(room, r))
            .collect::<Result<Vec<_>, _>>()?;
        messages.reverse();
        Ok(messages)
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
        let rows = sqlx::query(
            "SELECT name, last_seq FROM wschat_rooms WHERE name > ?1 ORDER BY name LIMIT ?2",
        )
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

/// One batch as one command to SQLite's worker thread (each command is a round trip to
/// that thread, two context switches): `BEGIN IMMEDIATE`, each room's counter bumped by
/// its count of new messages (created on its first), the messages numbered from the
/// bumped counters in batch order and inserted, `COMMIT`; the same numbering as
/// PostgreSQL's `COMMIT_STATEMENT`. The batch travels as one JSON array of `[room, user,
/// text, client_msg_id]`, read by `json_each`. A `(user, client_msg_id)` already stored
/// (a retry) violates the unique index; the caller rolls back and goes the transaction
/// path, which looks repeats up.
const COMMIT_COMMAND: &str = r#"
BEGIN IMMEDIATE;
INSERT INTO wschat_rooms AS r (name, last_seq)
    SELECT j.value ->> 0, count(*) FROM json_each(?1) AS j WHERE true GROUP BY j.value ->> 0
    ON CONFLICT (name) DO UPDATE SET last_seq = r.last_seq + excluded.last_seq
    RETURNING id, last_seq, NULL, name;
INSERT INTO wschat_messages (room_id, seq, "user", text, created_at, client_msg_id)
    SELECT r.id,
           r.last_seq - count(*) OVER w + row_number() OVER (w ORDER BY j.key),
           j.value ->> 1, j.value ->> 2, ?2, j.value ->> 3
    FROM json_each(?1) AS j JOIN wschat_rooms r ON r.name = j.value ->> 0
    WINDOW w AS (PARTITION BY j.value ->> 0)
    ORDER BY j.key
    RETURNING room_id, seq, id, NULL;
COMMIT;
"#;

/// One batch in one command on `conn`; see [`COMMIT_COMMAND`]. Batches with a repeat
/// inside them go the transaction path at once (`None`).
async fn commit_one_command(
    conn: &mut SqliteConnection,
    batch: &[NewMessage],
) -> Result<Option<Vec<CommitOutcome>>, StoreError> {
    let plan = BatchPlan::new(batch);
    if !plan.repeats.is_empty() {
        return Ok(None);
    }
    let input: Vec<_> = batch
        .iter()
        .map(|m| {
            (
                m.room.as_str(),
                m.user.as_str(),
                m.text.as_str(),
                m.client_msg_id.as_deref(),
            )
        })
        .collect();
    let time_ms = now_ms();
    let rows = sqlx::query(COMMIT_COMMAND)
        .bind(serde_json::to_string(&input).map_err(json_error)?)
        .bind(time_ms)
        .fetch_all(&mut *conn)
        .await?;
    let rows = rows
        .iter()
        .map(CommitRow::read)
        .collect::<Result<Vec<_>, sqlx::Error>>()?;
    outcomes_from_rows(batch, plan, rows, time_ms).map(Some)
}

fn json_error(e: serde_json::Error) -> StoreError {
    StoreError::Query(sqlx::Error::Encode(Box::new(e)))
}

/// One batch in one transaction on `conn`, a round trip per statement: the path of a batch
/// that repeats a `client_msg_id`, or retries one already stored.
async fn commit_in_transaction(
    conn: &mut SqliteConnection,
    batch: &[NewMessage],
) -> Result<Vec<CommitOutcome>, StoreError> {
    let mut tx = conn.begin_with("BEGIN IMMEDIATE").await?;
    let mut outcomes: Vec<Option<CommitOutcome>> = vec![None; batch.len()];
    let plan = BatchPlan::new(batch);
    for &i in &plan.lookups {
        let msg = &batch[i];
        let existing = sqlx::query(concat!(
            "SELECT ",
            message_columns!(),
            r#", r.name FROM wschat_messages m
               JOIN wschat_rooms r ON r.id = m.room_id
               WHERE m."user" = ?1 AND m.client_msg_id = ?2"#
        ))
        .bind(&msg.user)
        .bind(&msg.client_msg_id)
        .fetch_optional(&mut *tx)
        .await?;
        if let Some(row) = existing {
            let name: String = row.try_get(6)?;
            let room = RoomName::new(name).unwrap_or_else(|_| msg.room.clone());
            outcomes[i] = Some(CommitOutcome::Duplicate(Arc::new(message_from_row(
                &room, &row,
            )?)));
        }
    }
    let by_room = plan.new_by_room(batch, &outcomes);
    let time_ms = now_ms();
    for (room, indices) in by_room {
        sqlx::query("INSERT INTO wschat_rooms (name) VALUES (?1) ON CONFLICT (name) DO NOTHING")
            .bind(room.as_str())
            .execute(&mut *tx)
            .await?;
        let count = i64::try_from(indices.len()).unwrap_or(i64::MAX);
        let row = sqlx::query(
            "UPDATE wschat_rooms SET last_seq = last_seq + ?1 WHERE name = ?2 RETURNING id, last_seq",
        )
        .bind(count)
        .bind(room.as_str())
        .fetch_one(&mut *tx)
        .await?;
        let room_id: i64 = row.try_get(0)?;
        let last_seq = to_seq(row.try_get(1)?);
        let first_seq = last_seq + 1 - indices.len() as u64;
        for (seq, i) in (first_seq..).zip(indices) {
            let msg = &batch[i];
            let id: i64 = sqlx::query_scalar(
                r#"INSERT INTO wschat_messages
                     (room_id, seq, "user", text, created_at, client_msg_id)
                   VALUES (?1, ?2, ?3, ?4, ?5, ?6) RETURNING id"#,
            )
            .bind(room_id)
            .bind(to_db(seq))
            .bind(&msg.user)
            .bind(&msg.text)
            .bind(time_ms)
            .bind(&msg.client_msg_id)
            .fetch_one(&mut *tx)
            .await?;
            outcomes[i] = Some(msg.stored(seq, id, time_ms));
        }
    }
    tx.commit().await?;
    plan.finish(outcomes)
}
