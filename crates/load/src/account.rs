//! Loss, duplicate and order accounting: what one receiver records as messages arrive,
//! and how the run's expected deliveries are computed from all records at the end.
//! The definitions are in the crate documentation ([`crate`]).

use crate::bits::{ChunkSet, IntMap, SortedSet, UnionFind};

/// What a receipt was, for the caller's counters and latency histogram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Receipt {
    /// The first copy of one of our messages at this receiver.
    New,
    /// A copy this receiver already had (in the same connection, or any in v1).
    Duplicate,
    /// Legacy: a copy this receiver had in an earlier connection, sent again after a
    /// reconnect (nodejschat's history replay).
    Replayed,
    /// Not counted: another run's message, or v1 history from before the first join.
    Ignored,
    /// v1: arrived before the room's first `joined`; kept until it comes.
    Held,
}

/// v1: what a received message of ours carries in its text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ours {
    /// Intended send time (unix µs).
    pub intended_us: u64,
    /// The message's global index (its sender's first index + its counter).
    pub g: u64,
}

/// Most messages kept for a room before its first `joined` arrives; later ones are
/// counted (`held_dropped`) and not received.
pub(crate) const MAX_HELD: usize = 100_000;

/// v1: one receiver's record of one room.
#[derive(Debug, Default)]
pub struct V1Room {
    pub name: String,
    /// `last_seq` of the first `joined`: the receiver is a member for every seq above it.
    pub base: Option<u64>,
    /// Highest seq received, ours or not: the `since` of a resume.
    pub max_any: u64,
    /// Highest seq of ours received.
    pub max_ours: u64,
    /// Seqs of our messages received (all above `base`).
    pub ours: ChunkSet,
    /// The global indices of those messages: one that comes again under another seq was
    /// stored twice.
    tags: ChunkSet,
    /// Seqs that carried a message this receiver already had under another seq: copies
    /// (a send stored twice), counted as duplicates and not as messages of the room.
    pub copies: Vec<u64>,
    pub duplicated: u64,
    pub out_of_order: u64,
    pub resets: u64,
    /// The first join was refused: not a member.
    pub refused: bool,
    /// The first join asked from this seq (the run's base, for a member joining after
    /// the send phase began): the member's `base` is this, not the join's `last_seq`.
    pub joined_from: Option<u64>,
    /// Messages that came before the first `joined`: (seq, the tag if ours, receive time
    /// µs).
    held: Vec<(u64, Option<Ours>, u64)>,
    /// Messages that came before the first `joined` when `MAX_HELD` were held already:
    /// not counted as received (so lost, if they were ours).
    pub held_dropped: u64,
}

impl V1Room {
    pub fn new(name: String) -> Self {
        Self {
            name,
            ..Self::default()
        }
    }

    /// The `since` to join with: once joined, to resume; before, the run's base if set.
    pub fn since(&self) -> Option<u64> {
        match self.base {
            Some(b) => Some(b.max(self.max_any)),
            None => self.joined_from,
        }
    }

    /// A message of this room arrived; `ours` is set when it is one of ours.
    pub fn on_message(&mut self, seq: u64, ours: Option<Ours>, now_us: u64) -> Receipt {
        self.max_any = self.max_any.max(seq);
        let Some(base) = self.base else {
            if self.held.len() < MAX_HELD {
                self.held.push((seq, ours, now_us));
            } else {
                self.held_dropped += 1;
            }
            return Receipt::Held;
        };
        let Some(tag) = ours.filter(|_| seq > base) else {
            return Receipt::Ignored;
        };
        if self.ours.contains(seq) {
            self.duplicated += 1;
            return Receipt::Duplicate;
        }
        if !self.tags.insert(tag.g) {
            // The same message under a second seq: the server stored it twice.
            self.duplicated += 1;
            self.copies.push(seq);
            return Receipt::Duplicate;
        }
        self.ours.insert(seq);
        if seq < self.max_ours {
            self.out_of_order += 1;
        }
        self.max_ours = self.max_ours.max(seq);
        Receipt::New
    }

