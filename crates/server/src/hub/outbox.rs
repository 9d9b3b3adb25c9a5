//! One connection's outbound side: the order of its rooms' messages (live and backfill),
//! its queue of encoded frames (bounded in bytes), and its socket's write half.
//!
//! Every push is sorted out at once, under the connection's one lock: a live message of a
//! room still being backfilled is held; a seq already written is dropped; anything else is
//! a frame to send. A frame to send is written to the socket right there, by whoever
//! pushes it (the hub's fan-out, the committer's ack), when nothing is queued before it,
//! no write is being held for pacing, and the socket takes it whole without waiting.
//! Otherwise it is queued, and the connection's writer task (`write_loop`) writes what is
//! queued, all of it in one system call, waiting for the socket as long as it has to. On a
//! quiet connection every frame goes out in the fan-out's own `write()`, with no task
//! woken; a frame costs a wake-up only when the socket is full or a write is held.
//!
//! A queue that would pass its byte limit overflows: what waits is dropped, a close with
//! 4008 (slow consumer) is queued, and the connection's token is cancelled. The client
//! resumes from its last seq and loses nothing, because the store is the log. Droppable
//! items (typing notices) are dropped first, once the queue is half full.

use std::collections::VecDeque;
use std::future::Future;
use std::os::fd::AsFd;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::{Buf, Bytes};
use smallvec::SmallVec;
use socket2::SockRef;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use wschat_protocol::close;

use super::frames::{self, Encoded};
use super::pacing::WritePacing;

/// A connection's handle on one of its room subscriptions.
pub type SubId = u32;

/// The write half of a connection's socket.
pub type WriteIo = Pin<Box<dyn AsyncWrite + Send>>;

/// What is pushed to a connection.
#[derive(Debug, Clone)]
pub enum Item {
    /// A reply or notice that is not part of a room's message order.
    Frame(Encoded),
    /// A message of a subscribed room, read from the store on join.
    Backfill {
        sub: SubId,
        seq: u64,
        frame: Encoded,
    },
    /// Start tracking a subscription: its live messages are held until `Outbox::sync_done`.
    Track { sub: SubId },
    /// Stop tracking a subscription (the room was left).
    Untrack { sub: SubId },
    /// A presence diff: dropped while `sub` is syncing (its backfill ends with a full
    /// list), and under pressure as typing is, after which `sub`'s presence is stale: its
    /// next diffs answer `Pushed::Stale` (when a full list would fit) instead.
    PresenceDiff { sub: SubId, frame: Encoded },
    /// The room's full presence list for `sub`, whose presence is stale: it is current
    /// again once this gets through.
    PresenceSnapshot { sub: SubId, frame: Encoded },
    /// The room's full presence list that ends `sub`'s backfill: a reply, never dropped,
    /// after which `sub`'s presence is current (a diff dropped before it is in it).
    PresenceList { sub: SubId, frame: Encoded },
    /// A notice that may be dropped under pressure (typing).
    Droppable { sub: SubId, frame: Encoded },
    /// A WebSocket ping.
    Ping,
    /// Close the connection with this code and reason, after what is queued before it.
    Close(u16, &'static str),
}

/// What a queued frame counts for against the limit, beyond its bytes.
const OVERHEAD: usize = 32;

/// The longest gap between pushes the pacing average counts (a quiet second is as quiet
/// as a quiet hour).
const GAP_CAP_US: u32 = 1_000_000;

/// How long a cancelled connection's writer tries to get its close frame out.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// Per-room state: live messages are held while the backfill is written, then those not
/// already written go out.
struct SubState {
    sub: SubId,
    syncing: bool,
    last: u64,
    held: Vec<(u64, Encoded)>,
    held_bytes: usize,
    /// More live messages came while syncing than the queue's limit holds: they were
    /// dropped, and the backfill reads them from the store (`Synced::Lagged`).
    lagged: bool,
    /// Times `sync_done` found the subscription lagged.
    lag_rounds: u32,
    /// A presence diff was dropped under pressure: the client's list is wrong until a
    /// full one gets through (`Item::PresenceSnapshot`).
    presence_stale: bool,
}

/// Times a backfill may be told to read on (`Synced::Lagged`) before the connection is
/// closed as a slow consumer: a room whose live messages keep outrunning its backfill.
const MAX_LAG_ROUNDS: u32 = 8;

/// What `Outbox::sync_done` found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Synced {
    /// The held live messages newer than the backfill went out; live ones go at once now.
    Done,
    /// Live messages were dropped while the backfill ran (more than the limit held):
    /// still syncing, nothing held. Read the store on from `through` and call again.
    Lagged,
    /// The subscription is not tracked, or the connection is closing (perhaps closed now,
    /// with 4008, after `MAX_LAG_ROUNDS`).
    Closed,
}

struct State {
    /// Encoded frames waiting for the writer, in order.
    queue: VecDeque<Encoded>,
    /// What the queue counts for against the limit.
    bytes: usize,
    /// While the writer writes what it took from the queue: its `written` count once all
    /// of it is written (0 otherwise). What is not written yet counts against the limit
    /// too (else a client that reads nothing holds twice the limit).
    in_flight_until: u64,
    /// Inline for the usual one or two rooms: a fan-out finds the subscription in the
    /// cache lines the lock just brought in, not in a heap buffer of its own.
    subs: SmallVec<[SubState; 2]>,
    /// A close is queued (or the client closed): nothing more is accepted.
    closing: bool,
    /// The socket's write half, while the writer task is not using it.
    io: Option<WriteIo>,
    /// The queue's first frame is the rest of one the socket took part of: it must go
    /// out whole before anything else (even a close).
    partial: bool,
    /// A write went out but the socket layer kept bytes back (TLS): the writer flushes.
    flush: bool,
    /// When the last write went out, while pacing is on.
    last_write: Option<Instant>,
    /// When the last push came, while pacing is on.
    last_push: Option<Instant>,
    /// The time between this connection's pushes, smoothed (microseconds), while pacing
    /// is on: only a connection that gets frames more often than the pacing delay is
    /// held. Pushes, not writes: a held connection's writes are the delay apart, or a
    /// moment more (the flusher wakes on the timer's next tick), so an average of the
    /// gaps between writes climbs past the delay and lets a frame out on a write of its
    /// own every few writes.
    push_gap_us: u32,
    /// The socket failed or the writer ended: nothing more can be written.
    dead: bool,
    /// Registered with the node's flusher (`WritePacing::hold`) for a held write.
    held_registered: bool,
}

impl State {
    /// What counts against the limit: the queue, and what of the write under way is not
    /// written yet (`written`: the writer's count of bytes written).
    fn held(&self, written: &AtomicU64) -> usize {
        let left = self
            .in_flight_until
            .saturating_sub(written.load(Ordering::Relaxed));
        self.bytes + usize::try_from(left).unwrap_or(usize::MAX)
    }
}

pub struct Outbox {
    /// Itself, to register with the node's flusher when a write is held.
    me: Weak<Outbox>,
    state: Mutex<State>,
    /// On a plain connection, the TCP socket itself: a frame that can go at once is
    /// written to it directly (the write half in `State` writes to it too).
    raw: Option<Arc<TcpStream>>,
    ready: Notify,
    drained: Notify,
    /// Bytes the writer task has written so far: a wait for the queue to drain tells a
    /// client that reads slowly from one that reads nothing.
    written: AtomicU64,
    limit: usize,
    /// Most bytes of queued frames joined into one write.
    max_write: usize,
    pacing: Arc<WritePacing>,
    /// Cancelled when the connection must end now (overflow, revoked session, dead socket).
    pub cancel: CancellationToken,
}

/// What `push` did with an item.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    /// Written to the socket, queued, or (for state changes) applied.
    Queued,
    /// A droppable item was dropped under pressure, or the connection is closing.
    Dropped,
    /// The queue overflowed: the connection is being closed with 4008.
    Overflow,
    /// A presence diff for a subscription whose presence is stale, now that a full list
    /// would fit: push it that (`Item::PresenceSnapshot`) instead.
    Stale,
}

