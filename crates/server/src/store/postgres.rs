//! PostgreSQL, the store of record for one node or many. Durable defaults are kept
//! (fsync, synchronous_commit, logged tables). A batch is one transaction of a few
//! round trips whatever its size: rooms are locked in name order (`FOR UPDATE`), their
//! counters bumped, and every message inserted by one `INSERT … SELECT FROM UNNEST`.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions, PgRow};
use sqlx::Connection;
use sqlx::Row;
use wschat_protocol::RoomName;

use super::{
    now_ms, outcomes_from_rows, BatchPlan, CommitOutcome, CommitRow, KeyHash, NewMessage, NodeInfo,
    RoomHead, Session, Store, StoreError, StoreKind, StoredMessage,
};

pub struct PgStore {
    /// Reads, sessions, retention.
    pool: PgPool,
    /// The connects' session lookups, several to a query.
    lookups: SessionLookups,
    /// The committer's own connection, outside the pool: history reads, however many or
    /// slow, never make a commit wait for a connection, and a commit costs no pool
    /// health-check round trips. Taken out while a batch runs and put back only after a
    /// clean commit, so a failed or abandoned batch never leaves it half-used: the next
    /// batch connects afresh (this is also how the store recovers after a restart).
    /// The committer's connection, and when it last answered.
    writer: tokio::sync::Mutex<Option<(PgConnection, Instant)>>,
    writer_options: PgConnectOptions,
    /// Migrations run on a connection of their own, without the reads' statement timeout.
    migrate_options: PgConnectOptions,
}

/// Longest a connection attempt (pool or writer) waits.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A statement of a commit that runs longer (a locked table, a stuck disk) is cancelled by
/// the server: the batch is answered `unavailable` and retried, never left hanging.
const COMMIT_STATEMENT_TIMEOUT: &str = "5s";
/// Longest the committer waits for the answer to a batch (its statements, each bounded
/// by `COMMIT_STATEMENT_TIMEOUT` on the server, included).
const COMMIT_ANSWER_TIMEOUT: Duration = Duration::from_secs(15);
/// A pooled connection idle for longer than this is pinged before it is used.
const IDLE_BEFORE_PING: Duration = Duration::from_secs(1);
/// Attempts of the transaction path for a batch whose insert keeps meeting a
/// `(user, client_msg_id)` another node committed after the attempt's lookup.
const TRANSACTION_ATTEMPTS: u32 = 3;
/// A commit transaction that sits idle this long (its node was paused or hung between two
/// statements) is ended by the server: it holds its rooms' counter rows, and every other
/// node's commits to those rooms would wait for it. Rolled back, it was never acked.
const COMMIT_IDLE_IN_TRANSACTION_TIMEOUT: &str = "2s";
/// Reads: history pages are small; anything this slow is stuck.
const READ_STATEMENT_TIMEOUT: &str = "30s";
/// The oldest PostgreSQL the migrations run on (`server_version_num` of 11.0).
const MIN_SERVER_VERSION_NUM: u32 = 110_000;
/// Migrations: none. Importing a large nodejschat log, or hashing a large `sessions`
/// table, is one statement that may take minutes; cut short, it fails every start (and
/// the migrations before it are committed). `0` also overrides a role's own timeout.
const MIGRATE_STATEMENT_TIMEOUT: &str = "0";

/// Most session lookups asked in one query.
const MAX_LOOKUP_BATCH: usize = 512;

/// Most session lookup queries at once: as many as the pool's smallest size, so that a
/// stuck query (a database going away) holds up only the lookups it carries.
const LOOKUP_QUERIES: usize = 4;

/// Session lookups share queries: the lookups of connects that arrive while the queries
/// in flight run are asked together in the next one (`key = ANY($1)`). Each connect's
/// lookup was a query round trip of its own, about a quarter of a connect's CPU on one
/// core and the database's work besides: in a burst of connects most of that is saved,
/// and a lone connect waits for one query as before. Every answer comes from a query that
/// started after its lookup was asked, so a deleted session is never found.
struct SessionLookups {
    tx: tokio::sync::mpsc::UnboundedSender<Lookup>,
}

