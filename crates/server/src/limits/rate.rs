//! Per-connection frame rate: a token bucket (`rate_per_sec`, bursts of `rate_burst`).
//! A frame over the rate is refused with `rate_limited`; a connection that keeps going
//! (more than `rate_max_refusals` refusals in about 10 s, a second bucket) is closed
//! with 1008. WebSocket frames never pass HTTP middleware, so this runs in each
//! connection's read loop.

use std::num::NonZeroU32;
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

use crate::config::Settings;

/// What to do with one inbound frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Within the rate: handle it.
    Pass,
    /// Over the rate: answer `rate_limited`, do not handle it.
    Refuse,
    /// Over the rate for too long: answer `rate_limited`, then close with 1008.
    Close,
}

/// The window over which refusals are counted for [`Verdict::Close`].
pub const REFUSAL_WINDOW: Duration = Duration::from_secs(10);

pub struct RateGate {
    frames: Option<DefaultDirectRateLimiter>,
    refusals: Option<DefaultDirectRateLimiter>,
}

impl RateGate {
    pub fn new(settings: &Settings) -> Self {
        let frames = NonZeroU32::new(settings.rate_per_sec).map(|rate| {
            let burst = NonZeroU32::new(settings.rate_burst).unwrap_or(rate);
            RateLimiter::direct(Quota::per_second(rate).allow_burst(burst))
        });
        let refusals = NonZeroU32::new(settings.rate_max_refusals).and_then(|max| {
            Quota::with_period(REFUSAL_WINDOW / max.get())
                .map(|q| RateLimiter::direct(q.allow_burst(max)))
        });
        Self { frames, refusals }
    }

    /// Take one token for a frame.
    pub fn check(&self) -> Verdict {
        let Some(frames) = &self.frames else {
            return Verdict::Pass;
        };
        if frames.check().is_ok() {
            return Verdict::Pass;
        }
        metrics::counter!("wschat_rate_limited_total").increment(1);
        match &self.refusals {
            Some(refusals) if refusals.check().is_err() => Verdict::Close,
            _ => Verdict::Refuse,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate(rate: u32, burst: u32, refusals: u32) -> RateGate {
        RateGate::new(&Settings {
            rate_per_sec: rate,
            rate_burst: burst,
            rate_max_refusals: refusals,
            ..Settings::default()
        })
    }

    #[test]
    fn a_burst_passes_then_refusals_then_close() {
        let g = gate(10, 20, 5);
        let verdicts: Vec<Verdict> = (0..40).map(|_| g.check()).collect();
        assert!(
            verdicts[..20].iter().all(|v| *v == Verdict::Pass),
            "{verdicts:?}"
        );
        assert!(
            verdicts[20..25].iter().all(|v| *v == Verdict::Refuse),
            "{verdicts:?}"
        );
        assert_eq!(verdicts[25], Verdict::Close);
    }

    #[test]
    fn zero_means_unlimited_and_never_closed() {
        let g = gate(0, 20, 5);
        assert!((0..10_000).all(|_| g.check() == Verdict::Pass));
        let g = gate(1, 1, 0);
        assert_eq!(g.check(), Verdict::Pass);
        assert!((0..1000).all(|_| g.check() == Verdict::Refuse));
    }
}
