//! State shared by every connection task while the run goes on: the clock, live counters
//! (atomics, read by the progress line and the drain), and the latency histograms
//! (sharded behind mutexes, so that 10,000 tasks need not each hold a histogram).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;
use tokio::time::Instant;

/// One monotonic clock for the run, anchored to the wall clock once, so that intended
/// send times can travel as unix microseconds and still be compared without clock jumps.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    anchor: Instant,
    anchor_unix_us: u64,
}

impl Clock {
    pub fn new() -> Self {
        let anchor_unix_us = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(0);
        Self {
            anchor: Instant::now(),
            anchor_unix_us,
        }
    }

    /// Microseconds since the anchor.
    pub fn now_us(&self) -> u64 {
        self.anchor.elapsed().as_micros() as u64
    }

    /// The instant `us` microseconds after the anchor.
    pub fn instant(&self, us: u64) -> Instant {
        self.anchor + Duration::from_micros(us)
    }

    /// Unix microseconds of `us` after the anchor.
    pub fn unix_us(&self, us: u64) -> u64 {
        self.anchor_unix_us + us
    }

    /// Microseconds after the anchor of a unix time (0 if before the anchor).
    pub fn since_anchor_us(&self, unix_us: u64) -> u64 {
        unix_us.saturating_sub(self.anchor_unix_us)
    }
}

/// Counters every task adds to as it goes.
#[derive(Debug, Default)]
pub struct Live {
    /// Connections up now.
    pub connected: AtomicI64,
    pub sent: AtomicU64,
    pub acked: AtomicU64,
    /// First receipts of our messages.
    pub delivered: AtomicU64,
    /// When the last first receipt happened (µs since the anchor).
    pub last_delivery_us: AtomicU64,
    /// v1: when the last ack came (µs since the anchor).
    pub last_ack_us: AtomicU64,
    /// Scheduled messages not yet sent, of connections that still try.
    pub pending_sends: AtomicI64,
    /// v1: sent and neither acked nor finally refused.
    pub in_flight: AtomicI64,
    /// v1: connections down after they had been up, reconnecting to resume.
    pub away: AtomicI64,
}

impl Live {
    /// `n` first receipts, the last at `last_us`.
    pub fn delivered_at(&self, n: u64, last_us: u64) {
        self.delivered.fetch_add(n, Relaxed);
        self.last_delivery_us.fetch_max(last_us, Relaxed);
    }
}

/// v1: what each member has heard of its room against the room's newest acknowledged seq,
/// so that the drain knows when every acknowledged message has reached every member (and
/// ends then, without waiting for a quiet second), and knows that one is still on its way
/// while a member is behind (and does not end on a quiet second then: a server that pauses
/// its deliveries for longer is slow, not lossy, if it delivers within `--drain`).
///
/// Each connection is a member of one room (`--rooms` gives each one). A member whose
/// session named a room the run does not know makes the check unknown (`all_heard`).
/// A member has heard a room through the highest seq it got there: a server delivers each
/// room in seq order, so a lower one still missing then is lost, not on its way.
pub struct Heard {
    rooms: HashMap<String, usize>,
    /// Per room: the highest seq acknowledged to one of our senders, or of ours that any
    /// member got (its sender may have been cut off before the ack).
    acked: Vec<AtomicU64>,
    /// Per room: the lowest seq of ours acknowledged or got (`u64::MAX`: none yet). Every
    /// message of the run in the room is at or after it, but for one still in flight.
    first_ours: Vec<AtomicU64>,
    /// Per connection: its room (`NOT_A_MEMBER` until its first `joined`, and again once
    /// it gives up: it will hear nothing more) …
    room_of: Vec<AtomicUsize>,
    /// … and the highest seq it has heard there (its base at the join, then each message).
    heard: Vec<AtomicU64>,
    untracked: AtomicBool,
}

const NOT_A_MEMBER: usize = usize::MAX;

/// `a = max(a, v)`, written only when `v` is higher: called for every delivery (a room's
/// newest seq by each of its members), mostly with nothing to change, so the cache line is
/// read where it is shared instead of taken for a write each time.
fn raise(a: &AtomicU64, v: u64) {
    if a.load(Relaxed) < v {
        a.fetch_max(v, Relaxed);
    }
}

impl Heard {
    pub fn new(rooms: &[String], connections: usize) -> Self {
        Self {
            rooms: rooms
                .iter()
                .enumerate()
                .map(|(i, r)| (r.clone(), i))
                .collect(),
            acked: rooms.iter().map(|_| AtomicU64::new(0)).collect(),
            first_ours: rooms.iter().map(|_| AtomicU64::new(u64::MAX)).collect(),
            room_of: (0..connections)
                .map(|_| AtomicUsize::new(NOT_A_MEMBER))
                .collect(),
            heard: (0..connections).map(|_| AtomicU64::new(0)).collect(),
            untracked: AtomicBool::new(false),
        }
    }

    /// `seq` in `room` was acknowledged to one of our senders (or is ours and a member got it).
    pub fn acked(&self, room: &str, seq: u64) {
        if let Some(&r) = self.rooms.get(room) {
            raise(&self.acked[r], seq);
            let first = &self.first_ours[r];
            if first.load(Relaxed) > seq {
                first.fetch_min(seq, Relaxed);
            }
        }
    }

    /// The seq before the lowest of ours known in `room`: a base from which a member that
    /// joins late hears every message of the run known so far.
    pub fn before_first_ours(&self, room: &str) -> Option<u64> {
        let first = self.first_ours[*self.rooms.get(room)?].load(Relaxed);
        (first != u64::MAX).then(|| first.saturating_sub(1))
    }