type Lookup = (
    KeyHash,
    tokio::sync::oneshot::Sender<Result<Option<Session>, StoreError>>,
);

impl SessionLookups {
    /// Start the task; it ends when the store is dropped.
    fn start(pool: PgPool) -> Self {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(take_lookups(pool, rx));
        Self { tx }
    }

    async fn session(&self, hash: &KeyHash) -> Result<Option<Session>, StoreError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.tx
            .send((hash.clone(), tx))
            .map_err(|_| StoreError::LookupsGone)?;
        rx.await.map_err(|_| StoreError::LookupsGone)?
    }
}

/// The lookup task: once a query may start (`LOOKUP_QUERIES`), it takes every waiting
/// lookup (up to `MAX_LOOKUP_BATCH`) and starts their query.
async fn take_lookups(pool: PgPool, mut rx: tokio::sync::mpsc::UnboundedReceiver<Lookup>) {
    let queries = Arc::new(tokio::sync::Semaphore::new(LOOKUP_QUERIES));
    loop {
        let Ok(query) = Arc::clone(&queries).acquire_owned().await else {
            return;
        };
        let mut batch = Vec::with_capacity(rx.len().clamp(1, MAX_LOOKUP_BATCH));
        if rx.recv_many(&mut batch, MAX_LOOKUP_BATCH).await == 0 {
            return;
        }
        let pool = pool.clone();
        tokio::spawn(async move {
            look_up(&pool, batch).await;
            drop(query);
        });
    }
}

/// Ask for a batch's keys in one query and answer each lookup. A row that cannot be read
/// (an old table's NULL user, say) fails only its own key's lookup, not the batch's.
async fn look_up(pool: &PgPool, batch: Vec<Lookup>) {
    let mut keys: Vec<&str> = batch.iter().map(|(key, _)| key.as_str()).collect();
    keys.sort_unstable();
    keys.dedup();
    type Row = Result<(String, Option<i32>), Arc<StoreError>>;
    let found: Result<HashMap<String, Row>, Arc<StoreError>> = sqlx::query(
        r#"SELECT key, "user", room FROM sessions
           WHERE key = ANY($1) AND (expires_at IS NULL OR expires_at > now())"#,
    )
    .bind(&keys)
    .fetch_all(pool)
    .await
    .map_err(|e| Arc::new(StoreError::from(e)))
    .map(|rows| {
        rows.iter()
            .filter_map(|r| {
                // The key was asked for by value: one that cannot be read matches none.
                let key: String = r.try_get(0).ok()?;
                let session = r
                    .try_get(1)
                    .and_then(|user| Ok((user, r.try_get(2)?)))
                    .map_err(|e| Arc::new(StoreError::from(e)));
                Some((key, session))
            })
            .collect()
    });
    for (key, answer) in batch {
        let session = match &found {
            Ok(sessions) => match sessions.get(key.as_str()) {
                None => Ok(None),
                Some(Ok((user, room))) => Ok(Some(Session {
                    user: user.clone(),
                    room: room.map(i64::from),
                    key,
                })),
                Some(Err(e)) => Err(StoreError::Shared(Arc::clone(e))),
            },
            Err(e) => Err(StoreError::Shared(Arc::clone(e))),
        };
        let _ignored_if_the_connect_is_gone = answer.send(session);
    }
}

