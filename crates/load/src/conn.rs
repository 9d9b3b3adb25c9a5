//! One connection's task: connect (with backoff), authenticate, join, follow the fixed send
//! schedule, record every receipt, reconnect and resume after faults, and hand back its
//! record when the run stops. One tokio task per connection; nothing here blocks.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::{BufWriter, Stdout, Write as _};
use std::pin::pin;
use std::sync::atomic::Ordering::{Acquire, Relaxed, Release};
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{FutureExt, SinkExt, StreamExt};
use rand::Rng;
use serde::{Deserialize, Serialize};
use tokio::io::BufReader;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::{sleep_until, timeout, Instant};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{Connector, MaybeTlsStream, WebSocketStream};
use wschat_protocol::close;
use wschat_protocol::v1::{ClientFrame, JoinRoom, Ref, ServerFrame};
use wschat_protocol::ErrorCode;

use crate::account::{self, LegacyRecv, Ours, Receipt, V1Room, V1RoomOut, Window};
use crate::stats::{Clock, Heard, Live, Sharded};
use crate::text::{self, Tag};
use crate::Protocol;

type Ws = WebSocketStream<MaybeTlsStream<BufReader<TcpStream>>>;

/// Bytes asked of the kernel per read. tungstenite zeroes its whole read size before every
/// read, once per frame when frames arrive one at a time (10,000 connections at 10 frames
/// a second each: 8 % of the client's CPU went to that memset at 8 KiB). So the socket is
/// read through a buffer this big, and tungstenite reads small pieces out of it: a
/// connection that is sent 50,000 frames a second still takes them in 8 KiB syscalls.
const SOCKET_READ_BYTES: usize = 8 * 1024;

/// Legacy: a connection we close on purpose (`--churn`) is expected to have received what
/// was sent in its last second only if it came (it may still have been in flight).
pub(crate) const CHURN_GRACE_US: u64 = 1_000_000;
/// v1: the longest wait before a send refused with a retryable error goes again (the
/// wait doubles from 200 ms up to this; after `rate_limited` it is this).
const MAX_ERROR_RETRY_US: u64 = 1_000_000;
/// Most distinct reasons kept in `connect_errors`.
const MAX_REASONS: usize = 20;
/// The `ref` of our join frames (sends use their counter).
const JOIN_REF: &str = "join";

/// Most frames handled per wake-up before timers and phase changes get a look.
const FRAME_BATCH: usize = 64;

/// The phases of a run, broadcast to every task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Connecting; nothing is sent yet.
    Connect,
    /// Sending on schedule; `t0_us` is the schedule's zero (µs since the clock's anchor).
    Send { t0_us: u64 },
    /// Past the schedule's end: late (backlogged) sends still go, deliveries still count.
    Drain { t0_us: u64 },
    /// Close and report.
    Stop,
}

impl Phase {
    fn t0(self) -> Option<u64> {
        match self {
            Phase::Send { t0_us } | Phase::Drain { t0_us } => Some(t0_us),
            _ => None,
        }
    }
}

/// Sends phase changes to every task, each on its own channel: polling a per-task
/// channel is lock-free, where 10,000 tasks polling one `watch` would contend on its lock
/// at every wake-up.
pub(crate) struct PhaseBus {
    txs: Vec<mpsc::UnboundedSender<Phase>>,
    /// Phases sent so far: a receiver with nothing new does not touch its channel.
    sent: Arc<AtomicU64>,
}

impl Default for PhaseBus {
    fn default() -> Self {
        Self {
            txs: Vec::new(),
            sent: Arc::new(AtomicU64::new(0)),
        }
    }
}

impl PhaseBus {
    pub fn subscribe(&mut self) -> PhaseRx {
        let (tx, rx) = mpsc::unbounded_channel();
        self.txs.push(tx);
        PhaseRx {
            rx,
            sent: Arc::clone(&self.sent),
            seen: 0,
            armed: false,
        }
    }

    pub fn send(&self, phase: Phase) {
        // Counted before it is sent: a receiver woken by the send sees it is new.
        self.sent.fetch_add(1, Release);
        for tx in &self.txs {
            // A task that already ended has dropped its receiver: nothing to tell it.
            let _ = tx.send(phase);
        }
    }
}

/// One task's end of the phase bus. Polling a channel is a cache miss per connection and
/// a task polls it at every wake-up, so once its waker is registered with the channel
/// (a poll that found nothing), it polls the channel again only when the bus has sent a
/// phase it has not received: the registered waker wakes it for that.
pub(crate) struct PhaseRx {
    rx: mpsc::UnboundedReceiver<Phase>,
    sent: Arc<AtomicU64>,
    seen: u64,
    armed: bool,
}