/// On Linux a direct `send` on a closed socket returns an error and raises no SIGPIPE, as
/// std's and tokio's writes do (elsewhere Rust programs ignore SIGPIPE from the start).
#[cfg(any(target_os = "linux", target_os = "android"))]
const SEND_FLAGS: libc::c_int = libc::MSG_NOSIGNAL;
#[cfg(not(any(target_os = "linux", target_os = "android")))]
const SEND_FLAGS: libc::c_int = 0;

/// What a direct write did.
enum Direct {
    Written,
    /// The socket took the first `n` bytes.
    Partial(usize),
    /// Not now: queue it.
    Queue,
    /// Held for pacing until then: queue it, and have the node's flusher write it.
    Held(Instant),
    Failed,
}

impl Outbox {
    pub fn new(
        io: WriteIo,
        raw: Option<Arc<TcpStream>>,
        limit: usize,
        max_write: usize,
        pacing: Arc<WritePacing>,
        cancel: CancellationToken,
    ) -> Arc<Self> {
        Arc::new_cyclic(|me| Self {
            me: me.clone(),
            state: Mutex::new(State {
                queue: VecDeque::new(),
                bytes: 0,
                in_flight_until: 0,
                subs: SmallVec::new(),
                closing: false,
                io: Some(io),
                partial: false,
                flush: false,
                last_write: None,
                last_push: None,
                push_gap_us: u32::MAX,
                dead: false,
                held_registered: false,
            }),
            raw,
            ready: Notify::new(),
            drained: Notify::new(),
            written: AtomicU64::new(0),
            limit,
            max_write: max_write.max(1),
            pacing,
            cancel,
        })
    }

