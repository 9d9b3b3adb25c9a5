//! What only PostgreSQL has: the embedding application's SQL contract with its
//! in-statement key hashing, concurrent migrations, and no demo session.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{spawn_with, Backend, Client};
use serde_json::json;
use sqlx::Connection;
use std::sync::Arc;

use wschat_protocol::RoomName;
use wschat_server::store::{hash_key, CommitOutcome, NewMessage, StoreKind};
use wschat_server::{Application, Settings};

#[tokio::test]
async fn nodejschat_style_session_inserts_work_and_keys_never_rest_in_clear() {
    let (settings, dir) = common::fresh(Backend::Postgres).await;
    let app = spawn_with(settings, dir).await;
    assert_eq!(app.shared.store.kind(), StoreKind::Postgres);
    assert!(
        app.shared.store.count_sessions().await.unwrap() == 0,
        "no demo session on PostgreSQL"
    );
    let mut db = sqlx::PgConnection::connect(&app.database).await.unwrap();
    // Exactly as nodejschat's README tells the embedding application.
    sqlx::query("insert into sessions values('1','Michael Redman');")
        .execute(&mut db)
        .await
        .unwrap();
    sqlx::query("insert into sessions values('k2','guest',3);")
        .execute(&mut db)
        .await
        .unwrap();
    let keys: Vec<String> = sqlx::query_scalar("select key from sessions order by \"user\"")
        .fetch_all(&mut db)
        .await
        .unwrap();
    assert!(
        keys.iter()
            .all(|k| k.starts_with("sha256:") && k.len() == 71),
        "{keys:?}"
    );
    let mut michael = Client::legacy(&app, "1").await;
    let mut guest = Client::v1(&app, "k2").await;
    assert_eq!(guest.join("3", None).await, 0);
    let mut other = Client::v1(&app, "k2").await;
    other
        .send(json!({"type": "join", "rooms": [{"room": "0"}]}))
        .await;
    assert_eq!(other.recv_until("error").await["code"], "forbidden_room");
    michael.send(json!({"message": "room zero"})).await;
    assert_eq!(michael.recv().await["user"], "Michael Redman");
    // A deleted session is refused from then on.
    sqlx::query("delete from sessions where \"user\" = 'guest'")
        .execute(&mut db)
        .await
        .unwrap();
    let url = format!("ws://{}/?session_key=k2", app.addr);
    assert!(tokio_tungstenite::connect_async(url).await.is_err());
    drop(guest);
    app.stop().await;
}

/// Lookups asked at the same moment share a query (`PgStore`'s lookup task): each still
/// gets its own session, duplicates and unknown or expired keys included.
#[tokio::test]
async fn session_lookups_asked_together_each_get_their_own_answer() {
    let (settings, dir) = common::fresh(Backend::Postgres).await;
    let app = spawn_with(settings, dir).await;
    let mut db = sqlx::PgConnection::connect(&app.database).await.unwrap();
    for i in 0..20 {
        sqlx::query("insert into sessions values($1, $2, $3)")
            .bind(format!("k{i}"))
            .bind(format!("user{i}"))
            .bind((i % 2 == 0).then_some(i))
            .execute(&mut db)
            .await
            .unwrap();
    }
    sqlx::query(
        "update sessions set expires_at = now() - interval '1 minute' where \"user\" = 'user7'",
    )
    .execute(&mut db)
    .await
    .unwrap();
    // Every key twice; k20 to k29 have no session.
    let keys: Vec<String> = (0..30)
        .flat_map(|i| [format!("k{i}"), format!("k{i}")])
        .collect();
    let hashes: Vec<_> = keys.iter().map(|k| hash_key(k)).collect();
    let store = &app.shared.store;
    let answers =
        futures_util::future::join_all(hashes.iter().map(|hash| store.session(hash))).await;
    for ((key, hash), answer) in keys.iter().zip(&hashes).zip(answers) {
        let i: i32 = key[1..].parse().unwrap();
        let session = answer.unwrap();
        if i >= 20 || i == 7 {
            assert!(session.is_none(), "{key}: {session:?}");
            continue;
        }
        let session = session.unwrap_or_else(|| panic!("{key} has a session"));
        assert_eq!(session.user, format!("user{i}"));
        assert_eq!(session.room, (i % 2 == 0).then_some(i64::from(i)));
        assert_eq!(&session.key, hash);
    }
    app.stop().await;
}