impl PhaseRx {
    fn poll_recv(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Option<Phase>> {
        if self.armed && self.seen >= self.sent.load(Acquire) {
            return std::task::Poll::Pending;
        }
        // Out of its coop budget, the task gets `Pending` from the channel without the
        // waker being kept (it is woken again at once instead): armed only when it was.
        let kept = tokio::task::coop::has_budget_remaining();
        match self.rx.poll_recv(cx) {
            std::task::Poll::Ready(p) => {
                self.seen += 1;
                // The waker was used up: the next poll registers it again.
                self.armed = false;
                std::task::Poll::Ready(p)
            }
            std::task::Poll::Pending => {
                self.armed = kept;
                std::task::Poll::Pending
            }
        }
    }

    /// The next phase; `None` when the bus is gone.
    pub async fn recv(&mut self) -> Option<Phase> {
        std::future::poll_fn(|cx| self.poll_recv(cx)).await
    }
}

/// Settings every task reads.
pub(crate) struct Config {
    pub run_id: String,
    pub protocol: Protocol,
    pub urls: Vec<String>,
    pub ws: WebSocketConfig,
    pub connect_timeout: Duration,
    /// wss:// connections' TLS.
    pub tls: Arc<rustls::ClientConfig>,
    /// A connection that hears nothing for this long is dropped (zero: never).
    pub silence_timeout: Duration,
    /// Deliberate closes per connection per second.
    pub churn_per_s: f64,
    pub size: usize,
    /// Each connection's schedule length and the global index of its message 0.
    pub sched_len: Vec<u32>,
    pub base_g: Vec<u64>,
}

impl Config {
    /// The tag of one of this run's messages, and its global index; `None` for anything
    /// else (another run's, or a counter past its sender's schedule).
    fn tag(&self, body: &str) -> Option<(text::Tag, u64)> {
        let tag = text::parse(body, &self.run_id)?;
        let &len = self.sched_len.get(tag.conn as usize)?;
        if tag.counter >= len {
            return None;
        }
        Some((tag, self.base_g[tag.conn as usize] + u64::from(tag.counter)))
    }
}

/// What all tasks share.
pub(crate) struct Shared {
    pub cfg: Config,
    pub clock: Clock,
    pub live: Live,
    pub latency: Sharded,
    pub ack_latency: Sharded,
    /// Intended send time to the send's write: the client's own lateness.
    pub send_lag: Sharded,
    /// v1: from a connection's loss to its rooms synced again (`Conn::set_away`).
    pub resume: Sharded,
    /// v1: each member's room heard through its newest acknowledged message (the drain).
    pub heard: Heard,
    pub printer: Option<Mutex<BufWriter<Stdout>>>,
    /// Tasks whose first connection attempt is over (either way).
    pub settled: AtomicUsize,
    /// v1: each room's head when members first joined it in their first attempts, which
    /// all end before the send phase (the lowest any saw). A member whose first join comes
    /// later (its first attempts failed) joins from there: it is expected every message of
    /// the run, as the others are, and asks for them.
    pub run_bases: Mutex<HashMap<String, u64>>,
}

/// One connection's part of the run.
pub(crate) struct Plan {
    pub idx: u32,
    pub key: String,
    /// v1: the room it sends to and (unless send-only) joins.
    pub room: String,
    /// Receives (joins) rather than only sending.
    pub receives: bool,
    /// Send times, µs after the schedule's zero, ascending.
    pub schedule: Vec<u64>,
    pub start_delay: Duration,
}

/// What a task hands back.
#[derive(Default)]
pub(crate) struct Output {
    pub connected_once: bool,
    pub up_at_end: bool,
    pub failed_connects: u64,
    pub disconnects: u64,
    pub churned: u64,
    pub silent_drops: u64,
    pub gave_up: bool,
    /// v1: lost (after it had been up) and not synced again when the run ended.
    pub away_at_end: bool,
    pub close_codes: BTreeMap<u16, u64>,
    pub connect_errors: BTreeMap<String, u64>,
    pub errors: BTreeMap<String, u64>,
    pub bad_frames: u64,
    pub scheduled: u64,
    pub sent: u64,
    pub resent: u64,
    pub acked: u64,
    pub unacked: u64,
    pub refused: u64,
    pub ack_conflicts: u64,
    pub resets: u64,
    /// v1: messages that came before their room's first `joined`, past what is held.
    pub held_dropped: u64,
    /// v1: rooms whose first join was refused for good (not a member: expected nothing).
    pub refused_joins: u64,
    pub duplicated: u64,
    pub replayed: u64,
    pub out_of_order: u64,
    /// v1: this receiver's rooms, and the (room, seq) of each of its acked messages.
    pub rooms: Vec<V1RoomOut>,
    pub acked_seqs: Vec<(String, u64)>,
    /// Legacy: when each scheduled message was sent, what it received, and when it was
    /// expected to receive.
    pub sent_at: Vec<u64>,
    pub legacy_seen: Option<crate::bits::ChunkSet>,
    /// Legacy: first receipts not timed when they came, (g, latency µs)
    /// (`account::legacy_late_latencies`).
    pub legacy_untimed: Vec<(u64, u64)>,
    pub windows: Vec<Window>,
}

/// How a session (one WebSocket connection) ended.
enum End {
    /// The run stopped.
    Stop,
    /// We closed it on purpose (`--churn`): reconnect at once.
    Churn,
    /// Lost or failed: reconnect with backoff.
    Lost,
    /// Refused for good (bad key, policy): stop trying.
    Fatal,
}

struct Unacked {
    intended_us: u64,
    error_retries: u32,
}

/// The state of one connection across its sessions.
pub(crate) struct Conn {
    plan: Plan,
    shared: Arc<Shared>,
    phase_rx: PhaseRx,
    phase: Phase,
    urls: Vec<String>,
    out: Output,
    settled: bool,
    /// The last session was established for `STABLE_SESSION_US` at least: the next
    /// reconnect backs off from the start.
    last_session_stable: bool,
    /// v1: down after it had been up, and trying to get back (counted in `Live::away`).
    away: bool,
    /// v1: when it went away (µs on the run's clock).
    away_since_us: u64,
    next_idx: usize,
    // v1
    rooms: Vec<V1Room>,
    unacked: BTreeMap<u32, Unacked>,
    retry: VecDeque<u32>,
    retry_at_us: Option<u64>,
    /// v1: told `rate_limited`, nothing is sent before this (µs; 0: no hold). Retries
    /// and new messages alike wait: each would only be refused, and enough refusals in a
    /// row close the connection (1008).
    hold_until_us: u64,
    ack_seq: Vec<u64>,
    acked_seqs: Vec<(u16, u64)>,
    room_names: Vec<String>,
    // legacy
    recv: LegacyRecv,
    sent_at: Vec<u64>,
    // first receipts not yet added to the shared counters and histogram
    new_deliveries: u64,
    new_latencies: Vec<u64>,
    last_delivery_us: u64,
    /// Intended times of the sends being written now (kept for its allocation).
    writing: Vec<u64>,
}

/// A task that ends without settling (a panic unwinding it) still counts as settled:
/// the connect phase waits for every task's first attempt, and would wait for good.
impl Drop for Conn {
    fn drop(&mut self) {
        self.settle();
    }
}

/// Per-session flags.
#[derive(Default)]
struct Session {
    /// Authenticated: v1 `hello`, legacy `{"authenticated":true}`.
    up: bool,
    /// Ready for the run: v1 joins answered; legacy authenticated.
    established: bool,
    joins_waiting: usize,
    /// v1: joined rooms whose backfill has not ended yet (the server's `presence` after
    /// it marks the end): until none is left, a connection that was away still is.
    syncs_waiting: usize,
    /// Legacy: when the connection attempt began and when it was authenticated (µs).
    opened_at: u64,
    window_start: u64,
    /// Not established in time: counted as a failed connect, not also as a disconnect.
    timed_out: bool,
    /// When it was established (µs on the run's clock).
    established_at: Option<u64>,
}

/// Only the fields the hot path needs of a v1 server frame, borrowed from the text.
#[derive(Deserialize)]
struct FastV1<'a> {
    #[serde(rename = "type", borrow)]
    kind: &'a str,
    #[serde(default, borrow)]
    room: Option<&'a str>,
    #[serde(default)]
    seq: Option<u64>,
    #[serde(default, borrow)]
    text: Option<&'a str>,
}

/// Only the fields of a legacy frame, borrowed from the text.
#[derive(Deserialize)]
struct FastLegacy<'a> {
    #[serde(default)]
    authenticated: Option<bool>,
    #[serde(default, borrow)]
    message: Option<&'a str>,
    #[serde(default, borrow)]
    error: Option<&'a str>,
}

/// The legacy client frame, `{"message": TEXT}`.
#[derive(Serialize)]
struct LegacySay<'a> {
    message: &'a str,
}

