//! Group commit: one task takes every send that queued up while the previous commit was
//! in flight, commits them (across rooms) in one transaction, then acknowledges each
//! sender, delivers to this node's hub and rings the other nodes, in commit order. An ack is only ever sent after commit.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use wschat_protocol::v1::{Ref, ServerFrame};
use wschat_protocol::ErrorCode;

use crate::hub::frames::{self, Encoded};
use crate::hub::{Conn, Hub, Item, Protocol};
use crate::store::{format_time, CommitOutcome, NewMessage, Store, StoreError};

/// Who waits for a send's outcome.
pub enum Reply {
    /// A connection: the ack or error goes into its outbox.
    Conn {
        conn: Arc<Conn>,
        reference: Option<Ref>,
    },
    /// An in-process caller (admin API, tests).
    Oneshot(oneshot::Sender<Result<CommitOutcome, CommitError>>),
}

pub struct SendRequest {
    pub msg: NewMessage,
    pub reply: Reply,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum CommitError {
    #[error("the store could not commit: {0}")]
    Unavailable(String),
    #[error("the server is shutting down")]
    ShuttingDown,
}

/// A send in the committer's queue, with when it was queued (for `wschat_send_ack_seconds`).
struct Queued {
    request: SendRequest,
    at: Instant,
}

/// The handle connections use to send.
#[derive(Clone)]
pub struct Committer {
    tx: mpsc::Sender<Queued>,
    stop: CancellationToken,
}

impl Committer {
    /// Start the commit task. It ends after `stop`, once what was queued is committed.
    pub fn start(
        store: Arc<dyn Store>,
        hub: Arc<Hub>,
        max_batch: usize,
        spacing: Spacing,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(max_batch.max(1) * 4);
        let stop = CancellationToken::new();
        let task = tokio::spawn(run(rx, store, hub, max_batch.max(1), spacing, stop.clone()));
        (Self { tx, stop }, task)
    }

    /// Refuse new sends (`shutting_down`); commit those already queued, then end.
    pub fn stop(&self) {
        self.stop.cancel();
    }

    /// Queue a send. Waits while the queue is full (backpressure on the sender).
    ///
    /// Queued at once when there is room; only a wait for room is a future on the heap.
    /// Every open connection's read loop holds this future's state for its whole life,
    /// so it is kept to a pointer.
    pub fn submit(
        &self,
        request: SendRequest,
    ) -> impl std::future::Future<Output = ()> + Send + '_ {
        let protocol = match &request.reply {
            Reply::Conn { conn, .. } => {
                conn.send_started();
                conn.protocol.label()
            }
            Reply::Oneshot(_) => "internal",
        };
        metrics::counter!("wschat_messages_received_total", "protocol" => protocol).increment(1);
        let queued = Queued {
            request,
            at: Instant::now(),
        };
        let wait = match self.tx.try_send(queued) {
            Ok(()) => None,
            Err(mpsc::error::TrySendError::Full(queued)) => Some(Box::pin(self.tx.send(queued))),
            Err(mpsc::error::TrySendError::Closed(queued)) => {
                answer_error(queued.request.reply, CommitError::ShuttingDown);
                None
            }
        };
        async move {
            if let Some(wait) = wait {
                if let Err(mpsc::error::SendError(queued)) = wait.await {
                    answer_error(queued.request.reply, CommitError::ShuttingDown);
                }
            }
        }
    }

    /// Commit one message and wait for its outcome.
    pub async fn send_and_wait(&self, msg: NewMessage) -> Result<CommitOutcome, CommitError> {
        let (tx, rx) = oneshot::channel();
        self.submit(SendRequest {
            msg,
            reply: Reply::Oneshot(tx),
        })
        .await;
        rx.await.unwrap_or(Err(CommitError::ShuttingDown))
    }
}

/// How far apart commits start while the node is busy (`commit_delay_ms`): the busy
/// switch is the write pacing's (`write_delay_above_per_sec`).
pub struct Spacing {
    pub delay: std::time::Duration,
    pub pacing: Arc<crate::hub::pacing::WritePacing>,
}

