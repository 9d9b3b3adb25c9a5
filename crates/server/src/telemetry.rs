//! Metrics: the one list of every metric wschat exports (name, type, labels, help), which
//! docs/operations.md follows and a test checks against the code; the Prometheus
//! recorder's set-up (histograms as real Prometheus histograms, with buckets fit for each);
//! and the gauge that counts a connection while it authenticates.

use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::hub::Protocol;

/// What kind of metric a name is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// One exported metric.
pub struct Metric {
    pub name: &'static str,
    pub kind: Kind,
    /// Its labels, e.g. `protocol`.
    pub labels: &'static [&'static str],
    pub help: &'static str,
}

const fn m(
    name: &'static str,
    kind: Kind,
    labels: &'static [&'static str],
    help: &'static str,
) -> Metric {
    Metric {
        name,
        kind,
        labels,
        help,
    }
}

/// Every metric, in the order docs/operations.md lists them.
pub const METRICS: &[Metric] = &[
    m(
        "wschat_connections",
        Kind::Gauge,
        &["protocol"],
        "Open client WebSocket connections (legacy or v1), authenticated or not.",
    ),
    m(
        "wschat_connections_opened_total",
        Kind::Counter,
        &["protocol"],
        "Client connections accepted and authenticated.",
    ),
    m(
        "wschat_connections_closed_total",
        Kind::Counter,
        &["protocol", "reason"],
        "Authenticated client connections closed, by reason (e.g. \"client closed\", \"server shutdown\", \"slow consumer or killed\", \"idle timeout\").",
    ),
    m(
        "wschat_accept_errors_total",
        Kind::Counter,
        &["stage"],
        "Connections that could not be taken: `accept` (the listener's accept failed, e.g. out of file descriptors; logged at warn), `handshake` (a TLS handshake failed or timed out).",
    ),
    m(
        "wschat_refused_total",
        Kind::Counter,
        &["reason"],
        "Handshakes refused by a limit: origin, failed_keys, connections_per_ip, connections_per_session, header_size.",
    ),
    m(
        "wschat_sessions_revoked_connections_total",
        Kind::Counter,
        &[],
        "Connections closed (1008) because their session row was deleted or expired.",
    ),
    m(
        "wschat_auth_failures_total",
        Kind::Counter,
        &[],
        "Connection attempts with an unknown, revoked or expired session key.",
    ),
    m(
        "wschat_rooms",
        Kind::Gauge,
        &[],
        "Rooms with at least one member connected to this node.",
    ),
    m(
        "wschat_messages_received_total",
        Kind::Counter,
        &["protocol"],
        "Sends handed to the committer: from legacy or v1 clients, or internal (the admin API).",
    ),
    m(
        "wschat_messages_acknowledged_total",
        Kind::Counter,
        &[],
        "Messages committed to the store and acknowledged (retries of a stored message not counted).",
    ),
    m(
        "wschat_messages_delivered_total",
        Kind::Counter,
        &[],
        "Messages handed to recipient connections on this node, one per recipient (the outbox still drops a repeat, and what a closing connection no longer takes).",
    ),
    m(
        "wschat_commit_errors_total",
        Kind::Counter,
        &[],
        "Commit batches the store refused; their senders were told to retry.",
    ),
    m(
        "wschat_settle_panics_total",
        Kind::Counter,
        &[],
        "Committed batches whose answers and fan-out panicked (a bug): their senders may get no answer and send again; the batches after are settled as usual.",
    ),
    m(
        "wschat_commit_batch_size",
        Kind::Histogram,
        &[],
        "Messages per commit transaction (group commit).",
    ),
    m(
        "wschat_commit_seconds",
        Kind::Histogram,
        &[],
        "Duration of one commit transaction, in seconds.",
    ),
    m(
        "wschat_sqlite_checkpoint_seconds",
        Kind::Histogram,
        &[],
        "SQLite only: duration of one checkpoint of the WAL into the database file, run by the commit thread after a commit that left the WAL at 1,000 pages or more, once that commit's outcomes were handed to the settler (which answers its senders).",
    ),
    m(
        "wschat_sqlite_checkpoint_failures_total",
        Kind::Counter,
        &[],
        "SQLite only: checkpoints that failed (tried again after the next commit past the size; the log warns at the 1st, 2nd, 4th… failure in a row).",
    ),
    m(
        "wschat_send_ack_seconds",
        Kind::Histogram,
        &[],
        "From a send queued to the committer to its ack (queue wait plus commit), in seconds.",
    ),
    m(
        "wschat_fanout_seconds",
        Kind::Histogram,
        &[],
        "From the end of a commit to its messages queued into every recipient's outbox on this node, in seconds.",
    ),
    m(
        "wschat_queue_overflows_total",
        Kind::Counter,
        &[],
        "Outbound queues that overflowed; each such connection is closed with 4008 (it resumes).",
    ),
    m(
        "wschat_write_pacing_active",
        Kind::Gauge,
        &[],
        "1 while the node writes more frames a second than write_delay_above_per_sec, so busy connections hold their writes for write_delay_ms; else 0.",
    ),
    m(
        "wschat_writes_held_total",
        Kind::Counter,
        &[],
        "Writes a connection held for write pacing (write_delay_ms), to be written with what arrives meanwhile.",
    ),
    m(
        "wschat_broker_reconnects_total",
        Kind::Counter,
        &[],
        "Broker (NATS or LISTEN) connections (re)established; each is followed by a read of the store.",
    ),
    m(
        "wschat_broker_subscription_ends_total",
        Kind::Counter,
        &[],
        "NATS subscriptions whose stream ended while the node ran; each is made again (the node not ready meanwhile), then the store is read.",
    ),
    m(
        "wschat_broker_events_dropped_total",
        Kind::Counter,
        &[],
        "Events for the other nodes dropped because the broker did not keep up (they catch up from the store).",
    ),
    m(
        "wschat_broker_publish_errors_total",
        Kind::Counter,
        &[],
        "Publishes to the broker that failed or had no answer within 5 s (other nodes then catch up from the store).",
    ),
    m(
        "wschat_store_catchups_total",
        Kind::Counter,
        &[],
        "Reads of the store to fill a gap in a room's sequence (a missed or payload-less bell).",
    ),
    m(
        "wschat_rate_limited_total",
        Kind::Counter,
        &[],
        "Frames (pings and pongs included) refused by a connection's rate limit.",
    ),
    m(
        "wschat_build_info",
        Kind::Gauge,
        &["version"],
        "Always 1; the label carries the running version.",
    ),
];