impl Conn {
    pub fn new(plan: Plan, shared: Arc<Shared>, phase_rx: PhaseRx) -> Self {
        let urls = shared
            .cfg
            .urls
            .iter()
            .map(|u| match shared.cfg.protocol {
                Protocol::V1 => u.clone(),
                Protocol::Legacy => legacy_url(u, &plan.key),
                Protocol::SocketIo => socketio_url(u, &plan.key),
            })
            .collect();
        let n = plan.schedule.len();
        let (ack_seq, sent_at) = match shared.cfg.protocol {
            Protocol::V1 => (vec![0; n], Vec::new()),
            Protocol::Legacy | Protocol::SocketIo => (Vec::new(), vec![u64::MAX; n]),
        };
        let rooms = if plan.receives && shared.cfg.protocol == Protocol::V1 {
            vec![V1Room::new(plan.room.clone())]
        } else {
            Vec::new()
        };
        let room_names = vec![plan.room.clone()];
        Self {
            out: Output {
                scheduled: n as u64,
                ..Output::default()
            },
            plan,
            phase: Phase::Connect,
            phase_rx,
            shared,
            urls,
            settled: false,
            last_session_stable: false,
            away: false,
            away_since_us: 0,
            next_idx: 0,
            rooms,
            unacked: BTreeMap::new(),
            retry: VecDeque::new(),
            retry_at_us: None,
            hold_until_us: 0,
            ack_seq,
            acked_seqs: Vec::new(),
            room_names,
            recv: LegacyRecv::default(),
            sent_at,
            new_deliveries: 0,
            new_latencies: Vec::new(),
            last_delivery_us: 0,
            writing: Vec::new(),
        }
    }

    fn v1(&self) -> bool {
        self.shared.cfg.protocol == Protocol::V1
    }

    /// Runs the connection until the run stops (or it gives up) and returns its record.
    pub async fn run(mut self) -> Output {
        let delay = self.plan.start_delay;
        if !self.wait(delay).await {
            self.settle();
            return self.finish();
        }
        let mut attempt: u32 = 0;
        let mut tries: usize = 0;
        loop {
            if self.phase == Phase::Stop {
                break;
            }
            let url = self.urls[(self.plan.idx as usize + tries) % self.urls.len()].clone();
            tries += 1;
            self.last_session_stable = false;
            let end = self.attempt(&url).await;
            self.settle();
            if matches!(end, End::Churn | End::Lost) {
                self.set_away(true);
            }
            match end {
                End::Stop => break,
                End::Fatal => {
                    self.give_up();
                    break;
                }
                End::Churn => attempt = 0,
                End::Lost => {
                    // Back off from the start after a connection that worked.
                    attempt = if self.last_session_stable {
                        1
                    } else {
                        attempt.saturating_add(1)
                    };
                    if !self.wait(backoff(attempt)).await {
                        break;
                    }
                }
            }
        }
        // Still away when the run stopped: it never resumed (no sample).
        self.out.away_at_end = self.mark_away(false);
        self.settle();
        self.finish()
    }

    /// v1: whether the connection is down after it had been up and will come back, to
    /// resume what it missed (the drain waits for it: `Live::away`). Away from the loss
    /// until the next session has synced its rooms (each join's backfill received): that
    /// time is one sample of `resume`.
    fn set_away(&mut self, away: bool) {
        if self.mark_away(away) {
            let now = self.shared.clock.now_us();
            if self.away {
                self.away_since_us = now;
            } else {
                self.shared
                    .resume
                    .record(self.plan.idx, now.saturating_sub(self.away_since_us));
            }
        }
    }

    /// The flag and `Live::away` alone; whether they changed.
    fn mark_away(&mut self, away: bool) -> bool {
        let away = away && self.v1() && self.out.connected_once;
        if away == self.away {
            return false;
        }
        self.away = away;
        // Back: what it heard while resuming is visible to the drain's Acquire first.
        self.shared
            .live
            .away
            .fetch_add(if away { 1 } else { -1 }, Release);
        true
    }

    /// Sleeps for `d`, following phase changes; false if the run stopped.
    async fn wait(&mut self, d: Duration) -> bool {
        let deadline = Instant::now() + d;
        loop {
            if self.phase == Phase::Stop {
                return false;
            }
            tokio::select! {
                _ = sleep_until(deadline) => return true,
                p = self.phase_rx.recv() => self.phase = p.unwrap_or(Phase::Stop),
            }
        }
    }

    fn settle(&mut self) {
        if !self.settled {
            self.settled = true;
            self.shared.settled.fetch_add(1, Relaxed);
        }
    }

    /// Closed for good (a policy close, a key refused on reconnect): it sends no more.
    /// A member still expects every message of its rooms (what it never gets is lost),
    /// and the run fails (`Report::failure`).
    fn give_up(&mut self) {
        self.out.gave_up = true;
        self.shared.heard.left(self.plan.idx);
        let live = &self.shared.live;
        let remaining = self.plan.schedule.len() - self.next_idx;
        live.pending_sends.fetch_sub(remaining as i64, Relaxed);
        live.in_flight.fetch_sub(self.unacked.len() as i64, Relaxed);
    }

    fn connect_failed(&mut self, reason: String) {
        self.out.failed_connects += 1;
        let n = self.out.connect_errors.len();
        let key = if n < MAX_REASONS || self.out.connect_errors.contains_key(&reason) {
            reason
        } else {
            "other".to_string()
        };
        *self.out.connect_errors.entry(key).or_insert(0) += 1;
    }

    /// One connection attempt and, if it succeeds, the session on it.
    async fn attempt(&mut self, url: &str) -> End {
        let cfg = &self.shared.cfg;
        let attempt_at = self.shared.clock.now_us();
        let tls = Arc::clone(&cfg.tls);
        let connect = timeout(cfg.connect_timeout, connect(url, cfg.ws, tls));
        let mut connect = pin!(connect);
        let result = loop {
            tokio::select! {
                r = &mut connect => break r,
                p = self.phase_rx.recv() => {
                    self.phase = p.unwrap_or(Phase::Stop);
                    if self.phase == Phase::Stop {
                        return End::Stop;
                    }
                }
            }
        };
        match result {
            Ok(Ok((ws, _response))) => self.session(ws, attempt_at).await,
            Ok(Err(e)) => {
                let fatal = matches!(&e, tungstenite::Error::Http(r)
                    if r.status().is_client_error() && r.status().as_u16() != 408 && r.status().as_u16() != 429);
                self.connect_failed(describe(&e));
                if fatal {
                    End::Fatal
                } else {
                    End::Lost
                }
            }
            Err(_) => {
                self.connect_failed("connect timeout".into());
                End::Lost
            }
        }
    }