/// Committed batches that may wait for the settler (answers and fan-out) before the
/// committer waits too.
const SETTLING_BATCHES: usize = 4;

/// What the committer hands to the settler: a batch and its outcome.
struct Settled {
    batch: Vec<Queued>,
    result: Result<Vec<CommitOutcome>, StoreError>,
    committed_at: Instant,
}

/// The commit loop: the next batch's commit starts as soon as the previous one returns,
/// while a second task (`settle`) answers the senders and delivers, in commit order. The
/// database and this node's fan-out work at the same time.
async fn run(
    mut rx: mpsc::Receiver<Queued>,
    store: Arc<dyn Store>,
    hub: Arc<Hub>,
    max_batch: usize,
    spacing: Spacing,
    stop: CancellationToken,
) {
    let (settled_tx, settled_rx) = mpsc::channel(SETTLING_BATCHES);
    let settler = tokio::spawn(settle(settled_rx, hub));
    let mut last_start: Option<tokio::time::Instant> = None;
    loop {
        // Each batch moves to the settler, so it is a new vector: sized by what is queued
        // now, not by `max_batch` (10,000 entries for a batch that is mostly one message).
        let mut batch: Vec<Queued> = Vec::with_capacity(rx.len().clamp(1, max_batch));
        let received = tokio::select! {
            n = rx.recv_many(&mut batch, max_batch) => n,
            _ = stop.cancelled(), if !rx.is_closed() => {
                // Later submits fail (and are answered shutting_down); drain the rest.
                rx.close();
                continue;
            }
        };
        if received == 0 {
            break;
        }
        // While the node is busy, a commit starts at most every `spacing.delay`: what
        // arrives in the first moments joins it, and each commit (each fsync) carries more.
        if let (Some(last), false) = (last_start, spacing.delay.is_zero()) {
            let at = last + spacing.delay;
            if !spacing.pacing.delay().is_zero()
                && batch.len() < max_batch
                && at > tokio::time::Instant::now()
                && !stop.is_cancelled()
            {
                tokio::time::sleep_until(at).await;
                while batch.len() < max_batch {
                    match rx.try_recv() {
                        Ok(queued) => batch.push(queued),
                        Err(_) => break,
                    }
                }
            }
        }
        last_start = Some(tokio::time::Instant::now());
        let messages: Arc<[NewMessage]> = batch.iter().map(|q| q.request.msg.clone()).collect();
        let started = Instant::now();
        let result = store.commit_batch(messages).await;
        let committed_at = Instant::now();
        metrics::histogram!("wschat_commit_seconds").record(started.elapsed().as_secs_f64());
        metrics::histogram!("wschat_commit_batch_size").record(batch.len() as f64);
        tracing::trace!(batch = batch.len(), ok = result.is_ok(), "commit finished");
        // Waits while the settler is `SETTLING_BATCHES` behind: a fan-out slower than
        // the commits holds the next commit back (and the senders, through the queue)
        // instead of piling committed batches up.
        let _settler_ends_only_after_this_loop = settled_tx
            .send(Settled {
                batch,
                result,
                committed_at,
            })
            .await;
    }
    drop(settled_tx);
    if let Err(e) = settler.await {
        tracing::error!(error = %e, "the commit settler failed");
    }
}

