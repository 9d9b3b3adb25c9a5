//! The binary as an operator uses it: subcommands, SQLite paths, the demo session, keys
//! kept out of the database in clear and out of logs at trace level, and a clean stop.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

const BIN: &str = env!("CARGO_BIN_EXE_wschat");

fn wschat(dir: &Path, args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .args(args)
        .current_dir(dir)
        .env_remove("RUST_LOG")
        .output()
        .expect("runs")
}

/// A new session in `dir`'s `sqlite://chat.db` (created if missing): its key.
fn session_key(dir: &Path, user: &str) -> String {
    let out = wschat(
        dir,
        &[
            "session",
            "create",
            "--database",
            "sqlite://chat.db",
            "--user",
            user,
        ],
    );
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn http_get(port: u16, path: &str) -> Option<String> {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

/// Waits until the server `child` answers /healthz on `port`. A child that has exited
/// fails here with its status, so another process answering on a reused port is never
/// mistaken for it.
fn wait_healthy(child: &mut Child, port: u16) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the server exited before it was healthy: {status:?}");
        }
        if http_get(port, "/healthz").is_some_and(|r| r.starts_with("HTTP/1.1 200")) {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("server not healthy in time");
}

fn serve(dir: &Path, db: &str, port: u16, rust_log: &str) -> Server {
    let listen = format!("127.0.0.1:{port}");
    serve_with(
        dir,
        &["--listen", &listen, "--database", db],
        &[("RUST_LOG", rust_log)],
    )
}

fn terminate(child: &mut Child) -> (std::process::ExitStatus, String) {
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let status = child.wait().unwrap();
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    (status, out)
}

/// The exit status of `child`, which must exit within `limit` of `since` (`after` names
/// what happened then).
fn exits_within(
    child: &mut Child,
    since: Instant,
    limit: Duration,
    after: &str,
) -> std::process::ExitStatus {
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(
            since.elapsed() < limit,
            "still running {limit:?} after {after}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn file_bytes(dir: &Path) -> Vec<u8> {
    let mut all = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            all.extend(std::fs::read(path).unwrap());
        }
    }
    all
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

#[test]
fn session_create_prints_only_a_strong_key_and_stores_only_its_hash() {
    let dir = tempfile::tempdir().unwrap();
    let out = wschat(
        dir.path(),
        &[
            "session",
            "create",
            "--database",
            "sqlite://chat.db",
            "--user",
            "ada",
        ],
    );
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    let key = stdout.trim_end_matches('\n');
    assert_eq!(stdout.lines().count(), 1, "only the key: {stdout:?}");
    assert!(key.len() >= 22, "at least 128 bits: {key}");
    assert!(key
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'));
    let bytes = file_bytes(dir.path());
    assert!(
        !contains(&bytes, key),
        "the key is not in the database in clear"
    );
    let hash = {
        use std::fmt::Write;
        let digest = sha256_hex(key);
        let mut s = String::new();
        write!(s, "sha256:{digest}").unwrap();
        s
    };
    assert!(contains(&bytes, &hash), "the hash is stored");
    // A chosen key (nodejschat's '1') works too, and is hashed as well.
    let out = wschat(
        dir.path(),
        &[
            "session",
            "create",
            "--database",
            "sqlite://chat.db",
            "--user",
            "Michael Redman",
            "--room",
            "3",
            "--key",
            "my-chosen-key-1",
        ],
    );
    assert_eq!(String::from_utf8(out.stdout).unwrap(), "my-chosen-key-1\n");
    assert!(!contains(&file_bytes(dir.path()), "my-chosen-key-1"));
}

fn sha256_hex(s: &str) -> String {
    // The test computes the hash independently of the server's code, with the system tool.
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(s.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8(out.stdout).unwrap()[..64].to_owned()
}

#[test]
fn sqlite_urls_relative_and_absolute_create_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let out = wschat(dir.path(), &["migrate", "--database", "sqlite://rel.db"]);
    assert!(out.status.success(), "{out:?}");
    assert!(dir.path().join("rel.db").exists());
    let abs = dir.path().join("nested/deeper/chat.db");
    let url = format!("sqlite://{}", abs.display());
    assert!(url.starts_with("sqlite:///"));
    let out = wschat(
        dir.path(),
        &["session", "create", "--database", &url, "--user", "x"],
    );
    assert!(out.status.success(), "{out:?}");
    assert!(abs.exists());
    let wal_mode = std::fs::read(&abs).unwrap();
    // The SQLite header's file format bytes 18/19 are 2 in WAL mode.
    assert_eq!((wal_mode[18], wal_mode[19]), (2, 2), "WAL mode");
}

#[test]
fn serve_prints_a_demo_url_once_and_stops_cleanly_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut child = serve(dir.path(), "sqlite://demo.db", port, "info");
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let mut page = None;
    for line in lines.by_ref() {
        let line = line.unwrap();
        if line.contains("/chat?session_key=") {
            page = Some(line.trim().to_owned());
            break;
        }
    }
    let page = page.expect("a ready-to-open page URL");
    assert!(
        page.starts_with(&format!("http://127.0.0.1:{port}/chat?session_key=")),
        "{page}"
    );
    wait_healthy(&mut child, port);
    let key = page.rsplit('=').next().unwrap().to_owned();
    // The demo key works.
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let url = format!("ws://127.0.0.1:{port}/?session_key={key}");
        let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
        let first = ws.next().await.unwrap().unwrap();
        assert_eq!(
            first.into_text().unwrap().as_str(),
            r#"{"authenticated":true}"#
        );
    });
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "exit 0 on SIGTERM: {status:?}");

    // Second start: the database has a session, so no demo line.
    let mut child = serve(dir.path(), "sqlite://demo.db", port, "info");
    wait_healthy(&mut child, port);
    let (status, out) = terminate(&mut child);
    assert!(status.success(), "exit 0 on SIGTERM: {status:?}\n{out}");
    assert!(!out.contains("session_key="), "{out}");
}