    /// Runs one WebSocket session (whose attempt began at `attempt_at`) until it ends.
    async fn session(&mut self, mut ws: Ws, attempt_at: u64) -> End {
        let clock = self.shared.clock;
        let mut s = Session {
            opened_at: attempt_at,
            ..Session::default()
        };
        if self.v1() {
            let auth = ClientFrame::Auth {
                key: self.plan.key.clone(),
                reference: None,
            };
            if let Err(e) = send_frame(&mut ws, &auth).await {
                self.connect_failed(describe(&e));
                return End::Lost;
            }
        } else {
            self.recv.new_connection();
        }
        let deadline = Instant::now() + self.shared.cfg.connect_timeout;
        let mut deadline_timer = pin!(sleep_until(deadline));
        let mut send_timer = pin!(sleep_until(deadline));
        let mut send_target: Option<Instant> = None;
        let mut send_key = None;
        let mut next_send = None;
        let mut churn_timer = pin!(sleep_until(deadline));
        let mut churn_target: Option<Instant> = None;
        // Reset by every frame the server sends; pushed out lazily (checked when it fires)
        // so that a busy connection does not re-arm a timer per frame.
        let silence = self.shared.cfg.silence_timeout;
        let mut heard_at = Instant::now();
        let mut silence_timer = pin!(sleep_until(heard_at + silence));
        let end = loop {
            if s.established && s.established_at.is_none() {
                s.established_at = Some(clock.now_us());
            }
            if s.established && !self.settled {
                self.settle();
            }
            // Arm the send timer for the next due message, if sending.
            // The next send's instant depends only on these; working it out reads the
            // schedule (a cache miss per connection), so once per change, not per wake-up.
            let key = (
                self.phase.t0(),
                self.next_idx,
                self.retry.is_empty(),
                self.retry_at_us,
                self.hold_until_us,
            );
            if send_key != Some(key) {
                send_key = Some(key);
                next_send = self.next_send_instant();
            }
            // Sending waits for the joins (a v1 client says something in a room it is in):
            // a message stored before its sender joined would be below the sender's base.
            let target = if s.established { next_send } else { None };
            if target != send_target {
                if let Some(t) = target {
                    send_timer.as_mut().reset(t);
                }
                send_target = target;
            }
            if churn_target.is_none()
                && s.established
                && self.shared.cfg.churn_per_s > 0.0
                && matches!(self.phase, Phase::Send { .. })
            {
                let t = Instant::now() + exponential(1.0 / self.shared.cfg.churn_per_s);
                churn_timer.as_mut().reset(t);
                churn_target = Some(t);
            }
            // The phase first (a change is rare, and while none is waiting the check is one
            // load of a shared counter), so that a steady stream of frames cannot keep a
            // stop from being seen; then sends due (open loop: a late send is latency),
            // then frames waiting.
            tokio::select! {
                biased;
                p = self.phase_rx.recv() => {
                    self.phase = p.unwrap_or(Phase::Stop);
                    if self.phase == Phase::Stop {
                        let _ = timeout(Duration::from_secs(1), ws.close(None)).await;
                        break End::Stop;
                    }
                }
                _ = &mut send_timer, if send_target.is_some() => {
                    send_target = None;
                    if self.send_due(&mut ws).await.is_err() {
                        break self.lost(&s, 1006, "");
                    }
                }
                msg = ws.next() => {
                    heard_at = Instant::now();
                    // Handle what is ready now, up to a batch, before looking at timers.
                    let mut msg = msg;
                    let mut handled = 1;
                    let end = loop {
                        if let Some(end) = self.on_ws_message(&mut ws, msg, &mut s).await {
                            break Some(end);
                        }
                        if handled >= FRAME_BATCH {
                            break None;
                        }
                        match ws.next().now_or_never() {
                            Some(m) => msg = m,
                            None => break None,
                        }
                        handled += 1;
                    };
                    self.flush_deliveries();
                    if let Some(end) = end {
                        break end;
                    }
                }
                _ = &mut deadline_timer, if !s.established => {
                    self.connect_failed(if s.up { "join timeout" } else { "auth timeout" }.into());
                    s.timed_out = true;
                    break End::Lost;
                }
                _ = &mut silence_timer, if !silence.is_zero() => {
                    if heard_at.elapsed() >= silence {
                        // The server is paused, cut off or gone without a close.
                        self.out.silent_drops += 1;
                        break self.lost(&s, 1006, "");
                    }
                    silence_timer.as_mut().reset(heard_at + silence);
                }
                _ = &mut churn_timer, if churn_target.is_some() => {
                    let _ = timeout(Duration::from_secs(1), ws.close(None)).await;
                    self.out.churned += 1;
                    break End::Churn;
                }
            }
        };
        if s.up {
            self.shared.live.connected.fetch_sub(1, Relaxed);
            if matches!(end, End::Lost | End::Fatal) && !s.timed_out {
                self.out.disconnects += 1;
            }
            if !self.v1() {
                let now = clock.now_us();
                let (firm_end, end_us) = match end {
                    End::Stop => (u64::MAX, u64::MAX),
                    End::Churn => (now.saturating_sub(CHURN_GRACE_US), now),
                    End::Lost | End::Fatal => (now, now),
                };
                if end_us > s.opened_at {
                    self.out.windows.push(Window {
                        start: s.opened_at,
                        firm_start: s.window_start,
                        firm_end: firm_end.max(s.window_start),
                        end: end_us,
                    });
                }
            }
        }
        if matches!(end, End::Stop) {
            self.out.up_at_end = s.up;
        }
        // A session that worked for a while resets the backoff; one refused again and
        // again right after `hello` (a join whose backfill keeps failing) backs off more
        // each time, instead of reconnecting every few tens of milliseconds for good.
        self.last_session_stable = s
            .established_at
            .is_some_and(|at| clock.now_us().saturating_sub(at) >= STABLE_SESSION_US);
        end
    }

    /// One frame (or the end of the stream); `Some` when it ends the session.
    async fn on_ws_message(
        &mut self,
        ws: &mut Ws,
        msg: Option<Result<Message, tungstenite::Error>>,
        s: &mut Session,
    ) -> Option<End> {
        match msg {
            Some(Ok(Message::Text(t))) => {
                let r = match self.shared.cfg.protocol {
                    Protocol::V1 => self.on_v1_text(ws, t.as_str(), s).await,
                    Protocol::Legacy => Ok(self.on_legacy_text(t.as_str(), s)),
                    Protocol::SocketIo => self.on_socketio_text(ws, t.as_str(), s).await,
                };
                match r {
                    Ok(end) => end,
                    Err(_) => Some(self.lost(s, 1006, "")),
                }
            }
            Some(Ok(Message::Close(frame))) => {
                let (code, reason) = frame.map_or((1005, Default::default()), |f| {
                    (u16::from(f.code), f.reason)
                });
                let _ = timeout(Duration::from_millis(100), ws.close(None)).await;
                Some(self.lost(s, code, reason.as_str()))
            }
            Some(Ok(_)) => None,
            Some(Err(_)) | None => Some(self.lost(s, 1006, "")),
        }
    }

    /// The session was closed by the server (with `code` and `reason`) or broke.
    fn lost(&mut self, s: &Session, code: u16, reason: &str) -> End {
        *self.out.close_codes.entry(code).or_insert(0) += 1;
        // Too many frames refused is a reconnect after a backoff, not a revoked session.
        let rate_limited = code == close::POLICY_VIOLATION && reason == close::RATE_LIMIT_REASON;
        let fatal = !rate_limited
            && matches!(
                code,
                close::POLICY_VIOLATION
                    | close::AUTH_FAILED
                    | close::PROTOCOL_ERROR
                    | close::UNSUPPORTED_DATA
                    | close::INVALID_PAYLOAD
                    | close::MESSAGE_TOO_BIG
                    | close::TOO_MANY_ERRORS
            );
        if !s.up {
            self.connect_failed(format!("closed before auth ({code})"));
        }
        if fatal {
            End::Fatal
        } else {
            End::Lost
        }
    }

    /// When the next message (or v1 retry) is due, if the run is sending.
    fn next_send_instant(&self) -> Option<Instant> {
        let t0 = self.phase.t0()?;
        let clock = &self.shared.clock;
        let next = self.plan.schedule.get(self.next_idx).map(|&off| t0 + off);
        let retry = if self.retry.is_empty() {
            None
        } else {
            self.retry_at_us
        };
        let at = match (next, retry) {
            (Some(a), Some(b)) => a.min(b),
            (a, b) => a.or(b)?,
        };
        Some(clock.instant(at.max(self.hold_until_us)))
    }