#[tokio::test]
async fn three_servers_migrating_at_once_is_safe() {
    let (settings, _dir) = common::fresh(Backend::Postgres).await;
    let builds = (0..3).map(|_| Application::build(settings.clone()));
    let apps = futures_util::future::join_all(builds).await;
    for app in &apps {
        assert!(app.is_ok(), "{:?}", app.as_ref().err());
    }
    let mut db = sqlx::PgConnection::connect(&settings.database)
        .await
        .unwrap();
    let (applied, distinct): (i64, i64) =
        sqlx::query_as("select count(*), count(distinct version) from wschat_migrations")
            .fetch_one(&mut db)
            .await
            .unwrap();
    assert!(applied >= 3, "every migration applied: {applied}");
    assert_eq!(applied, distinct, "each migration applied once");
    drop(db);
    drop(apps);
    common::drop_database(&settings.database).await;
}

/// nodejschat's published schema (github.com/michael-redman/nodejschat, `schema.psql`):
/// sessions with clear keys and a mandatory room, and the history in `log`.
const NODEJSCHAT_SCHEMA: &str = r#"
    create table sessions (
        key text not null unique,
        "user" text not null,
        room integer not null);
    create sequence message_id_sequence;
    create table log (
        message_id integer default nextval('message_id_sequence'::text) not null unique,
        room integer not null,
        "time" timestamp not null,
        "user" text not null,
        message text not null);
"#;

/// `2016-08-08T17:20:32.421Z`, the first log row's time.
const LOG_BASE_MS: i64 = 1_470_676_832_421;

/// The rooms, users and texts of the generated log: message `i` (1-based).
fn log_row(i: i64) -> (i64, String, String) {
    let room = match i % 5 {
        1 | 2 => 3,
        0 => 7,
        _ => 0,
    };
    (
        room,
        format!("user{}", i % 4),
        format!("line {i} of the log"),
    )
}

/// A digest of every row of `log` and of the sequence, to show the upgrade left them be.
async fn log_fingerprint(db: &mut sqlx::PgConnection) -> (i64, String, i64) {
    sqlx::query_as(
        r#"select count(*),
                  md5(coalesce(string_agg(concat_ws('|', message_id, room, "time", "user", message),
                                           ',' order by message_id), '')),
                  (select last_value from message_id_sequence)
           from log"#,
    )
    .fetch_one(db)
    .await
    .unwrap()
}

