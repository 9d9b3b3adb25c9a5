//! Group commit: one loop (a task, or on SQLite the store's commit thread) takes every send
//! that queued up while the previous commit was in flight, commits them (across rooms) in
//! one transaction; a task then acknowledges each sender, delivers to this node's hub and
//! rings the other nodes, in commit order. An ack is only ever sent after commit.

use std::sync::{Arc, PoisonError};
use std::time::Instant;

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use wschat_protocol::v1::{Ref, ServerFrame};
use wschat_protocol::ErrorCode;

use crate::hub::frames::{self, Encoded};
use crate::hub::{Conn, Hub, Item, Protocol};
use crate::store::{
    format_time, CommitLoop, CommitOn, CommitOutcome, NewMessage, Store, StoreError,
};

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
    /// Not committed.
    #[error("the store could not commit: {0}")]
    Unavailable(String),
    /// It is not known whether the batch was committed: the store's answer was lost after
    /// the batch went out (`StoreError::Unconfirmed`), or no answer came from the committer
    /// (settling the batch panicked). A retry with the same `client_msg_id` is stored once.
    #[error("the commit's outcome is unknown: {0}")]
    Unconfirmed(String),
    #[error("the server is shutting down")]
    ShuttingDown,
}

impl CommitError {
    /// What a sender is told (over WebSocket or the admin API), `with_id` when its send
    /// carried a `client_msg_id`: whether it was stored, why not, and what to do.
    pub fn told(&self, with_id: bool) -> String {
        match (self, with_id) {
            (Self::Unconfirmed(_), true) => format!(
                "perhaps stored: {self}; retry with the same client_msg_id (it is stored once)"
            ),
            // A send with no id to retry with (every legacy one): a stored one reaches
            // the room, and sending it again would store it twice.
            (Self::Unconfirmed(_), false) => {
                format!("perhaps stored: {self}; if it does not appear, send it again")
            }
            (Self::Unavailable(_) | Self::ShuttingDown, _) => format!("not stored: {self}; retry"),
        }
    }

    /// What a failed commit tells its senders.
    fn from_store(e: &StoreError) -> Self {
        let reason = |e: &StoreError| match e {
            StoreError::Unavailable(_) => "the store is unavailable".to_owned(),
            other => other.to_string(),
        };
        match e {
            StoreError::Unconfirmed(cause) => Self::Unconfirmed(reason(cause)),
            other => Self::Unavailable(reason(other)),
        }
    }
}

/// A send in the committer's queue, with when it was queued (for `wschat_send_ack_seconds`).
struct Queued {
    request: SendRequest,
    at: Instant,
}

/// What the committer's queue carries: sends, and the stop (put in by `Committer::stop`),
/// which a loop waiting on a thread would not see otherwise.
enum Entry {
    Send(Queued),
    Stop,
}

