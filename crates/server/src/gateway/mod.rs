//! WebSocket connections, both protocols: the handshake settings, the per-connection
//! writer task, the inbound driver (reads, pings, idle timeout, shutdown), room joins with
//! backfill, and the connection's end.
//!
//! Each connection is a reader task that handles inbound frames (`legacy` or `v1`) and an
//! outbox (`hub::outbox`) that owns the socket's write half: frames are written by
//! whoever pushes them when the socket takes them at once, else by the connection's
//! writer task. A room join subscribes to the hub first, then reads the store, and the
//! outbox merges the two by seq (live messages of a room are held until its backfill is
//! queued), so a join or resume has no gap and no duplicate.

pub mod legacy;
mod upgrade;
pub mod v1;

use std::future::Future;
use std::ops::ControlFlow;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use futures_util::stream::FusedStream;
use futures_util::{FutureExt, StreamExt};
use tokio::io::AsyncReadExt;
use tokio::time::{interval_at, Interval, MissedTickBehavior};
use tokio_tungstenite::WebSocketStream;
use tungstenite::protocol::{Role, WebSocketConfig};
use tungstenite::{Message, Utf8Bytes};
use wschat_protocol::v1::ServerFrame;
use wschat_protocol::{close, ErrorCode, RoomName};

use crate::app::Shared;
use crate::config::Settings;
use crate::hub::outbox::WriteIo;
use crate::hub::{frames, Conn, Item, Outbox, Protocol, SubId, Synced};
use crate::limits::rate::{RateGate, Verdict};
use crate::limits::{Refusal, Slot};
use crate::store::{hash_key, Session, StoreError};
pub(crate) use upgrade::Upgrade;
use upgrade::{Handover, ReadIo, ReadSide};

/// A connection's inbound frames.
pub(crate) type Reader = WebSocketStream<ReadSide>;

/// Bad frames in a row after which a connection is closed (4009).
pub(crate) const MAX_ERRORS_IN_A_ROW: u32 = 10;

/// Why a key did not authenticate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum AuthError {
    Draining,
    Missing,
    Unknown,
    Unavailable,
    /// The store did not answer the lookup by the deadline (`auth_timeout_secs`).
    TimedOut,
    /// A limit (failed keys from the address, connections of the session): 429.
    Limited(Refusal),
}

impl IntoResponse for AuthError {
    fn into_response(self) -> Response {
        match self {
            Self::Draining => (StatusCode::SERVICE_UNAVAILABLE, "server is shutting down\n"),
            Self::Missing => (StatusCode::UNAUTHORIZED, "missing session_key\n"),
            Self::Unknown => (StatusCode::UNAUTHORIZED, "unknown session key\n"),
            Self::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "store unavailable\n"),
            Self::TimedOut => (
                StatusCode::SERVICE_UNAVAILABLE,
                "sessions could not be checked in time\n",
            ),
            Self::Limited(refusal) => return refusal.into_response(),
        }
        .into_response()
    }
}

/// An authenticated session, and its place in the session's connection count.
pub(crate) struct Authenticated {
    pub session: Session,
    pub slot: Slot,
}

