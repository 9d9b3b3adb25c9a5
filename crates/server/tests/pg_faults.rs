//! PostgreSQL faults under load: restarts (fast and immediate), a killed backend, a locked
//! table and an exhausted pool. Each test runs its own private PostgreSQL cluster (the
//! shared one is never restarted), drives v1 senders that retry with the same
//! `client_msg_id` on `unavailable` or a lost connection, and a receiver that resumes with
//! `since`; at the end every acknowledged message must be in the database exactly once and
//! have reached the receiver.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use sqlx::Connection;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

use common::pg_cluster::{spawn_on, until, Cluster};
use common::Paused;

/// `GET /healthz`'s status code.
async fn healthz(addr: std::net::SocketAddr) -> u16 {
    let Ok(mut tcp) = tokio::net::TcpStream::connect(addr).await else {
        return 0;
    };
    tcp.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(15), tcp.read_to_end(&mut answer)).await;
    let text = String::from_utf8_lossy(&answer);
    text.split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Connect at `/ws` with the key in the handshake; retries (503 while the database is
/// away) until it works.
async fn connect(addr: std::net::SocketAddr, key: &str) -> Ws {
    let url = format!("ws://{addr}/ws?session_key={key}");
    let mut delay = Duration::from_millis(50);
    loop {
        if let Ok(Ok((mut ws, _))) = tokio::time::timeout(
            Duration::from_secs(10),
            tokio_tungstenite::connect_async(&url),
        )
        .await
        {
            if let Some(Ok(Message::Text(t))) = ws.next().await {
                let v: Value = serde_json::from_str(&t).unwrap();
                assert_eq!(v["type"], "hello", "{v}");
                return ws;
            }
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_millis(500));
    }
}

/// What the load saw.
#[derive(Default)]
struct Tally {
    /// client_msg_id → (seq, id) of its ack.
    acks: HashMap<String, (u64, i64)>,
    unavailable: u64,
    reconnects: u64,
}

/// A sender: `count` messages to `room` with ids `{name}-{n}`, at most `window` in
/// flight; `unavailable` and lost connections are retried with the same id.
async fn sender(
    addr: std::net::SocketAddr,
    key: String,
    name: String,
    room: String,
    count: usize,
    window: usize,
    pace: Duration,
) -> Tally {
    let mut tally = Tally::default();
    let text = |n: usize| format!("{name} says {n}");
    let mut next = 0usize;
    // Sent, not yet acknowledged: n → when it may be (re)sent (None: in flight).
    let mut open: BTreeMap<usize, Option<Instant>> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    'conn: loop {
        assert!(Instant::now() < deadline, "{name}: gave up");
        let mut ws = connect(addr, &key).await;
        // Everything not acknowledged goes again, with its id.
        for slot in open.values_mut() {
            *slot = Some(Instant::now());
        }
        loop {
            if open.is_empty() && next == count {
                let _ = ws.close(None).await;
                return tally;
            }
            // Send what is due: retries first, then new ones within the window.
            let now = Instant::now();
            let due: Vec<usize> = open
                .iter()
                .filter(|(_, at)| at.is_some_and(|at| at <= now))
                .map(|(n, _)| *n)
                .collect();
            for n in due {
                let frame = json!({"type": "send", "room": room, "text": text(n),
                                   "client_msg_id": format!("{name}-{n}"), "ref": n});
                if ws.send(Message::text(frame.to_string())).await.is_err() {
                    tally.reconnects += 1;
                    continue 'conn;
                }
                open.insert(n, None);
            }
            while next < count && open.len() < window {
                let n = next;
                next += 1;
                let frame = json!({"type": "send", "room": room, "text": text(n),
                                   "client_msg_id": format!("{name}-{n}"), "ref": n});
                if ws.send(Message::text(frame.to_string())).await.is_err() {
                    open.insert(n, Some(Instant::now()));
                    tally.reconnects += 1;
                    continue 'conn;
                }
                open.insert(n, None);
                if !pace.is_zero() {
                    tokio::time::sleep(pace).await;
                }
            }
            let frame = tokio::time::timeout(Duration::from_millis(100), ws.next()).await;
            let frame = match frame {
                Err(_) => continue,
                Ok(Some(Ok(Message::Text(t)))) => t,
                Ok(Some(Ok(Message::Close(_)))) | Ok(Some(Err(_))) | Ok(None) => {
                    tally.reconnects += 1;
                    continue 'conn;
                }
                Ok(Some(Ok(_))) => continue,
            };
            let v: Value = serde_json::from_str(&frame).unwrap();
            match v["type"].as_str() {
                Some("ack") => {
                    let n = v["ref"].as_u64().unwrap() as usize;
                    let cmid = v["client_msg_id"].as_str().unwrap().to_owned();
                    assert_eq!(cmid, format!("{name}-{n}"));
                    let got = (v["seq"].as_u64().unwrap(), v["id"].as_i64().unwrap());
                    if let Some(first) = tally.acks.insert(cmid.clone(), got) {
                        assert_eq!(first, got, "{cmid}: two acks disagree");
                    }
                    open.remove(&n);
                }
                Some("error") => {
                    let code = v["code"].as_str().unwrap();
                    assert!(
                        code == "unavailable" || code == "shutting_down",
                        "unexpected error {v}"
                    );
                    tally.unavailable += 1;
                    if let Some(n) = v["ref"].as_u64() {
                        if let Some(slot) = open.get_mut(&(n as usize)) {
                            *slot = Some(Instant::now() + Duration::from_millis(50));
                        }
                    }
                }
                _ => {}
            }
        }
    }
}

