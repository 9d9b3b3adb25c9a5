//! The admin API (docs/admin-api.md), every route, on both stores, against a real server.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
mod common;

use common::http::{get, post, request};
use common::{fresh, spawn_app, spawn_with, Backend, Client, TestApp};
use serde_json::json;
use wschat_server::config::Secret;

const TOKEN: &str = "test-admin-token-0123456789";

suite!(
    the_admin_api_is_off_without_a_token,
    a_missing_or_wrong_token_gets_401,
    sessions_created_work_once_and_revoked_ones_are_refused,
    a_posted_message_gets_a_seq_and_reaches_every_member,
    a_post_the_store_cannot_commit_gets_503_with_the_reason,
    rooms_are_listed_from_the_store_and_the_hub_with_presence,
    nodes_are_listed,
);

async fn admin_app(backend: Backend) -> TestApp {
    let (mut settings, dir) = fresh(backend).await;
    settings.admin_token = Some(Secret::new(TOKEN));
    spawn_with(settings, dir).await
}

async fn the_admin_api_is_off_without_a_token(backend: Backend) {
    let app = spawn_app(backend).await;
    for token in [None, Some(TOKEN), Some("")] {
        assert_eq!(get(app.addr, "/admin/v1/rooms", token).await.status, 404);
        assert_eq!(get(app.addr, "/admin/v1/nodes", token).await.status, 404);
        let created = post(app.addr, "/admin/v1/sessions", token, &json!({"user": "x"})).await;
        assert_eq!(created.status, 404);
        assert_eq!(get(app.addr, "/admin/v1/nothing", token).await.status, 404);
    }
    assert_eq!(app.shared.store.count_sessions().await.unwrap(), 0);
    app.stop().await;
}

async fn a_missing_or_wrong_token_gets_401(backend: Backend) {
    let app = admin_app(backend).await;
    let wrong = format!("{TOKEN}x");
    let short = &TOKEN[..TOKEN.len() - 1];
    for token in [None, Some(""), Some(wrong.as_str()), Some(short)] {
        let r = get(app.addr, "/admin/v1/rooms", token).await;
        assert_eq!(r.status, 401, "{token:?}");
        assert!(
            r.headers.contains("www-authenticate: bearer"),
            "{}",
            r.headers
        );
        assert_eq!(r.json()["error"], "unauthorized");
        let r = post(app.addr, "/admin/v1/sessions", token, &json!({"user": "x"})).await;
        assert_eq!(r.status, 401);
        // Unknown admin routes do not reveal themselves to the unauthenticated either.
        assert_eq!(get(app.addr, "/admin/v1/nothing", token).await.status, 401);
    }
    assert_eq!(app.shared.store.count_sessions().await.unwrap(), 0);
    assert_eq!(
        get(app.addr, "/admin/v1/rooms", Some(TOKEN)).await.status,
        200
    );
    assert_eq!(
        get(app.addr, "/admin/v1/nothing", Some(TOKEN)).await.status,
        404
    );
    app.stop().await;
}

async fn connects(app: &TestApp, key: &str) -> bool {
    tokio_tungstenite::connect_async(app.legacy_url(key))
        .await
        .is_ok()
}

