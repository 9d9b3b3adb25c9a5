//! The hub: this node's rooms, who is subscribed to each, and the in-order fan-out of
//! committed messages to them.
//!
//! Each room remembers the last seq it delivered. A message with the next seq is encoded
//! once per protocol and its bytes shared by every subscriber's outbox; an older seq is a
//! duplicate and is skipped; a newer one means a gap, which the hub fills by reading the
//! store (the store is the log, the broker only a doorbell), holding later messages until
//! the gap is closed. Presence (who is in a room on this node) and typing notices live here
//! too. No lock is held across an `.await`.

pub mod frames;
pub mod outbox;
pub mod pacing;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, Notify};
use wschat_protocol::v1::ServerFrame;
use wschat_protocol::RoomName;

use crate::broker::wire::Body;
use crate::broker::{BusEvent, ToOthers};
use crate::store::{Store, StoreError, StoredMessage};
pub use frames::Encoded;
pub use outbox::{Item, Outbox, Pushed, SubId, Synced};

/// Which protocol a connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Legacy,
    V1,
}

impl Protocol {
    pub fn label(self) -> &'static str {
        match self {
            Self::Legacy => "legacy",
            Self::V1 => "v1",
        }
    }
}

/// What the hub, the committer and a connection's own tasks share of one connection.
pub struct Conn {
    pub id: u64,
    pub user: Arc<str>,
    pub protocol: Protocol,
    pub outbox: Arc<Outbox>,
    inflight: AtomicUsize,
    settled: Notify,
}

impl Conn {
    pub fn new(id: u64, user: Arc<str>, protocol: Protocol, outbox: Arc<Outbox>) -> Self {
        Self {
            id,
            user,
            protocol,
            outbox,
            inflight: AtomicUsize::new(0),
            settled: Notify::new(),
        }
    }

    /// A send was handed to the committer.
    pub fn send_started(&self) {
        self.inflight.fetch_add(1, Ordering::AcqRel);
    }

    /// A send was acknowledged or refused.
    pub fn send_settled(&self) {
        if self.inflight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.settled.notify_waiters();
        }
    }

    /// Wait until every send handed to the committer has been answered.
    pub async fn all_sends_settled(&self) {
        loop {
            let notified = self.settled.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.inflight.load(Ordering::Acquire) == 0 {
                return;
            }
            notified.await;
        }
    }
}

/// What a fan-out needs of a connection is copied here, so that a delivery touches the
/// room's list and the outbox, not also the `Conn` in between (a cache miss per delivery
/// when 10,000 connections share a core).
struct Subscriber {
    sub: SubId,
    id: u64,
    protocol: Protocol,
    outbox: Arc<Outbox>,
}

/// Another node's presence list, part by part.
struct Parts {
    users: Vec<String>,
    /// The part that must come next; any other breaks the list.
    next: u32,
    /// When the latest part came: a node that dies between parts leaves its list
    /// behind, and it expires as `remote` does.
    heard: Instant,
}

#[derive(Default)]
struct RoomState {
    last_delivered: u64,
    subs: Vec<Subscriber>,
    /// Users present on this node, with how many of their connections are subscribed.
    presence: BTreeMap<Arc<str>, usize>,
    /// Users present on other nodes, by node, with when that node last said so.
    remote: HashMap<String, (Vec<String>, Instant)>,
    /// A node's list that came in parts, gathered until its last part (`Parts`).
    remote_parts: HashMap<String, Parts>,
    /// Messages beyond a gap, waiting for the gap to be read from the store.
    pending: BTreeMap<u64, Arc<StoredMessage>>,
    /// The store has messages up to at least this seq (from a bell without payload, or
    /// a periodic check): read them.
    catch_up_to: u64,
    catching_up: bool,
    /// Its last subscriber left: it is out of the map (or about to be) and is never
    /// subscribed to again.
    removed: bool,
}

impl RoomState {
    /// Who is in the room, on any node.
    fn users(&self) -> BTreeSet<String> {
        let mut users: BTreeSet<String> = self.presence.keys().map(|u| u.to_string()).collect();
        for (names, _) in self.remote.values() {
            users.extend(names.iter().cloned());
        }
        users
    }

    fn local_users(&self) -> Vec<String> {
        self.presence.keys().map(|u| u.to_string()).collect()
    }

    /// Whether another node said `user` is in the room.
    fn elsewhere(&self, user: &str) -> bool {
        self.remote
            .values()
            .any(|(names, _)| names.iter().any(|n| n == user))
    }

    /// Tell this node's v1 subscribers that `user`, on no other node, was the first of
    /// its connections here to join (or the last to leave). A join or leave costs this,
    /// not the room's whole user list: 10,000 users joining one room took 725 µs of CPU a
    /// connect when each join compared the list before and after, 7.7 × a small room's.
    fn announce_one(&self, room: &RoomName, user: &str, joined: bool, except: Option<u64>) {
        let names = vec![user.to_owned()];
        let (joined, left) = if joined {
            (names, Vec::new())
        } else {
            (Vec::new(), names)
        };
        let diff = frames::v1(&ServerFrame::PresenceDiff {
            room: room.to_string(),
            joined,
            left,
        });
        self.push_presence_diff(room, except, &diff);
    }

    /// Push a presence diff to this node's v1 subscribers but `except`. One whose list
    /// went stale (a diff dropped under pressure) gets the full list instead, once it fits;
    /// the list is made only then.
    fn push_presence_diff(&self, room: &RoomName, except: Option<u64>, diff: &Encoded) {
        let mut full = None;
        for s in &self.subs {
            if s.protocol != Protocol::V1 || Some(s.id) == except {
                continue;
            }
            let pushed = s.outbox.push(Item::PresenceDiff {
                sub: s.sub,
                frame: diff.clone(),
            });
            if pushed == Pushed::Stale {
                let frame = full
                    .get_or_insert_with(|| self.presence_frame(room))
                    .clone();
                s.outbox.push(Item::PresenceSnapshot { sub: s.sub, frame });
            }
        }
    }

    /// The room's `presence` frame: who is in it, on any node.
    fn presence_frame(&self, room: &RoomName) -> Encoded {
        frames::v1(&ServerFrame::Presence {
            room: room.to_string(),
            users: self.users().into_iter().collect(),
        })
    }

    /// Tell this node's v1 subscribers how the room's users changed.
    fn announce(&self, room: &RoomName, before: &BTreeSet<String>, except: Option<u64>) {
        let after = self.users();
        if &after == before {
            return;
        }
        let diff = frames::v1(&ServerFrame::PresenceDiff {
            room: room.to_string(),
            joined: after.difference(before).cloned().collect(),
            left: before.difference(&after).cloned().collect(),
        });
        self.push_presence_diff(room, except, &diff);
    }
}

struct Room {
    name: RoomName,
    state: Mutex<RoomState>,
}

