//! The SQLite commit thread: one OS thread (`sqlite_threads`) owns the connection that
//! commits message batches. Each batch is one job handed to it and one answer back
//! (`commit`), or the committer's whole loop runs on it (`CommitThread`) and commits each
//! batch there, without the hand-offs.
//! Through sqlx's SQLite connection a batch of one message was about 15 context switches
//! on one core; as a job it is two, whatever its size. The statements are prepared once and
//! bound per message (no JSON round trip).
//!
//! A checkpoint (copying the WAL back into the database file) runs after a commit's
//! outcomes are handed on (`CommitOn::upkeep`), not inside the commit: SQLite's automatic
//! checkpoint runs in the COMMIT that takes the WAL past 1,000 pages, so that batch's
//! answers waited for the checkpoint's writes and two flushes (in the rooms scenario about
//! 7 checkpoints a second, 5.8 ms each on average). On a thread of its own beside the
//! commits it was worse: it took the core from the fan-out, and with commits appending
//! meanwhile the WAL seldom started again from its beginning, so there were twice as many.

use std::cell::Cell;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rusqlite::{Connection, OpenFlags, OptionalExtension, TransactionBehavior};
use wschat_protocol::RoomName;

use super::sqlite_threads::ConnThreads;
use super::{
    now_ms, BatchPlan, CommitLoop, CommitOn, CommitOutcome, CommitThread, NewMessage, StoreError,
    StoredMessage,
};

/// A commit that leaves the WAL at this many pages or more calls for a checkpoint (SQLite's
/// own default for its automatic one).
const CHECKPOINT_PAGES: i32 = 1_000;

/// The handle on the commit thread. The thread ends when the handle is dropped.
pub(super) struct Writer {
    thread: ConnThreads,
    checkpoints: Arc<Checkpoints>,
}

impl Writer {
    /// Open the database file at `path` (it exists and is migrated) and start the thread.
    pub fn start(path: PathBuf, busy_timeout: Duration) -> Result<Self, StoreError> {
        Self::start_with(path, busy_timeout, CHECKPOINT_PAGES)
    }

    /// … with a checkpoint once a commit leaves the WAL at `checkpoint_pages` or more.
    fn start_with(
        path: PathBuf,
        busy_timeout: Duration,
        checkpoint_pages: i32,
    ) -> Result<Self, StoreError> {
        let thread = ConnThreads::start(
            "wschat-sqlite-commit",
            1,
            || {
                let conn = open(&path, busy_timeout)?;
                // In place of SQLite's automatic checkpoint (this replaces its hook): the
                // hook only notes the WAL's size; `Checkpoints` acts on it after the commit.
                conn.wal_hook(Some(note_wal_pages));
                Ok(conn)
            },
            || StoreError::WriterGone,
        )?;
        let checkpoints = Arc::new(Checkpoints {
            at_pages: checkpoint_pages,
            runs: AtomicU64::new(0),
            failures: Failures::default(),
        });
        Ok(Self {
            thread,
            checkpoints,
        })
    }

    /// Commit `batch` in one transaction; the outcomes are in the batch's order. A
    /// checkpoint it calls for runs before the answer (this path is the fallback when the
    /// loop cannot run on the thread, and the tests').
    pub async fn commit(&self, batch: Arc<[NewMessage]>) -> Result<Vec<CommitOutcome>, StoreError> {
        let checkpoints = self.checkpoints.clone();
        self.thread
            .run(move |conn| {
                let outcomes = commit(conn, &batch);
                // A panic in the checkpoint (a bug) must not take the committed batch's
                // answer with it: its senders would be told `not stored`.
                let checkpoint = std::panic::AssertUnwindSafe(|| checkpoints.if_due(conn));
                if std::panic::catch_unwind(checkpoint).is_err() {
                    tracing::error!("a checkpoint after a commit panicked");
                }
                outcomes
            })
            .await
    }
}

impl CommitThread for Writer {
    fn run_loop(&self, body: CommitLoop) -> Result<(), StoreError> {
        let checkpoints = self.checkpoints.clone();
        self.thread.spawn(move |conn| {
            body(&mut OnThread {
                conn,
                checkpoints: &checkpoints,
            })
        })
    }
}

