//! The settings' documentation in one place: `wschat config defaults` prints it as a
//! commented TOML file, the environment provider accepts exactly these keys
//! (`WSCHAT_<KEY>`), and the tests check that every field of [`Settings`] is listed here
//! and that the printed file reads back as `Settings::default()`.
//!
//! Adding a setting: add the field to `Settings` (and its default), then a line here; the
//! tests fail until both exist.

use figment::Figment;

use crate::config::{ConfigError, Settings};

/// Every setting, in the order `wschat config defaults` prints them, with a one-line
/// description.
pub const DOCS: &[(&str, &str)] = &[
    (
        "listen",
        "Address of the one listener: HTTP, the chat page and both WebSocket protocols (nodejschat's `port`).",
    ),
    (
        "database",
        "`sqlite://FILE` (embedded, one node) or `postgres://USER:PASSWORD@HOST/DB` (nodejschat's database connection).",
    ),
    (
        "broker",
        "Fan-out between nodes: `auto` (local on SQLite, postgres on PostgreSQL), `local`, `postgres` (LISTEN/NOTIFY) or `nats://HOST:PORT`.",
    ),
    (
        "nats_subject",
        "The NATS subject every node of one deployment publishes to and listens on.",
    ),
    (
        "no_migrate",
        "Do not apply the database migrations at start (`wschat migrate` does). A database that lacks one of this build's migrations then refuses the start.",
    ),
    (
        "demo_session",
        "On SQLite, create a demo session and print a chat URL (with its key) at start when the database has no session. Default: true when `serve` runs without a configuration file (the quick start), false with one: a deployment makes its own sessions, and a key printed under a service manager would land in its log.",
    ),
    (
        "history_limit",
        "Messages sent on join without `since`, and to a legacy client on connect.",
    ),
    ("max_history_page", "Largest page a v1 `history` request gets."),
    ("max_message_bytes", "Longest message text, in bytes (1 to 64 MiB)."),
    (
        "max_rooms_per_connection",
        "Rooms one v1 connection may be in at once (at least 1).",
    ),
    (
        "outbound_queue_bytes",
        "Bytes that may wait in one connection's outbound queue before it is closed with 4008 (slow consumer; it resumes). At least 8 × max_message_bytes and 64 KiB.",
    ),
    (
        "ws_read_buffer_bytes",
        "WebSocket read buffer per connection, in bytes (256 to 1 MiB); it grows for a larger frame. Small, because every idle connection holds one.",
    ),
    (
        "ws_write_buffer_bytes",
        "Most bytes of queued frames joined into one write to a connection's socket (a larger frame goes alone); 1 to 16 MiB.",
    ),
    (
        "write_delay_ms",
        "While the node is busy (write_delay_above_per_sec), a connection that gets frames more often than every this many milliseconds, that wrote less than that long ago, holds its next write until that long has passed, so the frames arriving meanwhile share one write: fewer system calls under load, at most this much added latency. A connection that gets a frame now and then writes at once. 0: never hold a write.",
    ),
    (
        "write_delay_above_per_sec",
        "The write delay applies while the node writes more than this many frames a second, and stops when it falls under half of that. 0: always.",
    ),
    (
        "auth_timeout_secs",
        "Seconds a v1 client has to send `auth` when the key was not in the handshake. Also the longest a key's lookup in the store may take, on either endpoint (then 503, or close 1013). At least 1.",
    ),
    (
        "ping_interval_secs",
        "Seconds between the WebSocket pings the server sends.",
    ),
    (
        "idle_timeout_secs",
        "A connection from which nothing (not even a pong) arrives for this many seconds is closed; must exceed ping_interval_secs.",
    ),
    (
        "shutdown_grace_secs",
        "Upper bound, in seconds, of a graceful stop (SIGTERM); an idle server stops at once.",
    ),
    (
        "commit_delay_ms",
        "SQLite only: while the node is busy (write_delay_above_per_sec), a commit starts at most this many milliseconds after the previous one started, so the sends arriving meanwhile share its transaction and its flush to disk: less CPU per message under load, at most this much added latency. A quiet node commits at once. 0: commit as soon as the previous commit returns. On PostgreSQL the flush is the database server's and commits start at once.",
    ),
    (
        "max_commit_batch",
        "Most messages committed in one transaction (a batch is whatever queued during the previous commit). At most 1,000,000.",
    ),
    (
        "retention_per_room",
        "Messages kept per room (older ones are deleted); 0 keeps everything.",
    ),
    (
        "retention_interval_secs",
        "Seconds between two applications of retention_per_room.",
    ),
    (
        "session_check_secs",
        "Seconds between checks of open connections' sessions: a deleted or expired session row closes its connections (1008) within this time.",
    ),
    (
        "tls_cert",
        "PEM certificate chain; with tls_key, the listener serves https/wss. Reloaded on SIGHUP.",
    ),
    ("tls_key", "PEM private key of tls_cert."),
    (
        "allowed_origins",
        "Origins (scheme://host[:port]) whose pages may open WebSockets; when not empty, any other Origin (or null) gets 403.",
    ),
    (
        "require_origin",
        "Refuse (403) handshakes without an Origin header (with allowed_origins).",
    ),
    (
        "frame_ancestors",
        "Origins (scheme://host[:port]) whose pages may show the chat page in a frame; empty: none may.",
    ),
    (
        "trusted_proxies",
        "Proxies (CIDR or address) whose proxy_header gives the client address.",
    ),
    (
        "proxy_header",
        "The header the trusted proxies write, x-forwarded-for or forwarded (RFC 7239); only that one is read (a proxy passes the other through as the client sent it).",
    ),
    (
        "max_header_bytes",
        "Largest HTTP request head, in bytes (1024 to 1 MiB); over it: 431.",
    ),
    (
        "handshake_timeout_secs",
        "Seconds a client has for the TLS handshake, then for its request head.",
    ),
    (
        "rate_per_sec",
        "Frames a connection may send per second (token bucket); 0 = unlimited.",
    ),
    ("rate_burst", "Frames a connection may send at once above the rate."),
    (
        "rate_max_refusals",
        "Frames refused for the rate within 10 s after which the connection is closed (1008); 0 = never.",
    ),
    (
        "max_connections_per_session",
        "Open WebSockets per session key; 0 = unlimited. Over it: 429.",
    ),
    (
        "max_connections_per_ip",
        "Open WebSockets per client address (IPv6: per /64); 0 = unlimited.",
    ),
    (
        "max_failed_keys_per_minute",
        "Unknown session keys per client address per minute before the address gets 429; 0 = no limit.",
    ),
    (
        "failed_key_block_secs",
        "Seconds an address that tried too many unknown keys is refused.",
    ),
    (
        "admin_token",
        "Bearer token of the admin API (/admin/v1/...), at least 16 characters; unset, the admin API is off (404).",
    ),
];