    /// Sends every message that is due (and v1 retries), then flushes.
    async fn send_due(&mut self, ws: &mut Ws) -> Result<(), tungstenite::Error> {
        let Some(t0) = self.phase.t0() else {
            return Ok(());
        };
        let shared = Arc::clone(&self.shared);
        let clock = shared.clock;
        let live = &shared.live;
        let now = clock.now_us();
        if now < self.hold_until_us {
            return Ok(());
        }
        if self.retry_at_us.is_some_and(|t| t <= now) {
            self.retry_at_us = None;
            while let Some(counter) = self.retry.pop_front() {
                let Some(u) = self.unacked.get(&counter) else {
                    continue;
                };
                let frame = self.v1_send_frame(counter, u.intended_us);
                ws.feed(Message::text(frame)).await?;
                self.out.resent += 1;
            }
        }
        // Also drops what a failed write left here: it never went out, so it has no lag.
        self.writing.clear();
        let mut batch = 0;
        while let Some(&off) = self.plan.schedule.get(self.next_idx) {
            let intended_us = t0 + off;
            if intended_us > now || batch >= 256 {
                break;
            }
            let counter = self.next_idx as u32;
            let frame = match shared.cfg.protocol {
                Protocol::V1 => self.v1_send_frame(counter, intended_us),
                Protocol::Legacy => self.legacy_say(counter, intended_us)?,
                Protocol::SocketIo => {
                    let say = self.legacy_say(counter, intended_us)?;
                    format!("{}{say}]", socketio::EVENT)
                }
            };
            ws.feed(Message::text(frame)).await?;
            if let Some(p) = &shared.printer {
                let text = self.text(counter, intended_us);
                let mut p = p.lock().unwrap_or_else(|e| e.into_inner());
                let _ = writeln!(p, "{text}");
            }
            self.next_idx += 1;
            batch += 1;
            self.writing.push(intended_us);
            self.out.sent += 1;
            live.sent.fetch_add(1, Relaxed);
            match shared.cfg.protocol {
                Protocol::V1 => {
                    self.unacked.insert(
                        counter,
                        Unacked {
                            intended_us,
                            error_retries: 0,
                        },
                    );
                    live.in_flight.fetch_add(1, Relaxed);
                }
                Protocol::Legacy | Protocol::SocketIo => {
                    self.sent_at[counter as usize] = clock.now_us();
                }
            }
            // In flight before it is no longer due (Release, against the drain's Acquire):
            // the drain never sees a message as neither.
            live.pending_sends.fetch_sub(1, Release);
        }
        ws.flush().await?;
        // Written: each intended time becomes its lag (cleared at the next round).
        let written = clock.now_us();
        for intended in &mut self.writing {
            *intended = written.saturating_sub(*intended);
        }
        shared.send_lag.record_all(self.plan.idx, &self.writing);
        Ok(())
    }

    /// The legacy frame `{"message": TEXT}` of this message.
    fn legacy_say(&self, counter: u32, intended_us: u64) -> Result<String, tungstenite::Error> {
        let text = self.text(counter, intended_us);
        serde_json::to_string(&LegacySay { message: &text })
            .map_err(|e| tungstenite::Error::Io(e.into()))
    }

    fn text(&self, counter: u32, intended_us: u64) -> String {
        let cfg = &self.shared.cfg;
        let tag = Tag {
            conn: self.plan.idx,
            counter,
            intended_unix_us: self.shared.clock.unix_us(intended_us),
        };
        text::encode(&cfg.run_id, tag, cfg.size)
    }

    fn v1_send_frame(&self, counter: u32, intended_us: u64) -> String {
        let frame = ClientFrame::Send {
            room: self.room_names[0].clone(),
            text: self.text(counter, intended_us),
            client_msg_id: Some(format!(
                "{}:{}:{}",
                self.shared.cfg.run_id, self.plan.idx, counter
            )),
            reference: Some(Ref::Num(u64::from(counter))),
        };
        serde_json::to_string(&frame).unwrap_or_default()
    }

    /// The first copy of one of our messages arrived at `now_us`; timed from its intended
    /// send time when `timed`.
    fn count_delivery(&mut self, intended_unix_us: u64, now_us: u64, timed: bool) {
        self.new_deliveries += 1;
        self.last_delivery_us = self.last_delivery_us.max(now_us);
        if timed {
            let intended = self.shared.clock.since_anchor_us(intended_unix_us);
            self.new_latencies.push(now_us.saturating_sub(intended));
        }
    }

    /// Adds the batch's first receipts to the shared counters and histogram.
    fn flush_deliveries(&mut self) {
        if self.new_deliveries == 0 {
            return;
        }
        let shared = &self.shared;
        shared
            .live
            .delivered_at(self.new_deliveries, self.last_delivery_us);
        shared
            .latency
            .record_all(self.plan.idx, &self.new_latencies);
        self.new_deliveries = 0;
        self.new_latencies.clear();
    }

    // ---- v1 ----

    async fn on_v1_text(
        &mut self,
        ws: &mut Ws,
        text: &str,
        s: &mut Session,
    ) -> Result<Option<End>, tungstenite::Error> {
        if let Ok(FastV1 {
            kind: "message",
            room: Some(room),
            seq: Some(seq),
            text: Some(body),
        }) = serde_json::from_str::<FastV1>(text)
        {
            self.on_v1_message(room, seq, body);
            return Ok(None);
        }
        match serde_json::from_str::<ServerFrame>(text) {
            Ok(frame) => self.on_v1_frame(ws, frame, s).await,
            Err(_) => {
                self.out.bad_frames += 1;
                Ok(None)
            }
        }
    }

    fn on_v1_message(&mut self, room: &str, seq: u64, body: &str) {
        let now = self.shared.clock.now_us();
        let Some(r) = self.rooms.iter_mut().find(|r| r.name == room) else {
            return;
        };
        let ours = self.shared.cfg.tag(body).map(|(t, g)| Ours {
            intended_us: t.intended_unix_us,
            g,
        });
        let receipt = r.on_message(seq, ours, now);
        // One of ours is a message of the room even if its sender never got the ack (cut
        // off, then gave up): every member is to hear it.
        if ours.is_some() {
            self.shared.heard.acked(room, seq);
        }
        self.shared.heard.heard(self.plan.idx, r.max_any);
        if receipt == Receipt::New {
            if let Some(o) = ours {
                self.count_delivery(o.intended_us, now, true);
            }
        }
    }

