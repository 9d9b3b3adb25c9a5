//! Protocol v1 at `/ws`: authentication (handshake or `auth` frame), `hello`, rooms with
//! resume by `since`, sends acknowledged after commit, history pages, presence, typing,
//! application pings, and an `error` frame for every bad request.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use serde::Deserialize;
use tungstenite::Message;
use wschat_protocol::v1::{decode_client, ClientFrame, JoinRoom, Limits, Ref, ServerFrame};
use wschat_protocol::{
    close, ErrorCode, RoomName, PROTOCOL_VERSION, SUBPROTOCOL_KEY_PREFIX, SUBPROTOCOL_V1,
};

use super::{
    backfill, finish, open, start, Backfill, ConnGuard, Driver, End, Inbound, Socket, Upgrade,
};
use crate::app::Shared;
use crate::commit::{Reply, SendRequest};
use crate::hub::{frames, Conn, Encoded, Item, Outbox, Protocol, SubId};
use crate::limits::rate::{RateGate, Verdict};
use crate::limits::{self, Admission};
use crate::store::{NewMessage, Session};

/// Longest `client_msg_id`, in bytes.
pub const MAX_CLIENT_MSG_ID_BYTES: usize = 128;

#[derive(Debug, Deserialize)]
pub(crate) struct KeyQuery {
    session_key: Option<String>,
}

/// The `session_key` of a query string, if any.
pub(crate) fn session_key_from_query(query: &str) -> Option<String> {
    form_urlencoded::parse(query.as_bytes())
        .find(|(name, _)| name == "session_key")
        .map(|(_, key)| key.into_owned())
}

