//! The load client against fake servers whose losses are known in advance.

// Test helpers outside #[test] functions may unwrap too.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{legacy_fake, socketio_fake, v1_fake, V1Fake};
use wschat_load::{run, DrainEnd, LoadArgs, Report};

async fn load(args: &[&str]) -> Report {
    let args = LoadArgs::parse_from(args.iter().copied()).unwrap();
    run(args).await.unwrap()
}

/// The load client against a fresh v1 fake with `opts`, with `args` after its URL.
async fn v1_run(opts: V1Fake, args: &[&str]) -> Report {
    let addr = v1_fake(opts).await;
    let url = format!("ws://{addr}/ws");
    let mut all = vec![url.as_str()];
    all.extend_from_slice(args);
    load(&all).await
}

/// Three v1 connections with keys k1, k2 and k3 in one room, 20 messages a second each
/// for `duration` seconds (then a drain of up to `drain`), against a v1 fake with `opts`.
async fn three_members(opts: V1Fake, duration: &str, drain: &str, extra: &[&str]) -> Report {
    let duration = format!("--duration={duration}");
    let drain = format!("--drain={drain}");
    let mut args = vec![
        "--keys=k{i}",
        "--connections=3",
        "--interval=0.05",
        duration.as_str(),
        drain.as_str(),
        "--no-progress",
    ];
    args.extend_from_slice(extra);
    v1_run(opts, &args).await
}