    async fn on_v1_frame(
        &mut self,
        ws: &mut Ws,
        frame: ServerFrame,
        s: &mut Session,
    ) -> Result<Option<End>, tungstenite::Error> {
        match frame {
            ServerFrame::Message(m) => self.on_v1_message(&m.room, m.seq, &m.text),
            ServerFrame::Hello { session_room, .. } => {
                if s.up {
                    return Ok(None);
                }
                s.up = true;
                self.out.connected_once = true;
                self.shared.live.connected.fetch_add(1, Relaxed);
                // A session tied to one room can only use that room.
                if let Some(sr) = session_room {
                    if sr != self.room_names[0] && self.rooms.iter().all(|r| r.base.is_none()) {
                        self.room_names[0] = sr.clone();
                        for r in &mut self.rooms {
                            *r = V1Room::new(sr.clone());
                        }
                    }
                }
                // Resend whatever was not acknowledged, with the same client_msg_id.
                if !self.unacked.is_empty() {
                    self.retry = self.unacked.keys().copied().collect();
                    self.retry_at_us = Some(0);
                }
                // A later attempt than the first may come after the sending began (the
                // send phase starts once every task's first attempt is over; this task's
                // phase may not have caught up).
                let late = self.settled;
                let rooms: Vec<JoinRoom> = {
                    let bases = self
                        .shared
                        .run_bases
                        .lock()
                        .unwrap_or_else(|p| p.into_inner());
                    self.rooms
                        .iter_mut()
                        .filter(|r| !r.refused)
                        .map(|r| {
                            if r.base.is_none() && late {
                                // The room's head as its members first joined it; or,
                                // when none of them could (their first attempts failed
                                // too), from before the first of ours known there.
                                let first = self.shared.heard.before_first_ours(&r.name);
                                r.joined_from = match (bases.get(&r.name).copied(), first) {
                                    (Some(a), Some(b)) => Some(a.min(b)),
                                    (a, b) => a.or(b),
                                };
                            }
                            JoinRoom {
                                room: r.name.clone(),
                                since: r.since(),
                            }
                        })
                        .collect()
                };
                s.joins_waiting = rooms.len();
                s.syncs_waiting = rooms.len();
                if rooms.is_empty() {
                    s.established = true;
                    self.set_away(false);
                } else {
                    let join = ClientFrame::Join {
                        rooms,
                        reference: Some(Ref::Str(JOIN_REF.into())),
                    };
                    send_frame(ws, &join).await?;
                }
            }
            ServerFrame::Joined { room, last_seq, .. } => {
                if let Some(r) = self.rooms.iter_mut().find(|r| r.name == room) {
                    if r.base.is_none() {
                        // A member from here on: it has heard the room through its head
                        // (and whatever came before the answer), or, joined from the
                        // run's base, through that, its backfill to come.
                        let base = r.joined_from.unwrap_or(last_seq.max(r.max_any));
                        self.shared.heard.joined(self.plan.idx, &room, base);
                        if !self.settled {
                            let mut bases = self
                                .shared
                                .run_bases
                                .lock()
                                .unwrap_or_else(|p| p.into_inner());
                            let b = bases.entry(room.clone()).or_insert(last_seq);
                            *b = (*b).min(last_seq);
                        }
                    }
                    let held = r.on_joined(last_seq);
                    let mut new = Vec::new();
                    for (seq, ours, at) in held {
                        if r.on_message(seq, ours, at) == Receipt::New {
                            new.extend(ours.map(|o| (o.intended_us, at)));
                        }
                    }
                    for (i, at) in new {
                        self.count_delivery(i, at, true);
                    }
                }
                s.joins_waiting = s.joins_waiting.saturating_sub(1);
                if s.joins_waiting == 0 {
                    s.established = true;
                }
            }
            ServerFrame::Presence { .. } if s.syncs_waiting > 0 => {
                // A join's backfill ended (resumed, if the connection was away).
                s.syncs_waiting -= 1;
                if s.syncs_waiting == 0 {
                    self.set_away(false);
                }
            }
            ServerFrame::Left { room, .. }
                if self
                    .rooms
                    .iter()
                    .any(|r| r.name == room && r.base.is_some()) =>
            {
                // Never asked (this client leaves no room): the server let go of the
                // subscription. Resume it on a new connection.
                return Ok(Some(End::Lost));
            }
            ServerFrame::Reset { room, .. } => {
                if let Some(r) = self.rooms.iter_mut().find(|r| r.name == room) {
                    r.resets += 1;
                }
            }
            ServerFrame::Ack {
                room,
                seq,
                client_msg_id,
                reference,
                ..
            } => {
                let counter = match reference {
                    Some(Ref::Num(n)) => u32::try_from(n).ok(),
                    _ => client_msg_id
                        .as_deref()
                        .and_then(|c| c.rsplit(':').next())
                        .and_then(|c| c.parse().ok()),
                };
                if let Some(counter) = counter {
                    self.on_ack(counter, &room, seq);
                }
            }
            ServerFrame::Error {
                code, reference, ..
            } => {
                *self.out.errors.entry(code.to_string()).or_insert(0) += 1;
                match reference {
                    Some(Ref::Num(n)) => {
                        if let Ok(counter) = u32::try_from(n) {
                            self.on_send_error(counter, code);
                        }
                    }
                    Some(Ref::Str(r)) if r == JOIN_REF && retryable(code) => {
                        // The server could not join now (its store away, a restart), or
                        // could not read a join's backfill after `joined`: reconnect with
                        // backoff and join again, resuming.
                        return Ok(Some(End::Lost));
                    }
                    Some(Ref::Str(r)) if r == JOIN_REF && !s.established => {
                        for r in &mut self.rooms {
                            if r.base.is_none() {
                                r.refused = true;
                            }
                        }
                        s.joins_waiting = 0;
                        s.established = true;
                        s.syncs_waiting = 0;
                        self.set_away(false);
                    }
                    _ if code == ErrorCode::AuthFailed => {
                        self.connect_failed("auth_failed".into());
                        return Ok(Some(End::Fatal));
                    }
                    None if !s.up && retryable(code) => {
                        // The `auth` answer: the sessions could not be checked now. The
                        // server waits for `auth` again; a reconnect after a backoff
                        // gives it the time it needs.
                        self.connect_failed(format!("auth answered {code}"));
                        return Ok(Some(End::Lost));
                    }
                    _ => {}
                }
            }
            _ => {}
        }
        Ok(None)
    }

    fn on_ack(&mut self, counter: u32, room: &str, seq: u64) {
        let prev = self.ack_seq.get(counter as usize).copied().unwrap_or(0);
        if prev != 0 && prev != seq {
            self.out.ack_conflicts += 1;
        }
        let Some(u) = self.unacked.remove(&counter) else {
            return;
        };
        if let Some(slot) = self.ack_seq.get_mut(counter as usize) {
            *slot = seq;
        }
        let shared = &self.shared;
        let now = shared.clock.now_us();
        self.out.acked += 1;
        shared.live.acked.fetch_add(1, Relaxed);
        shared.live.last_ack_us.fetch_max(now, Relaxed);
        // The room's newest ack before the send stops being in flight (Release, against
        // the drain's Acquire): the drain never sees it neither in flight nor acked.
        shared.heard.acked(room, seq);
        shared.live.in_flight.fetch_sub(1, Release);
        shared
            .ack_latency
            .record(self.plan.idx, now.saturating_sub(u.intended_us));
        let room_idx = match self.room_names.iter().position(|r| r == room) {
            Some(i) => i,
            None => {
                self.room_names.push(room.to_string());
                self.room_names.len() - 1
            }
        };
        self.acked_seqs
            .push((u16::try_from(room_idx).unwrap_or(u16::MAX), seq));
    }

