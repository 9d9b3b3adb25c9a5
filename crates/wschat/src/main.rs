//! The `wschat` binary: `serve`, `migrate`, `session create`, `config`, `load`.

mod ops_flags;

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use serde::Serialize;
use wschat_server::store;
use wschat_server::{Application, Settings};

/// glibc's malloc cost the server about a fifth of its CPU under load (arenas shared by
/// the worker threads, consolidation of the commit path's freed buffers); mimalloc's
/// per-thread heaps do not (bench/RESULTS.md, persist).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc returns freed pages to the OS only after a delay, and only on later allocator
/// activity, so memory freed by a burst of connects (hyper's 8 KiB request buffer, the
/// session lookup) stayed resident: 33.8 KiB per idle connection, 12.1 KiB with immediate
/// purging, and the same CPU per delivery (bench/RESULTS.md, idle). An operator's
/// `MIMALLOC_PURGE_DELAY` wins.
#[allow(unsafe_code)]
fn tune_allocator() {
    /// `mi_option_purge_delay`: in mimalloc v3's `mi_option_e` it directly precedes the
    /// entry libmimalloc-sys names `mi_option_use_numa_nodes` (it names none for this).
    const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t =
        libmimalloc_sys::mi_option_use_numa_nodes - 1;
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: called first thing in `main`, before any other thread exists
        // (mi_option_set is not thread safe); an option index out of range is ignored
        // by mimalloc, never undefined behaviour.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 0) }
    }
}

/// Transparent huge pages off for the process, unless the operator set
/// `MIMALLOC_ALLOW_THP`: mimalloc asks the kernel for them on its arenas, and the first
/// touch of each 2 MiB page zeroes all of it. A burst of connects into a fresh server spent
/// 30 % of its CPU in the kernel's `clear_page_erms` under those faults (perf, 2026-12-04);
/// 5,000 connects at once went in at 5,000–5,600 a second with them, 7,900–8,900 without
/// (bench/RESULTS.md, connect).
fn no_transparent_huge_pages() {
    if std::env::var_os("MIMALLOC_ALLOW_THP").is_none() {
        // A kernel without this prctl serves as before.
        let _not_fatal = rustix::thread::disable_transparent_huge_pages(true);
    }
}

#[derive(Parser)]
#[command(
    name = "wschat",
    version,
    about = "A real-time chat server (nodejschat-compatible)"
)]
struct Cli {
    /// Log format.
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "text",
        env = "WSCHAT_LOG_FORMAT"
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server.
    Serve(Box<ServeArgs>),
    /// Apply the database migrations.
    Migrate {
        #[arg(long, default_value = "sqlite://wschat.db", env = "WSCHAT_DATABASE")]
        database: String,
    },
    /// Manage sessions.
    Session {
        #[command(subcommand)]
        command: SessionCommand,
    },
    /// Load, latency and loss client. Exits 3 when deliveries were lost, v1 sends went
    /// unanswered or were refused, or loss could have gone uncounted (connections that
    /// never connected, gave up or were away at the end, joins refused, messages never
    /// sent, connection tasks that did not report).
    Load(wschat_load::LoadArgs),
    /// Print the settings: every default, or those in effect.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Print a commented TOML file with every setting, its description and its default.
    Defaults,
    /// Check the settings `serve` would use with these flags (file, environment, flags)
    /// and print them; exits non-zero naming the bad key when they are invalid.
    Check(Box<ServeArgs>),
}

#[derive(Subcommand)]
enum SessionCommand {
    /// Create a session; prints its key, and nothing else, on stdout.
    Create {
        #[arg(long, default_value = "sqlite://wschat.db", env = "WSCHAT_DATABASE")]
        database: String,
        /// The name shown with the session's messages.
        #[arg(long)]
        user: String,
        /// The one room the session may use (nodejschat's `room` column).
        #[arg(long)]
        room: Option<i64>,
        /// Use this key instead of a random one.
        #[arg(long)]
        key: Option<String>,
    },
}

