//! `wschat load`: a load, latency and loss client for wschat (protocol v1) and for
//! nodejschat-compatible servers (the legacy protocol).
//!
//! N connections each send on a **fixed, open-loop schedule** (Poisson: exponential gaps
//! with mean `--interval`, drawn before the run starts) for `--duration` seconds, then the
//! client waits up to `--drain` seconds for what is still in flight and reports. A message
//! that is due while its connection is down, or blocked, is sent as soon as it can be,
//! still carrying its intended time, so slow or absent service shows up as latency
//! (coordinated omission is not hidden).
//!
//! # What a message says
//!
//! Every text is `L|<run_id>|<conn>|<counter>|<intended_unix_micros>|<padding>` (see
//! [`text`]). Receivers ignore anything else, including other runs' messages.
//! Latency = time of first receipt − intended send time, in an hdrhistogram, for every
//! message the receiver was expected to get (legacy: also one that came only in a later
//! connection's history replay, outage included; and one whose sender sent it late, after
//! an outage of its own: that one is timed at the end, once its send time is known; not
//! history it was never expected to get, nor v1 history from before its first join). The
//! report also gives the send lag (intended send time → the client had written the message):
//! the part of the latency that is the client's own lateness, when it is too busy to keep
//! its schedule (or, for a message due while its connection was down, the outage).
//!
//! # What is expected of whom
//!
//! Deliveries are counted as distinct (message, receiving connection) pairs; the sender's
//! own copy counts when the sender also receives. `lost = expected − delivered`, and it is
//! never negative: a pair is delivered only if it was expected.
//!
//! **v1.** A message is identified by (room, seq), and checked by its tag. The room's
//! messages of this run are every (room, seq) that was acked to one of our senders, plus
//! every (room, seq) of ours that any receiver got (a message can be stored and delivered
//! while its sender was cut off before the ack). A receiving connection becomes a member of
//! its room at its first `joined`, whose `last_seq` is its base; a connection whose first
//! join comes only after the sending began (its first attempts failed) joins with `since`
//! = the room's head as the others first joined it, which is then its base, so that it
//! too is expected every message of the run. From then on it is
//! expected to receive every one of the room's messages of this run with seq above its
//! base, whether it is connected at the time or not: it reconnects with backoff (close
//! codes 1012, 4002, 4008 and the rate limit's 1008, an unasked `left`, a join or `auth`
//! answered `unavailable`, and any broken connection) and resumes each room with `since` =
//! the last seq it received, so what it gets on resume counts as delivered and what never comes
//! counts as lost. A member that gives up for good (its key refused on a reconnect, a
//! policy close other than the rate limit's) is still expected to receive every message
//! of its rooms: what it never got is lost, and its giving up fails the run. Messages sent and never acked nor seen
//! by anyone (`unacked`) were not stored, as far as anyone knows, and are expected of no
//! one (they fail the run all the same: see [`Report::failure`]); error frames that refuse
//! a send for good count as `refused` (which fails the run too). Retryable errors
//! (`unavailable`, `shutting_down`, `internal`, `rate_limited`; again after 200 ms,
//! doubling up to 1 s, or after 1 s, for as long as the run lasts) and sends that were
//! not acked before a reconnect are sent again with the same `client_msg_id`; two acks with
//! different seqs for one message count as `ack_conflicts`. `duplicated`: a (room, seq) of
//! ours a receiver got more than once, or one of our messages it got under a second seq
//! (the server stored a send twice: the text carries the sender and counter). Such a copy's
//! seq is left out of the room's messages (the first seq is the message), so a copy is
//! never a delivery; `out_of_order`: one that came after a higher seq of ours in the same
//! room at the same receiver.
//!
//! **legacy.** A message is identified by (sender, counter). The legacy protocol has no
//! ids, acks or resume, so a receiving connection is expected to receive a message when
//! it is in the sender's room and the message was sent while it was authenticated (from
//! its `{"authenticated":true}` to the moment it was lost; when we closed it on purpose
//! with `--churn`, what was sent in its last second counts, as expected and delivered,
//! only if it came, since it may still have been in flight; so does what was sent between
//! the upgrade and the `authenticated` frame). With one `--session-key` for all,
//! everyone is in one room; with `--keys` the rooms come from the session rows, which the
//! client cannot see: `--key-rooms N` says key i's session is in room i % N (as the
//! benchmarks insert them), so a connection that got nothing is still expected to get its
//! room's messages; without it they are inferred: a receiver that got any message of a
//! sender shares its room (transitively). Legacy connections reconnect too (with backoff, no
//! resume): what was sent while a connection was down is not expected of it; what the
//! server replays on reconnect counts as `replayed` if it was received before, and as
//! `unexpected` if it predates the connection. `duplicated`: a message received twice on
//! one connection; `out_of_order`: a sender's counter going back at one receiver within
//! one connection.
//!
//! **socketio.** The legacy protocol's frames carried as Socket.IO 4 events: the client
//! connects to the namespace `/` (`40`), counts the server's `40{…}` as
//! `{"authenticated":true}`, sends `42["message",{"message":TEXT}]`, reads each
//! `42["message",{…}]` as the legacy frame inside it and answers Engine.IO pings. It is
//! counted exactly as legacy.
//!
//! # When the wait after the send phase ends
//!
//! Never while a message is still due or unacknowledged, or a v1 connection is away
//! (reconnecting to resume). Then, v1: as soon as every member (joined, not given up) has
//! heard its room through the newest seq acknowledged to one of our senders, and not before,
//! however long the server goes quiet (a stalled fan-out is slow, not lossy, if it delivers
//! within `--drain`); legacy and socketio, which have no acks to know what is on its way
//! (and v1 when a member's session put it in a room `--rooms` does not name): once nothing
//! has arrived for a second. `--drain` bounds it; the report's `drain_end` says which ended
//! it (`all_heard`, `quiet`, `limit`). What a member has heard is the highest seq it got
//! (a server delivers each room in seq order): a v1 run whose members miss their rooms'
//! newest messages waits the whole `--drain`; one whose members miss only earlier ones
//! ends when the newest have come, and counts the rest lost.
//!
//! # Efficiency
//!
//! One tokio task per connection, 8 KiB WebSocket buffers, TCP_NODELAY, frames decoded
//! into borrowed views on the hot path (the typed [`wschat_protocol`] frames otherwise),
//! live counters in atomics, latencies in 16 shared histogram shards (a histogram per
//! task would cost ~100 KB × 10,000), and per-receiver records of about one bit per
//! delivery (`bits.rs`), merged when the run ends.