/// The handle connections use to send.
#[derive(Clone)]
pub struct Committer {
    tx: mpsc::Sender<Entry>,
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
        let batches = Batches {
            rx,
            max_batch: max_batch.max(1),
            spacing,
            stop: stop.clone(),
        };
        let task = tokio::spawn(run(batches, store, hub));
        (Self { tx, stop }, task)
    }

    /// Refuse new sends (`shutting_down`); commit those already queued, then end. The
    /// loop learns of the stop from the `Stop` entry behind them (a loop waiting on a
    /// thread does not see the token); on a full queue a task puts it in when there is
    /// room, so this is called from within the runtime.
    pub fn stop(&self) {
        self.stop.cancel();
        if let Err(mpsc::error::TrySendError::Full(stop)) = self.tx.try_send(Entry::Stop) {
            let tx = self.tx.clone();
            tokio::spawn(async move {
                let _loop_already_ended = tx.send(stop).await;
            });
        }
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
        // After the stop, refused at once, not only once the loop reaches the `Stop`
        // entry behind what was queued before it.
        let wait = if self.stop.is_cancelled() {
            refuse(Entry::Send(queued));
            None
        } else {
            match self.tx.try_send(Entry::Send(queued)) {
                Ok(()) => None,
                Err(mpsc::error::TrySendError::Full(entry)) => Some(Box::pin(self.tx.send(entry))),
                Err(mpsc::error::TrySendError::Closed(entry)) => {
                    refuse(entry);
                    None
                }
            }
        };
        async move {
            if let Some(wait) = wait {
                if let Err(mpsc::error::SendError(entry)) = wait.await {
                    refuse(entry);
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
        // A refused send is answered `ShuttingDown`; no answer at all means the batch's
        // settling panicked, after its commit, or the committer is gone.
        rx.await.unwrap_or_else(|_| {
            Err(CommitError::Unconfirmed(
                "the committer gave no answer".to_owned(),
            ))
        })
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

/// A send that found the queue closed: the server is stopping.
fn refuse(entry: Entry) {
    if let Entry::Send(queued) = entry {
        answer_error(queued.request, CommitError::ShuttingDown);
    }
}

/// The committer's queue and how it turns into batches.
struct Batches {
    rx: mpsc::Receiver<Entry>,
    max_batch: usize,
    spacing: Spacing,
    stop: CancellationToken,
}

impl Batches {
    /// A vector for what is queued now (each batch moves to the settler, so each is a new
    /// one): sized by the queue, not by `max_batch` (10,000 entries for a batch that is
    /// mostly one message).
    fn buffer(&self) -> Vec<Entry> {
        Vec::with_capacity(self.rx.len().clamp(1, self.max_batch))
    }

    /// The sends among `entries`; at the stop, the queue closes (later submits are
    /// answered `shutting_down`) and what is in it is still committed.
    fn sends(&mut self, entries: Vec<Entry>) -> Vec<Queued> {
        let mut batch = Vec::with_capacity(entries.len());
        for entry in entries {
            match entry {
                Entry::Send(queued) => batch.push(queued),
                Entry::Stop => self.rx.close(),
            }
        }
        batch
    }

    /// While the node is busy, a commit starts at most every `spacing.delay`: what arrives
    /// in the first moments joins it, and each commit (each fsync) carries more. Until
    /// when the batch waits, if it does.
    fn hold_until(&self, last_start: Option<Instant>, batch: &[Queued]) -> Option<Instant> {
        let at = last_start? + self.spacing.delay;
        let hold = !self.spacing.delay.is_zero()
            && !self.spacing.pacing.delay().is_zero()
            && batch.len() < self.max_batch
            && at > Instant::now()
            && !self.stop.is_cancelled();
        hold.then_some(at)
    }

    /// What queued during the hold joins the batch.
    fn top_up(&mut self, batch: &mut Vec<Queued>) {
        while batch.len() < self.max_batch {
            match self.rx.try_recv() {
                Ok(Entry::Send(queued)) => batch.push(queued),
                Ok(Entry::Stop) => self.rx.close(),
                Err(_) => break,
            }
        }
    }

    /// The async loop (`commit_batch` from a task): PostgreSQL's.
    async fn run(mut self, store: &dyn Store, settled: mpsc::Sender<Settled>) {
        let mut last_start = None;
        loop {
            let mut entries = self.buffer();
            if self.rx.recv_many(&mut entries, self.max_batch).await == 0 {
                break;
            }
            let mut batch = self.sends(entries);
            if let Some(at) = self.hold_until(last_start, &batch) {
                tokio::time::sleep_until(at.into()).await;
                self.top_up(&mut batch);
            }
            if batch.is_empty() {
                continue;
            }
            let messages: Arc<[NewMessage]> = batch.iter().map(|q| q.request.msg.clone()).collect();
            let started = Instant::now();
            last_start = Some(started);
            let result = store.commit_batch(messages).await;
            // Waits while the settler is `SETTLING_BATCHES` behind: a fan-out slower than
            // the commits holds the next commit back (and the senders, through the queue)
            // instead of piling committed batches up.
            let _settler_ends_only_after_this_loop =
                settled.send(Settled::new(batch, result, started)).await;
        }
    }

    /// The same loop on the store's commit thread (SQLite): blocking waits, and each
    /// commit on the thread's own connection.
    fn run_blocking(mut self, commit: &mut dyn CommitOn, settled: mpsc::Sender<Settled>) {
        let mut last_start = None;
        loop {
            let mut entries = self.buffer();
            if self.rx.blocking_recv_many(&mut entries, self.max_batch) == 0 {
                break;
            }
            let mut batch = self.sends(entries);
            if let Some(at) = self.hold_until(last_start, &batch) {
                std::thread::sleep(at.saturating_duration_since(Instant::now()));
                self.top_up(&mut batch);
            }
            if batch.is_empty() {
                continue;
            }
            let messages: Vec<NewMessage> = batch.iter().map(|q| q.request.msg.clone()).collect();
            let started = Instant::now();
            last_start = Some(started);
            // A panic in a commit (a bug) fails its batch, answered `unavailable`, and the
            // loop goes on: it must not take the queue, and every sender in it, down.
            let result =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| commit.commit(&messages)))
                    .unwrap_or_else(|_| Err(StoreError::CommitPanicked));
            let _settler_ends_only_after_this_loop =
                settled.blocking_send(Settled::new(batch, result, started));
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| commit.upkeep())).is_err() {
                tracing::error!("the store's upkeep after a commit panicked");
            }
        }
    }
}

