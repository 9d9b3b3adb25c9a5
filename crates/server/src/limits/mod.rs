//! Admission limits on WebSocket handshakes (docs/security.md): the Origin check, open
//! connections per client address and per session key, and the block on addresses that
//! try too many unknown keys. The per-connection frame rate is in [`rate`]; the client
//! address behind trusted proxies in [`proxy`].
//!
//! Every count is this node's: with several nodes behind a balancer each node applies
//! the limits to what it serves.

pub mod proxy;
pub mod rate;

use std::collections::HashMap;
use std::hash::Hash;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::config::Settings;
use crate::http::origin::{OriginPolicy, OriginRefusal};
use crate::store::KeyHash;
use proxy::TrustedProxies;

/// The window in which unknown keys are counted.
pub const FAILED_KEY_WINDOW: Duration = Duration::from_secs(60);

/// Entries kept per table before stale ones are swept.
const SWEEP_ABOVE: usize = 10_000;

/// Unknown keys per address, swept of stale entries now and then.
struct FailureTable {
    by_address: HashMap<IpAddr, Failures>,
    /// Size above which the next failure sweeps the table first.
    sweep_above: usize,
}

/// Why a handshake was refused before (or instead of) looking at its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// 403: the Origin is not allowed, or missing when required.
    Origin(OriginRefusal),
    /// 429: this address tried too many unknown keys; retry after this long.
    Blocked(Duration),
    /// 429: this address has as many connections open as it may.
    TooManyFromAddress,
    /// 429: this session key has as many connections open as it may.
    TooManyForSession,
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        match self {
            Self::Origin(refusal) => {
                metrics::counter!("wschat_refused_total", "reason" => "origin").increment(1);
                (StatusCode::FORBIDDEN, refusal.text()).into_response()
            }
            Self::Blocked(left) => {
                metrics::counter!("wschat_refused_total", "reason" => "failed_keys").increment(1);
                let mut response = (
                    StatusCode::TOO_MANY_REQUESTS,
                    "too many unknown session keys from this address\n",
                )
                    .into_response();
                let secs = left.as_secs().max(1);
                if let Ok(value) = HeaderValue::from_str(&secs.to_string()) {
                    response.headers_mut().insert(header::RETRY_AFTER, value);
                }
                response
            }
            Self::TooManyFromAddress => {
                metrics::counter!("wschat_refused_total", "reason" => "connections_per_ip")
                    .increment(1);
                (
                    StatusCode::TOO_MANY_REQUESTS,
                    "too many connections from this address\n",
                )
                    .into_response()
            }
            Self::TooManyForSession => {
                metrics::counter!("wschat_refused_total", "reason" => "connections_per_session")
                    .increment(1);
                (
                    StatusCode::TOO_MANY_REQUESTS,
                    "too many connections for this session\n",
                )
                    .into_response()
            }
        }
    }
}

/// The size of a request head as it was on the wire (request line, headers, line ends),
/// to within the whitespace around header values.
pub fn head_size(request: &axum::extract::Request) -> usize {
    let line = request.method().as_str().len()
        + request
            .uri()
            .path_and_query()
            .map_or(1, |p| p.as_str().len())
        + " HTTP/1.1\r\n".len()
        + 1;
    let headers: usize = request
        .headers()
        .iter()
        .map(|(name, value)| name.as_str().len() + 2 + value.len() + 2)
        .sum();
    line + headers + 2
}

/// Middleware: 431 for a request head over `max_header_bytes`. hyper's read buffer
/// (`serve.rs`) bounds the memory a head can take, but only to within one read; this
/// makes the limit exact.
pub async fn limit_head_size(
    axum::extract::State(shared): axum::extract::State<Arc<crate::app::Shared>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let max = shared.settings.max_header_bytes;
    if head_size(&request) > max {
        metrics::counter!("wschat_refused_total", "reason" => "header_size").increment(1);
        return (
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "request header fields too large\n",
        )
            .into_response();
    }
    next.run(request).await
}

/// Counts of open connections by key; a [`Slot`] holds one until dropped.
struct Counter<K: Hash + Eq> {
    max: usize,
    open: Mutex<HashMap<K, usize>>,
}

/// One open connection counted against a limit; released on drop.
pub struct Slot {
    release: Option<Box<dyn FnOnce() + Send + Sync>>,
}

impl Slot {
    /// A slot that counts nothing (the limit is off).
    pub fn free() -> Self {
        Self { release: None }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(release) = self.release.take() {
            release();
        }
    }
}