/// The flags of `serve`; each given one overrides the file and the environment.
#[derive(clap::Args, Serialize)]
struct ServeArgs {
    /// A TOML file with settings (keys are these flags' names in snake_case).
    #[arg(long, env = "WSCHAT_CONFIG")]
    #[serde(skip)]
    config: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:56412].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    listen: Option<String>,
    /// Database URL [default: sqlite://wschat.db].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    database: Option<String>,
    /// Broker: `auto`, `local`, `postgres` or `nats://HOST:PORT` [default: auto].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    broker: Option<String>,
    /// Do not apply migrations at start (`--no-migrate=false` overrides a file's `true`).
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    #[serde(skip_serializing_if = "Option::is_none")]
    no_migrate: Option<bool>,
    /// Messages sent on join without `since` [default: 100].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    history_limit: Option<u32>,
    /// Longest message text in bytes [default: 16384].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    max_message_bytes: Option<usize>,
    /// PEM certificate chain: serve https/wss (with --tls-key); reloaded on SIGHUP.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    tls_key: Option<PathBuf>,
    /// An origin (scheme://host[:port]) whose pages may open WebSockets; repeatable. When
    /// given, handshakes from any other Origin get 403.
    #[arg(long = "allowed-origin", value_name = "ORIGIN")]
    #[serde(rename = "allowed_origins", skip_serializing_if = "Vec::is_empty")]
    allowed_origin: Vec<String>,
    /// An origin (scheme://host[:port]) whose pages may show the chat page in a frame;
    /// repeatable. Without it no page may.
    #[arg(long = "frame-ancestor", value_name = "ORIGIN")]
    #[serde(rename = "frame_ancestors", skip_serializing_if = "Vec::is_empty")]
    frame_ancestor: Vec<String>,
    /// Refuse handshakes without an Origin header (403); `--require-origin=false`
    /// overrides a file's `true`.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    #[serde(skip_serializing_if = "Option::is_none")]
    require_origin: Option<bool>,
    /// A proxy (CIDR or address) whose --proxy-header is believed; repeatable.
    #[arg(long = "trusted-proxy", value_name = "CIDR")]
    #[serde(rename = "trusted_proxies", skip_serializing_if = "Vec::is_empty")]
    trusted_proxy: Vec<String>,
    /// The header the trusted proxies write: x-forwarded-for or forwarded [default:
    /// x-forwarded-for].
    #[arg(long, value_name = "HEADER")]
    #[serde(skip_serializing_if = "Option::is_none")]
    proxy_header: Option<String>,
    /// Frames per second per connection; 0 = unlimited [default: 10].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    rate_per_sec: Option<u32>,
    /// Burst above the rate [default: 20].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    rate_burst: Option<u32>,
    /// Rate refusals in 10 s before close 1008; 0 = never close [default: 50].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    rate_max_refusals: Option<u32>,
    /// Open WebSockets per session key; 0 = unlimited [default: 1000].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    max_connections_per_session: Option<usize>,
    /// Open WebSockets per client address; 0 = unlimited [default: 0].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    max_connections_per_ip: Option<usize>,
    /// Unknown session keys per address per minute before 429; 0 = no limit [default: 20].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    max_failed_keys_per_minute: Option<u32>,
    /// Largest HTTP request head in bytes (1024 to 1 MiB) [default: 16384].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    max_header_bytes: Option<usize>,
    /// Seconds for the TLS handshake and for each request head [default: 10].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    handshake_timeout_secs: Option<u64>,
    #[command(flatten)]
    #[serde(flatten)]
    ops: ops_flags::OpsFlags,
}

/// Libraries that would log frame payloads or request lines (session keys, message
/// bodies) at debug or trace level are capped at info, whatever `RUST_LOG` says.
const CAPPED: &[&str] = &[
    "tungstenite=info",
    "tokio_tungstenite=info",
    "hyper=info",
    "hyper_util=info",
    "h2=info",
    "axum=info",
    "tower_http=info",
    "sqlx=warn",
];