    /// Load the lines a push touches first (the lock's, and the TCP socket's) and nothing
    /// else: called for several outboxes in a row, their cache misses overlap.
    pub fn warm(&self) {
        std::hint::black_box(self.state.is_poisoned());
        if let Some(tcp) = &self.raw {
            std::hint::black_box(tcp.as_fd());
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock is a bug; the state stays usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn push(&self, item: Item) -> Pushed {
        let mut state = self.lock();
        if state.closing {
            return Pushed::Dropped;
        }
        match item {
            Item::Frame(frame) => self.send(&mut state, frame),
            Item::Backfill { sub, seq, frame } => {
                let Some(s) = state.subs.iter_mut().find(|s| s.sub == sub) else {
                    return Pushed::Dropped;
                };
                s.last = s.last.max(seq);
                self.send(&mut state, frame)
            }
            Item::Track { sub } => {
                state.subs.retain(|s| s.sub != sub);
                state.subs.push(SubState {
                    sub,
                    syncing: true,
                    last: 0,
                    held: Vec::new(),
                    held_bytes: 0,
                    lagged: false,
                    lag_rounds: 0,
                    presence_stale: false,
                });
                Pushed::Queued
            }
            Item::Untrack { sub } => {
                state.subs.retain(|s| s.sub != sub);
                Pushed::Queued
            }
            Item::PresenceDiff { sub, frame } => {
                let pressed = self.pressed(&state, &frame);
                let Some(s) = state.subs.iter_mut().find(|s| s.sub == sub && !s.syncing) else {
                    return Pushed::Dropped;
                };
                if s.presence_stale {
                    return if pressed {
                        Pushed::Dropped
                    } else {
                        Pushed::Stale
                    };
                }
                if pressed {
                    s.presence_stale = true;
                    return Pushed::Dropped;
                }
                self.send(&mut state, frame)
            }
            Item::PresenceSnapshot { sub, frame } => {
                let pressed = self.pressed(&state, &frame);
                let Some(s) = state.subs.iter_mut().find(|s| s.sub == sub && !s.syncing) else {
                    return Pushed::Dropped;
                };
                if pressed {
                    return Pushed::Dropped;
                }
                s.presence_stale = false;
                self.send(&mut state, frame)
            }
            Item::PresenceList { sub, frame } => {
                if let Some(s) = state.subs.iter_mut().find(|s| s.sub == sub) {
                    s.presence_stale = false;
                }
                self.send(&mut state, frame)
            }
            Item::Droppable { sub, frame } => {
                if self.pressed(&state, &frame) {
                    return Pushed::Dropped;
                }
                self.send_to_synced(&mut state, sub, frame)
            }
            Item::Ping => self.send(&mut state, frames::ping()),
            Item::Close(code, reason) => {
                self.close_locked(&mut state, code, reason);
                Pushed::Queued
            }
        }
    }

    /// Whether `frame` would take the queue past half its limit: typing notices and
    /// presence diffs are dropped from there on, before anything else.
    fn pressed(&self, state: &State, frame: &Encoded) -> bool {
        state.held(&self.written) + frame.len() + OVERHEAD > self.limit / 2
    }

    /// Frames that are not part of a room's message order (a batch's acks to one
    /// sender), in order: in one write when they can go at once.
    pub fn push_frames(&self, frames: &[Encoded]) -> Pushed {
        let mut state = self.lock();
        if state.closing {
            return Pushed::Dropped;
        }
        self.send_all(&mut state, frames)
    }

    /// The backfill of `sub` is complete through seq `through`: the live messages held
    /// meanwhile, and newer than that, go out, and later ones go at once (`Done`). Unless
    /// some were dropped meanwhile (`Lagged`): the caller reads the store on from
    /// `through` and calls again.
    pub fn sync_done(&self, sub: SubId, through: u64) -> Synced {
        let mut state = self.lock();
        if state.closing {
            return Synced::Closed;
        }
        let Some(s) = state.subs.iter_mut().find(|s| s.sub == sub) else {
            return Synced::Closed;
        };
        s.last = s.last.max(through);
        if s.lagged {
            s.lagged = false;
            s.lag_rounds += 1;
            if s.lag_rounds > MAX_LAG_ROUNDS {
                self.overflow(&mut state);
                return Synced::Closed;
            }
            return Synced::Lagged;
        }
        s.syncing = false;
        s.held_bytes = 0;
        let mut release = Vec::new();
        for (seq, frame) in std::mem::take(&mut s.held) {
            if seq > s.last {
                s.last = seq;
                release.push(frame);
            }
        }
        match self.send_all(&mut state, &release) {
            Pushed::Queued | Pushed::Dropped | Pushed::Stale => Synced::Done,
            Pushed::Overflow => Synced::Closed,
        }
    }

    /// Live messages of subscription `sub`, delivered by the hub: a run of one room's
    /// consecutive messages (a commit batch's, or a catch-up read's), `frames[i]` being
    /// seq `first + i`. Held while the room's backfill is written; seqs already written
    /// are dropped; the rest go out together, in one write when they can go at once.
    pub fn push_live(&self, sub: SubId, first: u64, frames: &[Encoded]) -> Pushed {
        let mut state = self.lock();
        if state.closing {
            return Pushed::Dropped;
        }
        let Some(s) = state.subs.iter_mut().find(|s| s.sub == sub) else {
            return Pushed::Dropped;
        };
        if s.syncing {
            if s.lagged {
                return Pushed::Dropped;
            }
            let bytes: usize = frames.iter().map(|f| f.len()).sum();
            if s.held_bytes + bytes > self.limit {
                // Not the client's fault (it reads the backfill as fast as the store
                // gives it): the backfill reads these from the store instead.
                s.held = Vec::new();
                s.held_bytes = 0;
                s.lagged = true;
                return Pushed::Dropped;
            }
            s.held_bytes += bytes;
            s.held
                .extend((first..).zip(frames).map(|(seq, f)| (seq, f.clone())));
            return Pushed::Queued;
        }
        // The run's seqs up to the last one written are a prefix of it.
        let written = usize::try_from((s.last + 1).saturating_sub(first)).unwrap_or(usize::MAX);
        let Some(fresh) = frames.get(written..).filter(|f| !f.is_empty()) else {
            return Pushed::Dropped;
        };
        s.last = first + frames.len() as u64 - 1;
        self.send_all(&mut state, fresh)
    }

    /// A room event goes only to a subscription that is tracked and not syncing.
    fn send_to_synced(&self, state: &mut State, sub: SubId, frame: Encoded) -> Pushed {
        match state.subs.iter().find(|s| s.sub == sub) {
            Some(s) if !s.syncing => self.send(state, frame),
            _ => Pushed::Dropped,
        }
    }

    /// Whether `sub`'s presence list went stale (a diff dropped under pressure) and has
    /// not been replaced since.
    pub fn presence_stale(&self, sub: SubId) -> bool {
        self.lock()
            .subs
            .iter()
            .any(|s| s.sub == sub && s.presence_stale)
    }

    /// Queue a close after what is already queued; later pushes are dropped.
    pub fn close(&self, code: u16, reason: &'static str) {
        let mut state = self.lock();
        if !state.closing {
            self.close_locked(&mut state, code, reason);
        }
    }

    /// The client went away (no close frame to answer) or its socket failed: write what
    /// is queued, then stop, with no close frame of ours.
    pub fn finish(&self) {
        self.lock().closing = true;
        self.ready.notify_one();
    }

    /// Bytes tungstenite writes itself (pongs): queued in order with everything else.
    pub fn push_raw(&self, bytes: Bytes) {
        let mut state = self.lock();
        if !state.closing {
            self.send(&mut state, bytes);
        }
    }

    fn close_locked(&self, state: &mut State, code: u16, reason: &str) {
        self.send(state, frames::close(code, reason));
        state.closing = true;
        // Also when the close frame went out at once: the writer ends.
        self.ready.notify_one();
    }

    fn overflow(&self, state: &mut State) -> Pushed {
        let rest = state.partial.then(|| state.queue.pop_front()).flatten();
        state.queue.clear();
        state.bytes = 0;
        if let Some(rest) = rest {
            state.bytes = rest.len() + OVERHEAD;
            state.queue.push_back(rest);
        }
        state.subs.clear();
        state
            .queue
            .push_back(frames::close(close::SLOW_CONSUMER, "slow consumer: resume"));
        state.closing = true;
        metrics::counter!("wschat_queue_overflows_total").increment(1);
        self.cancel.cancel();
        self.ready.notify_one();
        Pushed::Overflow
    }

    /// Write `frame` now if it can go at once, else queue it for the writer.
    fn send(&self, state: &mut State, frame: Encoded) -> Pushed {
        self.send_all(state, std::slice::from_ref(&frame))
    }

    /// Write `frames` now, as few writes as `max_write` allows, while the socket takes them
    /// whole without waiting; queue the rest for the writer. The queue's byte limit counts
    /// what is queued: past it, the connection overflows.
    fn send_all(&self, state: &mut State, frames: &[Encoded]) -> Pushed {
        if frames.is_empty() {
            return Pushed::Queued;
        }
        if state.dead {
            return Pushed::Dropped;
        }
        self.arrived(state);
        let mut rest = frames;
        // Bytes of `rest[0]` the socket took.
        let mut cut = 0;
        let mut wake_writer = state.queue.is_empty();
        while let [first, ..] = rest {
            let (direct, count) = match rest.len() {
                1 => (self.write_now(state, first), 1),
                _ => {
                    let (joined, count) = join(rest, self.max_write);
                    (self.write_now(state, &joined), count)
                }
            };
            match direct {
                Direct::Written => {
                    self.wrote(state, count);
                    rest = &rest[count..];
                }
                Direct::Partial(mut n) => {
                    let mut whole = 0;
                    while n >= rest[whole].len() {
                        n -= rest[whole].len();
                        whole += 1;
                    }
                    // The cut frame is counted when the writer finishes it.
                    self.wrote(state, whole);
                    rest = &rest[whole..];
                    cut = n;
                    state.partial = n > 0;
                    break;
                }
                Direct::Queue => break,
                Direct::Held(at) => {
                    // The node's flusher writes it (with whatever joins it) when the hold
                    // ends: no task of this connection is woken for it.
                    if !state.held_registered {
                        state.held_registered = true;
                        self.pacing.hold(at, self.me.clone());
                        metrics::counter!("wschat_writes_held_total").increment(1);
                    }
                    wake_writer = false;
                    break;
                }
                Direct::Failed => {
                    state.dead = true;
                    self.cancel.cancel();
                    return Pushed::Dropped;
                }
            }
        }
        let [first, more @ ..] = rest else {
            return Pushed::Queued;
        };
        state.bytes += rest.iter().map(|f| f.len() + OVERHEAD).sum::<usize>() - cut;
        state.queue.push_back(first.slice(cut..));
        state.queue.extend(more.iter().cloned());
        if state.held(&self.written) > self.limit {
            return self.overflow(state);
        }
        if wake_writer {
            self.ready.notify_one();
        }
        Pushed::Queued
    }

    /// A held write's time has come (the node's flusher): write what is queued, joined,
    /// if it goes at once; else it is the writer task's.
    pub(super) fn flush_held(&self) {
        let mut state = self.lock();
        state.held_registered = false;
        if state.queue.is_empty() || state.dead || state.flush || state.io.is_none() {
            return;
        }
        if let Some(at) = self.held(&state) {
            state.held_registered = true;
            self.pacing.hold(at, self.me.clone());
            return;
        }
        let (joined, _) = join(&state.queue, self.max_write);
        let written = match self.try_write(&mut state, &joined) {
            Direct::Written => joined.len(),
            Direct::Partial(n) => n,
            Direct::Queue | Direct::Held(_) => 0,
            Direct::Failed => {
                state.dead = true;
                self.cancel.cancel();
                return;
            }
        };
        if written > 0 {
            // As in `send_all`: a frame the socket took part of counts when it is finished.
            let (whole, cut) = consume(&mut state.queue, written);
            self.wrote(&mut state, whole);
            state.partial = cut;
        }
        state.bytes = state.queue.iter().map(|f| f.len() + OVERHEAD).sum();
        if !state.queue.is_empty() {
            // The rest (or all of it, the socket being full) is the writer task's.
            self.ready.notify_one();
        }
        drop(state);
        if written > 0 {
            // A backfill waiting for the queue to drain (`wait_below`) goes on: the writer
            // task, which otherwise tells it, did not write this.
            self.drained.notify_waiters();
        }
    }

    /// Try to write `bytes` to the socket without waiting: only when nothing is queued
    /// before them, the writer is not using the socket, and no write is held for pacing. A
    /// plain connection's TCP socket takes one non-blocking write; a TLS stream is polled
    /// with a waker that does nothing, and the writer task polls it again with its own
    /// before it waits.
    fn write_now(&self, state: &mut State, bytes: &[u8]) -> Direct {
        if !state.queue.is_empty() || state.flush {
            return Direct::Queue;
        }
        if let Some(at) = self.held(state) {
            return Direct::Held(at);
        }
        self.try_write(state, bytes)
    }

    /// One write of `bytes` that does not wait, if the writer task is not using the socket.
    fn try_write(&self, state: &mut State, bytes: &[u8]) -> Direct {
        let Some(io) = state.io.as_mut() else {
            return Direct::Queue;
        };
        let written = match &self.raw {
            // The TCP socket: one non-blocking write, no layers in between.
            // Through the socket itself, not tokio's `try_write`: that reads the socket's
            // readiness, a cache line of its own per connection and one miss per delivery
            // in a fan-out. A full socket (WouldBlock) is queued; the writer task's own
            // write then finds it full too and waits for tokio's wake-up.
            Some(tcp) => match SockRef::from(tcp.as_ref()).send_with_flags(bytes, SEND_FLAGS) {
                Ok(0) => return Direct::Failed,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Direct::Queue,
                Err(_) => return Direct::Failed,
            },
            None => {
                let mut cx = Context::from_waker(Waker::noop());
                // Outside tokio's cooperative budget: a fan-out writes to many sockets from
                // one task, and a spent budget would make every socket look full.
                let mut write =
                    std::pin::pin!(tokio::task::unconstrained(std::future::poll_fn(|cx| io
                        .as_mut()
                        .poll_write(cx, bytes))));
                let written = match write.as_mut().poll(&mut cx) {
                    Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Direct::Failed,
                    Poll::Ready(Ok(n)) => n,
                    Poll::Pending => return Direct::Queue,
                };
                // TLS keeps what the socket did not take; the writer flushes it.
                match io.as_mut().poll_flush(&mut cx) {
                    Poll::Ready(Ok(())) => {}
                    Poll::Ready(Err(_)) => return Direct::Failed,
                    Poll::Pending => {
                        state.flush = true;
                        self.ready.notify_one();
                    }
                }
                written
            }
        };
        if written < bytes.len() {
            Direct::Partial(written)
        } else {
            Direct::Written
        }
    }

    fn wrote(&self, state: &mut State, frames: usize) {
        self.pacing.wrote(frames);
        state.last_write = (!self.pacing.delay().is_zero()).then(Instant::now);
    }

    /// A push came: while pacing is on, its gap since the last one joins the average.
    fn arrived(&self, state: &mut State) {
        if self.pacing.delay().is_zero() {
            state.last_push = None;
            state.push_gap_us = u32::MAX;
            return;
        }
        let now = Instant::now();
        if let Some(last) = state.last_push {
            let gap = u32::try_from((now - last).as_micros()).unwrap_or(u32::MAX);
            // An average over the last few gaps (weight 1/4 to the newest).
            let old = u64::from(state.push_gap_us.min(GAP_CAP_US));
            state.push_gap_us = ((old * 3 + u64::from(gap.min(GAP_CAP_US))) / 4) as u32;
        }
        state.last_push = Some(now);
    }

    /// Until when the next write is held (pacing), if it is: while the node is busy, a
    /// connection that gets frames more often than the delay (a hot room's member) holds
    /// a write until the delay after its last one, so what arrives meanwhile shares the
    /// write. A connection that gets a frame now and then (a quiet room, a chat of ten)
    /// writes at once: holding it would add latency and save nothing. Nor is the rest of
    /// a write that already went out held: a frame the socket took part of, or bytes TLS
    /// kept back.
    fn held(&self, state: &State) -> Option<Instant> {
        let delay = self.pacing.delay();
        if delay.is_zero()
            || state.partial
            || state.flush
            || u128::from(state.push_gap_us) >= delay.as_micros()
        {
            return None;
        }
        let at = state.last_write? + delay;
        (at > Instant::now()).then_some(at)
    }

    /// Wait until the queue holds at most `bytes` (for pacing a long backfill), or the
    /// connection is closing or cancelled. A client that takes nothing for `stall` (its
    /// socket full, the writer blocked) is a slow consumer: closed with 4008, as a live
    /// queue that overflows is. The waiting backfill holds the connection's reader, so
    /// nothing else (idle timeout, shutdown) would end the wait.
    pub async fn wait_below(&self, bytes: usize, stall: Duration) {
        let mut seen = self.written.load(Ordering::Relaxed);
        loop {
            if self.cancel.is_cancelled() {
                return;
            }
            let notified = self.drained.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let state = self.lock();
                if state.held(&self.written) <= bytes || state.closing || state.dead {
                    return;
                }
            }
            tokio::select! {
                _ = notified => {}
                _ = self.cancel.cancelled() => return,
                _ = tokio::time::sleep(stall) => {
                    // A slow reader: the writer's write is under way, a piece at a time.
                    let now = self.written.load(Ordering::Relaxed);
                    if now != seen {
                        seen = now;
                        continue;
                    }
                    let mut state = self.lock();
                    if !state.closing && !state.dead {
                        tracing::info!(stall_ms = stall.as_millis() as u64, "backfill stalled: the client reads nothing");
                        self.overflow(&mut state);
                    }
                    return;
                }
            }
        }
    }

    /// What the queue and the writer's write under way count for against the limit.
    pub fn queued_bytes(&self) -> usize {
        self.lock().held(&self.written)
    }

    /// The connection's writer: writes what is queued (all of it in one system call) until
    /// the close is written, the client's close is answered, the socket fails, or the
    /// connection is cancelled.
    pub async fn write_loop(self: Arc<Self>) {
        let mut batch: VecDeque<Encoded> = VecDeque::new();
        loop {
            let notified = self.ready.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let step = {
                let mut state = self.lock();
                if state.queue.is_empty() && !state.flush {
                    if state.closing || state.dead {
                        state.dead = true;
                        // The write half goes with the state: the socket closes once the
                        // reader lets go of its half too.
                        state.io = None;
                        return;
                    }
                    Step::Wait
                } else if let Some(at) = self.held(&state) {
                    Step::Hold(at)
                } else if let Some(io) = state.io.take() {
                    // Its bytes, not what they count for: `written` counts bytes, so the
                    // frames' `OVERHEAD` would stay counted until the whole batch is out.
                    let taken: usize = state.queue.iter().map(|f| f.len()).sum();
                    batch.extend(state.queue.drain(..));
                    state.bytes = 0;
                    state.in_flight_until = self.written.load(Ordering::Relaxed) + taken as u64;
                    state.partial = false;
                    state.flush = false;
                    Step::Write(io)
                } else {
                    // Cannot happen: only this task takes the write half out.
                    Step::Wait
                }
            };
            let mut io = match step {
                Step::Wait => {
                    tokio::select! {
                        _ = notified => continue,
                        _ = self.cancel.cancelled() => {
                            let io = self.lock().io.take();
                            return self.last_words(io, batch).await;
                        }
                    }
                }
                Step::Hold(at) => {
                    tokio::select! {
                        _ = tokio::time::sleep_until(at) => continue,
                        _ = self.cancel.cancelled() => {
                            let io = self.lock().io.take();
                            return self.last_words(io, batch).await;
                        }
                    }
                }
                Step::Write(io) => io,
            };
            let frames = batch.len();
            let result = tokio::select! {
                result = write_all(&mut io, &mut batch, self.max_write, &self.written) => result,
                _ = self.cancel.cancelled() => return self.last_words(Some(io), batch).await,
            };
            {
                let mut state = self.lock();
                state.io = Some(io);
                state.in_flight_until = 0;
                self.wrote(&mut state, frames);
                if result.is_err() {
                    state.dead = true;
                    state.io = None;
                }
            }
            self.drained.notify_waiters();
            if result.is_err() {
                self.cancel.cancel();
                return;
            }
        }
    }

    /// A cancelled connection (overflow, killed): get what is left (the close frame, after
    /// any frame half written) out within a moment, and stop.
    async fn last_words(&self, io: Option<WriteIo>, mut batch: VecDeque<Encoded>) {
        let io = {
            let mut state = self.lock();
            batch.extend(state.queue.drain(..));
            state.bytes = 0;
            state.in_flight_until = 0;
            state.partial = false;
            state.dead = true;
            io.or_else(|| state.io.take())
        };
        if let Some(mut io) = io {
            let _best_effort = tokio::time::timeout(
                CLOSE_GRACE,
                write_all(&mut io, &mut batch, self.max_write, &self.written),
            )
            .await;
        }
        self.drained.notify_waiters();
    }
}

enum Step {
    Wait,
    Hold(Instant),
    Write(WriteIo),
}

/// Write every frame of `batch` (up to `max_write` bytes of them in one system call), then
/// flush. What is written leaves `batch`, so a cancelled write can be resumed without
/// breaking a frame.
async fn write_all(
    io: &mut WriteIo,
    batch: &mut VecDeque<Encoded>,
    max_write: usize,
    written: &AtomicU64,
) -> std::io::Result<()> {
    while let Some(first) = batch.front() {
        let n = if batch.len() == 1 || first.len() >= max_write {
            io.write(first).await?
        } else {
            io.write(&join(batch.iter(), max_write).0).await?
        };
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        written.fetch_add(n as u64, Ordering::Relaxed);
        consume(batch, n);
    }
    io.flush().await
}

/// The first frames of `frames` joined into one buffer of at most `max_write` bytes (the
/// first frame whole, however long), and how many frames that is.
fn join<'a>(frames: impl IntoIterator<Item = &'a Encoded>, max_write: usize) -> (Vec<u8>, usize) {
    let mut joined = Vec::new();
    let mut count = 0;
    for frame in frames {
        if count > 0 && joined.len() + frame.len() > max_write {
            break;
        }
        joined.extend_from_slice(frame);
        count += 1;
    }
    (joined, count)
}

