//! End-to-end behaviour of both protocols against a real server on port 0.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
mod common;

use std::collections::{HashMap, HashSet};

use common::{fresh, spawn_app, spawn_with, Backend, Client, TestApp};
use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;
use wschat_protocol::close;
use wschat_server::Settings;

suite!(
    legacy_and_v1_clients_in_one_room_see_each_other,
    twenty_clients_a_hundred_messages_each_none_lost_none_duplicated_in_order,
    with_write_pacing_on_none_lost_none_duplicated_in_order,
    a_message_sent_in_the_first_millisecond_is_delivered,
    history_survives_a_restart_and_legacy_gets_the_last_hundred,
    reconnect_with_since_gets_exactly_the_missed_messages,
    a_retried_client_msg_id_returns_the_first_ack_and_stores_one_row,
    unknown_or_missing_key_is_refused_with_401,
    bad_frames_get_errors_and_the_connection_goes_on,
    a_session_with_a_room_may_use_only_that_room,
    history_pages_presence_and_typing,
    a_second_connection_of_a_user_is_no_presence_news,
    graceful_stop_closes_every_websocket_with_1012,
    a_stop_during_a_paced_backfill_ends_it_with_1012_and_a_resume_gets_the_rest,
    a_client_behind_on_reading_at_a_stop_still_gets_its_1012,
    a_client_that_does_not_read_is_closed_with_4008_and_resumes_without_loss,
    a_since_older_than_what_is_kept_gets_a_reset_then_the_last_messages,
    retention_during_a_paced_resume_gets_a_reset_not_a_silent_gap,
    the_key_can_travel_in_the_subprotocol_header_or_the_query,
    a_deleted_or_expired_session_closes_its_connections_with_1008,
    a_close_the_client_starts_is_answered_with_its_code,
    a_store_that_cannot_be_read_gets_left_and_errors_never_4009,
);

async fn legacy_and_v1_clients_in_one_room_see_each_other(backend: Backend) {
    let app = spawn_app(backend).await;
    let legacy_key = app.session("Michael Redman", Some(3)).await;
    let v1_key = app.session("ada", None).await;
    let mut legacy = Client::legacy(&app, &legacy_key).await;
    let mut v1 = Client::v1(&app, &v1_key).await;
    assert_eq!(v1.join("3", None).await, 0);

    legacy.send(json!({"message": "hello from 2016"})).await;
    // The legacy sender gets its own message back, as nodejschat did.
    let echo = legacy.recv().await;
    assert_eq!(echo["user"], "Michael Redman");
    assert_eq!(echo["message"], "hello from 2016");
    let time = echo["time"].as_str().unwrap();
    assert_eq!(time.len(), 24, "RFC 3339 with milliseconds: {time}");
    assert!(time.ends_with('Z'));
    let seen = v1.recv_until("message").await;
    assert_eq!(
        (
            seen["room"].as_str(),
            seen["seq"].as_u64(),
            seen["text"].as_str()
        ),
        (Some("3"), Some(1), Some("hello from 2016"))
    );

    let ack = v1.say("3", "hello from v1", "c-1").await;
    assert_eq!(ack["seq"], 2);
    let got = legacy.recv().await;
    assert_eq!(
        (got["user"].as_str(), got["message"].as_str()),
        (Some("ada"), Some("hello from v1"))
    );
    // Old clients send numbers: stored as their text.
    legacy.send(json!({"message": 0.123})).await;
    assert_eq!(legacy.recv().await["message"], "0.123");
    app.stop().await;
}

async fn twenty_clients_a_hundred_messages_each_none_lost_none_duplicated_in_order(
    backend: Backend,
) {
    twenty_clients_a_hundred_messages_each(spawn_app(backend).await).await;
}

/// The same with write pacing always on: a connection that gets frames more often than every
/// 20 ms that wrote within the last 20 ms holds its next write, so frames go out in
/// batches (hub/pacing.rs).
async fn with_write_pacing_on_none_lost_none_duplicated_in_order(backend: Backend) {
    let (settings, dir) = fresh(backend).await;
    let settings = Settings {
        write_delay_ms: 20,
        write_delay_above_per_sec: 0,
        ..settings
    };
    let app = spawn_with(settings, dir).await;
    assert_eq!(
        app.shared.pacing.delay(),
        std::time::Duration::from_millis(20)
    );
    twenty_clients_a_hundred_messages_each(app).await;
}