/// Log lines are written to stderr by a thread of their own
/// (`tracing_appender::non_blocking`), not by the thread that logs: a runtime thread never
/// waits for a slow reader of the logs (a pipe to journald or docker), and lines that
/// arrive together (a burst of connects) go out in one write. Past 16,384 waiting lines,
/// new ones are dropped rather than stall the server. The guard writes what is waiting
/// when it is dropped: keep it until the process ends.
fn init_logging(format: LogFormat) -> tracing_appender::non_blocking::WorkerGuard {
    let mut filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    for directive in CAPPED {
        if let Ok(directive) = directive.parse() {
            filter = filter.add_directive(directive);
        }
    }
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .buffered_lines_limit(LOG_LINES_WAITING)
        .lossy(true)
        .finish(std::io::BufWriter::with_capacity(
            LOG_WRITE_BYTES,
            std::io::stderr(),
        ));
    // Colours only on a terminal: a file, a pipe or journald gets plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(writer);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    guard
}

/// Most bytes of log lines put into one write to stderr.
const LOG_WRITE_BYTES: usize = 64 * 1024;
/// Most log lines waiting for the writer thread; past it, new lines are dropped. The queue
/// is allocated whole at start (32 bytes a line): tracing-appender's default of 128,000
/// lines was 4 MiB of every server's idle memory.
const LOG_LINES_WAITING: usize = 16 * 1024;

fn main() -> anyhow::Result<()> {
    tune_allocator();
    no_transparent_huge_pages();
    let cli = Cli::parse();
    let log_guard = init_logging(cli.log_format);
    let runtime = tokio::runtime::Runtime::new().context("starting the runtime")?;
    let outcome = runtime.block_on(async move {
        match cli.command {
            Command::Serve(args) => serve(*args).await.map(|()| Outcome::Done),
            Command::Migrate { database } => {
                let store = store::open(&database).await?;
                store.migrate().await?;
                eprintln!("migrations applied to {}", store::redact_url(&database));
                Ok(Outcome::Done)
            }
            Command::Session {
                command:
                    SessionCommand::Create {
                        database,
                        user,
                        room,
                        key,
                    },
            } => {
                let store = store::open(&database).await?;
                store.migrate().await?;
                let key = key.unwrap_or_else(store::generate_key);
                store
                    .create_session(&store::hash_key(&key), &user, room)
                    .await?;
                println!("{key}");
                Ok(Outcome::Done)
            }
            Command::Config {
                command: ConfigCommand::Defaults,
            } => {
                print!("{}", wschat_server::config_doc::defaults_toml());
                Ok(Outcome::Done)
            }
            Command::Config {
                command: ConfigCommand::Check(args),
            } => {
                let settings = Settings::load(args.config.as_deref(), &args)?;
                // What `serve` reads at start besides the settings: the TLS files.
                wschat_server::tls::Tls::from_settings(
                    settings.tls_cert.as_deref(),
                    settings.tls_key.as_deref(),
                )?;
                print!("{}", wschat_server::config_doc::effective_toml(&settings));
                Ok(Outcome::Done)
            }
            Command::Load(args) => {
                let report = wschat_load::run(args).await?;
                Ok(match report.failure() {
                    Some(why) => {
                        eprintln!("wschat load: {why}");
                        Outcome::LoadFailed
                    }
                    None => Outcome::Done,
                })
            }
        }
    });
    // What is logged is written out before `main` returns, with an error or not, or exits 3.
    drop(runtime);
    drop(log_guard);
    match outcome? {
        Outcome::Done => Ok(()),
        Outcome::LoadFailed => std::process::exit(3),
    }
}