/// Variables with the `WSCHAT_` prefix that are not settings: the binary's own options
/// and the test suites'.
const OTHER_ENV: &[&str] = &["LOG_FORMAT", "CONFIG"];
const OTHER_ENV_PREFIXES: &[&str] = &["TEST_", "FAULT_"];

/// The settings' keys (the file's keys; `WSCHAT_<KEY>` in the environment).
pub fn keys() -> Vec<&'static str> {
    DOCS.iter().map(|(key, _)| *key).collect()
}

/// Keys whose `WSCHAT_<KEY>` variable is taken as a plain string, never parsed as a
/// number or a list: string settings (a token `0123…` keeps its leading zero) and
/// optional string settings, listed here.
const RAW_ENV_OPTIONAL: &[&str] = &["admin_token", "tls_cert", "tls_key"];

fn raw_env_keys() -> Vec<&'static str> {
    let defaults = serde_json::to_value(Settings::default()).unwrap_or_default();
    keys()
        .into_iter()
        .filter(|k| defaults.get(k).is_some_and(|v| v.is_string()) || RAW_ENV_OPTIONAL.contains(k))
        .collect()
}

/// Keys whose variable figment parses (numbers, booleans, `[a, b]` lists).
pub(crate) fn parsed_env_keys() -> Vec<&'static str> {
    let raw = raw_env_keys();
    keys().into_iter().filter(|k| !raw.contains(k)).collect()
}

/// The `WSCHAT_<KEY>` variables of string settings, unparsed.
pub(crate) struct RawEnv;

impl figment::Provider for RawEnv {
    fn metadata(&self) -> figment::Metadata {
        figment::Metadata::named("`WSCHAT_` environment variable(s)").interpolater(
            |_: &figment::Profile, k: &[&str]| {
                k.iter()
                    .map(|k| k.to_ascii_uppercase())
                    .collect::<Vec<_>>()
                    .join(".")
            },
        )
    }

