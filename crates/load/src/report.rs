//! The end-of-run report: what `run` returns, prints for a person, and prints as one JSON
//! line with `--json`.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct LatencyMs {
    /// Samples recorded.
    pub count: u64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub mean: f64,
    /// Samples over the histogram's bound (one hour), counted in it as one hour: `max` and
    /// the percentiles they reach are then lower bounds.
    pub over_max: u64,
}

impl LatencyMs {
    /// The figures of `h`, whose samples include `over_max` recorded at its bound.
    pub(crate) fn from_histogram(h: &Histogram<u64>, over_max: u64) -> Self {
        if h.is_empty() {
            return Self::default();
        }
        let ms = |us: u64| us as f64 / 1000.0;
        Self {
            count: h.len(),
            p50: ms(h.value_at_quantile(0.50)),
            p90: ms(h.value_at_quantile(0.90)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
            mean: h.mean() / 1000.0,
            over_max,
        }
    }

    /// What the text report adds when samples were over the bound.
    fn over_max_note(&self) -> String {
        if self.over_max == 0 {
            return String::new();
        }
        format!(
            "; {} over one hour, counted as one hour (max and the percentiles they reach are lower bounds)",
            self.over_max
        )
    }
}

/// Why the wait after the send phase ended.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum DrainEnd {
    /// v1: nothing left to send or acknowledge, no connection away, and every member had
    /// heard its room through the newest acknowledged message.
    AllHeard,
    /// Nothing left to send or acknowledge, no v1 connection away, and no delivery for a
    /// second (legacy, which has no acks to know what is still on its way; or v1 when a
    /// member is in a room the run does not know).
    Quiet,
    /// `--drain` was over first: something was still missing or on its way.
    #[default]
    Limit,
}

impl DrainEnd {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::AllHeard => "all heard",
            Self::Quiet => "a quiet second",
            Self::Limit => "the --drain limit",
        }
    }
}

