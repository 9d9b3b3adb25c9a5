//! Processes for the fault suite: `wschat serve` nodes, a private PostgreSQL cluster and a
//! private NATS server (so that restarting them touches nothing else on the machine).

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_wschat");

/// One fault case at a time in this test binary.
pub async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    SERIAL.lock().await
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Run `wschat ARGS`; its trimmed stdout.
pub fn wschat(args: &[&str]) -> String {
    let out = Command::new(BIN).args(args).output().expect("wschat runs");
    assert!(out.status.success(), "wschat {args:?}: {out:?}");
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("command runs");
    assert!(out.status.success(), "{cmd:?}: {out:?}");
    String::from_utf8(out.stdout).unwrap()
}

fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill").args([sig, &pid.to_string()]).status();
}

/// A PostgreSQL 15 cluster of its own, on a free port, in a temporary folder.
pub struct PrivatePg {
    dir: tempfile::TempDir,
    pub port: u16,
}

fn pg_bin(name: &str) -> PathBuf {
    let version = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL is installed")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .max()
        .unwrap();
    version.join("bin").join(name)
}

fn as_postgres(program: &Path) -> Command {
    let mut cmd = Command::new("runuser");
    cmd.args(["-u", "postgres", "--"]).arg(program);
    cmd
}

impl PrivatePg {
    pub fn start() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("wschat-pg")
            .tempdir()
            .unwrap();
        run(Command::new("chown")
            .args(["postgres:postgres"])
            .arg(dir.path()));
        let data = dir.path().join("data");
        run(as_postgres(&pg_bin("initdb"))
            .args(["-A", "trust", "-U", "postgres", "--no-sync", "-D"])
            .arg(&data));
        let pg = Self {
            dir,
            port: free_port(),
        };
        pg.ctl(&["-w", "start"]);
        pg
    }

    fn ctl(&self, args: &[&str]) {
        let data = self.dir.path().join("data");
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1",
            self.port,
            self.dir.path().display()
        );
        run(as_postgres(&pg_bin("pg_ctl"))
            .arg("-D")
            .arg(&data)
            .args(["-o", &opts, "-l"])
            .arg(self.dir.path().join("log"))
            .args(args)
            .stdout(Stdio::null()));
    }

    /// `pg_ctl restart -m MODE` (fast or immediate).
    pub fn restart(&self, mode: &str) {
        self.ctl(&["-w", "-m", mode, "restart"]);
    }

    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    pub fn create_database(&self, name: &str) -> String {
        self.psql("postgres", &format!("create database {name}"));
        self.url(name)
    }

    /// Run one statement; its unaligned, tuples-only output.
    pub fn psql(&self, database: &str, sql: &str) -> String {
        let db = if database.starts_with("postgres://") {
            database.rsplit('/').next().unwrap().to_owned()
        } else {
            database.to_owned()
        };
        run(Command::new(pg_bin("psql"))
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-d",
                &db,
            ])
            .args(["-tAc", sql]))
    }
}

impl Drop for PrivatePg {
    fn drop(&mut self) {
        let data = self.dir.path().join("data");
        let _ = as_postgres(&pg_bin("pg_ctl"))
            .arg("-D")
            .arg(&data)
            .args(["-m", "immediate", "-w", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// A NATS server of its own.
pub struct PrivateNats {
    pub port: u16,
    child: Option<Child>,
}

impl PrivateNats {
    pub fn start() -> Self {
        let mut nats = Self {
            port: free_port(),
            child: None,
        };
        nats.restart();
        nats
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn restart(&mut self) {
        self.stop();
        let child = Command::new("nats-server")
            .args(["-a", "127.0.0.1", "-p", &self.port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server is installed");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "nats-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for PrivateNats {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A `wschat serve` process.
pub struct Node {
    pub port: u16,
    database: String,
    broker: String,
    env: Vec<(String, String)>,
    log: tempfile::NamedTempFile,
    child: Option<Child>,
}

impl Node {
    pub fn start(port: u16, database: &str, broker: &str, env: &[(&str, &str)]) -> Self {
        let mut node = Self {
            port,
            database: database.to_owned(),
            broker: broker.to_owned(),
            env: env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            log: tempfile::NamedTempFile::new().unwrap(),
            child: None,
        };
        node.restart();
        node
    }

    /// Start (again) with the same settings.
    pub fn restart(&mut self) {
        let log = self.log.reopen().unwrap();
        let child = Command::new(BIN)
            .args(["serve", "--listen", &format!("127.0.0.1:{}", self.port)])
            .args(["--database", &self.database, "--broker", &self.broker])
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env("RUST_LOG", "warn")
            // The suite offers full-speed senders; the per-connection limit is not under test.
            .env("WSCHAT_RATE_PER_SEC", "0")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("wschat serve starts");
        self.child = Some(child);
    }

    pub fn wait_healthy(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if http_status(self.port, "/healthz") == Some(200) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "node on {} not healthy",
                self.port
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn pause(&self) {
        signal(self.pid(), "-STOP");
    }

    pub fn resume(&self) {
        signal(self.pid(), "-CONT");
    }

    /// SIGTERM and wait for the exit.
    pub fn terminate(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal(child.id(), "-TERM");
            let status = child.wait().unwrap();
            assert!(status.success(), "a drained node exits 0: {status:?}");
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(child) = &self.child {
            signal(child.id(), "-CONT");
        }
        self.kill9();
    }
}

pub fn http_status(port: u16, path: &str) -> Option<u16> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.split_whitespace().nth(1)?.parse().ok()
}