async fn twenty_clients_a_hundred_messages_each(app: TestApp) {
    let mut clients = Vec::new();
    for i in 0..20 {
        let key = app.session(&format!("user{i}"), None).await;
        if i % 2 == 0 {
            clients.push((true, Client::legacy(&app, &key).await));
        } else {
            let mut c = Client::v1(&app, &key).await;
            c.join("0", None).await;
            c.recv_until("presence").await;
            clients.push((false, c));
        }
    }
    let mut tasks = Vec::new();
    for (i, (is_legacy, mut client)) in clients.into_iter().enumerate() {
        tasks.push(tokio::spawn(async move {
            let mut received: Vec<(Option<u64>, String)> = Vec::new();
            for n in 0..100 {
                let text = format!("m-{i}-{n}");
                if is_legacy {
                    client.send(json!({"message": text})).await;
                } else {
                    client
                        .send(json!({"type": "send", "room": "0", "text": text, "client_msg_id": text}))
                        .await;
                }
            }
            while received.len() < 2000 {
                let v = client.recv().await;
                if is_legacy {
                    received.push((None, v["message"].as_str().unwrap().to_owned()));
                } else if v["type"] == "message" {
                    received.push((v["seq"].as_u64(), v["text"].as_str().unwrap().to_owned()));
                }
            }
            received
        }));
    }
    let mut orders = Vec::new();
    for task in tasks {
        let received = task.await.unwrap();
        let texts: HashSet<&String> = received.iter().map(|(_, t)| t).collect();
        assert_eq!(texts.len(), 2000, "no duplicate, none lost");
        if let Some(Some(_)) = received.first().map(|r| r.0) {
            let seqs: Vec<u64> = received.iter().map(|r| r.0.unwrap()).collect();
            assert_eq!(seqs, (1..=2000).collect::<Vec<u64>>(), "gap-free seq order");
        }
        orders.push(received.into_iter().map(|r| r.1).collect::<Vec<_>>());
    }
    // Every client, legacy or v1, saw the room in the same order.
    for order in &orders {
        assert_eq!(order, &orders[0]);
    }
    app.stop().await;
}

async fn a_message_sent_in_the_first_millisecond_is_delivered(backend: Backend) {
    let app = spawn_app(backend).await;
    let key = app.session("early", None).await;
    let mut legacy = Client::connect(&app.legacy_url(&key)).await;
    legacy.send(json!({"message": "first!"})).await;
    assert_eq!(legacy.recv().await, json!({"authenticated": true}));
    assert_eq!(legacy.recv().await["message"], "first!");

    // v1: auth and send in the same breath.
    let mut v1 = Client::connect(&app.v1_url()).await;
    v1.send(json!({"type": "auth", "key": key})).await;
    v1.send(json!({"type": "send", "room": "0", "text": "me too", "client_msg_id": "x"}))
        .await;
    let hello = v1.recv().await;
    assert_eq!(hello["type"], "hello");
    // Where this session's legacy connection is: a client with no rooms starts there.
    assert_eq!(hello["default_room"], "0", "{hello}");
    let ack = v1.recv_until("ack").await;
    assert_eq!(ack["seq"], 2);
    app.stop().await;
}

async fn history_survives_a_restart_and_legacy_gets_the_last_hundred(backend: Backend) {
    let app = spawn_app(backend).await;
    let key = app.session("keeper", Some(5)).await;
    let mut v1 = Client::v1(&app, &key).await;
    for n in 1..=120 {
        v1.say("5", &format!("msg {n}"), &format!("k{n}")).await;
    }
    let settings = app.settings.clone();
    let dir = app.stop_keeping_data().await;

    let app = spawn_with(settings, dir).await;
    let mut legacy = Client::legacy(&app, &key).await;
    let mut history = Vec::new();
    for _ in 0..100 {
        history.push(legacy.recv().await["message"].as_str().unwrap().to_owned());
    }
    let expected: Vec<String> = (21..=120).map(|n| format!("msg {n}")).collect();
    assert_eq!(history, expected, "the last 100, oldest first");
    // Then live.
    legacy.send(json!({"message": "after restart"})).await;
    assert_eq!(legacy.recv().await["message"], "after restart");
    app.stop().await;
}

async fn reconnect_with_since_gets_exactly_the_missed_messages(backend: Backend) {
    let app = spawn_app(backend).await;
    let reader_key = app.session("reader", None).await;
    let writer_key = app.session("writer", None).await;
    let mut writer = Client::v1(&app, &writer_key).await;
    let mut reader = Client::v1(&app, &reader_key).await;
    reader.join("lobby", None).await;
    writer.say("lobby", "one", "1").await;
    writer.say("lobby", "two", "2").await;
    let mut last = 0;
    while last < 2 {
        let m = reader.recv_until("message").await;
        last = m["seq"].as_u64().unwrap();
    }
    drop(reader);
    for n in 3..=7 {
        writer
            .say("lobby", &format!("missed {n}"), &n.to_string())
            .await;
    }
    let mut reader = Client::v1(&app, &reader_key).await;
    assert_eq!(reader.join("lobby", Some(2)).await, 7);
    let mut seqs = Vec::new();
    while seqs.len() < 5 {
        let m = reader.recv_until("message").await;
        assert_eq!(m["text"], format!("missed {}", m["seq"]));
        seqs.push(m["seq"].as_u64().unwrap());
    }
    assert_eq!(seqs, vec![3, 4, 5, 6, 7]);
    // Nothing more (no duplicate), then live continues at 8.
    writer.say("lobby", "live", "8").await;
    let next = reader.recv_until("message").await;
    assert_eq!(
        (next["seq"].as_u64(), next["text"].as_str()),
        (Some(8), Some("live"))
    );
    app.stop().await;
}