impl<K: Hash + Eq + Clone + Send + Sync + 'static> Counter<K> {
    fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            max,
            open: Mutex::new(HashMap::new()),
        })
    }

    /// A slot, unless `key` has `max` open already. `max == 0` counts nothing.
    fn acquire(self: &Arc<Self>, key: K) -> Option<Slot> {
        if self.max == 0 {
            return Some(Slot::free());
        }
        {
            let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
            let count = open.entry(key.clone()).or_insert(0);
            if *count >= self.max {
                return None;
            }
            *count += 1;
        }
        let counter = self.clone();
        Some(Slot {
            release: Some(Box::new(move || {
                let mut open = counter.open.lock().unwrap_or_else(PoisonError::into_inner);
                if let Some(count) = open.get_mut(&key) {
                    *count -= 1;
                    if *count == 0 {
                        open.remove(&key);
                    }
                }
            })),
        })
    }
}

/// Unknown keys tried from one address.
struct Failures {
    window_start: Instant,
    count: u32,
    blocked_until: Option<Instant>,
}

/// The key used to count by address: IPv4 addresses whole, IPv6 by their /64 (one
/// subscriber usually holds a whole /64).
fn address_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => IpAddr::V6((u128::from(v6) & (u128::MAX << 64)).into()),
        v4 => v4,
    }
}

/// What a connection holds while it is open.
pub struct Admission {
    /// The client's address (after trusted proxies), for limits and logs.
    pub client: IpAddr,
    _address_slot: Slot,
}

pub struct Limits {
    origins: OriginPolicy,
    proxies: TrustedProxies,
    per_address: Arc<Counter<IpAddr>>,
    per_session: Arc<Counter<KeyHash>>,
    max_failed_keys: u32,
    block: Duration,
    failures: Mutex<FailureTable>,
}

impl Limits {
    /// Check the settings (origins, proxy ranges) and set up the counters.
    pub fn new(settings: &Settings) -> Result<Self, String> {
        Ok(Self {
            origins: OriginPolicy::new(&settings.allowed_origins, settings.require_origin)?,
            proxies: TrustedProxies::parse(
                &settings.trusted_proxies,
                proxy::ProxyHeader::parse(&settings.proxy_header)?,
            )?,
            per_address: Counter::new(settings.max_connections_per_ip),
            per_session: Counter::new(settings.max_connections_per_session),
            max_failed_keys: settings.max_failed_keys_per_minute,
            block: Duration::from_secs(settings.failed_key_block_secs),
            failures: Mutex::new(FailureTable {
                by_address: HashMap::new(),
                sweep_above: SWEEP_ABOVE,
            }),
        })
    }

    /// The client's address for a request from `peer`.
    pub fn client_ip(&self, peer: SocketAddr, headers: &HeaderMap) -> IpAddr {
        self.proxies.client_ip(peer.ip(), headers)
    }

    /// The checks on a WebSocket handshake before its key is looked at: Origin, an
    /// address blocked for unknown keys, connections per address.
    pub fn admit(&self, peer: SocketAddr, headers: &HeaderMap) -> Result<Admission, Refusal> {
        self.origins.check(headers).map_err(Refusal::Origin)?;
        let client = self.client_ip(peer, headers);
        self.not_blocked(client)?;
        let slot = self
            .per_address
            .acquire(address_key(client))
            .ok_or(Refusal::TooManyFromAddress)?;
        Ok(Admission {
            client,
            _address_slot: slot,
        })
    }

    /// A slot for one more connection of the session with this key.
    pub fn session_slot(&self, key: &KeyHash) -> Result<Slot, Refusal> {
        self.per_session
            .acquire(key.clone())
            .ok_or(Refusal::TooManyForSession)
    }

    /// How long `client` stays refused for unknown keys, if it is.
    pub fn blocked(&self, client: IpAddr) -> Option<Duration> {
        if self.max_failed_keys == 0 {
            return None;
        }
        let failures = self.failures.lock().unwrap_or_else(PoisonError::into_inner);
        let until = failures
            .by_address
            .get(&address_key(client))?
            .blocked_until?;
        until.checked_duration_since(Instant::now())
    }

    /// `blocked`, as the refusal: at the handshake, before a key's lookup, and again
    /// after a lookup that found it (guesses sent in parallel are all looked up before
    /// the first of them is counted, so the address can be blocked while one runs).
    pub fn not_blocked(&self, client: IpAddr) -> Result<(), Refusal> {
        match self.blocked(client) {
            Some(left) => Err(Refusal::Blocked(left)),
            None => Ok(()),
        }
    }

