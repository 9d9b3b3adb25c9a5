//! `/livez`, `/healthz` and `/readyz`: ready when the store and the broker answer and the
//! server is not draining; 503 with the reason otherwise.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::http::get;
use common::{fresh, spawn_app, spawn_with, Backend, Paused};
use wschat_server::Application;

#[tokio::test]
async fn sqlite_node_is_live_healthy_and_ready() {
    let app = spawn_app(Backend::Sqlite).await;
    for path in ["/livez", "/healthz", "/readyz"] {
        let r = get(app.addr, path, None).await;
        assert_eq!((r.status, r.body.as_str()), (200, "ok\n"), "{path}");
    }
    app.stop().await;
}

#[tokio::test]
async fn postgres_broker_node_is_ready() {
    let app = spawn_app(Backend::Postgres).await;
    assert_eq!(app.shared.broker.name(), "postgres");
    let r = get(app.addr, "/readyz", None).await;
    assert_eq!((r.status, r.body.as_str()), (200, "ok\n"));
    app.stop().await;
}

/// A SIGHUP to a server without TLS (nothing to reload) does not end the process, as
/// the signal's default action would: it goes on serving. (Without the handler the whole
/// test process dies here.)
#[tokio::test]
async fn a_sighup_without_tls_is_ignored() {
    let app = spawn_app(Backend::Sqlite).await;
    let status = Command::new("kill")
        .args(["-HUP", &std::process::id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    tokio::time::sleep(Duration::from_millis(200)).await;
    let r = get(app.addr, "/healthz", None).await;
    assert_eq!((r.status, r.body.as_str()), (200, "ok\n"));
    app.stop().await;
}

/// Once draining, readiness and health say so (the router is served here on a listener of
/// the test's own, since the server's own listener stops accepting as the drain starts).
#[tokio::test]
async fn a_draining_server_is_not_ready() {
    let (settings, _dir) = fresh(Backend::Sqlite).await;
    let app = Application::build(settings).await.unwrap();
    let router = wschat_server::http::router(app.shared());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(
            listener,
            router.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await
    });
    assert_eq!(get(addr, "/readyz", None).await.status, 200);
    app.shutdown_token().cancel();
    for path in ["/readyz", "/healthz"] {
        let r = get(addr, path, None).await;
        assert_eq!((r.status, r.body.as_str()), (503, "draining\n"), "{path}");
    }
    assert_eq!(get(addr, "/livez", None).await.status, 200);
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn nats_server(port: u16) -> Child {
    Command::new("nats-server")
        .args(["-a", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("nats-server is installed (the multi-node suites need it)")
}

async fn wait_for_port(port: u16) {
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("nats-server did not start");
}

async fn wait_for_readyz(addr: SocketAddr, status: u16, body_part: &str) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let r = get(addr, "/readyz", None).await;
        if r.status == status && r.body.contains(body_part) {
            return r.body;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "readyz stayed {} {:?}",
            r.status,
            r.body
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `ALTER DATABASE db ALLOW_CONNECTIONS allow`: new connections refused while false, the
/// open ones kept.
async fn allow_connections(admin: &mut sqlx::PgConnection, db: &str, allow: bool) {
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "ALTER DATABASE {db} ALLOW_CONNECTIONS {allow}"
    )))
    .execute(admin)
    .await
    .unwrap();
}

/// The PostgreSQL broker's LISTEN connection is lost while the database refuses new
/// connections (its connection limit reached, say) but the pools' idle ones still answer:
/// the node would hear other nodes only through its periodic reads, so it is not ready,
/// naming the LISTEN connection; ready again once it listens again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_the_postgres_listen_connection() {
    use sqlx::Connection;
    let (mut settings, dir) = fresh(Backend::Postgres).await;
    settings.broker = "postgres".into();
    let db = settings.database.rsplit('/').next().unwrap().to_owned();
    let app = spawn_with(settings, dir).await;
    assert_eq!(app.shared.broker.name(), "postgres");
    // Each pool holds an idle connection now (the checks made them).
    wait_for_readyz(app.addr, 200, "ok").await;
    let mut admin = sqlx::PgConnection::connect(&common::pg_admin_url())
        .await
        .unwrap();
    allow_connections(&mut admin, &db, false).await;
    let ended: Vec<(bool,)> = sqlx::query_as(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = $1 AND query LIKE 'LISTEN%'",
    )
    .bind(&db)
    .fetch_all(&mut admin)
    .await
    .unwrap();
    assert_eq!(ended, vec![(true,)], "one LISTEN connection");
    // The first 503 may be another broker problem (its pool cannot open a connection
    // either): what is waited for is the one naming the LISTEN connection.
    let body = wait_for_readyz(app.addr, 503, "broker unreachable: the LISTEN connection").await;
    assert!(!body.contains("store"), "the store is fine: {body}");
    allow_connections(&mut admin, &db, true).await;
    wait_for_readyz(app.addr, 200, "ok").await;
    app.stop().await;
}

/// The LISTEN connection's server stops answering without closing it (a paused backend,
/// as a failover or a lost host look): nothing tells the listener, which would wait for
/// good. Its probes go unheard, so it is taken for lost: not ready while no new one can
/// listen (the database refuses new connections), ready again once one does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_a_listen_connection_that_stops_answering() {
    use sqlx::Connection;
    let (mut settings, dir) = fresh(Backend::Postgres).await;
    settings.broker = "postgres".into();
    let db = settings.database.rsplit('/').next().unwrap().to_owned();
    let app = spawn_with(settings, dir).await;
    wait_for_readyz(app.addr, 200, "ok").await;
    let mut admin = sqlx::PgConnection::connect(&common::pg_admin_url())
        .await
        .unwrap();
    allow_connections(&mut admin, &db, false).await;
    let listeners: Vec<(i32,)> = sqlx::query_as(
        "SELECT pid FROM pg_stat_activity WHERE datname = $1 AND query LIKE 'LISTEN%'",
    )
    .bind(&db)
    .fetch_all(&mut admin)
    .await
    .unwrap();
    assert_eq!(listeners.len(), 1, "one LISTEN connection");
    let paused = Paused::pause(listeners[0].0);
    // The first 503 may be another broker problem (its pool cannot open a connection
    // either): what is waited for is the one naming the LISTEN connection.
    wait_for_readyz(app.addr, 503, "broker unreachable: the LISTEN connection").await;
    allow_connections(&mut admin, &db, true).await;
    wait_for_readyz(app.addr, 200, "ok").await;
    drop(paused);
    app.stop().await;
}