async fn a_retried_client_msg_id_returns_the_first_ack_and_stores_one_row(backend: Backend) {
    let app = spawn_app(backend).await;
    let key = app.session("retrier", None).await;
    let mut c = Client::v1(&app, &key).await;
    let first = c.say("r", "only once", "same-id").await;
    let again = c.say("r", "only once", "same-id").await;
    assert_eq!(first, again);
    // Two in one breath (same batch) too.
    c.send(json!({"type": "send", "room": "r", "text": "twice", "client_msg_id": "b"}))
        .await;
    c.send(json!({"type": "send", "room": "r", "text": "twice", "client_msg_id": "b"}))
        .await;
    let a = c.recv_until("ack").await;
    let b = c.recv_until("ack").await;
    assert_eq!(a, b);
    let room = wschat_protocol::RoomName::new("r").unwrap();
    let stored = app
        .shared
        .store
        .messages_after(&room, 0, 100)
        .await
        .unwrap();
    let texts: Vec<&str> = stored.iter().map(|m| m.text.as_str()).collect();
    assert_eq!(texts, vec!["only once", "twice"]);
    app.stop().await;
}

async fn unknown_or_missing_key_is_refused_with_401(backend: Backend) {
    let app = spawn_app(backend).await;
    for url in [
        format!("ws://{}/?session_key=nope", app.addr),
        format!("ws://{}/some/path", app.addr),
        format!("ws://{}/ws?session_key=nope", app.addr),
    ] {
        match tokio_tungstenite::connect_async(&url).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                assert_eq!(response.status(), 401, "{url}")
            }
            other => panic!("{url}: expected 401, got {other:?}"),
        }
    }
    // A wrong key in the auth frame: an error, then close 4001.
    let mut c = Client::connect(&app.v1_url()).await;
    c.send(json!({"type": "auth", "key": "wrong", "ref": 1}))
        .await;
    let err = c.recv().await;
    assert_eq!(
        (err["code"].as_str(), err["ref"].as_u64()),
        (Some("auth_failed"), Some(1))
    );
    assert_eq!(c.close_code().await, Some(close::AUTH_FAILED));
    app.stop().await;
}