#[tokio::test]
async fn a_nodejschat_database_is_upgraded_in_place() {
    let (mut settings, dir) = common::fresh(Backend::Postgres).await;
    settings.history_limit = 1000;
    let mut db = sqlx::PgConnection::connect(&settings.database)
        .await
        .unwrap();
    sqlx::raw_sql(NODEJSCHAT_SCHEMA)
        .execute(&mut db)
        .await
        .unwrap();
    // The application's own table, which the upgrade must not touch.
    sqlx::raw_sql(
        "create table app_users (id serial primary key, name text);
         insert into app_users (name) values ('Michael Redman'), ('ada');",
    )
    .execute(&mut db)
    .await
    .unwrap();
    sqlx::query("insert into sessions values ('1', 'Michael Redman', 3), ('old-key', 'ada', 7)")
        .execute(&mut db)
        .await
        .unwrap();
    // 300 messages across rooms 0, 3 and 7, interleaved, 1.5 s apart. message_id has
    // gaps (as a sequence leaves after rollbacks): seq must not.
    let n: i64 = 300;
    let (mut ids, mut rooms, mut times, mut users, mut texts) =
        (vec![], vec![], vec![], vec![], vec![]);
    for i in 1..=n {
        let (room, user, text) = log_row(i);
        ids.push(i32::try_from(i * 2).unwrap());
        rooms.push(i32::try_from(room).unwrap());
        times.push((LOG_BASE_MS + (i - 1) * 1500) as f64 / 1000.0);
        users.push(user);
        texts.push(text);
    }
    sqlx::query(
        r#"insert into log (message_id, room, "time", "user", message)
           select m, r, to_timestamp(t) at time zone 'UTC', u, x
           from unnest($1::int[], $2::int[], $3::float8[], $4::text[], $5::text[]) as v(m, r, t, u, x)"#,
    )
    .bind(&ids)
    .bind(&rooms)
    .bind(&times)
    .bind(&users)
    .bind(&texts)
    .execute(&mut db)
    .await
    .unwrap();
    sqlx::query("select setval('message_id_sequence', 600)")
        .execute(&mut db)
        .await
        .unwrap();
    let before = log_fingerprint(&mut db).await;
    assert_eq!(before.0, n);

    // The upgrade: `Application::build` applies the migrations.
    let app = spawn_with(settings.clone(), dir).await;

    // Keys hashed in place.
    let keys: Vec<String> = sqlx::query_scalar("select key from sessions order by \"user\"")
        .fetch_all(&mut db)
        .await
        .unwrap();
    let mut want_keys = vec![
        wschat_server::store::hash_key("1").as_str().to_owned(),
        wschat_server::store::hash_key("old-key")
            .as_str()
            .to_owned(),
    ];
    let mut keys = keys;
    keys.sort();
    want_keys.sort();
    assert_eq!(keys, want_keys);

    let expected = |room: i64| -> Vec<(String, String, String)> {
        (1..=n)
            .filter(|&i| log_row(i).0 == room)
            .map(|i| {
                let (_, user, text) = log_row(i);
                let time = wschat_server::store::format_time(LOG_BASE_MS + (i - 1) * 1500);
                (time, user, text)
            })
            .collect()
    };

    // A legacy client with its old clear key gets room 3's history, in order, with the
    // original times.
    let mut legacy = Client::legacy(&app, "1").await;
    let want = expected(3);
    assert_eq!(want.len(), 120);
    let mut got = Vec::new();
    for _ in 0..want.len() {
        let f = legacy.recv().await;
        got.push((
            f["time"].as_str().unwrap().to_owned(),
            f["user"].as_str().unwrap().to_owned(),
            f["message"].as_str().unwrap().to_owned(),
        ));
    }
    assert_eq!(got, want);
    assert_eq!(got[0].0, "2016-08-08T17:20:32.421Z");

    // v1 sees each room as seq 1..n, in the original order.
    let mut v1 = Client::v1(&app, "old-key").await;
    assert_eq!(v1.join("7", Some(0)).await, 60);
    let want = expected(7);
    for (k, (time, user, text)) in want.iter().enumerate() {
        let m = v1.recv_until("message").await;
        assert_eq!(m["seq"].as_u64(), Some(k as u64 + 1));
        assert_eq!(
            (m["time"].as_str(), m["user"].as_str(), m["text"].as_str()),
            (
                Some(time.as_str()),
                Some(user.as_str()),
                Some(text.as_str())
            )
        );
    }
    let heads: Vec<(String, i64, i64)> = sqlx::query_as(
        "select r.name, r.last_seq, count(m.id) from wschat_rooms r
         left join wschat_messages m on m.room_id = r.id group by r.name, r.last_seq order by r.name",
    )
    .fetch_all(&mut db)
    .await
    .unwrap();
    assert_eq!(
        heads,
        vec![
            ("0".into(), 120, 120),
            ("3".into(), 120, 120),
            ("7".into(), 60, 60)
        ]
    );

    // New messages follow the imported ones.
    legacy.send(json!({"message": "hello again"})).await;
    let echo = legacy.recv().await;
    assert_eq!(echo["message"], "hello again");
    let seq: i64 = sqlx::query_scalar(
        "select m.seq from wschat_messages m join wschat_rooms r on r.id = m.room_id
         where r.name = '3' and m.text = 'hello again'",
    )
    .fetch_one(&mut db)
    .await
    .unwrap();
    assert_eq!(seq, 121);

    // Running the import again stores nothing twice.
    sqlx::query("delete from wschat_migrations where version = 2")
        .execute(&mut db)
        .await
        .unwrap();
    app.shared.store.migrate().await.unwrap();
    let total: i64 = sqlx::query_scalar("select count(*) from wschat_messages")
        .fetch_one(&mut db)
        .await
        .unwrap();
    assert_eq!(total, n + 1);

    // The application's tables are untouched.
    assert_eq!(log_fingerprint(&mut db).await, before);
    let app_users: Vec<String> = sqlx::query_scalar("select name from app_users order by id")
        .fetch_all(&mut db)
        .await
        .unwrap();
    assert_eq!(app_users, vec!["Michael Redman", "ada"]);
    // nodejschat's later releases made `room` mandatory; wschat gives a session without
    // one room "0", as its admin API and `wschat session create` make them.
    sqlx::query("insert into sessions values ('2', 'guest')")
        .execute(&mut db)
        .await
        .unwrap();
    drop(db);
    app.stop().await;
}