impl PgStore {
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        let options = PgConnectOptions::from_str(url)
            .map_err(|e| StoreError::BadUrl(format!("{}: {e}", super::redact_url(url))))?;
        let migrate_options = options
            .clone()
            .application_name("wschat-migrate")
            .options([("statement_timeout", MIGRATE_STATEMENT_TIMEOUT)]);
        let writer_options = options.clone().application_name("wschat-commit").options([
            ("statement_timeout", COMMIT_STATEMENT_TIMEOUT),
            (
                "idle_in_transaction_session_timeout",
                COMMIT_IDLE_IN_TRANSACTION_TIMEOUT,
            ),
            // The commit statement is planned once: re-planning it for each batch's
            // array sizes (PostgreSQL's default for a prepared statement with parameters
            // it deems selective) cost about 3 ms a batch, more than the rest of a
            // small batch's commit.
            ("plan_cache_mode", "force_generic_plan"),
        ]);
        // Reads beyond what the database's cores can run at once only queue inside it and
        // slow the commits down: about two connections per core (at least 4).
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let pool = PgPoolOptions::new()
            .max_connections(u32::try_from(cores * 2).unwrap_or(16).clamp(4, 32))
            .acquire_timeout(CONNECT_TIMEOUT)
            // sqlx pings every connection it hands out: a round trip per query, a quarter
            // of an authenticated connect's cost. Ping only a connection that sat idle
            // (it may have outlived a database restart); one in use a moment ago that
            // died fails its query, is dropped, and the caller answers `unavailable`.
            .test_before_acquire(false)
            .before_acquire(|conn, meta| {
                Box::pin(async move {
                    if meta.idle_for > IDLE_BEFORE_PING {
                        conn.ping().await?;
                    }
                    Ok(true)
                })
            })
            .connect_with(
                options
                    .application_name("wschat")
                    .options([("statement_timeout", READ_STATEMENT_TIMEOUT)]),
            )
            .await
            .map_err(StoreError::Unavailable)?;
        let store = Self {
            lookups: SessionLookups::start(pool.clone()),
            pool,
            writer: tokio::sync::Mutex::new(None),
            writer_options,
            migrate_options,
        };
        // Connect the committer now rather than on the first send (a failure here is
        // retried then).
        if let Ok(conn) = store.connect_writer().await {
            *store.writer.lock().await = Some((conn, Instant::now()));
        }
        Ok(store)
    }

    async fn connect_writer(&self) -> Result<PgConnection, StoreError> {
        match tokio::time::timeout(
            CONNECT_TIMEOUT,
            PgConnection::connect_with(&self.writer_options),
        )
        .await
        {
            Ok(Ok(conn)) => Ok(conn),
            Ok(Err(e)) => Err(StoreError::Unavailable(e)),
            Err(_elapsed) => Err(StoreError::Unavailable(sqlx::Error::PoolTimedOut)),
        }
    }
}

/// The migrations this build carries.
const MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "init",
        include_str!("../../../../migrations/postgres/0001_init.sql"),
    ),
    (
        2,
        "import nodejschat log",
        include_str!("../../../../migrations/postgres/0002_import_nodejschat_log.sql"),
    ),
    (
        3,
        "nodes",
        include_str!("../../../../migrations/postgres/0003_nodes.sql"),
    ),
    (
        4,
        "commit speed",
        include_str!("../../../../migrations/postgres/0004_commit_speed.sql"),
    ),
    (
        5,
        "nodejschat first release",
        include_str!("../../../../migrations/postgres/0005_nodejschat_first_release.sql"),
    ),
    (
        6,
        "sessions room nullable",
        include_str!("../../../../migrations/postgres/0006_sessions_room_nullable.sql"),
    ),
];

/// `server_version_num` as PostgreSQL names its versions: 10 and later `major.minor`
/// (100_004 is 10.4), before that `major.minor.patch` (90_624 is 9.6.24).
fn server_version(num: u32) -> String {
    if num >= 100_000 {
        format!("{}.{}", num / 10_000, num % 10_000)
    } else {
        format!("{}.{}.{}", num / 10_000, num % 10_000 / 100, num % 100)
    }
}