    fn data(
        &self,
    ) -> Result<figment::value::Map<figment::Profile, figment::value::Dict>, figment::Error> {
        let mut dict = figment::value::Dict::new();
        for key in raw_env_keys() {
            if let Ok(value) = std::env::var(env_name(key)) {
                dict.insert(key.to_owned(), figment::value::Value::from(value));
            }
        }
        Ok(figment::Profile::Default.collect(dict))
    }
}

/// A figment error as an operator reads it: each problem with its key and where the
/// value came from (the file's path, `WSCHAT_<KEY>`, or a flag).
pub fn describe(error: &figment::Error) -> String {
    let problems: Vec<String> = error
        .clone()
        .into_iter()
        .map(|e| {
            let key = e.path.join(".");
            let origin = origin(e.metadata.as_ref(), &key);
            match &e.kind {
                figment::error::Kind::UnknownField(field, _) => format!(
                    "unknown key `{field}` in {origin} (`wschat config defaults` lists every key)"
                ),
                other if key.is_empty() => format!("{other} (in {origin})"),
                other => format!("{key}: {other} (in {origin})"),
            }
        })
        .collect();
    problems.join("; ")
}

/// Where a value came from, as an operator names it.
fn origin(metadata: Option<&figment::Metadata>, key: &str) -> String {
    match metadata {
        Some(md) if md.name.contains("environment") => env_name(key),
        Some(md) => match &md.source {
            Some(figment::Source::File(path)) => path.display().to_string(),
            _ if md.name.contains("Settings") => "the defaults".into(),
            _ => "a command-line flag".into(),
        },
        None => "the defaults".into(),
    }
}

/// The environment variable of a key.
pub fn env_name(key: &str) -> String {
    format!("WSCHAT_{}", key.to_ascii_uppercase())
}

/// `WSCHAT_*` variables that name no setting (a typo is otherwise silently ignored).
pub fn unknown_env() -> Vec<String> {
    let keys = keys();
    std::env::vars_os()
        .filter_map(|(name, _)| name.into_string().ok())
        .filter(|name| {
            let Some(rest) = name.strip_prefix("WSCHAT_") else {
                return false;
            };
            !keys.iter().any(|k| k.eq_ignore_ascii_case(rest))
                && !OTHER_ENV.contains(&rest)
                && !OTHER_ENV_PREFIXES.iter().any(|p| rest.starts_with(p))
        })
        .collect()
}

pub(crate) fn warn_unknown_env() {
    for name in unknown_env() {
        tracing::warn!(variable = %name, "environment variable names no setting; ignored");
    }
}

/// The longest `*_secs` setting accepted: ten years.
const MAX_SECS: u64 = 10 * 365 * 24 * 3600;
/// The longest `*_ms` setting accepted: a day.
const MAX_MS: u64 = 24 * 3600 * 1000;
/// The largest `max_commit_batch` accepted.
const MAX_COMMIT_BATCH: usize = 1_000_000;