    /// Count an unknown key tried from `client`; the `max_failed_keys_per_minute`-th in a
    /// minute blocks the address.
    pub fn note_failed_key(&self, client: IpAddr) {
        if self.max_failed_keys == 0 {
            return;
        }
        let now = Instant::now();
        let mut guard = self.failures.lock().unwrap_or_else(PoisonError::into_inner);
        let failures = &mut *guard;
        if failures.by_address.len() > failures.sweep_above {
            failures.by_address.retain(|_, f| {
                now.duration_since(f.window_start) < FAILED_KEY_WINDOW
                    || f.blocked_until.is_some_and(|until| until > now)
            });
            // When most entries are fresh (many addresses failing at once), the next sweep
            // waits until the table has doubled: each failure pays for a sweep once, not a
            // scan of the whole table every time.
            failures.sweep_above = SWEEP_ABOVE.max(failures.by_address.len() * 2);
        }
        let entry = failures
            .by_address
            .entry(address_key(client))
            .or_insert_with(|| Failures {
                window_start: now,
                count: 0,
                blocked_until: None,
            });
        if now.duration_since(entry.window_start) >= FAILED_KEY_WINDOW {
            entry.window_start = now;
            entry.count = 0;
        }
        entry.count += 1;
        if entry.count >= self.max_failed_keys {
            entry.blocked_until = Some(now + self.block);
            entry.window_start = now;
            entry.count = 0;
            tracing::warn!(%client, "too many unknown session keys: address blocked");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(f: impl FnOnce(&mut Settings)) -> Limits {
        let mut settings = Settings::default();
        f(&mut settings);
        Limits::new(&settings).unwrap()
    }

    fn peer(s: &str) -> SocketAddr {
        SocketAddr::new(s.parse().unwrap(), 1234)
    }

    #[test]
    fn connections_per_address_are_counted_and_released() {
        let l = limits(|s| s.max_connections_per_ip = 2);
        let h = HeaderMap::new();
        let a = l.admit(peer("192.0.2.1"), &h).unwrap();
        let _b = l.admit(peer("192.0.2.1"), &h).unwrap();
        assert_eq!(
            l.admit(peer("192.0.2.1"), &h).err(),
            Some(Refusal::TooManyFromAddress)
        );
        // Another address, and an IPv6 /64 counted as one.
        assert!(l.admit(peer("192.0.2.2"), &h).is_ok());
        let _c = l.admit(peer("2001:db8::1"), &h).unwrap();
        let _d = l.admit(peer("2001:db8::2"), &h).unwrap();
        assert!(l.admit(peer("2001:db8::3"), &h).is_err());
        assert!(l.admit(peer("2001:db8:0:1::3"), &h).is_ok());
        drop(a);
        assert!(l.admit(peer("192.0.2.1"), &h).is_ok());
    }

    #[test]
    fn connections_per_session() {
        let l = limits(|s| s.max_connections_per_session = 1);
        let key = crate::store::hash_key("k");
        let slot = l.session_slot(&key).unwrap();
        assert!(l.session_slot(&key).is_err());
        assert!(l.session_slot(&crate::store::hash_key("other")).is_ok());
        drop(slot);
        assert!(l.session_slot(&key).is_ok());
        let unlimited = limits(|s| s.max_connections_per_session = 0);
        let slots: Vec<Slot> = (0..5000)
            .map(|_| unlimited.session_slot(&key).unwrap())
            .collect();
        assert_eq!(slots.len(), 5000);
    }

    #[test]
    fn failed_keys_block_an_address() {
        let l = limits(|s| s.max_failed_keys_per_minute = 3);
        let ip: IpAddr = "192.0.2.9".parse().unwrap();
        l.note_failed_key(ip);
        l.note_failed_key(ip);
        assert_eq!(l.blocked(ip), None);
        l.note_failed_key(ip);
        let left = l.blocked(ip).unwrap();
        assert!(left > Duration::from_secs(59), "{left:?}");
        assert!(matches!(
            l.admit(peer("192.0.2.9"), &HeaderMap::new()).err(),
            Some(Refusal::Blocked(_))
        ));
        assert_eq!(l.blocked("192.0.2.10".parse().unwrap()), None);
    }

    /// Guesses in parallel: the lookups that end after the address was blocked are
    /// refused, a valid key's too; another address's valid key is not.
    #[test]
    fn a_key_found_after_its_address_was_blocked_is_refused() {
        let l = limits(|s| s.max_failed_keys_per_minute = 2);
        let ip: IpAddr = "192.0.2.9".parse().unwrap();
        assert!(l.not_blocked(ip).is_ok());
        l.note_failed_key(ip);
        assert!(l.not_blocked(ip).is_ok(), "one failure does not block");
        l.note_failed_key(ip);
        assert!(matches!(l.not_blocked(ip), Err(Refusal::Blocked(_))));
        assert!(l.not_blocked("192.0.2.10".parse().unwrap()).is_ok());
    }
}
