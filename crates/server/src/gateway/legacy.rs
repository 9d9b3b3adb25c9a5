//! nodejschat's protocol, on an upgrade at any path but `/ws`: the key in
//! `?session_key=`, checked before the upgrade (401 when unknown); then
//! `{"authenticated":true}`, the room's last messages, and live messages, the sender's
//! own included. Inbound `{"message": …}` frames are committed through the committer.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::extract::ws::{Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::FromRequestParts;
use axum::response::{IntoResponse, Response};
use futures_util::stream::SplitStream;
use wschat_protocol::legacy::{self, LegacyInbound};
use wschat_protocol::{ErrorCode, RoomName};

use super::{backfill, finish, start, Backfill, ConnGuard, Driver, End, Inbound};
use crate::app::Shared;
use crate::commit::{Reply, SendRequest};
use crate::hub::{frames, Conn, Item, Protocol};
use crate::limits::rate::{RateGate, Verdict};
use crate::store::{NewMessage, Session};

/// Handle a legacy upgrade request (the caller has seen `Upgrade: websocket`).
pub(crate) async fn handle(shared: Arc<Shared>, request: axum::extract::Request) -> Response {
    let (mut parts, _body) = request.into_parts();
    let peer = parts
        .extensions
        .get::<axum::extract::ConnectInfo<SocketAddr>>()
        .map(|c| c.0)
        .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
    let ws = match WebSocketUpgrade::from_request_parts(&mut parts, &()).await {
        Ok(ws) => ws,
        Err(rejection) => return rejection.into_response(),
    };
    let admission = match shared.limits.admit(peer, &parts.headers) {
        Ok(admission) => admission,
        Err(refused) => return refused.into_response(),
    };
    let key = parts
        .uri
        .query()
        .and_then(super::v1::session_key_from_query);
    let auth = match super::authenticate(&shared, admission.client, key.as_deref()).await {
        Ok(auth) => auth,
        Err(refused) => return refused.into_response(),
    };
    let token = shared.tracker.token();
    super::configure(ws, &shared).on_upgrade(move |socket| {
        let connection = run(shared, socket, &auth.session, admission.client);
        async move {
            connection.await;
            drop((token, auth.slot, admission));
        }
    })
}

/// Start the connection now, so that the future every open connection holds for its whole
/// life keeps no room for the socket (it moves into the reader and writer halves) or the
/// session: an async fn keeps its arguments' room until it returns.
fn run(
    shared: Arc<Shared>,
    socket: WebSocket,
    session: &Session,
    peer: IpAddr,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    let room = RoomName::legacy(session.room.unwrap_or(0));
    let (conn, stream, writer) = start(&shared, socket, session, Protocol::Legacy);
    serve(shared, conn, stream, writer, room, peer)
}

async fn serve(
    shared: Arc<Shared>,
    conn: Arc<Conn>,
    stream: SplitStream<WebSocket>,
    writer: tokio::task::JoinHandle<()>,
    room: RoomName,
    peer: IpAddr,
) {
    let mut guard = ConnGuard::open(Protocol::Legacy, conn.id, peer);
    conn.outbox
        .push(Item::Frame(Utf8Bytes::from_static(legacy::AUTHENTICATED)));

    // Subscribe first, then read the history: the writer merges the two by seq.
    const SUB: u32 = 0;
    conn.outbox.push(Item::Track { sub: SUB });
    // Boxed: a future's size is its largest state, and every open connection holds its
    // future for its whole life; the join's state (the history read) is the largest,
    // and on the heap it lives only while it runs (784 -> 696 bytes).
    let joined = Box::pin(async {
        shared.hub.subscribe(&room, &conn, SUB).await?;
        let last = Backfill::Last {
            n: shared.settings.history_limit,
            head: None,
        };
        backfill(&shared, &conn, &room, SUB, last).await
    })
    .await;
    let mut driver = Driver::new(stream, conn.clone(), shared.clone());
    let end = match joined {
        Err(e) => {
            tracing::warn!(conn = conn.id, error = %e, "legacy join failed");
            conn.outbox.push(Item::Frame(frames::legacy_error(
                ErrorCode::Unavailable,
                "history unavailable; reconnect",
            )));
            End::Close(wschat_protocol::close::INTERNAL_ERROR, "store unavailable")
        }
        Ok(()) => read_loop(&shared, &conn, &room, &mut driver).await,
    };
    guard.reason = end.reason();
    finish(&shared, &conn, end, [(room, SUB)], writer).await;
    if let End::Close(..) = end {
        driver.linger().await;
    }
}

async fn read_loop(shared: &Shared, conn: &Arc<Conn>, room: &RoomName, driver: &mut Driver) -> End {
    let mut errors_in_a_row = 0u32;
    let gate = RateGate::new(&shared.settings);
    loop {
        let text = match driver.next().await {
            Inbound::Text(text) => text,
            Inbound::End(end) => return end,
        };
        let verdict = gate.check();
        if verdict != Verdict::Pass {
            let text = super::rate_limited_text(&shared.settings);
            conn.outbox.push(Item::Frame(frames::legacy_error(
                ErrorCode::RateLimited,
                &text,
            )));
            if verdict == Verdict::Close {
                return super::RATE_CLOSE;
            }
            continue;
        }
        let outcome = legacy::decode_inbound(&text)
            .map_err(|e| (e.code, e.message))
            .and_then(|LegacyInbound::Say(message)| {
                super::check_text(&shared.settings, &message)?;
                Ok(message)
            });
        match outcome {
            Ok(text) => {
                errors_in_a_row = 0;
                shared
                    .committer
                    .submit(SendRequest {
                        msg: NewMessage {
                            room: room.clone(),
                            user: conn.user.to_string(),
                            text,
                            client_msg_id: None,
                        },
                        reply: Reply::Conn {
                            conn: conn.clone(),
                            reference: None,
                        },
                    })
                    .await;
            }
            Err((code, message)) => {
                conn.outbox
                    .push(Item::Frame(frames::legacy_error(code, &message)));
                errors_in_a_row += 1;
                if errors_in_a_row > super::MAX_ERRORS_IN_A_ROW {
                    return End::Close(
                        wschat_protocol::close::TOO_MANY_ERRORS,
                        "too many bad frames",
                    );
                }
            }
        }
    }
}