/// Look up the session a key names, from `client`: refused while the address is blocked
/// for unknown keys (an unknown key counts towards that), or when the session has as many
/// connections as it may. A store that has not answered within `auth_timeout_secs` (a
/// database that stopped answering without closing its connections) is `TimedOut`:
/// nothing else bounds the lookup, and the connection would wait for it for good. (The
/// bound is the lookup's own: an `auth` frame that came just in time still gets it all.)
pub(crate) async fn authenticate(
    shared: &Shared,
    client: std::net::IpAddr,
    key: Option<&str>,
) -> Result<Authenticated, AuthError> {
    if shared.is_draining() {
        return Err(AuthError::Draining);
    }
    let Some(key) = key.filter(|k| !k.is_empty()) else {
        return Err(AuthError::Missing);
    };
    shared
        .limits
        .not_blocked(client)
        .map_err(AuthError::Limited)?;
    let hash = hash_key(key);
    let bound = shared.settings.auth_timeout();
    let Ok(found) = tokio::time::timeout(bound, shared.store.session(&hash)).await else {
        tracing::warn!(?bound, "session lookup not answered in time");
        return Err(AuthError::TimedOut);
    };
    match found {
        Ok(Some(session)) => {
            // Blocked while the lookup ran (by guesses sent beside this one): refused,
            // a valid key too, or one of them would get in past the block.
            shared
                .limits
                .not_blocked(client)
                .map_err(AuthError::Limited)?;
            let slot = shared
                .limits
                .session_slot(&hash)
                .map_err(AuthError::Limited)?;
            Ok(Authenticated { session, slot })
        }
        Ok(None) => {
            metrics::counter!("wschat_auth_failures_total").increment(1);
            shared.limits.note_failed_key(client);
            Err(AuthError::Unknown)
        }
        Err(e) => {
            tracing::warn!(error = %e, "session lookup failed");
            Err(AuthError::Unavailable)
        }
    }
}

/// The text of a `rate_limited` answer.
pub(crate) fn rate_limited_text(settings: &Settings) -> String {
    format!(
        "over {} frames per second (bursts of {}): this frame was not handled; wait, then send it again",
        settings.rate_per_sec, settings.rate_burst
    )
}

/// The close for a connection that kept going over the rate.
pub(crate) const RATE_CLOSE: End = End::Close(close::POLICY_VIOLATION, close::RATE_LIMIT_REASON);

/// The close for a connection past `MAX_ERRORS_IN_A_ROW` frames answered with an error.
pub(crate) const ERRORS_CLOSE: End = End::Close(close::TOO_MANY_ERRORS, "too many bad frames");

/// The checks every message text passes before it is committed.
pub(crate) fn check_text(settings: &Settings, text: &str) -> Result<(), (ErrorCode, String)> {
    if text.trim().is_empty() {
        return Err((ErrorCode::EmptyMessage, "message is empty".into()));
    }
    if text.len() > settings.max_message_bytes {
        return Err((
            ErrorCode::MessageTooLarge,
            format!(
                "message is {} bytes; the limit is {}",
                text.len(),
                settings.max_message_bytes
            ),
        ));
    }
    if text.contains('\0') {
        return Err((ErrorCode::InvalidText, "message contains NUL".into()));
    }
    Ok(())
}

/// A send's idempotency key: 1 to `MAX_CLIENT_MSG_ID_BYTES` bytes, no control characters
/// (PostgreSQL refuses a NUL in a text value, and would fail the whole batch it is in).
pub(crate) fn check_client_msg_id(id: &str) -> Result<(), (ErrorCode, String)> {
    use v1::MAX_CLIENT_MSG_ID_BYTES;
    if id.is_empty() || id.len() > MAX_CLIENT_MSG_ID_BYTES {
        return Err((
            ErrorCode::InvalidClientMsgId,
            format!("client_msg_id must be 1 to {MAX_CLIENT_MSG_ID_BYTES} bytes"),
        ));
    }
    if id.chars().any(char::is_control) {
        return Err((
            ErrorCode::InvalidClientMsgId,
            "client_msg_id contains control characters".into(),
        ));
    }
    Ok(())
}

/// tungstenite's limits for a connection's reader.
fn ws_config(settings: &Settings) -> WebSocketConfig {
    // A frame carries the text JSON-escaped plus the envelope: allow for both, and let the
    // text limit itself be enforced (with a specific error) after decoding.
    let max_frame = settings
        .max_message_bytes
        .saturating_mul(2)
        .saturating_add(4096);
    WebSocketConfig::default()
        .read_buffer_size(settings.ws_read_buffer_bytes)
        // tungstenite writes only pongs, into the outbox (a close it answers is answered
        // by the outbox).
        .write_buffer_size(0)
        .max_message_size(Some(max_frame))
        .max_frame_size(Some(max_frame))
}

/// An upgraded connection: its reader, and its outbox with the writer task.
pub(crate) struct Socket {
    pub reader: Reader,
    pub outbox: Arc<Outbox>,
    pub writer: tokio::task::JoinHandle<()>,
}