    /// Connection `conn` joined `room`, whose head was `base`.
    pub fn joined(&self, conn: u32, room: &str, base: u64) {
        let Some(slot) = self.room_of.get(conn as usize) else {
            return;
        };
        match self.rooms.get(room) {
            Some(&r) => {
                raise(&self.heard[conn as usize], base);
                slot.store(r, Relaxed);
            }
            None => self.untracked.store(true, Relaxed),
        }
    }

    /// Connection `conn` has heard its room through `seq`.
    pub fn heard(&self, conn: u32, seq: u64) {
        if let Some(h) = self.heard.get(conn as usize) {
            raise(h, seq);
        }
    }

    /// Connection `conn` will hear nothing more (it gave up): no longer waited for.
    pub fn left(&self, conn: u32) {
        if let Some(slot) = self.room_of.get(conn as usize) {
            slot.store(NOT_A_MEMBER, Relaxed);
        }
    }

    /// Whether every member has heard its room through the room's newest acknowledged
    /// seq; `None` when a member is in a room the run does not know.
    pub fn all_heard(&self) -> Option<bool> {
        if self.untracked.load(Relaxed) {
            return None;
        }
        Some(self.room_of.iter().zip(&self.heard).all(|(room, heard)| {
            let room = room.load(Relaxed);
            room == NOT_A_MEMBER || heard.load(Relaxed) >= self.acked[room].load(Relaxed)
        }))
    }
}

/// Latencies recorded in microseconds, up to one hour, three significant digits. A longer
/// one is recorded as one hour and counted (`Sharded::over_max`), so the report can say so.
pub const HIST_MAX_US: u64 = 3_600_000_000;
const SHARDS: usize = 16;

/// A histogram split into shards that tasks lock briefly, by task index.
pub struct Sharded {
    shards: Vec<Mutex<Histogram<u64>>>,
    /// Samples over `HIST_MAX_US`, recorded as `HIST_MAX_US`.
    over_max: AtomicU64,
}

impl Sharded {
    pub fn new() -> anyhow::Result<Self> {
        let mut shards = Vec::with_capacity(SHARDS);
        for _ in 0..SHARDS {
            shards.push(Mutex::new(new_histogram()?));
        }
        Ok(Self {
            shards,
            over_max: AtomicU64::new(0),
        })
    }

    pub fn record(&self, task: u32, us: u64) {
        self.record_all(task, &[us]);
    }

    pub fn record_all(&self, task: u32, us: &[u64]) {
        if us.is_empty() {
            return;
        }
        let shard = &self.shards[task as usize % SHARDS];
        let mut h = shard.lock().unwrap_or_else(|e| e.into_inner());
        let mut over = 0;
        for &v in us {
            over += u64::from(v > HIST_MAX_US);
            h.saturating_record(v.clamp(1, HIST_MAX_US));
        }
        drop(h);
        if over > 0 {
            self.over_max.fetch_add(over, Relaxed);
        }
    }

    /// Samples so far that were over the histogram's bound (recorded at the bound).
    pub fn over_max(&self) -> u64 {
        self.over_max.load(Relaxed)
    }

    /// All shards added into `into` (which is reset first).
    pub fn merge_into(&self, into: &mut Histogram<u64>) {
        into.reset();
        for shard in &self.shards {
            let h = shard.lock().unwrap_or_else(|e| e.into_inner());
            // Same bounds on both sides: adding cannot fail.
            let _ = into.add(&*h);
        }
    }
}

pub fn new_histogram() -> anyhow::Result<Histogram<u64>> {
    Ok(Histogram::new_with_bounds(1, HIST_MAX_US, 3)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_over_the_bound_are_recorded_at_it_and_counted() {
        let sharded = Sharded::new().expect("histograms");
        sharded.record_all(0, &[5, HIST_MAX_US, HIST_MAX_US + 1]);
        sharded.record(3, u64::MAX);
        let mut h = new_histogram().expect("a histogram");
        sharded.merge_into(&mut h);
        assert_eq!(h.len(), 4);
        assert_eq!(sharded.over_max(), 2);
        assert!(h.max() >= HIST_MAX_US);
    }

    #[test]
    fn all_heard_once_every_member_has_its_rooms_newest_ack() {
        let rooms = ["a".to_string(), "b".to_string()];
        let h = Heard::new(&rooms, 3);
        // Nobody has joined: nobody is waited for.
        h.acked("a", 5);
        assert_eq!(h.all_heard(), Some(true));
        h.joined(0, "a", 2);
        h.joined(1, "b", 0);
        assert_eq!(h.all_heard(), Some(false), "0 has heard a through 2 of 5");
        h.heard(0, 5);
        assert_eq!(h.all_heard(), Some(true));
        h.acked("b", 1);
        assert_eq!(h.all_heard(), Some(false), "1 has heard nothing of b");
        // A member that gave up will hear nothing more: not waited for.
        h.left(1);
        assert_eq!(h.all_heard(), Some(true));
        // A join's base counts as heard: it is not expected to get what came before.
        h.acked("a", 9);
        h.joined(2, "a", 9);
        h.heard(0, 9);
        assert_eq!(h.all_heard(), Some(true));
        // A room the run does not know: the check cannot tell.
        h.joined(2, "elsewhere", 0);
        assert_eq!(h.all_heard(), None);
    }
}