/// Drop the first `n` bytes of `batch`: how many frames went whole, and whether that cut
/// its (new) first frame.
fn consume(batch: &mut VecDeque<Encoded>, mut n: usize) -> (usize, bool) {
    let mut whole = 0;
    while n > 0 {
        let Some(front) = batch.front_mut() else {
            break;
        };
        if front.len() <= n {
            n -= front.len();
            batch.pop_front();
            whole += 1;
        } else {
            front.advance(n);
            return (whole, true);
        }
    }
    (whole, false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncRead, AsyncReadExt};

    const WAIT: Duration = Duration::from_secs(5);

    /// An outbox over one end of an in-memory pipe of `capacity` bytes, its writer task
    /// running; the other end is what the client reads.
    fn outbox(limit: usize, capacity: usize) -> (Arc<Outbox>, tokio::io::DuplexStream) {
        paced_outbox(limit, capacity, WritePacing::new(Duration::ZERO, 0))
    }

    fn paced_outbox(
        limit: usize,
        capacity: usize,
        pacing: Arc<WritePacing>,
    ) -> (Arc<Outbox>, tokio::io::DuplexStream) {
        tokio::spawn(pacing.clone().flush_held(CancellationToken::new()));
        unflushed_outbox(limit, capacity, pacing)
    }

    /// An outbox whose pacing's flusher the caller starts (once for several outboxes).
    fn unflushed_outbox(
        limit: usize,
        capacity: usize,
        pacing: Arc<WritePacing>,
    ) -> (Arc<Outbox>, tokio::io::DuplexStream) {
        let (server, client) = tokio::io::duplex(capacity);
        let outbox = Outbox::new(
            Box::pin(server),
            None,
            limit,
            64 * 1024,
            pacing,
            CancellationToken::new(),
        );
        tokio::spawn(outbox.clone().write_loop());
        (outbox, client)
    }

    /// Whether the client can read something now (without time passing), reading it all.
    async fn got_something(client: &mut tokio::io::DuplexStream) -> bool {
        use futures_util::FutureExt;
        // Let the writer task run first.
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        let mut buf = vec![0u8; 1 << 16];
        let mut any = false;
        while let Some(Ok(n)) = client.read(&mut buf).now_or_never() {
            if n == 0 {
                break;
            }
            any = true;
        }
        any
    }

    #[tokio::test(start_paused = true)]
    async fn held_writes_go_out_when_their_own_hold_ends() {
        let delay = Duration::from_millis(50);
        let pacing = WritePacing::new(delay, 0);
        tokio::spawn(pacing.clone().flush_held(CancellationToken::new()));
        let (a, mut a_client) = unflushed_outbox(1 << 20, 1 << 16, pacing.clone());
        let (b, mut b_client) = unflushed_outbox(1 << 20, 1 << 16, pacing);
        let ms = Duration::from_millis;
        // Both hot: a frame a millisecond for 40 ms.
        for _ in 0..40 {
            tokio::time::advance(ms(1)).await;
            a.push(Item::Frame(frame("a")));
            b.push(Item::Frame(frame("b")));
        }
        tokio::time::advance(ms(60)).await;
        got_something(&mut a_client).await;
        got_something(&mut b_client).await;
        // The flusher wrote their held frames just now (the clock jumped past their
        // holds' ends): another delay, and neither wrote within it.
        tokio::time::advance(ms(60)).await;
        // a writes at once now, and b 20 ms later.
        a.push(Item::Frame(frame("a")));
        assert!(got_something(&mut a_client).await);
        tokio::time::advance(ms(20)).await;
        b.push(Item::Frame(frame("b")));
        assert!(got_something(&mut b_client).await);
        // 5 ms later each holds one: b's hold (registered first) ends 20 ms after a's.
        tokio::time::advance(ms(5)).await;
        b.push(Item::Frame(frame("b held")));
        a.push(Item::Frame(frame("a held")));
        assert!(!got_something(&mut a_client).await && !got_something(&mut b_client).await);
        tokio::time::advance(ms(26)).await;
        assert!(got_something(&mut a_client).await, "a's hold has ended");
        assert!(!got_something(&mut b_client).await, "b's has not");
        tokio::time::advance(ms(20)).await;
        assert!(got_something(&mut b_client).await, "now b's has");
    }

    /// A backfill waits for the queue to drain (`wait_below`) before it queues more; when
    /// the queue was held and the node's flusher writes it, that wait ends too.
    #[tokio::test(start_paused = true)]
    async fn a_wait_for_the_queue_to_drain_ends_when_the_flusher_writes_it() {
        let delay = Duration::from_millis(50);
        let limit = 4096;
        let (outbox, mut client) = paced_outbox(limit, 1 << 16, WritePacing::new(delay, 0));
        // Hot: a frame a millisecond, read as it comes.
        for _ in 0..40 {
            tokio::time::advance(Duration::from_millis(1)).await;
            outbox.push(Item::Frame(frame("often")));
            got_something(&mut client).await;
        }
        // Now held: queue past half the limit, as a backfill does before it waits.
        while outbox.queued_bytes() <= limit / 2 {
            outbox.push(Item::Frame(frame("backfill")));
        }
        assert!(!got_something(&mut client).await, "held");
        let waiting = tokio::spawn({
            let outbox = outbox.clone();
            async move { outbox.wait_below(limit / 4, Duration::from_secs(60)).await }
        });
        tokio::time::advance(delay).await;
        assert!(
            got_something(&mut client).await,
            "the flusher wrote the held queue"
        );
        tokio::time::timeout(WAIT, waiting)
            .await
            .expect("the wait for the queue ended with the flusher's write")
            .unwrap();
    }

    /// A backfill's wait (`wait_below`, the given stall) on an outbox over a 256-byte pipe
    /// that nobody reads yet: the writer took what was queued and blocks on the full pipe,
    /// and the backfill queued past half the limit again.
    async fn backfill_waiting(
        stall: Duration,
    ) -> (
        Arc<Outbox>,
        tokio::io::DuplexStream,
        tokio::task::JoinHandle<()>,
    ) {
        let limit = 4096;
        let (outbox, client) = outbox(limit, 256);
        let fill = || {
            while outbox.queued_bytes() <= limit / 2 {
                outbox.push(Item::Frame(frame(&"b".repeat(200))));
            }
        };
        fill();
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        fill();
        let waiting = tokio::spawn({
            let outbox = outbox.clone();
            async move { outbox.wait_below(limit / 4, stall).await }
        });
        (outbox, client, waiting)
    }

    /// A backfill waiting for a client that reads nothing does not wait forever: after
    /// the stall it gives, the connection is closed as a slow consumer (4008).
    #[tokio::test(start_paused = true)]
    async fn a_wait_for_a_client_that_reads_nothing_ends_in_a_slow_consumer_close() {
        let stall = Duration::from_secs(30);
        let (outbox, mut client, waiting) = backfill_waiting(stall).await;
        tokio::time::advance(stall / 2).await;
        assert!(!waiting.is_finished(), "still within the stall");
        assert!(!outbox.cancel.is_cancelled());
        tokio::time::advance(stall).await;
        tokio::time::timeout(WAIT, waiting)
            .await
            .expect("the wait ended after the stall")
            .unwrap();
        assert!(outbox.cancel.is_cancelled(), "the connection is ended");
        let mut got = Vec::new();
        let _ = tokio::time::timeout(WAIT, client.read_to_end(&mut got)).await;
        let close = frames::close(close::SLOW_CONSUMER, "slow consumer: resume");
        assert!(got.ends_with(&close), "ends with the 4008 close");
    }

    /// A client that reads, however slowly, is not a stalled one: the wait goes on past
    /// the stall as long as the writer gets something out within each.
    #[tokio::test(start_paused = true)]
    async fn a_wait_for_a_client_that_reads_slowly_goes_on() {
        use tokio::io::AsyncReadExt;
        let stall = Duration::from_secs(30);
        let (outbox, mut client, waiting) = backfill_waiting(stall).await;
        tokio::task::yield_now().await;
        let mut sip = [0u8; 100];
        for _ in 0..4 {
            tokio::time::advance(stall * 3 / 4).await;
            assert!(client.read(&mut sip).await.unwrap() > 0);
            for _ in 0..10 {
                tokio::task::yield_now().await;
            }
        }
        assert!(!waiting.is_finished(), "three stalls' time, read all along");
        assert!(!outbox.cancel.is_cancelled());
        // It stops reading: a stall later (the last sip still counts once), it is closed.
        for _ in 0..3 {
            tokio::time::advance(stall).await;
            for _ in 0..10 {
                tokio::task::yield_now().await;
            }
        }
        tokio::time::timeout(WAIT, waiting)
            .await
            .expect("the wait ended")
            .unwrap();
        assert!(outbox.cancel.is_cancelled());
    }

    #[tokio::test(start_paused = true)]
    async fn pacing_holds_only_a_connection_written_to_often() {
        let delay = Duration::from_millis(50);
        // A threshold of 0: pacing is on at any rate.
        let (outbox, mut client) = paced_outbox(1 << 20, 1 << 16, WritePacing::new(delay, 0));
        // Two frames a millisecond apart, once a second: both go out at once (holding
        // the second would add latency to a connection that shares nothing).
        for _ in 0..5 {
            tokio::time::advance(Duration::from_secs(1)).await;
            outbox.push(Item::Frame(frame("now and then")));
            assert!(got_something(&mut client).await, "a rare frame is not held");
            tokio::time::advance(Duration::from_millis(1)).await;
            outbox.push(Item::Frame(frame("and its neighbour")));
            assert!(got_something(&mut client).await, "nor is the next one");
        }
        // A frame a millisecond: once the average gap is under the delay, writes are held.
        let mut held_after = None;
        for i in 0..40 {
            tokio::time::advance(Duration::from_millis(1)).await;
            outbox.push(Item::Frame(frame("often")));
            if !got_something(&mut client).await {
                held_after = Some(i);
                break;
            }
        }
        assert!(held_after.is_some(), "a hot connection's write is held");
        // The held frame goes out when the delay has passed.
        tokio::time::advance(delay).await;
        assert!(got_something(&mut client).await, "released after the delay");
    }

    /// A held connection's writes come the delay apart, or later: the flusher wakes on
    /// the next tick (here, the next 3-ms step). A connection whose frames come every 3 ms
    /// stays held all along; with an average of the gaps between writes it let a frame
    /// out on a write of its own every few writes.
    #[tokio::test(start_paused = true)]
    async fn a_connection_whose_frames_keep_coming_stays_held_when_the_flusher_is_late() {
        let delay = Duration::from_millis(10);
        let (outbox, mut client) = paced_outbox(1 << 20, 1 << 16, WritePacing::new(delay, 0));
        let mut written_at_once = Vec::new();
        for i in 0..150 {
            tokio::time::advance(Duration::from_millis(3)).await;
            // What the flusher wrote at this step.
            got_something(&mut client).await;
            outbox.push(Item::Frame(frame("often")));
            // Past the first pushes, which bring the average under the delay.
            if got_something(&mut client).await && i >= 30 {
                written_at_once.push(i);
            }
        }
        assert!(
            written_at_once.is_empty(),
            "pushes written on their own: {written_at_once:?}"
        );
        tokio::time::advance(delay * 2).await;
        assert!(got_something(&mut client).await, "the last hold ended");
    }

    /// The rest of a frame the socket took part of is written as soon as the client
    /// reads, not held for the pacing delay: that write already went out.
    #[tokio::test(start_paused = true)]
    async fn the_rest_of_a_partial_write_is_not_held() {
        use futures_util::FutureExt;
        let delay = Duration::from_millis(50);
        let capacity = 1024;
        let (outbox, mut client) = paced_outbox(1 << 20, capacity, WritePacing::new(delay, 0));
        // Hot: a frame a millisecond, read as it comes.
        for _ in 0..40 {
            tokio::time::advance(Duration::from_millis(1)).await;
            outbox.push(Item::Frame(frame("often")));
            got_something(&mut client).await;
        }
        // Past the hold (the flusher writes the last held frame; then nothing within the
        // delay): one frame larger than the pipe goes out at once, in part.
        tokio::time::advance(delay).await;
        got_something(&mut client).await;
        tokio::time::advance(delay * 2).await;
        let big = frame(&"b".repeat(4 * capacity));
        outbox.push(Item::Frame(big.clone()));
        let mut got = 0;
        let mut buf = vec![0u8; 1 << 16];
        // Read what comes, without moving the clock: the writer writes the rest as the
        // pipe empties.
        for _ in 0..50 {
            for _ in 0..10 {
                tokio::task::yield_now().await;
            }
            while let Some(Ok(n)) = client.read(&mut buf).now_or_never() {
                if n == 0 {
                    break;
                }
                got += n;
            }
        }
        assert_eq!(
            got,
            big.len(),
            "the whole frame, with no wait for the delay"
        );
    }

    /// What the writer took and has not written yet counts its bytes against the limit,
    /// not the per-frame overhead too: `written` counts bytes, so the overhead of the
    /// frames already written would stay counted until the whole batch was out.
    #[tokio::test]
    async fn a_batch_being_written_counts_only_its_unwritten_bytes() {
        let capacity = 256;
        let (outbox, mut client) = outbox(1 << 20, capacity);
        let small = frame(&"x".repeat(10));
        let frames = 100;
        let total = small.len() * frames;
        // The first frames go out at once until the pipe is full; the writer takes the
        // rest in one batch and waits for the pipe.
        for _ in 0..frames {
            outbox.push(Item::Frame(small.clone()));
        }
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        // Read all but the pipe's worth and 200 bytes more: the writer fills the pipe
        // again and has 200 bytes of its batch left.
        let read = total - capacity - 200;
        let mut got = vec![0u8; read];
        tokio::time::timeout(WAIT, client.read_exact(&mut got))
            .await
            .expect("read in time")
            .unwrap();
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert_eq!(outbox.queued_bytes(), 200);
    }

    fn frame(text: &str) -> Encoded {
        frames::text(text.to_owned())
    }

    /// Read exactly the bytes of `expected` frames.
    async fn expect(client: &mut tokio::io::DuplexStream, expected: &[Encoded]) {
        let want: Vec<u8> = expected.iter().flat_map(|f| f.iter().copied()).collect();
        let mut got = vec![0u8; want.len()];
        tokio::time::timeout(WAIT, client.read_exact(&mut got))
            .await
            .expect("frames in time")
            .expect("read");
        assert_eq!(got, want);
    }

    #[tokio::test]
    async fn frames_go_out_in_order() {
        let (outbox, mut client) = outbox(1 << 20, 1 << 16);
        let frames: Vec<Encoded> = (1..=5).map(|i| frame(&format!("m{i}"))).collect();
        for f in &frames {
            assert_eq!(outbox.push(Item::Frame(f.clone())), Pushed::Queued);
        }
        expect(&mut client, &frames).await;
    }

    #[tokio::test]
    async fn a_full_socket_queues_and_the_writer_finishes_the_job() {
        // 16-byte pipe: every frame is written partly at once and the rest by the writer.
        let (outbox, mut client) = outbox(1 << 20, 16);
        let frames: Vec<Encoded> = (0..50)
            .map(|i| frame(&format!("message number {i}")))
            .collect();
        for f in &frames {
            outbox.push(Item::Frame(f.clone()));
        }
        expect(&mut client, &frames).await;
    }

    #[tokio::test]
    async fn live_messages_wait_for_the_backfill_and_repeats_are_dropped() {
        let (outbox, mut client) = outbox(1 << 20, 1 << 16);
        let m = |seq: u64| frame(&format!("seq {seq}"));
        let live = |seqs: std::ops::RangeInclusive<u64>| -> Vec<Encoded> { seqs.map(m).collect() };
        let backfill = |seq| Item::Backfill {
            sub: 7,
            seq,
            frame: m(seq),
        };
        outbox.push(Item::Track { sub: 7 });
        assert_eq!(outbox.push_live(7, 3, &live(3..=4)), Pushed::Queued);
        outbox.push(backfill(2));
        outbox.push(backfill(3));
        assert_eq!(outbox.sync_done(7, 3), Synced::Done);
        // 4 went out with the backfill's end: only 5 and 6 of this run are new.
        assert_eq!(outbox.push_live(7, 4, &live(4..=6)), Pushed::Queued);
        assert_eq!(outbox.push_live(7, 5, &live(5..=5)), Pushed::Dropped);
        // Untracked: dropped.
        assert_eq!(outbox.push_live(8, 1, &live(1..=1)), Pushed::Dropped);
        expect(&mut client, &[m(2), m(3), m(4), m(5), m(6)]).await;
    }

    /// More live messages while a backfill runs than the limit holds are not the client's
    /// fault: they are dropped, not the connection, and `sync_done` says so; the backfill
    /// then sends them from the store and the subscription goes live, gap-free.
    #[tokio::test]
    async fn live_messages_past_the_limit_while_syncing_are_left_to_the_backfill() {
        let (outbox, mut client) = outbox(4096, 1 << 16);
        let m = |seq: u64| frame(&format!("{seq:>200}"));
        let backfill = |seq| Item::Backfill {
            sub: 7,
            seq,
            frame: m(seq),
        };
        outbox.push(Item::Track { sub: 7 });
        let pushed: Vec<Pushed> = (1..=30)
            .map(|seq| outbox.push_live(7, seq, &[m(seq)]))
            .collect();
        assert!(!pushed.contains(&Pushed::Overflow), "{pushed:?}");
        assert!(!outbox.cancel.is_cancelled(), "the connection stays");
        assert_eq!(outbox.sync_done(7, 0), Synced::Lagged);
        for seq in 1..=30 {
            outbox.push(backfill(seq));
        }
        assert_eq!(outbox.push_live(7, 30, &[m(30), m(31)]), Pushed::Queued);
        assert_eq!(outbox.sync_done(7, 30), Synced::Done);
        assert_eq!(outbox.push_live(7, 32, &[m(32)]), Pushed::Queued);
        let all: Vec<Encoded> = (1..=32).map(m).collect();
        expect(&mut client, &all).await;
    }

    /// A room whose live messages outrun its backfill round after round: after
    /// `MAX_LAG_ROUNDS` the client is a slow consumer after all (4008, resume).
    #[tokio::test]
    async fn a_backfill_outrun_every_round_ends_as_a_slow_consumer() {
        let (outbox, mut client) = outbox(1000, 1 << 16);
        let big = frame(&"x".repeat(600));
        outbox.push(Item::Track { sub: 7 });
        let mut told = Vec::new();
        for round in 0..=MAX_LAG_ROUNDS {
            let seq = 2 * u64::from(round) + 1;
            outbox.push_live(7, seq, &[big.clone(), big.clone()]);
            told.push(outbox.sync_done(7, seq - 1));
        }
        let lagged = vec![Synced::Lagged; MAX_LAG_ROUNDS as usize];
        assert_eq!(told[..MAX_LAG_ROUNDS as usize], lagged[..]);
        assert_eq!(told.last(), Some(&Synced::Closed));
        assert!(outbox.cancel.is_cancelled());
        let mut got = Vec::new();
        let _ = tokio::time::timeout(WAIT, client.read_to_end(&mut got)).await;
        assert!(got.ends_with(&frames::close(
            close::SLOW_CONSUMER,
            "slow consumer: resume"
        )));
    }

    /// Every write a `Recorder` was given, in order.
    type Writes = Arc<Mutex<Vec<Vec<u8>>>>;

    /// A write half that records every write it is given, taking at most `take` bytes of
    /// each.
    struct Recorder {
        writes: Writes,
        take: usize,
    }

    impl AsyncWrite for Recorder {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            let n = buf.len().min(self.take);
            let mut writes = self.writes.lock().unwrap_or_else(|p| p.into_inner());
            writes.push(buf[..n].to_vec());
            Poll::Ready(Ok(n))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// An outbox of byte limit `limit` joining at most `max_write` bytes into a write,
    /// writing to a `Recorder`, its writer task running; the writes it makes.
    fn recorded_outbox(take: usize, limit: usize, max_write: usize) -> (Arc<Outbox>, Writes) {
        let writes = Arc::new(Mutex::new(Vec::new()));
        let recorder = Recorder {
            writes: writes.clone(),
            take,
        };
        let outbox = Outbox::new(
            Box::pin(recorder),
            None,
            limit,
            max_write,
            WritePacing::new(Duration::ZERO, 0),
            CancellationToken::new(),
        );
        tokio::spawn(outbox.clone().write_loop());
        (outbox, writes)
    }

    #[tokio::test]
    async fn a_run_of_live_messages_is_one_write() {
        let (outbox, writes) = recorded_outbox(usize::MAX, 1 << 20, 64 * 1024);
        outbox.push(Item::Track { sub: 1 });
        assert_eq!(outbox.sync_done(1, 0), Synced::Done);
        let run: Vec<Encoded> = (1..=3).map(|s| frame(&format!("m{s}"))).collect();
        assert_eq!(outbox.push_live(1, 1, &run), Pushed::Queued);
        let one: Vec<u8> = run.concat();
        let got = writes.lock().unwrap_or_else(|p| p.into_inner()).clone();
        assert_eq!(got, vec![one], "three frames, one write, in order");
    }

    #[tokio::test]
    async fn a_run_larger_than_the_queue_limit_goes_to_a_socket_that_takes_it() {
        // Ten 250-byte frames, 1,000 bytes of queue, writes of at most 600 bytes: the run
        // goes out in five writes of two frames, and nothing is queued.
        let (outbox, writes) = recorded_outbox(usize::MAX, 1000, 600);
        outbox.push(Item::Track { sub: 1 });
        assert_eq!(outbox.sync_done(1, 0), Synced::Done);
        let run: Vec<Encoded> = (1..=10)
            .map(|s| frame(&format!("{s:>3}{}", "x".repeat(243))))
            .collect();
        assert!(run.iter().all(|f| f.len() == 250));
        assert_eq!(outbox.push_live(1, 1, &run), Pushed::Queued);
        assert!(!outbox.cancel.is_cancelled(), "no overflow");
        let got = writes.lock().unwrap_or_else(|p| p.into_inner()).clone();
        assert_eq!(got.len(), 5, "two frames a write");
        let want: Vec<u8> = run.concat();
        assert_eq!(got.concat(), want);
    }

    #[tokio::test]
    async fn a_run_the_socket_takes_in_part_goes_on_whole_and_in_order() {
        // The socket takes 5 bytes of each write: the direct write cuts the first frame,
        // and the writer task writes the rest.
        let (outbox, writes) = recorded_outbox(5, 1 << 20, 64 * 1024);
        outbox.push(Item::Track { sub: 1 });
        assert_eq!(outbox.sync_done(1, 0), Synced::Done);
        let run: Vec<Encoded> = (1..=3).map(|s| frame(&format!("message {s}"))).collect();
        outbox.push_live(1, 1, &run);
        let mut want: Vec<u8> = run.concat();
        {
            // The direct write took 5 bytes; the rest waits for the writer, cut frame first.
            let got = writes.lock().unwrap_or_else(|p| p.into_inner()).clone();
            assert_eq!(got, vec![want[..5].to_vec()]);
            let state = outbox.lock();
            assert!(
                state.partial,
                "the queue starts with the rest of a cut frame"
            );
            assert_eq!(state.queue.len(), 3);
        }
        outbox.push(Item::Frame(frame("after")));
        want.extend_from_slice(&frame("after"));
        let deadline = Instant::now() + WAIT;
        loop {
            let got: Vec<u8> = writes.lock().unwrap_or_else(|p| p.into_inner()).concat();
            if got.len() >= want.len() || Instant::now() > deadline {
                assert_eq!(got, want);
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    #[test]
    fn consume_counts_the_frames_that_went_whole() {
        let mut batch: VecDeque<Encoded> = ["abc", "de", "fgh"]
            .iter()
            .map(|t| Bytes::copy_from_slice(t.as_bytes()))
            .collect();
        // Into the third frame: two whole, the third cut.
        assert_eq!(consume(&mut batch, 6), (2, true));
        assert_eq!(
            batch.iter().map(|f| &f[..]).collect::<Vec<_>>(),
            [&b"gh"[..]]
        );
        // The rest of the cut frame counts as one when it goes.
        assert_eq!(consume(&mut batch, 2), (1, false));
        assert!(batch.is_empty());
        // More bytes than queued (cannot happen in use) stops at the end.
        batch.push_back(Bytes::from_static(b"x"));
        assert_eq!(consume(&mut batch, 5), (1, false));
    }

    #[tokio::test]
    async fn room_events_skip_syncing_rooms() {
        let (outbox, mut client) = outbox(1 << 20, 1 << 16);
        outbox.push(Item::Track { sub: 1 });
        let event = frame("presence");
        assert_eq!(
            outbox.push(Item::PresenceDiff {
                sub: 1,
                frame: event.clone()
            }),
            Pushed::Dropped
        );
        assert_eq!(outbox.sync_done(1, 0), Synced::Done);
        assert_eq!(
            outbox.push(Item::PresenceDiff {
                sub: 1,
                frame: event.clone()
            }),
            Pushed::Queued
        );
        expect(&mut client, &[event]).await;
    }

    /// Reads from `client` until what came contains `needle`.
    async fn read_until(client: &mut (impl AsyncRead + Unpin), needle: &str) {
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&got).contains(needle) {
            let n = tokio::time::timeout(WAIT, client.read(&mut buf))
                .await
                .unwrap_or_else(|_| panic!("{needle:?} never came"))
                .unwrap();
            got.extend_from_slice(&buf[..n]);
        }
    }

    /// Presence diffs are dropped under pressure, as typing is, not a cause of 4008; the
    /// subscription's list is then stale, and once a full list fits its diffs answer
    /// `Stale` (send the full list) until one gets through.
    #[tokio::test]
    async fn presence_diffs_under_pressure_are_dropped_then_replaced_by_a_full_list() {
        // A client that reads nothing yet, a 64-byte pipe, a queue of 2,000 bytes.
        let (outbox, mut client) = outbox(2000, 64);
        outbox.push(Item::Track { sub: 1 });
        assert_eq!(outbox.sync_done(1, 0), Synced::Done);
        let diff = |n: usize| Item::PresenceDiff {
            sub: 1,
            frame: frame(&format!("diff {n:0>100}")),
        };
        let pushed: Vec<Pushed> = (0..40).map(|n| outbox.push(diff(n))).collect();
        assert!(!outbox.cancel.is_cancelled(), "no 4008 for presence");
        let first_drop = pushed.iter().position(|p| *p == Pushed::Dropped);
        let first_drop = first_drop.expect("diffs dropped past half the queue");
        assert!(
            pushed[first_drop..].iter().all(|p| *p == Pushed::Dropped),
            "{pushed:?}"
        );
        let list = frame(&format!("the full list {:0>100}", 0));
        let snapshot = || Item::PresenceSnapshot {
            sub: 1,
            frame: list.clone(),
        };
        assert_eq!(
            outbox.push(snapshot()),
            Pushed::Dropped,
            "no room for it yet"
        );
        // The client reads; then a diff asks for the full list, and the list goes.
        read_until(&mut client, &format!("diff {:0>100}", first_drop - 1)).await;
        // (The writer counts what it wrote a moment after the client can read it.)
        let deadline = tokio::time::Instant::now() + WAIT;
        while outbox.push(diff(99)) != Pushed::Stale {
            assert!(
                tokio::time::Instant::now() < deadline,
                "never asked for the full list"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(outbox.push(snapshot()), Pushed::Queued);
        assert_eq!(outbox.push(diff(100)), Pushed::Queued, "current again");
        expect(&mut client, &[list, frame(&format!("diff {:0>100}", 100))]).await;
    }

    /// The list that ends a join's backfill makes a stale subscription current: no
    /// second full list follows it.
    #[tokio::test]
    async fn the_list_ending_a_backfill_makes_stale_presence_current() {
        let (outbox, mut client) = outbox(2000, 64);
        outbox.push(Item::Track { sub: 1 });
        assert_eq!(outbox.sync_done(1, 0), Synced::Done);
        let diff = |n: usize| Item::PresenceDiff {
            sub: 1,
            frame: frame(&format!("diff {n:0>100}")),
        };
        let mut n = 0;
        while !outbox.presence_stale(1) {
            assert!(n < 40, "diffs never dropped");
            outbox.push(diff(n));
            n += 1;
        }
        let list = frame(&format!("the list {:0>10}", 0));
        assert_eq!(
            outbox.push(Item::PresenceList {
                sub: 1,
                frame: list.clone()
            }),
            Pushed::Queued,
            "a reply: queued under pressure"
        );
        assert!(!outbox.presence_stale(1));
        read_until(&mut client, "the list").await;
        // Once written out, the next diff goes as a diff, not as a call for the list.
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match outbox.push(diff(100)) {
                Pushed::Queued => break,
                Pushed::Dropped if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                other => panic!("a diff after the list: {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn overflow_closes_with_slow_consumer_and_cancels() {
        // A client that reads nothing, a 64-byte pipe, and a queue of 1,000 bytes.
        let (outbox, mut client) = outbox(1000, 64);
        let big = frame(&"x".repeat(300));
        let mut pushed = Vec::new();
        for _ in 0..6 {
            pushed.push(outbox.push(Item::Frame(big.clone())));
        }
        assert!(pushed.contains(&Pushed::Overflow), "{pushed:?}");
        assert!(outbox.cancel.is_cancelled());
        assert_eq!(outbox.push(Item::Frame(frame("late"))), Pushed::Dropped);
        // What got out: whole frames up to the close, then the close frame.
        let mut got = Vec::new();
        let _ = tokio::time::timeout(WAIT, client.read_to_end(&mut got)).await;
        let close = frames::close(close::SLOW_CONSUMER, "slow consumer: resume");
        assert!(got.ends_with(&close), "ends with the 4008 close");
        let before = &got[..got.len() - close.len()];
        assert_eq!(
            before.len() % big.len(),
            0,
            "only whole frames before the close"
        );
    }

    #[tokio::test]
    async fn what_the_writer_is_writing_counts_against_the_limit() {
        // A client that reads nothing, a 64-byte pipe, a queue of 1,000 bytes. The first
        // frame fills the pipe in part; the writer takes the rest and waits on the pipe.
        let (outbox, mut client) = outbox(1000, 64);
        let big = frame(&"x".repeat(300));
        assert_eq!(outbox.push(Item::Frame(big.clone())), Pushed::Queued);
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        let taken = outbox.queued_bytes();
        assert!(taken > 0, "the writer's batch still counts");
        // The client reads a piece, the writer writes one more: that piece no longer counts.
        let mut piece = [0u8; 64];
        tokio::time::timeout(WAIT, client.read_exact(&mut piece))
            .await
            .expect("bytes in time")
            .expect("read");
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        let writing = outbox.queued_bytes();
        assert!(writing < taken, "{writing} of {taken} still counted");
        // Further frames are queued only while the queue and the batch fit the limit.
        let one = big.len() + OVERHEAD;
        let mut accepted = 0;
        while outbox.push(Item::Frame(big.clone())) == Pushed::Queued {
            accepted += 1;
            assert!(accepted < 10, "no overflow");
        }
        assert!(outbox.cancel.is_cancelled(), "overflowed");
        assert!(
            writing + accepted * one <= 1000,
            "held {writing} + {accepted} × {one} bytes against a limit of 1,000"
        );
    }

    #[tokio::test]
    async fn droppables_go_first_under_pressure() {
        let (outbox, _client) = outbox(1000, 16);
        outbox.push(Item::Track { sub: 0 });
        assert_eq!(outbox.sync_done(0, 0), Synced::Done);
        assert_eq!(
            outbox.push(Item::Frame(frame(&"x".repeat(500)))),
            Pushed::Queued
        );
        let typing = Item::Droppable {
            sub: 0,
            frame: frame("t"),
        };
        assert_eq!(outbox.push(typing), Pushed::Dropped);
        assert_eq!(outbox.push(Item::Frame(frame("y"))), Pushed::Queued);
        assert!(!outbox.cancel.is_cancelled());
    }

    #[tokio::test]
    async fn a_close_ends_the_writer_after_what_was_queued() {
        let (outbox, mut client) = outbox(1 << 20, 1 << 16);
        let a = frame("a");
        outbox.push(Item::Frame(a.clone()));
        outbox.close(1000, "bye");
        assert_eq!(outbox.push(Item::Frame(frame("after"))), Pushed::Dropped);
        let mut got = Vec::new();
        tokio::time::timeout(WAIT, client.read_to_end(&mut got))
            .await
            .expect("the writer ends and the pipe closes")
            .expect("read");
        let want: Vec<u8> = [a, frames::close(1000, "bye")].concat();
        assert_eq!(got, want);
    }
}