/// Open an upgraded socket: tungstenite reads it, the outbox writes to it (to the TCP
/// socket itself on a plain connection, to the other half of the TLS stream otherwise).
pub(crate) async fn open(shared: &Shared, socket: Handover) -> Socket {
    let Handover { io, raw } = socket;
    let (read, write): (ReadIo, WriteIo) = match &raw {
        Some(tcp) => (
            ReadIo::Whole(io),
            Box::pin(crate::serve::SharedTcp(Arc::clone(tcp))),
        ),
        None => {
            let (read, write) = tokio::io::split(io);
            (ReadIo::Half(read), Box::pin(write))
        }
    };
    let outbox = Outbox::new(
        write,
        raw,
        shared.settings.outbound_queue_bytes,
        shared.settings.ws_write_buffer_bytes,
        shared.pacing.clone(),
        tokio_util::sync::CancellationToken::new(),
    );
    let writer = tokio::spawn(outbox.clone().write_loop());
    let reader = WebSocketStream::from_raw_socket(
        ReadSide::new(read, outbox.clone()),
        Role::Server,
        Some(ws_config(&shared.settings)),
    )
    .await;
    Socket {
        reader,
        outbox,
        writer,
    }
}

/// Open-connection bookkeeping: the gauge, and one log line when it ends.
pub(crate) struct ConnGuard {
    protocol: Protocol,
    id: u64,
    opened: Instant,
    pub reason: &'static str,
}

impl ConnGuard {
    pub fn open(protocol: Protocol, id: u64, client: std::net::IpAddr) -> Self {
        metrics::gauge!("wschat_connections", "protocol" => protocol.label()).increment(1.0);
        metrics::counter!("wschat_connections_opened_total", "protocol" => protocol.label())
            .increment(1);
        tracing::info!(conn = id, protocol = protocol.label(), %client, "connection opened");
        Self {
            protocol,
            id,
            opened: Instant::now(),
            reason: "unknown",
        }
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        metrics::gauge!("wschat_connections", "protocol" => self.protocol.label()).decrement(1.0);
        metrics::counter!("wschat_connections_closed_total", "protocol" => self.protocol.label(), "reason" => self.reason)
            .increment(1);
        tracing::info!(
            conn = self.id,
            protocol = self.protocol.label(),
            reason = self.reason,
            duration_ms = self.opened.elapsed().as_millis() as u64,
            "connection closed"
        );
    }
}

/// Why a connection's reader stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum End {
    /// The client sent a close frame: answered with this code (its own, echoed as RFC 6455
    /// asks; 1000 when it gave none).
    ClientClose(u16),
    /// The client went away without a close frame (or the socket failed).
    ClientGone,
    /// The server is stopping: close with 1012 once in-flight sends are answered.
    Shutdown,
    /// The outbox overflowed (a 4008 close is queued) or the connection was killed.
    Cancelled,
    /// Close with this code.
    Close(u16, &'static str),
}

impl End {
    /// Queue on the outbox what this end sends, after what is queued before it: its close
    /// frame, or the end of the stream; nothing once the connection is cancelled. `finish`
    /// (after authentication) and v1's wait for `auth` both end this way.
    pub(crate) fn queue_on(self, outbox: &Outbox) {
        match self {
            Self::Shutdown => outbox.close(
                close::SERVICE_RESTART,
                "server restart: reconnect and resume",
            ),
            // tungstenite only queues its answer, and writes it on a next read that never
            // comes: the outbox sends it.
            Self::ClientClose(code) => outbox.close(code, ""),
            // The socket is gone: nothing to answer.
            Self::ClientGone => outbox.finish(),
            Self::Close(code, reason) => outbox.close(code, reason),
            Self::Cancelled => {}
        }
    }

    pub fn reason(self) -> &'static str {
        match self {
            Self::ClientClose(_) | Self::ClientGone => "client closed",
            Self::Shutdown => "server shutdown",
            Self::Cancelled => "slow consumer or killed",
            Self::Close(_, reason) => reason,
        }
    }
}

