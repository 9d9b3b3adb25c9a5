//! Test harness: a real server on port 0 over a fresh SQLite file, and WebSocket clients
//! for both protocols.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod http;
pub mod pg_cluster;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use wschat_protocol::v1::ServerFrame;
use wschat_server::app::Shared;
use wschat_server::store::{generate_key, hash_key};
use wschat_server::{Application, Settings};

pub const WAIT: Duration = Duration::from_secs(10);

/// `suite!(test_a, test_b)`: each `async fn test_x(backend: Backend)` of the including
/// file becomes a test on SQLite and one on PostgreSQL, with the same assertions.
#[allow(unused_macros)] // not every test file uses it
macro_rules! suite {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(#[tokio::test]
            async fn $name() {
                super::$name(super::Backend::Sqlite).await
            })*
        }
        mod postgres {
            $(#[tokio::test]
            async fn $name() {
                super::$name(super::Backend::Postgres).await
            })*
        }
    };
}

/// Which store a test runs on. Every suite runs on both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// The PostgreSQL server tests create their databases on.
pub fn pg_admin_url() -> String {
    std::env::var("WSCHAT_TEST_PG")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// A short random name part.
pub fn unique() -> String {
    wschat_server::store::generate_key()
        .to_lowercase()
        .replace(['-', '_'], "")[..16]
        .to_owned()
}

/// Settings for a fresh database on `backend` (a new file, or a new PostgreSQL database).
/// Without PostgreSQL the PostgreSQL tests fail, loudly; they never skip.
pub async fn fresh(backend: Backend) -> (Settings, Arc<tempfile::TempDir>) {
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let mut settings = settings_in(&dir);
    if backend == Backend::Postgres {
        use sqlx::Connection;
        let admin = pg_admin_url();
        let mut conn = sqlx::PgConnection::connect(&admin).await.unwrap_or_else(|e| {
            panic!("PostgreSQL is required for the PostgreSQL suite and is not reachable at {admin}: {e}")
        });
        let name = format!(
            "wschat_t_{}",
            wschat_server::store::generate_key()
                .to_lowercase()
                .replace(['-', '_'], "")[..16]
                .to_owned()
        );
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut conn)
            .await
            .unwrap();
        let base = admin.rsplit_once('/').unwrap().0;
        settings.database = format!("{base}/{name}");
    }
    (settings, dir)
}

/// Drop a test's PostgreSQL database (no-op for SQLite).
pub async fn drop_database(url: &str) {
    if !url.starts_with("postgres") {
        return;
    }
    use sqlx::Connection;
    let name = url.rsplit('/').next().unwrap().to_owned();
    if let Ok(mut conn) = sqlx::PgConnection::connect(&pg_admin_url()).await {
        let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
        )))
        .execute(&mut conn)
        .await;
    }
}

/// Run one statement on the test's database, as the embedding application would.
pub async fn app_sql(app: &TestApp, sql: &str) {
    use sqlx::Connection;
    let sql = sqlx::AssertSqlSafe(sql.to_owned());
    if app.database.starts_with("sqlite") {
        let mut db = sqlx::SqliteConnection::connect(&app.database)
            .await
            .unwrap();
        sqlx::query(sql).execute(&mut db).await.unwrap();
    } else {
        let mut db = sqlx::PgConnection::connect(&app.database).await.unwrap();
        sqlx::query(sql).execute(&mut db).await.unwrap();
    }
}

/// The value of `app`'s `/metrics` series `series` (name with its labels, as printed), if
/// present.
pub async fn sample(app: &TestApp, series: &str) -> Option<f64> {
    let r = http::get(app.addr, "/metrics", None).await;
    assert_eq!(r.status, 200);
    r.body.lines().find_map(|line| {
        let (name, value) = line.rsplit_once(' ')?;
        (name == series).then(|| value.parse().unwrap())
    })
}

pub struct TestApp {
    pub settings: Settings,
    pub addr: SocketAddr,
    pub database: String,
    pub shared: Arc<Shared>,
    pub shutdown: tokio_util::sync::CancellationToken,
    pub task: tokio::task::JoinHandle<std::io::Result<()>>,
    pub dir: Arc<tempfile::TempDir>,
}

pub fn settings_in(dir: &tempfile::TempDir) -> Settings {
    Settings {
        listen: "127.0.0.1:0".parse().unwrap(),
        database: format!("sqlite://{}", dir.path().join("chat.db").display()),
        demo_session: false,
        // These suites send as fast as they can (20 clients × 100 messages, floods of
        // acks): no per-connection frame rate. tests/security.rs sets its own.
        rate_per_sec: 0,
        ..Settings::default()
    }
}

pub async fn spawn_app(backend: Backend) -> TestApp {
    let (settings, dir) = fresh(backend).await;
    spawn_with(settings, dir).await
}