#[test]
fn no_session_key_reaches_the_log_even_at_trace_level() {
    let dir = tempfile::tempdir().unwrap();
    let key = session_key(dir.path(), "secretive");
    let port = free_port();
    let mut child = serve(dir.path(), "sqlite://chat.db", port, "trace");
    wait_healthy(&mut child, port);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        // Legacy: key in the URL.
        let url = format!("ws://127.0.0.1:{port}/?session_key={key}");
        let (mut legacy, _) = tokio_tungstenite::connect_async(url).await.unwrap();
        legacy.next().await.unwrap().unwrap();
        legacy
            .send(Message::text(
                json!({"message": "body stays out of logs"}).to_string(),
            ))
            .await
            .unwrap();
        legacy.next().await.unwrap().unwrap();
        // v1: key in the auth frame.
        let url = format!("ws://127.0.0.1:{port}/ws");
        let (mut v1, _) = tokio_tungstenite::connect_async(url).await.unwrap();
        v1.send(Message::text(
            json!({"type": "auth", "key": key}).to_string(),
        ))
        .await
        .unwrap();
        let hello = v1.next().await.unwrap().unwrap().into_text().unwrap();
        assert!(hello.contains("\"hello\""), "{hello}");
        // A wrong key, too.
        let url = format!("ws://127.0.0.1:{port}/?session_key=wrong-{key}");
        assert!(tokio_tungstenite::connect_async(url).await.is_err());
    });
    let (status, out) = terminate(&mut child);
    assert!(status.success());
    assert!(
        out.contains("connection opened"),
        "logs were written: {}",
        out.len()
    );
    assert!(out.contains("TRACE"), "logging ran at trace level");
    assert!(!out.contains(&key), "a session key is in the log");
    assert!(
        !out.contains("body stays out of logs"),
        "a message body is in the log"
    );
}

/// A server configured by a file (a deployment, its stdout perhaps a service manager's
/// log) creates no demo session and prints no key; without a file it does (above).
#[test]
fn a_server_configured_by_a_file_prints_no_demo_key() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    std::fs::write(
        dir.path().join("wschat.toml"),
        format!("listen = \"127.0.0.1:{port}\"\ndatabase = \"sqlite://file.db\"\n"),
    )
    .unwrap();
    let mut child = serve_with(dir.path(), &["--config", "wschat.toml"], &[]);
    wait_healthy(&mut child, port);
    let (status, out) = terminate(&mut child);
    assert!(status.success(), "exit 0 on SIGTERM: {status:?}\n{out}");
    assert!(!out.contains("session_key="), "{out}");
    assert!(!out.contains("demo session"), "{out}");
}