/// A private NATS server is stopped under a running node: readiness turns 503 naming the
/// broker, health stays 200 (the node can still serve its own clients), and readiness
/// comes back when NATS does.
#[tokio::test]
async fn readiness_follows_the_nats_connection() {
    let port = free_port();
    let mut nats = nats_server(port);
    wait_for_port(port).await;
    let (mut settings, dir) = fresh(Backend::Postgres).await;
    settings.broker = format!("nats://127.0.0.1:{port}");
    let app = spawn_with(settings, dir).await;
    assert_eq!(app.shared.broker.name(), "nats");
    wait_for_readyz(app.addr, 200, "ok").await;

    nats.kill().unwrap();
    nats.wait().unwrap();
    let body = wait_for_readyz(app.addr, 503, "broker unreachable").await;
    assert!(body.contains("NATS"), "{body}");
    assert!(!body.contains("store"), "the store is fine: {body}");
    assert_eq!(get(app.addr, "/healthz", None).await.status, 200);

    let mut nats = nats_server(port);
    wait_for_readyz(app.addr, 200, "ok").await;
    app.stop().await;
    nats.kill().unwrap();
    nats.wait().unwrap();
}

/// A server told not to migrate refuses, by name, a database that lacks one of this
/// build's migrations (an older database): it would start, answer `/healthz`, and fail
/// every send on the missing tables or columns. With every migration applied it starts.
#[tokio::test]
async fn no_migrate_refuses_a_database_that_lacks_a_migration() {
    for backend in [Backend::Sqlite, Backend::Postgres] {
        let (mut settings, dir) = fresh(backend).await;
        // Migrated, then started without migrating: it starts.
        spawn_with(settings.clone(), dir.clone())
            .await
            .stop_keeping_data()
            .await;
        settings.no_migrate = true;
        let app = spawn_with(settings.clone(), dir.clone()).await;
        // The newest migration's record gone: an older database.
        let newest = newest_migration(&app.database).await;
        common::app_sql(
            &app,
            &format!("DELETE FROM wschat_migrations WHERE version = {newest}"),
        )
        .await;
        app.stop_keeping_data().await;
        let refused = Application::build(settings.clone()).await;
        let Err(e) = refused else {
            panic!("{backend:?}: started without migration {newest}");
        };
        let told = e.to_string();
        assert!(told.contains(&format!("[{newest}]")), "{told}");
        assert!(told.contains("wschat migrate"), "{told}");
        common::drop_database(&settings.database).await;
    }
}

/// The newest migration version the database at `url` records as applied.
async fn newest_migration(url: &str) -> i64 {
    use sqlx::Connection;
    let sql = "SELECT max(version) FROM wschat_migrations";
    if url.starts_with("sqlite") {
        let mut db = sqlx::SqliteConnection::connect(url).await.unwrap();
        sqlx::query_scalar(sql).fetch_one(&mut db).await.unwrap()
    } else {
        let mut db = sqlx::PgConnection::connect(url).await.unwrap();
        sqlx::query_scalar(sql).fetch_one(&mut db).await.unwrap()
    }
}
