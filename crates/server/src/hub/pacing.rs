//! Write pacing: when the node is busy, a connection that wrote a moment ago holds its next
//! write for `write_delay_ms`, so the frames that arrive meanwhile go out in one system
//! call (Centrifugo's `write_delay`, but only under load).
//!
//! Every frame a connection writes costs a `write()`, and on a busy fan-out that kernel
//! work is most of the server's CPU. Holding a write for a few milliseconds lets several
//! frames share it, at the price of that much latency. The price is worth paying only
//! when the node is busy, so the writers count the frames they write, a ticker turns the
//! rate into a switch, and the delay applies while the node writes more than
//! `write_delay_above_per_sec` frames a second (and until it falls under half of that).
//! The outbox holds only a connection that gets frames more often than the delay (its
//! average gap between pushes, `hub::outbox`): a connection that gets a frame now and then would
//! pay the latency and share the write with nothing. A quiet connection writes at once
//! either way. A held write is written by the node's one flusher task when its hold ends,
//! with whatever queued meanwhile (`flush_held`): no task of the connection is woken.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::Outbox;

/// How often the frame rate is turned into the switch.
const TICK: Duration = Duration::from_millis(100);

pub struct WritePacing {
    delay: Duration,
    /// Frames per second above which the delay applies; 0: always.
    above_per_sec: u64,
    frames: AtomicU64,
    active: AtomicBool,
    /// Connections holding a write, by when the hold ends (soonest first): the node's
    /// flusher writes them then, so a held write wakes no task of its connection.
    held: Mutex<BinaryHeap<Reverse<Held>>>,
    held_seq: AtomicU64,
    held_ready: Notify,
}

/// A connection holding a write until `until`.
struct Held {
    until: Instant,
    /// Tells apart holds that end at the same instant.
    seq: u64,
    outbox: Weak<Outbox>,
}

impl PartialEq for Held {
    fn eq(&self, other: &Self) -> bool {
        (self.until, self.seq) == (other.until, other.seq)
    }
}

impl Eq for Held {}

impl PartialOrd for Held {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Held {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.until, self.seq).cmp(&(other.until, other.seq))
    }
}

impl std::fmt::Debug for WritePacing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WritePacing")
            .field("delay", &self.delay)
            .field("above_per_sec", &self.above_per_sec)
            .finish_non_exhaustive()
    }
}

impl WritePacing {
    pub fn new(delay: Duration, above_per_sec: u64) -> Arc<Self> {
        Arc::new(Self {
            delay,
            above_per_sec,
            frames: AtomicU64::new(0),
            active: AtomicBool::new(above_per_sec == 0),
            held: Mutex::new(BinaryHeap::new()),
            held_seq: AtomicU64::new(0),
            held_ready: Notify::new(),
        })
    }

    /// `outbox` holds a write until `until`: the flusher writes it then.
    pub(super) fn hold(&self, until: Instant, outbox: Weak<Outbox>) {
        let seq = self.held_seq.fetch_add(1, Ordering::Relaxed);
        let first = {
            let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
            let first = held.peek().is_none_or(|Reverse(h)| until < h.until);
            held.push(Reverse(Held { until, seq, outbox }));
            first
        };
        // The flusher sleeps until the soonest hold ends: a sooner one wakes it.
        if first {
            self.held_ready.notify_one();
        }
    }

