//! Tiny fake servers for the load client's tests: a legacy (nodejschat-like) broadcaster
//! and a v1 server with an in-memory log, both able to drop every Nth delivery on purpose;
//! the v1 one can also close every connection with 1012 once, to exercise resume.

#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use wschat_protocol::legacy;
use wschat_protocol::v1::{ClientFrame, Limits, MessageBody, Ref, ServerFrame};

const TIME: &str = "2016-08-08T17:20:32.421Z";

type Tx = mpsc::UnboundedSender<Message>;

/// Accepts WebSocket connections on 127.0.0.1:0 and runs `handle` for each, with the
/// connection's number and the upgrade request's path and query.
async fn serve<F, Fut>(handle: F) -> SocketAddr
where
    F: Fn(u64, String, tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>) -> Fut
        + Send
        + Sync
        + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let handle = Arc::new(handle);
    tokio::spawn(async move {
        let mut next_id = 0u64;
        while let Ok((tcp, _)) = listener.accept().await {
            next_id += 1;
            let id = next_id;
            let handle = Arc::clone(&handle);
            let _ = tcp.set_nodelay(true);
            tokio::spawn(async move {
                let mut target = String::new();
                // tungstenite's callback type; its error is an HTTP response.
                #[allow(clippy::result_large_err)]
                let note_target = |req: &Request, resp: Response| {
                    target = req.uri().to_string();
                    Ok(resp)
                };
                if let Ok(ws) = tokio_tungstenite::accept_hdr_async(tcp, note_target).await {
                    handle(id, target, ws).await;
                }
            });
        }
    });
    addr
}

/// Splits a socket into a writer task fed by a channel, and returns the channel and the
/// reading half.
fn writer(
    ws: tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>,
) -> (
    Tx,
    futures_util::stream::SplitStream<tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>>,
) {
    let (mut sink, stream) = ws.split();
    let (tx, mut rx) = mpsc::unbounded_channel::<Message>();
    tokio::spawn(async move {
        while let Some(m) = rx.recv().await {
            let is_close = matches!(m, Message::Close(_));
            if sink.send(m).await.is_err() || is_close {
                break;
            }
        }
    });
    (tx, stream)
}

/// A legacy server: `{"authenticated":true}`, then every inbound `{"message"}` goes to
/// every client as `{"time","user","message"}`, except that, with `drop_every = Some(n)`,
/// every n-th delivery (counted over all clients) is silently dropped.
pub async fn legacy_fake(drop_every: Option<u64>) -> SocketAddr {
    let clients: Arc<Mutex<HashMap<u64, Tx>>> = Arc::default();
    let deliveries = Arc::new(AtomicU64::new(0));
    serve(move |id, _target, ws| {
        let clients = Arc::clone(&clients);
        let deliveries = Arc::clone(&deliveries);
        async move {
            let (tx, mut stream) = writer(ws);
            let _ = tx.send(Message::text(legacy::AUTHENTICATED));
            clients.lock().unwrap().insert(id, tx);
            while let Some(Ok(msg)) = stream.next().await {
                let Message::Text(t) = msg else { continue };
                let Ok(legacy::LegacyInbound::Say(text)) = legacy::decode_inbound(t.as_str())
                else {
                    continue;
                };
                let out = legacy::encode_message(TIME, "fake", &text);
                broadcast(&clients, &deliveries, drop_every, &out);
            }
            clients.lock().unwrap().remove(&id);
        }
    })
    .await
}

/// Sends `out` to every client, skipping every `drop_every`-th delivery (counted over all
/// clients in `deliveries`).
fn broadcast(
    clients: &Mutex<HashMap<u64, Tx>>,
    deliveries: &AtomicU64,
    drop_every: Option<u64>,
    out: &str,
) {
    let clients = clients.lock().unwrap();
    for tx in clients.values() {
        let n = deliveries.fetch_add(1, Ordering::Relaxed) + 1;
        if drop_every.is_some_and(|d| n.is_multiple_of(d)) {
            continue;
        }
        let _ = tx.send(Message::text(out));
    }
}