    /// The room was joined with `last_seq`. The first time, fixes `base`, and returns the
    /// held messages (seq, intended, receive time) for the caller to count again.
    pub fn on_joined(&mut self, last_seq: u64) -> Vec<(u64, Option<Ours>, u64)> {
        if self.base.is_some() {
            return Vec::new();
        }
        self.base = Some(self.joined_from.unwrap_or(last_seq));
        std::mem::take(&mut self.held)
    }
}

/// Legacy: one receiver's record of what it got, across its connections.
#[derive(Debug, Default)]
pub struct LegacyRecv {
    /// Global indices of our messages received, over all connections.
    pub seen: ChunkSet,
    /// Those received in the current connection, from the second connection on.
    current: Option<ChunkSet>,
    /// Per sender, the highest counter received in the current connection.
    max_counter: IntMap<u32, u32>,
    pub duplicated: u64,
    pub replayed: u64,
    pub out_of_order: u64,
}

impl LegacyRecv {
    /// A new connection of this receiver begins (after a reconnect).
    pub fn new_connection(&mut self) {
        match &mut self.current {
            Some(c) => c.clear(),
            None if self.seen.is_empty() => {}
            None => self.current = Some(ChunkSet::new()),
        }
        self.max_counter.clear();
    }

    /// Message `g` (global index), the `counter`-th of `sender`, arrived.
    pub fn on_message(&mut self, g: u64, sender: u32, counter: u32) -> Receipt {
        if self.seen.insert(g) {
            if let Some(c) = &mut self.current {
                c.insert(g);
            }
            let max = self.max_counter.entry(sender).or_insert(counter);
            if counter < *max {
                self.out_of_order += 1;
            } else {
                *max = counter;
            }
            return Receipt::New;
        }
        let again_here = match &mut self.current {
            Some(c) => !c.insert(g),
            None => true,
        };
        if again_here {
            self.duplicated += 1;
            Receipt::Duplicate
        } else {
            self.replayed += 1;
            Receipt::Replayed
        }
    }
}

/// v1: what one receiver's room contributes to the end-of-run count.
#[derive(Debug)]
pub struct V1RoomOut {
    pub name: String,
    pub base: u64,
    pub ours: ChunkSet,
    /// Seqs this receiver found to be copies of a message it had (`V1Room::copies`).
    pub copies: Vec<u64>,
}

/// Totals of expected and delivered (message, receiver) pairs.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Expectation {
    pub expected: u64,
    pub delivered: u64,
    /// Received but not expected (legacy: history of before the connection, or copies
    /// that came after the receiver's own churn close began).
    pub unexpected: u64,
}

/// v1: the universe of our messages in each room is every acked (room, seq) plus every
/// (room, seq) of ours that anybody received, less the seqs any receiver found to be
/// copies (a message stored twice is one message); each member is expected to receive
/// those with seq above its `base`, also after it gave up.
pub fn v1_expectation(acked: &[(String, u64)], rooms: &[V1RoomOut]) -> Expectation {
    let mut universe: std::collections::HashMap<&str, ChunkSet> = Default::default();
    let mut copies: std::collections::HashMap<&str, ChunkSet> = Default::default();
    for (room, seq) in acked {
        universe.entry(room.as_str()).or_default().insert(*seq);
    }
    for r in rooms {
        universe
            .entry(r.name.as_str())
            .or_default()
            .union_with(&r.ours);
        copies
            .entry(r.name.as_str())
            .or_default()
            .extend(r.copies.iter().copied());
    }
    let no_copies = ChunkSet::new();
    let copies_of = |room: &str| copies.get(room).unwrap_or(&no_copies);
    let frozen: std::collections::HashMap<&str, SortedSet> = universe
        .iter()
        .map(|(k, v)| {
            let c = copies_of(k);
            let kept: ChunkSet = v.iter().filter(|&s| !c.contains(s)).collect();
            (*k, kept.freeze())
        })
        .collect();
    let mut out = Expectation::default();
    for r in rooms {
        let Some(u) = frozen.get(r.name.as_str()) else {
            continue;
        };
        let c = copies_of(&r.name);
        out.expected += u.count_in(r.base, u64::MAX);
        let (mut got, mut copy) = (0, 0);
        for s in r.ours.iter() {
            if c.contains(s) {
                // A copy (another receiver had the message under its first seq): not a
                // message of the room; the first seq is.
                copy += 1;
            } else if s > r.base {
                got += 1;
            }
        }
        out.delivered += got;
        out.unexpected += r.ours.len() - got - copy;
    }
    out
}

