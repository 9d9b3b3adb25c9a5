//! Several nodes on one PostgreSQL database, fanning out over LISTEN/NOTIFY or NATS:
//! clients on different nodes see each other's messages once, in seq order, with
//! presence and typing across nodes; set-ups that would lose messages are refused.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::{spawn_with, Backend, Client};
use serde_json::json;
use wschat_server::{Application, StartError};

/// NATS for the multi-node suite (CI starts it; without it these tests fail, loudly).
fn nats_url() -> String {
    std::env::var("WSCHAT_TEST_NATS").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

async fn cluster(broker: &str, nodes: usize) -> Vec<common::TestApp> {
    let (mut settings, dir) = common::fresh(Backend::Postgres).await;
    settings.broker = broker.to_owned();
    // Each test gets its own subject, so parallel tests never hear each other.
    settings.nats_subject = format!("wschat.test.{}", common::unique());
    let mut apps = Vec::new();
    for _ in 0..nodes {
        apps.push(spawn_with(settings.clone(), dir.clone()).await);
    }
    apps
}

async fn messages_cross_nodes_once_in_order(broker: &str) {
    let apps = cluster(broker, 3).await;
    let key = apps[0].session("ada", None).await;
    let legacy_key = apps[0].session("old", Some(7)).await;
    let mut clients = Vec::new();
    for app in &apps {
        let mut c = Client::v1(app, &key).await;
        c.join("7", None).await;
        clients.push(c);
    }
    let mut legacy = Client::legacy(&apps[2], &legacy_key).await;
    // 3 nodes × 30 messages, sent concurrently.
    let mut senders = Vec::new();
    for (n, app) in apps.iter().enumerate() {
        let mut c = Client::v1(app, &key).await;
        senders.push(tokio::spawn(async move {
            for i in 0..30 {
                c.say("7", &format!("n{n}-{i}"), &format!("n{n}-{i}")).await;
            }
        }));
    }
    for s in senders {
        s.await.unwrap();
    }
    for c in &mut clients {
        let mut seqs = Vec::new();
        let mut texts = HashSet::new();
        while seqs.len() < 90 {
            let m = c.recv_until("message").await;
            seqs.push(m["seq"].as_u64().unwrap());
            assert!(
                texts.insert(m["text"].as_str().unwrap().to_owned()),
                "shown twice"
            );
        }
        assert_eq!(
            seqs,
            (1..=90).collect::<Vec<_>>(),
            "every message once, in seq order"
        );
    }
    let mut legacy_seen = HashSet::new();
    while legacy_seen.len() < 90 {
        let m = legacy.recv().await;
        assert!(legacy_seen.insert(m["message"].as_str().unwrap().to_owned()));
    }
    for app in apps {
        let db = app.database.clone();
        app.stop_keeping_data().await;
        common::drop_database(&db).await;
    }
}

async fn presence_and_typing_cross_nodes(broker: &str) {
    let apps = cluster(broker, 2).await;
    let a_key = apps[0].session("alice", None).await;
    let b_key = apps[0].session("bob", None).await;
    let mut alice = Client::v1(&apps[0], &a_key).await;
    alice.join("p", None).await;
    assert_eq!(
        alice.recv_until("presence").await["users"],
        json!(["alice"])
    );
    let mut bob = Client::v1(&apps[1], &b_key).await;
    bob.join("p", None).await;
    // Bob's node learns of alice by its presence query.
    let diff = alice.recv_until("presence_diff").await;
    assert_eq!(diff["joined"], json!(["bob"]));
    let mut bob_sees = bob.recv_until("presence").await["users"].clone();
    if bob_sees != json!(["alice", "bob"]) {
        bob_sees = bob.recv_until("presence_diff").await["joined"].clone();
        assert_eq!(bob_sees, json!(["alice"]));
    }
    bob.send(json!({"type": "typing", "room": "p"})).await;
    assert_eq!(alice.recv_until("typing").await["user"], "bob");
    drop(bob);
    let diff = alice.recv_until("presence_diff").await;
    assert_eq!(diff["left"], json!(["bob"]));
    for app in apps {
        let db = app.database.clone();
        app.stop_keeping_data().await;
        common::drop_database(&db).await;
    }
}

/// A node that stops gracefully tells the other nodes that its users left, as it closes
/// their connections; the other nodes' expiry of its presence (`PRESENCE_TTL`, 12 s after
/// its last refresh, refreshed every 4 s) is only for a node that dies without a word.
async fn a_stopping_node_takes_its_users_off_the_others(broker: &str) {
    /// Well under the earliest the expiry could forget alice: 12 s after the last refresh,
    /// which was at most 4 s before the stop.
    const TOLD_WITHIN: Duration = Duration::from_secs(5);
    let mut apps = cluster(broker, 2).await;
    let a_key = apps[0].session("alice", None).await;
    let b_key = apps[0].session("bob", None).await;
    let mut alice = Client::v1(&apps[0], &a_key).await;
    alice.join("p", None).await;
    let mut bob = Client::v1(&apps[1], &b_key).await;
    bob.join("p", None).await;
    let mut bob_sees = bob.recv_until("presence").await["users"].clone();
    if bob_sees != json!(["alice", "bob"]) {
        bob_sees = bob.recv_until("presence_diff").await["joined"].clone();
        assert_eq!(bob_sees, json!(["alice"]));
    }
    let first = apps.remove(0);
    let db = first.database.clone();
    first.stop_keeping_data().await;
    assert_eq!(
        alice.close_code().await,
        Some(1012),
        "alice's node went away"
    );
    let diff = tokio::time::timeout(TOLD_WITHIN, bob.recv_until("presence_diff"))
        .await
        .expect("told that alice left, not left to expire");
    assert_eq!(diff["left"], json!(["alice"]));
    assert_eq!(diff["joined"], json!([]));
    for app in apps {
        app.stop_keeping_data().await;
    }
    common::drop_database(&db).await;
}

#[tokio::test]
async fn postgres_broker_a_stopping_node_takes_its_users_off_the_others() {
    a_stopping_node_takes_its_users_off_the_others("postgres").await;
}

#[tokio::test]
async fn nats_broker_a_stopping_node_takes_its_users_off_the_others() {
    a_stopping_node_takes_its_users_off_the_others(&nats_url()).await;
}

#[tokio::test]
async fn postgres_broker_messages_cross_nodes_once_in_order() {
    messages_cross_nodes_once_in_order("postgres").await;
}

#[tokio::test]
async fn nats_broker_messages_cross_nodes_once_in_order() {
    messages_cross_nodes_once_in_order(&nats_url()).await;
}

#[tokio::test]
async fn postgres_broker_presence_and_typing_cross_nodes() {
    presence_and_typing_cross_nodes("postgres").await;
}

#[tokio::test]
async fn nats_broker_presence_and_typing_cross_nodes() {
    presence_and_typing_cross_nodes(&nats_url()).await;
}

#[tokio::test]
async fn sqlite_with_a_multi_node_broker_is_refused() {
    let (mut settings, _dir) = common::fresh(Backend::Sqlite).await;
    settings.broker = "postgres".into();
    let err = Application::build(settings).await.err().expect("refused");
    assert!(matches!(err, StartError::Topology(_)), "{err}");
    assert!(err.to_string().contains("SQLite"), "{err}");
}

/// A start that fails on its port (in use) leaves no node registered: the next start on
/// the same database goes ahead at once, not after the node TTL.
#[tokio::test]
async fn a_start_that_cannot_listen_registers_no_node() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let (mut settings, dir) = common::fresh(Backend::Sqlite).await;
    settings.listen = taken.local_addr().unwrap();
    let err = Application::build(settings.clone())
        .await
        .err()
        .expect("the port is taken");
    assert!(matches!(err, StartError::Listen { .. }), "{err}");
    settings.listen = "127.0.0.1:0".parse().unwrap();
    let app = spawn_with(settings, dir).await;
    app.stop().await;
}

#[tokio::test]
async fn a_local_broker_beside_a_live_node_is_refused() {
    let apps = cluster("postgres", 1).await;
    let mut settings = apps[0].settings.clone();
    settings.broker = "local".into();
    let err = Application::build(settings).await.err().expect("refused");
    assert!(
        err.to_string().contains("is serving this database"),
        "{err}"
    );
    // Once that node stops (and deregisters), a local node may start.
    let mut settings = apps[0].settings.clone();
    settings.broker = "local".into();
    let db = apps[0].database.clone();
    for app in apps {
        app.stop_keeping_data().await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(Application::build(settings).await.is_ok());
    common::drop_database(&db).await;
}