impl Room {
    /// A room with no subscribers yet, delivered through seq `last_delivered`.
    fn new(name: &RoomName, last_delivered: u64) -> Arc<Self> {
        Arc::new(Self {
            name: name.clone(),
            state: Mutex::new(RoomState {
                last_delivered,
                ..RoomState::default()
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, RoomState> {
        // A panic while holding a room lock is a bug; keep serving the room regardless.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

pub struct Hub {
    rooms: Mutex<HashMap<RoomName, Arc<Room>>>,
    store: Arc<dyn Store>,
    /// Events for the other nodes (drained by the broker's forwarder): at most
    /// `broker::QUEUE_EVENTS` commits and `broker::QUEUE_CHATTER` typing and presence
    /// events waiting.
    outgoing: ToOthers,
    /// Whether the last event for the other nodes found the queue full (for the log).
    dropping: AtomicBool,
    /// Whether other nodes can hear this one (a broker other than `local`): events for
    /// them (`tell_others`) are queued only then.
    others: bool,
    /// Rooms whose users on this node changed since they were last told to the other
    /// nodes (`tell_changed_presence`).
    presence_changed: Mutex<Marked>,
    /// Test builds can switch off reading the store to fill gaps, to prove that the
    /// fault suite detects the loss that follows.
    catch_up_enabled: bool,
    /// A `resync` is running; one asked meanwhile sets `resync_again` for it.
    resyncing: AtomicBool,
    resync_again: AtomicBool,
    /// Longest the hub waits for a read of its own (`STORE_READ_BOUND`).
    read_bound: Duration,
}

/// Rooms marked for `tell_changed_presence`, in the order they were marked: a room marked
/// again keeps its place, so rooms marked faster than they are told (a refresh of more
/// rooms than go out between two heartbeats) are still told in turn, none passed over.
#[derive(Default)]
struct Marked {
    order: std::collections::VecDeque<RoomName>,
    marked: HashSet<RoomName>,
}

impl Marked {
    fn mark(&mut self, room: &RoomName) {
        if self.marked.insert(room.clone()) {
            self.order.push_back(room.clone());
        }
    }

    /// The `most` longest marked, unmarked.
    fn take(&mut self, most: usize) -> Vec<RoomName> {
        let n = most.min(self.order.len());
        let rooms: Vec<RoomName> = self.order.drain(..n).collect();
        for room in &rooms {
            self.marked.remove(room);
        }
        rooms
    }

    /// `rooms` (taken, not told) marked again, first, in their order.
    fn put_back(&mut self, rooms: &[RoomName]) {
        for room in rooms.iter().rev() {
            if self.marked.insert(room.clone()) {
                self.order.push_front(room.clone());
            }
        }
    }
}

/// Most rooms whose presence lists one `tell_changed_presence` queues (every 50 ms: 81,920
/// rooms a second).
const PRESENCE_TELL_ROOMS: usize = 4096;

/// Longest the hub waits for a read of its own: a resync's heads, a catch-up's page.
/// PostgreSQL's statement timeout (30 s) cannot end a wait for a server that is gone
/// without closing the connection (a failover, a host lost): such a read would never
/// return, and hold off every later resync of the node, or every later message of the
/// room, for good. Past this bound the read counts as failed and is tried again.
const STORE_READ_BOUND: Duration = Duration::from_secs(35);

impl Hub {
    /// `others`: other nodes can hear this one (see the field).
    pub fn new(store: Arc<dyn Store>, outgoing: ToOthers, others: bool) -> Arc<Self> {
        Self::with_read_bound(store, outgoing, others, STORE_READ_BOUND)
    }

    fn with_read_bound(
        store: Arc<dyn Store>,
        outgoing: ToOthers,
        others: bool,
        read_bound: Duration,
    ) -> Arc<Self> {
        Arc::new(Self {
            rooms: Mutex::new(HashMap::new()),
            store,
            outgoing,
            dropping: AtomicBool::new(false),
            others,
            presence_changed: Mutex::new(Marked::default()),
            catch_up_enabled: catch_up_enabled(),
            resyncing: AtomicBool::new(false),
            resync_again: AtomicBool::new(false),
            read_bound,
        })
    }

    /// `read` within `read_bound`, or `NoAnswer`.
    async fn bounded<T>(
        &self,
        read: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        tokio::time::timeout(self.read_bound, read)
            .await
            .unwrap_or(Err(StoreError::NoAnswer(self.read_bound)))
    }

    /// Whether other nodes can hear this one (a broker other than `local`).
    pub fn has_others(&self) -> bool {
        self.others
    }

    /// Queue `event` for the other nodes; nothing when none can hear this one (the
    /// `local` broker would only drop it, after a wake-up of its forwarder per commit).
    fn tell_others(&self, event: BusEvent) {
        // The broker does not keep up (NATS reconnecting, a NOTIFY stuck): drop rather
        // than hold every commit in memory. The other nodes find the messages by seq or at
        // their next read of the room heads, and presence is refreshed at every heartbeat.
        // Typing and presence have a queue of their own: filling it drops only them.
        if !self.queue_for_others(event) {
            metrics::counter!("wschat_broker_events_dropped_total").increment(1);
            if !self.dropping.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    "the broker does not keep up: events for the other nodes are dropped"
                );
            }
        }
    }

    /// Queue `event` for the other nodes (when any can hear this one); false when its
    /// queue is full.
    fn queue_for_others(&self, event: BusEvent) -> bool {
        if !self.others {
            return true;
        }
        match self.outgoing.try_send(event) {
            Ok(()) => {
                if self.dropping.swap(false, Ordering::Relaxed) {
                    tracing::info!("the broker takes events for the other nodes again");
                }
                true
            }
            Err(mpsc::error::TrySendError::Full(_)) => false,
            // The forwarder publishes what is queued when it stops, and is gone only
            // after that: an event queued then has no one to go to.
            Err(mpsc::error::TrySendError::Closed(_)) => true,
        }
    }

    /// `room`'s users on this node changed: the other nodes are told at the next
    /// `tell_changed_presence`, if any can hear this one (else no one would empty the set).
    fn presence_changed_here(&self, room: &RoomName) {
        if self.others {
            self.presence_changed
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .mark(room);
        }
    }

    /// Tell the other nodes this node's users of the rooms whose users here changed, or
    /// that a heartbeat refreshed, since the last call (`node_upkeep`, every 50 ms): at
    /// most `PRESENCE_TELL_ROOMS` of them a call, and not more than the queue takes; the
    /// rest wait in the set for the next call. The bus carries whole lists, so a burst of
    /// joins to one room is one list a period, not one list per join.
    pub fn tell_changed_presence(&self) {
        self.tell_changed_presence_up_to(PRESENCE_TELL_ROOMS);
    }

    /// At a stop: every room whose users changed (as many as the queue takes).
    pub fn tell_all_changed_presence(&self) {
        self.tell_changed_presence_up_to(usize::MAX);
    }

    fn tell_changed_presence_up_to(&self, most: usize) {
        let lock = || {
            self.presence_changed
                .lock()
                .unwrap_or_else(|p| p.into_inner())
        };
        let rooms = lock().take(most);
        for (i, room) in rooms.iter().enumerate() {
            // A room no longer served here (its last user left) is an empty list.
            let users = self
                .room(room)
                .map(|r| r.lock().local_users())
                .unwrap_or_default();
            let event = BusEvent::Presence {
                room: room.clone(),
                users,
            };
            if !self.queue_for_others(event) {
                // The queue is full: this room and the rest go first at a later call (the
                // lists are read again then), none is dropped.
                lock().put_back(&rooms[i..]);
                return;
            }
        }
    }

    fn rooms(&self) -> MutexGuard<'_, HashMap<RoomName, Arc<Room>>> {
        self.rooms.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn room(&self, name: &RoomName) -> Option<Arc<Room>> {
        self.rooms().get(name).cloned()
    }

    /// Rooms with at least one subscriber on this node.
    pub fn room_count(&self) -> usize {
        self.rooms().len()
    }

    /// Subscribe `conn` to `room` as `sub`: from now on, every message of the room
    /// committed after this call reaches the connection's outbox (`Outbox::push_live`).
    pub async fn subscribe(
        self: &Arc<Self>,
        name: &RoomName,
        conn: &Arc<Conn>,
        sub: SubId,
    ) -> Result<(), StoreError> {
        let found = match self.room(name) {
            Some(room) => room,
            None => {
                let head = self.store.room_head(name).await?;
                let mut created = false;
                let room = self
                    .rooms()
                    .entry(name.clone())
                    .or_insert_with(|| {
                        created = true;
                        Room::new(name, head.last_seq)
                    })
                    .clone();
                if created {
                    self.tell_others(BusEvent::PresenceQuery { room: name.clone() });
                }
                room
            }
        };
        self.enter(name, found, conn, sub);
        Ok(())
    }

    /// Put `conn` in the room `found` (looked up or created by `subscribe`). If the room's
    /// last subscriber left since, that room is done (`removed`, and out of the map or
    /// about to be): a new one takes its place in the map, from the seq the old one had
    /// delivered (a room whose `last_delivered` is behind reads the store on its next
    /// message), or the room that replaced it is used. A room's lock is never taken while
    /// the map's is held: a join must not wait behind a large room's fan-out with every
    /// other room's delivery waiting behind it for the map.
    fn enter(&self, name: &RoomName, found: Arc<Room>, conn: &Conn, sub: SubId) {
        let mut candidate = found;
        loop {
            let room = self
                .rooms()
                .entry(name.clone())
                .or_insert(candidate)
                .clone();
            let mut state = room.lock();
            if !state.removed {
                self.add_subscriber(name, &mut state, conn, sub);
                return;
            }
            let fresh = Room::new(name, state.last_delivered);
            drop(state);
            let mut rooms = self.rooms();
            let replaced = match rooms.get(name) {
                Some(current) if !Arc::ptr_eq(current, &room) => false,
                _ => {
                    rooms.insert(name.clone(), Arc::clone(&fresh));
                    true
                }
            };
            drop(rooms);
            if replaced {
                // Other nodes' presence in the room went with the old one.
                self.tell_others(BusEvent::PresenceQuery { room: name.clone() });
            }
            candidate = fresh;
        }
    }

    fn add_subscriber(&self, name: &RoomName, state: &mut RoomState, conn: &Conn, sub: SubId) {
        state.subs.push(Subscriber {
            sub,
            id: conn.id,
            protocol: conn.protocol,
            outbox: conn.outbox.clone(),
        });
        let count = state.presence.entry(conn.user.clone()).or_insert(0);
        *count += 1;
        if *count == 1 {
            if !state.elsewhere(&conn.user) {
                state.announce_one(name, &conn.user, true, Some(conn.id));
            }
            self.presence_changed_here(name);
        }
    }

    /// Undo `subscribe`.
    pub fn unsubscribe(&self, name: &RoomName, conn: &Conn, sub: SubId) {
        let Some(room) = self.room(name) else {
            return;
        };
        let empty = {
            let mut state = room.lock();
            let before = state.subs.len();
            state.subs.retain(|s| !(s.id == conn.id && s.sub == sub));
            if state.subs.len() < before {
                if let Some(count) = state.presence.get_mut(&conn.user) {
                    *count -= 1;
                    if *count == 0 {
                        state.presence.remove(&conn.user);
                        if !state.elsewhere(&conn.user) {
                            state.announce_one(name, &conn.user, false, None);
                        }
                        self.presence_changed_here(name);
                    }
                }
            }
            // Done for good: a join that finds it from now on puts a new room in its place.
            state.removed = state.subs.is_empty();
            state.removed
        };
        if empty {
            let mut rooms = self.rooms();
            if rooms
                .get(name)
                .is_some_and(|current| Arc::ptr_eq(current, &room))
            {
                rooms.remove(name);
            }
        }
    }

    /// Queue the room's presence list for `conn`'s subscription `sub` (after its backfill).
    pub fn send_presence(&self, name: &RoomName, conn: &Conn, sub: SubId) {
        let Some(room) = self.room(name) else {
            return;
        };
        let state = room.lock();
        conn.outbox.push(Item::PresenceList {
            sub,
            frame: state.presence_frame(name),
        });
    }

    /// Send the full presence list to each v1 subscriber whose list went stale (a diff
    /// dropped under pressure) and that has room for it now: a room with no news since
    /// would otherwise leave it wrong. Run at every heartbeat.
    pub fn repair_presence(&self) {
        let rooms: Vec<Arc<Room>> = self.rooms().values().cloned().collect();
        for room in rooms {
            let state = room.lock();
            let mut full = None;
            for s in &state.subs {
                if s.protocol == Protocol::V1 && s.outbox.presence_stale(s.sub) {
                    let frame = full
                        .get_or_insert_with(|| state.presence_frame(&room.name))
                        .clone();
                    s.outbox.push(Item::PresenceSnapshot { sub: s.sub, frame });
                }
            }
        }
    }

    /// Relay a typing notice from a connection of this node: to this node's v1
    /// subscribers but the sender's connection, and to the other nodes.
    pub fn typing_from(&self, name: &RoomName, user: &str, origin: u64) {
        self.typing(name, user, Some(origin));
        self.tell_others(BusEvent::Typing {
            room: name.clone(),
            user: user.to_owned(),
        });
    }

    /// Relay a typing notice to the room's v1 subscribers but the `origin` connection.
    fn typing(&self, name: &RoomName, user: &str, origin: Option<u64>) {
        let Some(room) = self.room(name) else {
            return;
        };
        let state = room.lock();
        let frame = frames::v1(&ServerFrame::Typing {
            room: name.to_string(),
            user: user.to_owned(),
        });
        push_typing(&state, origin, &frame);
    }

    /// Deliver committed messages (of any rooms, each room's in seq order). A room's
    /// messages that follow on from what it delivered go out as one run: each subscriber
    /// gets them in one write. Rooms go in the order of their first message in `messages`
    /// (commit order: the message that waited longest for its commit is not also the last
    /// to be written).
    pub fn deliver(self: &Arc<Self>, messages: &[Arc<StoredMessage>]) {
        let order = arrival_order(messages);
        for msgs in order.chunk_by(|a, b| a.room == b.room) {
            self.deliver_room(msgs);
        }
    }

    /// Deliver one room's messages (seq order).
    fn deliver_room(self: &Arc<Self>, msgs: &[&Arc<StoredMessage>]) {
        let Some(room) = msgs.first().and_then(|m| self.room(&m.room)) else {
            return;
        };
        let mut state = room.lock();
        let mut run = Vec::new();
        let mut gap = false;
        for &msg in msgs {
            let next = state.last_delivered + run.len() as u64 + 1;
            if msg.seq < next {
                continue;
            }
            if msg.seq == next && !state.catching_up && !gap {
                run.push(msg);
            } else {
                hold(&mut state, msg);
                gap = true;
            }
        }
        fan_out(&mut state, &run);
        if gap {
            self.start_catch_up(&room, &mut state);
        }
    }

    /// Messages this node committed: deliver here, and ring the other nodes.
    pub fn committed(self: &Arc<Self>, messages: Vec<Arc<StoredMessage>>) {
        self.deliver(&messages);
        self.tell_others(BusEvent::Committed(messages));
    }

    /// The store holds the room's messages up to `seq`: deliver what this node has not.
    pub fn poke(self: &Arc<Self>, name: &RoomName, seq: u64) {
        let Some(room) = self.room(name) else {
            return;
        };
        let mut state = room.lock();
        if seq <= state.last_delivered {
            return;
        }
        state.catch_up_to = state.catch_up_to.max(seq);
        self.start_catch_up(&room, &mut state);
    }

    fn start_catch_up(self: &Arc<Self>, room: &Arc<Room>, state: &mut RoomState) {
        if state.catching_up {
            return;
        }
        if !self.catch_up_enabled {
            // Test builds only: deliver past the gap, as a broker-trusting server would.
            state.last_delivered = state.catch_up_to.max(state.last_delivered);
            if let Some((&first, _)) = state.pending.first_key_value() {
                state.last_delivered = state.last_delivered.max(first - 1);
            }
            drain_pending(state);
            return;
        }
        state.catching_up = true;
        metrics::counter!("wschat_store_catchups_total").increment(1);
        let hub = self.clone();
        let room = room.clone();
        tokio::spawn(async move {
            use futures_util::FutureExt;
            let catch_up = std::panic::AssertUnwindSafe(hub.catch_up(room.clone()));
            if catch_up.catch_unwind().await.is_err() {
                // A bug; left set, the flag would hold every later message of the room
                // on this node for good. The next bell or resync starts another.
                tracing::error!(room = %room.name, "a room's catch-up panicked");
                room.lock().catching_up = false;
            }
        });
    }

    /// Read every served room's head from the store and catch up where behind (after a
    /// broker reconnect, and periodically, in case a bell was lost). Calls made while one
    /// runs do not read the store again each: they return at once, and the running one
    /// reads once more after its read (a slow database would otherwise pile up the
    /// heartbeat's every 4 s, and NATS tells of a slow consumer once per dropped message).
    pub async fn resync(self: Arc<Self>) {
        // SeqCst throughout: a caller's store to `resync_again` then look at `resyncing`,
        // against the runner's reset of `resyncing` then look at `resync_again`, must not
        // both see the old value (then neither would read).
        self.resync_again.store(true, Ordering::SeqCst);
        // Whoever sets `resyncing` reads until no call is left unread; the others return.
        while self.resync_again.load(Ordering::SeqCst)
            && !self.resyncing.swap(true, Ordering::SeqCst)
        {
            let running = Resyncing(&self.resyncing);
            if self.resync_again.swap(false, Ordering::SeqCst) {
                self.read_heads().await;
            }
            drop(running);
        }
    }

    async fn read_heads(self: &Arc<Self>) {
        let names: Vec<RoomName> = self.rooms().keys().cloned().collect();
        if names.is_empty() {
            return;
        }
        match self.bounded(self.store.room_heads(&names)).await {
            Ok(heads) => {
                for (room, head) in heads {
                    self.poke(&room, head);
                }
            }
            Err(e) => tracing::warn!(error = %e, "resync: cannot read room heads"),
        }
    }

    /// An event from another node.
    pub fn on_remote(self: &Arc<Self>, node: &str, body: Body) {
        match body {
            Body::Messages { msgs } => {
                let mut full = Vec::with_capacity(msgs.len());
                for m in msgs {
                    let Ok(room) = RoomName::new(m.room) else {
                        continue;
                    };
                    match m.payload {
                        Some(p) => full.push(Arc::new(StoredMessage {
                            room,
                            seq: m.seq,
                            id: p.id,
                            user: p.user,
                            text: p.text,
                            time_ms: p.time_ms,
                            client_msg_id: p.cmid,
                        })),
                        None => {
                            self.deliver(&full);
                            full.clear();
                            self.poke(&room, m.seq);
                        }
                    }
                }
                self.deliver(&full);
            }
            Body::Typing { room, user } => {
                if let Ok(room) = RoomName::new(room) {
                    self.typing(&room, &user, None);
                }
            }
            Body::Presence {
                room,
                mut users,
                part,
                parts,
            } => {
                let Some(room) = RoomName::new(room).ok().and_then(|r| self.room(&r)) else {
                    return;
                };
                let mut state = room.lock();
                if parts > 1 {
                    // Parts come in order from one node: the first starts the list, each
                    // next one adds to it, the last completes it. A list with a part
                    // missing (not heard, or expired before the rest came) is dropped and
                    // waits for the next refresh: taken, it would tell the room that the
                    // users of the missing part left.
                    let now = Instant::now();
                    if part == 0 {
                        state.remote_parts.insert(
                            node.to_owned(),
                            Parts {
                                users: Vec::new(),
                                next: 0,
                                heard: now,
                            },
                        );
                    }
                    let Some(gathered) =
                        state.remote_parts.get_mut(node).filter(|g| g.next == part)
                    else {
                        state.remote_parts.remove(node);
                        return;
                    };
                    gathered.users.append(&mut users);
                    gathered.next = part + 1;
                    gathered.heard = now;
                    if part + 1 < parts {
                        return;
                    }
                    users = state
                        .remote_parts
                        .remove(node)
                        .map(|g| g.users)
                        .unwrap_or_default();
                }
                let before = state.users();
                if users.is_empty() {
                    state.remote.remove(node);
                } else {
                    state
                        .remote
                        .insert(node.to_owned(), (users, Instant::now()));
                }
                state.announce(&room.name, &before, None);
            }
            Body::PresenceQuery { room } => {
                let Some(room) = RoomName::new(room).ok().and_then(|r| self.room(&r)) else {
                    return;
                };
                let users = room.lock().local_users();
                if !users.is_empty() {
                    self.tell_others(BusEvent::Presence {
                        room: room.name.clone(),
                        users,
                    });
                }
            }
        }
    }

    /// Tell the other nodes who is here, for every room (refreshes their expiry).
    pub fn refresh_presence(&self) {
        let rooms: Vec<Arc<Room>> = self.rooms().values().cloned().collect();
        for room in rooms {
            // Told by `tell_changed_presence`, at a rate the queue takes: all at once, a
            // node in more rooms than the queue holds would drop the same rooms' lists at
            // every heartbeat, and the other nodes would expire those users for good.
            if !room.lock().presence.is_empty() {
                self.presence_changed_here(&room.name);
            }
        }
    }

    /// Forget other nodes' presence not refreshed within `max_age` (a node that died
    /// without saying goodbye).
    pub fn expire_presence(&self, max_age: Duration) {
        let rooms: Vec<Arc<Room>> = self.rooms().values().cloned().collect();
        for room in rooms {
            let mut state = room.lock();
            state
                .remote_parts
                .retain(|_, parts| parts.heard.elapsed() <= max_age);
            if state
                .remote
                .values()
                .all(|(_, seen)| seen.elapsed() <= max_age)
            {
                continue;
            }
            let before = state.users();
            state
                .remote
                .retain(|_, (_, seen)| seen.elapsed() <= max_age);
            state.announce(&room.name, &before, None);
        }
    }

    /// Rooms served here, with their member counts and users (on any node).
    pub fn room_summaries(&self) -> Vec<(RoomName, usize, Vec<String>)> {
        let rooms: Vec<Arc<Room>> = self.rooms().values().cloned().collect();
        let mut out: Vec<_> = rooms
            .iter()
            .map(|room| {
                let state = room.lock();
                (
                    room.name.clone(),
                    state.subs.len(),
                    state.users().into_iter().collect(),
                )
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Read the store from the room's last delivered seq until the gap before the first
    /// pending message is closed, delivering in order.
    async fn catch_up(self: Arc<Self>, room: Arc<Room>) {
        let mut backoff = Backoff::default();
        const PAGE: u32 = 500;
        const EMPTY_READS_BEFORE_GIVING_UP: u32 = 20;
        let mut empty_reads = 0;
        loop {
            let from = room.lock().last_delivered;
            match self
                .bounded(self.store.messages_after(&room.name, from, PAGE))
                .await
            {
                Ok(read) => {
                    let full_page = read.len() == PAGE as usize;
                    let mut state = room.lock();
                    if read.is_empty() {
                        empty_reads += 1;
                    }
                    let mut next = state.last_delivered + 1;
                    if let Some(first) = read.first().filter(|m| m.seq > next) {
                        // A room's seqs commit in order, so a seq the store has means every
                        // lower one was committed: the missing ones were deleted by
                        // retention before this node delivered them. They cannot be
                        // delivered; what follows them can, after a `reset` that tells
                        // v1 members so (never a silent gap).
                        tracing::warn!(
                            room = %room.name,
                            from = next,
                            to = first.seq - 1,
                            "messages deleted by retention before this node delivered them"
                        );
                        push_reset(&state, &room.name, next - 1, first.seq);
                        next = first.seq;
                    }
                    let mut run = Vec::new();
                    for msg in read {
                        if msg.seq == next + run.len() as u64 {
                            run.push(Arc::new(msg));
                        }
                    }
                    fan_out(&mut state, &run);
                    drain_pending(&mut state);
                    if state.last_delivered > from {
                        // Progress: only a pass that moves nothing on waits longer. (Empty
                        // reads still count over the whole catch-up: the room's own new
                        // messages, read from the store while it runs, must not keep one
                        // going forever for a seq the store will never have.)
                        backoff.progressed();
                    }
                    let behind = state.catch_up_to > state.last_delivered;
                    if state.pending.is_empty() && !behind {
                        state.catching_up = false;
                        return;
                    }
                    if empty_reads >= EMPTY_READS_BEFORE_GIVING_UP {
                        // The store does not have what the bell announced (another
                        // database on the same broker subject?): do not spin forever.
                        tracing::error!(room = %room.name, "catch-up found nothing in the store; giving up");
                        state.catch_up_to = state.last_delivered;
                        state.pending.clear();
                        state.catching_up = false;
                        return;
                    }
                    if full_page {
                        continue;
                    }
                }
                Err(e) => {
                    tracing::warn!(room = %room.name, error = %e, "catch-up read failed; retrying");
                }
            }
            tokio::time::sleep(backoff.next()).await;
        }
    }
}

/// Resets `Hub::resyncing` when the running resync ends, or panics.
struct Resyncing<'a>(&'a AtomicBool);

impl Drop for Resyncing<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

/// The wait between catch-up reads that did not finish: 10 ms, doubling to 2 s, and 10 ms
/// again after a read that delivered something (a busy room on several nodes, whose bells
/// keep coming out of order, would otherwise get its messages in bursts ever further apart).
struct Backoff {
    next: Duration,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(10);
    const MAX: Duration = Duration::from_secs(2);

    fn next(&mut self) -> Duration {
        let now = self.next;
        self.next = (now * 2).min(Self::MAX);
        now
    }

    fn progressed(&mut self) {
        self.next = Self::FIRST;
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self { next: Self::FIRST }
    }
}

/// Messages beyond a gap held for the catch-up, at most this many a room: past it they are
/// dropped and read from the store (a node that cannot read the store while the broker
/// still brings other nodes' messages would otherwise hold them all).
const MAX_PENDING: usize = 10_000;

/// Hold `msg` (beyond a gap) until the gap is read from the store; past `MAX_PENDING`,
/// drop what is held, and let the catch-up read it all from the store instead.
fn hold(state: &mut RoomState, msg: &Arc<StoredMessage>) {
    state.pending.insert(msg.seq, msg.clone());
    if state.pending.len() > MAX_PENDING {
        let highest = state.pending.last_key_value().map_or(0, |(&seq, _)| seq);
        state.catch_up_to = state.catch_up_to.max(highest);
        state.pending.clear();
    }
}

#[cfg(feature = "fault-injection")]
fn catch_up_enabled() -> bool {
    std::env::var_os("WSCHAT_FAULT_NO_CATCHUP").is_none()
}

#[cfg(not(feature = "fault-injection"))]
fn catch_up_enabled() -> bool {
    true
}

/// Deliver the pending messages that now follow on from the last delivered one.
fn drain_pending(state: &mut RoomState) {
    let mut run = Vec::new();
    while let Some(entry) = state.pending.first_entry() {
        let seq = *entry.key();
        let next = state.last_delivered + run.len() as u64 + 1;
        if seq < next {
            entry.remove();
        } else if seq == next {
            run.push(entry.remove());
        } else {
            break;
        }
    }
    fan_out(state, &run);
}

/// `messages` grouped by room, each room's in their order in `messages`, the rooms in the
/// order of their first message.
fn arrival_order(messages: &[Arc<StoredMessage>]) -> Vec<&Arc<StoredMessage>> {
    let mut keyed: Vec<(usize, &Arc<StoredMessage>)> = messages.iter().enumerate().collect();
    // Stable: within a room, the positions (and so the seqs) stay in order.
    keyed.sort_by(|a, b| a.1.room.cmp(&b.1.room));
    for room in keyed.chunk_by_mut(|a, b| a.1.room == b.1.room) {
        let first = room[0].0;
        for entry in room.iter_mut() {
            entry.0 = first;
        }
    }
    keyed.sort_by_key(|&(first, _)| first);
    keyed.into_iter().map(|(_, m)| m).collect()
}

/// Subscribers whose outboxes a fan-out loads together before pushing to them: their
/// cache misses then overlap instead of each stalling its own push (`Outbox::warm`).
const WARM_AHEAD: usize = 16;

/// Push `run`, the room's next messages (consecutive seqs), to every subscriber: each
/// message encoded once per protocol, each subscriber's share in one push.
fn fan_out<M: AsRef<StoredMessage>>(state: &mut RoomState, run: &[M]) {
    let (Some(first), Some(last)) = (run.first(), run.last()) else {
        return;
    };
    let first = first.as_ref().seq;
    let encode = |f: fn(&StoredMessage) -> Encoded| -> Vec<Encoded> {
        run.iter().map(|m| f(m.as_ref())).collect()
    };
    let mut legacy: Option<Vec<Encoded>> = None;
    let mut v1: Option<Vec<Encoded>> = None;
    for chunk in state.subs.chunks(WARM_AHEAD) {
        for s in chunk {
            s.outbox.warm();
        }
        for s in chunk {
            let frames = match s.protocol {
                Protocol::Legacy => legacy.get_or_insert_with(|| encode(frames::legacy_message)),
                Protocol::V1 => v1.get_or_insert_with(|| encode(frames::v1_message)),
            };
            s.outbox.push_live(s.sub, first, frames);
        }
    }
    // Only now: were a push to panic (a bug), the run would be read again from the store
    // at the room's next message (members that got it skip the repeat), not lost for those
    // after it.
    state.last_delivered = last.as_ref().seq;
    metrics::counter!("wschat_messages_delivered_total")
        .increment((state.subs.len() * run.len()) as u64);
}

/// Tell the v1 members that the messages after `since` up to `first_seq` are gone: a
/// `reset`, pushed as the live message at `first_seq - 1`, so that it is held like one
/// while a member's backfill runs (and dropped if the backfill went past it), and dropped
/// for a member that already has messages beyond the gap.
fn push_reset(state: &RoomState, room: &RoomName, since: u64, first_seq: u64) {
    let reset = frames::v1(&ServerFrame::Reset {
        room: room.to_string(),
        since,
        first_seq,
    });
    for s in state.subs.iter().filter(|s| s.protocol == Protocol::V1) {
        s.outbox
            .push_live(s.sub, first_seq - 1, std::slice::from_ref(&reset));
    }
}

fn push_typing(state: &RoomState, except: Option<u64>, frame: &Encoded) {
    for s in &state.subs {
        if s.protocol != Protocol::V1 || Some(s.id) == except {
            continue;
        }
        s.outbox.push(Item::Droppable {
            sub: s.sub,
            frame: frame.clone(),
        });
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::broker::QUEUE_CHATTER;
    use crate::store::commit_unheard;

    fn message(room: &str, seq: u64) -> Arc<StoredMessage> {
        Arc::new(StoredMessage {
            room: RoomName::new(room).expect("a valid room name"),
            id: seq as i64,
            seq,
            user: "u".into(),
            text: "t".into(),
            time_ms: 0,
            client_msg_id: None,
        })
    }

    #[test]
    fn rooms_are_delivered_in_the_order_of_their_first_message() {
        let batch = [
            message("zeta", 7),
            message("alpha", 3),
            message("zeta", 8),
            message("mid", 1),
            message("alpha", 4),
            message("zeta", 9),
        ];
        let order: Vec<(&str, u64)> = arrival_order(&batch)
            .iter()
            .map(|m| (m.room.as_str(), m.seq))
            .collect();
        assert_eq!(
            order,
            [
                ("zeta", 7),
                ("zeta", 8),
                ("zeta", 9),
                ("alpha", 3),
                ("alpha", 4),
                ("mid", 1)
            ]
        );
    }

    /// A legacy connection whose outbox writes into one end of an in-memory pipe (the
    /// other end is returned: what the client reads), tracked and synced for sub 0.
    fn connection(id: u64) -> (Arc<Conn>, tokio::io::DuplexStream) {
        connection_as(id, Protocol::Legacy)
    }

    fn connection_as(id: u64, protocol: Protocol) -> (Arc<Conn>, tokio::io::DuplexStream) {
        connection_for(id, "u", protocol)
    }

    fn connection_for(
        id: u64,
        user: &str,
        protocol: Protocol,
    ) -> (Arc<Conn>, tokio::io::DuplexStream) {
        use tokio_util::sync::CancellationToken;
        let (server, client) = tokio::io::duplex(1 << 16);
        let outbox = Outbox::new(
            Box::pin(server),
            None,
            1 << 20,
            64 * 1024,
            pacing::WritePacing::new(Duration::ZERO, 0),
            CancellationToken::new(),
        );
        tokio::spawn(outbox.clone().write_loop());
        outbox.push(Item::Track { sub: 0 });
        assert_eq!(outbox.sync_done(0, 0), Synced::Done);
        let conn = Conn::new(id, user.into(), protocol, outbox);
        (Arc::new(conn), client)
    }

    /// A one-node hub on a fresh SQLite store, with connection 1 subscribed to room "r".
    pub(crate) struct OneMember {
        pub(crate) _dir: tempfile::TempDir,
        pub(crate) hub: Arc<Hub>,
        pub(crate) store: Arc<dyn Store>,
        pub(crate) room: RoomName,
        pub(crate) member: Arc<Conn>,
        /// What the member's client reads.
        pub(crate) client: tokio::io::DuplexStream,
    }

    pub(crate) async fn one_member() -> OneMember {
        one_member_as(Protocol::Legacy).await
    }

    async fn one_member_as(protocol: Protocol) -> OneMember {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("hub.db").display());
        let store = crate::store::open(&url).await.unwrap();
        store.migrate().await.unwrap();
        let (outgoing, _) = crate::broker::queues();
        let hub = Hub::new(store.clone(), outgoing, false);
        let room = RoomName::new("r").unwrap();
        let (member, client) = connection_as(1, protocol);
        hub.subscribe(&room, &member, 0).await.unwrap();
        OneMember {
            _dir: dir,
            hub,
            store,
            room,
            member,
            client,
        }
    }

    /// What the client end of `connection` gets within a while (all of it by then).
    pub(crate) async fn read_for(client: &mut tokio::io::DuplexStream, wanted: &str) -> String {
        use tokio::io::AsyncReadExt;
        let mut got = Vec::new();
        let mut buf = vec![0u8; 1 << 16];
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !String::from_utf8_lossy(&got).contains(wanted) {
            match tokio::time::timeout_at(deadline, client.read(&mut buf)).await {
                Ok(Ok(n)) if n > 0 => got.extend_from_slice(&buf[..n]),
                _ => break,
            }
        }
        String::from_utf8_lossy(&got).into_owned()
    }

    /// A join that looked its room up just before the room's last member left (and the
    /// room left the map) still ends up in the map, and live messages reach it.
    #[tokio::test]
    async fn a_join_racing_the_last_leave_still_gets_live_messages() {
        // `_dir` is bound, not left to `..`: the store's folder lives to the test's end.
        let OneMember {
            _dir,
            hub,
            room,
            member: leaving,
            ..
        } = one_member().await;
        // The joiner's lookup, then the last member's leave.
        let found = hub.room(&room).unwrap();
        hub.unsubscribe(&room, &leaving, 0);
        assert!(hub.room(&room).is_none(), "the empty room left the map");
        let (joiner, mut client) = connection(2);
        hub.enter(&room, found, &joiner, 0);
        let served = hub.room(&room).expect("the room is back in the map");
        assert!(served.lock().subs.iter().any(|s| s.id == 2));
        hub.committed(vec![message("r", 1)]);
        assert!(read_for(&mut client, "\"t\"").await.contains("\"t\""));
    }

    /// A store whose `room_heads` is counted and waits for its gate.
    /// A store whose `room_heads` calls are counted and wait for `gate`, and whose
    /// heartbeats never answer when `hang_heartbeats` (a database that stopped answering).
    pub(crate) struct GatedStore {
        pub(crate) inner: Arc<dyn Store>,
        pub(crate) calls: AtomicUsize,
        pub(crate) gate: tokio::sync::Semaphore,
        pub(crate) hang_heartbeats: bool,
    }

    impl GatedStore {
        /// Over `inner`, its gate closed (`room_heads` waits for permits), heartbeats
        /// answered.
        pub(crate) fn closed(inner: Arc<dyn Store>) -> Arc<Self> {
            Arc::new(Self {
                inner,
                calls: AtomicUsize::new(0),
                gate: tokio::sync::Semaphore::new(0),
                hang_heartbeats: false,
            })
        }
    }

    #[async_trait::async_trait]
    impl Store for GatedStore {
        fn kind(&self) -> crate::store::StoreKind {
            self.inner.kind()
        }
        async fn migrate(&self) -> Result<(), StoreError> {
            self.inner.migrate().await
        }
        async fn pending_migrations(&self) -> Result<Vec<i64>, StoreError> {
            self.inner.pending_migrations().await
        }
        async fn ping(&self) -> Result<(), StoreError> {
            self.inner.ping().await
        }
        async fn session(
            &self,
            hash: &crate::store::KeyHash,
        ) -> Result<Option<crate::store::Session>, StoreError> {
            self.inner.session(hash).await
        }
        async fn create_session(
            &self,
            hash: &crate::store::KeyHash,
            user: &str,
            room: Option<i64>,
        ) -> Result<(), StoreError> {
            self.inner.create_session(hash, user, room).await
        }
        async fn revoked_sessions(
            &self,
            keys: &[crate::store::KeyHash],
        ) -> Result<Vec<crate::store::KeyHash>, StoreError> {
            self.inner.revoked_sessions(keys).await
        }
        async fn count_sessions(&self) -> Result<i64, StoreError> {
            self.inner.count_sessions().await
        }
        async fn commit_batch(
            &self,
            batch: Arc<[crate::store::NewMessage]>,
        ) -> Result<Vec<crate::store::CommitOutcome>, StoreError> {
            self.inner.commit_batch(batch).await
        }
        async fn room_head(&self, room: &RoomName) -> Result<crate::store::RoomHead, StoreError> {
            self.inner.room_head(room).await
        }
        async fn messages_after(
            &self,
            room: &RoomName,
            after: u64,
            limit: u32,
        ) -> Result<Vec<StoredMessage>, StoreError> {
            self.inner.messages_after(room, after, limit).await
        }
        async fn room_heads(&self, rooms: &[RoomName]) -> Result<Vec<(RoomName, u64)>, StoreError> {
            self.calls.fetch_add(1, Ordering::AcqRel);
            let _open = self.gate.acquire().await;
            self.inner.room_heads(rooms).await
        }
        async fn heartbeat_node(&self, node: &crate::store::NodeInfo) -> Result<(), StoreError> {
            if self.hang_heartbeats {
                std::future::pending::<()>().await;
            }
            self.inner.heartbeat_node(node).await
        }
        async fn live_nodes(
            &self,
            max_age: Duration,
        ) -> Result<Vec<crate::store::NodeInfo>, StoreError> {
            self.inner.live_nodes(max_age).await
        }
        async fn remove_node(&self, id: &str) -> Result<(), StoreError> {
            self.inner.remove_node(id).await
        }
        async fn prune(&self, keep: u64) -> Result<u64, StoreError> {
            self.inner.prune(keep).await
        }
        async fn messages_before(
            &self,
            room: &RoomName,
            before: Option<u64>,
            limit: u32,
        ) -> Result<Vec<StoredMessage>, StoreError> {
            self.inner.messages_before(room, before, limit).await
        }
        async fn revoke_session(&self, hash: &crate::store::KeyHash) -> Result<u64, StoreError> {
            self.inner.revoke_session(hash).await
        }
        async fn revoke_user_sessions(&self, user: &str) -> Result<u64, StoreError> {
            self.inner.revoke_user_sessions(user).await
        }
        async fn list_rooms(
            &self,
            after: Option<&RoomName>,
            limit: u32,
        ) -> Result<Vec<(RoomName, u64)>, StoreError> {
            self.inner.list_rooms(after, limit).await
        }
    }

    /// Resyncs asked while one reads the store (a slow database, a burst of NATS
    /// slow-consumer events) do not each read it: they return at once, and the running
    /// one reads once more, which finds what was committed meanwhile.
    #[tokio::test]
    async fn resyncs_asked_while_one_runs_read_the_store_once_more_not_each() {
        let OneMember {
            _dir,
            store: inner,
            room,
            member,
            mut client,
            ..
        } = one_member().await;
        let store = GatedStore::closed(Arc::clone(&inner));
        let (outgoing, _) = crate::broker::queues();
        let hub = Hub::new(store.clone(), outgoing, false);
        hub.subscribe(&room, &member, 0).await.unwrap();
        let first = tokio::spawn(hub.clone().resync());
        while store.calls.load(Ordering::Acquire) == 0 {
            tokio::task::yield_now().await;
        }
        commit_unheard(inner.as_ref(), &room, 3).await;
        let asked: Vec<_> = (0..50)
            .map(|_| tokio::spawn(hub.clone().resync()))
            .collect();
        for call in asked {
            tokio::time::timeout(Duration::from_secs(5), call)
                .await
                .expect("a resync asked while one runs returns at once")
                .unwrap();
        }
        assert_eq!(store.calls.load(Ordering::Acquire), 1);
        store.gate.add_permits(100);
        first.await.unwrap();
        assert_eq!(store.calls.load(Ordering::Acquire), 2, "one more read");
        assert!(read_for(&mut client, "text-03").await.contains("text-03"));
        hub.clone().resync().await;
        assert_eq!(
            store.calls.load(Ordering::Acquire),
            3,
            "a later call reads again"
        );
    }

    /// A hub that other nodes hear, with one connection (user "u") in rooms r0…r{n-1}, and
    /// the forwarder's end of its queues.
    async fn in_rooms(
        n: usize,
    ) -> (
        tempfile::TempDir,
        Arc<Hub>,
        crate::broker::FromHub,
        (Arc<Conn>, tokio::io::DuplexStream),
    ) {
        let OneMember { _dir, store, .. } = one_member().await;
        let (outgoing, from) = crate::broker::queues();
        let hub = Hub::new(store, outgoing, true);
        let (member, client) = connection(2);
        for i in 0..n {
            let name = RoomName::new(format!("r{i}")).unwrap();
            hub.enter(&name, Room::new(&name, 0), &member, i as SubId);
        }
        (_dir, hub, from, (member, client))
    }

    /// A heartbeat's refresh of more rooms than the queue to the other nodes holds tells
    /// every room, at the rate the queue is drained: all at once, the same rooms' lists
    /// were dropped at every heartbeat, and their users expired on the other nodes.
    #[tokio::test]
    async fn a_refresh_of_more_rooms_than_the_queue_holds_tells_every_room() {
        let rooms = crate::broker::QUEUE_CHATTER + 4_000;
        let (_dir, hub, mut from, _member) = in_rooms(rooms).await;
        // The joins' own news, told and published: what follows is the refresh alone.
        *hub.presence_changed.lock().unwrap() = Marked::default();
        hub.refresh_presence();
        let mut told = HashSet::new();
        // The forwarder takes at most the queue's size between two calls here.
        for _ in 0..rooms {
            hub.tell_changed_presence();
            let mut taken = 0;
            while let Ok(event) = from.chatter.try_recv() {
                if let BusEvent::Presence { room, users } = event {
                    assert_eq!(users, ["u"]);
                    told.insert(room);
                }
                taken += 1;
            }
            if taken == 0 {
                break;
            }
        }
        assert_eq!(told.len(), rooms, "every room's list was told");
    }

    /// A forwarder slower than the refreshes (the queue full, every room marked again at
    /// each heartbeat): rooms are still told in turn, none passed over for good.
    #[tokio::test]
    async fn refreshes_faster_than_the_queue_drains_still_tell_every_room_in_turn() {
        let rooms = 20_000;
        let (_dir, hub, mut from, _member) = in_rooms(rooms).await;
        let mut told = HashSet::new();
        for _ in 0..40 {
            hub.refresh_presence();
            hub.tell_changed_presence();
            // The forwarder takes 2,000 events a heartbeat: the queue stays full.
            for _ in 0..2_000 {
                let Ok(event) = from.chatter.try_recv() else {
                    break;
                };
                if let BusEvent::Presence { room, .. } = event {
                    told.insert(room);
                }
            }
        }
        assert_eq!(told.len(), rooms, "every room was told in 40 heartbeats");
    }

    /// A resync whose read never answers (a database gone without closing the connection)
    /// ends at the bound: the resyncs after it read the store again.
    #[tokio::test]
    async fn a_resync_whose_read_never_answers_does_not_hold_off_the_next() {
        let OneMember {
            _dir,
            store: inner,
            room,
            member,
            mut client,
            ..
        } = one_member().await;
        let store = GatedStore::closed(Arc::clone(&inner));
        let (outgoing, _) = crate::broker::queues();
        let hub = Hub::with_read_bound(store.clone(), outgoing, false, Duration::from_millis(200));
        hub.subscribe(&room, &member, 0).await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), hub.clone().resync())
            .await
            .expect("the read that never answers ends at the bound");
        commit_unheard(inner.as_ref(), &room, 2).await;
        store.gate.add_permits(100);
        hub.clone().resync().await;
        assert_eq!(store.calls.load(Ordering::Acquire), 2, "read again");
        assert!(read_for(&mut client, "text-02").await.contains("text-02"));
    }

    /// A join waiting for a room's lock (held through a long fan-out) does not hold the
    /// map meanwhile: every other room's delivery needs the map.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_join_waiting_for_a_busy_room_does_not_hold_up_the_map() {
        let OneMember {
            _dir, hub, room, ..
        } = one_member().await;
        let served = hub.room(&room).unwrap();
        let busy = served.lock();
        let (joiner, _client) = connection(2);
        let joining = {
            let (hub, room, found) = (hub.clone(), room.clone(), served.clone());
            std::thread::spawn(move || hub.enter(&room, found, &joiner, 0))
        };
        // Time for the join to reach the room's lock.
        std::thread::sleep(Duration::from_millis(100));
        let (tx, rx) = std::sync::mpsc::channel();
        let counting = {
            let hub = hub.clone();
            std::thread::spawn(move || tx.send(hub.room_count()))
        };
        let counted = rx.recv_timeout(Duration::from_secs(5));
        drop(busy);
        joining.join().unwrap();
        let _ = counting.join();
        assert_eq!(counted, Ok(1), "the map waited for the busy room");
        assert_eq!(served.lock().subs.len(), 2, "the join went in");
    }

    /// A join that finds a room its last member is leaving (emptied, not yet out of the
    /// map) puts a new room in its place, from where the old one had delivered.
    #[tokio::test]
    async fn a_join_finding_an_emptied_room_replaces_it() {
        let OneMember {
            _dir,
            hub,
            room,
            member: leaving,
            ..
        } = one_member().await;
        let old = hub.room(&room).unwrap();
        // The leave's first half: the room emptied and marked, still in the map.
        {
            let mut state = old.lock();
            state.last_delivered = 5;
            state.subs.clear();
            state.removed = true;
        }
        let (joiner, mut client) = connection(2);
        hub.enter(&room, Arc::clone(&old), &joiner, 0);
        // The leaving member's unsubscribe now finds the new room, which it is not in.
        hub.unsubscribe(&room, &leaving, 0);
        let served = hub.room(&room).expect("a room in the map");
        assert!(!Arc::ptr_eq(&served, &old), "the emptied room was replaced");
        assert_eq!(served.lock().last_delivered, 5);
        assert_eq!(served.lock().subs.len(), 1);
        hub.committed(vec![message("r", 6)]);
        assert!(read_for(&mut client, "\"t\"").await.contains("\"t\""));
    }

    /// A node that fell behind by more than retention keeps: the catch-up read finds the
    /// missing seqs deleted, delivers what the store still has, and ends.
    #[tokio::test]
    async fn a_catch_up_past_messages_retention_deleted_delivers_the_rest() {
        let OneMember {
            _dir,
            hub,
            store,
            room,
            mut client,
            ..
        } = one_member().await;
        // Ten commits the hub never heard of, then retention keeps the last three.
        commit_unheard(store.as_ref(), &room, 10).await;
        assert_eq!(store.prune(3).await.unwrap(), 7);
        hub.clone().resync().await;
        let got = read_for(&mut client, "text-10").await;
        for kept in ["text-08", "text-09", "text-10"] {
            assert!(got.contains(kept), "{kept} in {got}");
        }
        assert!(!got.contains("text-07"));
        let served = hub.room(&room).unwrap();
        let state = served.lock();
        assert_eq!(state.last_delivered, 10);
        assert!(!state.catching_up, "the catch-up ended");
    }

    /// The same for a v1 member: a `reset` naming the gap comes before what follows it.
    #[tokio::test]
    async fn a_catch_up_past_messages_retention_deleted_tells_v1_members_reset() {
        let OneMember {
            _dir,
            hub,
            store,
            room,
            mut client,
            ..
        } = one_member_as(Protocol::V1).await;
        commit_unheard(store.as_ref(), &room, 10).await;
        assert_eq!(store.prune(3).await.unwrap(), 7);
        hub.clone().resync().await;
        let got = read_for(&mut client, "text-10").await;
        let reset = r#"{"type":"reset","room":"r","since":0,"first_seq":8}"#;
        let at = |wanted: &str| {
            got.find(wanted)
                .unwrap_or_else(|| panic!("{wanted} in {got}"))
        };
        assert!(at(reset) < at("text-08"), "{got}");
        assert!(
            at("text-08") < at("text-09") && at("text-09") < at("text-10"),
            "{got}"
        );
        assert!(!got.contains("text-07"), "{got}");
        assert_eq!(got.matches("\"reset\"").count(), 1, "{got}");
    }

    /// A member already past the gap (its backfill read beyond it) does not get the reset.
    #[tokio::test]
    async fn a_reset_before_what_a_member_has_is_dropped() {
        let OneMember {
            _dir,
            hub,
            room,
            member,
            mut client,
            ..
        } = one_member_as(Protocol::V1).await;
        let frame = |seq| frames::v1_message(&message("r", seq));
        member.outbox.push_live(0, 9, &[frame(9)]);
        push_reset(&hub.room(&room).unwrap().lock(), &room, 0, 8);
        member.outbox.push_live(0, 10, &[frame(10)]);
        let got = read_for(&mut client, "\"seq\":10").await;
        assert!(
            got.contains("\"seq\":9") && got.contains("\"seq\":10"),
            "{got}"
        );
        assert!(!got.contains("reset"), "{got}");
    }

    #[test]
    fn the_catch_up_waits_longer_after_each_idle_read_and_briefly_after_progress() {
        let mut backoff = Backoff::default();
        let waits: Vec<u64> = (0..9).map(|_| backoff.next().as_millis() as u64).collect();
        assert_eq!(waits, [10, 20, 40, 80, 160, 320, 640, 1280, 2000]);
        backoff.progressed();
        assert_eq!(backoff.next(), Duration::from_millis(10));
        assert_eq!(backoff.next(), Duration::from_millis(20));
    }

    /// Messages beyond a gap that the store cannot close yet are held up to a bound; past
    /// it they are dropped, and the catch-up is told to read them from the store.
    #[tokio::test]
    async fn messages_held_beyond_a_gap_are_bounded_and_then_read_from_the_store() {
        let OneMember {
            _dir,
            hub,
            store,
            room,
            mut client,
            ..
        } = one_member().await;
        let served = hub.room(&room).unwrap();
        // As if a catch-up were already reading (and failing): everything is held.
        served.lock().catching_up = true;
        let total = MAX_PENDING as u64 + 5;
        for seq in 2..=total {
            hub.committed(vec![message("r", seq)]);
        }
        {
            let state = served.lock();
            assert!(
                state.pending.len() <= MAX_PENDING,
                "{}",
                state.pending.len()
            );
            assert!(
                state.catch_up_to > MAX_PENDING as u64,
                "{}",
                state.catch_up_to
            );
            assert!(
                (2..=total).all(|seq| state.pending.contains_key(&seq) || seq <= state.catch_up_to),
                "each message is held or left to the store"
            );
        }
        // The store has them all: the catch-up, once it can read, delivers every one.
        commit_unheard(store.as_ref(), &room, total).await;
        // The member reads all the while (its queue stays short).
        tokio::spawn(async move {
            use tokio::io::AsyncReadExt;
            let mut buf = vec![0u8; 1 << 16];
            while matches!(client.read(&mut buf).await, Ok(n) if n > 0) {}
        });
        served.lock().catching_up = false;
        hub.poke(&room, total);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while served.lock().last_delivered < total && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let state = served.lock();
        assert_eq!(state.last_delivered, total);
        assert!(state.pending.is_empty());
    }

    /// Another node's list in parts is taken when its last part comes, not before (a
    /// partial list would tell the room that the rest left); the parts of a node that dies
    /// between them expire with its presence.
    #[tokio::test]
    async fn another_nodes_presence_in_parts_is_taken_whole_and_a_partial_one_expires() {
        let OneMember {
            _dir,
            hub,
            room,
            client: _client,
            ..
        } = one_member().await;
        let part = |part: u32, users: &[&str]| Body::Presence {
            room: "r".into(),
            users: users.iter().map(|u| u.to_string()).collect(),
            part,
            parts: 3,
        };
        let remote = |hub: &Hub| {
            let served = hub.room(&room).unwrap();
            let state = served.lock();
            state.remote.get("n2").map(|(users, _)| users.clone())
        };
        hub.on_remote("n2", part(0, &["a", "b"]));
        hub.on_remote("n2", part(1, &["c"]));
        assert_eq!(remote(&hub), None, "not before the last part");
        hub.on_remote("n2", part(2, &["d"]));
        assert_eq!(
            remote(&hub),
            Some(vec!["a".into(), "b".into(), "c".into(), "d".into()])
        );
        // A new list starts over at part 0.
        hub.on_remote("n2", part(0, &["e"]));
        hub.on_remote("n2", part(1, &[]));
        hub.on_remote("n2", part(2, &["f"]));
        assert_eq!(remote(&hub), Some(vec!["e".into(), "f".into()]));
        // A node that dies between parts: what it sent of its list expires with it.
        hub.on_remote("n3", part(0, &["g"]));
        let gathering = |hub: &Hub| hub.room(&room).unwrap().lock().remote_parts.len();
        assert_eq!(gathering(&hub), 1);
        hub.expire_presence(Duration::from_secs(60));
        assert_eq!(
            gathering(&hub),
            1,
            "kept while the node may still send the rest"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
        hub.expire_presence(Duration::from_millis(10));
        assert_eq!(gathering(&hub), 0, "expired");
        assert_eq!(remote(&hub), None, "n2's complete list expired too");
        // The rest of an expired list, or of one whose first part was missed, is no list.
        hub.on_remote("n3", part(1, &["h"]));
        hub.on_remote("n3", part(2, &["i"]));
        let n3 = |hub: &Hub| hub.room(&room).unwrap().lock().remote.contains_key("n3");
        assert!(!n3(&hub), "a list without its first part");
        // Nor is one with a part missing in the middle.
        hub.on_remote("n3", part(0, &["j"]));
        hub.on_remote("n3", part(2, &["k"]));
        assert!(!n3(&hub), "a list without its middle part");
        assert_eq!(gathering(&hub), 0);
    }

    /// A broker that does not take events (NATS reconnecting) does not make the hub hold
    /// every event: at most `QUEUE_CHATTER` typing notices wait, the rest are dropped, and
    /// the queue takes events again once the forwarder does.
    #[tokio::test]
    async fn events_for_other_nodes_wait_in_a_bounded_queue() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("hub.db").display());
        let store = crate::store::open(&url).await.unwrap();
        let (outgoing, mut forwarder) = crate::broker::queues();
        let hub = Hub::new(store, outgoing, true);
        let room = RoomName::new("r").unwrap();
        for _ in 0..QUEUE_CHATTER + 100 {
            hub.typing_from(&room, "ada", 1);
        }
        assert_eq!(
            forwarder.chatter.len(),
            QUEUE_CHATTER,
            "the rest were dropped"
        );
        assert!(hub.dropping.load(Ordering::Relaxed));
        // Typing and presence dropped first: a commit's bell still gets through.
        hub.committed(vec![message("r", 1)]);
        assert_eq!(forwarder.commits.len(), 1, "a commit is not crowded out");
        // The forwarder takes one: the next event is queued again.
        assert!(forwarder.chatter.recv().await.is_some());
        hub.typing_from(&room, "ada", 1);
        assert_eq!(forwarder.chatter.len(), QUEUE_CHATTER);
        assert!(!hub.dropping.load(Ordering::Relaxed));
    }

    /// A member that reads slowly loses presence diffs, not its connection (DESIGN: drop
    /// typing and presence first), and gets the full list once it has room: at the room's
    /// next change, or from the heartbeat's repair when the room has no news.
    #[tokio::test]
    async fn a_slow_member_loses_presence_diffs_then_gets_the_full_list() {
        use tokio::io::AsyncReadExt;
        let OneMember {
            _dir,
            hub,
            room,
            member,
            mut client,
            ..
        } = one_member_as(Protocol::V1).await;
        let mut others = Vec::new();
        for (id, user, repaired_by) in [(2, "bob", "carol"), (4, "dave", "")] {
            // Over half the member's queue (1 MiB) waits: the client reads nothing yet.
            let big = 600_000;
            member
                .outbox
                .push(Item::Frame(frames::text("x".repeat(big))));
            let (conn, conn_client) = connection_for(id, user, Protocol::V1);
            hub.subscribe(&room, &conn, 0).await.unwrap();
            others.push((conn, conn_client));
            assert!(
                member.outbox.presence_stale(0),
                "{user}'s arrival was dropped"
            );
            assert!(!member.outbox.cancel.is_cancelled(), "no 4008 for presence");
            let mut got = 0;
            let mut buf = vec![0u8; 1 << 16];
            while got < big {
                got += tokio::time::timeout(Duration::from_secs(5), client.read(&mut buf))
                    .await
                    .expect("the big frame comes")
                    .unwrap();
            }
            if repaired_by.is_empty() {
                hub.repair_presence();
            } else {
                let (conn, conn_client) = connection_for(id + 1, repaired_by, Protocol::V1);
                hub.subscribe(&room, &conn, 0).await.unwrap();
                others.push((conn, conn_client));
            }
            let users = if repaired_by.is_empty() {
                r#"["bob","carol","dave","u"]"#
            } else {
                r#"["bob","carol","u"]"#
            };
            let read = read_for(&mut client, users).await;
            assert!(
                read.contains(&format!(
                    r#"{{"type":"presence","room":"r","users":{users}}}"#
                )),
                "{read}"
            );
            assert!(!member.outbox.presence_stale(0));
        }
    }
}