/// Answers each batch's senders and hands its messages to the hub, in commit order.
async fn settle(mut rx: mpsc::Receiver<Settled>, hub: Arc<Hub>) {
    while let Some(Settled {
        mut batch,
        result,
        committed_at,
    }) = rx.recv().await
    {
        match result {
            Ok(outcomes) => {
                let mut committed = Vec::with_capacity(outcomes.len());
                let mut repeats = false;
                let mut stored = 0u64;
                let mut acks = Vec::with_capacity(batch.len());
                let mut queued_at = Vec::with_capacity(batch.len());
                for (queued, outcome) in batch.drain(..).zip(outcomes) {
                    // A retry's first message is rung again: when a commit failed in a way
                    // that left it committed (the connection died during COMMIT), its
                    // senders were told `unavailable` and no member was told of it. Hubs
                    // skip seqs they already delivered.
                    match outcome {
                        CommitOutcome::Duplicate(_) => repeats = true,
                        CommitOutcome::Stored(_) => stored += 1,
                    }
                    committed.push(outcome.message().clone());
                    answer(queued.request.reply, outcome, &mut acks);
                    queued_at.push(queued.at);
                }
                send_acks(acks);
                // Send to ack: from the queue until the ack is written or queued.
                let send_ack = metrics::histogram!("wschat_send_ack_seconds");
                for at in queued_at {
                    send_ack.record(at.elapsed().as_secs_f64());
                }
                // A retry of a stored message is acknowledged again, not counted again.
                metrics::counter!("wschat_messages_acknowledged_total").increment(stored);
                if repeats {
                    // Each room's messages in seq order, once (a repeat may be older than
                    // the batch's new messages, or repeated within it).
                    committed.sort_by(|a, b| a.room.cmp(&b.room).then(a.seq.cmp(&b.seq)));
                    committed.dedup_by(|a, b| a.room == b.room && a.seq == b.seq);
                }
                if !committed.is_empty() {
                    hub.committed(committed);
                    metrics::histogram!("wschat_fanout_seconds")
                        .record(committed_at.elapsed().as_secs_f64());
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, batch = batch.len(), "commit failed; senders told to retry");
                metrics::counter!("wschat_commit_errors_total").increment(1);
                let reason = match e {
                    StoreError::Unavailable(_) => "the store is unavailable".to_owned(),
                    other => other.to_string(),
                };
                for queued in batch.drain(..) {
                    answer_error(
                        queued.request.reply,
                        CommitError::Unavailable(reason.clone()),
                    );
                }
            }
        }
    }
}

/// Answer a send: a connection's (its ack frame, v1 only) is gathered into `acks`, for
/// `send_acks`; an in-process caller's goes at once.
fn answer(reply: Reply, outcome: CommitOutcome, acks: &mut Vec<(Arc<Conn>, Option<Encoded>)>) {
    match reply {
        Reply::Conn { conn, reference } => {
            let ack = (conn.protocol == Protocol::V1).then(|| {
                let m = outcome.message();
                frames::v1(&ServerFrame::Ack {
                    room: m.room.to_string(),
                    seq: m.seq,
                    id: m.id,
                    client_msg_id: m.client_msg_id.clone(),
                    time: format_time(m.time_ms),
                    reference,
                })
            });
            acks.push((conn, ack));
        }
        Reply::Oneshot(tx) => {
            let _ignored_if_caller_gone = tx.send(Ok(outcome));
        }
    }
}

/// Push one batch's acks, each connection's in one push (one write when it can go at once,
/// in commit order), then count its sends settled.
fn send_acks(mut acks: Vec<(Arc<Conn>, Option<Encoded>)>) {
    // Stable: each connection's acks keep their commit order.
    acks.sort_by_key(|(conn, _)| conn.id);
    for group in acks.chunk_by(|a, b| a.0.id == b.0.id) {
        let Some((conn, _)) = group.first() else {
            continue;
        };
        let frames: Vec<Encoded> = group.iter().filter_map(|(_, ack)| ack.clone()).collect();
        if !frames.is_empty() {
            conn.outbox.push_frames(&frames);
        }
        for _ in group {
            conn.send_settled();
        }
    }
}

fn answer_error(reply: Reply, error: CommitError) {
    match reply {
        Reply::Conn { conn, reference } => {
            let code = match error {
                CommitError::Unavailable(_) => ErrorCode::Unavailable,
                CommitError::ShuttingDown => ErrorCode::ShuttingDown,
            };
            let message = format!("not stored: {error}; retry");
            let frame = match conn.protocol {
                Protocol::V1 => frames::v1_error(code, message, reference),
                Protocol::Legacy => frames::legacy_error(code, &message),
            };
            conn.outbox.push(Item::Frame(frame));
            conn.send_settled();
        }
        Reply::Oneshot(tx) => {
            let _ignored_if_caller_gone = tx.send(Err(error));
        }
    }
}