impl Settled {
    /// A batch whose commit started at `started` and just ended with `result`.
    fn new(
        batch: Vec<Queued>,
        result: Result<Vec<CommitOutcome>, StoreError>,
        started: Instant,
    ) -> Self {
        let committed_at = Instant::now();
        metrics::histogram!("wschat_commit_seconds").record((committed_at - started).as_secs_f64());
        metrics::histogram!("wschat_commit_batch_size").record(batch.len() as f64);
        tracing::trace!(batch = batch.len(), ok = result.is_ok(), "commit finished");
        Self {
            batch,
            result,
            committed_at,
        }
    }
}

/// The commit loop: the next batch's commit starts as soon as the previous one returns,
/// while a second task (`settle`) answers the senders and delivers, in commit order. The
/// database and this node's fan-out work at the same time. On a store with a commit
/// thread the loop runs there: on one core, a loop that is a task waits for the runtime
/// to finish the previous batch's fan-out before it can start the next commit.
async fn run(batches: Batches, store: Arc<dyn Store>, hub: Arc<Hub>) {
    let (settled_tx, settled_rx) = mpsc::channel(SETTLING_BATCHES);
    let settler = tokio::spawn(settle(settled_rx, hub));
    match store.commit_thread() {
        Some(thread) => {
            // The loop's parts stay here until the thread takes them: when it cannot, the
            // loop runs as a task after all, and what is queued is still answered.
            let parts = Arc::new(std::sync::Mutex::new(Some((batches, settled_tx))));
            let lent = parts.clone();
            let (ended_tx, ended) = oneshot::channel::<()>();
            let body: CommitLoop = Box::new(move |commit| {
                let taken = lent.lock().unwrap_or_else(PoisonError::into_inner).take();
                if let Some((batches, settled)) = taken {
                    batches.run_blocking(commit, settled);
                    let _run_may_be_gone = ended_tx.send(());
                }
            });
            match thread.run_loop(body) {
                Ok(()) => {
                    if ended.await.is_err() {
                        tracing::error!("the commit loop ended by a panic");
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "the commit thread is gone; committing from a task");
                    let taken = parts.lock().unwrap_or_else(PoisonError::into_inner).take();
                    if let Some((batches, settled)) = taken {
                        batches.run(store.as_ref(), settled).await;
                    }
                }
            }
        }
        None => batches.run(store.as_ref(), settled_tx).await,
    }
    if let Err(e) = settler.await {
        tracing::error!(error = %e, "the commit settler failed");
    }
}

/// Answers each batch's senders and hands its messages to the hub, in commit order.
///
/// A panic while settling a batch is a bug, and it costs that batch's answers and
/// fan-out, not those of the batches after it: its senders that got no answer send again
/// (acknowledged then as repeats), and the hub reads what it missed from the store at the
/// room's next message (a gap). Left uncaught, it would end this task: the committer
/// would go on committing, with no answers and no fan-out at all.
async fn settle(mut rx: mpsc::Receiver<Settled>, hub: Arc<Hub>) {
    while let Some(settled) = rx.recv().await {
        let size = settled.batch.len();
        let once = std::panic::AssertUnwindSafe(|| settle_batch(settled, &hub));
        if std::panic::catch_unwind(once).is_err() {
            tracing::error!(
                batch = size,
                "settling a committed batch panicked; its senders may have no answer"
            );
            metrics::counter!("wschat_settle_panics_total").increment(1);
        }
    }
}