/// What the inbound driver hands to a protocol's reader.
pub(crate) enum Inbound {
    Text(Utf8Bytes),
    /// A ping or a pong. tungstenite has queued a ping's pong already; the frame still
    /// counts against the connection's rate ([`control_frame`]).
    Control,
    End(End),
}

/// A ping or pong against the connection's rate. Nothing is answered over the rate (a
/// ping has had its pong), but a client that keeps going is closed as for text frames:
/// otherwise a ping flood would be read and answered without limit.
pub(crate) fn control_frame(gate: &RateGate) -> Option<End> {
    (gate.check() == Verdict::Close).then_some(RATE_CLOSE)
}

/// Reads frames, answers the keepalive, enforces the idle timeout, and watches for
/// shutdown and cancellation.
pub(crate) struct Driver {
    stream: Reader,
    conn: Arc<Conn>,
    shared: Arc<Shared>,
    ping: Interval,
    last_seen: Instant,
    /// Ready when the server stops or the connection is cancelled: made once, so that a
    /// frame costs no new waiter on either token.
    stop: Pin<Box<dyn Future<Output = End> + Send>>,
}

impl Driver {
    pub fn new(stream: Reader, conn: Arc<Conn>, shared: Arc<Shared>) -> Self {
        let period = shared.settings.ping_interval();
        let mut ping = interval_at(tokio::time::Instant::now() + period, period);
        ping.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let shutdown = shared.shutdown.clone().cancelled_owned();
        let cancelled = conn.outbox.cancel.clone().cancelled_owned();
        // Fused: polled again after it ended, it stays pending instead of panicking.
        let stop = Box::pin(
            async move {
                tokio::select! {
                    biased;
                    _ = shutdown => End::Shutdown,
                    _ = cancelled => End::Cancelled,
                }
            }
            .fuse(),
        );
        Self {
            stream,
            conn,
            shared,
            ping,
            last_seen: Instant::now(),
            stop,
        }
    }

    /// The next frame, or the connection's end. Called once the last frame's handling (or
    /// the legacy join's backfill) is over: that can take long (a backfill paced by the
    /// client's own reading), and meanwhile nothing reads the socket or sends pings, so
    /// the idle clock starts here, not at the last frame's arrival.
    pub async fn next(&mut self) -> Inbound {
        self.last_seen = Instant::now();
        loop {
            // The stream first: a frame waiting is handled without looking at the rest.
            // Shutdown and cancellation are seen as soon as the stream has nothing.
            tokio::select! {
                biased;
                frame = self.stream.next() => {
                    self.last_seen = Instant::now();
                    match frame {
                        None => return Inbound::End(End::ClientGone),
                        Some(Ok(Message::Text(text))) => {
                            // Sizes only: frames carry keys and message bodies.
                            tracing::trace!(conn = self.conn.id, bytes = text.len(), "frame received");
                            return Inbound::Text(text);
                        }
                        Some(Ok(Message::Binary(_))) => {
                            return Inbound::End(End::Close(
                                close::UNSUPPORTED_DATA,
                                "binary frames are not supported",
                            ))
                        }
                        Some(Ok(Message::Close(frame))) => {
                            return Inbound::End(End::ClientClose(close_reply_code(frame.as_ref())))
                        }
                        Some(Ok(Message::Ping(_) | Message::Pong(_))) => return Inbound::Control,
                        Some(Ok(Message::Frame(_))) => continue,
                        Some(Err(e)) => return Inbound::End(classify_error(e)),
                    }
                }
                end = &mut self.stop => return Inbound::End(end),
                _ = self.ping.tick() => {
                    if self.last_seen.elapsed() > self.shared.settings.idle_timeout() {
                        return Inbound::End(End::Close(close::GOING_AWAY, "idle timeout"));
                    }
                    self.conn.outbox.push(Item::Ping);
                }
            }
        }
    }
}