/// A SIGHUP while the server is still starting (here: waiting on a database that accepts
/// the connection and never answers) does not kill it: it goes on to its own end, an
/// error about the database.
#[test]
fn a_sighup_during_start_up_does_not_kill_the_server() {
    use std::os::unix::process::ExitStatusExt;
    let dir = tempfile::tempdir().unwrap();
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let db = format!(
        "postgres://postgres@127.0.0.1:{}/test",
        silent.local_addr().unwrap().port()
    );
    let listen = format!("127.0.0.1:{}", free_port());
    let mut child = serve_with(dir.path(), &["--listen", &listen, "--database", &db], &[]);
    // The listener is bound before the store is opened, and the signal handlers before
    // that: once it accepts, the server is in the window.
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(&listen).is_err() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "exited before it listened"
        );
        assert!(Instant::now() < deadline, "never listened");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(child.try_wait().unwrap().is_none(), "still starting");
    Command::new("kill")
        .args(["-HUP", &child.id().to_string()])
        .status()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the server neither started nor failed"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert_eq!(
        status.signal(),
        None,
        "killed by a signal: {status:?}\n{err}"
    );
    assert!(!status.success(), "{err}");
    drop(silent);
}

/// Out of file descriptors, the server cannot accept: it says so (once a second at most),
/// and accepts again once connections close.
#[test]
fn out_of_file_descriptors_is_logged_and_the_server_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut child = Server(
        Command::new("sh")
            .args([
                "-c",
                &format!(
                    "ulimit -n 64 && exec {BIN} serve --listen 127.0.0.1:{port} --database sqlite://fd.db"
                ),
            ])
            .current_dir(dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starts"),
    );
    wait_healthy(&mut child, port);
    let held: Vec<_> = (0..80)
        .map(|_| std::net::TcpStream::connect(("127.0.0.1", port)).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    drop(held);
    wait_healthy(&mut child, port);
    let (status, out) = terminate(&mut child);
    assert!(status.success(), "{status:?}\n{out}");
    assert!(out.contains("cannot accept connections"), "{out}");
}

fn serve_with_flags(dir: &Path, port: u16, extra: &[&str]) -> Server {
    let listen = format!("127.0.0.1:{port}");
    let mut args = vec!["--listen", &listen, "--database", "sqlite://sec.db"];
    args.extend_from_slice(extra);
    serve_with(dir, &args, &[])
}

fn serve_with(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Server {
    let mut cmd = Command::new(BIN);
    cmd.arg("serve").args(args).current_dir(dir);
    for (name, value) in env {
        cmd.env(name, value);
    }
    Server(
        cmd.stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starts"),
    )
}

/// The status line of a WebSocket handshake on `path` with extra header lines.
fn upgrade_status(port: u16, path: &str, extra: &str) -> String {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    )
    .unwrap();
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).unwrap();
    line.trim().to_owned()
}

#[test]
fn security_flags_reach_the_server_and_bad_ones_stop_it() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut child = serve_with_flags(
        dir.path(),
        port,
        &[
            "--allowed-origin",
            "https://good.example",
            "--allowed-origin",
            "https://other.example",
            "--trusted-proxy",
            "10.0.0.0/8",
            "--rate-per-sec",
            "0",
            "--max-header-bytes",
            "9000",
        ],
    );
    wait_healthy(&mut child, port);
    let status = |extra: &str| upgrade_status(port, "/?session_key=nope", extra);
    assert!(status("Origin: https://evil.example\r\n").contains(" 403 "));
    assert!(status("Origin: https://good.example.evil.com\r\n").contains(" 403 "));
    // Allowed (both flags count): then the unknown key.
    assert!(status("Origin: https://other.example\r\n").contains(" 401 "));
    assert!(status("Origin: https://good.example\r\n").contains(" 401 "));
    let padding = format!("X-Pad: {}\r\n", "p".repeat(10_000));
    assert!(status(&padding).contains(" 431 "), "{}", status(&padding));
    let (exit, _) = terminate(&mut child);
    assert!(exit.success());

    // A proxy range that is not one stops the start, naming it.
    let out = wschat(
        dir.path(),
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--database",
            "sqlite://sec.db",
            "--trusted-proxy",
            "proxy.example",
        ],
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("proxy.example"), "{stderr}");
    // So does half a TLS configuration (the settings' check refuses it, naming the flag).
    let out = wschat(dir.path(), &["serve", "--tls-cert", "c.pem"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("needs tls_key"), "{stderr}");
}