/// nodejschat's first releases, as its README describes them: sessions without a room and
/// one shared history in `chat_log`, replayed `order by time`.
const NODEJSCHAT_FIRST_SCHEMA: &str = r#"
    create table sessions (
        key text not null unique,
        "user" text not null);
    create table chat_log (
        "time" timestamp not null,
        "user" text not null,
        message text not null);
"#;

#[tokio::test]
async fn a_first_release_nodejschat_database_keeps_its_chat_log() {
    let (settings, dir) = common::fresh(Backend::Postgres).await;
    let mut db = sqlx::PgConnection::connect(&settings.database)
        .await
        .unwrap();
    sqlx::raw_sql(NODEJSCHAT_FIRST_SCHEMA)
        .execute(&mut db)
        .await
        .unwrap();
    // Inserted out of time order; two rows share a time (kept in insertion order).
    sqlx::raw_sql(
        r#"insert into sessions values ('1', 'Michael Redman');
           insert into chat_log values
               ('2016-08-08 17:20:33.921', 'ada', 'second'),
               ('2016-08-08 17:20:32.421', 'Michael Redman', 'first'),
               ('2016-08-08 17:20:35.000', 'bob', 'third'),
               ('2016-08-08 17:20:35.000', 'ada', 'fourth');"#,
    )
    .execute(&mut db)
    .await
    .unwrap();

    let app = spawn_with(settings.clone(), dir).await;

    // A session without a room is in room "0", where the history now is, in nodejschat's
    // order and with its times.
    let mut legacy = Client::legacy(&app, "1").await;
    let mut got = Vec::new();
    for _ in 0..4 {
        let f = legacy.recv().await;
        got.push(format!(
            "{} {} {}",
            f["time"].as_str().unwrap(),
            f["user"].as_str().unwrap(),
            f["message"].as_str().unwrap()
        ));
    }
    assert_eq!(
        got,
        [
            "2016-08-08T17:20:32.421Z Michael Redman first",
            "2016-08-08T17:20:33.921Z ada second",
            "2016-08-08T17:20:35.000Z bob third",
            "2016-08-08T17:20:35.000Z ada fourth",
        ]
    );
    legacy.send(json!({"message": "hello again"})).await;
    assert_eq!(legacy.recv().await["message"], "hello again");
    let seqs: Vec<(i64, String)> = sqlx::query_as(
        "select m.seq, m.text from wschat_messages m join wschat_rooms r on r.id = m.room_id
         where r.name = '0' order by m.id",
    )
    .fetch_all(&mut db)
    .await
    .unwrap();
    assert_eq!(
        seqs,
        [
            (1, "first".to_owned()),
            (2, "second".to_owned()),
            (3, "third".to_owned()),
            (4, "fourth".to_owned()),
            (5, "hello again".to_owned()),
        ]
    );

    // What was imported, and where: room "0"'s seqs 1 to 4.
    let marker: (i64, i64, i64, String) = sqlx::query_as(
        "select i.messages, i.first_seq, i.last_seq, r.name
         from wschat_legacy_chat_log_imported i join wschat_rooms r on r.id = i.room_id",
    )
    .fetch_one(&mut db)
    .await
    .unwrap();
    assert_eq!(marker, (4, 1, 4, "0".to_owned()));
    // docs/deploy.md's recipe for a nodejschat whose database ran in another zone moves
    // the imported times (here 4 h: New York's summer time), and nothing else.
    let times = || {
        sqlx::query_as::<_, (String, String)>(
            r#"select m.text, to_char(m.created_at at time zone 'UTC', 'HH24:MI:SS.MS')
               from wschat_messages m order by m.id"#,
        )
    };
    let before = times().fetch_all(&mut db).await.unwrap();
    sqlx::raw_sql(
        r#"UPDATE wschat_messages m
   SET created_at = (m.created_at AT TIME ZONE 'UTC') AT TIME ZONE 'America/New_York'
 WHERE m.id IN (SELECT id FROM wschat_legacy_imported)
    OR (m.room_id, m.seq) IN (SELECT c.room_id, s FROM wschat_legacy_chat_log_imported c,
                                     generate_series(c.first_seq, c.last_seq) s);"#,
    )
    .execute(&mut db)
    .await
    .unwrap();
    let after = times().fetch_all(&mut db).await.unwrap();
    assert_eq!(before[0].1, "17:20:32.421");
    assert_eq!(after[0], ("first".to_owned(), "21:20:32.421".to_owned()));
    assert_eq!(after[3], ("fourth".to_owned(), "21:20:35.000".to_owned()));
    assert_eq!(after[4], before[4], "a new message keeps its time");

    // Once: running the import again stores nothing twice.
    sqlx::query("delete from wschat_migrations where version = 5")
        .execute(&mut db)
        .await
        .unwrap();
    app.shared.store.migrate().await.unwrap();
    let total: i64 = sqlx::query_scalar("select count(*) from wschat_messages")
        .fetch_one(&mut db)
        .await
        .unwrap();
    assert_eq!(total, 5);
    let old: i64 = sqlx::query_scalar("select count(*) from chat_log")
        .fetch_one(&mut db)
        .await
        .unwrap();
    assert_eq!(old, 4, "chat_log is only read");

    // A room "0" that already holds messages (wschat ran on this database before the
    // import existed) keeps them last: the old history goes to a room of its own.
    sqlx::raw_sql(
        "delete from wschat_legacy_chat_log_imported; delete from wschat_migrations where version = 5",
    )
    .execute(&mut db)
    .await
    .unwrap();
    app.shared.store.migrate().await.unwrap();
    let rooms: Vec<(String, i64, i64)> = sqlx::query_as(
        "select r.name, r.last_seq, count(m.id) from wschat_rooms r
         left join wschat_messages m on m.room_id = r.id group by r.name, r.last_seq order by r.name",
    )
    .fetch_all(&mut db)
    .await
    .unwrap();
    assert_eq!(
        rooms,
        [
            ("0".to_owned(), 5, 5),
            ("nodejschat chat_log".to_owned(), 4, 4)
        ]
    );
    drop(db);
    app.stop().await;
}