impl Driver {
    /// After a close the server chose (a limit, a bad frame, the stop's 1012) went out:
    /// read (and drop) what the client still sends, until its close reply, the end of the
    /// stream, or 2 s (on a stop, no later than a second before its deadline). Dropping a
    /// socket with unread input makes the kernel reset the connection, and a reset
    /// destroys what the socket has not sent yet, the close frame too (a flooder would see
    /// 1006 instead of 1008, a client behind on reading 1006 instead of 1012). After a
    /// close for a frame tungstenite refused, its bytes are read and dropped raw, until
    /// the end of the stream or the same time. A client that neither reads nor answers
    /// within that time may still get the reset.
    pub async fn linger(mut self) {
        linger(&mut self.stream, &self.shared).await;
    }
}

/// Read and drop what the client still sends after a close the server chose, until its
/// close reply, the end of the stream, or 2 s (on a stop, no later than a second before its
/// deadline): see `Driver::linger`.
pub(crate) async fn linger(stream: &mut Reader, shared: &Shared) {
    const LINGER: Duration = Duration::from_secs(2);
    // During a stop (its 1012, or any close it overtook), within the stop's deadline.
    let until = if shared.shutdown.is_cancelled() {
        shared.stop_budget(LINGER)
    } else {
        tokio::time::Instant::now() + LINGER
    };
    let _bounded = tokio::time::timeout_at(until, async {
        while !stream.is_terminated() {
            match stream.next().await {
                Some(Ok(Message::Close(_))) | None => return,
                Some(Ok(_)) => {}
                Some(Err(_)) => break,
            }
        }
        // tungstenite reads nothing more after its first error (the close was for a
        // frame over the limit, invalid UTF-8 or a protocol violation), and the rest of
        // that frame, or what followed it, is still unread: read and drop the bytes.
        let mut dropped = [0u8; 4096];
        while matches!(stream.get_mut().read(&mut dropped).await, Ok(n) if n > 0) {}
    })
    .await;
}

/// The code to answer a client's close with: its own (tungstenite has already replaced a
/// code no endpoint may send with 1002), or 1000 when it gave none.
pub(crate) fn close_reply_code(frame: Option<&tungstenite::protocol::CloseFrame>) -> u16 {
    frame.map_or(close::NORMAL, |f| u16::from(f.code))
}

fn classify_error(e: tungstenite::Error) -> End {
    use tungstenite::error::{CapacityError, Error as WsError, ProtocolError};
    match e {
        WsError::Capacity(CapacityError::MessageTooLong { .. }) => {
            End::Close(close::MESSAGE_TOO_BIG, "frame over the size limit")
        }
        WsError::Capacity(_) => End::Close(close::MESSAGE_TOO_BIG, "frame over the size limit"),
        WsError::Utf8(_) => End::Close(close::INVALID_PAYLOAD, "invalid UTF-8"),
        WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake)
        | WsError::ConnectionClosed
        | WsError::AlreadyClosed
        | WsError::Io(_) => End::ClientGone,
        WsError::Protocol(_) => End::Close(close::PROTOCOL_ERROR, "protocol violation"),
        _ => End::ClientGone,
    }
}

/// How much of a room to send on join, through which seq (the room's head when the join
/// read it; messages newer than that come live).
#[derive(Debug, Clone, Copy)]
pub(crate) enum Backfill {
    /// Everything after `since`, through `head` (a resume).
    After { since: u64, head: u64 },
    /// The last `n` messages through `head`; without a head, the last `n` stored, and the
    /// newest of them is the head (a legacy connect: one read instead of two).
    Last { n: u32, head: Option<u64> },
}