async fn bad_frames_get_errors_and_the_connection_goes_on(backend: Backend) {
    let app = spawn_app(backend).await;
    let key = app.session("clumsy", None).await;
    let mut c = Client::v1(&app, &key).await;
    let cases: Vec<(&str, &str)> = vec![
        ("{not json", "bad_json"),
        (r#"{"type":"dance","ref":"d"}"#, "unknown_type"),
        (r#"{"type":"send","room":"a"}"#, "invalid_frame"),
        (r#"{"type":"send","room":"","text":"x"}"#, "invalid_room"),
        (
            r#"{"type":"send","room":"a","text":"   "}"#,
            "empty_message",
        ),
        (r#"{"type":"leave","room":"never"}"#, "not_joined"),
        (
            r#"{"type":"join","rooms":[{"room":"a","since":99}]}"#,
            "bad_since",
        ),
        (r#"{"type":"auth","key":"x"}"#, "already_authenticated"),
    ];
    for (frame, code) in cases {
        c.send_raw(frame).await;
        let err = c.recv_until("error").await;
        assert_eq!(err["code"], code, "{frame}");
    }
    c.send(json!({"type": "ping", "ref": 5})).await;
    assert_eq!(c.recv().await, json!({"type": "pong", "ref": 5}));
    let ack = c.say("a", "still here", "1").await;
    assert_eq!(ack["seq"], 1);

    // Legacy: an error frame in nodejschat's shape, and the connection goes on.
    let mut legacy = Client::legacy(&app, &key).await;
    legacy.send_raw("nope").await;
    let err = legacy.recv().await;
    assert_eq!(err["error"], "bad_json");
    legacy.send(json!({"message": "fine"})).await;
    assert_eq!(legacy.recv().await["message"], "fine");
    app.stop().await;
}

async fn a_session_with_a_room_may_use_only_that_room(backend: Backend) {
    let app = spawn_app(backend).await;
    let key = app.session("guest", Some(3)).await;
    let mut c = Client::connect(&format!("{}?session_key={key}", app.v1_url())).await;
    let hello = c.recv().await;
    assert_eq!(
        (&hello["session_room"], &hello["default_room"]),
        (&json!("3"), &json!("3")),
        "{hello}"
    );
    c.send(json!({"type": "join", "rooms": [{"room": "4"}], "ref": 1}))
        .await;
    let err = c.recv_until("error").await;
    assert_eq!(err["code"], "forbidden_room");
    c.send(json!({"type": "send", "room": "general", "text": "x"}))
        .await;
    assert_eq!(c.recv_until("error").await["code"], "forbidden_room");
    assert_eq!(c.join("3", None).await, 0);
    app.stop().await;
}

async fn history_pages_presence_and_typing(backend: Backend) {
    let app = spawn_app(backend).await;
    let a_key = app.session("alice", None).await;
    let b_key = app.session("bob", None).await;
    let mut alice = Client::v1(&app, &a_key).await;
    for n in 1..=30 {
        alice.say("h", &format!("{n}"), &format!("{n}")).await;
    }
    alice
        .send(json!({"type": "history", "room": "h", "before_seq": 11, "limit": 5, "ref": "p"}))
        .await;
    let page = alice.recv_until("history").await;
    let seqs: Vec<u64> = page["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, vec![6, 7, 8, 9, 10]);
    assert_eq!(page["has_more"], true);
    alice
        .send(json!({"type": "history", "room": "h", "before_seq": 3, "limit": 5}))
        .await;
    let page = alice.recv_until("history").await;
    assert_eq!(page["messages"].as_array().unwrap().len(), 2);
    assert_eq!(page["has_more"], false);

    alice.join("h", Some(30)).await;
    let presence = alice.recv_until("presence").await;
    assert_eq!(presence["users"], json!(["alice"]));
    let mut bob = Client::v1(&app, &b_key).await;
    bob.join("h", Some(30)).await;
    let presence = bob.recv_until("presence").await;
    assert_eq!(presence["users"], json!(["alice", "bob"]));
    let diff = alice.recv_until("presence_diff").await;
    assert_eq!(diff["joined"], json!(["bob"]));
    bob.send(json!({"type": "typing", "room": "h"})).await;
    let typing = alice.recv_until("typing").await;
    assert_eq!(typing["user"], "bob");
    bob.send(json!({"type": "leave", "room": "h"})).await;
    assert_eq!(bob.recv_until("left").await["room"], "h");
    let diff = alice.recv_until("presence_diff").await;
    assert_eq!(diff["left"], json!(["bob"]));
    app.stop().await;
}

/// Presence is per user: another connection of a user already in the room, and its
/// leaving while one stays, change nothing; nor does a re-join (a re-sync) of the room; the
/// last one's leaving does.
async fn a_second_connection_of_a_user_is_no_presence_news(backend: Backend) {
    let app = spawn_app(backend).await;
    let a_key = app.session("alice", None).await;
    let b_key = app.session("bob", None).await;
    let mut alice = Client::v1(&app, &a_key).await;
    alice.join("p", None).await;
    let mut bob = Client::v1(&app, &b_key).await;
    bob.join("p", None).await;
    // Alice hears of Bob in her join's presence list, or in a diff: the list is taken once
    // her join's history is queued, and a diff that comes before then is not sent to her.
    let (mut listed, mut heard) = (false, false);
    while !(listed && heard) {
        let frame = alice.recv().await;
        if frame["type"] == "presence" {
            listed = true;
            heard |= frame["users"] == json!(["alice", "bob"]);
        } else if frame["type"] == "presence_diff" {
            assert_eq!(frame["joined"], json!(["bob"]), "{frame}");
            heard = true;
        }
    }
    let mut bob_again = Client::v1(&app, &b_key).await;
    bob_again.join("p", None).await;
    let presence = bob_again.recv_until("presence").await;
    assert_eq!(presence["users"], json!(["alice", "bob"]));
    bob_again.send(json!({"type": "leave", "room": "p"})).await;
    assert_eq!(bob_again.recv_until("left").await["room"], "p");
    // A join of a room Bob is in re-syncs it: he does not leave its presence meanwhile.
    bob.join("p", Some(0)).await;
    assert_eq!(
        bob.recv_until("presence").await["users"],
        json!(["alice", "bob"])
    );
    // Bob, still in the room, types: everything Alice got before it is no presence news.
    bob.send(json!({"type": "typing", "room": "p"})).await;
    loop {
        let frame = alice.recv().await;
        assert_ne!(frame["type"], "presence_diff", "{frame}");
        if frame["type"] == "typing" {
            break;
        }
    }
    bob.send(json!({"type": "leave", "room": "p"})).await;
    assert_eq!(
        alice.recv_until("presence_diff").await["left"],
        json!(["bob"])
    );
    app.stop().await;
}

async fn graceful_stop_closes_every_websocket_with_1012(backend: Backend) {
    let app = spawn_app(backend).await;
    let key = app.session("stayer", None).await;
    let mut v1 = Client::v1(&app, &key).await;
    v1.join("z", None).await;
    let mut legacy = Client::legacy(&app, &key).await;
    // A send in flight when the stop begins is committed and acknowledged.
    v1.send(json!({"type": "send", "room": "z", "text": "last words", "client_msg_id": "lw"}))
        .await;
    let _ack = v1.recv_until("ack").await;
    let shutdown = app.shutdown.clone();
    let stopping = tokio::spawn(app.stop());
    shutdown.cancel();
    assert_eq!(v1.close_code().await, Some(close::SERVICE_RESTART));
    assert_eq!(legacy.close_code().await, Some(close::SERVICE_RESTART));
    stopping.await.unwrap();
}

/// A backfill bigger than the outbound queue waits for the queue to drain between pages
/// (here with pacing on: the node's flusher writes the held queue). A stop that begins
/// meanwhile ends it: the client gets a gap-free start of the backfill, then 1012, and
/// its resume on the restarted server gets the rest.
async fn a_stop_during_a_paced_backfill_ends_it_with_1012_and_a_resume_gets_the_rest(
    backend: Backend,
) {
    const MESSAGES: u64 = 300;
    let (settings, dir) = fresh(backend).await;
    let settings = Settings {
        write_delay_ms: 100,
        write_delay_above_per_sec: 0,
        outbound_queue_bytes: 8 * 1024,
        ..settings
    };
    let app = spawn_with(settings.clone(), dir).await;
    let key = app.session("ada", None).await;
    let mut writer = Client::v1(&app, &key).await;
    // About 60 KiB of backfill: many times the queue. Sent without waiting for each ack
    // (with pacing on, each would wait for a held write).
    for i in 0..MESSAGES {
        writer
            .send(json!({"type": "send", "room": "b", "text": format!("{i:0>180}"), "client_msg_id": format!("m{i}")}))
            .await;
    }
    for _ in 0..MESSAGES {
        writer.recv_until("ack").await;
    }
    let mut reader = Client::v1(&app, &key).await;
    reader.join("b", Some(0)).await;
    let first = reader.recv_until("message").await["seq"].as_u64().unwrap();
    let stopping = tokio::spawn(app.stop_keeping_data());
    let (mut seqs, code) = messages_then_close(&mut reader, None).await;
    seqs.insert(0, first);
    let last = *seqs.last().unwrap();
    assert_eq!(code, Some(close::SERVICE_RESTART));
    assert_eq!(seqs, (1..=last).collect::<Vec<_>>(), "gap-free");
    assert!(last < MESSAGES, "the stop ended the backfill");

    let app = spawn_with(settings, stopping.await.unwrap()).await;
    let mut resumed = Client::v1(&app, &key).await;
    assert_eq!(resumed.join("b", Some(last)).await, MESSAGES);
    for seq in last + 1..=MESSAGES {
        assert_eq!(resumed.recv_until("message").await["seq"], seq);
    }
    app.stop().await;
}

/// A client far behind on reading when the stop comes, that also sent a frame the server
/// will not read: the server keeps the socket until the client's close reply, else the
/// kernel would reset it and throw away what it had not sent yet, the 1012 with it.
async fn a_client_behind_on_reading_at_a_stop_still_gets_its_1012(backend: Backend) {
    const SENT: u64 = 3000;
    let (mut settings, dir) = common::fresh(backend).await;
    settings.outbound_queue_bytes = 64 * 1024;
    let app = spawn_with(settings, dir).await;
    let key = app.session("laggard", None).await;
    store_big_messages(&app, &key, "far", SENT).await;
    let mut reader = Client::v1(&app, &key).await;
    assert_eq!(reader.join("far", Some(0)).await, SENT);
    // The backfill fills the sockets and the queue and waits; the stop ends it.
    let stopping = tokio::spawn(app.stop());
    // Long enough for the server to be past reading (its store's page read included, on
    // a busy machine): a frame it did read would leave nothing unread, and the test
    // would pass without the linger.
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    // Input the stopping server does not read.
    reader.send(json!({"type": "ping"})).await;
    // Read in bursts, as a client on a busy device does: the server's last write (the
    // close) goes out while the client pauses, with the sockets still full.
    let (seqs, code) = messages_then_close(&mut reader, Some(25)).await;
    assert_eq!(
        code,
        Some(close::SERVICE_RESTART),
        "after {} messages",
        seqs.len()
    );
    assert_eq!(
        seqs,
        (1..=seqs.len() as u64).collect::<Vec<_>>(),
        "gap-free"
    );
    assert!((seqs.len() as u64) < SENT, "the stop ended the backfill");
    stopping.await.unwrap();
}

/// Store `n` messages of 8 KB in `room`, 50 at a time: 3,000 are 24 MB, more than a
/// reader's two socket buffers and its outbound queue (64 KiB) hold.
async fn store_big_messages(app: &TestApp, key: &str, room: &str, n: u64) {
    let mut writer = Client::v1(app, key).await;
    let big = "x".repeat(8000);
    for chunk in 0..n.div_ceil(50) {
        let ids: Vec<u64> = (chunk * 50..n.min(chunk * 50 + 50)).collect();
        for id in &ids {
            writer
                .send(json!({"type": "send", "room": room, "text": big, "client_msg_id": id.to_string()}))
                .await;
        }
        for _ in &ids {
            writer.recv_until("ack").await;
        }
    }
}

/// The seqs of the `message` frames until the close, and the close's code (`None` when
/// the connection ended without one). With `pause_every`, a pause of 100 ms after that
/// many messages.
async fn messages_then_close(
    client: &mut Client,
    pause_every: Option<usize>,
) -> (Vec<u64>, Option<u16>) {
    let mut seqs = Vec::new();
    loop {
        if pause_every.is_some_and(|n| !seqs.is_empty() && seqs.len() % n == 0) {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        let frame = tokio::time::timeout(common::WAIT, client.ws.next())
            .await
            .expect("a frame in time");
        match frame {
            Some(Ok(Message::Text(t))) => {
                let v: Value = serde_json::from_str(&t).unwrap();
                if v["type"] == "message" {
                    seqs.push(v["seq"].as_u64().unwrap());
                }
            }
            Some(Ok(Message::Close(c))) => return (seqs, c.map(|c| u16::from(c.code))),
            Some(Ok(_)) => {}
            Some(Err(_)) | None => return (seqs, None),
        }
    }
}

async fn a_client_that_does_not_read_is_closed_with_4008_and_resumes_without_loss(
    backend: Backend,
) {
    let (mut settings, dir) = common::fresh(backend).await;
    settings.outbound_queue_bytes = 64 * 1024;
    let app = spawn_with(settings, dir).await;
    let slow_key = app.session("slow", None).await;
    let fast_key = app.session("fast", None).await;
    let mut slow = Client::v1(&app, &slow_key).await;
    slow.join("flood", None).await;
    slow.recv_until("presence").await;
    let mut fast = Client::v1(&app, &fast_key).await;
    let big = "x".repeat(8000);
    // The slow client never reads while this goes on; its socket and queue fill up.
    for chunk in 0..30 {
        for n in 0..50 {
            let id = (chunk * 50 + n).to_string();
            fast.send(json!({"type": "send", "room": "flood", "text": big, "client_msg_id": id}))
                .await;
        }
        for _ in 0..50 {
            fast.recv_until("ack").await;
        }
    }
    // The slow client finds the close (after what it had been sent) ...
    let mut last_seq = 0;
    let code = loop {
        match tokio::time::timeout(common::WAIT, futures_util::StreamExt::next(&mut slow.ws))
            .await
            .expect("frame or close in time")
        {
            Some(Ok(tokio_tungstenite::tungstenite::Message::Text(t))) => {
                let v: Value = serde_json::from_str(&t).unwrap();
                if v["type"] == "message" {
                    let seq = v["seq"].as_u64().unwrap();
                    assert_eq!(seq, last_seq + 1);
                    last_seq = seq;
                }
            }
            Some(Ok(tokio_tungstenite::tungstenite::Message::Close(f))) => {
                break f.map(|f| u16::from(f.code))
            }
            Some(Ok(_)) => {}
            Some(Err(_)) | None => break None,
        }
    };
    assert!(
        code == Some(close::SLOW_CONSUMER) || code.is_none(),
        "closed as slow consumer, got {code:?}"
    );
    assert!(last_seq < 1500, "the slow client was cut off early");
    // ... and resumes from its last seq with nothing lost.
    let mut slow = Client::v1(&app, &slow_key).await;
    slow.join("flood", Some(last_seq)).await;
    let mut seen: HashMap<u64, ()> = HashMap::new();
    while last_seq < 1500 {
        let m = slow.recv_until("message").await;
        let seq = m["seq"].as_u64().unwrap();
        assert_eq!(seq, last_seq + 1);
        assert!(seen.insert(seq, ()).is_none());
        last_seq = seq;
    }
    app.stop().await;
}

async fn a_since_older_than_what_is_kept_gets_a_reset_then_the_last_messages(backend: Backend) {
    let (mut settings, dir) = common::fresh(backend).await;
    settings.history_limit = 3;
    let app = spawn_with(settings, dir).await;
    let key = app.session("old-timer", None).await;
    let mut c = Client::v1(&app, &key).await;
    for n in 1..=10 {
        c.say("kept", &n.to_string(), &n.to_string()).await;
    }
    assert_eq!(app.shared.store.prune(4).await.unwrap(), 6);
    // since 6: seq 7 onwards is all kept: an ordinary resume.
    let mut fresh = Client::v1(&app, &key).await;
    fresh.join("kept", Some(6)).await;
    assert_eq!(fresh.recv_until("message").await["seq"], 7);
    // since 2: seqs 3..=6 are gone: reset, then the last history_limit messages.
    let mut stale = Client::v1(&app, &key).await;
    stale.join("kept", Some(2)).await;
    let reset = stale.recv().await;
    assert_eq!(
        reset,
        json!({"type": "reset", "room": "kept", "since": 2, "first_seq": 7})
    );
    let mut seqs = Vec::new();
    for _ in 0..3 {
        seqs.push(stale.recv_until("message").await["seq"].as_u64().unwrap());
    }
    assert_eq!(seqs, vec![8, 9, 10]);
    app.stop().await;
}

/// A resume whose backfill waits for the client to read (its socket and queue full) while
/// retention deletes the rest of its range: the client is told with a `reset`, then gets
/// the room's last messages; never a silent gap.
async fn retention_during_a_paced_resume_gets_a_reset_not_a_silent_gap(backend: Backend) {
    const SENT: u64 = 3000;
    let (mut settings, dir) = common::fresh(backend).await;
    settings.outbound_queue_bytes = 64 * 1024;
    settings.history_limit = 3;
    let app = spawn_with(settings, dir).await;
    let key = app.session("archivist", None).await;
    store_big_messages(&app, &key, "pruned", SENT).await;
    let mut reader = Client::v1(&app, &key).await;
    assert_eq!(reader.join("pruned", Some(0)).await, SENT);
    // The backfill fills the sockets and the queue, then waits for the reader, who reads
    // nothing until retention has kept only the last 3.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert_eq!(app.shared.store.prune(3).await.unwrap(), SENT - 3);
    let (mut last, mut resets) = (0, Vec::new());
    while last < SENT {
        let v = reader.recv().await;
        match v["type"].as_str() {
            Some("message") => {
                let seq = v["seq"].as_u64().unwrap();
                match resets.last() {
                    // Right after the reset: the last messages, past what was sent.
                    Some(&(at, first_seq)) if at == last => {
                        assert!(seq > last && seq >= first_seq, "{seq} after {last}: {v}")
                    }
                    _ => assert_eq!(seq, last + 1, "a gap without a reset"),
                }
                last = seq;
            }
            Some("reset") => {
                assert_eq!(v["since"], last, "since is the last seq sent: {v}");
                resets.push((last, v["first_seq"].as_u64().unwrap()));
            }
            _ => {}
        }
    }
    // The pause came before the end of the range (else this test tests nothing).
    assert_eq!(resets.len(), 1, "one reset: {resets:?}");
    assert_eq!(resets[0].1, SENT - 2, "the oldest kept seq");
    assert!(
        resets[0].0 < SENT - 3,
        "the reset came mid-backfill: {resets:?}"
    );
    app.stop().await;
}

async fn the_key_can_travel_in_the_subprotocol_header_or_the_query(backend: Backend) {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let app = spawn_app(backend).await;
    let key = app.session("header", None).await;
    let mut request = app.v1_url().into_client_request().unwrap();
    request.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        format!("wschat.v1, wschat.key.{key}").parse().unwrap(),
    );
    let (ws, response) = tokio_tungstenite::connect_async(request).await.unwrap();
    assert_eq!(
        response.headers()["sec-websocket-protocol"]
            .to_str()
            .unwrap(),
        "wschat.v1",
        "the key is never echoed"
    );
    let mut c = Client { ws };
    let hello = c.recv().await;
    assert_eq!(
        (hello["type"].as_str(), hello["user"].as_str()),
        (Some("hello"), Some("header"))
    );
    let mut q = Client::connect(&format!("{}?session_key={key}", app.v1_url())).await;
    assert_eq!(q.recv().await["type"], "hello");
    app.stop().await;
}

async fn a_deleted_or_expired_session_closes_its_connections_with_1008(backend: Backend) {
    let (mut settings, dir) = common::fresh(backend).await;
    settings.session_check_secs = 1;
    let app = spawn_with(settings, dir).await;
    let revoked = app.session("revoked", None).await;
    let expiring = app.session("expiring", None).await;
    let kept = app.session("kept", None).await;
    let hash = |key: &str| wschat_server::store::hash_key(key).as_str().to_owned();

    let mut revoked_v1 = Client::v1(&app, &revoked).await;
    let mut revoked_legacy = Client::legacy(&app, &revoked).await;
    let mut expiring_v1 = Client::v1(&app, &expiring).await;
    let mut kept_v1 = Client::v1(&app, &kept).await;
    let mut kept_legacy = Client::legacy(&app, &kept).await;
    kept_v1.join("0", None).await;

    // The application deletes one session row and gives another an expiry 1.5 s away.
    common::app_sql(
        &app,
        &format!("DELETE FROM sessions WHERE key = '{}'", hash(&revoked)),
    )
    .await;
    let expiry = match backend {
        Backend::Sqlite => format!("{}", wschat_server::store::now_ms() + 1500),
        Backend::Postgres => "now() + interval '1.5 seconds'".to_owned(),
    };
    common::app_sql(
        &app,
        &format!(
            "UPDATE sessions SET expires_at = {expiry} WHERE key = '{}'",
            hash(&expiring)
        ),
    )
    .await;

    assert_eq!(revoked_v1.close_code().await, Some(close::POLICY_VIOLATION));
    assert_eq!(
        revoked_legacy.close_code().await,
        Some(close::POLICY_VIOLATION)
    );
    assert_eq!(
        expiring_v1.close_code().await,
        Some(close::POLICY_VIOLATION)
    );
    // A revoked key cannot come back.
    let url = app.legacy_url(&revoked);
    assert!(tokio_tungstenite::connect_async(url).await.is_err());

    // The other session's connections go on, through further checks.
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    let ack = kept_v1.say("0", "still here", "k-1").await;
    assert_eq!(ack["seq"], 1);
    assert_eq!(kept_legacy.recv().await["message"], "still here");
    assert_eq!(app.shared.sessions.connection_count(), 2);
    app.stop().await;
}

/// RFC 6455's closing handshake: a close frame from the client gets one back (its own code,
/// 1000 when it gave none) before the server ends the connection. Without it browsers see
/// 1006, and tungstenite a reset without a closing handshake (`close_code` gives `None`).
async fn a_close_the_client_starts_is_answered_with_its_code(backend: Backend) {
    use tokio_tungstenite::tungstenite::protocol::{frame::coding::CloseCode, CloseFrame};
    let app = spawn_app(backend).await;
    let key = app.session("ann", None).await;
    let legacy_key = app.session("bob", Some(3)).await;
    let frame = |code: u16| {
        Some(CloseFrame {
            code: CloseCode::from(code),
            reason: "bye".into(),
        })
    };
    let mut v1 = Client::v1(&app, &key).await;
    v1.join("general", None).await;
    v1.ws.close(frame(1000)).await.unwrap();
    assert_eq!(v1.close_code().await, Some(close::NORMAL), "v1, 1000");
    let mut v1 = Client::v1(&app, &key).await;
    v1.ws.close(frame(4000)).await.unwrap();
    assert_eq!(v1.close_code().await, Some(4000), "v1, its own code");
    let mut v1 = Client::v1(&app, &key).await;
    v1.ws.close(None).await.unwrap();
    assert_eq!(v1.close_code().await, Some(close::NORMAL), "v1, no code");
    let mut unauthenticated = Client::connect(&app.v1_url()).await;
    unauthenticated.ws.close(frame(1001)).await.unwrap();
    assert_eq!(
        unauthenticated.close_code().await,
        Some(close::GOING_AWAY),
        "v1 before auth"
    );
    let mut legacy = Client::legacy(&app, &legacy_key).await;
    legacy.ws.close(None).await.unwrap();
    assert_eq!(legacy.close_code().await, Some(close::NORMAL), "legacy");
    app.stop().await;
}

/// A store that cannot be read (here its message table renamed away): a room the client
/// was in and joins again is answered `left` then `unavailable` naming it (the client is
/// not left waiting for a room it is no longer in), and the store's failures do not count
/// towards the 4009 close, however many the client retries through.
async fn a_store_that_cannot_be_read_gets_left_and_errors_never_4009(backend: Backend) {
    let app = spawn_app(backend).await;
    let key = app.session("ada", None).await;
    let mut c = Client::v1(&app, &key).await;
    c.join("r", None).await;
    // `presence` ends the join's backfill: the store may fail only after it.
    c.recv_until("presence").await;
    common::app_sql(
        &app,
        "ALTER TABLE wschat_messages RENAME TO wschat_messages_away",
    )
    .await;

    c.send(json!({"type": "join", "rooms": [{"room": "r"}], "ref": "again"}))
        .await;
    left_then_unavailable(&mut c, "r", "again").await;

    // Twelve more failures, past the ten in a row that close a client's bad frames.
    for i in 0..6 {
        c.send(json!({"type": "join", "rooms": [{"room": "r"}], "ref": format!("j{i}")}))
            .await;
        assert_eq!(c.recv_until("error").await["code"], "unavailable");
        c.send(json!({"type": "history", "room": "r", "ref": format!("h{i}")}))
            .await;
        assert_eq!(c.recv_until("error").await["code"], "unavailable");
    }
    c.send(json!({"type": "ping", "ref": "still"})).await;
    assert_eq!(c.recv_until("pong").await["ref"], "still");

    common::app_sql(
        &app,
        "ALTER TABLE wschat_messages_away RENAME TO wschat_messages",
    )
    .await;
    assert_eq!(c.join("r", None).await, 0);
    assert_eq!(c.say("r", "back", "b-1").await["seq"], 1);
    app.stop().await;
}

/// A room whose head can be read but whose backfill cannot (SQLite only: its columns take
/// a value of any type, here a message text stored as a blob): the client was told
/// `joined`, so it is told `left` too, before the error naming the room, and the
/// connection goes on.
#[tokio::test]
async fn a_room_whose_backfill_cannot_be_read_is_joined_then_left() {
    let app = spawn_app(Backend::Sqlite).await;
    let key = app.session("ada", None).await;
    common::app_sql(
        &app,
        "INSERT INTO wschat_rooms (name, last_seq) VALUES ('bad', 1)",
    )
    .await;
    common::app_sql(
        &app,
        r#"INSERT INTO wschat_messages (room_id, seq, "user", text, created_at)
           SELECT id, 1, 'x', X'00ff', 0 FROM wschat_rooms WHERE name = 'bad'"#,
    )
    .await;
    let mut c = Client::v1(&app, &key).await;
    c.send(json!({"type": "join", "rooms": [{"room": "bad"}], "ref": "b"}))
        .await;
    let joined = c.recv_until("joined").await;
    assert_eq!(
        (&joined["room"], &joined["ref"]),
        (&json!("bad"), &json!("b"))
    );
    left_then_unavailable(&mut c, "bad", "b").await;
    assert_eq!(c.join("fine", None).await, 0);
    app.stop().await;
}

/// The `left` a refused room gets (`reference`: the join's), then the `unavailable` error
/// that names it.
async fn left_then_unavailable(c: &mut Client, room: &str, reference: &str) {
    let left = c.recv_until("left").await;
    assert_eq!(
        left,
        json!({"type": "left", "room": room, "ref": reference})
    );
    let err = c.recv().await;
    assert_eq!(
        (&err["code"], &err["ref"]),
        (&json!("unavailable"), &json!(reference)),
        "{err}"
    );
    let named = format!("room {room} is not joined");
    assert!(err["message"].as_str().unwrap().contains(&named), "{err}");
}