/// Options of the v1 fake.
#[derive(Clone, Copy, Default)]
pub struct V1Fake {
    /// Drop every n-th live delivery (not acks, not backfill).
    pub drop_every: Option<u64>,
    /// After this many stored messages, close every connection once with 1012.
    pub kick_after: Option<u64>,
    /// After this many stored messages, every connection open then goes silent once: it
    /// stays open but nothing is read or sent on it any more (a paused server).
    pub hang_after: Option<u64>,
    /// The first this many join frames are answered `unavailable` (the store away).
    pub refuse_joins: Option<u64>,
    /// Every n-th stored message is stored again right after, under the next seq, and
    /// sent to every member twice (a retry stored twice).
    pub store_twice_every: Option<u64>,
    /// For this many milliseconds after the kick (`kick_after`), joins are answered
    /// `unavailable`, but those of user `k1`: every other connection stays away (in its
    /// backoff) for that long.
    pub slow_resume_ms: Option<u64>,
    /// Every message is answered `unavailable` this many times (counted by its
    /// `client_msg_id`) before it is stored: the store away, for each send.
    pub refuse_each_send: Option<u32>,
    /// (k, reason): after k stored messages, the connection of user `k2` is closed once
    /// with 1008 and `reason` (a policy close: the client gives up, unless the reason is
    /// the rate limit's).
    pub policy_close_after: Option<(u64, &'static str)>,
    /// The first this many `auth` frames are answered `unavailable` (the sessions could
    /// not be checked), and the connection is closed 300 ms later with 4002 unless it
    /// sent `auth` again, as wschat does.
    pub auth_unavailable: Option<u64>,
    /// (k, left, error): after k stored messages, user `k2` is let go of its rooms once,
    /// as when a join's backfill read fails after `joined` (wschat sends `left`, then
    /// `unavailable` for the join): `left` if `left`, the error if `error`. The
    /// connection stays open.
    pub left_after: Option<(u64, bool, bool)>,
    /// After this many stored messages, every send is answered `rate_limited` for the
    /// next second (nothing stored): a server whose rate limit the clients went past.
    pub rate_limited_after: Option<u64>,
    /// Every join of user `k2` is answered `joined`, then `left` and `unavailable`: a
    /// backfill read that fails each time.
    pub k2_backfill_always_fails: bool,
    /// The first join frame of user `k2` is never answered.
    pub ignore_first_join_of_k2: bool,
    /// (k, ms): after k stored messages, live deliveries are held for ms milliseconds
    /// (acks still go at once), then sent in order: a server whose fan-out stalls (a
    /// broker that is away) for longer than a quiet second. A member that joins meanwhile
    /// would get the held ones twice (backfill, then held): the tests join none.
    pub stall_after: Option<(u64, u64)>,
    /// (user, n): the joins of `user` are answered `unavailable` until n messages are
    /// stored: a member that joins late, after the sending began.
    pub late_joiner: Option<(&'static str, u64)>,
    /// A second such member.
    pub later_joiner: Option<(&'static str, u64)>,
}

#[derive(Default)]
struct Room {
    log: Vec<MessageBody>,
    members: HashMap<u64, Tx>,
}

#[derive(Default)]
struct Hub {
    rooms: HashMap<String, Room>,
    by_client_id: HashMap<String, (String, u64, i64)>,
    next_id: i64,
    stored: u64,
    kicked: bool,
    kicked_at: Option<std::time::Instant>,
    hung: Option<std::collections::HashSet<u64>>,
    conns: HashMap<u64, Tx>,
    delivered: u64,
    joins_refused: u64,
    sends_refused: HashMap<String, u32>,
    users: HashMap<u64, String>,
    policy_closed: bool,
    auths_refused: u64,
    join_ignored: bool,
    rate_limited_since: Option<std::time::Instant>,
    left_done: bool,
    /// Deliveries held while the fan-out stalls (`stall_after`); `None` when it does not.
    stalled: Option<Vec<(Tx, Message)>>,
    stall_done: bool,
}

fn frame(f: &ServerFrame) -> Message {
    Message::text(wschat_protocol::v1::encode_server(f))
}

/// A v1 server with an in-memory log per room: auth → hello, join (with `since`
/// backfill, or the last 3 messages) → joined, send → ack (idempotent by
/// `client_msg_id`) and a message to every member.
pub async fn v1_fake(opts: V1Fake) -> SocketAddr {
    let hub: Arc<Mutex<Hub>> = Arc::default();
    serve(move |id, _target, ws| {
        let hub = Arc::clone(&hub);
        async move {
            let (tx, mut stream) = writer(ws);
            hub.lock().unwrap().conns.insert(id, tx.clone());
            // Keepalive, as a real server pings: stops when the connection hangs.
            let (ping_tx, ping_hub) = (tx.clone(), Arc::clone(&hub));
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    let hung = ping_hub
                        .lock()
                        .unwrap()
                        .hung
                        .as_ref()
                        .is_some_and(|h| h.contains(&id));
                    if hung || ping_tx.send(Message::Ping(Vec::new().into())).is_err() {
                        break;
                    }
                }
            });
            let mut user = String::new();
            while let Some(Ok(msg)) = stream.next().await {
                if hub
                    .lock()
                    .unwrap()
                    .hung
                    .as_ref()
                    .is_some_and(|h| h.contains(&id))
                {
                    continue;
                }
                let Message::Text(t) = msg else { continue };
                let Ok(cmd) = wschat_protocol::v1::decode_client(t.as_str()) else {
                    continue;
                };
                match cmd {
                    ClientFrame::Auth { key, .. } => {
                        {
                            let mut hub = hub.lock().unwrap();
                            if opts.auth_unavailable.is_some_and(|n| hub.auths_refused < n) {
                                hub.auths_refused += 1;
                                let _ = tx.send(frame(&ServerFrame::Error {
                                    code: wschat_protocol::ErrorCode::Unavailable,
                                    message: "sessions cannot be checked right now".into(),
                                    reference: None,
                                }));
                                let tx = tx.clone();
                                tokio::spawn(async move {
                                    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
                                    let _ = tx.send(Message::Close(Some(CloseFrame {
                                        code: CloseCode::from(4002),
                                        reason: "no auth frame in time".into(),
                                    })));
                                });
                                continue;
                            }
                        }
                        user = key;
                        hub.lock().unwrap().users.insert(id, user.clone());
                        let _ = tx.send(frame(&ServerFrame::Hello {
                            user: user.clone(),
                            protocol: 1,
                            server: "fake".into(),
                            session_room: None,
                            default_room: None,
                            limits: Limits {
                                max_message_bytes: 4096,
                                history_limit: 3,
                                max_history_page: 100,
                                max_rooms_per_connection: 10,
                            },
                        }));
                    }
                    _ if user.is_empty() => {}
                    ClientFrame::Join { rooms, reference } => {
                        let mut hub = hub.lock().unwrap();
                        let resuming_slowly = opts.slow_resume_ms.is_some_and(|ms| {
                            user != "k1"
                                && hub
                                    .kicked_at
                                    .is_some_and(|at| at.elapsed().as_millis() < u128::from(ms))
                        });
                        let too_early = [opts.late_joiner, opts.later_joiner]
                            .into_iter()
                            .flatten()
                            .any(|(late, n)| user == late && hub.stored < n);
                        if opts.ignore_first_join_of_k2 && user == "k2" && !hub.join_ignored {
                            hub.join_ignored = true;
                            continue;
                        }
                        if resuming_slowly
                            || too_early
                            || opts.refuse_joins.is_some_and(|n| hub.joins_refused < n)
                        {
                            hub.joins_refused += 1;
                            let _ = tx.send(frame(&ServerFrame::Error {
                                code: wschat_protocol::ErrorCode::Unavailable,
                                message: "the store is unavailable".into(),
                                reference,
                            }));
                            continue;
                        }
                        if opts.k2_backfill_always_fails && user == "k2" {
                            for jr in rooms {
                                let last_seq =
                                    hub.rooms.entry(jr.room.clone()).or_default().log.len();
                                let _ = tx.send(frame(&ServerFrame::Joined {
                                    room: jr.room.clone(),
                                    last_seq: last_seq as u64,
                                    reference: reference.clone(),
                                }));
                                let _ = tx.send(frame(&ServerFrame::Left {
                                    room: jr.room,
                                    reference: None,
                                }));
                            }
                            let _ = tx.send(frame(&ServerFrame::Error {
                                code: wschat_protocol::ErrorCode::Unavailable,
                                message: "the store is unavailable".into(),
                                reference,
                            }));
                            continue;
                        }
                        for jr in rooms {
                            let room = hub.rooms.entry(jr.room.clone()).or_default();
                            room.members.insert(id, tx.clone());
                            let last_seq = room.log.len() as u64;
                            let _ = tx.send(frame(&ServerFrame::Joined {
                                room: jr.room.clone(),
                                last_seq,
                                reference: reference.clone(),
                            }));
                            let from = match jr.since {
                                Some(s) => s as usize,
                                None => room.log.len().saturating_sub(3),
                            };
                            for m in &room.log[from.min(room.log.len())..] {
                                let _ = tx.send(frame(&ServerFrame::Message(m.clone())));
                            }
                            // As wschat: `presence` ends a join's backfill.
                            let _ = tx.send(frame(&ServerFrame::Presence {
                                room: jr.room.clone(),
                                users: Vec::new(),
                            }));
                        }
                    }
                    ClientFrame::Send {
                        room,
                        text,
                        client_msg_id,
                        reference,
                    } => {
                        let shared_hub = Arc::clone(&hub);
                        let mut hub = hub.lock().unwrap();
                        if opts.hang_after.is_some_and(|k| hub.stored >= k) && hub.hung.is_none() {
                            let hung: std::collections::HashSet<u64> =
                                hub.conns.keys().copied().collect();
                            for room in hub.rooms.values_mut() {
                                room.members.retain(|c, _| !hung.contains(c));
                            }
                            hub.conns.retain(|c, _| !hung.contains(c));
                            hub.hung = Some(hung);
                            // Not stored, not answered: the client resends it elsewhere.
                            continue;
                        }
                        if opts.rate_limited_after.is_some_and(|k| hub.stored >= k) {
                            let since = *hub
                                .rate_limited_since
                                .get_or_insert_with(std::time::Instant::now);
                            if since.elapsed() < std::time::Duration::from_secs(1) {
                                let _ = tx.send(frame(&ServerFrame::Error {
                                    code: wschat_protocol::ErrorCode::RateLimited,
                                    message: "rate limit: slow down".into(),
                                    reference,
                                }));
                                continue;
                            }
                        }
                        if let (Some(k), Some(c)) = (opts.refuse_each_send, client_msg_id.as_ref())
                        {
                            let refused = hub.sends_refused.entry(c.clone()).or_default();
                            if *refused < k {
                                *refused += 1;
                                let _ = tx.send(frame(&ServerFrame::Error {
                                    code: wschat_protocol::ErrorCode::Unavailable,
                                    message: "the store is unavailable".into(),
                                    reference,
                                }));
                                continue;
                            }
                        }
                        if let Some((r, seq, mid)) =
                            client_msg_id.as_ref().and_then(|c| hub.by_client_id.get(c))
                        {
                            let _ = tx.send(frame(&ServerFrame::Ack {
                                room: r.clone(),
                                seq: *seq,
                                id: *mid,
                                client_msg_id: client_msg_id.clone(),
                                time: TIME.into(),
                                reference,
                            }));
                            continue;
                        }
                        hub.next_id += 1;
                        let mid = hub.next_id;
                        let hub_stored = hub.stored;
                        let r = hub.rooms.entry(room.clone()).or_default();
                        let seq = r.log.len() as u64 + 1;
                        let body = MessageBody {
                            room: room.clone(),
                            seq,
                            id: mid,
                            user: "u".into(),
                            text,
                            time: TIME.into(),
                        };
                        r.log.push(body.clone());
                        let copy = opts
                            .store_twice_every
                            .is_some_and(|n| (hub_stored + 1).is_multiple_of(n))
                            .then(|| {
                                let copy = MessageBody {
                                    seq: seq + 1,
                                    id: mid + 1_000_000,
                                    ..body.clone()
                                };
                                r.log.push(copy.clone());
                                frame(&ServerFrame::Message(copy))
                            });
                        let out = frame(&ServerFrame::Message(body));
                        let members: Vec<Tx> = r.members.values().cloned().collect();
                        if let Some(c) = client_msg_id.clone() {
                            hub.by_client_id.insert(c, (room.clone(), seq, mid));
                        }
                        let _ = tx.send(frame(&ServerFrame::Ack {
                            room,
                            seq,
                            id: mid,
                            client_msg_id,
                            time: TIME.into(),
                            reference,
                        }));
                        if let Some((k, ms)) = opts.stall_after {
                            if hub.stored >= k && !hub.stall_done {
                                hub.stall_done = true;
                                hub.stalled = Some(Vec::new());
                                let hub = shared_hub;
                                tokio::spawn(async move {
                                    tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
                                    // Under the lock: no later delivery overtakes them.
                                    let mut hub = hub.lock().unwrap();
                                    for (m, msg) in hub.stalled.take().into_iter().flatten() {
                                        let _ = m.send(msg);
                                    }
                                });
                            }
                        }
                        for m in members {
                            hub.delivered += 1;
                            if opts
                                .drop_every
                                .is_some_and(|d| hub.delivered.is_multiple_of(d))
                            {
                                continue;
                            }
                            let mut frames = vec![out.clone()];
                            frames.extend(copy.clone());
                            match hub.stalled.as_mut() {
                                Some(held) => {
                                    held.extend(frames.into_iter().map(|f| (m.clone(), f)))
                                }
                                None => frames.into_iter().for_each(|f| {
                                    let _ = m.send(f);
                                }),
                            }
                        }
                        hub.stored += 1;
                        let k2 = hub.users.iter().find(|(_, u)| *u == "k2").map(|(c, _)| *c);
                        if let Some((k, reason)) = opts.policy_close_after {
                            if hub.stored >= k && !hub.policy_closed {
                                hub.policy_closed = true;
                                if let Some(c) = k2.and_then(|c| hub.conns.get(&c)) {
                                    let _ = c.send(Message::Close(Some(CloseFrame {
                                        code: CloseCode::from(1008),
                                        reason: reason.into(),
                                    })));
                                }
                            }
                        }
                        let left_after = opts.left_after.filter(|l| hub.stored >= l.0);
                        if let (Some((_, send_left, send_error)), false) =
                            (left_after, hub.left_done)
                        {
                            hub.left_done = true;
                            if let Some(c) = k2 {
                                let mut left = Vec::new();
                                for (name, room) in hub.rooms.iter_mut() {
                                    if room.members.remove(&c).is_some() {
                                        left.push(name.clone());
                                    }
                                }
                                if let Some(conn) = hub.conns.get(&c) {
                                    for room in left.into_iter().filter(|_| send_left) {
                                        let _ = conn.send(frame(&ServerFrame::Left {
                                            room,
                                            reference: None,
                                        }));
                                    }
                                    if send_error {
                                        let _ = conn.send(frame(&ServerFrame::Error {
                                            code: wschat_protocol::ErrorCode::Unavailable,
                                            message: "the store is unavailable".into(),
                                            reference: Some(Ref::Str("join".into())),
                                        }));
                                    }
                                }
                            }
                        }
                        if opts.kick_after.is_some_and(|k| hub.stored >= k) && !hub.kicked {
                            hub.kicked = true;
                            hub.kicked_at = Some(std::time::Instant::now());
                            for c in hub.conns.values() {
                                let _ = c.send(Message::Close(Some(CloseFrame {
                                    code: CloseCode::from(1012),
                                    reason: "restart".into(),
                                })));
                            }
                        }
                    }
                    _ => {}
                }
            }
            let mut hub = hub.lock().unwrap();
            hub.conns.remove(&id);
            for r in hub.rooms.values_mut() {
                r.members.remove(&id);
            }
        }
    })
    .await
}