    /// A send answered with an error frame. A retryable one goes again, as long as the
    /// run lasts (a real client keeps its message until it is stored): one still unacked
    /// at the end counts as `unacked`, which fails the run. Any other refuses it for good.
    fn on_send_error(&mut self, counter: u32, code: ErrorCode) {
        let retry_in_us = match code {
            ErrorCode::RateLimited => Some(1_000_000),
            code if retryable(code) => Some(200_000),
            _ => None,
        };
        let Some(u) = self.unacked.get_mut(&counter) else {
            return;
        };
        match retry_in_us {
            Some(first) => {
                let d = (first << u.error_retries.min(4)).min(MAX_ERROR_RETRY_US);
                u.error_retries = u.error_retries.saturating_add(1);
                self.retry.push_back(counter);
                let now = self.shared.clock.now_us();
                let at = now + d;
                self.retry_at_us = Some(self.retry_at_us.map_or(at, |t| t.min(at)));
                if code == ErrorCode::RateLimited {
                    // The bucket refills at the rate: a second of it, not this message's
                    // own backoff.
                    self.hold_until_us = self.hold_until_us.max(now + first);
                }
            }
            None => {
                self.unacked.remove(&counter);
                self.out.refused += 1;
                self.shared.live.in_flight.fetch_sub(1, Relaxed);
            }
        }
    }

    // ---- legacy ----

    fn on_legacy_text(&mut self, text: &str, s: &mut Session) -> Option<End> {
        let (authenticated, message, error) = match serde_json::from_str::<FastLegacy>(text) {
            Ok(f) => (
                f.authenticated,
                f.message.map(Into::into),
                f.error.map(str::to_string),
            ),
            // Escaped text, a numeric message, or not JSON at all.
            Err(_) => match serde_json::from_str::<serde_json::Value>(text) {
                Ok(v) => (
                    v.get("authenticated").and_then(|a| a.as_bool()),
                    v.get("message")
                        .and_then(|m| m.as_str())
                        .map(|m| std::borrow::Cow::Owned(m.to_string())),
                    v.get("error").and_then(|e| e.as_str()).map(str::to_string),
                ),
                Err(_) => {
                    self.out.bad_frames += 1;
                    return None;
                }
            },
        };
        if authenticated == Some(true) {
            self.legacy_up(s);
        }
        if let Some(code) = error {
            *self.out.errors.entry(code.clone()).or_insert(0) += 1;
            if !s.up {
                self.connect_failed(code);
                return Some(End::Fatal);
            }
        }
        if let Some(body) = message {
            self.on_legacy_message(&body, s);
        }
        None
    }

    /// Legacy (and socketio): the server said the session is authenticated.
    fn legacy_up(&mut self, s: &mut Session) {
        if s.up {
            return;
        }
        s.up = true;
        s.established = true;
        s.window_start = self.shared.clock.now_us();
        self.out.connected_once = true;
        self.shared.live.connected.fetch_add(1, Relaxed);
    }

    // ---- socketio ----

    /// One Engine.IO 4 packet: open, ping, close, or a Socket.IO packet (connect ack,
    /// connect error, event). An event `message` carries a legacy frame.
    async fn on_socketio_text(
        &mut self,
        ws: &mut Ws,
        text: &str,
        s: &mut Session,
    ) -> Result<Option<End>, tungstenite::Error> {
        match socketio::packet(text) {
            socketio::Packet::Open => {
                // Connect to the main namespace; the session key went in the URL.
                ws.send(Message::text("40")).await?;
            }
            socketio::Packet::Ping => ws.send(Message::text("3")).await?,
            socketio::Packet::Close => return Ok(Some(self.lost(s, 1000, ""))),
            socketio::Packet::Connected => self.legacy_up(s),
            socketio::Packet::ConnectError(reason) => {
                *self.out.errors.entry(reason.clone()).or_insert(0) += 1;
                if !s.up {
                    self.connect_failed(reason);
                }
                return Ok(Some(End::Fatal));
            }
            socketio::Packet::Message(body) => return Ok(self.on_legacy_text(body, s)),
            socketio::Packet::Other => {}
            socketio::Packet::Bad => self.out.bad_frames += 1,
        }
        Ok(None)
    }

    fn on_legacy_message(&mut self, body: &str, s: &Session) {
        if !self.plan.receives {
            return;
        }
        let Some((tag, g)) = self.shared.cfg.tag(body) else {
            return;
        };
        if self.recv.on_message(g, tag.conn, tag.counter) == Receipt::New {
            let now = self.shared.clock.now_us();
            let intended = self.shared.clock.since_anchor_us(tag.intended_unix_us);
            let timed = account::legacy_timed(intended, s.opened_at, &self.out.windows);
            if !timed {
                // History, or a live message its sender sent late: known at the end.
                self.out
                    .legacy_untimed
                    .push((g, now.saturating_sub(intended)));
            }
            self.count_delivery(tag.intended_unix_us, now, timed);
        }
    }

    fn finish(mut self) -> Output {
        let mut out = std::mem::take(&mut self.out);
        out.unacked = self.unacked.len() as u64;
        for r in &self.rooms {
            out.duplicated += r.duplicated;
            out.out_of_order += r.out_of_order;
            out.resets += r.resets;
            out.held_dropped += r.held_dropped;
            out.refused_joins += u64::from(r.refused);
        }
        for r in self.rooms.drain(..) {
            if let (Some(base), false) = (r.base, r.refused) {
                out.rooms.push(V1RoomOut {
                    name: r.name,
                    base,
                    ours: r.ours,
                    copies: r.copies,
                });
            }
        }
        out.acked_seqs = self
            .acked_seqs
            .iter()
            .filter_map(|&(i, seq)| Some((self.room_names.get(i as usize)?.clone(), seq)))
            .collect();
        if !self.v1() {
            out.duplicated += self.recv.duplicated;
            out.replayed += self.recv.replayed;
            out.out_of_order += self.recv.out_of_order;
            out.sent_at = std::mem::take(&mut self.sent_at);
            if self.plan.receives {
                out.legacy_seen = Some(std::mem::take(&mut self.recv.seen));
            }
        }
        out
    }
}

/// Opens a WebSocket to `url` (ws:// or wss://) over a buffered, Nagle-free TCP
/// connection.
async fn connect(
    url: &str,
    config: WebSocketConfig,
    tls: Arc<rustls::ClientConfig>,
) -> Result<(Ws, tungstenite::handshake::client::Response), tungstenite::Error> {
    use tungstenite::client::IntoClientRequest;
    use tungstenite::error::UrlError;
    let request = url.into_client_request()?;
    let uri = request.uri();
    let host = uri
        .host()
        .ok_or(tungstenite::Error::Url(UrlError::NoHostName))?;
    // An IPv6 literal comes bracketed; the socket address wants it bare.
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let secure = uri.scheme_str() == Some("wss");
    let port = uri.port_u16().unwrap_or(if secure { 443 } else { 80 });
    let tcp = TcpStream::connect((host.as_str(), port)).await?;
    tcp.set_nodelay(true)?;
    let io = BufReader::with_capacity(SOCKET_READ_BYTES, tcp);
    let connector = if secure {
        Connector::Rustls(tls)
    } else {
        Connector::Plain
    };
    tokio_tungstenite::client_async_tls_with_config(request, io, Some(config), Some(connector))
        .await
}