/// How a command that did not fail ended.
enum Outcome {
    Done,
    /// `wschat load` counted lost messages, unanswered sends or missing figures
    /// (`Report::failure`): exit status 3.
    LoadFailed,
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    // Handlers go in before anything listens: a SIGTERM that arrives as soon as the
    // server answers must drain it, never kill it with the default disposition.
    let mut signals = StopSignals::install().context("installing signal handlers")?;
    let settings = Settings::load(args.config.as_deref(), &args)?;
    let app = Application::build(settings).await?;
    let addr = app.local_addr()?;
    tracing::info!(%addr, "listening");
    if let Some(key) = app.demo_key() {
        let at = reachable(addr);
        println!();
        println!("  wschat is running. A demo session was created; open the chat page:");
        println!("    http://{at}/chat?session_key={key}");
        println!("  WebSocket (protocol v1): ws://{at}/ws?session_key={key}");
        println!();
    }
    let token = app.shutdown_token();
    let hurry = app.hurry_token();
    tokio::spawn(async move {
        signals.next().await;
        tracing::info!("signal received: shutting down (a second SIGTERM or SIGINT stops waiting)");
        token.cancel();
        signals.next().await;
        tracing::warn!("second signal: stopping without waiting for connections and commits");
        hurry.cancel();
    });
    app.run().await?;
    Ok(())
}

/// Where a browser on this machine reaches a server listening on `addr`, as a URL's
/// authority: the loopback address of its family for an unspecified one, an IPv6
/// address in brackets.
fn reachable(addr: std::net::SocketAddr) -> std::net::SocketAddr {
    match addr.ip() {
        std::net::IpAddr::V4(ip) if ip.is_unspecified() => {
            std::net::SocketAddr::from(([127, 0, 0, 1], addr.port()))
        }
        std::net::IpAddr::V6(ip) if ip.is_unspecified() => {
            std::net::SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, addr.port()))
        }
        _ => addr,
    }
}

/// SIGTERM and SIGINT, registered at once: the first stops the server gracefully, a
/// second ends the stop without waiting. SIGHUP too, only recorded: one during start-up (a
/// deploy tool's reload while the store is opened or migrated) must not end the process
/// by the signal's default action, and the server's own handler (a TLS reload, or a log
/// line) takes over once it runs.
struct StopSignals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    _only_recorded: tokio::signal::unix::Signal,
}

impl StopSignals {
    fn install() -> std::io::Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            _only_recorded: signal(SignalKind::hangup())?,
        })
    }

    /// The next SIGTERM or SIGINT.
    async fn next(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// Settings deliberately without a flag (a secret on a command line is visible to
    /// every user of the machine).
    const FILE_ONLY: &[&str] = &["admin_token"];

    #[test]
    fn the_demo_url_names_an_address_a_browser_can_open() {
        let at = |a: &str| reachable(a.parse().unwrap()).to_string();
        assert_eq!(at("0.0.0.0:56412"), "127.0.0.1:56412");
        assert_eq!(at("[::]:56412"), "[::1]:56412");
        assert_eq!(at("[::1]:56412"), "[::1]:56412");
        assert_eq!(at("10.1.2.3:80"), "10.1.2.3:80");
    }

    #[test]
    fn every_setting_has_a_flag_named_after_its_key() {
        let cli = Cli::command();
        let serve = cli.find_subcommand("serve").expect("serve");
        let flags: Vec<String> = serve
            .get_arguments()
            .filter_map(|a| a.get_long())
            .map(str::to_owned)
            .collect();
        for key in wschat_server::config_doc::keys() {
            if FILE_ONLY.contains(&key) {
                continue;
            }
            let flag = key.replace('_', "-");
            // A list key `allowed_origins` is the repeatable flag `--allowed-origin`.
            let singular = match flag.strip_suffix("ies") {
                Some(stem) => format!("{stem}y"),
                None => flag.strip_suffix('s').unwrap_or(&flag).to_owned(),
            };
            assert!(
                flags.contains(&flag) || flags.contains(&singular),
                "setting {key} has no flag --{flag} (or list it in FILE_ONLY)"
            );
        }
    }
}