/// Queue a room's backfill for `sub` (already subscribed and tracked), paced by the
/// writer, then `Outbox::sync_done`. Messages newer than the backfill's head come live.
/// When more of them came meanwhile than the queue's limit holds (a slow store, a busy
/// room), the outbox dropped them (`Synced::Lagged`): the backfill reads on from its head
/// to the room's new head, up to `MAX_LAG_ROUNDS` times, then the client is a slow
/// consumer (4008).
///
/// A stop ends a backfill at its next page or its next wait for the client (`Break`):
/// what is queued goes out, gap-free from the start, without `sync_done`, and the reader
/// goes on to the stop's 1012; the client resumes from its last seq on the next node. So
/// does the connection's end (4008, killed), before its next message: its reader ends.
/// Without this, a long resume or a client reading slowly would hold the stop until its
/// deadline and get no close frame at all.
pub(crate) async fn backfill(
    shared: &Shared,
    conn: &Conn,
    room: &RoomName,
    sub: SubId,
    from: Backfill,
) -> Result<ControlFlow<()>, StoreError> {
    const PAGE: u32 = 500;
    let limit = shared.settings.outbound_queue_bytes;
    // A client that reads nothing for as long as a silent one may stay is a slow consumer.
    let stall = shared.settings.idle_timeout();
    // Paced by the writer: a backfill larger than the queue waits for the client to read
    // rather than overflowing it. `Break` once the server is stopping.
    let send = async |m: &crate::store::StoredMessage| {
        // A connection already closed (4008, killed) reads and encodes no more.
        if conn.outbox.cancel.is_cancelled() {
            return ControlFlow::Break(());
        }
        let frame = match conn.protocol {
            Protocol::Legacy => frames::legacy_message(m),
            Protocol::V1 => frames::v1_message(m),
        };
        conn.outbox.push(Item::Backfill {
            sub,
            seq: m.seq,
            frame,
        });
        if conn.outbox.queued_bytes() > limit / 2 {
            tokio::select! {
                biased;
                _ = shared.shutdown.cancelled() => return ControlFlow::Break(()),
                _ = conn.outbox.wait_below(limit / 4, stall) => {}
            }
        }
        ControlFlow::Continue(())
    };
    // Each message in turn, until a stop: then the backfill ends without `sync_done`.
    macro_rules! send_each {
        ($messages:expr) => {
            for m in $messages {
                if send(m).await.is_break() {
                    return Ok(ControlFlow::Break(()));
                }
            }
        };
    }
    // What has been sent, through which seq; and the head to read on to, if any.
    let (mut through, mut read_to) = match from {
        Backfill::Last { n, head } => {
            let messages = shared
                .store
                .messages_before(room, head.map(|h| h + 1), n)
                .await?;
            send_each!(&messages);
            // Subscribed before the read: what was committed after it comes live.
            (
                head.unwrap_or_else(|| messages.last().map_or(0, |m| m.seq)),
                None,
            )
        }
        Backfill::After { since, head } => (since, Some(head)),
    };
    loop {
        // Everything after `through` up to `head`, page by page.
        if let Some(head) = read_to.take() {
            let mut cursor = through;
            while cursor < head {
                // A client that reads fast never waits: the stop is looked at each page.
                if shared.shutdown.is_cancelled() || conn.outbox.cancel.is_cancelled() {
                    return Ok(ControlFlow::Break(()));
                }
                let page = shared.store.messages_after(room, cursor, PAGE).await?;
                if let Some(first_seq) = page.first().map(|m| m.seq).filter(|&s| s > cursor + 1) {
                    // Retention deleted what follows `cursor` while this backfill waited
                    // for the client to read: never a silent gap. As for a join whose
                    // `since` is that old: a `reset`, then the room's last messages (those
                    // not sent already).
                    if conn.protocol == Protocol::V1 {
                        conn.outbox
                            .push(Item::Frame(frames::v1(&ServerFrame::Reset {
                                room: room.to_string(),
                                // The last seq sent: what the client holds up to.
                                since: cursor,
                                first_seq,
                            })));
                    }
                    let last = shared
                        .store
                        .messages_before(room, Some(head + 1), shared.settings.history_limit)
                        .await?;
                    send_each!(last.iter().filter(|m| m.seq > cursor));
                    break;
                }
                send_each!(page
                    .iter()
                    .take_while(|m| m.seq <= head)
                    .inspect(|m| cursor = m.seq));
                // A short page is the end; so is a page that reaches past `head`.
                if page.len() < PAGE as usize || page.last().is_some_and(|m| m.seq > head) {
                    break;
                }
            }
            through = head;
        }
        match conn.outbox.sync_done(sub, through) {
            Synced::Done | Synced::Closed => return Ok(ControlFlow::Continue(())),
            // What the outbox dropped was committed before it was dropped: the head read
            // now covers it.
            Synced::Lagged => {
                read_to = Some(shared.store.room_head(room).await?.last_seq.max(through));
            }
        }
    }
}

