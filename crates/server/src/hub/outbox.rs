//! One connection's outbound queue: bounded in bytes, filled by the hub, the committer and
//! the connection's own reader, drained in batches by the connection's writer (which puts
//! every frame waiting into one socket write).
//!
//! A queue that would pass its byte limit overflows: what waits is dropped, a close with
//! 4008 (slow consumer) is queued, and the connection's token is cancelled. The client
//! resumes from its last seq and loses nothing, because the store is the log. Droppable
//! items (typing notices) are dropped first, once the queue is half full.

use std::collections::VecDeque;
use std::sync::Mutex;

use axum::extract::ws::Utf8Bytes;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use wschat_protocol::close;

/// A connection's handle on one of its room subscriptions.
pub type SubId = u32;

/// What a connection's writer sends.
#[derive(Debug, Clone)]
pub enum Item {
    /// A reply or notice that is not part of a room's message order.
    Frame(Utf8Bytes),
    /// A message of a subscribed room, delivered live by the hub.
    Live {
        sub: SubId,
        seq: u64,
        frame: Utf8Bytes,
    },
    /// A message of a subscribed room, read from the store on join.
    Backfill {
        sub: SubId,
        seq: u64,
        frame: Utf8Bytes,
    },
    /// Start tracking a subscription: its live messages are held until `SyncDone`.
    Track { sub: SubId },
    /// Stop tracking a subscription (the room was left).
    Untrack { sub: SubId },
    /// The backfill of `sub` is complete through seq `through`: live messages held back
    /// meanwhile, and newer than that, may go.
    SyncDone { sub: SubId, through: u64 },
    /// A room event (presence diff, typing) that is dropped while `sub` is syncing.
    RoomEvent { sub: SubId, frame: Utf8Bytes },
    /// A notice that may be dropped under pressure (typing).
    Droppable { sub: SubId, frame: Utf8Bytes },
    /// A WebSocket ping.
    Ping,
    /// Close the connection with this code and reason, after what is queued before it.
    Close(u16, &'static str),
}

impl Item {
    fn bytes(&self) -> usize {
        match self {
            Self::Frame(f)
            | Self::Live { frame: f, .. }
            | Self::Backfill { frame: f, .. }
            | Self::RoomEvent { frame: f, .. }
            | Self::Droppable { frame: f, .. } => f.len() + 32,
            Self::Track { .. }
            | Self::Untrack { .. }
            | Self::SyncDone { .. }
            | Self::Ping
            | Self::Close(..) => 32,
        }
    }
}

#[derive(Default)]
struct State {
    items: VecDeque<Item>,
    bytes: usize,
    /// A close is queued: nothing more is accepted.
    closing: bool,
}

pub struct Outbox {
    state: Mutex<State>,
    ready: Notify,
    drained: Notify,
    limit: usize,
    /// Cancelled when the connection must end now (overflow, revoked session).
    pub cancel: CancellationToken,
}

/// What `push` did with an item.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    Queued,
    /// A droppable item was dropped under pressure, or the connection is closing.
    Dropped,
    /// The queue overflowed: the connection is being closed with 4008.
    Overflow,
}

impl Outbox {
    pub fn new(limit: usize, cancel: CancellationToken) -> Self {
        Self {
            state: Mutex::new(State::default()),
            ready: Notify::new(),
            drained: Notify::new(),
            limit,
            cancel,
        }
    }

    pub fn push(&self, item: Item) -> Pushed {
        let size = item.bytes();
        let pushed = {
            let Ok(mut state) = self.state.lock() else {
                return Pushed::Dropped;
            };
            if state.closing {
                return Pushed::Dropped;
            }
            if matches!(item, Item::Droppable { .. }) && state.bytes + size > self.limit / 2 {
                return Pushed::Dropped;
            }
            if state.bytes + size > self.limit {
                state.items.clear();
                state.bytes = 0;
                state.closing = true;
                state
                    .items
                    .push_back(Item::Close(close::SLOW_CONSUMER, "slow consumer: resume"));
                Pushed::Overflow
            } else {
                state.bytes += size;
                state.closing = matches!(item, Item::Close(..));
                state.items.push_back(item);
                Pushed::Queued
            }
        };
        if pushed == Pushed::Overflow {
            metrics::counter!("wschat_queue_overflows_total").increment(1);
            self.cancel.cancel();
        }
        self.ready.notify_one();
        pushed
    }