/// A receiver of `room`: resumes with `since` after every lost connection; stops once
/// it has seq `1..=expect` (the count is set when the senders are done).
async fn receiver(
    addr: std::net::SocketAddr,
    key: String,
    room: String,
    expect: Arc<AtomicU64>,
    done: Arc<AtomicBool>,
) -> (BTreeMap<u64, String>, u64) {
    let mut got: BTreeMap<u64, String> = BTreeMap::new();
    let mut resumes = 0;
    loop {
        let mut ws = connect(addr, &key).await;
        let since = contiguous(&got);
        let join = json!({"type": "join", "rooms": [{"room": room, "since": since}]});
        if ws.send(Message::text(join.to_string())).await.is_err() {
            resumes += 1;
            continue;
        }
        loop {
            let target = expect.load(Ordering::Acquire);
            if done.load(Ordering::Acquire) && contiguous(&got) >= target {
                return (got, resumes);
            }
            let frame = match tokio::time::timeout(Duration::from_millis(100), ws.next()).await {
                Err(_) => continue,
                Ok(Some(Ok(Message::Text(t)))) => t,
                Ok(Some(Ok(Message::Close(_)))) | Ok(Some(Err(_))) | Ok(None) => break,
                Ok(Some(Ok(_))) => continue,
            };
            let v: Value = serde_json::from_str(&frame).unwrap();
            match v["type"].as_str() {
                Some("message") => {
                    let seq = v["seq"].as_u64().unwrap();
                    let text = v["text"].as_str().unwrap().to_owned();
                    if let Some(before) = got.insert(seq, text.clone()) {
                        assert_eq!(before, text, "seq {seq} delivered with two texts");
                    }
                }
                Some("error") => {
                    // The join could not read the store: join again.
                    assert_eq!(v["code"], "unavailable", "{v}");
                    break;
                }
                _ => {}
            }
        }
        resumes += 1;
    }
}

/// The highest seq up to which `got` has no gap.
fn contiguous(got: &BTreeMap<u64, String>) -> u64 {
    let mut last = 0;
    for &seq in got.keys() {
        if seq != last + 1 {
            break;
        }
        last = seq;
    }
    last
}

struct Load {
    senders: Vec<tokio::task::JoinHandle<Tally>>,
    receiver: tokio::task::JoinHandle<(BTreeMap<u64, String>, u64)>,
    expect: Arc<AtomicU64>,
    done: Arc<AtomicBool>,
    room: String,
    total: usize,
}