/// End a connection: answer in-flight sends (on shutdown), queue the close, leave every
/// room, and wait (bounded) for the writer to finish.
pub(crate) async fn finish(
    shared: &Shared,
    conn: &Arc<Conn>,
    end: End,
    rooms: impl IntoIterator<Item = (RoomName, SubId)>,
    writer: tokio::task::JoinHandle<()>,
) {
    for (room, sub) in rooms {
        shared.hub.unsubscribe(&room, conn, sub);
    }
    let grace = shared.settings.shutdown_grace();
    if end == End::Shutdown {
        // The 1012 goes after the answers to what was in flight.
        let _bounded = tokio::time::timeout(grace, conn.all_sends_settled()).await;
    }
    end.queue_on(&conn.outbox);
    if tokio::time::timeout(grace.max(Duration::from_secs(1)), writer)
        .await
        .is_err()
    {
        conn.outbox.cancel.cancel();
    }
}

/// Make a connection's shared half around its outbox, and register it under its session.
pub(crate) fn start(
    shared: &Shared,
    outbox: Arc<Outbox>,
    session: &Session,
    protocol: Protocol,
) -> Arc<Conn> {
    let conn = Arc::new(Conn::new(
        shared.next_conn_id(),
        session.user.as_str().into(),
        protocol,
        outbox,
    ));
    // A revoked or expired session closes this connection (1008).
    shared.sessions.register(&session.key, &conn);
    conn
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio_util::sync::CancellationToken;
    use wschat_protocol::RoomName;

    use super::{backfill, Backfill};
    use crate::hub::{pacing::WritePacing, Conn, Item, Outbox, Protocol, Pushed};
    use crate::store::commit_unheard;

    /// A server on a fresh SQLite store (not serving), and the folder that holds it.
    async fn sqlite_app() -> (tempfile::TempDir, crate::Application) {
        let dir = tempfile::tempdir().expect("a temporary folder");
        let settings = crate::Settings {
            listen: "127.0.0.1:0".parse().expect("an address"),
            database: format!("sqlite://{}", dir.path().join("chat.db").display()),
            demo_session: false,
            ..crate::Settings::default()
        };
        let app = crate::Application::build(settings)
            .await
            .expect("the server builds");
        (dir, app)
    }

    /// A join's backfill whose connection ended meanwhile (4008, killed) stops before its
    /// next message, instead of reading and encoding the rest of the room for nobody.
    #[tokio::test]
    async fn a_backfill_stops_once_its_connection_has_ended() {
        let (_dir, app) = sqlite_app().await;
        let shared = app.shared();
        let room = RoomName::new("r").expect("a room name");
        commit_unheard(shared.store.as_ref(), &room, 1200).await;
        // The client end is read all the while, so the queue never waits.
        let (server, mut client) = tokio::io::duplex(1 << 16);
        tokio::spawn(async move {
            use tokio::io::AsyncReadExt;
            let mut buf = vec![0u8; 1 << 16];
            while matches!(client.read(&mut buf).await, Ok(n) if n > 0) {}
        });
        let outbox = Outbox::new(
            Box::pin(server),
            None,
            1 << 22,
            1 << 16,
            WritePacing::new(Duration::ZERO, 0),
            CancellationToken::new(),
        );
        tokio::spawn(outbox.clone().write_loop());
        outbox.push(Item::Track { sub: 0 });
        let conn = Conn::new(1, "u".into(), Protocol::V1, outbox);
        let whole = Backfill::After {
            since: 0,
            head: 1200,
        };
        let open = backfill(&shared, &conn, &room, 0, whole)
            .await
            .expect("the store answers");
        assert!(
            open.is_continue(),
            "an open connection's backfill runs to its end"
        );
        conn.outbox.cancel.cancel();
        let ended = backfill(&shared, &conn, &room, 0, whole)
            .await
            .expect("the store answers");
        assert!(ended.is_break(), "an ended connection's backfill stops");
    }

    /// Live messages that outran a join's backfill (more than the queue's limit came
    /// while it ran) were dropped by the outbox: the backfill reads on to the room's new
    /// head, and the client gets every message once, in order, and stays connected.
    #[tokio::test]
    async fn a_backfill_outrun_by_live_messages_reads_them_from_the_store() {
        let (_dir, app) = sqlite_app().await;
        let shared = app.shared();
        let room = RoomName::new("r").expect("a room name");
        commit_unheard(shared.store.as_ref(), &room, 30).await;
        let (server, mut client) = tokio::io::duplex(1 << 16);
        let got = tokio::spawn(async move {
            use tokio::io::AsyncReadExt;
            let mut got = Vec::new();
            let _ =
                tokio::time::timeout(Duration::from_secs(3), client.read_to_end(&mut got)).await;
            String::from_utf8_lossy(&got).into_owned()
        });
        let outbox = Outbox::new(
            Box::pin(server),
            None,
            2048,
            1 << 16,
            WritePacing::new(Duration::ZERO, 0),
            CancellationToken::new(),
        );
        tokio::spawn(outbox.clone().write_loop());
        outbox.push(Item::Track { sub: 0 });
        // Seqs 11 to 30 come live while the join's backfill of 1 to 10 runs: more than
        // the outbox's 2,048 bytes hold.
        let live = shared
            .store
            .messages_after(&room, 10, 20)
            .await
            .expect("the store answers");
        let pushed: Vec<Pushed> = live
            .iter()
            .map(|m| outbox.push_live(0, m.seq, &[crate::hub::frames::v1_message(m)]))
            .collect();
        // The first ones held, then the outbox gave up holding: the lagged path.
        assert_eq!(pushed.first(), Some(&Pushed::Queued), "{pushed:?}");
        assert_eq!(pushed.last(), Some(&Pushed::Dropped), "{pushed:?}");
        let conn = Conn::new(1, "u".into(), Protocol::V1, outbox);
        let joined = backfill(
            &shared,
            &conn,
            &room,
            0,
            Backfill::After { since: 0, head: 10 },
        )
        .await
        .expect("the store answers");
        assert!(joined.is_continue());
        assert!(!conn.outbox.cancel.is_cancelled(), "still connected");
        conn.outbox.finish();
        let got = got.await.expect("the reader");
        let mut at = 0;
        for seq in 1..=30 {
            let text = format!("text-{seq:02}");
            assert_eq!(got.matches(&text).count(), 1, "{text} once in {got}");
            let here = got.find(&text).expect("found");
            assert!(here >= at, "{text} in order in {got}");
            at = here;
        }
        assert!(!got.contains("slow consumer"), "{got}");
    }

    fn size4<A, B, C, D, Fut, F: FnOnce(A, B, C, D) -> Fut>(_: F) -> usize {
        std::mem::size_of::<Fut>()
    }

    fn size6<A, B, C, D, E, G, Fut, F: FnOnce(A, B, C, D, E, G) -> Fut>(_: F) -> usize {
        std::mem::size_of::<Fut>()
    }

    /// Every open connection holds one of these futures for its whole life (beside its
    /// outbox and tungstenite's read buffer): a state that grows them grows every idle
    /// connection. 976 and 992 bytes when written (rustc 1.95); an `async fn` that kept
    /// its arguments twice made them 1,448 and 1,640.
    #[test]
    fn an_open_connection_future_stays_small() {
        let legacy = size6(super::legacy::serve);
        let v1 = size4(super::v1::serve);
        assert!(legacy <= 1100, "legacy connection future: {legacy} bytes");
        assert!(v1 <= 1100, "v1 connection future: {v1} bytes");
    }
}