fn to_seq(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn to_db(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// The columns `message_from_row` reads, in its order.
macro_rules! message_columns {
    () => {
        r#"m.id, m.seq, m."user", m.text,
           (extract(epoch FROM m.created_at) * 1000)::bigint, m.client_msg_id"#
    };
}

fn message_from_row(room: &RoomName, row: &PgRow) -> Result<StoredMessage, sqlx::Error> {
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
impl Store for PgStore {
    fn kind(&self) -> StoreKind {
        StoreKind::Postgres
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        // sqlx holds an advisory lock while migrating: servers starting at once take turns
        // (waiting for the lock is a statement too: unbounded here, like the migrations).
        // A pool of one connection (the migrator takes a pool or a connection; a pool is
        // what its public API takes from an `async_trait` method).
        let conn = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(CONNECT_TIMEOUT)
            .connect_with(self.migrate_options.clone())
            .await
            .map_err(StoreError::Unavailable)?;
        // The migrations use `sha256()` and `EXECUTE FUNCTION` (PostgreSQL 11): an older
        // server is named, not left to a syntax error in the middle of the upgrade.
        let version: Result<String, sqlx::Error> = sqlx::query_scalar("SHOW server_version_num")
            .fetch_one(&conn)
            .await;
        let migrated = match version.map(|v| v.parse::<u32>().unwrap_or(0)) {
            Ok(v) if v < MIN_SERVER_VERSION_NUM => Err(StoreError::Unsupported(format!(
                "PostgreSQL 11 or later is needed; this server is version {}",
                server_version(v)
            ))),
            Ok(_) => super::migrator(MIGRATIONS)
                .run(&conn)
                .await
                .map_err(StoreError::from),
            Err(e) => Err(StoreError::from(e)),
        };
        conn.close().await;
        migrated
    }

    async fn pending_migrations(&self) -> Result<Vec<i64>, StoreError> {
        let exists: bool =
            sqlx::query_scalar("SELECT to_regclass('wschat_migrations') IS NOT NULL")
                .fetch_one(&self.pool)
                .await?;
        let applied: Vec<i64> = if exists {
            sqlx::query_scalar("SELECT version FROM wschat_migrations WHERE success")
                .fetch_all(&self.pool)
                .await?
        } else {
            Vec::new()
        };
        Ok(super::pending(MIGRATIONS, &applied))
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    async fn session(&self, hash: &KeyHash) -> Result<Option<Session>, StoreError> {
        self.lookups.session(hash).await
    }

    async fn create_session(
        &self,
        hash: &KeyHash,
        user: &str,
        room: Option<i64>,
    ) -> Result<(), StoreError> {
        let room = room
            .map(i32::try_from)
            .transpose()
            .map_err(|_| StoreError::BadUrl("room number out of range".into()))?;
        sqlx::query(r#"INSERT INTO sessions (key, "user", room) VALUES ($1, $2, $3)"#)
            .bind(hash.as_str())
            .bind(user)
            .bind(room)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn revoked_sessions(&self, keys: &[KeyHash]) -> Result<Vec<KeyHash>, StoreError> {
        let wanted: Vec<&str> = keys.iter().map(KeyHash::as_str).collect();
        let rows: Vec<String> = sqlx::query_scalar(
            "SELECT k FROM unnest($1::text[]) AS k
             WHERE NOT EXISTS (SELECT 1 FROM sessions s WHERE s.key = k
                               AND (s.expires_at IS NULL OR s.expires_at > now()))",
        )
        .bind(&wanted)
        .fetch_all(&self.pool)
        .await?;
        Ok(crate::sessions::among(rows, keys))
    }

    async fn count_sessions(&self) -> Result<i64, StoreError> {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM sessions")
            .fetch_one(&self.pool)
            .await?;
        Ok(n)
    }

    async fn commit_batch(
        &self,
        batch: Arc<[NewMessage]>,
    ) -> Result<Vec<CommitOutcome>, StoreError> {
        let mut slot = self.writer.lock().await;
        let mut conn = match slot.take() {
            // A connection that sat idle may have died meanwhile (a database restart):
            // found out by a ping, nothing of the batch sent, it is replaced, and the
            // batch commits. Found out by the batch's own statement instead, its
            // outcome would be unknown to the senders ("perhaps stored").
            Some((mut conn, used)) if used.elapsed() > IDLE_BEFORE_PING => {
                match tokio::time::timeout(CONNECT_TIMEOUT, conn.ping()).await {
                    Ok(Ok(())) => conn,
                    _ => self.connect_writer().await?,
                }
            }
            Some((conn, _)) => conn,
            None => self.connect_writer().await?,
        };
        let committing = async {
            match commit_one_statement(&mut conn, &batch).await {
                Ok(Some(outcomes)) => return Ok(outcomes),
                // A repeat in the batch, or a `(user, client_msg_id)` already stored
                // (nothing of the statement was committed): the transaction path looks
                // repeats up.
                Ok(None) => {}
                Err(e) if is_unique_violation(&e) => {}
                Err(e) => return Err(e),
            }
            // Another node committing the same retry after this transaction's lookup
            // missed it (its insert waits on ours, then violates the index): rolled
            // back, and the next attempt's lookup finds it. Failing instead would tell
            // every sender in the batch "not stored" over one retry.
            let mut attempt = 1;
            loop {
                match commit_on(&mut conn, &batch).await {
                    Err(e) if attempt < TRANSACTION_ATTEMPTS && is_unique_violation(&e) => {
                        attempt += 1;
                    }
                    done => return done,
                }
            }
        };
        // The server's statement timeout cannot end a wait for a server that does not
        // answer at all (its host gone, or paused): bounded here, the connection dropped.
        // Had the batch committed, a retry with the same `client_msg_id` finds it and the
        // heartbeat's read of room heads delivers it.
        // The database's own error rolled the batch back; a lost connection or a lost
        // answer leaves it unknown whether the batch committed (the senders are told so).
        let outcomes = match tokio::time::timeout(COMMIT_ANSWER_TIMEOUT, committing).await {
            Ok(Ok(outcomes)) => outcomes,
            Ok(Err(e @ StoreError::Query(sqlx::Error::Database(_)))) => return Err(e),
            Ok(Err(e)) => return Err(StoreError::Unconfirmed(Box::new(e))),
            Err(_elapsed) => {
                return Err(StoreError::Unconfirmed(Box::new(StoreError::NoAnswer(
                    COMMIT_ANSWER_TIMEOUT,
                ))));
            }
        };
        *slot = Some((conn, Instant::now()));
        Ok(outcomes)
    }

    async fn room_head(&self, room: &RoomName) -> Result<RoomHead, StoreError> {
        let row = sqlx::query(
            "SELECT r.last_seq,
                    (SELECT min(seq) FROM wschat_messages m WHERE m.room_id = r.id)
             FROM wschat_rooms r WHERE r.name = $1",
        )
        .bind(room.as_str())
        .fetch_optional(&self.pool)
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
              WHERE r.name = $1 AND m.seq > $2 ORDER BY m.seq LIMIT $3"
        ))
        .bind(room.as_str())
        .bind(to_db(after))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| message_from_row(room, r).map_err(StoreError::from))
            .collect()
    }

    async fn room_heads(&self, rooms: &[RoomName]) -> Result<Vec<(RoomName, u64)>, StoreError> {
        let names: Vec<&str> = rooms.iter().map(RoomName::as_str).collect();
        let rows =
            sqlx::query("SELECT name, last_seq FROM wschat_rooms WHERE name = ANY($1::text[])")
                .bind(&names)
                .fetch_all(&self.pool)
                .await?;
        let mut heads = Vec::with_capacity(rows.len());
        for row in &rows {
            let name: String = row.try_get(0)?;
            if let Ok(room) = RoomName::new(name) {
                heads.push((room, to_seq(row.try_get(1)?)));
            }
        }
        Ok(heads)
    }

    async fn heartbeat_node(&self, node: &NodeInfo) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO wschat_nodes (id, broker) VALUES ($1, $2)
             ON CONFLICT (id) DO UPDATE SET heartbeat_at = now()",
        )
        .bind(&node.id)
        .bind(&node.broker)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn live_nodes(&self, max_age: Duration) -> Result<Vec<NodeInfo>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, broker FROM wschat_nodes
             WHERE heartbeat_at >= now() - make_interval(secs => $1)",
        )
        .bind(max_age.as_secs_f64())
        .fetch_all(&self.pool)
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
        sqlx::query("DELETE FROM wschat_nodes WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn prune(&self, keep: u64) -> Result<u64, StoreError> {
        let done = sqlx::query(
            "DELETE FROM wschat_messages m USING wschat_rooms r
             WHERE r.id = m.room_id AND m.seq <= r.last_seq - $1",
        )
        .bind(to_db(keep))
        .execute(&self.pool)
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
              WHERE r.name = $1 AND m.seq < $2 ORDER BY m.seq DESC LIMIT $3"
        ))
        .bind(room.as_str())
        .bind(before.map(to_db).unwrap_or(i64::MAX))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        let mut messages = rows
            .iter()
            .map(|r| message_from_row(room, r))
            .collect::<Result<Vec<_>, _>>()?;
        messages.reverse();
        Ok(messages)
    }

    async fn revoke_session(&self, hash: &KeyHash) -> Result<u64, StoreError> {
        let done = sqlx::query("DELETE FROM sessions WHERE key = $1")
            .bind(hash.as_str())
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }

    async fn revoke_user_sessions(&self, user: &str) -> Result<u64, StoreError> {
        let done = sqlx::query(r#"DELETE FROM sessions WHERE "user" = $1"#)
            .bind(user)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }

    async fn list_rooms(
        &self,
        after: Option<&RoomName>,
        limit: u32,
    ) -> Result<Vec<(RoomName, u64)>, StoreError> {
        // Byte order (COLLATE "C"), as room names compare everywhere else.
        let rows = sqlx::query(
            r#"SELECT name, last_seq FROM wschat_rooms WHERE name COLLATE "C" > $1
               ORDER BY name COLLATE "C" LIMIT $2"#,
        )
        .bind(after.map(RoomName::as_str).unwrap_or(""))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
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

/// One batch as one statement, in one round trip (autocommit). Each room's counter is
/// bumped by its count of new messages (`INSERT … ON CONFLICT DO UPDATE` creates a room on
/// its first message, and locks the counter rows in byte order of the names, as every node
/// does, so nodes never deadlock), and the messages are numbered from the bumped counters
/// and inserted. A `(user, client_msg_id)` already stored (a retry) violates the unique
/// index: nothing is committed and the batch goes the transaction path, which looks
/// repeats up; retries are rare, and looking every message up would cost more.
/// Returns a row per room (its id and bumped `last_seq`) and a row per message (room id,
/// seq, id); the caller numbers each room's messages in batch order, as the statement
/// does. The inserted rows are not joined back to the input: that is quadratic.
const COMMIT_STATEMENT: &str = r#"
WITH input AS (
    SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[])
        WITH ORDINALITY AS x(room, u, t, c, o)
), counts AS (
    SELECT room, count(*) AS n FROM input GROUP BY room
), bumped AS (
    INSERT INTO wschat_rooms AS r (name, last_seq)
    SELECT room, n FROM counts ORDER BY room COLLATE "C"
    ON CONFLICT (name) DO UPDATE SET last_seq = r.last_seq + excluded.last_seq
    RETURNING r.id, r.name, r.last_seq
), ins AS (
    INSERT INTO wschat_messages (room_id, seq, "user", text, created_at, client_msg_id)
    SELECT b.id, b.last_seq - c.n + row_number() OVER (PARTITION BY i.room ORDER BY i.o),
           i.u, i.t, to_timestamp($5::double precision / 1000), i.c
    FROM input i JOIN bumped b ON b.name = i.room JOIN counts c ON c.room = i.room
    ORDER BY i.o
    RETURNING room_id, seq, id
)
SELECT id, last_seq, NULL::bigint, name FROM bumped
UNION ALL
SELECT room_id, seq, id, NULL FROM ins
"#;

/// One batch in one statement on `conn`; see [`COMMIT_STATEMENT`]. Batches with a repeat
/// inside them go the transaction path at once.
async fn commit_one_statement(
    conn: &mut PgConnection,
    batch: &[NewMessage],
) -> Result<Option<Vec<CommitOutcome>>, StoreError> {
    let plan = BatchPlan::new(batch);
    if !plan.repeats.is_empty() {
        return Ok(None);
    }
    let rooms: Vec<&str> = batch.iter().map(|m| m.room.as_str()).collect();
    let users: Vec<&str> = batch.iter().map(|m| m.user.as_str()).collect();
    let texts: Vec<&str> = batch.iter().map(|m| m.text.as_str()).collect();
    let cmids: Vec<Option<&str>> = batch.iter().map(|m| m.client_msg_id.as_deref()).collect();
    let time_ms = now_ms();
    let rows = sqlx::query(COMMIT_STATEMENT)
        .bind(&rooms)
        .bind(&users)
        .bind(&texts)
        .bind(&cmids)
        .bind(time_ms as f64)
        .fetch_all(&mut *conn)
        .await?;
    let rows = rows
        .iter()
        .map(CommitRow::read)
        .collect::<Result<Vec<_>, sqlx::Error>>()?;
    outcomes_from_rows(batch, plan, rows, time_ms).map(Some)
}

fn is_unique_violation(e: &StoreError) -> bool {
    matches!(e, StoreError::Query(sqlx::Error::Database(e)) if e.is_unique_violation())
}

/// One batch in one transaction on `conn`, a few round trips: the path taken when the
/// one-statement commit met a concurrent insert of the same `(user, client_msg_id)`.
async fn commit_on(
    conn: &mut PgConnection,
    batch: &[NewMessage],
) -> Result<Vec<CommitOutcome>, StoreError> {
    let mut tx = conn.begin().await?;
    let mut outcomes: Vec<Option<CommitOutcome>> = vec![None; batch.len()];
    let plan = BatchPlan::new(batch);

    if !plan.lookups.is_empty() {
        let users: Vec<&str> = plan
            .lookups
            .iter()
            .map(|&i| batch[i].user.as_str())
            .collect();
        let ids: Vec<&str> = plan
            .lookups
            .iter()
            .map(|&i| batch[i].client_msg_id.as_deref().unwrap_or_default())
            .collect();
        let rows = sqlx::query(concat!(
            "SELECT ",
            message_columns!(),
            r#", r.name FROM wschat_messages m
                   JOIN wschat_rooms r ON r.id = m.room_id
                   JOIN UNNEST($1::text[], $2::text[]) AS k(u, c)
                     ON m."user" = k.u AND m.client_msg_id = k.c"#
        ))
        .bind(&users)
        .bind(&ids)
        .fetch_all(&mut *tx)
        .await?;
        let mut found: HashMap<(String, String), Arc<StoredMessage>> = HashMap::new();
        for row in &rows {
            let name: String = row.try_get(6)?;
            let Ok(room) = RoomName::new(name) else {
                continue;
            };
            let m = message_from_row(&room, row)?;
            if let Some(cmid) = m.client_msg_id.clone() {
                found.insert((m.user.clone(), cmid), Arc::new(m));
            }
        }
        for &i in &plan.lookups {
            let key = (
                batch[i].user.clone(),
                batch[i].client_msg_id.clone().unwrap_or_default(),
            );
            if let Some(m) = found.get(&key) {
                outcomes[i] = Some(CommitOutcome::Duplicate(m.clone()));
            }
        }
    }

    let by_room = plan.new_by_room(batch, &outcomes);
    if !by_room.is_empty() {
        let names: Vec<&str> = by_room.keys().map(|r| r.as_str()).collect();
        let counts: Vec<i64> = by_room.values().map(|v| v.len() as i64).collect();
        // Each room's counter bumped (a new room created) in name order, one row after
        // the other, as the one-statement path does: a new room's row is locked only
        // after every room before it by name, so two nodes never wait for each other
        // (inserting every new room first, then locking the existing ones, deadlocked
        // against the one-statement path).
        let rows = sqlx::query(
            r#"INSERT INTO wschat_rooms AS r (name, last_seq)
                 SELECT c.name, c.n FROM UNNEST($1::text[], $2::bigint[]) AS c(name, n)
                 ORDER BY c.name COLLATE "C"
                 ON CONFLICT (name) DO UPDATE SET last_seq = r.last_seq + excluded.last_seq
                 RETURNING r.name, r.id, r.last_seq"#,
        )
        .bind(&names)
        .bind(&counts)
        .fetch_all(&mut *tx)
        .await?;
        let heads: HashMap<String, (i64, u64)> = rows
            .iter()
            .map(|r| -> Result<_, sqlx::Error> {
                Ok((r.try_get(0)?, (r.try_get(1)?, to_seq(r.try_get(2)?))))
            })
            .collect::<Result<_, _>>()?;

        let time_ms = now_ms();
        let total: usize = by_room.values().map(Vec::len).sum();
        let mut order = Vec::with_capacity(total);
        let (mut room_ids, mut seqs, mut users, mut texts, mut cmids) = (
            Vec::with_capacity(total),
            Vec::with_capacity(total),
            Vec::with_capacity(total),
            Vec::with_capacity(total),
            Vec::with_capacity(total),
        );
        for (room, indices) in &by_room {
            let Some(&(room_id, last_seq)) = heads.get(room.as_str()) else {
                return Err(StoreError::Query(sqlx::Error::RowNotFound));
            };
            let first_seq = last_seq + 1 - indices.len() as u64;
            for (seq, &i) in (first_seq..).zip(indices) {
                order.push((i, seq));
                room_ids.push(room_id);
                seqs.push(to_db(seq));
                users.push(batch[i].user.as_str());
                texts.push(batch[i].text.as_str());
                cmids.push(batch[i].client_msg_id.as_deref());
            }
        }
        let inserted = sqlx::query(
            r#"INSERT INTO wschat_messages
                     (room_id, seq, "user", text, created_at, client_msg_id)
                   SELECT r, s, u, t, to_timestamp($6::double precision / 1000), c
                   FROM UNNEST($1::bigint[], $2::bigint[], $3::text[], $4::text[], $5::text[])
                        WITH ORDINALITY AS x(r, s, u, t, c, o)
                   ORDER BY o
                   RETURNING room_id, seq, id"#,
        )
        .bind(&room_ids)
        .bind(&seqs)
        .bind(&users)
        .bind(&texts)
        .bind(&cmids)
        .bind(time_ms as f64)
        .fetch_all(&mut *tx)
        .await?;
        // RETURNING's row order is not promised: match ids by (room_id, seq).
        let mut ids: HashMap<(i64, i64), i64> = HashMap::with_capacity(inserted.len());
        for row in &inserted {
            ids.insert((row.try_get(0)?, row.try_get(1)?), row.try_get(2)?);
        }
        for (n, (i, seq)) in order.into_iter().enumerate() {
            let msg = &batch[i];
            let Some(&id) = ids.get(&(room_ids[n], to_db(seq))) else {
                return Err(StoreError::Query(sqlx::Error::RowNotFound));
            };
            outcomes[i] = Some(msg.stored(seq, id, time_ms));
        }
    }
    tx.commit().await?;
    plan.finish(outcomes)
}

#[cfg(test)]
mod tests {
    #[test]
    fn server_versions_are_named_as_postgresql_names_them() {
        assert_eq!(super::server_version(150_010), "15.10");
        assert_eq!(super::server_version(100_004), "10.4");
        assert_eq!(super::server_version(90_624), "9.6.24");
    }
}