mod account;
mod bits;
mod conn;
mod progress;
mod report;
mod stats;
pub mod text;
mod tls;

use std::io::{BufWriter, Write as _};
use std::sync::atomic::{
    AtomicUsize,
    Ordering::{Acquire, Relaxed},
};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context as _};
use rand::{Rng, SeedableRng};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::account::{LegacyReceiver, LegacySender};
use crate::conn::{Config, Conn, Phase, PhaseBus, Plan, Shared};
use crate::stats::{new_histogram, Clock, Heard, Live, Sharded};

pub use crate::report::{DrainEnd, LatencyMs, Report};

/// Which protocol to speak.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// wschat protocol v1 (`/ws`): auth, join, send with acks, resume with `since`.
    V1,
    /// nodejschat's protocol: `?session_key=KEY`, `{"message": TEXT}`.
    Legacy,
    /// The legacy protocol's messages as Socket.IO 4 events (Engine.IO 4 over a
    /// WebSocket at `/socket.io/`): for Socket.IO chat servers such as
    /// `bench/peers/socketio`. Counted as legacy.
    #[value(name = "socketio")]
    SocketIo,
}

impl Protocol {
    fn as_str(self) -> &'static str {
        match self {
            Protocol::V1 => "v1",
            Protocol::Legacy => "legacy",
            Protocol::SocketIo => "socketio",
        }
    }
}

/// Options of `wschat load URL [options]`.
#[derive(clap::Args, Debug, Clone)]
pub struct LoadArgs {
    /// Server URL; several, comma-separated, spread connections round-robin over nodes.
    /// v1: ws://HOST:56412/ws; legacy: ws://HOST:56412/ (any path; `?session_key=` is added);
    /// socketio: ws://HOST:PORT/ (the path `/socket.io/` and Engine.IO's query are added
    /// when the URL's path is `/`).
    pub url: String,

    /// Protocol to speak.
    #[arg(long, value_enum, default_value_t = Protocol::V1)]
    pub protocol: Protocol,

    /// Number of connections.
    #[arg(long, short = 'n', default_value_t = 1)]
    pub connections: u32,

