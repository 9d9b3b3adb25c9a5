//! A private PostgreSQL cluster per test (the shared one is never stopped), for the tests
//! that stop, restart or break PostgreSQL under a running node.

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use wschat_server::Settings;

const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

/// A private PostgreSQL cluster in a temporary directory, on a free port.
pub struct Cluster {
    _dir: tempfile::TempDir,
    ctl: Ctl,
}

/// How to run the cluster's tools (cheap to move into a blocking task).
#[derive(Clone)]
pub struct Ctl {
    /// Run as `postgres` (we are root; initdb refuses root).
    as_postgres: bool,
    root: PathBuf,
    port: u16,
}

impl Ctl {
    fn pg(&self, tool: &str, args: &[&str]) -> std::process::ExitStatus {
        let bin = format!("{PG_BIN}/{tool}");
        let mut cmd = if self.as_postgres {
            let mut cmd = Command::new("runuser");
            cmd.args(["-u", "postgres", "--", bin.as_str()]);
            cmd
        } else {
            Command::new(&bin)
        };
        cmd.args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap()
    }

    fn data(&self) -> String {
        self.root.join("data").display().to_string()
    }

    fn initdb(&self) {
        let data = self.data();
        let status = self.pg(
            "initdb",
            &[
                "-D", &data, "-A", "trust", "-U", "postgres", "-N", "-E", "UTF8",
            ],
        );
        assert!(status.success(), "initdb: {status}");
    }

    fn start(&self) {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c max_connections=60",
            self.port,
            self.root.display()
        );
        let log = self.root.join("log").display().to_string();
        let data = self.data();
        let status = self.pg(
            "pg_ctl",
            &["-D", &data, "-o", &options, "-l", &log, "-w", "start"],
        );
        assert!(status.success(), "pg_ctl start: {status}");
    }

    fn stop(&self, mode: &str) -> std::process::ExitStatus {
        let data = self.data();
        self.pg("pg_ctl", &["-D", &data, "-m", mode, "-w", "stop"])
    }
}

impl Cluster {
    /// `initdb`, then start. fsync and synchronous_commit keep their durable defaults.
    pub async fn create() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("wschat-pgfault-")
            .tempdir()
            .unwrap();
        let as_postgres = run_out("id", &["-u"]).trim() == "0";
        if as_postgres {
            run(
                "chown",
                &["postgres:postgres", &dir.path().display().to_string()],
            );
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let ctl = Ctl {
            as_postgres,
            root: dir.path().to_owned(),
            port,
        };
        let init = ctl.clone();
        tokio::task::spawn_blocking(move || {
            init.initdb();
            init.start();
        })
        .await
        .unwrap();
        Self { _dir: dir, ctl }
    }

    pub async fn start(&self) {
        let ctl = self.ctl.clone();
        tokio::task::spawn_blocking(move || ctl.start())
            .await
            .unwrap();
    }

    pub async fn stop(&self, mode: &str) {
        let ctl = self.ctl.clone();
        let mode = mode.to_owned();
        let status = tokio::task::spawn_blocking(move || ctl.stop(&mode))
            .await
            .unwrap();
        assert!(status.success(), "pg_ctl stop: {status}");
    }

    /// The postmaster's process id (the first line of its `postmaster.pid`).
    pub fn postmaster_pid(&self) -> i32 {
        let file = std::fs::read_to_string(self.ctl.root.join("data/postmaster.pid")).unwrap();
        file.lines().next().unwrap().trim().parse().unwrap()
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.ctl.port)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self.ctl.stop("immediate");
    }
}

pub fn run(cmd: &str, args: &[&str]) {
    let status = Command::new(cmd).args(args).status().unwrap();
    assert!(status.success(), "{cmd} {args:?}: {status}");
}

pub fn run_out(cmd: &str, args: &[&str]) -> String {
    String::from_utf8(Command::new(cmd).args(args).output().unwrap().stdout).unwrap()
}

pub async fn spawn_on(cluster: &Cluster, tweak: impl FnOnce(&mut Settings)) -> super::TestApp {
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let mut settings = super::settings_in(&dir);
    settings.database = cluster.url();
    tweak(&mut settings);
    super::spawn_with(settings, dir).await
}

/// Wait until `check` holds, polling.
pub async fn until<F, Fut>(what: &str, limit: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let end = Instant::now() + limit;
    while !check().await {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