/// A blocking HTTP request with a JSON body and a bearer token; returns status and body.
fn http_post(port: u16, path: &str, token: &str, body: &serde_json::Value) -> (u16, String) {
    use std::io::Write;
    let body = body.to_string();
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out.split(' ').nth(1).unwrap().parse().unwrap();
    let body = out.split_once("\r\n\r\n").unwrap().1.to_owned();
    (status, body)
}

#[test]
fn json_logs_have_one_line_per_connection_event_and_no_key_token_or_body() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let token = "admin-token-kept-out-of-logs-0123";
    let listen = format!("127.0.0.1:{port}");
    let mut child = serve_with(
        dir.path(),
        &[
            "--log-format",
            "json",
            "--listen",
            &listen,
            "--database",
            "sqlite://chat.db",
            "--demo-session",
            "false",
        ],
        &[("RUST_LOG", "trace"), ("WSCHAT_ADMIN_TOKEN", token)],
    );
    wait_healthy(&mut child, port);
    // A session and a message through the admin API: neither key nor text may be logged.
    let (status, created) = http_post(
        port,
        "/admin/v1/sessions",
        token,
        &json!({"user": "secretive", "room": 5}),
    );
    assert_eq!(status, 201, "{created}");
    let key = serde_json::from_str::<serde_json::Value>(&created).unwrap()["key"]
        .as_str()
        .unwrap()
        .to_owned();
    let (status, _) = http_post(
        port,
        "/admin/v1/rooms/5/messages",
        token,
        &json!({"text": "admin body stays out of logs"}),
    );
    assert_eq!(status, 201);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let url = format!("ws://127.0.0.1:{port}/?session_key={key}");
        let (mut legacy, _) = tokio_tungstenite::connect_async(url).await.unwrap();
        legacy.next().await.unwrap().unwrap();
        legacy
            .send(Message::text(
                json!({"message": "client body stays out of logs"}).to_string(),
            ))
            .await
            .unwrap();
        // History (the admin's message), then the echo.
        legacy.next().await.unwrap().unwrap();
        legacy.next().await.unwrap().unwrap();
        legacy.close(None).await.unwrap();
        let url = format!("ws://127.0.0.1:{port}/ws");
        let (mut v1, _) = tokio_tungstenite::connect_async(url).await.unwrap();
        v1.send(Message::text(
            json!({"type": "auth", "key": key}).to_string(),
        ))
        .await
        .unwrap();
        let hello = v1.next().await.unwrap().unwrap().into_text().unwrap();
        assert!(hello.contains("\"hello\""), "{hello}");
        v1.close(None).await.unwrap();
        while v1.next().await.is_some() {}
    });
    let (status, out) = terminate(&mut child);
    assert!(status.success());
    let mut events = Vec::new();
    for line in out.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
        assert!(
            v["level"].is_string() && v["timestamp"].is_string(),
            "{line}"
        );
        let message = v["fields"]["message"].as_str().unwrap_or_default();
        if message.starts_with("connection ") {
            events.push(v["fields"].clone());
        }
    }
    assert!(out.contains("\"TRACE\""), "logging ran at trace level");
    let opened: Vec<_> = events
        .iter()
        .filter(|f| f["message"] == "connection opened")
        .collect();
    let closed: Vec<_> = events
        .iter()
        .filter(|f| f["message"] == "connection closed")
        .collect();
    assert_eq!((opened.len(), closed.len()), (2, 2), "{events:?}");
    for f in &closed {
        assert_eq!(f["reason"], "client closed", "{f}");
        assert!(f["duration_ms"].is_u64(), "{f}");
        assert!(f["protocol"] == "legacy" || f["protocol"] == "v1", "{f}");
    }
    assert!(!out.contains(&key), "a session key is in the log");
    assert!(!out.contains(token), "the admin token is in the log");
    assert!(
        !out.contains("body stays out of logs"),
        "a message body is in the log"
    );
}