/// A `chat_log` of the application's own that is not nodejschat's (another type for
/// `time`) is left alone, and the upgrade goes on.
#[tokio::test]
async fn a_chat_log_that_is_not_nodejschats_is_left_alone() {
    let (settings, dir) = common::fresh(Backend::Postgres).await;
    let mut db = sqlx::PgConnection::connect(&settings.database)
        .await
        .unwrap();
    sqlx::raw_sql(
        r#"create table chat_log ("time" text, "user" text, message text);
           insert into chat_log values ('yesterday', 'ada', 'hi');"#,
    )
    .execute(&mut db)
    .await
    .unwrap();
    let app = spawn_with(settings.clone(), dir).await;
    let imported: i64 = sqlx::query_scalar("select count(*) from wschat_messages")
        .fetch_one(&mut db)
        .await
        .unwrap();
    assert_eq!(imported, 0);
    drop(db);
    app.stop().await;
}

/// A migration may be one long statement (a big log imported, a big `sessions` table
/// hashed): it runs without the reads' 30-s statement timeout, which would fail every
/// start with the migrations before it already committed.
#[tokio::test]
async fn migrations_run_without_the_statement_timeout_of_reads() {
    let (settings, dir) = common::fresh(Backend::Postgres).await;
    let mut db = sqlx::PgConnection::connect(&settings.database)
        .await
        .unwrap();
    // The application's own trigger on `sessions` sees the hashing UPDATE of migration 1.
    sqlx::raw_sql(
        r#"create table sessions (key text not null unique, "user" text not null);
           insert into sessions values ('1', 'Michael Redman');
           create table seen_timeouts (during text);
           create function note_timeout() returns trigger language plpgsql as $$
           begin
               insert into seen_timeouts values (current_setting('statement_timeout'));
               return new;
           end $$;
           create trigger note_timeout before update on sessions
               for each row execute function note_timeout();"#,
    )
    .execute(&mut db)
    .await
    .unwrap();
    let app = spawn_with(settings.clone(), dir).await;
    let seen: Vec<String> = sqlx::query_scalar("select during from seen_timeouts")
        .fetch_all(&mut db)
        .await
        .unwrap();
    assert_eq!(seen, ["0"]);
    drop(db);
    app.stop().await;
}

