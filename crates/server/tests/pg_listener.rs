//! The PostgreSQL broker's LISTEN connection across an outage longer than its reconnect
//! can wait. A file of its own: it reads a process-wide counter that the restarts in
//! `pg_faults` would move too.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::pg_cluster::{spawn_on, until, Cluster};
use common::{sample, TestApp};

/// `wschat_broker_reconnects_total`: each time the broker reads the store after its
/// connection came back.
async fn broker_reconnects(app: &TestApp) -> f64 {
    sample(app, "wschat_broker_reconnects_total")
        .await
        .unwrap_or(0.0)
}

/// PostgreSQL stays down longer than the LISTEN connection's reconnect waits (its pool's
/// 5-s acquire timeout), so the reconnect fails. When PostgreSQL is back the broker
/// listens again by itself and reads the store then: it does not wait for a notification
/// to arrive first (none comes here: nobody connects or sends).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_postgres_broker_listens_again_after_a_long_outage_and_reads_the_store() {
    let cluster = Cluster::create().await;
    let app = spawn_on(&cluster, |s| s.broker = "postgres".into()).await;
    assert_eq!(app.shared.broker.name(), "postgres");
    // A NATS node's start connects too: that is not a reconnect either (the counter
    // is the process's, shared by both nodes).
    let nats_url =
        std::env::var("WSCHAT_TEST_NATS").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    let nats = spawn_on(&cluster, |s| {
        s.broker = nats_url;
        s.nats_subject = format!("wschat.test.{}", common::unique());
    })
    .await;
    assert_eq!(nats.shared.broker.name(), "nats");
    // The client tells of its connect from a task of its own: give it time to.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(broker_reconnects(&app).await, 0.0);
    nats.stop().await;
    cluster.stop("fast").await;
    tokio::time::sleep(Duration::from_secs(8)).await;
    cluster.start().await;
    until(
        "the broker to listen again and read the store",
        Duration::from_secs(20),
        || async { broker_reconnects(&app).await >= 1.0 },
    )
    .await;
    app.stop().await;
}