/// Start `senders` senders of `count` messages each into `room`, and one receiver.
async fn start_load(
    app: &common::TestApp,
    room: &str,
    senders: usize,
    count: usize,
    pace: Duration,
) -> Load {
    let expect = Arc::new(AtomicU64::new(u64::MAX));
    let done = Arc::new(AtomicBool::new(false));
    let reader_key = app.session("reader", None).await;
    let receiver = tokio::spawn(receiver(
        app.addr,
        reader_key,
        room.to_owned(),
        expect.clone(),
        done.clone(),
    ));
    let mut tasks = Vec::new();
    for i in 0..senders {
        let key = app.session(&format!("sender{i}"), None).await;
        tasks.push(tokio::spawn(sender(
            app.addr,
            key,
            format!("s{i}"),
            room.to_owned(),
            count,
            16,
            pace,
        )));
    }
    Load {
        senders: tasks,
        receiver,
        expect,
        done,
        room: room.to_owned(),
        total: senders * count,
    }
}

/// Wait for the load to finish and check the promise: every message acknowledged, stored
/// exactly once with the acknowledged seq and id, seq gap-free, and every one delivered.
async fn finish_load(load: Load, database: &str) -> (u64, u64, u64) {
    let mut acks = HashMap::new();
    let (mut unavailable, mut reconnects) = (0, 0);
    for task in load.senders {
        let tally = tokio::time::timeout(Duration::from_secs(180), task)
            .await
            .expect("senders finish")
            .unwrap();
        unavailable += tally.unavailable;
        reconnects += tally.reconnects;
        acks.extend(tally.acks);
    }
    assert_eq!(acks.len(), load.total, "every message acknowledged");

    let mut db = sqlx::PgConnection::connect(database).await.unwrap();
    let rows: Vec<(String, i64, i64, String)> = sqlx::query_as(
        "SELECT m.client_msg_id, m.seq, m.id, m.text FROM wschat_messages m
         JOIN wschat_rooms r ON r.id = m.room_id WHERE r.name = $1 ORDER BY m.seq",
    )
    .bind(&load.room)
    .fetch_all(&mut db)
    .await
    .unwrap();
    assert_eq!(rows.len(), load.total, "stored exactly once each");
    let seqs: Vec<i64> = rows.iter().map(|r| r.1).collect();
    assert_eq!(
        seqs,
        (1..=load.total as i64).collect::<Vec<_>>(),
        "gap-free"
    );
    for (cmid, seq, id, _) in &rows {
        let ack = acks
            .get(cmid)
            .unwrap_or_else(|| panic!("{cmid} stored, never acked"));
        assert_eq!(*ack, (*seq as u64, *id), "{cmid}: ack and row differ");
    }
    let last_seq: i64 = sqlx::query_scalar("SELECT last_seq FROM wschat_rooms WHERE name = $1")
        .bind(&load.room)
        .fetch_one(&mut db)
        .await
        .unwrap();
    assert_eq!(last_seq, load.total as i64);

    load.expect.store(load.total as u64, Ordering::Release);
    load.done.store(true, Ordering::Release);
    let (got, resumes) = tokio::time::timeout(Duration::from_secs(60), load.receiver)
        .await
        .expect("the receiver gets everything")
        .unwrap();
    assert_eq!(got.len(), load.total, "delivered to the member");
    for (_, seq, _, text) in &rows {
        assert_eq!(got.get(&(*seq as u64)), Some(text), "seq {seq}");
    }
    (unavailable, reconnects, resumes)
}