/// The key offered as `Sec-WebSocket-Protocol: wschat.v1, wschat.key.<KEY>`.
fn key_from_protocols(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(axum::http::header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .find_map(|p| p.strip_prefix(SUBPROTOCOL_KEY_PREFIX))
        .map(str::to_owned)
}

/// `GET /ws`.
pub(crate) async fn handle(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Query(query): Query<KeyQuery>,
    headers: HeaderMap,
    upgrade: Upgrade,
) -> Response {
    let admission = match shared.limits.admit(peer, &headers) {
        Ok(admission) => admission,
        Err(refused) => return refused.into_response(),
    };
    let key = key_from_protocols(&headers).or(query.session_key);
    let auth = match key {
        Some(key) => match super::authenticate(&shared, admission.client, Some(&key)).await {
            Ok(auth) => Some(auth),
            Err(refused) => return refused.into_response(),
        },
        None if shared.is_draining() => return super::AuthError::Draining.into_response(),
        None => None,
    };
    let token = shared.tracker.token();
    let protocol = upgrade
        .offers(SUBPROTOCOL_V1)
        .then(|| SUBPROTOCOL_V1.to_owned());
    upgrade.respond(protocol, move |io| async move {
        let Socket {
            mut reader,
            outbox,
            writer,
        } = open(&shared, io).await;
        let gate = RateGate::new(&shared.settings);
        // Counted as open while it authenticates; `ConnGuard` takes over after.
        let counted = auth
            .is_none()
            .then(|| crate::telemetry::ConnectionGauge::new(Protocol::V1));
        let peer = admission.client;
        let auth = match auth {
            Some(auth) => auth,
            None => match Box::pin(await_auth(&shared, &mut reader, &outbox, peer, &gate)).await {
                Some(authenticated) => authenticated,
                None => {
                    // The answer (a close) goes out before the socket does. A client that
                    // reads nothing would keep the writer (and the socket, and the queue)
                    // waiting for room forever: after the bound, it is cancelled. Meanwhile
                    // what the client still sends is read, as after authentication.
                    let written = async {
                        if tokio::time::timeout(Duration::from_secs(2), writer)
                            .await
                            .is_err()
                        {
                            outbox.cancel.cancel();
                        }
                    };
                    tokio::join!(written, super::linger(&mut reader, &shared));
                    return;
                }
            },
        };
        drop(counted);
        let conn = start(&shared, outbox, &auth.session, Protocol::V1);
        let driver = Driver::new(reader, conn.clone(), shared.clone());
        let client = Client {
            shared: shared.clone(),
            conn,
            session: auth.session,
            rooms: HashMap::new(),
            next_sub: 0,
            errors_in_a_row: 0,
            gate,
        };
        // A task of its own: every open connection holds this future for its whole life,
        // and it keeps no room for the opening, the authentication or the request.
        tokio::spawn(serve(client, driver, writer, (token, auth.slot, admission)));
    })
}

/// What an open connection holds until it ends: its place among the tracked tasks (the
/// graceful stop waits for it) and in the session's and the address's counts.
type Held = (
    tokio_util::task::task_tracker::TaskTrackerToken,
    crate::limits::Slot,
    Admission,
);

/// The open connection. Not an `async fn`: that would keep every argument twice (its
/// own copy and the one it moves into its body); an `async move` block keeps one.
#[allow(clippy::manual_async_fn)]
pub(super) fn serve(
    mut client: Client,
    mut driver: Driver,
    writer: tokio::task::JoinHandle<()>,
    held: Held,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    async move {
        let shared = client.shared.clone();
        let conn = client.conn.clone();
        let mut guard = ConnGuard::open(Protocol::V1, conn.id, held.2.client);
        let s = &shared.settings;
        let session = &client.session;
        conn.outbox
            .push(Item::Frame(frames::v1(&ServerFrame::Hello {
                user: session.user.clone(),
                protocol: PROTOCOL_VERSION,
                server: concat!("wschat/", env!("CARGO_PKG_VERSION")).into(),
                session_room: session.room.map(|r| r.to_string()),
                default_room: Some(session.legacy_room().to_string()),
                limits: Limits {
                    max_message_bytes: s.max_message_bytes,
                    history_limit: s.history_limit,
                    max_history_page: s.max_history_page,
                    max_rooms_per_connection: s.max_rooms_per_connection,
                },
            })));
        let end = loop {
            match driver.next().await {
                Inbound::Text(text) => {
                    // Boxed: a frame's handling (a join with its backfill, a history page)
                    // holds much more state than an idle connection; on the heap, it is
                    // held only while it runs.
                    if let Some(end) = Box::pin(client.on_text(&text)).await {
                        break end;
                    }
                }
                Inbound::Control => {
                    if let Some(end) = super::control_frame(&client.gate) {
                        break end;
                    }
                }
                Inbound::End(end) => break end,
            }
        };
        guard.reason = end.reason();
        // Boxed: the end's state is large and lives only at the end.
        Box::pin(finish(&shared, &conn, end, client.rooms.drain(), writer)).await;
        if let End::Close(..) | End::Shutdown = end {
            Box::pin(driver.linger()).await;
        }
        drop(held);
    }
}

/// The `rate_limited` error for `text`, with its `ref` when one can be read.
fn rate_limited(shared: &Shared, text: &str) -> Encoded {
    let reference = match decode_client(text) {
        Ok(frame) => frame.reference().cloned(),
        Err(e) => e.reference,
    };
    frames::v1_error(
        ErrorCode::RateLimited,
        super::rate_limited_text(&shared.settings),
        reference,
    )
}

/// Before authentication: only `auth` and `ping` are answered. Returns the session, or
/// `None` when the connection is to end (a close is queued, or the client went away).
async fn await_auth(
    shared: &Shared,
    reader: &mut super::Reader,
    outbox: &Outbox,
    client: IpAddr,
    gate: &RateGate,
) -> Option<super::Authenticated> {
    let deadline = tokio::time::Instant::now() + shared.settings.auth_timeout();
    let mut errors_in_a_row = 0u32;
    let reply = |frame: Encoded| {
        outbox.push(Item::Frame(frame));
    };
    loop {
        let frame = tokio::select! {
            _ = tokio::time::sleep_until(deadline) => {
                outbox.close(close::AUTH_TIMEOUT, "no auth frame in time");
                return None;
            }
            _ = shared.shutdown.cancelled() => {
                outbox.close(close::SERVICE_RESTART, "server restart");
                return None;
            }
            frame = reader.next() => frame,
        };
        let text = match frame {
            Some(Ok(Message::Text(text))) => text,
            Some(Ok(Message::Binary(_))) => {
                outbox.close(close::UNSUPPORTED_DATA, "binary frames are not supported");
                return None;
            }
            // Counted against the rate as after authentication (a ping has its pong).
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {
                if let Some(end) = super::control_frame(gate) {
                    end.queue_on(outbox);
                    return None;
                }
                continue;
            }
            Some(Ok(Message::Frame(_))) => continue,
            // A frame over the size limit, bad UTF-8, a protocol violation: the same close
            // code as after authentication.
            Some(Err(e)) => {
                super::classify_error(e).queue_on(outbox);
                return None;
            }
            Some(Ok(Message::Close(frame))) => {
                super::End::ClientClose(super::close_reply_code(frame.as_ref())).queue_on(outbox);
                return None;
            }
            None => {
                super::End::ClientGone.queue_on(outbox);
                return None;
            }
        };
        let verdict = gate.check();
        if verdict != Verdict::Pass {
            reply(rate_limited(shared, &text));
            if verdict == Verdict::Close {
                super::RATE_CLOSE.queue_on(outbox);
                return None;
            }
            continue;
        }
        let answer = match decode_client(&text) {
            Ok(ClientFrame::Auth { key, reference }) => {
                match super::authenticate(shared, client, Some(&key)).await {
                    Ok(auth) => return Some(auth),
                    Err(super::AuthError::Limited(refusal)) => {
                        let reason = match refusal {
                            limits::Refusal::Blocked(left) => {
                                reply(frames::v1_error(
                                    ErrorCode::RateLimited,
                                    format!(
                                        "too many unknown session keys from this address; retry in {} s",
                                        left.as_secs().max(1)
                                    ),
                                    reference,
                                ));
                                "too many unknown session keys"
                            }
                            _ => "too many connections for this session",
                        };
                        outbox.close(close::TRY_AGAIN_LATER, reason);
                        return None;
                    }
                    Err(super::AuthError::TimedOut) => {
                        reply(frames::v1_error(
                            ErrorCode::Unavailable,
                            "sessions could not be checked in time; reconnect later",
                            reference,
                        ));
                        outbox.close(
                            close::TRY_AGAIN_LATER,
                            "sessions could not be checked in time",
                        );
                        return None;
                    }
                    Err(super::AuthError::Unavailable) => frames::v1_error(
                        ErrorCode::Unavailable,
                        "sessions cannot be checked right now; send auth again",
                        reference,
                    ),
                    Err(super::AuthError::Draining) => {
                        outbox.close(close::SERVICE_RESTART, "server restart");
                        return None;
                    }
                    Err(super::AuthError::Missing | super::AuthError::Unknown) => {
                        reply(frames::v1_error(
                            ErrorCode::AuthFailed,
                            "unknown, revoked or expired session key",
                            reference,
                        ));
                        outbox.close(close::AUTH_FAILED, "authentication failed");
                        return None;
                    }
                }
            }
            Ok(ClientFrame::Ping { reference }) => {
                errors_in_a_row = 0;
                frames::v1(&ServerFrame::Pong { reference })
            }
            Ok(other) => {
                errors_in_a_row += 1;
                frames::v1_error(
                    ErrorCode::NotAuthenticated,
                    "send {\"type\":\"auth\",\"key\":…} first",
                    other.reference().cloned(),
                )
            }
            Err(e) => {
                errors_in_a_row += 1;
                frames::v1_error(e.code, e.message, e.reference)
            }
        };
        reply(answer);
        // The client's own mistakes count towards 4009 here too (not a store that
        // could not check the key).
        if errors_in_a_row > super::MAX_ERRORS_IN_A_ROW {
            super::ERRORS_CLOSE.queue_on(outbox);
            return None;
        }
    }
}

/// An authenticated v1 connection's reader state.
pub(super) struct Client {
    shared: Arc<Shared>,
    conn: Arc<Conn>,
    session: Session,
    rooms: HashMap<RoomName, SubId>,
    next_sub: SubId,
    errors_in_a_row: u32,
    gate: RateGate,
}

type Refusal = (ErrorCode, String);

/// Whether an error answered after authentication counts towards the 4009 close: the
/// client's own mistakes do; the store's failure (`unavailable`) does not, for a client
/// retrying through an outage is not a broken one.
fn counts_towards_4009(code: ErrorCode) -> bool {
    code != ErrorCode::Unavailable
}

/// The next subscription id from `next`, skipping any still `in_use`. The counter wraps
/// (after four billion joins on one connection) instead of overflowing, and a wrapped id
/// never names a room the connection is still in.
fn next_free_sub(next: &mut SubId, in_use: impl Fn(SubId) -> bool) -> SubId {
    loop {
        let sub = *next;
        *next = next.wrapping_add(1);
        if !in_use(sub) {
            return sub;
        }
    }
}

impl Client {
    async fn on_text(&mut self, text: &str) -> Option<End> {
        // Over the rate: answered, not handled, and not one of the bad frames in a row.
        let verdict = self.gate.check();
        if verdict != Verdict::Pass {
            self.conn
                .outbox
                .push(Item::Frame(rate_limited(&self.shared, text)));
            return (verdict == Verdict::Close).then_some(super::RATE_CLOSE);
        }
        let frame = match decode_client(text) {
            Ok(frame) => frame,
            Err(e) => return self.refuse((e.code, e.message), e.reference),
        };
        let reference = frame.reference().cloned();
        let result = match frame {
            ClientFrame::Auth { .. } => Err((
                ErrorCode::AlreadyAuthenticated,
                "this connection is already authenticated".into(),
            )),
            ClientFrame::Ping { reference } => {
                self.reply(&ServerFrame::Pong { reference });
                Ok(())
            }
            // Counts its own errors: one frame, one error at most.
            ClientFrame::Join { rooms, reference } => return self.join(rooms, reference).await,
            ClientFrame::Leave { room, reference } => self.leave(&room, reference),
            ClientFrame::Send {
                room,
                text,
                client_msg_id,
                reference,
            } => self.send(&room, text, client_msg_id, reference).await,
            ClientFrame::History {
                room,
                before_seq,
                limit,
                reference,
            } => self.history(&room, before_seq, limit, reference).await,
            ClientFrame::Typing { room } => self.typing(&room).await,
        };
        match result {
            Ok(()) => {
                self.errors_in_a_row = 0;
                None
            }
            Err(refusal) => self.refuse(refusal, reference),
        }
    }

    fn reply(&self, frame: &ServerFrame) {
        self.conn.outbox.push(Item::Frame(frames::v1(frame)));
    }

    fn refuse(&mut self, refusal: Refusal, reference: Option<Ref>) -> Option<End> {
        let counts = counts_towards_4009(refusal.0);
        self.answer_error(refusal, reference);
        if counts {
            self.count_error()
        } else {
            None
        }
    }

    fn answer_error(&self, (code, message): Refusal, reference: Option<Ref>) {
        self.conn
            .outbox
            .push(Item::Frame(frames::v1_error(code, message, reference)));
    }

    /// One more frame in a row answered with an error: past the limit, the close.
    /// (`refuse` counts only the client's mistakes: `counts_towards_4009`.)
    fn count_error(&mut self) -> Option<End> {
        self.errors_in_a_row += 1;
        (self.errors_in_a_row > super::MAX_ERRORS_IN_A_ROW).then_some(super::ERRORS_CLOSE)
    }

    /// The room, if its name is valid and this session may use it.
    fn room(&self, name: &str) -> Result<RoomName, Refusal> {
        let room = RoomName::new(name).map_err(|e| (ErrorCode::InvalidRoom, e.to_string()))?;
        match self.session.room {
            Some(only) if room != RoomName::legacy(only) => Err((
                ErrorCode::ForbiddenRoom,
                format!("this session may only use room {only}"),
            )),
            _ => Ok(room),
        }
    }

    /// Join each room; a refused one gets its own error and the others go on. A frame that
    /// names no room, or more rooms than a connection may be in, is refused whole; a room named twice
    /// is joined once. The frame counts as one error (towards 4009) when no room of it
    /// was joined, however many it named.
    async fn join(&mut self, rooms: Vec<JoinRoom>, reference: Option<Ref>) -> Option<End> {
        if rooms.is_empty() {
            // Nothing to answer with `joined`: an error, so a client waiting on `ref` hears.
            let refusal = (ErrorCode::InvalidFrame, "a join names no room".to_owned());
            return self.refuse(refusal, reference);
        }
        let max = self.shared.settings.max_rooms_per_connection;
        if rooms.len() > max {
            let refusal = (
                ErrorCode::TooManyRooms,
                format!(
                    "a join names {} rooms; a connection may be in {max} at once",
                    rooms.len()
                ),
            );
            return self.refuse(refusal, reference);
        }
        let mut named = HashSet::with_capacity(rooms.len());
        // Refused rooms, and those of them refused for the client's own mistake.
        let (mut tried, mut refused, mut counted) = (0, 0, 0);
        for JoinRoom { room, since } in rooms {
            if self.shared.shutdown.is_cancelled() || self.conn.outbox.cancel.is_cancelled() {
                // The connection is about to close (1012, or 4008 already queued): the
                // client joins again after its reconnect.
                break;
            }
            if !named.insert(room.clone()) {
                continue;
            }
            tried += 1;
            if let Err(refusal) = self.join_one(&room, since, reference.clone()).await {
                counted += usize::from(counts_towards_4009(refusal.0));
                self.answer_error(refusal, reference.clone());
                refused += 1;
            }
        }
        if refused == tried {
            // Nothing joined: the client's own mistakes count; the store's failure
            // (`unavailable`) neither counts nor resets the count.
            return if counted > 0 {
                self.count_error()
            } else {
                None
            };
        }
        self.errors_in_a_row = 0;
        None
    }

    async fn join_one(
        &mut self,
        name: &str,
        since: Option<u64>,
        reference: Option<Ref>,
    ) -> Result<(), Refusal> {
        let room = self.room(name)?;
        // A join of a joined room re-syncs it from `since`: a new subscription replaces the
        // old one once it is in the room, so the user never leaves the room's presence
        // (the others would see them leave and come back) and the room is not dropped
        // and made again when this was its only member here.
        let old = self.rooms.get(&room).copied();
        let was_joined = old.is_some();
        if self.rooms.len() - usize::from(was_joined)
            >= self.shared.settings.max_rooms_per_connection
        {
            return Err((
                ErrorCode::TooManyRooms,
                format!(
                    "a connection may be in {} rooms at once",
                    self.shared.settings.max_rooms_per_connection
                ),
            ));
        }
        let sub = next_free_sub(&mut self.next_sub, |s| self.rooms.values().any(|&r| r == s));
        let conn = &self.conn;
        let shared = &self.shared;
        conn.outbox.push(Item::Track { sub });
        let unavailable = |e: crate::store::StoreError| {
            tracing::warn!(error = %e, "join failed");
            (
                ErrorCode::Unavailable,
                format!("the store is unavailable; room {room} is not joined; retry"),
            )
        };
        // Refused after `subscribe`: undone. A room the client was in (a re-join) or was
        // told it joined is also told it left, or the client would wait for its messages.
        let leave = |told_in: bool| {
            shared.hub.unsubscribe(&room, conn, sub);
            conn.outbox.push(Item::Untrack { sub });
            if told_in {
                conn.outbox.push(Item::Frame(frames::v1(&ServerFrame::Left {
                    room: room.to_string(),
                    reference: reference.clone(),
                })));
            }
        };
        let subscribed = shared.hub.subscribe(&room, conn, sub).await;
        if let Some(old) = old {
            self.rooms.remove(&room);
            shared.hub.unsubscribe(&room, conn, old);
            conn.outbox.push(Item::Untrack { sub: old });
        }
        let head = async {
            subscribed?;
            shared.store.room_head(&room).await
        }
        .await;
        let head = match head {
            Ok(head) => head,
            Err(e) => {
                leave(was_joined);
                return Err(unavailable(e));
            }
        };
        if let Some(since) = since {
            if since > head.last_seq {
                leave(was_joined);
                return Err((
                    ErrorCode::BadSince,
                    format!(
                        "since {since} is beyond the last seq {} of room {room}",
                        head.last_seq
                    ),
                ));
            }
        }
        self.reply(&ServerFrame::Joined {
            room: room.to_string(),
            last_seq: head.last_seq,
            reference: reference.clone(),
        });
        let history = shared.settings.history_limit;
        let last = Backfill::Last {
            n: history,
            head: Some(head.last_seq),
        };
        let from = match since {
            Some(since) if since + 1 >= head.first_seq => Backfill::After {
                since,
                head: head.last_seq,
            },
            Some(since) => {
                self.reply(&ServerFrame::Reset {
                    room: room.to_string(),
                    since,
                    first_seq: head.first_seq,
                });
                last
            }
            None => last,
        };
        let backfilled = match backfill(shared, conn, &room, sub, from).await {
            Ok(backfilled) => backfilled,
            Err(e) => {
                leave(true);
                return Err(unavailable(e));
            }
        };
        // `presence` marks the end of the backfill: not after one a stop cut short.
        if backfilled.is_continue() {
            shared.hub.send_presence(&room, conn, sub);
        }
        self.rooms.insert(room, sub);
        Ok(())
    }

    fn leave(&mut self, name: &str, reference: Option<Ref>) -> Result<(), Refusal> {
        let room = RoomName::new(name).map_err(|e| (ErrorCode::InvalidRoom, e.to_string()))?;
        let Some(sub) = self.rooms.remove(&room) else {
            return Err((ErrorCode::NotJoined, format!("not in room {room}")));
        };
        self.shared.hub.unsubscribe(&room, &self.conn, sub);
        self.conn.outbox.push(Item::Untrack { sub });
        self.reply(&ServerFrame::Left {
            room: room.to_string(),
            reference,
        });
        Ok(())
    }

    async fn send(
        &mut self,
        name: &str,
        text: String,
        client_msg_id: Option<String>,
        reference: Option<Ref>,
    ) -> Result<(), Refusal> {
        let room = self.room(name)?;
        super::check_text(&self.shared.settings, &text)?;
        if let Some(id) = &client_msg_id {
            super::check_client_msg_id(id)?;
        }
        self.shared
            .committer
            .submit(SendRequest {
                msg: NewMessage {
                    room,
                    user: self.session.user.clone(),
                    text,
                    client_msg_id,
                },
                reply: Reply::Conn {
                    conn: self.conn.clone(),
                    reference,
                },
            })
            .await;
        Ok(())
    }

    async fn history(
        &mut self,
        name: &str,
        before_seq: Option<u64>,
        limit: Option<u32>,
        reference: Option<Ref>,
    ) -> Result<(), Refusal> {
        let room = self.room(name)?;
        let limit = limit
            .unwrap_or(self.shared.settings.history_limit)
            .clamp(1, self.shared.settings.max_history_page.max(1));
        let mut messages = self
            .shared
            .store
            .messages_before(&room, before_seq, limit.saturating_add(1))
            .await
            .map_err(|e| {
                tracing::warn!(error = %e, "history read failed");
                (
                    ErrorCode::Unavailable,
                    "the store is unavailable; retry".to_owned(),
                )
            })?;
        let has_more = messages.len() > limit as usize;
        if has_more {
            messages.remove(0);
        }
        self.reply(&ServerFrame::History {
            room: room.to_string(),
            messages: messages.iter().map(frames::message_body).collect(),
            has_more,
            reference,
        });
        Ok(())
    }

    async fn typing(&mut self, name: &str) -> Result<(), Refusal> {
        let room = RoomName::new(name).map_err(|e| (ErrorCode::InvalidRoom, e.to_string()))?;
        if !self.rooms.contains_key(&room) {
            return Err((ErrorCode::NotJoined, format!("not in room {room}")));
        }
        self.shared
            .hub
            .typing_from(&room, &self.session.user, self.conn.id);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::{next_free_sub, SubId};

    #[test]
    fn subscription_ids_wrap_and_skip_those_still_in_use() {
        let mut next: SubId = SubId::MAX - 1;
        let held = [SubId::MAX, 0, 1];
        let in_use = |s| held.contains(&s);
        assert_eq!(next_free_sub(&mut next, in_use), SubId::MAX - 1);
        // MAX, 0 and 1 name rooms the connection is still in.
        assert_eq!(next_free_sub(&mut next, in_use), 2);
        assert_eq!(next_free_sub(&mut next, in_use), 3);
    }
}