/// Checks beyond the types: a value that would make the server misbehave stops it at
/// start, naming the key and where it was set.
pub(crate) fn validate(settings: &Settings, figment: &Figment) -> Result<(), ConfigError> {
    let origin = |key: &str| origin(figment.find_metadata(key), key);
    if let Some(token) = &settings.admin_token {
        if token.expose().chars().count() < 16 {
            return Err(ConfigError::Value {
                key: "admin_token",
                problem: "must be at least 16 characters (e.g. `openssl rand -hex 32`)".into(),
                origin: origin("admin_token"),
            });
        }
        // A request's token has its surrounding white space trimmed (HTTP does): a
        // configured one with some (a secret file written with `echo`) never matches.
        if token.expose().trim() != token.expose() {
            return Err(ConfigError::Value {
                key: "admin_token",
                problem: "starts or ends with white space (a newline from `echo`?); no request could match it".into(),
                origin: origin("admin_token"),
            });
        }
    }
    // Durations are added to the clock: one past these bounds would overflow it (a panic
    // in the task that adds it), and none is meant.
    let values = serde_json::to_value(settings).unwrap_or_default();
    for (key, _) in DOCS {
        let Some(value) = values.get(key).and_then(serde_json::Value::as_u64) else {
            continue;
        };
        let (max, unit) = if key.ends_with("_secs") {
            (MAX_SECS, "seconds (ten years)")
        } else if key.ends_with("_ms") {
            (MAX_MS, "milliseconds (a day)")
        } else {
            continue;
        };
        if value > max {
            return Err(ConfigError::Value {
                key,
                problem: format!("{value} is too long: at most {max} {unit}"),
                origin: origin(key),
            });
        }
    }
    // A client's `auth` deadline and a key lookup's bound: at 0 every v1 client that
    // authenticates by frame is closed at once, and lookups fail under any load.
    if settings.auth_timeout_secs == 0 {
        return Err(ConfigError::Value {
            key: "auth_timeout_secs",
            problem: "must be at least 1".into(),
            origin: origin("auth_timeout_secs"),
        });
    }
    // Sizes the commit queue (four batches): a larger one overflows it at start.
    if settings.max_commit_batch > MAX_COMMIT_BATCH {
        return Err(ConfigError::Value {
            key: "max_commit_batch",
            problem: format!(
                "{} is too large: at most {MAX_COMMIT_BATCH}",
                settings.max_commit_batch
            ),
            origin: origin("max_commit_batch"),
        });
    }
    // Sizes: at 0 a limit refuses everything, and a read buffer is allocated (and zeroed)
    // per connection, so a huge one exhausts memory with the first connections.
    let message = settings.max_message_bytes;
    let sizes: [(&'static str, usize, usize, usize, &str); 5] = [
        ("max_message_bytes", message, 1, 64 << 20, "64 MiB"),
        (
            "max_rooms_per_connection",
            settings.max_rooms_per_connection,
            1,
            usize::MAX,
            "",
        ),
        (
            "ws_read_buffer_bytes",
            settings.ws_read_buffer_bytes,
            256,
            1 << 20,
            "1 MiB: it is allocated for every connection",
        ),
        (
            "ws_write_buffer_bytes",
            settings.ws_write_buffer_bytes,
            1,
            16 << 20,
            "16 MiB",
        ),
        (
            "max_header_bytes",
            settings.max_header_bytes,
            1024,
            1 << 20,
            "1 MiB",
        ),
    ];
    for (key, value, min, max, why) in sizes {
        let problem = if value < min {
            format!("{value} is too small: at least {min}")
        } else if value > max {
            format!("{value} is too large: at most {why}")
        } else {
            continue;
        };
        return Err(ConfigError::Value {
            key,
            problem,
            origin: origin(key),
        });
    }
    // A message frame (its text JSON-escaped, up to six bytes a byte, and its envelope)
    // must fit in the queue, or a member that falls behind by one is closed with 4008,
    // and again each time it resumes.
    let queue_min = message.saturating_mul(8).max(64 * 1024);
    if settings.outbound_queue_bytes < queue_min {
        return Err(ConfigError::Value {
            key: "outbound_queue_bytes",
            problem: format!(
                "{} is too small: at least {queue_min} (8 × max_message_bytes, and 64 KiB)",
                settings.outbound_queue_bytes
            ),
            origin: origin("outbound_queue_bytes"),
        });
    }
    if settings.max_history_page == 0 {
        return Err(ConfigError::Value {
            key: "max_history_page",
            problem: "must be at least 1".into(),
            origin: origin("max_history_page"),
        });
    }
    // What `serve` would refuse at start, refused here with the key and its origin (so
    // that `config check` catches it too).
    if let Err(problem) =
        crate::http::origin::OriginPolicy::new(&settings.allowed_origins, settings.require_origin)
    {
        let key = if settings.allowed_origins.is_empty() {
            "require_origin"
        } else {
            "allowed_origins"
        };
        return Err(ConfigError::Value {
            key,
            problem,
            origin: origin(key),
        });
    }
    if let Some(problem) = settings
        .frame_ancestors
        .iter()
        .find_map(|o| crate::http::origin::normalize(o).err())
    {
        return Err(ConfigError::Value {
            key: "frame_ancestors",
            problem,
            origin: origin("frame_ancestors"),
        });
    }
    use crate::limits::proxy::{ProxyHeader, TrustedProxies};
    let header =
        ProxyHeader::parse(&settings.proxy_header).map_err(|problem| ConfigError::Value {
            key: "proxy_header",
            problem,
            origin: origin("proxy_header"),
        })?;
    if let Err(problem) = TrustedProxies::parse(&settings.trusted_proxies, header) {
        return Err(ConfigError::Value {
            key: "trusted_proxies",
            problem,
            origin: origin("trusted_proxies"),
        });
    }
    // The database and the broker, as `serve` would refuse them at start.
    if let Some(problem) = crate::store::url_problem(&settings.database) {
        return Err(ConfigError::Value {
            key: "database",
            problem: problem.into(),
            origin: origin("database"),
        });
    }
    if let Some(problem) = crate::broker::setup_problem(&settings.broker, &settings.database) {
        return Err(ConfigError::Value {
            key: "broker",
            problem: format!("{:?}: {problem}", settings.broker),
            origin: origin("broker"),
        });
    }
    if settings.tls_cert.is_some() != settings.tls_key.is_some() {
        // Named by the one that is set, where it was set.
        let (key, missing) = if settings.tls_cert.is_some() {
            ("tls_cert", "tls_key")
        } else {
            ("tls_key", "tls_cert")
        };
        return Err(ConfigError::Value {
            key,
            problem: format!("needs {missing} too (set both, or neither)"),
            origin: origin(key),
        });
    }
    // As used: each is at least a second.
    if settings.idle_timeout() <= settings.ping_interval() {
        return Err(ConfigError::Value {
            key: "idle_timeout_secs",
            problem: format!(
                "{} must exceed ping_interval_secs ({}), or live but quiet clients are closed (0 counts as 1)",
                settings.idle_timeout_secs, settings.ping_interval_secs
            ),
            origin: origin("idle_timeout_secs"),
        });
    }
    Ok(())
}

/// The commented TOML file `wschat config defaults` prints: every setting, its
/// description and its default.
pub fn defaults_toml() -> String {
    render(
        &Settings::default(),
        "# wschat settings, each with its default. Use with `wschat serve --config FILE`.\n\
         # Every key can also be set as an environment variable WSCHAT_<KEY> (for example\n\
         # WSCHAT_HISTORY_LIMIT=50), and most as a flag --<key-with-dashes> (see\n\
         # `wschat serve --help`): flags override the environment, which overrides this\n\
         # file. An unknown key or a bad value stops the server at start.\n",
    )
}

/// The settings in effect, as `wschat config check` prints them (secrets masked).
pub fn effective_toml(settings: &Settings) -> String {
    let mut shown = settings.clone();
    if shown.admin_token.is_some() {
        shown.admin_token = Some(crate::config::Secret::new("********"));
    }
    // Printed by `config check`, which the systemd unit runs (into the journal).
    shown.database = without_password(&shown.database);
    shown.broker = without_password(&shown.broker);
    render(
        &shown,
        "# wschat settings in effect (defaults, then the file, WSCHAT_* variables and flags).\n",
    )
}

/// `url` with the password in its user part (`scheme://user:PASSWORD@host`) and in a
/// `password=` query parameter replaced by `********`.
fn without_password(url: &str) -> String {
    const HIDDEN: &str = "********";
    let mut out = url.to_owned();
    if let Some(scheme_end) = out.find("://") {
        let authority_start = scheme_end + 3;
        let authority_end = out[authority_start..]
            .find(['/', '?', '#'])
            .map_or(out.len(), |i| authority_start + i);
        if let Some(at) = out[authority_start..authority_end].rfind('@') {
            let userinfo = authority_start..authority_start + at;
            if let Some(colon) = out[userinfo.clone()].find(':') {
                out.replace_range(userinfo.start + colon + 1..userinfo.end, HIDDEN);
            }
        }
    }
    if let Some(query_start) = out.find('?') {
        let mut query: Vec<String> = out[query_start + 1..]
            .split('&')
            .map(str::to_owned)
            .collect();
        for pair in &mut query {
            if pair.starts_with("password=") {
                *pair = format!("password={HIDDEN}");
            }
        }
        out.replace_range(query_start + 1.., &query.join("&"));
    }
    out
}

fn render(settings: &Settings, header: &str) -> String {
    let values = serde_json::to_value(settings).unwrap_or_default();
    let mut out = String::from(header);
    for (key, doc) in DOCS {
        out.push('\n');
        for line in wrap(doc, 86) {
            out.push_str("# ");
            out.push_str(&line);
            out.push('\n');
        }
        match values.get(key) {
            Some(serde_json::Value::Null) | None => {
                out.push_str(&format!("# {key} = (unset)\n"));
            }
            Some(value) => out.push_str(&format!("{key} = {}\n", toml_value(value))),
        }
    }
    out
}

/// A JSON value as TOML (the JSON forms of strings, numbers, booleans and arrays are
/// valid TOML).
fn toml_value(value: &serde_json::Value) -> String {
    match value {
        serde_json::Value::Array(items) => {
            let items: Vec<String> = items.iter().map(toml_value).collect();
            format!("[{}]", items.join(", "))
        }
        serde_json::Value::Object(map) => {
            let fields: Vec<String> = map
                .iter()
                .map(|(k, v)| format!("{k} = {}", toml_value(v)))
                .collect();
            format!("{{ {} }}", fields.join(", "))
        }
        other => other.to_string(),
    }
}

fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines = Vec::new();
    let mut line = String::new();
    for word in text.split_whitespace() {
        if !line.is_empty() && line.len() + 1 + word.len() > width {
            lines.push(std::mem::take(&mut line));
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(word);
    }
    if !line.is_empty() {
        lines.push(line);
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;
    use figment::providers::{Format, Toml};

    #[test]
    fn every_setting_is_documented_once_and_nothing_else() {
        let value = serde_json::to_value(Settings::default()).unwrap();
        let fields: std::collections::BTreeSet<&str> = value
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        let documented: std::collections::BTreeSet<&str> = keys().into_iter().collect();
        assert_eq!(documented.len(), DOCS.len(), "a key is documented twice");
        let undocumented: Vec<_> = fields.difference(&documented).collect();
        let unknown: Vec<_> = documented.difference(&fields).collect();
        assert!(
            undocumented.is_empty(),
            "add these settings to config_doc::DOCS: {undocumented:?}"
        );
        assert!(
            unknown.is_empty(),
            "DOCS names no such setting: {unknown:?}"
        );
        for (key, doc) in DOCS {
            assert!(!doc.trim().is_empty(), "{key} has no description");
        }
    }

    #[test]
    fn printed_defaults_parse_back_to_the_defaults() {
        let text = defaults_toml();
        let parsed: Settings = Figment::from(Toml::string(&text)).extract().unwrap();
        assert_eq!(parsed, Settings::default());
        for (key, _) in DOCS {
            assert!(
                text.lines().any(|l| l.starts_with(&format!("{key} = "))
                    || l.starts_with(&format!("# {key} = "))),
                "{key} missing from the printed file"
            );
        }
        assert!(text.contains("listen = \"127.0.0.1:56412\""), "{text}");
        assert!(text.contains("history_limit = 100"), "{text}");
    }

    #[test]
    fn a_set_optional_value_prints_as_toml() {
        assert_eq!(
            toml_value(&serde_json::json!(["https://a.example", "b\"c"])),
            r#"["https://a.example", "b\"c"]"#
        );
    }

    #[test]
    fn the_settings_in_effect_hide_passwords() {
        assert_eq!(
            without_password("postgres://wschat:s3cret@db.internal:5432/chat?sslmode=require"),
            "postgres://wschat:********@db.internal:5432/chat?sslmode=require"
        );
        assert_eq!(
            without_password("postgres://db/chat?user=w&password=s3cret&x=1"),
            "postgres://db/chat?user=w&password=********&x=1"
        );
        assert_eq!(
            without_password("nats://u:p@a@nats:4222"),
            "nats://u:********@nats:4222"
        );
        for kept in ["sqlite://wschat.db", "postgres://wschat@db/chat", "auto"] {
            assert_eq!(without_password(kept), kept);
        }
        let settings = Settings {
            database: "postgres://wschat:s3cret@db/chat".into(),
            broker: "nats://n:natspass@nats:4222".into(),
            admin_token: Some(crate::config::Secret::new("0123456789abcdef0123")),
            ..Settings::default()
        };
        let shown = effective_toml(&settings);
        for secret in ["s3cret", "natspass", "0123456789abcdef0123"] {
            assert!(!shown.contains(secret), "{secret} shown: {shown}");
        }
        assert!(
            shown.contains("postgres://wschat:********@db/chat"),
            "{shown}"
        );
    }

    #[test]
    fn wraps_long_descriptions() {
        let lines = wrap(&"word ".repeat(40), 20);
        assert!(lines.iter().all(|l| l.len() <= 20));
        assert_eq!(lines.join(" "), "word ".repeat(40).trim());
    }
}
