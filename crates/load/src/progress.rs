//! The live progress line on stderr, once a second: phase, connections up, messages sent
//! per second, deliveries per second and the p99 latency so far. Redrawn in place on a
//! terminal, plain lines otherwise (a log file, CI).

use std::io::{IsTerminal, Write as _};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::conn::{Phase, PhaseRx, Shared};
use crate::stats::new_histogram;

pub(crate) async fn run(shared: Arc<Shared>, mut phase_rx: PhaseRx, total: usize) {
    let tty = std::io::stderr().is_terminal();
    let Ok(mut scratch) = new_histogram() else {
        return;
    };
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    let (mut last_sent, mut last_delivered, mut last_at) = (0u64, 0u64, Instant::now());
    let mut phase = Phase::Connect;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            p = phase_rx.recv() => {
                phase = p.unwrap_or(Phase::Stop);
                if phase == Phase::Stop {
                    break;
                }
                continue;
            }
        }
        let phase = match phase {
            Phase::Connect => "connect",
            Phase::Send { .. } => "send",
            Phase::Drain { .. } => "drain",
            Phase::Stop => break,
        };
        let live = &shared.live;
        let (sent, delivered) = (live.sent.load(Relaxed), live.delivered.load(Relaxed));
        let secs = last_at.elapsed().as_secs_f64().max(1e-3);
        let send_rate = (sent - last_sent) as f64 / secs;
        let delivery_rate = (delivered - last_delivered) as f64 / secs;
        (last_sent, last_delivered, last_at) = (sent, delivered, Instant::now());
        shared.latency.merge_into(&mut scratch);
        let p99 = if scratch.is_empty() {
            "-".to_string()
        } else {
            format!("{:.1} ms", scratch.value_at_quantile(0.99) as f64 / 1000.0)
        };
        let line = format!(
            "[{phase} {:>4.0}s] conns {}/{total}  sent {send_rate:.0}/s  deliveries {delivery_rate:.0}/s  p99 {p99}  (sent {sent}, delivered {delivered})",
            started.elapsed().as_secs_f64(),
            live.connected.load(Relaxed),
        );
        let mut err = std::io::stderr().lock();
        let _ = if tty {
            write!(err, "\r\x1b[2K{line}")
        } else {
            writeln!(err, "{line}")
        };
        let _ = err.flush();
    }
    if tty {
        eprintln!();
    }
}