/// The commit loop's view of the commit thread.
struct OnThread<'a> {
    conn: &'a mut Connection,
    checkpoints: &'a Checkpoints,
}

impl CommitOn for OnThread<'_> {
    fn commit(&mut self, batch: &[NewMessage]) -> Result<Vec<CommitOutcome>, StoreError> {
        commit(self.conn, batch)
    }

    fn upkeep(&mut self) {
        self.checkpoints.if_due(self.conn);
    }
}

fn open(path: &std::path::Path, busy_timeout: Duration) -> rusqlite::Result<Connection> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(busy_timeout)?;
    // The database is in WAL mode already (a property of the file); these two are per
    // connection: fsync at every commit (and around a checkpoint), and the same foreign
    // keys as every other one.
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", true)?;
    Ok(conn)
}

thread_local! {
    /// The WAL's size in pages after the last commit on this thread (`note_wal_pages`),
    /// until a checkpoint looks at it.
    static WAL_PAGES: Cell<i32> = const { Cell::new(0) };
}

/// The commit connection's WAL hook: SQLite calls it on the committing thread, in the
/// COMMIT, with the WAL's size in pages.
fn note_wal_pages(_: &rusqlite::hooks::Wal, pages: std::ffi::c_int) -> rusqlite::Result<()> {
    WAL_PAGES.set(pages);
    Ok(())
}

/// The commit thread's checkpoints.
struct Checkpoints {
    at_pages: i32,
    runs: AtomicU64,
    failures: Failures,
}

impl Checkpoints {
    /// On the commit thread, after a commit: checkpoint when it left the WAL at `at_pages`
    /// or more. Passive: it copies what no reader still needs; the WAL starts again from
    /// its beginning at the next commit once all of it is copied.
    fn if_due(&self, conn: &Connection) {
        let pages = WAL_PAGES.replace(0);
        if pages < self.at_pages {
            return;
        }
        self.runs.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        let result = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |row| {
            Ok((row.get::<_, i64>(1)?, row.get::<_, i64>(2)?))
        });
        metrics::histogram!("wschat_sqlite_checkpoint_seconds")
            .record(started.elapsed().as_secs_f64());
        match result {
            Ok((log, copied)) => {
                let failed = self.failures.succeeded();
                if failed > 0 {
                    tracing::info!(failed, "SQLite checkpoint succeeded again");
                }
                tracing::trace!(log, copied, "checkpoint");
            }
            Err(e) => {
                metrics::counter!("wschat_sqlite_checkpoint_failures_total").increment(1);
                if let Some(failures) = self.failures.failed() {
                    tracing::warn!(error = %e, failures, "SQLite checkpoint failed");
                }
            }
        }
    }
}

/// Checkpoints failing in a row. A failing checkpoint is tried again after every commit
/// past the size (on a full or failing disk, for as long as that lasts): its warning is
/// logged at the 1st, 2nd, 4th, 8th… failure in a row, and once when one succeeds again.
#[derive(Default)]
struct Failures(AtomicU64);

impl Failures {
    /// One more failure; `Some(failures in a row)` when it is to be logged.
    fn failed(&self) -> Option<u64> {
        let n = self.0.fetch_add(1, Ordering::Relaxed) + 1;
        n.is_power_of_two().then_some(n)
    }

