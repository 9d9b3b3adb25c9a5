//! Typed settings: defaults, then a TOML file, then `WSCHAT_*` environment variables,
//! then command-line flags, each overriding the one before (figment).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

/// Every setting of `wschat serve`. The file's keys are the flags' names in snake_case.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// Address of the one listener (HTTP, the page, both WebSocket protocols).
    pub listen: SocketAddr,
    /// `sqlite://FILE` (the embedded default) or `postgres://…`.
    pub database: String,
    /// `auto` (local on SQLite, postgres on PostgreSQL), `local` (one node, in-process),
    /// `postgres` (LISTEN/NOTIFY) or `nats://HOST:PORT`.
    pub broker: String,
    /// The NATS subject the nodes of one deployment share.
    pub nats_subject: String,
    /// Skip applying migrations at start.
    pub no_migrate: bool,
    /// On SQLite, create a demo session at start when the database has none. On when
    /// `serve` runs without a configuration file, unless set.
    pub demo_session: bool,
    /// Messages sent on join without `since` (and to legacy clients on connect).
    pub history_limit: u32,
    /// Largest page a `history` request gets.
    pub max_history_page: u32,
    /// Longest message text, in bytes.
    pub max_message_bytes: usize,
    /// Rooms one v1 connection may be in at once.
    pub max_rooms_per_connection: usize,
    /// Bytes that may wait in one connection's outbound queue before it is closed
    /// with 4008 (slow consumer).
    pub outbound_queue_bytes: usize,
    /// WebSocket read buffer per connection, bytes.
    pub ws_read_buffer_bytes: usize,
    /// Most bytes of queued frames joined into one write to a connection's socket.
    pub ws_write_buffer_bytes: usize,
    /// While the node is busy (below), a connection that gets frames more often than this
    /// and that wrote less than this long ago holds its next write until this long has
    /// passed, so that frames arriving meanwhile go out in one write; 0 writes at once. A
    /// connection that gets a frame now and then writes at once.
    pub write_delay_ms: u64,
    /// The write delay applies while the node writes more than this many frames a
    /// second (until it falls under half of it); 0: always.
    pub write_delay_above_per_sec: u64,
    /// Time a v1 client has to send `auth` when the key was not in the handshake.
    pub auth_timeout_secs: u64,
    /// Interval of WebSocket pings sent by the server.
    pub ping_interval_secs: u64,
    /// A connection from which nothing (not even a pong) arrives for this long is closed.
    pub idle_timeout_secs: u64,
    /// Upper bound on a graceful stop, for stragglers.
    pub shutdown_grace_secs: u64,
    /// SQLite only: while the node is busy (`write_delay_above_per_sec`), a commit starts
    /// at most this long after the previous one started, so that each commit carries
    /// more; 0: at once.
    pub commit_delay_ms: u64,
    /// Most messages committed in one transaction.
    pub max_commit_batch: usize,
    /// Messages kept per room (older ones are deleted); 0 keeps everything. A `since`
    /// older than what is kept gets a `reset`.
    pub retention_per_room: u64,
    /// How often retention is applied.
    pub retention_interval_secs: u64,
    /// How often open connections' sessions are checked: a session row deleted or
    /// expired closes its connections (1008) within this interval.
    pub session_check_secs: u64,

    // Security and limits (docs/security.md).
    /// PEM certificate chain: with `tls_key`, serve https/wss on the listener. Reloaded on
    /// SIGHUP.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) for `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// Origins (`scheme://host[:port]`) whose pages may open WebSockets. When the list is
    /// not empty, a handshake with any other Origin (or `null`) gets 403.
    pub allowed_origins: Vec<String>,
    /// Refuse (403) handshakes that carry no Origin header (needs `allowed_origins`).
    pub require_origin: bool,
    /// Origins (`scheme://host[:port]`) whose pages may show the chat page in a frame (the
    /// page's CSP `frame-ancestors`); empty: no page may.
    pub frame_ancestors: Vec<String>,
    /// Peers (CIDR, or one address) whose `proxy_header` is believed for the client
    /// address (limits and logs).
    pub trusted_proxies: Vec<String>,
    /// The header the trusted proxies write: `x-forwarded-for` or `forwarded` (RFC 7239).
    /// Only that one is read: a proxy passes the other through as the client sent it.
    pub proxy_header: String,
    /// Largest HTTP request head (request line and headers), bytes; over it: 431.
    pub max_header_bytes: usize,
    /// Time a client has for the TLS handshake, and then for its request head; then the
    /// connection is closed.
    pub handshake_timeout_secs: u64,
    /// Frames a connection may send per second (token bucket); 0 = unlimited.
    pub rate_per_sec: u32,
    /// Frames a connection may send at once above the rate.
    pub rate_burst: u32,
    /// Frames refused for the rate within 10 s after which the connection is closed (1008);
    /// 0 = never close.
    pub rate_max_refusals: u32,
    /// Open WebSockets per session key; 0 = unlimited. Over it: 429.
    pub max_connections_per_session: usize,
    /// Open WebSockets per client address (IPv6: per /64); 0 = unlimited (the default:
    /// behind a proxy without `trusted_proxies` every client shares one address).
    pub max_connections_per_ip: usize,
    /// Unknown session keys per client address in a minute after which the address gets
    /// 429 for `failed_key_block_secs`; 0 = no limit.
    pub max_failed_keys_per_minute: u32,
    /// How long an address that tried too many unknown keys is refused.
    pub failed_key_block_secs: u64,
    /// Bearer token of the admin API (`/admin/v1/…`); unset: the admin API is off (404).
    pub admin_token: Option<Secret>,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 56412)),
            database: "sqlite://wschat.db".into(),
            broker: "auto".into(),
            nats_subject: "wschat.events".into(),
            no_migrate: false,
            demo_session: false,
            history_limit: 100,
            max_history_page: 500,
            max_message_bytes: 16 * 1024,
            max_rooms_per_connection: 100,
            outbound_queue_bytes: 4 * 1024 * 1024,
            ws_read_buffer_bytes: 1024,
            ws_write_buffer_bytes: 32 * 1024,
            // Under load only (below): a fan-out of 100,000 deliveries/s used 2.2 µs of
            // CPU per delivery with it and 4.7 without (bench/RESULTS.md, fan-out).
            write_delay_ms: 10,
            write_delay_above_per_sec: 50_000,
            auth_timeout_secs: 10,
            ping_interval_secs: 30,
            idle_timeout_secs: 90,
            shutdown_grace_secs: 10,
            // Only reached under a backlog; then each commit's fixed cost (round trip,
            // WAL flush, waiting for a core) is spread over more messages: one hot room on
            // PostgreSQL sustained 39,800 msgs/s with 1,000 and 47,200 with 10,000
            // (bench/RESULTS.md, persist).
            max_commit_batch: 10_000,
            // Under load only: 10,000 clients in rooms of ten (100,000 deliveries/s on
            // SQLite) took 9.0 µs of CPU per delivery with 2 ms and 9.7 with 0, p99
            // 29-34 ms against 41-55 (bench/RESULTS.md, rooms).
            commit_delay_ms: 2,
            retention_per_room: 0,
            retention_interval_secs: 60,
            session_check_secs: 10,
            tls_cert: None,
            tls_key: None,
            allowed_origins: Vec::new(),
            frame_ancestors: Vec::new(),
            require_origin: false,
            trusted_proxies: Vec::new(),
            proxy_header: "x-forwarded-for".into(),
            max_header_bytes: 16 * 1024,
            handshake_timeout_secs: 10,
            rate_per_sec: 10,
            rate_burst: 20,
            rate_max_refusals: 50,
            max_connections_per_session: 1000,
            max_connections_per_ip: 0,
            max_failed_keys_per_minute: 20,
            failed_key_block_secs: 60,
            admin_token: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration file {0} does not exist")]
    MissingFile(PathBuf),
    #[error("invalid configuration: {}", crate::config_doc::describe(.0))]
    Invalid(Box<figment::Error>),
    #[error("invalid configuration: {key}: {problem} (set in {origin})")]
    Value {
        key: &'static str,
        problem: String,
        origin: String,
    },
}

