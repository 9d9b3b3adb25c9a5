//! The reads of a connect (the session lookup, the history a join sends) on threads of our
//! own (`sqlite_threads`), each owning a read-only connection. One thread per core the
//! process may run on, at most four: on one core, one thread.
//!
//! Through sqlx's pool, as the other reads go, each query went to a worker thread and
//! came back row by row: with the server on one core, about 18 % of a connect's CPU. The
//! room head and the pages of a resume stay on the pool: moved here too, a storm of 5,000
//! resuming clients took twice as long to be back (`bench/RESULTS.md`, 2026-12-05).

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, OptionalExtension};
use wschat_protocol::RoomName;

use super::sqlite::{message_columns, to_db, to_seq};
use super::sqlite_threads::ConnThreads;
use super::{now_ms, KeyHash, Session, StoreError, StoredMessage};

/// Most read threads.
const MAX_THREADS: usize = 4;

/// The handle on the read threads. They end when the handle is dropped.
pub(super) struct Reader {
    threads: ConnThreads,
}

impl Reader {
    /// Open the database file at `path` (it exists, in WAL mode) read-only, once per
    /// thread, and start the threads.
    pub fn start(path: PathBuf, busy_timeout: Duration) -> Result<Self, StoreError> {
        let threads = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(MAX_THREADS);
        let threads = ConnThreads::start(
            "wschat-sqlite-read",
            threads,
            || open(&path, busy_timeout),
            || StoreError::ReaderGone,
        )?;
        Ok(Self { threads })
    }

    /// The session of key hash `hash`, unless it is missing or expired.
    pub async fn session(&self, hash: &KeyHash) -> Result<Option<Session>, StoreError> {
        let key = hash.clone();
        self.threads
            .run(move |conn| {
                let mut find = conn.prepare_cached(FIND_SESSION)?;
                let found = find
                    .query_row((key.as_str(), now_ms()), |row| {
                        Ok((row.get::<_, String>(0)?, row.get::<_, Option<i64>>(1)?))
                    })
                    .optional()?;
                Ok(found.map(|(user, room)| Session { key, user, room }))
            })
            .await
    }

    /// Up to `limit` of `room`'s messages before seq `before` (all, if `None`), oldest
    /// first.
    pub async fn messages_before(
        &self,
        room: &RoomName,
        before: Option<u64>,
        limit: u32,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        let room = room.clone();
        self.threads
            .run(move |conn| {
                let mut read = conn.prepare_cached(MESSAGES_BEFORE)?;
                let before = before.map_or(i64::MAX, to_db);
                let rows = read.query_map((room.as_str(), before, i64::from(limit)), |row| {
                    message(&room, row)
                })?;
                let mut messages = rows.collect::<Result<Vec<_>, _>>()?;
                messages.reverse();
                Ok(messages)
            })
            .await
    }
}

/// A row of `message_columns!`, in its order (as `sqlite::message_from_row`).
fn message(room: &RoomName, row: &rusqlite::Row<'_>) -> rusqlite::Result<StoredMessage> {
    Ok(StoredMessage {
        room: room.clone(),
        id: row.get(0)?,
        seq: to_seq(row.get(1)?),
        user: row.get(2)?,
        text: row.get(3)?,
        time_ms: row.get(4)?,
        client_msg_id: row.get(5)?,
    })
}

const FIND_SESSION: &str = r#"SELECT "user", room FROM sessions
    WHERE key = ?1 AND (expires_at IS NULL OR expires_at > ?2)"#;

/// `LIMIT +?3`: a bare `LIMIT ?3` is planned again at each run (`sqlite::MESSAGES_AFTER`).
pub(super) const MESSAGES_BEFORE: &str = concat!(
    "SELECT ",
    message_columns!(),
    " FROM wschat_messages m JOIN wschat_rooms r ON r.id = m.room_id
      WHERE r.name = ?1 AND m.seq < ?2 ORDER BY m.seq DESC LIMIT +?3"
);

fn open(path: &Path, busy_timeout: Duration) -> rusqlite::Result<Connection> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(busy_timeout)?;
    Ok(conn)
}