fn settle_batch(
    Settled {
        mut batch,
        result,
        committed_at,
    }: Settled,
    hub: &Arc<Hub>,
) {
    match result {
        Ok(outcomes) => {
            #[cfg(test)]
            if outcomes
                .iter()
                .any(|o| o.message().text == tests::PANICS_WHEN_SETTLED)
            {
                panic!("a test's panic while settling");
            }
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
            let error = CommitError::from_store(&e);
            for queued in batch.drain(..) {
                answer_error(queued.request, error.clone());
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

fn answer_error(SendRequest { msg, reply }: SendRequest, error: CommitError) {
    match reply {
        Reply::Conn { conn, reference } => {
            let code = match error {
                CommitError::Unavailable(_) | CommitError::Unconfirmed(_) => ErrorCode::Unavailable,
                CommitError::ShuttingDown => ErrorCode::ShuttingDown,
            };
            let message = error.told(msg.client_msg_id.is_some());
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use wschat_protocol::RoomName;

    use super::*;
    use crate::hub::pacing::WritePacing;

    /// A committer on a fresh SQLite store (its loop on the store's commit thread), with
    /// `delay` between commits while busy and pacing always on (so the delay applies).
    async fn committer(
        delay: Duration,
    ) -> (tempfile::TempDir, Committer, tokio::task::JoinHandle<()>) {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("commit.db").display());
        let store = crate::store::open(&url).await.unwrap();
        store.migrate().await.unwrap();
        assert!(
            store.commit_thread().is_some(),
            "SQLite commits on a thread"
        );
        let (outgoing, _) = crate::broker::queues();
        let hub = Hub::new(store.clone(), outgoing, false);
        let spacing = Spacing {
            delay,
            pacing: WritePacing::new(Duration::from_millis(10), 0),
        };
        let (committer, task) = Committer::start(store, hub, 100, spacing);
        (dir, committer, task)
    }

    #[test]
    fn a_commit_whose_answer_was_lost_is_not_called_not_stored() {
        let lost = StoreError::Unconfirmed(Box::new(StoreError::NoAnswer(Duration::from_secs(15))));
        let told = CommitError::from_store(&lost);
        assert!(
            matches!(&told, CommitError::Unconfirmed(r) if r.contains("no answer")),
            "{told:?}"
        );
        let failed = CommitError::from_store(&StoreError::WriterGone);
        assert!(matches!(failed, CommitError::Unavailable(_)), "{failed:?}");
        let down = CommitError::from_store(&StoreError::Unavailable(sqlx::Error::PoolClosed));
        assert!(
            matches!(&down, CommitError::Unavailable(r) if r == "the store is unavailable"),
            "{down:?}"
        );
    }

    /// A message whose settling panics (`settle_batch`).
    pub(super) const PANICS_WHEN_SETTLED: &str = "this text panics its batch's settling";

    #[tokio::test]
    async fn a_panic_while_settling_a_batch_costs_that_batch_not_the_ones_after() {
        let (_dir, committer, _task) = committer(Duration::ZERO).await;
        let lost = committer
            .send_and_wait(message(PANICS_WHEN_SETTLED, None))
            .await;
        // Its answer went with the panic; the message was committed before it.
        assert!(matches!(lost, Err(CommitError::Unconfirmed(_))), "{lost:?}");
        for (text, expected) in [("after", 2), ("and after", 3)] {
            let outcome = committer.send_and_wait(message(text, None)).await;
            assert_eq!(seq(&outcome), expected, "{text}");
        }
    }

    fn message(text: &str, id: Option<&str>) -> NewMessage {
        NewMessage {
            room: RoomName::new("r").unwrap(),
            user: "u".into(),
            text: text.into(),
            client_msg_id: id.map(str::to_owned),
        }
    }

    fn seq(outcome: &Result<CommitOutcome, CommitError>) -> u64 {
        match outcome {
            Ok(outcome) => outcome.message().seq,
            Err(e) => panic!("not committed: {e}"),
        }
    }

    #[tokio::test]
    async fn sends_are_committed_in_order_on_the_commit_thread() {
        for delay in [Duration::ZERO, Duration::from_millis(20)] {
            let (_dir, committer, _task) = committer(delay).await;
            // Many at once: they share commits (and, with the delay, wait for one another).
            let sends = (1..=50).map(|i| committer.send_and_wait(message(&format!("m{i}"), None)));
            let outcomes = futures_util::future::join_all(sends).await;
            let mut seqs: Vec<u64> = outcomes.iter().map(seq).collect();
            seqs.sort_unstable();
            assert_eq!(seqs, (1..=50).collect::<Vec<_>>(), "delay {delay:?}");
            // A retry returns the first commit's seq.
            let first = committer.send_and_wait(message("x", Some("c1"))).await;
            let again = committer.send_and_wait(message("x", Some("c1"))).await;
            assert_eq!(seq(&first), 51);
            assert!(
                matches!(again, Ok(CommitOutcome::Duplicate(ref m)) if m.seq == 51),
                "{again:?}"
            );
        }
    }

    #[tokio::test]
    async fn a_stop_commits_what_was_queued_then_refuses_and_ends() {
        let (_dir, committer, task) = committer(Duration::ZERO).await;
        let queued: Vec<_> = (1..=20)
            .map(|i| {
                let (tx, rx) = oneshot::channel();
                let request = SendRequest {
                    msg: message(&format!("m{i}"), None),
                    reply: Reply::Oneshot(tx),
                };
                (committer.submit(request), rx)
            })
            .collect();
        let mut answers = Vec::new();
        for (submitted, answer) in queued {
            submitted.await;
            answers.push(answer);
        }
        committer.stop();
        // Refused at once, though what was queued before the stop is still in the queue.
        let late = committer.send_and_wait(message("late", None)).await;
        assert!(matches!(late, Err(CommitError::ShuttingDown)), "{late:?}");
        for answer in answers {
            let outcome = answer.await.expect("answered");
            assert!(seq(&outcome) >= 1);
        }
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("the commit task ends after a stop")
            .expect("and does not panic");
        let after = committer.send_and_wait(message("later", None)).await;
        assert!(matches!(after, Err(CommitError::ShuttingDown)), "{after:?}");
    }

    #[test]
    fn a_panic_in_a_commit_fails_its_batch_not_the_loop() {
        let (tx, rx) = mpsc::channel(16);
        let batches = Batches {
            rx,
            max_batch: 1,
            spacing: Spacing {
                delay: Duration::ZERO,
                pacing: WritePacing::new(Duration::ZERO, 0),
            },
            stop: CancellationToken::new(),
        };
        for text in ["first", "second"] {
            let (reply, _) = oneshot::channel();
            let request = SendRequest {
                msg: message(text, None),
                reply: Reply::Oneshot(reply),
            };
            let entry = Entry::Send(Queued {
                request,
                at: Instant::now(),
            });
            assert!(tx.blocking_send(entry).is_ok());
        }
        drop(tx);
        let (settled_tx, mut settled) = mpsc::channel(4);
        /// Panics in its first commit; counts its upkeeps and the batches settled (queued
        /// for the settler, which nobody reads here) by each.
        struct PanicsFirst {
            commits: u32,
            settled_by_upkeep: Vec<usize>,
            settled: mpsc::Sender<Settled>,
        }
        impl CommitOn for PanicsFirst {
            fn commit(&mut self, batch: &[NewMessage]) -> Result<Vec<CommitOutcome>, StoreError> {
                self.commits += 1;
                assert!(self.commits > 1, "the first commit panics on purpose");
                Ok(batch.iter().map(|m| m.stored(1, 1, 0)).collect())
            }

            fn upkeep(&mut self) {
                let queued = self.settled.max_capacity() - self.settled.capacity();
                self.settled_by_upkeep.push(queued);
            }
        }
        let mut on = PanicsFirst {
            commits: 0,
            settled_by_upkeep: Vec::new(),
            settled: settled_tx.clone(),
        };
        batches.run_blocking(&mut on, settled_tx);
        // Each batch's upkeep came after its outcomes were handed on, the failed one's too.
        assert_eq!(on.settled_by_upkeep, [1, 2]);
        drop(on);
        let first = settled.blocking_recv().expect("the first batch is settled");
        assert!(
            matches!(first.result, Err(StoreError::CommitPanicked)),
            "{:?}",
            first.result.map(|o| o.len())
        );
        let second = settled.blocking_recv().expect("the loop went on");
        assert_eq!(second.result.map(|o| o.len()).ok(), Some(1));
        assert!(
            settled.blocking_recv().is_none(),
            "the loop ended with the queue"
        );
    }

    #[tokio::test]
    async fn dropping_every_handle_ends_the_loop() {
        let (_dir, committer, task) = committer(Duration::ZERO).await;
        assert_eq!(seq(&committer.send_and_wait(message("m", None)).await), 1);
        drop(committer);
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("the commit task ends without a stop once no one can send")
            .expect("and does not panic");
    }
}