impl Settings {
    /// Layer defaults, the file (when given), `WSCHAT_*` variables and `overrides`
    /// (the flags that were given, as a serializable struct with `None` for the others).
    pub fn load<O: Serialize>(file: Option<&Path>, overrides: &O) -> Result<Self, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Settings::default()));
        if let Some(file) = file {
            if !file.exists() {
                return Err(ConfigError::MissingFile(file.to_owned()));
            }
            figment = figment.merge(Toml::file(file));
        } else {
            // The quick start (`wschat serve`, no file) gets a demo session. A deployment,
            // configured by a file, makes its own sessions, and a demo key printed under a
            // service manager would land in its log.
            figment = figment.merge(Serialized::default("demo_session", true));
        }
        crate::config_doc::warn_unknown_env();
        figment = figment
            .merge(Env::prefixed("WSCHAT_").only(&crate::config_doc::parsed_env_keys()))
            .merge(crate::config_doc::RawEnv)
            .merge(Serialized::defaults(overrides));
        let settings: Self = figment
            .extract()
            .map_err(|e| ConfigError::Invalid(Box::new(e)))?;
        crate::config_doc::validate(&settings, &figment)?;
        Ok(settings)
    }

    pub fn auth_timeout(&self) -> Duration {
        Duration::from_secs(self.auth_timeout_secs)
    }

    pub fn write_delay(&self) -> Duration {
        Duration::from_millis(self.write_delay_ms)
    }

    pub fn commit_delay(&self) -> Duration {
        Duration::from_millis(self.commit_delay_ms)
    }

    pub fn ping_interval(&self) -> Duration {
        Duration::from_secs(self.ping_interval_secs.max(1))
    }
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_secs(self.idle_timeout_secs.max(1))
    }
    pub fn session_check_interval(&self) -> Duration {
        Duration::from_secs(self.session_check_secs.max(1))
    }
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs(self.shutdown_grace_secs)
    }
    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_secs(self.handshake_timeout_secs.max(1))
    }
}

