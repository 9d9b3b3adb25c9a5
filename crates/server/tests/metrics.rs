//! `/metrics` against a real server: the connection gauge always equals the open
//! connections, and counters and histograms (real Prometheus histograms) move with traffic.
//! One test in this binary: the recorder is process-wide, so two servers in one process
//! would count each other's connections.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::http::get;
use common::{sample, spawn_app, Backend, Client, TestApp};
use serde_json::json;

/// Wait until the gauges read `legacy` and `v1` (connections close asynchronously).
async fn expect_connections(app: &TestApp, legacy: f64, v1: f64) {
    let deadline = tokio::time::Instant::now() + common::WAIT;
    loop {
        let got = (
            sample(app, r#"wschat_connections{protocol="legacy"}"#).await,
            sample(app, r#"wschat_connections{protocol="v1"}"#).await,
        );
        if got == (Some(legacy), Some(v1)) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "connections {got:?}, expected legacy {legacy}, v1 {v1}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn metrics_follow_connections_and_traffic() {
    let app = spawn_app(Backend::Sqlite).await;
    expect_connections(&app, 0.0, 0.0).await;
    let text = get(app.addr, "/metrics", None).await.body;
    for line in [
        "# TYPE wschat_send_ack_seconds histogram",
        "# TYPE wschat_commit_batch_size histogram",
        "# TYPE wschat_connections gauge",
        "# TYPE wschat_messages_acknowledged_total counter",
        "# HELP wschat_connections ",
        "wschat_build_info{version=",
    ] {
        assert!(text.contains(line), "{line} missing:\n{text}");
    }

    let key = app.session("ada", None).await;
    let legacy_key = app.session("Michael Redman", Some(1)).await;
    let mut legacy_a = Client::legacy(&app, &legacy_key).await;
    let mut legacy_b = Client::legacy(&app, &legacy_key).await;
    let mut v1_auth_frame = Client::v1(&app, &key).await;
    let mut v1_query = Client::connect(&format!("{}?session_key={key}", app.v1_url())).await;
    assert_eq!(v1_query.recv().await["type"], "hello");
    // Open but not yet authenticated: a client connection all the same.
    let mut v1_pending = Client::connect(&app.v1_url()).await;
    expect_connections(&app, 2.0, 3.0).await;

    // Refused handshakes never count.
    assert!(tokio_tungstenite::connect_async(app.legacy_url("wrong"))
        .await
        .is_err());
    expect_connections(&app, 2.0, 3.0).await;

    // Traffic: a v1 send, acknowledged after commit, delivered to both members.
    v1_auth_frame.join("1", None).await;
    let ack = v1_auth_frame.say("1", "counted", "m-1").await;
    assert_eq!(ack["seq"], 1);
    legacy_a.send(json!({"message": "legacy too"})).await;
    assert_eq!(legacy_a.recv().await["message"], "counted");
    assert_eq!(legacy_a.recv().await["message"], "legacy too");
    assert_eq!(legacy_b.recv().await["message"], "counted");
    let at_least = |series: &'static str, min: f64| {
        let app = &app;
        async move {
            let value = sample(app, series).await.unwrap_or(-1.0);
            assert!(value >= min, "{series} = {value}, expected at least {min}");
        }
    };
    at_least(r#"wschat_messages_received_total{protocol="v1"}"#, 1.0).await;
    at_least(r#"wschat_messages_received_total{protocol="legacy"}"#, 1.0).await;
    at_least("wschat_messages_acknowledged_total", 2.0).await;
    at_least("wschat_messages_delivered_total", 6.0).await;
    at_least("wschat_auth_failures_total", 1.0).await;
    at_least("wschat_rooms", 1.0).await;
    at_least("wschat_commit_batch_size_count", 1.0).await;
    at_least("wschat_commit_seconds_count", 1.0).await;
    at_least("wschat_send_ack_seconds_count", 2.0).await;
    at_least("wschat_fanout_seconds_count", 1.0).await;
    at_least(r#"wschat_send_ack_seconds_bucket{le="10"}"#, 2.0).await;
    at_least(r#"wschat_send_ack_seconds_bucket{le="+Inf"}"#, 2.0).await;
    at_least(r#"wschat_commit_batch_size_bucket{le="1"}"#, 1.0).await;

    // A retry of a stored message is acknowledged again (the first message's seq), but
    // counted once: four sends, three messages.
    let again = v1_auth_frame.say("1", "counted", "m-1").await;
    assert_eq!(again["seq"], 1);
    assert_eq!(v1_auth_frame.say("1", "fresh", "m-2").await["seq"], 3);
    at_least("wschat_send_ack_seconds_count", 4.0).await;
    // The counter moves right after the batch's histogram: let that moment pass.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        sample(&app, "wschat_messages_acknowledged_total").await,
        Some(3.0)
    );

    // Closing: each kind is counted down, whatever way it ends.
    legacy_a.ws.close(None).await.unwrap();
    v1_pending.ws.close(None).await.unwrap();
    expect_connections(&app, 1.0, 2.0).await;
    drop(v1_query);
    expect_connections(&app, 1.0, 1.0).await;
    at_least(
        r#"wschat_connections_closed_total{protocol="legacy",reason="client closed"}"#,
        1.0,
    )
    .await;
    drop(legacy_b);
    v1_auth_frame.ws.close(None).await.unwrap();
    expect_connections(&app, 0.0, 0.0).await;
    at_least(r#"wschat_connections_opened_total{protocol="v1"}"#, 2.0).await;
    app.stop().await;
}