#[test]
fn a_log_reader_that_stops_reading_does_not_stop_the_server() {
    // stderr is a pipe nobody reads: once its buffer (64 KiB) is full, a server that wrote
    // its log lines itself would wait in that write for good.
    let dir = tempfile::tempdir().unwrap();
    let key = session_key(dir.path(), "ada");
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut child = serve_with(
        dir.path(),
        &[
            "--listen",
            &listen,
            "--database",
            "sqlite://chat.db",
            "--demo-session",
            "false",
        ],
        &[
            ("RUST_LOG", "trace"),
            ("WSCHAT_MAX_CONNECTIONS_PER_SESSION", "0"),
            ("WSCHAT_MAX_CONNECTIONS_PER_IP", "0"),
        ],
    );
    // However the test ends, `child` kills the server: one stuck on its log pipe would
    // outlive it.
    wait_healthy(&mut child, port);
    let rt = tokio::runtime::Runtime::new().unwrap();
    // Each connection logs at least two lines of about 100 bytes: 1,000 of them are
    // three times the pipe's buffer.
    let connected = rt.block_on(async {
        let mut tasks = Vec::new();
        for _ in 0..10 {
            let url = format!("ws://127.0.0.1:{port}/?session_key={key}");
            tasks.push(tokio::spawn(async move {
                let mut connected = 0;
                for _ in 0..100 {
                    let attempt = async {
                        let (mut ws, _) =
                            tokio_tungstenite::connect_async(url.as_str()).await.ok()?;
                        ws.close(None).await.ok()?;
                        while ws.next().await.is_some() {}
                        Some(())
                    };
                    match tokio::time::timeout(Duration::from_secs(10), attempt).await {
                        Ok(Some(())) => connected += 1,
                        Ok(None) => {}
                        Err(_) => return (connected, true),
                    }
                }
                (connected, false)
            }));
        }
        let mut total = 0;
        for task in tasks {
            let (connected, stalled) = task.await.unwrap();
            assert!(
                !stalled,
                "a connect hung: the server waited for its log reader"
            );
            total += connected;
        }
        total
    });
    assert_eq!(connected, 1_000, "every connection went through");
    assert!(
        http_get(port, "/healthz").is_some_and(|r| r.starts_with("HTTP/1.1 200")),
        "the server still answers"
    );
}