/// A setting that must stay out of logs and `Debug` output (the admin token).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize)]
    struct Flags {
        #[serde(skip_serializing_if = "Option::is_none")]
        history_limit: Option<u32>,
    }

    /// Run `f` holding figment's Jail lock, which the test that sets `WSCHAT_*`
    /// variables holds too: settings loaded meanwhile would read them.
    #[allow(clippy::result_large_err)] // figment's Jail API returns figment::Error
    fn jailed(f: impl FnOnce()) {
        figment::Jail::expect_with(|_| {
            f();
            Ok(())
        });
    }

    #[test]
    fn file_then_flags_override_defaults() {
        // Inside a Jail: the environment test beside this one sets WSCHAT_* variables.
        jailed(|| {
            let dir = tempfile::tempdir().unwrap();
            let file = dir.path().join("wschat.toml");
            std::fs::write(&file, "history_limit = 7\nmax_message_bytes = 99\n").unwrap();
            let s = Settings::load(
                Some(&file),
                &Flags {
                    history_limit: None,
                },
            )
            .unwrap();
            assert_eq!((s.history_limit, s.max_message_bytes), (7, 99));
            let s = Settings::load(
                Some(&file),
                &Flags {
                    history_limit: Some(3),
                },
            )
            .unwrap();
            assert_eq!(s.history_limit, 3);
        });
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment's Jail API returns figment::Error
    fn environment_variables_override_the_file_and_others_are_ignored() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("w.toml", "history_limit = 7")?;
            jail.set_env("WSCHAT_HISTORY_LIMIT", "9");
            jail.set_env("WSCHAT_LOG_FORMAT", "json");
            let s = Settings::load(
                Some(Path::new("w.toml")),
                &Flags {
                    history_limit: None,
                },
            )
            .map_err(|e| e.to_string())?;
            assert_eq!(s.history_limit, 9);
            Ok(())
        });
    }

    #[test]
    fn security_keys_load_from_a_file() {
        // Inside a Jail: the environment test beside this one sets WSCHAT_* variables.
        jailed(|| {
            let dir = tempfile::tempdir().unwrap();
            let file = dir.path().join("wschat.toml");
            std::fs::write(
                &file,
                "allowed_origins = [\"https://chat.example\"]\ntls_cert = \"c.pem\"\ntls_key = \"k.pem\"\nrate_per_sec = 0\n",
            )
            .unwrap();
            let none = Flags {
                history_limit: None,
            };
            let s = Settings::load(Some(&file), &none).unwrap();
            assert_eq!(s.allowed_origins, vec!["https://chat.example".to_owned()]);
            assert_eq!(s.tls_cert.as_deref(), Some(Path::new("c.pem")));
            assert_eq!(s.tls_key.as_deref(), Some(Path::new("k.pem")));
            assert_eq!(s.rate_per_sec, 0);
            // With no file: the defaults, and the quick start's demo session.
            let s = Settings::load(None, &none).unwrap();
            assert_eq!(
                s,
                Settings {
                    demo_session: true,
                    ..Settings::default()
                }
            );
            assert!(!Settings::load(Some(&file), &none).unwrap().demo_session);
        });
    }

    /// Load `file` with no flags.
    fn load(file: &Path) -> Result<Settings, ConfigError> {
        let flags = Flags {
            history_limit: None,
        };
        Settings::load(Some(file), &flags)
    }

    /// The error of loading `file` (with no flags), as printed.
    fn load_error(file: &Path) -> String {
        load(file).unwrap_err().to_string()
    }

    #[test]
    fn unknown_key_names_key_and_file() {
        // Inside a Jail: the environment test beside this one sets WSCHAT_* variables.
        jailed(|| {
            let dir = tempfile::tempdir().unwrap();
            let file = dir.path().join("bad.toml");
            std::fs::write(&file, "histroy_limit = 7\n").unwrap();
            let err = load_error(&file);
            assert!(err.contains("histroy_limit"), "{err}");
            assert!(err.contains("bad.toml"), "{err}");
        });
    }

    #[test]
    fn values_serve_would_refuse_are_refused_with_their_key_and_file() {
        // Inside a Jail: the environment test beside this one sets WSCHAT_* variables.
        jailed(|| {
            let dir = tempfile::tempdir().unwrap();
            let file = dir.path().join("wschat.toml");
            for (text, key) in [
                (
                    "allowed_origins = [\"https://x/chat\"]\n",
                    "allowed_origins",
                ),
                ("allowed_origins = [\"https://x:abc\"]\n", "allowed_origins"),
                (
                    "frame_ancestors = [\"https://app/page\"]\n",
                    "frame_ancestors",
                ),
                ("require_origin = true\n", "require_origin"),
                ("trusted_proxies = [\"proxy.example\"]\n", "trusted_proxies"),
                ("proxy_header = \"x-real-ip\"\n", "proxy_header"),
                ("tls_cert = \"/etc/cert.pem\"\n", "needs tls_key"),
                ("max_history_page = 0\n", "max_history_page"),
                ("max_message_bytes = 0\n", "max_message_bytes"),
                ("database = \"mysql://h/db\"\n", "database"),
                ("database = \"sqlite::memory:\"\n", "in-memory"),
                ("broker = \"redis://h\"\n", "broker"),
                ("broker = \"postgres\"\n", "broker"),
                ("broker = \"nats://127.0.0.1:4222\"\n", "broker"),
                ("max_rooms_per_connection = 0\n", "max_rooms_per_connection"),
                (
                    "ws_read_buffer_bytes = 1073741824\n",
                    "ws_read_buffer_bytes",
                ),
                ("ws_read_buffer_bytes = 0\n", "ws_read_buffer_bytes"),
                ("ws_write_buffer_bytes = 0\n", "ws_write_buffer_bytes"),
                ("max_header_bytes = 64\n", "max_header_bytes"),
                ("outbound_queue_bytes = 0\n", "outbound_queue_bytes"),
                (
                    "max_message_bytes = 1048576\noutbound_queue_bytes = 4194304\n",
                    "outbound_queue_bytes",
                ),
                (
                    "ping_interval_secs = 0\nidle_timeout_secs = 1\n",
                    "idle_timeout_secs",
                ),
                ("auth_timeout_secs = 0\n", "auth_timeout_secs"),
                ("max_commit_batch = 1000001\n", "max_commit_batch"),
                (
                    "shutdown_grace_secs = 18446744073709551615\n",
                    "shutdown_grace_secs",
                ),
                (
                    "session_check_secs = 9300000000000000000\n",
                    "session_check_secs",
                ),
                ("write_delay_ms = 86400001\n", "write_delay_ms"),
                ("admin_token = \"0123456789abcdef0123\\n\"\n", "admin_token"),
            ] {
                std::fs::write(&file, text).unwrap();
                let err = load_error(&file);
                assert!(err.contains(key), "{text}: {err}");
                assert!(err.contains("wschat.toml"), "{text}: {err}");
            }
            std::fs::write(
                &file,
                "allowed_origins = [\"https://x:443\"]\nproxy_header = \"Forwarded\"\n",
            )
            .unwrap();
            let ok = load(&file);
            assert!(ok.is_ok(), "{ok:?}");
        });
    }
}