    /// One session key for every connection (like nodejschat's test client).
    #[arg(long, conflicts_with = "keys", required_unless_present = "keys")]
    pub session_key: Option<String>,

    /// A session key per connection: `{i}` is replaced by 1, 2, … (e.g. `k{i}`).
    #[arg(long)]
    pub keys: Option<String>,

    /// Legacy with `--keys`: the session of key i is in room i % N (as the benchmarks
    /// insert them). Each connection is then expected to receive its room's messages even
    /// if none reached it; without this, rooms are inferred from what arrives.
    #[arg(long, requires = "keys")]
    pub key_rooms: Option<u32>,

    /// Mean seconds between messages of one connection (Poisson arrivals); 0: never send.
    #[arg(long, default_value_t = 1.0)]
    pub interval: f64,

    /// Seconds of the sending phase.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,

    /// Most seconds to wait after the sending phase for in-flight deliveries. The wait
    /// ends sooner once nothing is due or unacknowledged, no v1 connection is away
    /// (reconnecting to resume), and then, v1: every member has heard its room through the
    /// newest acknowledged message; legacy (or v1 in a room --rooms does not name): nothing
    /// has arrived for a second. A v1 connection that cannot get back (its only node down),
    /// or a v1 member that never gets its room's newest acknowledged message, holds it to
    /// the end.
    #[arg(long, default_value_t = 10.0)]
    pub drain: f64,

    /// v1 rooms: a number N (connection i joins `r{i % N}`) or comma-separated names
    /// (connection i joins name i % count). Legacy: the session row decides.
    #[arg(long, default_value = "1")]
    pub rooms: String,

    /// New connections per second while connecting (0: all at once).
    #[arg(long, default_value_t = 1000.0)]
    pub ramp: f64,

    /// Print every sent text on stdout, one per line (nodejschat's test client output).
    #[arg(long)]
    pub print_sent: bool,

    /// Print the report as one JSON object on the last stdout line.
    #[arg(long)]
    pub json: bool,

    /// Close and reopen this fraction of the connections per second (v1 resumes).
    #[arg(long, default_value_t = 0.0)]
    pub churn: f64,

    /// The first N connections only send: they do not join, nor count as receivers.
    #[arg(long, default_value_t = 0)]
    pub send_only: u32,

    /// The connections after the `--send-only` ones only receive (do not send).
    #[arg(long)]
    pub receive_only: bool,

    /// Pad each message text to at least this many bytes.
    #[arg(long, default_value_t = 0)]
    pub size: usize,

    /// Seconds allowed for one connection attempt (TCP, upgrade, auth and join).
    #[arg(long, default_value_t = 10.0)]
    pub connect_timeout: f64,

    /// Seconds without any frame from the server (messages, acks, pings) after which a
    /// connection is taken for dead and dropped: v1 reconnects and resumes, legacy
    /// counts a disconnect and reconnects. wschat pings every 30 s, so a server that is
    /// paused or cut off is noticed. Default: 75 with v1; with legacy, 0 (wait forever),
    /// since a legacy server need not ping and a quiet room sends nothing.
    #[arg(long)]
    pub silence_timeout: Option<f64>,

    /// No progress line on stderr.
    #[arg(long)]
    pub no_progress: bool,

    /// Seed for the send schedules (the run id stays random).
    #[arg(long)]
    pub seed: Option<u64>,

    /// wss:// URLs: also trust the certificates in this PEM file (a private CA, or a
    /// self-signed server certificate), beside the web PKI's roots.
    #[arg(long, value_name = "PATH")]
    pub ca_file: Option<std::path::PathBuf>,

    /// wss:// URLs: accept any server certificate, unchecked (as nodejschat's test client
    /// did, with `rejectUnauthorized: false`). For tests against your own server only.
    #[arg(long)]
    pub insecure: bool,
}

impl LoadArgs {
    /// Parses `wschat load`'s arguments (without the program name), for tests and tools.
    pub fn parse_from<I, T>(args: I) -> Result<Self, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        use clap::Parser as _;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            args: LoadArgs,
        }
        let argv = std::iter::once(std::ffi::OsString::from("load"))
            .chain(args.into_iter().map(Into::into));
        Ok(Cli::try_parse_from(argv)?.args)
    }
}