/// Legacy: one sender's schedule position and the moments it actually sent.
#[derive(Debug, Clone)]
pub struct LegacySender {
    /// Global index of this sender's message 0.
    pub base_g: u64,
    /// Send time (µs since the run's anchor) of each scheduled message; `u64::MAX` if it
    /// was never sent.
    pub sent_at: Vec<u64>,
}

/// Legacy: when one connection of a receiver could receive, in µs since the anchor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// The connection attempt began.
    pub start: u64,
    /// Authenticated: what was sent in `[firm_start, firm_end)` is expected; what was sent
    /// in `[start, firm_start)` counts only if it came (the server may or may not have had
    /// the connection in the room yet).
    pub firm_start: u64,
    pub firm_end: u64,
    /// What was sent in `[firm_end, end)` may still have been in flight when we closed
    /// the connection on purpose: it counts (as expected and delivered) only if it came.
    pub end: u64,
}

impl Window {
    fn contains(&self, t: u64) -> bool {
        t >= self.start && t < self.end
    }
}

/// Legacy: one receiver's record and the windows in which it could receive.
#[derive(Debug)]
pub struct LegacyReceiver {
    pub conn: u32,
    pub seen: ChunkSet,
    pub windows: Vec<Window>,
    /// First receipts not timed when they came (`legacy_timed`): (g, latency µs).
    pub untimed: Vec<(u64, u64)>,
}

/// Legacy: who shares a room (the protocol never says which room a session is in).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LegacyRooms {
    /// One session key for all: one room.
    One,
    /// Connection `c` uses key `c + 1`, whose session is in room `(c + 1) % n` (as the
    /// benchmarks insert them): a receiver is expected to get its room's messages even if
    /// nothing reached it, and a message from another room is unexpected.
    ByKey(u32),
    /// Inferred: a receiver that got anything from a sender shares its room, transitively
    /// (a receiver that got nothing is expected to get only its own messages).
    Inferred,
}

/// Legacy: whether a message's first receipt goes into the latency histogram. A message
/// sent while the receiver could receive is timed: in its current connection (attempted
/// at `opened_at`), or in one of its `earlier` windows and late (it came only after a
/// reconnect, when the server replayed its history: the outage is part of its latency).
/// One sent while the receiver was down is history, not timed.
pub fn legacy_timed(intended: u64, opened_at: u64, earlier: &[Window]) -> bool {
    intended >= opened_at || earlier.iter().any(|w| w.contains(intended))
}

/// Each sender's `base_g`, for `legacy_locate`.
fn legacy_bases(senders: &[LegacySender]) -> Vec<u64> {
    senders.iter().map(|s| s.base_g).collect()
}

/// The sender of the run's `g`-th message and its index in that sender's schedule.
fn legacy_locate(senders: &[LegacySender], bases: &[u64], g: u64) -> Option<(usize, usize)> {
    let s = bases.partition_point(|&b| b <= g).checked_sub(1)?;
    let k = (g - bases[s]) as usize;
    (k < senders[s].sent_at.len()).then_some((s, k))
}