async fn restart_under_load(mode: &str) {
    let cluster = Cluster::create().await;
    let app = spawn_on(&cluster, |_| {}).await;
    let load = start_load(&app, "busy", 4, 1000, Duration::from_millis(2)).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    cluster.stop(mode).await;
    // The server stays up and says the store is away.
    until("healthz 503", Duration::from_secs(15), || async {
        healthz(app.addr).await == 503
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(healthz(app.addr).await, 503);
    cluster.start().await;
    until("healthz 200", Duration::from_secs(30), || async {
        healthz(app.addr).await == 200
    })
    .await;
    let (unavailable, reconnects, resumes) = finish_load(load, &app.database).await;
    eprintln!("{mode}: {unavailable} unavailable, {reconnects} reconnects, {resumes} resumes");
    assert!(
        unavailable + reconnects > 0,
        "the restart was felt by the senders"
    );
    app.stop_keeping_data().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restarted_fast_under_load_loses_and_duplicates_nothing() {
    restart_under_load("fast").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restarted_immediate_under_load_loses_and_duplicates_nothing() {
    restart_under_load("immediate").await;
}

/// wschat's own backends (pool and committer).
async fn kill_wschat_backends(admin: &mut sqlx::PgConnection) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity
          WHERE application_name LIKE 'wschat%' AND pid <> pg_backend_pid()) AS t",
    )
    .fetch_one(admin)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backends_killed_with_pg_terminate_backend_lose_and_duplicate_nothing() {
    let cluster = Cluster::create().await;
    let app = spawn_on(&cluster, |_| {}).await;
    let mut admin = sqlx::PgConnection::connect(&cluster.url()).await.unwrap();
    let load = start_load(&app, "busy", 4, 600, Duration::from_millis(2)).await;
    let mut killed = 0;
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        killed += kill_wschat_backends(&mut admin).await;
    }
    assert!(killed >= 6, "killed {killed} backends");
    let (unavailable, reconnects, resumes) = finish_load(load, &app.database).await;
    eprintln!(
        "killed {killed}: {unavailable} unavailable, {reconnects} reconnects, {resumes} resumes"
    );
    app.stop_keeping_data().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_locked_table_and_a_full_server_lose_and_duplicate_nothing() {
    let cluster = Cluster::create().await;
    let app = spawn_on(&cluster, |_| {}).await;
    let load = start_load(&app, "busy", 4, 800, Duration::from_millis(3)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Slow queries: the log locked for longer than a commit statement may run.
    let mut locker = sqlx::PgConnection::connect(&cluster.url()).await.unwrap();
    sqlx::raw_sql("BEGIN; LOCK TABLE wschat_messages IN ACCESS EXCLUSIVE MODE")
        .execute(&mut locker)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(7)).await;
    sqlx::raw_sql("ROLLBACK")
        .execute(&mut locker)
        .await
        .unwrap();
    drop(locker);

    // Pool exhaustion: every connection slot of the server taken by sleepers, and
    // wschat's backends killed, so it cannot reconnect until they finish.
    let mut admin = sqlx::PgConnection::connect(&cluster.url()).await.unwrap();
    let mut sleepers = Vec::new();
    loop {
        match sqlx::PgConnection::connect(&cluster.url()).await {
            Ok(mut conn) => sleepers.push(tokio::spawn(async move {
                let _ = sqlx::query("SELECT pg_sleep(4)").execute(&mut conn).await;
            })),
            Err(_) => break,
        }
        if sleepers.len() > 100 {
            break;
        }
    }
    assert!(
        sleepers.len() < 100,
        "the server's connection limit was reached"
    );
    kill_wschat_backends(&mut admin).await;
    drop(admin);
    for sleeper in sleepers {
        sleeper.await.unwrap();
    }

    let (unavailable, reconnects, resumes) = finish_load(load, &app.database).await;
    eprintln!(
        "locked + full: {unavailable} unavailable, {reconnects} reconnects, {resumes} resumes"
    );
    assert!(unavailable > 0, "the lock outlasted the statement timeout");
    app.stop_keeping_data().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_reads_never_block_writes_of_another_room() {
    let cluster = Cluster::create().await;
    let app = spawn_on(&cluster, |_| {}).await;
    // A big room, written directly.
    let rows: i64 = 30_000;
    let mut db = sqlx::PgConnection::connect(&cluster.url()).await.unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "INSERT INTO wschat_rooms (name, last_seq) VALUES ('big', {rows});
         INSERT INTO wschat_messages (room_id, seq, \"user\", text)
         SELECT r.id, g, 'old', 'an old message, number ' || g
         FROM wschat_rooms r, generate_series(1, {rows}) g WHERE r.name = 'big';
         ANALYZE wschat_messages;"
    )))
    .execute(&mut db)
    .await
    .unwrap();
    let key = app.session("writer", None).await;
    let mut writer = connect(app.addr, &key).await;

    // More long reads at once than the read pool has connections.
    let big = wschat_protocol::RoomName::new("big".to_owned()).unwrap();
    let reads_started = Instant::now();
    let mut reads = Vec::new();
    for _ in 0..24 {
        let store = app.shared.store.clone();
        let big = big.clone();
        reads.push(tokio::spawn(async move {
            // A whole-room backfill, page by page as a join with `since: 0` reads it.
            let started = Instant::now();
            let mut cursor = 0;
            while cursor < rows as u64 {
                let page = store.messages_after(&big, cursor, 500).await.unwrap();
                cursor = page.last().unwrap().seq;
            }
            started.elapsed()
        }));
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut slowest_ack = Duration::ZERO;
    for n in 0..40 {
        let sent = Instant::now();
        let frame = json!({"type": "send", "room": "small", "text": format!("w{n}"),
                           "client_msg_id": format!("w{n}")});
        writer.send(Message::text(frame.to_string())).await.unwrap();
        loop {
            let t = match writer.next().await {
                Some(Ok(Message::Text(t))) => t,
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                other => panic!("writer connection lost: {other:?}"),
            };
            let v: Value = serde_json::from_str(&t).unwrap();
            if v["type"] == "ack" {
                break;
            }
            assert_ne!(v["type"], "error", "{v}");
        }
        slowest_ack = slowest_ack.max(sent.elapsed());
    }
    let writes_done = reads_started.elapsed();
    let mut shortest_read = Duration::MAX;
    for read in reads {
        shortest_read = shortest_read.min(read.await.unwrap());
    }
    eprintln!(
        "40 writes done after {writes_done:?} (slowest ack {slowest_ack:?}); \
         24 reads of {rows} rows took at least {shortest_read:?}"
    );
    assert!(
        writes_done < reads_started.elapsed(),
        "the writes finished while reads were running"
    );
    assert!(
        slowest_ack < Duration::from_secs(1),
        "a commit waited {slowest_ack:?} behind history reads"
    );
    app.stop_keeping_data().await;
}

/// The next `ack` or `error` frame on `ws`, within `limit`.
async fn answer(ws: &mut Ws, limit: Duration) -> Value {
    let end = Instant::now() + limit;
    loop {
        let left = end.saturating_duration_since(Instant::now());
        let frame = tokio::time::timeout(left, ws.next())
            .await
            .expect("an answer in time");
        let Some(Ok(Message::Text(t))) = frame else {
            continue;
        };
        let v: Value = serde_json::from_str(&t).unwrap();
        if v["type"] == "ack" || v["type"] == "error" {
            return v;
        }
    }
}

/// A private cluster, a node on it, and a v1 connection whose first send (message 1 to
/// room `p`) was acked.
async fn one_message_acked() -> (Cluster, common::TestApp, Ws) {
    let cluster = Cluster::create().await;
    let app = spawn_on(&cluster, |_| {}).await;
    let key = app.session("ada", None).await;
    let mut ws = connect(app.addr, &key).await;
    ws.send(send_numbered(1)).await.unwrap();
    assert_eq!(answer(&mut ws, common::WAIT).await["type"], "ack");
    (cluster, app, ws)
}

/// A `send` of message `n` to room `p` (its `client_msg_id` and `ref` made from `n`).
fn send_numbered(n: u64) -> Message {
    Message::text(
        json!({"type": "send", "room": "p", "text": format!("m{n}"),
               "client_msg_id": format!("m-{n}"), "ref": n})
        .to_string(),
    )
}

/// A PostgreSQL that takes the commit statement and never answers (its host gone, or
/// paused: the connection stays open, so no error comes either) holds no send forever:
/// the committer gives up on the connection, the sender is told `unavailable`, and its
/// retry with the same `client_msg_id` is stored once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_that_stops_answering_gets_sends_answered_unavailable() {
    let (cluster, app, mut ws) = one_message_acked().await;
    let mut admin = sqlx::PgConnection::connect(&cluster.url()).await.unwrap();
    let committer: i32 = sqlx::query_scalar(
        "SELECT pid FROM pg_stat_activity WHERE application_name = 'wschat-commit'",
    )
    .fetch_one(&mut admin)
    .await
    .unwrap();
    let paused = Paused::pause(committer);
    ws.send(send_numbered(2)).await.unwrap();
    // Well past the committer's own bound: without it, no answer until the backend runs.
    let told = answer(&mut ws, Duration::from_secs(60)).await;
    assert_eq!(told["type"], "error", "{told}");
    assert_eq!(told["code"], "unavailable", "{told}");
    assert_eq!(told["ref"], 2, "{told}");
    // The statement reached the backend, which commits it when it runs again: the sender
    // is not told it was not stored.
    let text = told["message"].as_str().unwrap_or_default();
    assert!(text.starts_with("perhaps stored: "), "{told}");
    drop(paused);
    ws.send(send_numbered(2)).await.unwrap();
    let ack = answer(&mut ws, common::WAIT).await;
    assert_eq!(
        (&ack["type"], &ack["seq"]),
        (&json!("ack"), &json!(2)),
        "{ack}"
    );
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM wschat_messages")
        .fetch_one(&mut admin)
        .await
        .unwrap();
    assert_eq!(rows, 2, "the retry is stored once");
    app.stop_keeping_data().await;
}

/// A session lookup that the database never answers (its processes paused: no error
/// comes, and a new connection is never accepted) ends at `auth_timeout_secs`. Nothing
/// else bounds it, and the connect used to wait for the database for good. A key in the
/// handshake gets 503, on either endpoint; an `auth` frame gets `unavailable`, then close
/// 1013.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_lookup_the_database_never_answers_ends_at_the_auth_deadline() {
    let cluster = Cluster::create().await;
    let app = spawn_on(&cluster, |s| s.auth_timeout_secs = 2).await;
    let key = app.session("ada", None).await;
    drop(connect(app.addr, &key).await);
    let mut admin = sqlx::PgConnection::connect(&cluster.url()).await.unwrap();
    let readers: Vec<i32> =
        sqlx::query_scalar("SELECT pid FROM pg_stat_activity WHERE application_name = 'wschat'")
            .fetch_all(&mut admin)
            .await
            .unwrap();
    let paused: Vec<Paused> = std::iter::once(cluster.postmaster_pid())
        .chain(readers)
        .map(Paused::pause)
        .collect();
    // Far past the deadline: without it, no answer comes until the database runs again.
    let bound = Duration::from_secs(30);
    for path in [
        format!("/ws?session_key={key}"),
        format!("/?session_key={key}"),
    ] {
        let url = format!("ws://{}{path}", app.addr);
        let refused = tokio::time::timeout(bound, tokio_tungstenite::connect_async(&url))
            .await
            .unwrap_or_else(|_| panic!("{path}: no answer within {bound:?}"));
        match refused {
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                assert_eq!(response.status(), 503, "{path}");
            }
            other => panic!("{path}: {:?}", other.map(|(_, response)| response)),
        }
    }
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/ws", app.addr))
        .await
        .unwrap();
    ws.send(Message::text(
        json!({"type": "auth", "key": key, "ref": "a"}).to_string(),
    ))
    .await
    .unwrap();
    let told = answer(&mut ws, bound).await;
    assert_eq!(
        (&told["code"], &told["ref"]),
        (&json!("unavailable"), &json!("a")),
        "{told}"
    );
    let close = tokio::time::timeout(bound, ws.next()).await.unwrap();
    let Some(Ok(Message::Close(Some(frame)))) = close else {
        panic!("a close frame, got {close:?}");
    };
    assert_eq!(u16::from(frame.code), 1013, "{frame:?}");
    drop(paused);
    app.stop_keeping_data().await;
}

/// The committer's connection died while it sat idle (a database restart, a terminated
/// backend): the next send is stored and acked, not answered "perhaps stored". The dead
/// connection is found by a ping before the batch goes out, and replaced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_after_the_committer_died_idle_is_stored_and_acked() {
    let (cluster, app, mut ws) = one_message_acked().await;
    let mut admin = sqlx::PgConnection::connect(&cluster.url()).await.unwrap();
    let ended: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity
          WHERE application_name = 'wschat-commit') AS t",
    )
    .fetch_one(&mut admin)
    .await
    .unwrap();
    assert_eq!(ended, 1);
    // Idle for longer than the committer trusts a connection without a ping.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    ws.send(send_numbered(2)).await.unwrap();
    let told = answer(&mut ws, common::WAIT).await;
    assert_eq!(
        (&told["type"], &told["seq"], &told["ref"]),
        (&json!("ack"), &json!(2), &json!(2)),
        "{told}"
    );
    app.stop_keeping_data().await;
}