async fn send_frame(ws: &mut Ws, frame: &ClientFrame) -> Result<(), tungstenite::Error> {
    let text = serde_json::to_string(frame).map_err(|e| tungstenite::Error::Io(e.into()))?;
    ws.send(Message::text(text)).await
}

/// `URL?session_key=KEY` (or `&session_key=` if the URL has a query already).
pub(crate) fn legacy_url(base: &str, key: &str) -> String {
    let sep = if base.contains('?') { '&' } else { '?' };
    let mut url = format!("{base}{sep}session_key=");
    for b in key.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            url.push(char::from(b));
        } else {
            url.push_str(&format!("%{b:02X}"));
        }
    }
    url
}

/// The socketio URL: `base` with the path `/socket.io/` when its path is `/` (or empty),
/// Engine.IO's `EIO=4&transport=websocket`, and `session_key=KEY`.
pub(crate) fn socketio_url(base: &str, key: &str) -> String {
    let (head, query) = match base.split_once('?') {
        Some((h, q)) => (h, Some(q)),
        None => (base, None),
    };
    let after_scheme = head.find("://").map_or(0, |i| i + 3);
    let mut url = match head[after_scheme..].find('/') {
        Some(i) if &head[after_scheme + i..] != "/" => head.to_owned(),
        Some(i) => format!("{}/socket.io/", &head[..after_scheme + i]),
        None => format!("{head}/socket.io/"),
    };
    url.push_str("?EIO=4&transport=websocket");
    if let Some(q) = query {
        url.push('&');
        url.push_str(q);
    }
    legacy_url(&url, key)
}

/// The Engine.IO 4 / Socket.IO 5 packets the socketio mode tells apart.
mod socketio {
    /// The start of a Socket.IO event `message` on the main namespace: `42["message",`.
    pub const EVENT: &str = "42[\"message\",";

    #[derive(Debug, PartialEq, Eq)]
    pub enum Packet<'a> {
        /// `0{…}`: the handshake; the client connects to a namespace next.
        Open,
        /// `1`, or `41`: the server closes the session, or leaves the namespace.
        Close,
        /// `2`: the server's heartbeat, to be answered with `3`.
        Ping,
        /// `40…`: connected to the main namespace.
        Connected,
        /// `44{"message":…}`: the connection to the namespace was refused.
        ConnectError(String),
        /// `42["message",BODY]`: BODY, the legacy frame.
        Message(&'a str),
        /// Anything else that is well formed (other events, other namespaces, noop).
        Other,
        /// Not an Engine.IO packet.
        Bad,
    }

    pub fn packet(text: &str) -> Packet<'_> {
        if let Some(rest) = text.strip_prefix(EVENT) {
            return match rest.strip_suffix(']') {
                Some(body) => Packet::Message(body),
                None => Packet::Bad,
            };
        }
        let b = text.as_bytes();
        match (b.first(), b.get(1)) {
            (Some(b'0'), _) => Packet::Open,
            (Some(b'1'), _) => Packet::Close,
            (Some(b'2'), _) => Packet::Ping,
            (Some(b'4'), Some(b'0')) => Packet::Connected,
            // Disconnected from the namespace by the server.
            (Some(b'4'), Some(b'1')) => Packet::Close,
            (Some(b'4'), Some(b'4')) => {
                let reason = serde_json::from_str::<serde_json::Value>(&text[2..])
                    .ok()
                    .and_then(|v| v.get("message")?.as_str().map(str::to_owned))
                    .unwrap_or_else(|| "connect_error".to_owned());
                Packet::ConnectError(reason)
            }
            (Some(b'3' | b'4' | b'5' | b'6'), _) => Packet::Other,
            _ => Packet::Bad,
        }
    }
}

/// A short reason for a failed attempt, fit to be counted.
fn describe(e: &tungstenite::Error) -> String {
    match e {
        tungstenite::Error::Http(r) => format!("http {}", r.status().as_u16()),
        tungstenite::Error::Io(io) => format!("io: {}", io.kind()),
        other => {
            let mut s = other.to_string();
            s.truncate(80);
            s
        }
    }
}

/// How long a session must have been established to reset the reconnect backoff.
const STABLE_SESSION_US: u64 = 1_000_000;

/// An error the server answers when it cannot do it now (its store away, a restart).
fn retryable(code: ErrorCode) -> bool {
    matches!(
        code,
        ErrorCode::Unavailable | ErrorCode::ShuttingDown | ErrorCode::Internal
    )
}

/// Reconnect delay after `attempt` failures in a row: 50 ms doubling to 5 s, with jitter
/// (half to all of it), so that 10,000 clients do not come back in one instant.
fn backoff(attempt: u32) -> Duration {
    let full = (50u64 << attempt.min(7).saturating_sub(1)).min(5_000);
    let ms = rand::rng().random_range(full / 2..=full);
    Duration::from_millis(ms)
}

/// An exponentially distributed duration with this mean (seconds).
pub(crate) fn exponential(mean_s: f64) -> Duration {
    let u: f64 = rand::rng().random();
    Duration::from_secs_f64(-(1.0 - u).ln() * mean_s)
}

#[cfg(test)]
mod tests {
    use super::socketio::{packet, Packet};
    use super::*;

    #[test]
    fn socketio_urls_get_the_engine_io_path_and_query() {
        assert_eq!(
            socketio_url("ws://h:1/", "k 1"),
            "ws://h:1/socket.io/?EIO=4&transport=websocket&session_key=k%201"
        );
        assert_eq!(
            socketio_url("ws://h:1", "k"),
            "ws://h:1/socket.io/?EIO=4&transport=websocket&session_key=k"
        );
        // A path of its own is kept; a query of its own follows Engine.IO's.
        assert_eq!(
            socketio_url("ws://h:1/chat/io/?x=1", "k"),
            "ws://h:1/chat/io/?EIO=4&transport=websocket&x=1&session_key=k"
        );
    }

    #[test]
    fn socketio_packets_are_told_apart() {
        assert_eq!(packet(r#"0{"sid":"a","pingInterval":25000}"#), Packet::Open);
        assert_eq!(packet("2"), Packet::Ping);
        assert_eq!(packet("1"), Packet::Close);
        assert_eq!(packet("41"), Packet::Close);
        assert_eq!(packet(r#"40{"sid":"b"}"#), Packet::Connected);
        assert_eq!(
            packet(r#"44{"message":"not authorized"}"#),
            Packet::ConnectError("not authorized".into())
        );
        assert_eq!(
            packet(r#"42["message",{"message":"hi","user":"u"}]"#),
            Packet::Message(r#"{"message":"hi","user":"u"}"#)
        );
        assert_eq!(packet(r#"42["other",1]"#), Packet::Other);
        assert_eq!(packet(r#"42["message",{"#), Packet::Bad);
        assert_eq!(packet("6"), Packet::Other);
        assert_eq!(packet(r#"{"authenticated":true}"#), Packet::Bad);
        assert_eq!(packet(""), Packet::Bad);
    }
}
