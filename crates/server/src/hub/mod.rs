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

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::extract::ws::Utf8Bytes;
use tokio::sync::Notify;
use wschat_protocol::v1::ServerFrame;
use wschat_protocol::RoomName;

use crate::store::{Store, StoreError, StoredMessage};
pub use outbox::{Item, Outbox, Pushed, SubId};

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
    pub outbox: Outbox,
    inflight: AtomicUsize,
    settled: Notify,
}

impl Conn {
    pub fn new(id: u64, user: Arc<str>, protocol: Protocol, outbox: Outbox) -> Self {
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

struct Subscriber {
    conn: Arc<Conn>,
    sub: SubId,
}

#[derive(Default)]
struct RoomState {
    last_delivered: u64,
    subs: Vec<Subscriber>,
    /// Users present on this node, with how many of their connections are subscribed.
    presence: BTreeMap<Arc<str>, usize>,
    /// Messages beyond a gap, waiting for the gap to be read from the store.
    pending: BTreeMap<u64, Arc<StoredMessage>>,
    catching_up: bool,
}

struct Room {
    name: RoomName,
    state: Mutex<RoomState>,
}

impl Room {
    fn lock(&self) -> MutexGuard<'_, RoomState> {
        // A panic while holding a room lock is a bug; keep serving the room regardless.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

pub struct Hub {
    rooms: Mutex<HashMap<RoomName, Arc<Room>>>,
    store: Arc<dyn Store>,
}

impl Hub {
    pub fn new(store: Arc<dyn Store>) -> Arc<Self> {
        Arc::new(Self {
            rooms: Mutex::new(HashMap::new()),
            store,
        })
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
    /// committed after this call reaches the connection's outbox as `Item::Live`.
    pub async fn subscribe(
        self: &Arc<Self>,
        name: &RoomName,
        conn: &Arc<Conn>,
        sub: SubId,
    ) -> Result<(), StoreError> {
        let room = match self.room(name) {
            Some(room) => room,
            None => {
                let head = self.store.room_head(name).await?;
                let mut rooms = self.rooms();
                rooms
                    .entry(name.clone())
                    .or_insert_with(|| {
                        Arc::new(Room {
                            name: name.clone(),
                            state: Mutex::new(RoomState {
                                last_delivered: head.last_seq,
                                ..RoomState::default()
                            }),
                        })
                    })
                    .clone()
            }
        };
        let mut state = room.lock();
        state.subs.push(Subscriber {
            conn: conn.clone(),
            sub,
        });
        let count = state.presence.entry(conn.user.clone()).or_insert(0);
        *count += 1;
        if *count == 1 {
            let diff = frames::v1(&ServerFrame::PresenceDiff {
                room: name.to_string(),
                joined: vec![conn.user.to_string()],
                left: vec![],
            });
            push_room_event(&state, Some(conn.id), &diff, false);
        }
        Ok(())
    }

    /// Undo `subscribe`.
    pub fn unsubscribe(&self, name: &RoomName, conn: &Conn, sub: SubId) {
        let Some(room) = self.room(name) else {
            return;
        };
        let empty = {
            let mut state = room.lock();
            let before = state.subs.len();
            state
                .subs
                .retain(|s| !(s.conn.id == conn.id && s.sub == sub));
            if state.subs.len() < before {
                if let Some(count) = state.presence.get_mut(&conn.user) {
                    *count -= 1;
                    if *count == 0 {
                        state.presence.remove(&conn.user);
                        let diff = frames::v1(&ServerFrame::PresenceDiff {
                            room: name.to_string(),
                            joined: vec![],
                            left: vec![conn.user.to_string()],
                        });
                        push_room_event(&state, None, &diff, false);
                    }
                }
            }
            state.subs.is_empty()
        };
        if empty {
            let mut rooms = self.rooms();
            if let Some(current) = rooms.get(name) {
                if Arc::ptr_eq(current, &room) && current.lock().subs.is_empty() {
                    rooms.remove(name);
                }
            }
        }
    }

    /// Queue the room's presence list for `conn` (after its backfill).
    pub fn send_presence(&self, name: &RoomName, conn: &Conn) {
        let Some(room) = self.room(name) else {
            return;
        };
        let state = room.lock();
        let frame = frames::v1(&ServerFrame::Presence {
            room: name.to_string(),
            users: state.presence.keys().map(|u| u.to_string()).collect(),
        });
        conn.outbox.push(Item::Frame(frame));
    }

    /// Relay a typing notice to the room's v1 subscribers but the sender's connection.
    pub fn typing(&self, name: &RoomName, user: &str, origin: Option<u64>) {
        let Some(room) = self.room(name) else {
            return;
        };
        let state = room.lock();
        let frame = frames::v1(&ServerFrame::Typing {
            room: name.to_string(),
            user: user.to_owned(),
        });
        push_room_event(&state, origin, &frame, true);
    }

    /// Deliver committed messages (of any rooms, each room's in seq order).
    pub fn deliver(self: &Arc<Self>, messages: &[Arc<StoredMessage>]) {
        for msg in messages {
            let Some(room) = self.room(&msg.room) else {
                continue;
            };
            let mut state = room.lock();
            if msg.seq <= state.last_delivered {
                continue;
            }
            if msg.seq == state.last_delivered + 1 && !state.catching_up {
                fan_out(&mut state, msg);
                continue;
            }
            state.pending.insert(msg.seq, msg.clone());
            if !state.catching_up {
                state.catching_up = true;
                metrics::counter!("wschat_store_catchups_total").increment(1);
                let hub = self.clone();
                let room = room.clone();
                tokio::spawn(async move { hub.catch_up(room).await });
            }
        }
    }

    /// Read the store from the room's last delivered seq until the gap before the first
    /// pending message is closed, delivering in order.
    async fn catch_up(self: Arc<Self>, room: Arc<Room>) {
        let mut delay = Duration::from_millis(10);
        const PAGE: u32 = 500;
        loop {
            let from = room.lock().last_delivered;
            match self.store.messages_after(&room.name, from, PAGE).await {
                Ok(read) => {
                    let full_page = read.len() == PAGE as usize;
                    let mut state = room.lock();
                    for msg in read {
                        if msg.seq == state.last_delivered + 1 {
                            fan_out(&mut state, &Arc::new(msg));
                        }
                    }
                    drain_pending(&mut state);
                    if state.pending.is_empty() {
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
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(2));
        }
    }
}

fn drain_pending(state: &mut RoomState) {
    while let Some(entry) = state.pending.first_entry() {
        let seq = *entry.key();
        if seq <= state.last_delivered {
            entry.remove();
        } else if seq == state.last_delivered + 1 {
            let msg = entry.remove();
            fan_out(state, &msg);
        } else {
            break;
        }
    }
}

fn fan_out(state: &mut RoomState, msg: &Arc<StoredMessage>) {
    state.last_delivered = msg.seq;
    let mut legacy: Option<Utf8Bytes> = None;
    let mut v1: Option<Utf8Bytes> = None;
    for s in &state.subs {
        let frame = match s.conn.protocol {
            Protocol::Legacy => legacy.get_or_insert_with(|| frames::legacy_message(msg)),
            Protocol::V1 => v1.get_or_insert_with(|| frames::v1_message(msg)),
        }
        .clone();
        s.conn.outbox.push(Item::Live {
            sub: s.sub,
            seq: msg.seq,
            frame,
        });
    }
    metrics::counter!("wschat_messages_delivered_total").increment(state.subs.len() as u64);
}

fn push_room_event(state: &RoomState, except: Option<u64>, frame: &Utf8Bytes, droppable: bool) {
    for s in &state.subs {
        if s.conn.protocol != Protocol::V1 || Some(s.conn.id) == except {
            continue;
        }
        let item = if droppable {
            Item::Droppable {
                sub: s.sub,
                frame: frame.clone(),
            }
        } else {
            Item::RoomEvent {
                sub: s.sub,
                frame: frame.clone(),
            }
        };
        s.conn.outbox.push(item);
    }
}