    /// A success: how many failed in a row before it.
    fn succeeded(&self) -> u64 {
        self.0.swap(0, Ordering::Relaxed)
    }
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
    let outcomes = plan.finish(outcomes)?;
    // A failure of the COMMIT itself (its sync, say) can leave the batch's frames in the
    // WAL, where the next open's recovery finds them: its outcome is unknown, and its
    // senders must not be told "not stored" (a legacy one would send it again).
    tx.commit()
        .map_err(|e| StoreError::Unconfirmed(Box::new(StoreError::Sqlite(e))))?;
    Ok(outcomes)
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    /// A migrated database file in WAL mode, and the folder that holds it.
    fn database() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().expect("a temporary folder");
        let path = dir.path().join("wschat.db");
        let conn = Connection::open(&path).expect("the database opens");
        conn.pragma_update(None, "journal_mode", "WAL")
            .expect("WAL mode");
        conn.execute_batch(include_str!("../../../../migrations/sqlite/0001_init.sql"))
            .expect("the schema applies");
        (dir, path)
    }

    fn message(i: usize) -> NewMessage {
        NewMessage {
            room: RoomName::new(format!("room-{}", i % 7)).expect("a room name"),
            user: "ann".into(),
            text: format!("message {i} {}", "x".repeat(300)),
            client_msg_id: None,
        }
    }

    #[tokio::test]
    async fn a_commit_past_the_size_is_followed_by_a_checkpoint_and_the_wal_starts_again() {
        let (_dir, path) = database();
        let wal = path.with_extension("db-wal");
        let page_size: i64 = Connection::open(&path)
            .and_then(|c| c.pragma_query_value(None, "page_size", |row| row.get(0)))
            .expect("the page size");
        let writer = Writer::start_with(path, Duration::from_secs(5), 8).expect("the writer");
        for i in 0..200 {
            writer
                .commit(Arc::from(vec![message(i)]))
                .await
                .expect("the commit");
        }
        assert!(writer.checkpoints.runs.load(Ordering::Relaxed) > 0);
        // The WAL file keeps the size it reached: frames are written from its beginning
        // again after a checkpoint. Without checkpoints 200 commits would grow it to
        // hundreds of pages (SQLite's own checkpoint is off: the hook replaced it).
        // A WAL frame is a page and its 24-byte header.
        let pages =
            std::fs::metadata(&wal).expect("the WAL file").len() / (page_size.unsigned_abs() + 24);
        assert!(pages < 20, "the WAL reached {pages} pages");
    }

    /// A batch whose COMMIT fails is `Unconfirmed`; one that fails before it (a statement's
    /// error: rolled back) is not.
    #[test]
    fn a_failed_commit_statement_leaves_the_outcome_unknown() {
        let (_dir, path) = database();
        let mut conn = Connection::open(&path).expect("the database opens");
        conn.commit_hook(Some(|| true)).expect("the hook");
        let failed = commit(&mut conn, &[message(1)]);
        assert!(
            matches!(failed, Err(StoreError::Unconfirmed(_))),
            "{failed:?}"
        );
        conn.commit_hook(None::<fn() -> bool>).expect("no hook");
        conn.execute_batch("DROP TABLE wschat_messages")
            .expect("the table goes");
        let refused = commit(&mut conn, &[message(2)]);
        assert!(matches!(refused, Err(StoreError::Sqlite(_))), "{refused:?}");
    }

    #[test]
    fn failing_checkpoints_are_logged_ever_more_rarely_and_again_after_a_success() {
        let failures = Failures::default();
        let logged: Vec<u64> = (0..20).filter_map(|_| failures.failed()).collect();
        assert_eq!(logged, [1, 2, 4, 8, 16]);
        assert_eq!(failures.succeeded(), 20);
        assert_eq!(failures.succeeded(), 0);
        assert_eq!(failures.failed(), Some(1));
    }

    /// In the loop, the checkpoint comes after the commit's outcomes, in `upkeep`.
    #[tokio::test]
    async fn in_the_loop_the_checkpoint_waits_for_upkeep() {
        let (_dir, path) = database();
        let writer = Writer::start_with(path, Duration::from_secs(5), 8).expect("the writer");
        let checkpoints = writer.checkpoints.clone();
        // Per batch: (WAL pages after the commit, checkpoints run by then, after upkeep).
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (done_tx, done) = tokio::sync::oneshot::channel();
        let log = seen.clone();
        writer
            .run_loop(Box::new(move |on: &mut dyn CommitOn| {
                for i in 0..100 {
                    on.commit(&[message(i)]).expect("the commit");
                    let pages = WAL_PAGES.get();
                    let before = checkpoints.runs.load(Ordering::Relaxed);
                    on.upkeep();
                    let after = checkpoints.runs.load(Ordering::Relaxed);
                    log.lock().expect("the log").push((pages, before, after));
                }
                let _ = done_tx.send(());
            }))
            .expect("the loop starts");
        done.await.expect("the loop ran");
        let seen = seen.lock().expect("the log");
        let mut runs = 0;
        for &(pages, before, after) in seen.iter() {
            assert_eq!(before, runs, "a checkpoint ran inside a commit");
            let due = pages >= 8;
            assert_eq!(after, runs + u64::from(due), "{pages} pages");
            runs = after;
        }
        assert!(runs > 0);
    }
}