/// What the Socket.IO fake saw.
#[derive(Default)]
pub struct SocketIoSeen {
    /// Sessions opened on `/socket.io/?EIO=4&transport=websocket&…session_key=…`.
    pub good_paths: AtomicU64,
    /// Engine.IO pongs (`3`) received.
    pub pongs: AtomicU64,
}

/// A Socket.IO 4 chat room as `bench/peers/socketio` is, on the wire: Engine.IO open
/// (`0{…}`, pinging every 100 ms), namespace connect (`40` → `40{"sid"}`), each event
/// `42["message",{"message":TEXT}]` broadcast to every connected client as
/// `42["message",{"time","user","message"}]`, every n-th delivery dropped with
/// `drop_every = Some(n)`. A client that leaves a ping unanswered for a second is cut
/// off, as Socket.IO's `pingTimeout` does.
pub async fn socketio_fake(drop_every: Option<u64>) -> (SocketAddr, Arc<SocketIoSeen>) {
    let seen = Arc::new(SocketIoSeen::default());
    let clients: Arc<Mutex<HashMap<u64, Tx>>> = Arc::default();
    let deliveries = Arc::new(AtomicU64::new(0));
    let seen_out = Arc::clone(&seen);
    let addr = serve(move |id, target, ws| {
        let (seen, clients, deliveries) = (
            Arc::clone(&seen),
            Arc::clone(&clients),
            Arc::clone(&deliveries),
        );
        async move {
            let (path, query) = target.split_once('?').unwrap_or((&target, ""));
            if path == "/socket.io/"
                && query.contains("EIO=4")
                && query.contains("transport=websocket")
                && query.contains("session_key=")
            {
                seen.good_paths.fetch_add(1, Ordering::Relaxed);
            }
            let (tx, mut stream) = writer(ws);
            let _ = tx.send(Message::text(
                r#"0{"sid":"e","upgrades":[],"pingInterval":100,"pingTimeout":1000,"maxPayload":1000000}"#,
            ));
            let pinger = {
                let tx = tx.clone();
                tokio::spawn(async move {
                    loop {
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        if tx.send(Message::text("2")).is_err() {
                            break;
                        }
                    }
                })
            };
            let mut last_pong = tokio::time::Instant::now();
            loop {
                let next = tokio::time::timeout_at(
                    last_pong + std::time::Duration::from_secs(1),
                    stream.next(),
                );
                let Ok(Some(Ok(msg))) = next.await else { break };
                let Message::Text(t) = msg else { continue };
                let t = t.as_str();
                if t == "3" {
                    last_pong = tokio::time::Instant::now();
                    seen.pongs.fetch_add(1, Ordering::Relaxed);
                } else if t == "40" {
                    let _ = tx.send(Message::text(r#"40{"sid":"s"}"#));
                    clients.lock().unwrap().insert(id, tx.clone());
                } else if let Some(body) = t
                    .strip_prefix(r#"42["message","#)
                    .and_then(|b| b.strip_suffix(']'))
                {
                    let Ok(legacy::LegacyInbound::Say(text)) = legacy::decode_inbound(body) else {
                        continue;
                    };
                    let out = format!(
                        r#"42["message",{}]"#,
                        legacy::encode_message(TIME, "fake", &text)
                    );
                    broadcast(&clients, &deliveries, drop_every, &out);
                }
            }
            pinger.abort();
            clients.lock().unwrap().remove(&id);
        }
    })
    .await;
    (addr, seen_out)
}