/// nodejschat's test client spoke wss:// (`node test_client.js 1 wss://host:56412/ 2 10`),
/// and so does `wschat load`: trusting a private CA (`--ca-file`), or any certificate
/// (`--insecure`, as nodejschat's `rejectUnauthorized: false`); with neither, a certificate
/// the web PKI does not vouch for is refused.
#[test]
fn load_speaks_wss_trusting_a_ca_file_or_any_certificate_when_insecure() {
    let dir = tempfile::tempdir().unwrap();
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .unwrap()
        .signed_by(&leaf_key, &issuer)
        .unwrap();
    let file = |name: &str, pem: String| {
        let path = dir.path().join(name);
        std::fs::write(&path, pem).unwrap();
        path.to_str().unwrap().to_owned()
    };
    let (ca_file, cert, key) = (
        file("ca.pem", ca_cert.pem()),
        file("cert.pem", leaf.pem()),
        file("key.pem", leaf_key.serialize_pem()),
    );
    let session = session_key(dir.path(), "ada");
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut server = serve_with(
        dir.path(),
        &[
            "--listen",
            &listen,
            "--database",
            "sqlite://chat.db",
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
        ],
        &[],
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(server.try_wait().unwrap().is_none(), "the server exited");
        assert!(Instant::now() < deadline, "not listening in time");
        std::thread::sleep(Duration::from_millis(50));
    }
    let url = format!("wss://127.0.0.1:{port}/");
    let load = |trust: &[&str]| {
        let mut args = vec![
            "load",
            &url,
            "--protocol",
            "legacy",
            "--session-key",
            &session,
            "-n",
            "2",
            "--interval",
            "0.2",
            "--duration",
            "1",
            "--seed",
            "1",
            "--connect-timeout",
            "3",
            "--json",
            "--no-progress",
        ];
        args.extend_from_slice(trust);
        let out = wschat(dir.path(), &args);
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let report: serde_json::Value = stdout
            .lines()
            .last()
            .and_then(|l| serde_json::from_str(l).ok())
            .unwrap_or_default();
        (
            out.status.code(),
            report,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    for trust in [&["--ca-file", ca_file.as_str()][..], &["--insecure"][..]] {
        let (code, report, stderr) = load(trust);
        assert_eq!(code, Some(0), "{trust:?}: {report} {stderr}");
        assert_eq!(report["connected"], 2, "{trust:?}: {report}");
        assert!(
            report["delivered"].as_u64() > Some(0),
            "{trust:?}: {report}"
        );
        assert_eq!(report["lost"], 0, "{trust:?}: {report}");
    }
    let (code, report, stderr) = load(&[]);
    assert_eq!(code, Some(3), "an unknown CA is refused: {report} {stderr}");
    assert_eq!(report["connected"], 0, "{report}");
}

/// A server process, killed (and reaped) when this is dropped, so a test that fails
/// midway leaves no server behind.
struct Server(Child);

impl std::ops::Deref for Server {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Server {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // Already waited for (a test that stopped it): nothing to kill.
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

#[test]
fn sigterm_drains_idle_connections_with_1012_and_exits_long_before_the_grace_period() {
    let dir = tempfile::tempdir().unwrap();
    let key = session_key(dir.path(), "idle");
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut child = serve_with(
        dir.path(),
        &[
            "--listen",
            &listen,
            "--database",
            "sqlite://chat.db",
            "--shutdown-grace-secs",
            "30",
        ],
        &[("RUST_LOG", "info")],
    );
    wait_healthy(&mut child, port);
    assert!(http_get(port, "/readyz").is_some_and(|r| r.starts_with("HTTP/1.1 200")));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (codes, sigterm) = rt.block_on(async {
        let mut sockets = Vec::new();
        for _ in 0..3 {
            let url = format!("ws://127.0.0.1:{port}/?session_key={key}");
            let (mut legacy, _) = tokio_tungstenite::connect_async(url).await.unwrap();
            legacy.next().await.unwrap().unwrap();
            sockets.push(legacy);
            let url = format!("ws://127.0.0.1:{port}/ws?session_key={key}");
            let (mut v1, _) = tokio_tungstenite::connect_async(url).await.unwrap();
            v1.next().await.unwrap().unwrap();
            sockets.push(v1);
        }
        // Idle: nothing in flight. Stop the server and time it.
        let sigterm = Instant::now();
        Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        let mut codes = Vec::new();
        for mut ws in sockets {
            let code = tokio::time::timeout(Duration::from_secs(10), async {
                loop {
                    match ws.next().await {
                        Some(Ok(Message::Close(frame))) => return frame.map(|f| u16::from(f.code)),
                        Some(Ok(_)) => continue,
                        _ => return None,
                    }
                }
            })
            .await
            .expect("closed in time");
            codes.push(code);
        }
        (codes, sigterm)
    });
    let status = exits_within(
        &mut child,
        sigterm,
        Duration::from_secs(10),
        "SIGTERM (grace is 30 s)",
    );
    eprintln!("exited {:?} after SIGTERM", sigterm.elapsed());
    assert!(status.success(), "exit 0 after a drain: {status:?}");
    assert_eq!(codes, vec![Some(1012); 6], "every socket closed with 1012");
    let mut log = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut log)
        .unwrap();
    assert!(log.contains("draining"), "{log}");
    assert!(
        !log.contains('\u{1b}'),
        "no terminal colour codes in a log that goes to a pipe: {log}"
    );
    assert!(!log.contains("outlived the grace period"), "{log}");
    // Nothing listens any more.
    assert!(http_get(port, "/readyz").is_none());
}

/// A stop that cannot finish (another process holds the SQLite database's write lock, so
/// a commit waits: a WebSocket's send, and an admin request's message) waits for up to
/// the grace period; a second SIGINT ends it at once.
#[test]
fn a_second_signal_ends_a_stop_that_waits() {
    let dir = tempfile::tempdir().unwrap();
    let key = session_key(dir.path(), "u");
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let token = "admin-token-for-the-second-signal";
    let mut child = serve_with(
        dir.path(),
        &[
            "--listen",
            &listen,
            "--database",
            "sqlite://chat.db",
            "--shutdown-grace-secs",
            "120",
        ],
        &[("RUST_LOG", "info"), ("WSCHAT_ADMIN_TOKEN", token)],
    );
    wait_healthy(&mut child, port);
    let mut locker = Command::new("python3")
        .args([
            "-c",
            "import sqlite3, time\n\
             c = sqlite3.connect('chat.db', isolation_level=None)\n\
             c.execute('BEGIN EXCLUSIVE')\n\
             print('locked', flush=True)\n\
             time.sleep(120)",
        ])
        .current_dir(dir.path())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 runs");
    let mut line = String::new();
    BufReader::new(locker.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "locked");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut ws = rt.block_on(async {
        let url = format!("ws://127.0.0.1:{port}/ws?session_key={key}");
        let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
        ws.next().await.unwrap().unwrap();
        // Its commit waits for the lock; the connection's stop waits for its answer.
        let send = r#"{"type":"send","room":"r","text":"held","ref":1}"#;
        ws.send(Message::text(send)).await.unwrap();
        // Frames are read in order: the pong says the send was taken.
        ws.send(Message::text(r#"{"type":"ping","ref":2}"#))
            .await
            .unwrap();
        loop {
            let frame = ws.next().await.unwrap().unwrap();
            if frame.to_text().unwrap().contains("pong") {
                break;
            }
        }
        ws
    });
    // An HTTP request waiting on a commit too: axum's graceful stop waits for it.
    let admin = std::thread::spawn(move || {
        http_post(
            port,
            "/admin/v1/rooms/r/messages",
            token,
            &json!({"text": "held too"}),
        )
    });
    std::thread::sleep(Duration::from_millis(500));
    let pid = child.id().to_string();
    let signal = || Command::new("kill").args(["-INT", &pid]).status().unwrap();
    signal();
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        child.try_wait().unwrap().is_none(),
        "the first stop waits for the commit"
    );
    let second = Instant::now();
    signal();
    let status = exits_within(
        &mut child,
        second,
        Duration::from_secs(6),
        "the second SIGINT (the lock is held for 120 s)",
    );
    let _ = locker.kill();
    let _ = locker.wait();
    drop(rt.block_on(async { ws.close(None).await }));
    // The request ended with the process (its answer, if any, is not looked at).
    drop(admin.join());
    assert!(status.success(), "{status:?}");
    let mut log = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut log)
        .unwrap();
    assert!(log.contains("second signal"), "{log}");
    assert!(log.contains("stopped"), "{log}");
}

/// The kernel's view of a process's transparent huge pages: `THP_enabled` in its status.
fn thp_enabled(pid: u32) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("THP_enabled:"))
        .expect("the kernel reports THP_enabled")
        .trim()
        .to_owned()
}

#[test]
fn the_server_runs_without_transparent_huge_pages_unless_the_operator_asks() {
    let dir = tempfile::tempdir().unwrap();
    for (env, want) in [(None, "0"), (Some("1"), "1")] {
        let port = free_port();
        let listen = format!("127.0.0.1:{port}");
        let env: Vec<(&str, &str)> = env.map(|v| ("MIMALLOC_ALLOW_THP", v)).into_iter().collect();
        let mut child = serve_with(
            dir.path(),
            &["--listen", &listen, "--database", "sqlite://thp.db"],
            &env,
        );
        wait_healthy(&mut child, port);
        let got = thp_enabled(child.id());
        let (status, out) = terminate(&mut child);
        assert!(status.success(), "{status:?}: {out}");
        assert_eq!(got, want, "MIMALLOC_ALLOW_THP={env:?}");
    }
}