    /// Queue a close after what is already queued; later pushes are dropped.
    pub fn close(&self, code: u16, reason: &'static str) {
        if let Ok(mut state) = self.state.lock() {
            if state.closing {
                return;
            }
            state.closing = true;
            state.items.push_back(Item::Close(code, reason));
        }
        self.ready.notify_one();
    }

    /// Wait until something is queued, then move everything queued into `into`.
    pub async fn take_all(&self, into: &mut Vec<Item>) {
        loop {
            if let Ok(mut state) = self.state.lock() {
                if !state.items.is_empty() {
                    into.extend(state.items.drain(..));
                    state.bytes = 0;
                    drop(state);
                    self.drained.notify_waiters();
                    return;
                }
            }
            self.ready.notified().await;
        }
    }

    /// Move whatever is queued into `into`, without waiting.
    pub fn take_all_now(&self, into: &mut Vec<Item>) {
        if let Ok(mut state) = self.state.lock() {
            into.extend(state.items.drain(..));
            state.bytes = 0;
        }
        self.drained.notify_waiters();
    }

    /// Wait until the queue holds at most `bytes` (for pacing a long backfill), or the
    /// connection is closing or cancelled.
    pub async fn wait_below(&self, bytes: usize) {
        loop {
            if self.cancel.is_cancelled() {
                return;
            }
            let notified = self.drained.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            match self.state.lock() {
                Ok(state) if state.bytes > bytes && !state.closing => {}
                _ => return,
            }
            tokio::select! {
                _ = notified => {}
                _ = self.cancel.cancelled() => return,
            }
        }
    }

    pub fn queued_bytes(&self) -> usize {
        self.state.lock().map(|s| s.bytes).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(n: usize) -> Item {
        Item::Frame(Utf8Bytes::from("x".repeat(n)))
    }

    #[tokio::test]
    async fn overflow_closes_with_slow_consumer_and_cancels() {
        let outbox = Outbox::new(1000, CancellationToken::new());
        assert_eq!(outbox.push(frame(400)), Pushed::Queued);
        assert_eq!(outbox.push(frame(400)), Pushed::Queued);
        assert_eq!(outbox.push(frame(400)), Pushed::Overflow);
        assert!(outbox.cancel.is_cancelled());
        assert_eq!(outbox.push(frame(1)), Pushed::Dropped);
        let mut items = Vec::new();
        outbox.take_all(&mut items).await;
        assert!(matches!(
            items.as_slice(),
            [Item::Close(close::SLOW_CONSUMER, _)]
        ));
    }

    #[tokio::test]
    async fn droppables_go_first_under_pressure() {
        let outbox = Outbox::new(1000, CancellationToken::new());
        assert_eq!(outbox.push(frame(500)), Pushed::Queued);
        let typing = Item::Droppable {
            sub: 0,
            frame: Utf8Bytes::from("t"),
        };
        assert_eq!(outbox.push(typing), Pushed::Dropped);
        assert_eq!(outbox.push(frame(100)), Pushed::Queued);
        assert!(!outbox.cancel.is_cancelled());
    }

    #[tokio::test]
    async fn take_all_drains_in_order() {
        let outbox = Outbox::new(1 << 20, CancellationToken::new());
        for n in 1..=3 {
            outbox.push(frame(n));
        }
        outbox.close(1000, "bye");
        let mut items = Vec::new();
        outbox.take_all(&mut items).await;
        let lens: Vec<usize> = items
            .iter()
            .map(|i| match i {
                Item::Frame(f) => f.len(),
                _ => 0,
            })
            .collect();
        assert_eq!(lens, vec![1, 2, 3, 0]);
        assert_eq!(outbox.queued_bytes(), 0);
    }
}
