//! nodejschat's protocol, on an upgrade at any path but `/ws`: the key in
//! `?session_key=`, checked before the upgrade (401 when unknown); then
//! `{"authenticated":true}`, the room's last messages, and live messages, the sender's
//! own included. Inbound `{"message": …}` frames are committed through the committer.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::response::{IntoResponse, Response};
use wschat_protocol::legacy::{self, LegacyInbound};
use wschat_protocol::{ErrorCode, RoomName};

use super::{backfill, finish, open, start, Backfill, ConnGuard, Driver, End, Inbound, Upgrade};
use crate::app::Shared;
use crate::commit::{Reply, SendRequest};
use crate::hub::{frames, Conn, Item, Protocol};
use crate::limits::rate::{RateGate, Verdict};
use crate::store::NewMessage;

/// Handle a legacy upgrade request (the caller has seen `Upgrade: websocket`).
pub(crate) async fn handle(shared: Arc<Shared>, request: axum::extract::Request) -> Response {
    let (mut parts, _body) = request.into_parts();
    let peer = parts
        .extensions
        .get::<axum::extract::ConnectInfo<SocketAddr>>()
        .map(|c| c.0)
        .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
    let upgrade = match Upgrade::from_request_parts(&mut parts, &()).await {
        Ok(upgrade) => upgrade,
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
    // nodejschat's `ws` server selected the first subprotocol a client offered; a browser
    // that offered one fails a connection whose answer selects none. (Not v1's: this is
    // not a v1 connection.)
    let protocol = upgrade.first_offered_but(wschat_protocol::SUBPROTOCOL_V1);
    upgrade.respond(protocol, move |io| async move {
        let socket = open(&shared, io).await;
        let room = auth.session.legacy_room();
        let conn = start(&shared, socket.outbox, &auth.session, Protocol::Legacy);
        let driver = Driver::new(socket.reader, conn.clone(), shared.clone());
        let held = Held {
            _token: token,
            _slot: auth.slot,
            admission,
        };
        // A task of its own: every open connection holds this future for its whole life,
        // and it keeps no room for the opening, the session or the request.
        tokio::spawn(serve(shared, conn, driver, socket.writer, room, held));
    })
}

/// What an open connection holds until it ends: its place among the tracked tasks (the
/// graceful stop waits for it) and in the session's and the address's counts.
pub(super) struct Held {
    _token: tokio_util::task::task_tracker::TaskTrackerToken,
    _slot: crate::limits::Slot,
    admission: crate::limits::Admission,
}

/// The open connection. Not an `async fn`: that would keep every argument twice (its
/// own copy and the one it moves into its body); an `async move` block keeps one.
#[allow(clippy::manual_async_fn)]
pub(super) fn serve(
    shared: Arc<Shared>,
    conn: Arc<Conn>,
    mut driver: Driver,
    writer: tokio::task::JoinHandle<()>,
    room: RoomName,
    held: Held,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    async move {
        let peer: IpAddr = held.admission.client;
        let mut guard = ConnGuard::open(Protocol::Legacy, conn.id, peer);
        conn.outbox
            .push(Item::Frame(frames::text(legacy::AUTHENTICATED)));

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
        let end = match joined {
            Err(e) => {
                tracing::warn!(conn = conn.id, error = %e, "legacy join failed");
                conn.outbox.push(Item::Frame(frames::legacy_error(
                    ErrorCode::Unavailable,
                    "history unavailable; reconnect",
                )));
                End::Close(wschat_protocol::close::INTERNAL_ERROR, "store unavailable")
            }
            // A backfill a stop cut short: the reader sees the stop at once.
            Ok(_) => read_loop(&shared, &conn, &room, &mut driver).await,
        };
        guard.reason = end.reason();
        // Boxed, as the join: the end's state is large and lives only at the end.
        Box::pin(finish(&shared, &conn, end, [(room, SUB)], writer)).await;
        if let End::Close(..) | End::Shutdown = end {
            Box::pin(driver.linger()).await;
        }
        drop(held);
    }
}

async fn read_loop(shared: &Shared, conn: &Arc<Conn>, room: &RoomName, driver: &mut Driver) -> End {
    let mut errors_in_a_row = 0u32;
    let gate = RateGate::new(&shared.settings);
    loop {
        let text = match driver.next().await {
            Inbound::Text(text) => text,
            Inbound::Control => match super::control_frame(&gate) {
                Some(end) => return end,
                None => continue,
            },
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
                    return super::ERRORS_CLOSE;
                }
            }
        }
    }
}