fn assert_counts_add_up(r: &Report) {
    assert_eq!(r.lost, r.expected - r.delivered, "{r:#?}");
    assert_eq!(r.unsent, 0, "{r:#?}");
    assert!(r.sent > 0, "{r:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_everything_delivered_means_no_loss() {
    let addr = legacy_fake(None).await;
    let r = ten_connections(
        &format!("ws://{addr}/"),
        "--protocol=legacy",
        "--session-key=k",
    )
    .await;
    assert_counts_add_up(&r);
    assert_eq!(r.connected, 10);
    assert_eq!(r.connected_at_send_start, 10, "{r:#?}");
    // Every message goes to all 10 connections, the sender's own copy included.
    assert_eq!(r.expected, r.sent * 10, "{r:#?}");
    assert_eq!(r.lost, 0, "{r:#?}");
    assert_eq!(r.duplicated, 0);
    assert_eq!(r.out_of_order, 0);
    assert_eq!(r.latency_ms.count, r.delivered);
    assert!(r.acked.is_none());
    // No acks to tell what is still on its way: a quiet second ends the wait.
    assert_eq!(r.drain_end, DrainEnd::Quiet, "{r:#?}");
    assert_sends_lag_inside_the_latency(&r);
}

/// Every send's lag was recorded (no connection failed here), and a message is written
/// before it arrives anywhere. With nothing lost, every message reaches the same number
/// of receivers, so each quantile of the lags is at most that of the latencies.
fn assert_sends_lag_inside_the_latency(r: &Report) {
    assert_eq!(r.send_lag_ms.count, r.sent, "{r:#?}");
    assert_eq!(r.lost, 0);
    let (lag, latency) = (&r.send_lag_ms, &r.latency_ms);
    assert!(lag.p50 <= latency.p50, "{r:#?}");
    assert!(lag.p99 <= latency.p99, "{r:#?}");
    assert!(lag.max <= latency.max, "{r:#?}");
}

/// 10 connections of `protocol` with `keys`, 20 messages a second each for 1.5 s.
async fn ten_connections(url: &str, protocol: &str, keys: &str) -> Report {
    load(&[
        url,
        protocol,
        keys,
        "--connections=10",
        "--interval=0.05",
        "--duration=1.5",
        "--drain=5",
        "--no-progress",
    ])
    .await
}

/// 10 connections against a fake that drops every tenth delivery: the client must report
/// about 10 % lost.
async fn about_ten_percent_lost(url: &str, protocol: &str, keys: &str) {
    let r = ten_connections(url, protocol, keys).await;
    assert_counts_add_up(&r);
    assert!(r.expected > 1000, "{r:#?}");
    assert!(
        (0.07..=0.13).contains(&r.loss_ratio),
        "loss {} of {r:#?}",
        r.loss_ratio
    );
    assert_eq!(r.duplicated, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_dropping_every_tenth_delivery_is_ten_percent_loss() {
    let addr = legacy_fake(Some(10)).await;
    about_ten_percent_lost(
        &format!("ws://{addr}/chat"),
        "--protocol=legacy",
        "--session-key=k",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_rooms_are_inferred_with_per_connection_keys() {
    let addr = legacy_fake(None).await;
    let url = format!("ws://{addr}/");
    let r = load(&[
        &url,
        "--protocol=legacy",
        "--keys=k{i}",
        "--connections=6",
        "--send-only=2",
        "--interval=0.05",
        "--duration=1",
        "--drain=5",
        "--no-progress",
    ])
    .await;
    assert_counts_add_up(&r);
    // The 4 receivers hear every message (the fake has one room), the 2 send-only
    // connections count for nothing.
    assert_eq!(r.expected, r.sent * 4, "{r:#?}");
    assert_eq!(r.lost, 0, "{r:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socketio_everything_delivered_means_no_loss_and_pings_are_answered() {
    let (addr, seen) = socketio_fake(None).await;
    let r = ten_connections(
        &format!("ws://{addr}/"),
        "--protocol=socketio",
        "--session-key=k",
    )
    .await;
    assert_counts_add_up(&r);
    assert_eq!(r.connected, 10, "{r:#?}");
    assert_eq!(r.expected, r.sent * 10, "{r:#?}");
    assert_eq!(r.lost, 0, "{r:#?}");
    assert_eq!(
        (r.duplicated, r.out_of_order, r.disconnects),
        (0, 0, 0),
        "{r:#?}"
    );
    assert_eq!(r.latency_ms.count, r.delivered);
    assert_eq!(r.protocol, "socketio");
    use std::sync::atomic::Ordering::Relaxed;
    assert_eq!(
        seen.good_paths.load(Relaxed),
        10,
        "the Engine.IO path and query"
    );
    // Pinged every 100 ms for about 2 s: every connection answers (a silent one is cut
    // off after a second, which would show as disconnects above).
    assert!(
        seen.pongs.load(Relaxed) >= 10 * 5,
        "{}",
        seen.pongs.load(Relaxed)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socketio_dropping_every_tenth_delivery_is_ten_percent_loss() {
    let (addr, _) = socketio_fake(Some(10)).await;
    // No path: the client adds /socket.io/.
    about_ten_percent_lost(
        &format!("ws://{addr}"),
        "--protocol=socketio",
        "--keys=k{i}",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1_everything_acked_and_delivered() {
    let r = v1_run(
        V1Fake::default(),
        &[
            "--session-key=k",
            "--connections=12",
            "--rooms=3",
            "--interval=0.05",
            "--duration=1.5",
            "--drain=5",
            "--no-progress",
        ],
    )
    .await;
    assert_counts_add_up(&r);
    assert_eq!(r.connected, 12);
    assert_eq!(r.acked, Some(r.sent), "{r:#?}");
    assert_eq!(r.unacked, Some(0));
    // Each message goes to the 4 members of its room.
    assert_eq!(r.expected, r.sent * 4, "{r:#?}");
    assert_eq!(r.lost, 0, "{r:#?}");
    assert_eq!(r.duplicated, 0);
    assert_eq!(r.out_of_order, 0);
    let ack = r.ack_latency_ms.as_ref().unwrap();
    assert_eq!(ack.count, r.sent);
    assert_eq!(r.drain_end, DrainEnd::AllHeard, "{r:#?}");
    assert_sends_lag_inside_the_latency(&r);
}

/// 10 connections in one room, 20 messages a second each for `duration`, against a fake
/// whose fan-out stalls for `stall_ms` from its 20th message on (acks go on).
async fn stalled_run(stall_ms: u64, duration: &str, drain: &str) -> Report {
    let r = v1_run(
        V1Fake {
            stall_after: Some((20, stall_ms)),
            ..V1Fake::default()
        },
        &[
            "--session-key=k",
            "--connections=10",
            "--interval=0.05",
            duration,
            drain,
            "--no-progress",
        ],
    )
    .await;
    assert_counts_add_up(&r);
    assert_eq!(r.acked, Some(r.sent), "{r:#?}");
    r
}

/// A 3-s stall, past the end of the send phase and past a quiet second: every member is
/// behind the newest ack, so the drain waits for the held deliveries instead of counting
/// them lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1_a_stalled_fan_out_is_waited_for_not_lost() {
    let r = stalled_run(3_000, "--duration=1.5", "--drain=10").await;
    // The stall outlasted the send phase by more than a quiet second.
    assert!(r.last_delivery_after_send_s > 1.2, "{r:#?}");
    assert_eq!(r.expected, r.sent * 10, "{r:#?}");
    assert_eq!(r.lost, 0, "{r:#?}");
    assert_eq!(r.drain_end, DrainEnd::AllHeard, "{r:#?}");
}

/// A stall longer than the run: the newest acked messages never reach anyone, so the
/// drain waits to its limit, and what was held counts as lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1_acked_messages_that_never_come_hold_the_drain_to_its_limit() {
    let r = stalled_run(600_000, "--duration=1", "--drain=1.5").await;
    assert_eq!(r.drain_end, DrainEnd::Limit, "{r:#?}");
    // The first 20 came to every member; nothing after them did.
    assert_eq!(r.delivered, 20 * 10, "{r:#?}");
    assert_eq!(r.lost, (r.sent - 20) * 10, "{r:#?}");
}

/// A member whose first join comes only after the sending began (refused until then) is
/// still expected every message of the run, as the others are: it joins from the room's
/// head as the others first joined it, and gets what was sent before it came.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1_a_member_joining_late_is_expected_every_message_of_the_run() {
    let r = three_members(
        V1Fake {
            late_joiner: Some(("k2", 10)),
            ..V1Fake::default()
        },
        "1.5",
        "5",
        &[],
    )
    .await;
    assert_counts_add_up(&r);
    assert_eq!(r.connected, 3, "{r:#?}");
    assert!(r.sent > 10, "{r:#?}");
    assert_eq!(r.expected, r.sent * 3, "{r:#?}");
    assert_eq!(r.lost, 0, "{r:#?}");
}

/// A room none of whose members could join on their first attempt: the one that joins
/// last still expects what the first sent before it came (the room's base is then the
/// seq before the first of ours known there).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1_a_room_whose_members_all_join_late_expects_every_message_of_the_run() {
    // Two rooms: k1 and k3 in the first, k2 and k4 in the second, both late.
    let r = v1_run(
        V1Fake {
            late_joiner: Some(("k2", 10)),
            later_joiner: Some(("k4", 40)),
            ..V1Fake::default()
        },
        &[
            "--keys=k{i}",
            "--connections=4",
            "--rooms=2",
            "--interval=0.05",
            "--duration=2",
            "--drain=5",
            "--no-progress",
        ],
    )
    .await;
    assert_counts_add_up(&r);
    assert_eq!(r.connected, 4, "{r:#?}");
    assert!(r.sent > 40, "{r:#?}");
    assert_eq!(r.expected, r.sent * 2, "{r:#?}");
    assert_eq!(r.lost, 0, "{r:#?}");
}

/// A join answered `unavailable` (the server's store away for a moment) is not a refusal:
/// the connection reconnects and joins again, and its room counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1_a_join_answered_unavailable_is_tried_again() {
    let r = v1_run(
        V1Fake {
            refuse_joins: Some(3),
            ..V1Fake::default()
        },
        &[
            "--session-key=k",
            "--connections=6",
            "--interval=0.05",
            "--duration=1.5",
            "--drain=5",
            "--no-progress",
        ],
    )
    .await;
    assert_counts_add_up(&r);
    // The three refused joins reconnected.
    assert_eq!(r.disconnects, 3, "{r:#?}");
    // Each of the six is a member of the room, for every message (a refused room would
    // expect nothing, as before the fix: expected = sent × 3); one that joined only after
    // the sending began joins from the run's base
    // (`v1_a_member_joining_late_is_expected_every_message_of_the_run`).
    assert_eq!(r.expected, r.sent * 6, "{r:#?}");
    assert_eq!(r.lost, 0, "{r:#?}");
}

/// 10 v1 connections in 2 rooms against a v1 fake with `opts`, 20 messages a second each
/// for 1.5 s; the counts add up and every send was acked.
async fn ten_in_two_rooms(opts: V1Fake) -> Report {
    let r = v1_run(
        opts,
        &[
            "--session-key=k",
            "--connections=10",
            "--rooms=2",
            "--interval=0.05",
            "--duration=1.5",
            "--drain=3",
            "--no-progress",
        ],
    )
    .await;
    assert_counts_add_up(&r);
    assert_eq!(r.acked, Some(r.sent));
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1_dropped_deliveries_are_lost() {
    let r = ten_in_two_rooms(V1Fake {
        drop_every: Some(10),
        ..V1Fake::default()
    })
    .await;
    assert!((0.07..=0.13).contains(&r.loss_ratio), "{r:#?}");
    assert_eq!(r.duplicated, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1_a_message_stored_twice_is_a_duplicate_not_two_deliveries() {
    let r = ten_in_two_rooms(V1Fake {
        store_twice_every: Some(10),
        ..V1Fake::default()
    })
    .await;
    assert_eq!(r.lost, 0, "{r:#?}");
    // Each room's every 10th message (by the fake's count over both rooms, so about a
    // tenth of all) came twice to each of the room's 5 members.
    let copies = r.sent / 10;
    assert!(
        r.duplicated >= (copies - 2) * 5 && r.duplicated <= (copies + 2) * 5,
        "{copies} copies: {r:#?}"
    );
    assert_eq!(r.delivered, r.expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1_resume_after_restart_loses_nothing() {
    let r = v1_run(
        V1Fake {
            kick_after: Some(60),
            ..V1Fake::default()
        },
        &[
            "--session-key=k",
            "--connections=10",
            "--rooms=2",
            "--interval=0.05",
            "--duration=2",
            "--drain=5",
            "--no-progress",
        ],
    )
    .await;
    assert_counts_add_up(&r);
    assert_eq!(r.close_codes.get(&1012), Some(&10), "{r:#?}");
    assert_eq!(r.disconnects, 10);
    assert_eq!(r.connected_at_end, 10);
    assert_eq!(r.acked, Some(r.sent), "{r:#?}");
    assert_eq!(r.expected, r.sent * 5, "{r:#?}");
    assert_eq!(r.lost, 0, "{r:#?}");
    assert_eq!(r.duplicated, 0, "{r:#?}");
    assert_eq!(r.ack_conflicts, Some(0));
    // Each connection resumed once, and none was still away at the end.
    assert_eq!(r.resume_ms.as_ref().map(|m| m.count), Some(10), "{r:#?}");
    assert_eq!(r.away_at_end, Some(0), "{r:#?}");
}

/// Receivers kept away after a restart for longer than a second (their
/// joins refused for 2.5 s; the sender's are not) are waited for: they come back, resume
/// what they missed, and nothing counts as lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1_the_drain_waits_for_connections_still_away() {
    let r = v1_run(
        V1Fake {
            kick_after: Some(20),
            slow_resume_ms: Some(2500),
            ..V1Fake::default()
        },
        &[
            "--keys=k{i}",
            "--connections=5",
            "--send-only=1",
            "--receive-only",
            "--interval=0.05",
            "--duration=2",
            "--drain=10",
            "--no-progress",
        ],
    )
    .await;
    assert_counts_add_up(&r);
    assert_eq!(r.close_codes.get(&1012), Some(&5), "{r:#?}");
    assert_eq!(r.connected_at_end, 5, "{r:#?}");
    // The four receivers each expect every message (the sender only sends).
    assert_eq!(r.expected, r.sent * 4, "{r:#?}");
    assert_eq!(r.lost, 0, "{r:#?}");
    // They were away long enough to matter: their joins were refused after the kick.
    assert!(
        r.errors.get("unavailable").is_some_and(|&n| n > 4),
        "{r:#?}"
    );
    // Five resumes, the last of them after the 2.5 s the fake refused joins.
    let resume = r.resume_ms.as_ref().expect("v1 reports resumes");
    assert_eq!(resume.count, 5, "{r:#?}");
    assert!(resume.max >= 2500.0, "{r:#?}");
    assert_eq!(r.away_at_end, Some(0), "{r:#?}");
}

/// A send answered `unavailable` goes again, with the same `client_msg_id`, until it is
/// stored, however often that takes (six refusals each here): not given up as refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1_sends_answered_unavailable_go_again_until_stored() {
    let r = v1_run(
        V1Fake {
            refuse_each_send: Some(6),
            ..V1Fake::default()
        },
        &[
            "--session-key=k",
            "--connections=2",
            "--interval=0.5",
            "--duration=1",
            "--drain=10",
            // A fixed schedule: a random one is empty about once in 55 runs (CI saw it).
            "--seed=1",
            "--no-progress",
        ],
    )
    .await;
    assert_counts_add_up(&r);
    assert!(r.sent > 0, "{r:#?}");
    assert_eq!(r.errors.get("unavailable"), Some(&(r.sent * 6)), "{r:#?}");
    assert_eq!(r.refused, Some(0), "{r:#?}");
    assert_eq!(r.acked, Some(r.sent), "{r:#?}");
    assert_eq!(r.lost, 0, "{r:#?}");
    assert_eq!(r.failure(), None);
}

/// A member closed for good (1008: it gives up) is still expected to receive every
/// message of its room: what came after its close is lost, and the run fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1_a_member_that_gives_up_is_still_expected_to_receive() {
    let r = three_members(
        V1Fake {
            policy_close_after: Some((10, "policy")),
            ..V1Fake::default()
        },
        "1.5",
        "3",
        &[],
    )
    .await;
    // k2's schedule after its close is unsent.
    assert_eq!(r.lost, r.expected - r.delivered, "{r:#?}");
    assert_eq!(r.gave_up, 1, "{r:#?}");
    assert_eq!(r.close_codes.get(&1008), Some(&1), "{r:#?}");
    // Every message of the run is expected of all three, k2 included (one k2 sent as
    // it was closed may be stored unacked, and is a message of the run too).
    let stored = r.acked.unwrap();
    assert!(
        r.expected.is_multiple_of(3) && r.expected >= stored * 3,
        "{r:#?}"
    );
    assert!(r.lost > 0 && r.lost < r.expected / 3, "{r:#?}");
    assert!(
        r.failure()
            .is_some_and(|f| f.contains("1 connections gave up")),
        "{:?}",
        r.failure()
    );
}

/// A 1008 close for the rate limit is not a revoked session: the connection reconnects
/// after a backoff and resumes, and nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1_a_rate_limit_close_is_a_reconnect_not_giving_up() {
    let r = three_members(
        V1Fake {
            policy_close_after: Some((10, wschat_protocol::close::RATE_LIMIT_REASON)),
            ..V1Fake::default()
        },
        "1.5",
        "5",
        &[],
    )
    .await;
    assert_counts_add_up(&r);
    assert_eq!(r.close_codes.get(&1008), Some(&1), "{r:#?}");
    assert_eq!(r.gave_up, 0, "{r:#?}");
    assert_eq!(r.disconnects, 1, "{r:#?}");
    assert_eq!(r.expected, r.sent * 3, "{r:#?}");
    assert_eq!(r.lost, 0, "{r:#?}");
}

/// `unavailable` in answer to `auth` (the sessions could not be checked for a moment):
/// the connection tries again instead of waiting to be closed with 4002 and giving up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1_an_auth_answered_unavailable_is_tried_again() {
    let r = three_members(
        V1Fake {
            auth_unavailable: Some(2),
            ..V1Fake::default()
        },
        "1.5",
        "5",
        &[],
    )
    .await;
    assert_counts_add_up(&r);
    assert_eq!(r.gave_up, 0, "{r:#?}");
    assert_eq!(r.connected, 3, "{r:#?}");
    assert_eq!(r.failed_connects, 2, "{r:#?}");
    assert_eq!(
        r.connect_errors.get("auth answered unavailable"),
        Some(&2),
        "{r:#?}"
    );
    assert_eq!(r.expected, r.sent * 3, "{r:#?}");
    assert_eq!(r.lost, 0, "{r:#?}");
}

/// Told `rate_limited`, a connection holds everything for a second: its new messages
/// and its retries alike. Sending on meanwhile only earns more refusals, and enough of
/// them close the connection (1008).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1_rate_limited_connections_hold_their_sends() {
    let r = three_members(
        V1Fake {
            rate_limited_after: Some(10),
            ..V1Fake::default()
        },
        "2",
        "5",
        &[],
    )
    .await;
    assert_counts_add_up(&r);
    let refused = r.errors.get("rate_limited").copied().unwrap_or(0);
    // At 20 messages a second each, sending on through the limited second would be
    // about 60 refusals; holding, a connection is refused what it sent before its first
    // refusal came back.
    assert!((1..=15).contains(&refused), "{refused} refusals: {r:#?}");
    assert_eq!(r.unacked, Some(0), "{r:#?}");
    assert_eq!(r.lost, 0, "{r:#?}");
}

/// A session refused right after `hello` again and again (a join whose backfill keeps
/// failing) backs off more each time: no reconnect every few tens of milliseconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1_a_join_that_keeps_failing_backs_off_more_each_time() {
    let r = three_members(
        V1Fake {
            k2_backfill_always_fails: true,
            ..V1Fake::default()
        },
        "2",
        "1",
        &[],
    )
    .await;
    // (What k2 sends in the moments between `joined` and `left` is sent; the rest of its
    // schedule is not: either way the counts add up.)
    assert_eq!(r.lost, r.expected - r.delivered, "{r:#?}");
    assert!(r.sent > 0, "{r:#?}");
    // About 3 s: the backoff doubles from 25–50 ms, so under ten tries; at the first
    // backoff's pace, about a hundred.
    assert!(
        (3..=15).contains(&r.disconnects),
        "{} disconnects: {r:#?}",
        r.disconnects
    );
    assert!(r.lost > 0, "k2 never got its room: {r:#?}");
}

/// A join never answered in time is a failed connect, tried again; not also a
/// disconnect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1_a_join_timeout_is_one_failed_connect() {
    let r = three_members(
        V1Fake {
            ignore_first_join_of_k2: true,
            ..V1Fake::default()
        },
        "1.5",
        "5",
        &["--connect-timeout=0.5"],
    )
    .await;
    assert_counts_add_up(&r);
    assert_eq!(r.connect_errors.get("join timeout"), Some(&1), "{r:#?}");
    assert_eq!(r.failed_connects, 1, "{r:#?}");
    assert_eq!(r.disconnects, 0, "{r:#?}");
    assert_eq!(r.connected, 3, "{r:#?}");
    assert_eq!(r.lost, 0, "{r:#?}");
}

/// A member the server lets go of (wschat sends `left`, then `unavailable` for the join,
/// when a join's backfill read fails after `joined`) resumes on a new connection instead
/// of staying open without its room: on either frame alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1_a_member_let_go_of_resumes_its_room() {
    for (left, error) in [(true, false), (false, true)] {
        let r = three_members(
            V1Fake {
                left_after: Some((10, left, error)),
                ..V1Fake::default()
            },
            "1.5",
            "5",
            &[],
        )
        .await;
        assert_counts_add_up(&r);
        assert_eq!(r.disconnects, 1, "left {left}, error {error}: {r:#?}");
        assert!(r.sent > 20, "{r:#?}");
        assert_eq!(r.expected, r.sent * 3, "{r:#?}");
        assert_eq!(r.lost, 0, "left {left}, error {error}: {r:#?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1_a_silent_server_is_dropped_and_resumed_without_loss() {
    let r = v1_run(
        V1Fake {
            hang_after: Some(60),
            ..V1Fake::default()
        },
        &[
            "--session-key=k",
            "--connections=10",
            "--rooms=2",
            "--interval=0.05",
            "--duration=3",
            "--silence-timeout=0.5",
            "--drain=5",
            "--no-progress",
        ],
    )
    .await;
    assert_counts_add_up(&r);
    // Every connection open when the server went silent was dropped, once.
    assert_eq!(r.silent_drops, 10, "{r:#?}");
    assert_eq!(r.disconnects, 10, "{r:#?}");
    assert_eq!(r.connected_at_end, 10, "{r:#?}");
    assert_eq!(r.acked, Some(r.sent), "{r:#?}");
    assert_eq!(r.lost, 0, "{r:#?}");
    assert_eq!(r.duplicated, 0, "{r:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1_churn_resumes_without_loss() {
    let r = v1_run(
        V1Fake::default(),
        &[
            "--session-key=k",
            "--connections=10",
            "--interval=0.05",
            "--duration=2",
            "--churn=0.5",
            "--drain=5",
            "--no-progress",
            "--json",
        ],
    )
    .await;
    assert_counts_add_up(&r);
    assert!(r.churned > 0, "{r:#?}");
    assert_eq!(r.lost, 0, "{r:#?}");
    assert_eq!(r.duplicated, 0, "{r:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_connections_are_counted() {
    // Nothing listens on this port (bound, then dropped).
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let url = format!("ws://127.0.0.1:{port}/ws");
    let r = load(&[
        &url,
        "--session-key=k",
        "--connections=3",
        "--duration=0.3",
        "--drain=0.3",
        "--no-progress",
    ])
    .await;
    assert_eq!(r.connected, 0);
    assert_eq!(r.connected_at_send_start, 0);
    assert!(r.failed_connects >= 3, "{r:#?}");
    assert_eq!(r.sent, 0);
    assert!(r.unsent > 0 || r.scheduled == 0);
}

#[test]
fn json_report_has_the_promised_fields() {
    let v = serde_json::to_value(Report::default()).unwrap();
    for f in [
        "connected",
        "sent",
        "delivered",
        "lost",
        "duplicated",
        "out_of_order",
    ] {
        assert!(v.get(f).is_some(), "{f}");
    }
    for p in ["p50", "p90", "p99", "p999", "max"] {
        assert!(v["latency_ms"].get(p).is_some(), "{p}");
        assert!(v["send_lag_ms"].get(p).is_some(), "{p}");
    }
}

#[test]
fn args_parse_like_the_spec() {
    let a = LoadArgs::parse_from([
        "ws://a/ws,ws://b/ws",
        "--protocol",
        "legacy",
        "--connections",
        "5",
        "--keys",
        "k{i}",
        "--interval",
        "0.25",
        "--rooms",
        "lobby,dev",
        "--send-only",
        "2",
        "--print-sent",
    ])
    .unwrap();
    assert_eq!(a.connections, 5);
    assert_eq!(a.keys.as_deref(), Some("k{i}"));
    assert!(a.print_sent);
    assert!(
        LoadArgs::parse_from(["ws://a/"]).is_err(),
        "a key is required"
    );
    assert!(LoadArgs::parse_from(["ws://a/", "--session-key=a", "--keys=b"]).is_err());
}

/// Times and rates that the run's arithmetic cannot hold are refused up front, naming
/// the option, instead of panicking in every connection task.
#[tokio::test]
async fn absurd_times_and_rates_are_refused_by_name() {
    for (arg, name) in [
        ("--duration=1e20", "--duration"),
        ("--interval=1e300", "--interval"),
        ("--interval=1e-12", "--interval"),
        ("--drain=-1", "--drain"),
        ("--ramp=1e-30", "--ramp"),
        ("--ramp=NaN", "--ramp"),
        ("--churn=1e-30", "--churn"),
        ("--churn=2000", "--churn"),
    ] {
        let args = LoadArgs::parse_from(["ws://127.0.0.1:9/", "--session-key=k", arg]).unwrap();
        let e = run(args).await.expect_err(arg).to_string();
        assert!(e.contains(name), "{arg}: {e}");
    }
}