async fn sessions_created_work_once_and_revoked_ones_are_refused(backend: Backend) {
    let app = admin_app(backend).await;
    let t = Some(TOKEN);
    // A random key, shown once; a room-restricted session uses its room.
    let r = post(
        app.addr,
        "/admin/v1/sessions",
        t,
        &json!({"user": "Michael Redman", "room": 3}),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let created = r.json();
    assert_eq!(created["user"], "Michael Redman");
    assert_eq!(created["room"], 3);
    let key = created["key"].as_str().unwrap().to_owned();
    assert!(key.len() >= 43, "256 bits: {key}");
    let mut legacy = Client::legacy(&app, &key).await;
    legacy.send(json!({"message": "hi"})).await;
    assert_eq!(legacy.recv().await["message"], "hi");
    let head = app
        .shared
        .store
        .room_head(&wschat_protocol::RoomName::legacy(3))
        .await
        .unwrap();
    assert_eq!(head.last_seq, 1, "the session is bound to room 3");

    // A chosen key (nodejschat's style); the same key twice is a conflict.
    let r = post(
        app.addr,
        "/admin/v1/sessions",
        t,
        &json!({"user": "ada", "key": "chosen-key-1"}),
    )
    .await;
    assert_eq!(
        (r.status, r.json()["key"].as_str()),
        (201, Some("chosen-key-1"))
    );
    let r = post(
        app.addr,
        "/admin/v1/sessions",
        t,
        &json!({"user": "bob", "key": "chosen-key-1"}),
    )
    .await;
    assert_eq!(
        (r.status, r.json()["error"].as_str()),
        (409, Some("conflict"))
    );

    // Bad requests say why.
    for bad in [
        json!({}),
        json!({"user": ""}),
        json!({"user": "x", "room": -1}),
        json!({"user": "x", "room": 1u64 << 40}),
        json!({"user": "x", "key": ""}),
        json!({"user": "x", "colour": "red"}),
        json!({"user": "a\u{0}b"}),
    ] {
        let r = post(app.addr, "/admin/v1/sessions", t, &bad).await;
        assert_eq!(r.status, 400, "{bad}: {}", r.body);
        assert_eq!(r.json()["error"], "bad_request");
    }
    let r = request(app.addr, "POST", "/admin/v1/sessions", t, None).await;
    assert_eq!(r.status, 400, "no body: {}", r.body);

    // Revoke by key: that key no longer connects; the other one still does.
    assert!(connects(&app, "chosen-key-1").await);
    let r = post(
        app.addr,
        "/admin/v1/sessions/revoke",
        t,
        &json!({"key": key}),
    )
    .await;
    assert_eq!((r.status, r.json()["revoked"].as_u64()), (200, Some(1)));
    assert!(!connects(&app, &key).await, "a revoked key is refused");
    assert!(connects(&app, "chosen-key-1").await);
    let r = post(
        app.addr,
        "/admin/v1/sessions/revoke",
        t,
        &json!({"key": key}),
    )
    .await;
    assert_eq!(r.json()["revoked"], 0);

    // Revoke by user: every session of that user.
    let mut keys = Vec::new();
    for _ in 0..2 {
        let r = post(app.addr, "/admin/v1/sessions", t, &json!({"user": "carol"})).await;
        keys.push(r.json()["key"].as_str().unwrap().to_owned());
    }
    let r = post(
        app.addr,
        "/admin/v1/sessions/revoke",
        t,
        &json!({"user": "carol"}),
    )
    .await;
    assert_eq!(r.json()["revoked"], 2);
    for key in &keys {
        assert!(!connects(&app, key).await);
    }
    assert!(connects(&app, "chosen-key-1").await, "ada is untouched");
    for bad in [
        json!({}),
        json!({"key": "k", "user": "u"}),
        json!({"user": ""}),
    ] {
        let r = post(app.addr, "/admin/v1/sessions/revoke", t, &bad).await;
        assert_eq!(r.status, 400, "{bad}");
    }
    drop(legacy);
    app.stop().await;
}

async fn a_posted_message_gets_a_seq_and_reaches_every_member(backend: Backend) {
    let app = admin_app(backend).await;
    let t = Some(TOKEN);
    let mut v1 = Client::v1(&app, &app.session("ada", None).await).await;
    assert_eq!(v1.join("lobby", None).await, 0);
    let ack = v1.say("lobby", "first", "c-1").await;
    assert_eq!(ack["seq"], 1);
    let mut legacy = Client::legacy(&app, &app.session("Michael Redman", Some(3)).await).await;

    let r = post(
        app.addr,
        "/admin/v1/rooms/lobby/messages",
        t,
        &json!({"text": "maintenance at noon", "user": "ops"}),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let posted = r.json();
    assert_eq!(
        (
            &posted["room"],
            &posted["seq"],
            &posted["user"],
            &posted["duplicate"]
        ),
        (&json!("lobby"), &json!(2), &json!("ops"), &json!(false))
    );
    assert!(posted["id"].is_i64());
    let mut seen = v1.recv_until("message").await;
    if seen["seq"] == 1 {
        // The sender's own first message comes back to it, too.
        seen = v1.recv_until("message").await;
    }
    assert_eq!(
        (&seen["seq"], &seen["user"], &seen["text"]),
        (&json!(2), &json!("ops"), &json!("maintenance at noon"))
    );

    // Legacy room 3 is v1 room "3"; the sender defaults to "system".
    let r = post(
        app.addr,
        "/admin/v1/rooms/3/messages",
        t,
        &json!({"text": "hello room three", "client_msg_id": "notice-1"}),
    )
    .await;
    assert_eq!((r.status, &r.json()["seq"]), (201, &json!(1)));
    let got = legacy.recv().await;
    assert_eq!(
        (&got["user"], &got["message"]),
        (&json!("system"), &json!("hello room three"))
    );
    // A retry with the same client_msg_id is the same message, stored once.
    let r = post(
        app.addr,
        "/admin/v1/rooms/3/messages",
        t,
        &json!({"text": "hello room three", "client_msg_id": "notice-1"}),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        (&r.json()["seq"], &r.json()["duplicate"]),
        (&json!(1), &json!(true))
    );
    assert_eq!(
        app.shared
            .store
            .room_head(&wschat_protocol::RoomName::legacy(3))
            .await
            .unwrap()
            .last_seq,
        1
    );
    // Room names are URL-encoded in the path.
    let r = post(
        app.addr,
        "/admin/v1/rooms/General%20chat/messages",
        t,
        &json!({"text": "spaces are fine"}),
    )
    .await;
    assert_eq!((r.status, &r.json()["room"]), (201, &json!("General chat")));

    let too_long = "x".repeat(app.settings.max_message_bytes + 1);
    for (path, body) in [
        ("/admin/v1/rooms/lobby/messages", json!({"text": ""})),
        ("/admin/v1/rooms/lobby/messages", json!({"text": "   "})),
        ("/admin/v1/rooms/lobby/messages", json!({"text": too_long})),
        (
            "/admin/v1/rooms/lobby/messages",
            json!({"text": "a", "user": ""}),
        ),
        (
            "/admin/v1/rooms/lobby/messages",
            json!({"message": "legacy shape"}),
        ),
        ("/admin/v1/rooms/%20lobby/messages", json!({"text": "a"})),
        (
            "/admin/v1/rooms/lobby/messages",
            json!({"text": "a", "client_msg_id": ""}),
        ),
        (
            "/admin/v1/rooms/lobby/messages",
            json!({"text": "a", "client_msg_id": "a\u{0}b"}),
        ),
    ] {
        let r = post(app.addr, path, t, &body).await;
        assert_eq!(r.status, 400, "{path} {body}: {}", r.body);
    }
    app.stop().await;
}

/// A post the store cannot commit gets 503 `unavailable`, "not stored", with the store's
/// reason (as a WebSocket sender is told); once the store is back, posts are stored.
async fn a_post_the_store_cannot_commit_gets_503_with_the_reason(backend: Backend) {
    let app = admin_app(backend).await;
    let t = Some(TOKEN);
    let path = "/admin/v1/rooms/lobby/messages";
    let body = json!({"text": "maintenance at noon", "user": "ops", "client_msg_id": "p-1"});
    common::app_sql(
        &app,
        "ALTER TABLE wschat_messages RENAME TO wschat_messages_away",
    )
    .await;
    let r = post(app.addr, path, t, &body).await;
    assert_eq!(r.status, 503, "{}", r.body);
    let refused = r.json();
    assert_eq!(refused["error"], "unavailable", "{refused}");
    let message = refused["message"].as_str().unwrap_or_default();
    assert!(message.starts_with("not stored: "), "{refused}");
    assert!(
        message.contains("wschat_messages"),
        "the store's reason: {refused}"
    );
    common::app_sql(
        &app,
        "ALTER TABLE wschat_messages_away RENAME TO wschat_messages",
    )
    .await;
    let r = post(app.addr, path, t, &body).await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.json()["seq"], 1);
    app.stop().await;
}

async fn rooms_are_listed_from_the_store_and_the_hub_with_presence(backend: Backend) {
    let app = admin_app(backend).await;
    let t = Some(TOKEN);
    // Rooms "a" and "b" have messages, no one connected; "c" has a member, no message.
    for (room, n) in [("a", 2), ("b", 1)] {
        for i in 0..n {
            let path = format!("/admin/v1/rooms/{room}/messages");
            let r = post(app.addr, &path, t, &json!({"text": format!("m{i}")})).await;
            assert_eq!(r.status, 201);
        }
    }
    let mut carol = Client::v1(&app, &app.session("carol", None).await).await;
    carol.join("a", None).await;
    carol.join("c", None).await;
    let mut carol2 = Client::v1(&app, &app.session("carol", None).await).await;
    carol2.join("c", None).await;

    let r = get(app.addr, "/admin/v1/rooms", t).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        r.json(),
        json!({
            "rooms": [
                {"room": "a", "last_seq": 2, "connections": 1, "users": ["carol"]},
                {"room": "b", "last_seq": 1, "connections": 0, "users": []},
                {"room": "c", "last_seq": 0, "connections": 2, "users": ["carol"]},
            ],
            "next": null
        })
    );
    // Pages, by name.
    let mut names = Vec::new();
    let mut path = "/admin/v1/rooms?limit=1".to_owned();
    for _ in 0..5 {
        let page = get(app.addr, &path, t).await.json();
        let rooms = page["rooms"].as_array().unwrap();
        assert!(rooms.len() <= 1);
        names.extend(rooms.iter().map(|r| r["room"].as_str().unwrap().to_owned()));
        match page["next"].as_str() {
            Some(next) => path = format!("/admin/v1/rooms?limit=1&after={next}"),
            None => break,
        }
    }
    assert_eq!(names, ["a", "b", "c"]);
    assert_eq!(
        get(app.addr, "/admin/v1/rooms?limit=x", t).await.status,
        400
    );

    // When carol leaves, "c" is no longer served here, and not in the store: gone.
    drop(carol);
    drop(carol2);
    let deadline = tokio::time::Instant::now() + common::WAIT;
    loop {
        let rooms = get(app.addr, "/admin/v1/rooms", t).await.json()["rooms"].clone();
        if rooms.as_array().unwrap().len() == 2 {
            assert_eq!(rooms[0]["users"], json!([]));
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{rooms}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    app.stop().await;
}

async fn nodes_are_listed(backend: Backend) {
    let app = admin_app(backend).await;
    let r = get(app.addr, "/admin/v1/nodes", Some(TOKEN)).await;
    assert_eq!(r.status, 200);
    let nodes = r.json()["nodes"].clone();
    let expected_broker = match backend {
        Backend::Sqlite => "local",
        Backend::Postgres => "postgres",
    };
    assert_eq!(
        nodes,
        json!([{"id": app.shared.node.id, "broker": expected_broker, "this": true}])
    );
    app.stop().await;
}
