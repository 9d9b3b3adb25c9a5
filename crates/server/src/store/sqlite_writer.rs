//! The SQLite commit thread: one OS thread (`sqlite_threads`) owns the connection that
//! commits message batches. Each batch is one job handed to it and one answer back
//! (`commit`), or the committer's whole loop runs on it (`CommitThread`) and commits each
//! batch there, without the hand-offs.
//! Through sqlx's SQLite connection a batch of one message was about 15 context switches
//! on one core; as a job it is two, whatever its size. The statements are prepared once and
//! bound per message (no JSON round trip).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, OptionalExtension, TransactionBehavior};
use wschat_protocol::RoomName;

use super::sqlite_threads::ConnThreads;
use super::{
    now_ms, BatchPlan, CommitLoop, CommitOutcome, CommitThread, NewMessage, StoreError,
    StoredMessage,
};

/// The handle on the commit thread. The thread ends when the handle is dropped.
pub(super) struct Writer {
    thread: ConnThreads,
}

impl Writer {
    /// Open the database file at `path` (it exists and is migrated) and start the thread.
    pub fn start(path: PathBuf, busy_timeout: Duration) -> Result<Self, StoreError> {
        let thread = ConnThreads::start(
            "wschat-sqlite-commit",
            1,
            || open(&path, busy_timeout),
            || StoreError::WriterGone,
        )?;
        Ok(Self { thread })
    }

    /// Commit `batch` in one transaction; the outcomes are in the batch's order.
    pub async fn commit(&self, batch: Arc<[NewMessage]>) -> Result<Vec<CommitOutcome>, StoreError> {
        self.thread.run(move |conn| commit(conn, &batch)).await
    }
}

impl CommitThread for Writer {
    fn run_loop(&self, body: CommitLoop) -> Result<(), StoreError> {
        self.thread
            .spawn(move |conn| body(&mut |batch: &[NewMessage]| commit(conn, batch)))
    }
}

fn open(path: &std::path::Path, busy_timeout: Duration) -> rusqlite::Result<Connection> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(busy_timeout)?;
    // The database is in WAL mode already (a property of the file); these two are per
    // connection: fsync at every commit, and the same foreign keys as every other one.
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", true)?;
    Ok(conn)
}

/// Look a retry up: the first message with this `(user, client_msg_id)`.
const FIND_REPEAT: &str = r#"SELECT m.id, m.seq, m.text, m.created_at, r.name
    FROM wschat_messages m JOIN wschat_rooms r ON r.id = m.room_id
    WHERE m."user" = ?1 AND m.client_msg_id = ?2"#;

/// Bump a room's counter by its count of new messages (creating the room on its first).
const BUMP_ROOM: &str = "INSERT INTO wschat_rooms (name, last_seq) VALUES (?1, ?2)
    ON CONFLICT (name) DO UPDATE SET last_seq = last_seq + excluded.last_seq
    RETURNING id, last_seq";

const INSERT_MESSAGE: &str = r#"INSERT INTO wschat_messages
    (room_id, seq, "user", text, created_at, client_msg_id) VALUES (?1, ?2, ?3, ?4, ?5, ?6)"#;

/// One batch in one transaction: retries looked up first (so a repeat takes no seq), then
/// each room's counter bumped in name order and its new messages numbered from it.
/// Dropping the transaction on an error rolls it back.
fn commit(conn: &mut Connection, batch: &[NewMessage]) -> Result<Vec<CommitOutcome>, StoreError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let plan = BatchPlan::new(batch);
    let mut outcomes: Vec<Option<CommitOutcome>> = vec![None; batch.len()];
    if !plan.lookups.is_empty() {
        let mut find = tx.prepare_cached(FIND_REPEAT)?;
        for &i in &plan.lookups {
            let msg = &batch[i];
            let first = find
                .query_row((&msg.user, &msg.client_msg_id), |row| {
                    let name: String = row.get(4)?;
                    Ok(StoredMessage {
                        room: RoomName::new(name).unwrap_or_else(|_| msg.room.clone()),
                        id: row.get(0)?,
                        seq: u64::try_from(row.get::<_, i64>(1)?).unwrap_or(0),
                        user: msg.user.clone(),
                        text: row.get(2)?,
                        time_ms: row.get(3)?,
                        client_msg_id: msg.client_msg_id.clone(),
                    })
                })
                .optional()?;
            outcomes[i] = first.map(|m| CommitOutcome::Duplicate(Arc::new(m)));
        }
    }
    let by_room = plan.new_by_room(batch, &outcomes);
    let time_ms = now_ms();
    {
        let mut bump = tx.prepare_cached(BUMP_ROOM)?;
        let mut insert = tx.prepare_cached(INSERT_MESSAGE)?;
        for (room, indices) in by_room {
            let count = i64::try_from(indices.len()).unwrap_or(i64::MAX);
            let (room_id, last_seq): (i64, i64) =
                bump.query_row((room.as_str(), count), |row| Ok((row.get(0)?, row.get(1)?)))?;
            let first_seq = last_seq - count + 1;
            for (seq, i) in (first_seq..).zip(indices) {
                let msg = &batch[i];
                let id = insert.insert((
                    room_id,
                    seq,
                    &msg.user,
                    &msg.text,
                    time_ms,
                    &msg.client_msg_id,
                ))?;
                outcomes[i] = Some(msg.stored(u64::try_from(seq).unwrap_or(0), id, time_ms));
            }
        }
    }
    tx.commit()?;
    plan.finish(outcomes)
}