/// The longest time an option may give: beyond it, the arithmetic on instants that the
/// run does with it could overflow (a panic in every connection task).
const A_YEAR_S: f64 = 365.0 * 86_400.0;

fn seconds(name: &str, v: f64) -> anyhow::Result<Duration> {
    if !v.is_finite() || v < 0.0 {
        bail!("--{name} must be a non-negative number of seconds, not {v}");
    }
    if v > A_YEAR_S {
        bail!("--{name} must be at most a year ({A_YEAR_S} seconds), not {v}");
    }
    Ok(Duration::from_secs_f64(v))
}

/// A rate: 0 (off) or at least once a year, and at most `max` a second if given.
fn rate(name: &str, what: &str, v: f64, max: Option<f64>) -> anyhow::Result<()> {
    let top = max.unwrap_or(f64::MAX);
    if !v.is_finite() || !(v == 0.0 || (1.0 / A_YEAR_S..=top).contains(&v)) {
        let most = max
            .map(|m| format!(" and at most {m} a second"))
            .unwrap_or_default();
        bail!("--{name} must be 0 or {what} of at least once a year{most}, not {v}");
    }
    Ok(())
}

/// The most messages the send schedules may hold (drawn before the run, 8 bytes each).
const MAX_SCHEDULED: f64 = 1e9;

fn room_names(spec: &str) -> anyhow::Result<Vec<String>> {
    let spec = spec.trim();
    if let Ok(n) = spec.parse::<u32>() {
        if n == 0 {
            bail!("--rooms must be at least 1");
        }
        return Ok((0..n).map(|i| format!("r{i}")).collect());
    }
    let names: Vec<String> = spec
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect();
    if names.is_empty() {
        bail!("--rooms: no room names in {spec:?}");
    }
    Ok(names)
}