/// Legacy: the latencies of the first receipts that were not timed when they came (their
/// intended time was before the connection they came on, outside the receiver's earlier
/// windows) but that were sent inside one of the receiver's windows: live messages that
/// came late because their sender was away and sent its backlog on its return, not
/// history. The expectation counts them as delivered; they are timed too.
pub fn legacy_late_latencies(senders: &[LegacySender], receivers: &[LegacyReceiver]) -> Vec<u64> {
    let bases = legacy_bases(senders);
    let mut late = Vec::new();
    for r in receivers {
        for &(g, latency) in &r.untimed {
            let sent = legacy_locate(senders, &bases, g).map(|(s, k)| senders[s].sent_at[k]);
            if sent.is_some_and(|at| at != u64::MAX && r.windows.iter().any(|w| w.contains(at))) {
                late.push(latency);
            }
        }
    }
    late
}

/// Legacy: receiver `c` is expected to receive message `m` of sender `s` when `c` and `s`
/// are in the same room (`rooms`) and `m` was sent inside one of `c`'s windows (in its
/// firm part, or in its grace part if `m` arrived).
pub fn legacy_expectation(
    senders: &[LegacySender],
    receivers: &[LegacyReceiver],
    rooms: LegacyRooms,
) -> Expectation {
    let n = senders.len();
    let bases = legacy_bases(senders);
    let locate = |g: u64| legacy_locate(senders, &bases, g);
    let mut groups = UnionFind::new(n);
    match rooms {
        LegacyRooms::One => {
            for i in 1..n {
                groups.union(0, i as u32);
            }
        }
        LegacyRooms::ByKey(rooms) => {
            let rooms = rooms.max(1) as usize;
            // Connection c and c + rooms hold keys in the same room.
            for c in rooms..n {
                groups.union((c - rooms) as u32, c as u32);
            }
        }
        LegacyRooms::Inferred => {
            for r in receivers {
                for g in r.seen.iter() {
                    if let Some((s, _)) = locate(g) {
                        groups.union(r.conn, s as u32);
                    }
                }
            }
        }
    }
    // The sorted send times of every message of each room.
    let mut times: IntMap<u32, Vec<u64>> = IntMap::default();
    for (i, s) in senders.iter().enumerate() {
        let root = groups.find(i as u32);
        times
            .entry(root)
            .or_default()
            .extend(s.sent_at.iter().copied().filter(|&t| t != u64::MAX));
    }
    for v in times.values_mut() {
        v.sort_unstable();
    }
    let mut out = Expectation::default();
    for r in receivers {
        let root = groups.find(r.conn);
        if let Some(t) = times.get(&root) {
            for w in &r.windows {
                let lo = t.partition_point(|&x| x < w.firm_start);
                let hi = t.partition_point(|&x| x < w.firm_end.min(w.end));
                out.expected += hi.saturating_sub(lo) as u64;
            }
        }
        for g in r.seen.iter() {
            let window = locate(g).and_then(|(s, k)| {
                let at = senders[s].sent_at[k];
                if at == u64::MAX || groups.find(s as u32) != root {
                    return None;
                }
                r.windows.iter().find(|w| w.contains(at)).map(|w| (w, at))
            });
            match window {
                Some((w, at)) => {
                    out.delivered += 1;
                    if at < w.firm_start || at >= w.firm_end {
                        out.expected += 1;
                    }
                }
                None => out.unexpected += 1,
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One of our messages, the `g`-th of the run.
    fn ours(g: u64) -> Option<Ours> {
        Some(Ours { intended_us: 1, g })
    }

    #[test]
    fn v1_messages_past_the_hold_before_joined_are_counted_not_kept() {
        let mut r = V1Room::new("a".into());
        for seq in 1..=MAX_HELD as u64 + 3 {
            assert_eq!(r.on_message(seq, ours(seq), 7), Receipt::Held);
        }
        assert_eq!(r.held_dropped, 3);
        let held = r.on_joined(0);
        assert_eq!(held.len(), MAX_HELD);
        assert_eq!(held.last().map(|h| h.0), Some(MAX_HELD as u64));
    }

    #[test]
    fn v1_detects_duplicates_and_out_of_order() {
        let mut r = V1Room::new("a".into());
        assert_eq!(r.on_message(5, ours(50), 7), Receipt::Held);
        assert_eq!(r.on_joined(4), vec![(5, ours(50), 7)]);
        assert_eq!(r.on_message(5, ours(50), 7), Receipt::New);
        assert_eq!(r.on_message(3, ours(30), 0), Receipt::Ignored, "history");
        assert_eq!(r.on_message(8, ours(80), 0), Receipt::New);
        assert_eq!(r.on_message(6, ours(60), 0), Receipt::New);
        assert_eq!(r.out_of_order, 1);
        assert_eq!(r.on_message(8, ours(80), 0), Receipt::Duplicate);
        assert_eq!(r.on_message(9, None, 0), Receipt::Ignored, "not ours");
        assert_eq!(r.duplicated, 1);
        assert_eq!(r.since(), Some(9));
        assert!(r.on_joined(100).is_empty(), "a resume keeps the base");
        assert_eq!(r.base, Some(4));
        assert!(r.copies.is_empty());
    }

    #[test]
    fn v1_a_message_under_a_second_seq_is_a_copy() {
        let mut r = V1Room::new("a".into());
        r.on_joined(0);
        assert_eq!(r.on_message(1, ours(10), 0), Receipt::New);
        // The server stored message 10 again, as seq 2.
        assert_eq!(r.on_message(2, ours(10), 0), Receipt::Duplicate);
        assert_eq!(r.on_message(3, ours(11), 0), Receipt::New);
        // The copy again (a resume sends it again): still a duplicate, not a message.
        assert_eq!(r.on_message(2, ours(10), 0), Receipt::Duplicate);
        assert_eq!((r.duplicated, r.out_of_order), (2, 0));
        assert_eq!(r.copies, vec![2, 2]);
        assert_eq!(r.ours.iter().collect::<Vec<_>>(), vec![1, 3]);
    }

    #[test]
    fn v1_expectation_leaves_copies_out() {
        let set = |seqs: &[u64]| seqs.iter().copied().collect::<ChunkSet>();
        // Message stored as 1 and again as 2 (the retry's ack said 2); then 3.
        let rooms = vec![
            // Got all three: 2 is its copy.
            V1RoomOut {
                name: "r".into(),
                base: 0,
                ours: set(&[1, 3]),
                copies: vec![2],
            },
            // Joined after 1: got the copy and 3, and is expected 3 only.
            V1RoomOut {
                name: "r".into(),
                base: 1,
                ours: set(&[2, 3]),
                copies: vec![],
            },
        ];
        let acked = vec![("r".to_string(), 2), ("r".to_string(), 3)];
        let e = v1_expectation(&acked, &rooms);
        assert_eq!(e.expected, 2 + 1);
        assert_eq!(e.delivered, 2 + 1);
        assert_eq!(e.unexpected, 0);
    }

    #[test]
    fn v1_expectation_counts_gaps_as_lost() {
        let mut a = ChunkSet::new();
        for s in [11, 12, 14] {
            a.insert(s);
        }
        let mut b = ChunkSet::new();
        for s in [12, 13, 14] {
            b.insert(s);
        }
        let rooms = vec![
            V1RoomOut {
                name: "r".into(),
                base: 10,
                ours: a,
                copies: vec![],
            },
            // Joined later: not expected to get 11 and 12.
            V1RoomOut {
                name: "r".into(),
                base: 12,
                ours: b,
                copies: vec![],
            },
        ];
        // 15 was acked but nobody got it; 13 nobody acked (sender cut off) but b got it.
        let acked = vec![
            ("r".to_string(), 11),
            ("r".to_string(), 12),
            ("r".to_string(), 14),
            ("r".to_string(), 15),
        ];
        let e = v1_expectation(&acked, &rooms);
        // a: 11..=15 expected (5), got 3; b: 13..=15 (3), got 13, 14 and 12 is unexpected.
        assert_eq!(e.expected, 8);
        assert_eq!(e.delivered, 5);
        assert_eq!(e.unexpected, 1);
    }

    #[test]
    fn legacy_tells_duplicates_replays_and_order_apart() {
        let mut r = LegacyRecv::default();
        assert_eq!(r.on_message(0, 0, 0), Receipt::New);
        assert_eq!(r.on_message(2, 0, 2), Receipt::New);
        assert_eq!(r.on_message(1, 0, 1), Receipt::New);
        assert_eq!(r.out_of_order, 1);
        assert_eq!(r.on_message(2, 0, 2), Receipt::Duplicate);
        r.new_connection();
        // History replay after the reconnect: seen before, first time in this connection.
        assert_eq!(r.on_message(0, 0, 0), Receipt::Replayed);
        assert_eq!(r.on_message(0, 0, 0), Receipt::Duplicate);
        assert_eq!(r.on_message(3, 0, 3), Receipt::New);
        assert_eq!((r.duplicated, r.replayed, r.out_of_order), (2, 1, 1));
    }

    #[test]
    fn legacy_times_what_was_sent_while_the_receiver_could_receive() {
        // An earlier connection attempted at 100, authenticated at 110, lost at 200; the
        // current one attempted at 300.
        let earlier = [Window {
            start: 100,
            firm_start: 110,
            firm_end: 200,
            end: 200,
        }];
        assert!(legacy_timed(310, 300, &earlier), "sent in this connection");
        assert!(
            legacy_timed(150, 300, &earlier),
            "sent in the earlier one, came only after the reconnect: late, and timed"
        );
        assert!(
            !legacy_timed(250, 300, &earlier),
            "sent while down: history"
        );
        assert!(
            !legacy_timed(50, 300, &earlier),
            "sent before the first: history"
        );
        assert!(!legacy_timed(150, 300, &[]), "no earlier window");
    }

    #[test]
    fn legacy_expectation_uses_windows_and_rooms() {
        // Two senders with two messages each; 0 and 1 share a room, 2 is alone.
        let senders = vec![
            LegacySender {
                base_g: 0,
                sent_at: vec![100, 300],
            },
            LegacySender {
                base_g: 2,
                sent_at: vec![150, u64::MAX],
            },
            LegacySender {
                base_g: 4,
                sent_at: vec![120],
            },
        ];
        let set = |v: &[u64]| {
            let mut s = ChunkSet::new();
            for &g in v {
                s.insert(g);
            }
            s
        };
        let w = |start, end| Window {
            start,
            firm_start: start,
            firm_end: end,
            end,
        };
        let receivers = vec![
            // Connected throughout; got 0, 2 but not 1 (lost).
            LegacyReceiver {
                conn: 0,
                seen: set(&[0, 2]),
                windows: vec![w(0, u64::MAX)],
                untimed: Vec::new(),
            },
            // Connected from 200 on: expected only message 1 (sent at 300); got 0 from
            // history (unexpected) and 1.
            LegacyReceiver {
                conn: 1,
                seen: set(&[0, 1]),
                windows: vec![w(200, u64::MAX)],
                untimed: Vec::new(),
            },
            LegacyReceiver {
                conn: 2,
                seen: set(&[4]),
                windows: vec![w(0, u64::MAX)],
                untimed: Vec::new(),
            },
        ];
        let e = legacy_expectation(&senders, &receivers, LegacyRooms::Inferred);
        assert_eq!(e.expected, 3 + 1 + 1);
        assert_eq!(e.delivered, 2 + 1 + 1);
        assert_eq!(e.unexpected, 1);
        // One room for all: receiver 2 now expects 0, 1, 2 (own room's 3 sent + own).
        let e = legacy_expectation(&senders, &receivers, LegacyRooms::One);
        assert_eq!(e.expected, 4 + 1 + 4);
    }

    #[test]
    fn legacy_grace_counts_only_what_came() {
        let senders = vec![LegacySender {
            base_g: 0,
            sent_at: vec![100, 200, 300, 400],
        }];
        let mut seen = ChunkSet::new();
        for g in [0, 2] {
            seen.insert(g);
        }
        // Closed on purpose at 450 with a grace of 300: 100 is firm (got it), 200 and 300
        // are in the grace part (300 came, 200 did not), 400 too but it did not come.
        let receivers = vec![LegacyReceiver {
            conn: 0,
            seen,
            windows: vec![Window {
                start: 0,
                firm_start: 50,
                firm_end: 150,
                end: 450,
            }],
            untimed: Vec::new(),
        }];
        let e = legacy_expectation(&senders, &receivers, LegacyRooms::One);
        assert_eq!((e.expected, e.delivered, e.unexpected), (2, 2, 0));
    }

    /// A receipt not timed when it came (intended before its connection) is timed at the
    /// end when it was sent inside one of the receiver's windows (its sender was away and
    /// sent it late), and not when it was sent while the receiver was down (history).
    #[test]
    fn legacy_late_sends_are_timed_and_history_is_not() {
        let w = |start, end| Window {
            start,
            firm_start: start,
            firm_end: end,
            end,
        };
        let senders = vec![LegacySender {
            base_g: 0,
            sent_at: vec![100, 900, u64::MAX],
        }];
        // Up from 50 to 200, down, up again from 500.
        let receivers = vec![LegacyReceiver {
            conn: 1,
            seen: ChunkSet::new(),
            windows: vec![w(50, 200), w(500, u64::MAX)],
            // g 0 intended at 10, sent late at 100 (in the first window), came at 600;
            // g 1 intended at 300 (the receiver down), sent only at 900, came at 950;
            // g 2 was never sent.
            untimed: vec![(0, 590), (1, 650), (2, 1)],
        }];
        assert_eq!(legacy_late_latencies(&senders, &receivers), vec![590, 650]);
        // Down until 500 instead: g 0 was sent while it was down (history on connect).
        let history = vec![LegacyReceiver {
            windows: vec![w(0, 50), w(500, u64::MAX)],
            ..receivers.into_iter().next().unwrap()
        }];
        assert_eq!(legacy_late_latencies(&senders, &history), vec![650]);
    }

    /// Rooms by key: a receiver that got nothing is expected to get its whole room's
    /// messages (inferred, it would be expected to get only its own), and a message from
    /// another room is unexpected (inferred, it would merge the two rooms).
    #[test]
    fn legacy_rooms_by_key_expect_a_silent_receivers_room() {
        // Four connections, keys 1..4 in rooms 1, 0, 1, 0: connections 0 and 2 share one
        // room, 1 and 3 the other. One message each.
        let senders: Vec<LegacySender> = (0..4)
            .map(|c| LegacySender {
                base_g: c,
                sent_at: vec![100 + c],
            })
            .collect();
        let set = |v: &[u64]| {
            let mut s = ChunkSet::new();
            for &g in v {
                s.insert(g);
            }
            s
        };
        let always = vec![Window {
            start: 0,
            firm_start: 0,
            firm_end: u64::MAX,
            end: u64::MAX,
        }];
        let receivers: Vec<LegacyReceiver> = [
            set(&[0, 2]),
            // Got nothing at all.
            set(&[]),
            // Got its room's two and one from the other room.
            set(&[0, 2, 1]),
            set(&[1, 3]),
        ]
        .into_iter()
        .enumerate()
        .map(|(c, seen)| LegacyReceiver {
            conn: c as u32,
            seen,
            windows: always.clone(),
            untimed: Vec::new(),
        })
        .collect();
        let e = legacy_expectation(&senders, &receivers, LegacyRooms::ByKey(2));
        assert_eq!(e.expected, 2 * 4, "every receiver its room's two");
        assert_eq!(
            e.delivered, 6,
            "0, 2 and 3 got their room's two; 1 got nothing"
        );
        assert_eq!(e.unexpected, 1);
        // Inferred, the stray message merges the two rooms: each receiver expects all 4.
        let inferred = legacy_expectation(&senders, &receivers, LegacyRooms::Inferred);
        assert_eq!(inferred.expected, 4 * 4);
    }
}