/// A message the store committed without the hub hearing of it (a commit whose answer was
/// lost when the connection died during COMMIT: its sender was told `unavailable`, and a
/// legacy sender does not retry) still reaches the room's subscribers on a single
/// PostgreSQL node, with no later message in the room to reveal the gap: the node reads
/// its rooms' heads from the store at every heartbeat (every 4 s), whatever its broker.
#[tokio::test]
async fn a_commit_the_hub_never_heard_of_reaches_the_subscribers() {
    for broker in ["postgres", "local"] {
        a_commit_the_hub_never_heard_of_reaches_the_subscribers_with(broker).await;
    }
}

async fn a_commit_the_hub_never_heard_of_reaches_the_subscribers_with(broker: &str) {
    let (mut settings, dir) = common::fresh(Backend::Postgres).await;
    settings.broker = broker.to_owned();
    let app = spawn_with(settings, dir).await;
    let key = app.session("ada", None).await;
    let mut client = Client::v1(&app, &key).await;
    client.join("q", None).await;
    let unannounced = NewMessage {
        room: RoomName::new("q").unwrap(),
        user: "ada".into(),
        text: "committed, never announced".into(),
        client_msg_id: None,
    };
    app.shared
        .store
        .commit_batch(Arc::from(vec![unannounced]))
        .await
        .unwrap();
    let m = client.recv_until("message").await;
    assert_eq!(
        (m["seq"].as_u64(), m["text"].as_str()),
        (Some(1), Some("committed, never announced")),
        "broker {broker}"
    );
    app.stop().await;
}

/// Two nodes committing to the same rooms, one of them creating a room the other also
/// creates: the one-statement path (no repeat) and the transaction path (a repeated
/// `client_msg_id`) take the rooms' locks in the same order, so PostgreSQL never has to
/// break a deadlock between them (it would fail a batch, answered `unavailable`). The
/// second node starts a moment later each time, to land in the other's window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_creating_the_same_room_never_deadlock() {
    let (settings, _dir) = common::fresh(Backend::Postgres).await;
    let a = wschat_server::store::open(&settings.database)
        .await
        .unwrap();
    a.migrate().await.unwrap();
    let b = wschat_server::store::open(&settings.database)
        .await
        .unwrap();
    let msg = |room: &str, user: &str, cmid: Option<String>| NewMessage {
        room: RoomName::new(room).unwrap(),
        user: user.into(),
        text: "t".into(),
        client_msg_id: cmid,
    };
    let mut failed = Vec::new();
    for i in 0..300u64 {
        let (old, new) = (format!("d{i:03}a"), format!("d{i:03}n"));
        a.commit_batch(Arc::from(vec![msg(&old, "seed", None)]))
            .await
            .unwrap();
        let repeat = Some(format!("r{i}"));
        let on_a: Arc<[NewMessage]> = Arc::from(vec![
            msg(&old, "ada", repeat.clone()),
            msg(&new, "ada", None),
            msg(&old, "ada", repeat),
        ]);
        let on_b: Arc<[NewMessage]> =
            Arc::from(vec![msg(&old, "bob", None), msg(&new, "bob", None)]);
        let delay = std::time::Duration::from_micros(100 * (i % 20));
        let (ra, rb) = tokio::join!(a.commit_batch(on_a), async {
            tokio::time::sleep(delay).await;
            b.commit_batch(on_b).await
        });
        failed.extend(ra.err().map(|e| format!("{i} transaction path: {e}")));
        failed.extend(rb.err().map(|e| format!("{i} one statement: {e}")));
    }
    assert!(
        failed.is_empty(),
        "{} batches failed: {failed:?}",
        failed.len()
    );
}