/// Everything a run measured. Counts of deliveries are (message, receiving connection)
/// pairs; see the crate documentation for what is expected of whom.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    /// Identifies this run's messages (`L|<run_id>|…`).
    pub run_id: String,
    /// `v1` or `legacy`.
    pub protocol: String,
    pub urls: Vec<String>,
    /// Connections asked for.
    pub connections: u64,
    /// Connections that were up (authenticated) at least once.
    pub connected: u64,
    /// Connections up when the connect phase ended (every connection's first attempt
    /// over): what `connect_s` connected (`connected` also counts later retries).
    pub connected_at_send_start: u64,
    /// Connections up when the run stopped.
    pub connected_at_end: u64,
    /// Connection attempts that failed (refused, timed out, bad key, closed before auth).
    pub failed_connects: u64,
    /// Connections lost after they were up, not by our choice.
    pub disconnects: u64,
    /// Connections closed on purpose by `--churn`.
    pub churned: u64,
    /// Connections dropped because the server sent nothing for `--silence-timeout`
    /// (also counted in `disconnects`).
    pub silent_drops: u64,
    /// Connections that stopped trying (bad key, policy close).
    pub gave_up: u64,
    /// Close codes received from servers, by code.
    pub close_codes: BTreeMap<u16, u64>,
    /// Why connection attempts failed, by reason (at most 20 reasons).
    pub connect_errors: BTreeMap<String, u64>,

    /// Messages in the fixed send schedules.
    pub scheduled: u64,
    /// Messages sent (each counted once, however often retried).
    pub sent: u64,
    /// Scheduled messages never sent (their connection was down until the end).
    pub unsent: u64,
    /// v1: sends repeated with the same `client_msg_id` after a reconnect or an error.
    pub resent: u64,
    /// v1: messages acknowledged (`null` in legacy).
    pub acked: Option<u64>,
    /// v1: messages sent and never acknowledged nor refused.
    pub unacked: Option<u64>,
    /// v1: messages the server finally refused (error frames), never stored.
    pub refused: Option<u64>,
    /// v1: acks for one message with two different seqs (stored twice).
    pub ack_conflicts: Option<u64>,
    /// v1: rooms a connection's first join was refused for good (it was expected to
    /// receive nothing there).
    pub refused_joins: Option<u64>,
    /// Error frames received, by code.
    pub errors: BTreeMap<String, u64>,

    /// (message, receiver) pairs that should have been delivered.
    pub expected: u64,
    /// Expected pairs that were delivered (each once, whatever the copies).
    pub delivered: u64,
    /// `expected - delivered`.
    pub lost: u64,
    /// `lost / expected` (0 when nothing was expected).
    pub loss_ratio: f64,
    /// Extra copies of a pair (v1: any; legacy: within one connection).
    pub duplicated: u64,
    /// Legacy: copies received again after a reconnect (history replay).
    pub replayed: u64,
    /// Pairs delivered after a later one (v1: seq going back per room and receiver;
    /// legacy: a sender's counter going back per receiver connection).
    pub out_of_order: u64,
    /// Our messages received but not expected (legacy history from before a connection).
    pub unexpected: u64,
    /// v1: `reset` frames (a resume position older than the server keeps).
    pub resets: u64,
    /// v1: messages that arrived before their room's first `joined` (the server sent a
    /// room's messages before answering the join) past the `MAX_HELD` a room holds until
    /// then: not counted as received, so each of ours among them is also in `lost`.
    pub dropped_before_joined: u64,
    /// Frames that could not be decoded.
    pub bad_frames: u64,
    /// Connection tasks that did not report within 10 s of the end (blocked on a server
    /// that stopped reading, or failed): their connections are missing from every count
    /// above, so `lost` understates.
    pub lost_tasks: u64,

    /// Intended send time to first receipt.
    pub latency_ms: LatencyMs,
    /// v1: intended send time to ack.
    pub ack_latency_ms: Option<LatencyMs>,
    /// v1: from a connection's loss (after it had been up; churn closes too) to its
    /// rooms synced again on a later connection (each join's backfill received, through
    /// its `last_seq`): one sample per resume. After a mass disconnect, `max` is when the
    /// last connection was whole again.
    pub resume_ms: Option<LatencyMs>,
    /// v1: connections lost and not synced again when the run ended (no sample above).
    pub away_at_end: Option<u64>,
    /// Intended send time to the moment the client had written the message (each write
    /// that went through): the client's own lateness when it is busy, plus, for a message
    /// that fell due while its connection was down, the time until it was back. The
    /// latency above includes it.
    pub send_lag_ms: LatencyMs,

    /// Seconds spent connecting before the send phase.
    pub connect_s: f64,
    /// When the send phase began, in seconds since the Unix epoch (for a harness that
    /// measures the server over exactly that phase).
    pub send_start_unix_s: f64,
    /// Length of the send phase (`--duration`).
    pub duration_s: f64,
    /// Seconds spent waiting for in-flight deliveries after it.
    pub drain_s: f64,
    /// Why the wait ended (`drain_s`).
    pub drain_end: DrainEnd,
    /// Seconds from the end of the send phase to the last delivery (0 when none came
    /// after it): how far behind the server was when the sending stopped.
    pub last_delivery_after_send_s: f64,
    /// v1: the same for the last ack (a send-only run has acks and no deliveries).
    pub last_ack_after_send_s: Option<f64>,
    /// `sent / duration_s`.
    pub send_rate: f64,
    /// Deliveries per second over the send phase and the drain.
    pub delivery_rate: f64,
}

impl Report {
    /// What makes this run a failure (`wschat load` then exits with status 3), if
    /// anything: messages lost; v1 sends the server never answered (neither acked nor
    /// refused, after the retries and the drain: a server that drops sends silently loses
    /// messages that no receiver can count), or refused for good; connections that gave
    /// up (closed for good: what they could not receive is lost too); connection tasks
    /// whose figures are missing. Also what would leave loss uncounted: connections that
    /// never connected, or were away at the end, or were refused a room (expected
    /// nothing), and messages never sent (their connection down until the end).
    pub fn failure(&self) -> Option<String> {
        let mut why = Vec::new();
        if self.lost > 0 {
            why.push(format!("{} deliveries lost", self.lost));
        }
        let never = self.connections.saturating_sub(self.connected);
        if never > 0 {
            why.push(format!("{never} connections never connected"));
        }
        if self.unsent > 0 {
            why.push(format!("{} messages never sent", self.unsent));
        }
        if let Some(away) = self.away_at_end.filter(|&n| n > 0) {
            why.push(format!("{away} connections away at the end"));
        }
        if let Some(joins) = self.refused_joins.filter(|&n| n > 0) {
            why.push(format!("{joins} joins refused"));
        }
        if let Some(unacked) = self.unacked.filter(|&n| n > 0) {
            why.push(format!("{unacked} sends never answered"));
        }
        if let Some(refused) = self.refused.filter(|&n| n > 0) {
            why.push(format!("{refused} sends refused"));
        }
        if self.gave_up > 0 {
            why.push(format!("{} connections gave up", self.gave_up));
        }
        if self.lost_tasks > 0 {
            why.push(format!(
                "{} connection tasks did not report",
                self.lost_tasks
            ));
        }
        (!why.is_empty()).then(|| why.join(", "))
    }

