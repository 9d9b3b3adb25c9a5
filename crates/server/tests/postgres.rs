//! What only PostgreSQL has: the embedding application's SQL contract with its
//! in-statement key hashing, concurrent migrations, and no demo session.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{spawn_with, Backend, Client};
use serde_json::json;
use sqlx::Connection;
use wschat_server::store::StoreKind;
use wschat_server::Application;

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
    assert!(applied >= 2, "every migration applied: {applied}");
    assert_eq!(applied, distinct, "each migration applied once");
    drop(db);
    drop(apps);
    common::drop_database(&settings.database).await;
}