pub async fn spawn_with(settings: Settings, dir: Arc<tempfile::TempDir>) -> TestApp {
    let database = settings.database.clone();
    let app = Application::build(settings.clone())
        .await
        .expect("server starts");
    let addr = app.local_addr().unwrap();
    let shared = app.shared();
    let shutdown = app.shutdown_token();
    let task = tokio::spawn(app.run());
    TestApp {
        settings,
        addr,
        database,
        shared,
        shutdown,
        task,
        dir,
    }
}

impl TestApp {
    /// Create a session and return its key.
    pub async fn session(&self, user: &str, room: Option<i64>) -> String {
        let key = generate_key();
        self.shared
            .store
            .create_session(&hash_key(&key), user, room)
            .await
            .unwrap();
        key
    }

    pub fn legacy_url(&self, key: &str) -> String {
        format!("ws://{}/?session_key={key}", self.addr)
    }

    pub fn v1_url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    /// Stop gracefully, wait, and drop the test's database.
    pub async fn stop(self) {
        let database = self.database.clone();
        self.stop_keeping_data().await;
        drop_database(&database).await;
    }

    /// Stop gracefully and wait; the data stays for a restart.
    pub async fn stop_keeping_data(self) -> Arc<tempfile::TempDir> {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(20), self.task)
            .await
            .expect("server stops in time")
            .unwrap()
            .unwrap();
        self.dir
    }
}

pub struct Client {
    pub ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

impl Client {
    pub async fn connect(url: &str) -> Self {
        let (ws, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("connects");
        Self { ws }
    }

    /// A v1 client, authenticated by an `auth` frame, past its `hello`.
    pub async fn v1(app: &TestApp, key: &str) -> Self {
        let mut c = Self::connect(&app.v1_url()).await;
        c.send(serde_json::json!({"type": "auth", "key": key}))
            .await;
        let hello = c.recv().await;
        assert_eq!(hello["type"], "hello", "{hello}");
        c
    }

    /// A legacy client past `{"authenticated":true}`.
    pub async fn legacy(app: &TestApp, key: &str) -> Self {
        let mut c = Self::connect(&app.legacy_url(key)).await;
        assert_eq!(c.recv().await, serde_json::json!({"authenticated": true}));
        c
    }

    pub async fn send(&mut self, value: Value) {
        self.ws
            .send(Message::text(value.to_string()))
            .await
            .unwrap();
    }

    pub async fn send_raw(&mut self, text: &str) {
        self.ws.send(Message::text(text.to_owned())).await.unwrap();
    }

    /// The next text frame as JSON (pings skipped); panics after `WAIT`.
    pub async fn recv(&mut self) -> Value {
        loop {
            let msg = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("a frame in time")
                .expect("stream open")
                .expect("frame ok");
            match msg {
                Message::Text(t) => return serde_json::from_str(&t).unwrap(),
                Message::Ping(_) | Message::Pong(_) => continue,
                other => panic!("unexpected frame {other:?}"),
            }
        }
    }

    pub async fn recv_typed(&mut self) -> ServerFrame {
        serde_json::from_value(self.recv().await).unwrap()
    }

    /// Frames until one whose `type` is `kind`; returns it.
    pub async fn recv_until(&mut self, kind: &str) -> Value {
        loop {
            let v = self.recv().await;
            if v["type"] == kind {
                return v;
            }
        }
    }

    /// The close code the server ends with (frames before it skipped).
    pub async fn close_code(&mut self) -> Option<u16> {
        loop {
            match tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("close in time")
            {
                Some(Ok(Message::Close(frame))) => return frame.map(|f| u16::from(f.code)),
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return None,
            }
        }
    }

    /// Join one room; returns `last_seq` of its `joined`.
    pub async fn join(&mut self, room: &str, since: Option<u64>) -> u64 {
        let mut spec = serde_json::json!({"room": room});
        if let Some(since) = since {
            spec["since"] = since.into();
        }
        self.send(serde_json::json!({"type": "join", "rooms": [spec]}))
            .await;
        let joined = self.recv_until("joined").await;
        joined["last_seq"].as_u64().unwrap()
    }

    /// Send and wait for the ack (other frames skipped).
    pub async fn say(&mut self, room: &str, text: &str, cmid: &str) -> Value {
        self.send(
            serde_json::json!({"type": "send", "room": room, "text": text, "client_msg_id": cmid}),
        )
        .await;
        self.recv_until("ack").await
    }
}

/// A process stopped (SIGSTOP) until this is dropped (SIGCONT): a failed test leaves none
/// paused.
pub struct Paused(pub i32);

impl Paused {
    pub fn pause(pid: i32) -> Self {
        let status = std::process::Command::new("kill")
            .args(["-STOP", &pid.to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -STOP {pid}");
        Self(pid)
    }
}

impl Drop for Paused {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-CONT", &self.0.to_string()])
            .status();
    }
}