    /// Write the held writes as their holds end, until `stop`.
    pub async fn flush_held(self: Arc<Self>, stop: CancellationToken) {
        if !self.enabled() {
            return;
        }
        let mut due = Vec::new();
        loop {
            let next = {
                let held = self.held.lock().unwrap_or_else(|p| p.into_inner());
                held.peek().map(|Reverse(h)| h.until)
            };
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = self.held_ready.notified() => continue,
                _ = tokio::time::sleep_until(next.unwrap_or_else(Instant::now)), if next.is_some() => {}
            }
            let now = Instant::now();
            {
                let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
                while held.peek().is_some_and(|Reverse(h)| h.until <= now) {
                    if let Some(Reverse(h)) = held.pop() {
                        due.push(h.outbox);
                    }
                }
            }
            for outbox in due.drain(..) {
                if let Some(outbox) = outbox.upgrade() {
                    outbox.flush_held();
                }
            }
        }
    }

    fn enabled(&self) -> bool {
        !self.delay.is_zero()
    }

    /// A connection wrote `frames` frames.
    pub fn wrote(&self, frames: usize) {
        if self.enabled() && self.above_per_sec > 0 {
            self.frames.fetch_add(frames as u64, Ordering::Relaxed);
        }
    }

    /// How long after its last write a connection holds its next one, now.
    pub fn delay(&self) -> Duration {
        if self.enabled() && self.active.load(Ordering::Relaxed) {
            self.delay
        } else {
            Duration::ZERO
        }
    }

    /// Turn the frames written in the last `window` into the switch: on above the
    /// threshold, off below half of it (so that it does not flap at the threshold).
    fn update(&self, window: Duration) {
        let frames = self.frames.swap(0, Ordering::Relaxed);
        let per_sec = frames as f64 / window.as_secs_f64().max(f64::EPSILON);
        let threshold = self.above_per_sec as f64;
        let was = self.active.load(Ordering::Relaxed);
        let now = if was {
            per_sec >= threshold / 2.0
        } else {
            per_sec > threshold
        };
        if now != was {
            self.active.store(now, Ordering::Relaxed);
            metrics::gauge!("wschat_write_pacing_active").set(if now { 1.0 } else { 0.0 });
            tracing::debug!(
                frames_per_sec = per_sec as u64,
                active = now,
                "write pacing"
            );
        }
    }

    /// Watch the frame rate until `stop` (nothing to watch when the delay is off or always
    /// on).
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        if !self.enabled() || self.above_per_sec == 0 {
            return;
        }
        let mut ticker = tokio::time::interval(TICK);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last = tokio::time::Instant::now();
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = ticker.tick() => {
                    let now = tokio::time::Instant::now();
                    self.update(now - last);
                    last = now;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DELAY: Duration = Duration::from_millis(10);

    #[test]
    fn the_delay_applies_above_the_rate_and_stops_below_half_of_it() {
        let pacing = WritePacing::new(DELAY, 1000);
        let second = Duration::from_secs(1);
        assert_eq!(pacing.delay(), Duration::ZERO, "quiet at start");
        pacing.wrote(1000);
        pacing.update(second);
        assert_eq!(
            pacing.delay(),
            Duration::ZERO,
            "at the threshold: not above it"
        );
        pacing.wrote(1001);
        pacing.update(second);
        assert_eq!(pacing.delay(), DELAY);
        pacing.wrote(600);
        pacing.update(second);
        assert_eq!(pacing.delay(), DELAY, "above half: still on");
        pacing.wrote(400);
        pacing.update(second);
        assert_eq!(pacing.delay(), Duration::ZERO, "below half: off");
    }

    #[test]
    fn the_rate_is_per_second_of_the_window() {
        let pacing = WritePacing::new(DELAY, 1000);
        pacing.wrote(150);
        pacing.update(Duration::from_millis(100));
        assert_eq!(pacing.delay(), DELAY, "150 in 100 ms is 1,500/s");
    }

    #[test]
    fn zero_threshold_is_always_on_and_zero_delay_never() {
        assert_eq!(WritePacing::new(DELAY, 0).delay(), DELAY);
        let off = WritePacing::new(Duration::ZERO, 1);
        off.wrote(1_000_000);
        off.update(Duration::from_millis(100));
        assert_eq!(off.delay(), Duration::ZERO);
        assert_eq!(WritePacing::new(Duration::ZERO, 0).delay(), Duration::ZERO);
    }
}