    /// A few lines for a person.
    pub fn human(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "wschat load {} run {}: {} connections to {}",
            self.protocol,
            self.run_id,
            self.connections,
            self.urls.join(",")
        );
        let _ = writeln!(
            s,
            "  connections: connected {} (when sending began {}, at end {}), failed attempts {}, disconnects {} (silent server {}), churned {}, gave up {}",
            self.connected,
            self.connected_at_send_start,
            self.connected_at_end,
            self.failed_connects,
            self.disconnects,
            self.silent_drops,
            self.churned,
            self.gave_up
        );
        let mut sends = format!(
            "  sends: scheduled {}, sent {} ({:.0}/s), unsent {}",
            self.scheduled, self.sent, self.send_rate, self.unsent
        );
        if let (Some(acked), Some(unacked), Some(refused)) =
            (self.acked, self.unacked, self.refused)
        {
            let _ = write!(
                sends,
                ", acked {acked}, unacked {unacked}, refused {refused}, resent {}",
                self.resent
            );
        }
        let _ = writeln!(s, "{sends}");
        let _ = writeln!(
            s,
            "  deliveries: expected {}, delivered {} ({:.0}/s), lost {} ({:.3} %), duplicated {}, replayed {}, out of order {}, unexpected {}",
            self.expected,
            self.delivered,
            self.delivery_rate,
            self.lost,
            self.loss_ratio * 100.0,
            self.duplicated,
            self.replayed,
            self.out_of_order,
            self.unexpected
        );
        let l = &self.latency_ms;
        let _ = writeln!(
            s,
            "  latency ms: p50 {:.2}, p90 {:.2}, p99 {:.2}, p99.9 {:.2}, max {:.2} ({} samples{})",
            l.p50,
            l.p90,
            l.p99,
            l.p999,
            l.max,
            l.count,
            l.over_max_note()
        );
        if let Some(a) = &self.ack_latency_ms {
            let _ = writeln!(
                s,
                "  ack latency ms: p50 {:.2}, p90 {:.2}, p99 {:.2}, p99.9 {:.2}, max {:.2}{}",
                a.p50,
                a.p90,
                a.p99,
                a.p999,
                a.max,
                a.over_max_note()
            );
        }
        let unresumed = self.away_at_end.unwrap_or(0);
        if let Some(r) = self
            .resume_ms
            .as_ref()
            .filter(|r| r.count > 0 || unresumed > 0)
        {
            let _ = writeln!(
                s,
                "  resumes (loss → synced again): {}, ms p50 {:.2}, p99 {:.2}, max {:.2}{}; not resumed at the end: {}",
                r.count,
                r.p50,
                r.p99,
                r.max,
                r.over_max_note(),
                unresumed
            );
        }
        let g = &self.send_lag_ms;
        let _ = writeln!(
            s,
            "  send lag ms (intended → written: a busy client, or a connection down; inside the latency): p50 {:.2}, p99 {:.2}, max {:.2}{}",
            g.p50,
            g.p99,
            g.max,
            g.over_max_note()
        );
        let _ = writeln!(
            s,
            "  after the send phase: waited {:.2} s, until {}; last delivery {:.2} s after it",
            self.drain_s,
            self.drain_end.as_str(),
            self.last_delivery_after_send_s
        );
        if !self.close_codes.is_empty() {
            let _ = writeln!(s, "  close codes: {:?}", self.close_codes);
        }
        if !self.errors.is_empty() {
            let _ = writeln!(s, "  error frames: {:?}", self.errors);
        }
        if !self.connect_errors.is_empty() {
            let _ = writeln!(s, "  connect errors: {:?}", self.connect_errors);
        }
        if self.lost_tasks > 0 {
            let _ = writeln!(
                s,
                "  MISSING: {} connection tasks did not report; their figures are left out of every count",
                self.lost_tasks
            );
        }
        if self.resets + self.bad_frames + self.ack_conflicts.unwrap_or(0) > 0 {
            let _ = writeln!(
                s,
                "  resets {}, bad frames {}, ack conflicts {}",
                self.resets,
                self.bad_frames,
                self.ack_conflicts.unwrap_or(0)
            );
        }
        if self.dropped_before_joined > 0 {
            let _ = writeln!(
                s,
                "  {} messages came before their room's first joined, past the {} held: not counted as received (ours among them are in lost)",
                self.dropped_before_joined,
                crate::account::MAX_HELD
            );
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::{LatencyMs, Report};

    #[test]
    fn the_text_report_says_when_latencies_were_over_the_bound() {
        let mut h = crate::stats::new_histogram().expect("a histogram");
        h.saturating_record(crate::stats::HIST_MAX_US);
        let within = Report {
            latency_ms: LatencyMs::from_histogram(&h, 0),
            ..Report::default()
        };
        assert!(!within.human().contains("over one hour"));
        let over = Report {
            latency_ms: LatencyMs::from_histogram(&h, 1),
            ..Report::default()
        };
        assert_eq!(over.latency_ms.over_max, 1);
        assert!(
            over.human()
                .contains("1 over one hour, counted as one hour"),
            "{}",
            over.human()
        );
    }

    /// A run fails on lost deliveries, on v1 sends never answered (a server that drops
    /// sends silently: no receiver can count those as lost) or refused for good, on
    /// connections that gave up, and on missing figures.
    #[test]
    fn a_run_fails_on_loss_on_unanswered_or_refused_sends_on_give_ups_and_on_missing_figures() {
        let clean = Report {
            acked: Some(10),
            unacked: Some(0),
            ..Report::default()
        };
        assert_eq!(clean.failure(), None);
        assert_eq!(Report::default().failure(), None, "legacy: no acks to miss");
        let lost = Report {
            lost: 3,
            ..clean.clone()
        };
        assert_eq!(lost.failure().as_deref(), Some("3 deliveries lost"));
        let unanswered = Report {
            unacked: Some(2),
            ..clean.clone()
        };
        assert_eq!(
            unanswered.failure().as_deref(),
            Some("2 sends never answered")
        );
        let refused = Report {
            refused: Some(4),
            ..clean.clone()
        };
        assert_eq!(refused.failure().as_deref(), Some("4 sends refused"));
        let gave_up = Report {
            gave_up: 1,
            ..clean.clone()
        };
        assert_eq!(gave_up.failure().as_deref(), Some("1 connections gave up"));
        let missing = Report {
            lost_tasks: 1,
            lost: 1,
            ..clean
        };
        assert_eq!(
            missing.failure().as_deref(),
            Some("1 deliveries lost, 1 connection tasks did not report")
        );
    }

    /// What would leave loss uncounted fails a run too: nobody expects anything of a
    /// connection that never connected or of a room it was refused, a message never sent
    /// is nobody's loss, and a connection away at the end has not had its backfill.
    #[test]
    fn a_run_fails_when_loss_could_not_be_counted() {
        let clean = Report {
            connections: 4,
            connected: 4,
            acked: Some(10),
            unacked: Some(0),
            away_at_end: Some(0),
            refused_joins: Some(0),
            ..Report::default()
        };
        assert_eq!(clean.failure(), None);
        for (report, why) in [
            (
                Report {
                    connected: 0,
                    ..clean.clone()
                },
                "4 connections never connected",
            ),
            (
                Report {
                    unsent: 7,
                    ..clean.clone()
                },
                "7 messages never sent",
            ),
            (
                Report {
                    away_at_end: Some(2),
                    ..clean.clone()
                },
                "2 connections away at the end",
            ),
            (
                Report {
                    refused_joins: Some(1),
                    ..clean.clone()
                },
                "1 joins refused",
            ),
        ] {
            assert_eq!(report.failure().as_deref(), Some(why));
        }
    }
}