/// Runs the load, prints the report (a summary for a person; with `--json`, one JSON line
/// last on stdout) and returns it.
pub async fn run(args: LoadArgs) -> anyhow::Result<Report> {
    let duration = seconds("duration", args.duration)?;
    let drain = seconds("drain", args.drain)?;
    let connect_timeout = seconds("connect-timeout", args.connect_timeout)?;
    let silence_timeout = seconds(
        "silence-timeout",
        args.silence_timeout
            .unwrap_or(if args.protocol == Protocol::V1 {
                75.0
            } else {
                0.0
            }),
    )?;
    seconds("interval", args.interval)?;
    rate("ramp", "a rate of connects", args.ramp, None)?;
    rate(
        "churn",
        "a fraction of the connections",
        args.churn,
        Some(1000.0),
    )?;
    let n = args.connections as usize;
    if n == 0 {
        bail!("--connections must be at least 1");
    }
    if args.interval > 0.0 {
        let scheduled = n as f64 * duration.as_secs_f64() / args.interval;
        if scheduled > MAX_SCHEDULED {
            bail!(
                "--interval {}: {n} connections for {} s would schedule about {scheduled:.0} messages, more than {MAX_SCHEDULED:.0}",
                args.interval,
                duration.as_secs_f64()
            );
        }
    }
    let key_for = |i: usize| -> anyhow::Result<String> {
        match (&args.session_key, &args.keys) {
            (Some(k), None) => Ok(k.clone()),
            (None, Some(p)) => Ok(p.replace("{i}", &(i + 1).to_string())),
            _ => bail!("give exactly one of --session-key and --keys"),
        }
    };
    key_for(0)?;
    let urls: Vec<String> = args
        .url
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect();
    if urls.is_empty() {
        bail!("no URL given");
    }
    for u in &urls {
        let probe = match args.protocol {
            Protocol::V1 => u.clone(),
            Protocol::Legacy => conn::legacy_url(u, "k"),
            Protocol::SocketIo => conn::socketio_url(u, "k"),
        };
        probe
            .as_str()
            .into_client_request()
            .with_context(|| format!("bad URL {u:?}"))?;
    }
    let rooms = room_names(&args.rooms)?;
    match args.key_rooms {
        Some(0) => bail!("--key-rooms must be at least 1"),
        Some(_) if args.protocol == Protocol::V1 => {
            bail!("--key-rooms is for the legacy protocols; v1 joins the rooms --rooms names")
        }
        _ => {}
    }

    // Raise the soft open-files limit to the hard one; fine to fail (small runs work).
    if let Err(e) = rlimit::increase_nofile_limit(u64::MAX) {
        tracing::warn!("could not raise RLIMIT_NOFILE: {e}");
    }

    let run_id = format!("{:012x}", rand::rng().random::<u64>() & 0xffff_ffff_ffff);
    let mut rng = match args.seed {
        Some(s) => rand::rngs::StdRng::seed_from_u64(s),
        None => rand::rngs::StdRng::from_rng(&mut rand::rng()),
    };
    let duration_us = duration.as_micros() as f64;
    let mean_us = args.interval * 1e6;
    let send_only = (args.send_only as usize).min(n);
    let schedules: Vec<Vec<u64>> = (0..n)
        .map(|i| {
            let mut s = Vec::new();
            if mean_us <= 0.0 || (args.receive_only && i >= send_only) {
                return s;
            }
            let mut t = 0.0f64;
            loop {
                let u: f64 = rng.random();
                t += -(1.0 - u).ln() * mean_us;
                if t >= duration_us {
                    break;
                }
                s.push(t as u64);
            }
            s
        })
        .collect();
    let sched_len: Vec<u32> = schedules.iter().map(|s| s.len() as u32).collect();
    let mut base_g = Vec::with_capacity(n);
    let mut scheduled = 0u64;
    for &l in &sched_len {
        base_g.push(scheduled);
        scheduled += u64::from(l);
    }

    let clock = Clock::new();
    let shared = Arc::new(Shared {
        cfg: Config {
            run_id: run_id.clone(),
            protocol: args.protocol,
            urls: urls.clone(),
            // tungstenite zeroes this much before every read; the socket itself is read
            // in bigger pieces under it (conn::SOCKET_READ_BYTES).
            ws: WebSocketConfig::default()
                .read_buffer_size(512)
                .write_buffer_size(8 * 1024),
            connect_timeout,
            tls: tls::client_config(args.ca_file.as_deref(), args.insecure)?,
            silence_timeout,
            churn_per_s: args.churn,
            size: args.size,
            sched_len,
            base_g: base_g.clone(),
        },
        clock,
        live: Live::default(),
        latency: Sharded::new()?,
        ack_latency: Sharded::new()?,
        send_lag: Sharded::new()?,
        resume: Sharded::new()?,
        heard: Heard::new(&rooms, n),
        printer: args
            .print_sent
            .then(|| Mutex::new(BufWriter::with_capacity(64 * 1024, std::io::stdout()))),
        settled: AtomicUsize::new(0),
        run_bases: Default::default(),
    });
    shared.live.pending_sends.store(scheduled as i64, Relaxed);

    let mut phase_bus = PhaseBus::default();
    let started = Instant::now();
    let mut handles = Vec::with_capacity(n);
    for (i, schedule) in schedules.into_iter().enumerate() {
        let plan = Plan {
            idx: i as u32,
            key: key_for(i)?,
            room: rooms[i % rooms.len()].clone(),
            receives: i >= send_only,
            schedule,
            start_delay: if args.ramp > 0.0 {
                Duration::from_secs_f64(i as f64 / args.ramp)
            } else {
                Duration::ZERO
            },
        };
        let task = Conn::new(plan, Arc::clone(&shared), phase_bus.subscribe());
        handles.push(tokio::spawn(task.run()));
    }
    let progress = (!args.no_progress)
        .then(|| tokio::spawn(progress::run(Arc::clone(&shared), phase_bus.subscribe(), n)));

    // Connect: until every connection's first attempt is over.
    while shared.settled.load(Relaxed) < n && !handles.iter().all(|h| h.is_finished()) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let connect_s = started.elapsed().as_secs_f64();
    let connected_at_send_start = shared.live.connected.load(Relaxed).max(0) as u64;

    // Send on schedule.
    let t0_us = clock.now_us() + 10_000;
    phase_bus.send(Phase::Send { t0_us });
    tokio::time::sleep_until(clock.instant(t0_us) + duration).await;

    // Drain: until nothing is due or unacknowledged and no v1 connection is away (it would
    // resume what it missed), and then: v1, until every member has heard its room through
    // the newest acknowledged message; legacy (which has no acks), until deliveries have
    // stopped for a second. Or until `--drain` is over.
    phase_bus.send(Phase::Drain { t0_us });
    let drain_started = Instant::now();
    let quiet_us = Duration::from_secs(1).min(drain).as_micros() as u64;
    let drain_start_us = clock.now_us();
    let drain_end = loop {
        let live = &shared.live;
        // Acquire, against the tasks' Release: a send no longer due is seen in flight, one
        // no longer in flight is seen acked (`Heard`), a connection back has its backfill
        // heard.
        let idle = live.pending_sends.load(Acquire) <= 0
            && live.in_flight.load(Acquire) <= 0
            && live.away.load(Acquire) <= 0;
        let heard = match args.protocol {
            Protocol::V1 => shared.heard.all_heard(),
            Protocol::Legacy | Protocol::SocketIo => None,
        };
        let last = live.last_delivery_us.load(Relaxed).max(drain_start_us);
        let quiet = clock.now_us().saturating_sub(last) >= quiet_us;
        match heard {
            Some(true) if idle => break DrainEnd::AllHeard,
            None if idle && quiet => break DrainEnd::Quiet,
            _ if drain_started.elapsed() >= drain => break DrainEnd::Limit,
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    };
    let drain_s = drain_started.elapsed().as_secs_f64();
    let after_send_s = |last_us: &std::sync::atomic::AtomicU64| {
        last_us.load(Relaxed).saturating_sub(drain_start_us) as f64 / 1e6
    };
    let last_delivery_after_send_s = after_send_s(&shared.live.last_delivery_us);
    let last_ack_after_send_s = after_send_s(&shared.live.last_ack_us);
    phase_bus.send(Phase::Stop);

    let mut outputs = Vec::with_capacity(n);
    let mut lost_tasks = 0u64;
    let join_deadline = Instant::now() + Duration::from_secs(10);
    for h in handles {
        // A task that did not report keeps its place (an empty record): connection i's
        // record is outputs[i], which the legacy accounting relies on.
        match tokio::time::timeout_at(join_deadline, h).await {
            Ok(Ok(o)) => outputs.push(o),
            Ok(Err(e)) => {
                lost_tasks += 1;
                tracing::error!("a connection task failed: {e}");
                outputs.push(conn::Output::default());
            }
            Err(_) => {
                lost_tasks += 1;
                outputs.push(conn::Output::default());
            }
        }
    }
    if lost_tasks > 0 {
        tracing::error!("{lost_tasks} connection tasks did not report; their figures are missing");
    }
    if let Some(p) = progress {
        let _ = p.await;
    }
    if let Some(p) = &shared.printer {
        let mut p = p.lock().unwrap_or_else(|e| e.into_inner());
        p.flush()?;
    }

    let mut report = build_report(
        &args,
        &shared,
        outputs,
        &base_g,
        ReportTimes {
            run_id,
            urls,
            scheduled,
            connect_s,
            connected_at_send_start,
            send_start_unix_s: clock.unix_us(t0_us) as f64 / 1e6,
            duration_s: duration.as_secs_f64(),
            drain_s,
            drain_end,
            last_delivery_after_send_s,
            last_ack_after_send_s,
        },
    )?;
    report.lost_tasks = lost_tasks;
    let human = report.human();
    let mut stdout = std::io::stdout().lock();
    if args.json || args.print_sent {
        eprint!("{human}");
    } else {
        write!(stdout, "{human}")?;
    }
    if args.json {
        writeln!(stdout, "{}", serde_json::to_string(&report)?)?;
    }
    stdout.flush()?;
    Ok(report)
}

struct ReportTimes {
    run_id: String,
    urls: Vec<String>,
    scheduled: u64,
    connect_s: f64,
    connected_at_send_start: u64,
    send_start_unix_s: f64,
    duration_s: f64,
    drain_s: f64,
    drain_end: DrainEnd,
    last_delivery_after_send_s: f64,
    last_ack_after_send_s: f64,
}

fn build_report(
    args: &LoadArgs,
    shared: &Shared,
    outputs: Vec<conn::Output>,
    base_g: &[u64],
    t: ReportTimes,
) -> anyhow::Result<Report> {
    let v1 = args.protocol == Protocol::V1;
    let mut r = Report {
        run_id: t.run_id,
        protocol: args.protocol.as_str().into(),
        urls: t.urls,
        connections: u64::from(args.connections),
        scheduled: t.scheduled,
        connect_s: t.connect_s,
        connected_at_send_start: t.connected_at_send_start,
        send_start_unix_s: t.send_start_unix_s,
        duration_s: t.duration_s,
        drain_s: t.drain_s,
        drain_end: t.drain_end,
        last_delivery_after_send_s: t.last_delivery_after_send_s,
        ..Report::default()
    };
    let (mut acked, mut unacked, mut refused, mut conflicts) = (0, 0, 0, 0);
    let mut refused_joins = 0;
    let mut away_at_end = 0;
    let mut v1_rooms = Vec::new();
    let mut acked_seqs = Vec::new();
    let mut senders = Vec::new();
    let mut receivers = Vec::new();
    for (i, o) in outputs.into_iter().enumerate() {
        r.connected += u64::from(o.connected_once);
        r.connected_at_end += u64::from(o.up_at_end);
        r.failed_connects += o.failed_connects;
        r.disconnects += o.disconnects;
        r.churned += o.churned;
        r.silent_drops += o.silent_drops;
        r.gave_up += u64::from(o.gave_up);
        away_at_end += u64::from(o.away_at_end);
        for (k, v) in o.close_codes {
            *r.close_codes.entry(k).or_insert(0) += v;
        }
        for (k, v) in o.connect_errors {
            *r.connect_errors.entry(k).or_insert(0) += v;
        }
        for (k, v) in o.errors {
            *r.errors.entry(k).or_insert(0) += v;
        }
        r.bad_frames += o.bad_frames;
        r.sent += o.sent;
        r.unsent += o.scheduled - o.sent;
        r.resent += o.resent;
        acked += o.acked;
        unacked += o.unacked;
        refused += o.refused;
        conflicts += o.ack_conflicts;
        r.resets += o.resets;
        r.dropped_before_joined += o.held_dropped;
        refused_joins += o.refused_joins;
        r.duplicated += o.duplicated;
        r.replayed += o.replayed;
        r.out_of_order += o.out_of_order;
        if v1 {
            v1_rooms.extend(o.rooms);
            acked_seqs.extend(o.acked_seqs);
        } else {
            senders.push(LegacySender {
                base_g: base_g.get(i).copied().unwrap_or(0),
                sent_at: o.sent_at,
            });
            if let Some(seen) = o.legacy_seen {
                receivers.push(LegacyReceiver {
                    conn: i as u32,
                    seen,
                    windows: o.windows,
                    untimed: o.legacy_untimed,
                });
            }
        }
    }
    let e = if v1 {
        r.acked = Some(acked);
        r.unacked = Some(unacked);
        r.refused = Some(refused);
        r.ack_conflicts = Some(conflicts);
        r.refused_joins = Some(refused_joins);
        account::v1_expectation(&acked_seqs, &v1_rooms)
    } else {
        let rooms = match (&args.session_key, args.key_rooms) {
            (Some(_), _) => account::LegacyRooms::One,
            (None, Some(n)) => account::LegacyRooms::ByKey(n),
            (None, None) => account::LegacyRooms::Inferred,
        };
        let late = account::legacy_late_latencies(&senders, &receivers);
        shared.latency.record_all(0, &late);
        account::legacy_expectation(&senders, &receivers, rooms)
    };
    r.expected = e.expected;
    r.delivered = e.delivered;
    r.unexpected = e.unexpected;
    r.lost = e.expected - e.delivered;
    r.loss_ratio = if e.expected > 0 {
        r.lost as f64 / e.expected as f64
    } else {
        0.0
    };
    let mut h = new_histogram()?;
    shared.latency.merge_into(&mut h);
    r.latency_ms = LatencyMs::from_histogram(&h, shared.latency.over_max());
    if v1 {
        shared.ack_latency.merge_into(&mut h);
        r.ack_latency_ms = Some(LatencyMs::from_histogram(&h, shared.ack_latency.over_max()));
        shared.resume.merge_into(&mut h);
        r.resume_ms = Some(LatencyMs::from_histogram(&h, shared.resume.over_max()));
        r.away_at_end = Some(away_at_end);
        r.last_ack_after_send_s = Some(t.last_ack_after_send_s);
    }
    shared.send_lag.merge_into(&mut h);
    r.send_lag_ms = LatencyMs::from_histogram(&h, shared.send_lag.over_max());
    if t.duration_s > 0.0 {
        r.send_rate = r.sent as f64 / t.duration_s;
    }
    if t.duration_s + t.drain_s > 0.0 {
        r.delivery_rate = r.delivered as f64 / (t.duration_s + t.drain_s);
    }
    Ok(r)
}