/// Buckets for latencies, in seconds: 0.5 ms to 10 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Buckets for batch sizes, in messages: up to ten times `max_commit_batch`'s default.
const BATCH_BUCKETS: &[f64] = &[
    1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0, 10000.0, 20000.0,
    50000.0, 100000.0,
];

fn buckets(name: &str) -> &'static [f64] {
    if name.ends_with("_seconds") {
        LATENCY_BUCKETS
    } else {
        BATCH_BUCKETS
    }
}

/// The recorder's builder: every histogram with explicit buckets, so Prometheus gets
/// `_bucket`/`_sum`/`_count` series (summaries cannot be aggregated across nodes).
pub fn builder() -> PrometheusBuilder {
    let mut builder = PrometheusBuilder::new();
    for metric in METRICS.iter().filter(|m| m.kind == Kind::Histogram) {
        let matcher = Matcher::Full(metric.name.to_owned());
        builder = match builder.set_buckets_for_metric(matcher, buckets(metric.name)) {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(metric = metric.name, error = %e, "histogram buckets not set");
                PrometheusBuilder::new()
            }
        };
    }
    builder
}

/// After the recorder is installed: describe every metric (`# HELP`), make the unlabelled
/// ones and the connection gauges visible at zero, and drain histogram samples
/// periodically so that they do not pile up between scrapes.
pub fn registered(handle: &PrometheusHandle) {
    for metric in METRICS {
        let (name, help) = (metric.name, metric.help);
        match metric.kind {
            Kind::Counter => metrics::describe_counter!(name, help),
            Kind::Gauge => metrics::describe_gauge!(name, help),
            Kind::Histogram => metrics::describe_histogram!(name, help),
        }
        if metric.labels.is_empty() {
            match metric.kind {
                Kind::Counter => metrics::counter!(name).increment(0),
                Kind::Gauge => metrics::gauge!(name).increment(0.0),
                Kind::Histogram => drop(metrics::histogram!(name)),
            }
        }
    }
    for protocol in [Protocol::Legacy, Protocol::V1] {
        metrics::gauge!("wschat_connections", "protocol" => protocol.label()).increment(0.0);
    }
    metrics::gauge!("wschat_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    static UPKEEP: OnceLock<()> = OnceLock::new();
    UPKEEP.get_or_init(|| {
        let handle = handle.clone();
        let spawned = std::thread::Builder::new()
            .name("metrics-upkeep".into())
            .spawn(move || loop {
                std::thread::sleep(Duration::from_secs(5));
                handle.run_upkeep();
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "metrics upkeep thread not started");
        }
    });
}

/// Counts a connection in `wschat_connections` while it exists (used while a v1
/// connection authenticates, before its `ConnGuard` takes over).
pub(crate) struct ConnectionGauge(Protocol);

impl ConnectionGauge {
    pub fn new(protocol: Protocol) -> Self {
        metrics::gauge!("wschat_connections", "protocol" => protocol.label()).increment(1.0);
        Self(protocol)
    }
}

impl Drop for ConnectionGauge {
    fn drop(&mut self) {
        metrics::gauge!("wschat_connections", "protocol" => self.0.label()).decrement(1.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sources(dir: &std::path::Path, out: &mut Vec<String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                sources(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(std::fs::read_to_string(path).unwrap());
            }
        }
    }

    /// Every `wschat_…` name the code records is in `METRICS`.
    #[test]
    fn every_recorded_metric_is_listed() {
        let mut files = Vec::new();
        sources(
            &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
            &mut files,
        );
        let mut missing = Vec::new();
        let macros = [
            "counter!(\"wschat_",
            "gauge!(\"wschat_",
            "histogram!(\"wschat_",
        ];
        for file in &files {
            for part in macros.iter().flat_map(|m| file.split(m).skip(1)) {
                let name: String = part
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                let name = format!("wschat_{name}");
                if !METRICS.iter().any(|m| m.name == name) {
                    missing.push(name);
                }
            }
        }
        assert!(missing.is_empty(), "add to telemetry::METRICS: {missing:?}");
    }

    #[test]
    fn every_metric_is_documented_in_operations_md() {
        let docs = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/operations.md"),
        )
        .unwrap();
        for metric in METRICS {
            assert!(
                docs.contains(&format!("`{}`", metric.name)),
                "docs/operations.md does not describe {}",
                metric.name
            );
        }
    }

    #[test]
    fn names_are_prefixed_and_unique() {
        let mut names: Vec<&str> = METRICS.iter().map(|m| m.name).collect();
        assert!(names.iter().all(|n| n.starts_with("wschat_")));
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), METRICS.len());
    }
}