/// A retry that another node commits while this node's batch is on the transaction path
/// (its lookup ran before that commit, so its insert waits on the other's, then violates
/// the `(user, client_msg_id)` index) is found by a second attempt: the retry answered as
/// the other node's message, the rest of the batch stored, nobody told "not stored".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_another_node_commits_meanwhile_fails_nothing_in_the_batch() {
    let (settings, _dir) = common::fresh(Backend::Postgres).await;
    let store = wschat_server::store::open(&settings.database)
        .await
        .unwrap();
    store.migrate().await.unwrap();
    let msg = |user: &str, text: &str, cmid: &str| NewMessage {
        room: RoomName::new("q").unwrap(),
        user: user.into(),
        text: text.into(),
        client_msg_id: Some(cmid.into()),
    };
    store
        .commit_batch(Arc::from(vec![msg("seed", "room made", "s")]))
        .await
        .unwrap();
    // The other node, mid-commit: its first try of ada's "x" inserted, not committed.
    let mut other = sqlx::PgConnection::connect(&settings.database)
        .await
        .unwrap();
    let other_pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut other)
        .await
        .unwrap();
    let mut other_tx = other.begin().await.unwrap();
    sqlx::query(
        r#"WITH b AS (UPDATE wschat_rooms SET last_seq = last_seq + 1 WHERE name = 'q'
                      RETURNING id, last_seq)
           INSERT INTO wschat_messages (room_id, seq, "user", text, created_at, client_msg_id)
           SELECT id, last_seq, 'ada', 'first try', now(), 'x' FROM b"#,
    )
    .execute(&mut *other_tx)
    .await
    .unwrap();
    // This node's batch: ada's retry of "x", and bob's "y" twice (a repeat in the batch
    // sends it down the transaction path at once).
    let batch: Arc<[NewMessage]> = Arc::from(vec![
        msg("ada", "retry", "x"),
        msg("bob", "hello", "y"),
        msg("bob", "hello", "y"),
    ]);
    let committing = tokio::spawn({
        let store = store.clone();
        async move { store.commit_batch(batch).await }
    });
    // Its lookup done (ada's "x" not visible yet), it waits on the other's locks (on that
    // backend's, not any other test's: the cluster is shared).
    let mut watch = sqlx::PgConnection::connect(&settings.database)
        .await
        .unwrap();
    let waiting_since = std::time::Instant::now();
    loop {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))",
        )
        .bind(other_pid)
        .fetch_one(&mut watch)
        .await
        .unwrap();
        if waiting > 0 {
            break;
        }
        assert!(
            waiting_since.elapsed() < std::time::Duration::from_secs(20),
            "the batch never waited on the other node: {:?}",
            committing.is_finished()
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    other_tx.commit().await.unwrap();
    let outcomes = committing.await.unwrap().expect("the batch commits");
    let seen: Vec<(bool, &str, u64)> = outcomes
        .iter()
        .map(|o| {
            let m = o.message();
            (
                matches!(o, CommitOutcome::Stored(_)),
                m.text.as_str(),
                m.seq,
            )
        })
        .collect();
    assert_eq!(
        seen,
        vec![
            (false, "first try", 2),
            (true, "hello", 3),
            (false, "hello", 3)
        ]
    );
}

/// A node that stops gracefully deregisters (after any heartbeat still in flight): a node
/// with a local broker refuses to start beside a live node, and a node with a shared
/// broker beside a live local one, so each start below needs the node before it gone.
#[tokio::test]
async fn a_stopped_node_deregisters_so_a_local_node_may_follow_at_once() {
    let (settings, dir) = common::fresh(Backend::Postgres).await;
    for broker in [
        "postgres", "local", "postgres", "local", "postgres", "local",
    ] {
        let node = Settings {
            broker: broker.into(),
            ..settings.clone()
        };
        spawn_with(node, dir.clone())
            .await
            .stop_keeping_data()
            .await;
    }
    common::drop_database(&settings.database).await;
}

/// Lookups asked together share one query; a row of theirs that cannot be read (an old
/// nodejschat table whose `user` may be NULL) fails only its own key, not the others'.
#[tokio::test]
async fn a_session_row_that_cannot_be_read_fails_only_its_own_key() {
    let (settings, _dir) = common::fresh(Backend::Postgres).await;
    let store = wschat_server::store::open(&settings.database)
        .await
        .unwrap();
    store.migrate().await.unwrap();
    let good = hash_key("good-key");
    store.create_session(&good, "ada", None).await.unwrap();
    let mut db = sqlx::PgConnection::connect(&settings.database)
        .await
        .unwrap();
    sqlx::query(r#"ALTER TABLE sessions ALTER COLUMN "user" DROP NOT NULL"#)
        .execute(&mut db)
        .await
        .unwrap();
    sqlx::query(r#"INSERT INTO sessions (key, "user") VALUES ('broken-key', NULL)"#)
        .execute(&mut db)
        .await
        .unwrap();
    let broken = hash_key("broken-key");
    // Both asked before the lookup task runs (this test's runtime has one thread): one
    // query answers both.
    let (good_found, broken_found) = tokio::join!(store.session(&good), store.session(&broken));
    assert_eq!(good_found.unwrap().map(|s| s.user), Some("ada".to_owned()));
    assert!(broken_found.is_err(), "{broken_found:?}");
    common::drop_database(&settings.database).await;
}
