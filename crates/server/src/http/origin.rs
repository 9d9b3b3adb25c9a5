//! The Origin check on WebSocket handshakes (cross-site WebSocket hijacking).
//!
//! With `allowed_origins` set, a handshake whose `Origin` is not exactly one of them
//! (compared as `scheme://host[:port]`, ASCII case-insensitively) is refused, `null`
//! included; a look-alike such as `https://good.example.evil.com` is simply another
//! origin. A handshake without `Origin` comes from a non-browser client and passes unless
//! `require_origin` is set.

use axum::http::{header, HeaderMap};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OriginRefusal {
    Missing,
    NotAllowed,
    Several,
}

impl OriginRefusal {
    pub fn text(&self) -> &'static str {
        match self {
            Self::Missing => "an Origin header is required\n",
            Self::NotAllowed => "origin not allowed\n",
            Self::Several => "more than one Origin header\n",
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct OriginPolicy {
    allowed: Vec<String>,
    require: bool,
}

impl OriginPolicy {
    /// Check and normalize the configured origins.
    pub fn new(allowed: &[String], require: bool) -> Result<Self, String> {
        let allowed = allowed
            .iter()
            .map(|o| normalize(o))
            .collect::<Result<Vec<_>, _>>()?;
        if require && allowed.is_empty() {
            return Err("require_origin needs allowed_origins".into());
        }
        Ok(Self { allowed, require })
    }

    pub fn check(&self, headers: &HeaderMap) -> Result<(), OriginRefusal> {
        let mut origins = headers.get_all(header::ORIGIN).iter();
        let Some(origin) = origins.next() else {
            return if self.require {
                Err(OriginRefusal::Missing)
            } else {
                Ok(())
            };
        };
        if origins.next().is_some() {
            return Err(OriginRefusal::Several);
        }
        if self.allowed.is_empty() {
            return Ok(());
        }
        let origin = origin.to_str().map_err(|_| OriginRefusal::NotAllowed)?;
        if self
            .allowed
            .iter()
            .any(|allowed| allowed.eq_ignore_ascii_case(origin))
        {
            Ok(())
        } else {
            Err(OriginRefusal::NotAllowed)
        }
    }
}

/// `https://Chat.Example:8443` → `https://chat.example:8443`, and the scheme's default
/// port dropped (`https://x:443` → `https://x`: browsers send the origin without it);
/// refuses paths, queries, user info, a port that is not a number, other schemes and
/// `null`.
/// `origin` as `scheme://host[:port]`, lower case, without the scheme's default port.
pub(crate) fn normalize(origin: &str) -> Result<String, String> {
    let bad = |why: &str| Err(format!("origin {origin:?}: {why}"));
    let lower = origin.trim().to_ascii_lowercase();
    let Some((scheme, host)) = lower.split_once("://") else {
        return bad("expected scheme://host[:port]");
    };
    if scheme != "http" && scheme != "https" {
        return bad("the scheme must be http or https");
    }
    let host = host.strip_suffix('/').unwrap_or(host);
    if host.is_empty() || host.contains(['/', '?', '#', '@', ' ']) {
        return bad("expected scheme://host[:port], with no path, query or user");
    }
    // The port follows the last ':' outside an IPv6 address's brackets.
    let (name, port) = match host.rsplit_once(':') {
        Some((name, port)) if !port.contains(']') => (name, Some(port)),
        _ => (host, None),
    };
    if name.is_empty() {
        return bad("expected scheme://host[:port]: no host");
    }
    let default_port = if scheme == "https" { 443 } else { 80 };
    match port.map(str::parse::<u16>) {
        None => Ok(format!("{scheme}://{host}")),
        Some(Ok(port)) if port == default_port => Ok(format!("{scheme}://{name}")),
        Some(Ok(port)) if port > 0 => Ok(format!("{scheme}://{name}:{port}")),
        Some(_) => bad("the port must be a number from 1 to 65535"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_origin(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(header::ORIGIN, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn exact_origins_only() {
        let p = OriginPolicy::new(&["https://Good.Example/".into()], false).unwrap();
        assert_eq!(p.check(&with_origin(&["https://good.example"])), Ok(()));
        assert_eq!(p.check(&with_origin(&["HTTPS://GOOD.EXAMPLE"])), Ok(()));
        for bad in [
            "null",
            "https://good.example.evil.com",
            "https://evil.good.example",
            "http://good.example",
            "https://good.example:444",
            "https://good.example/",
            "https://good.exampl",
            "",
        ] {
            assert_eq!(
                p.check(&with_origin(&[bad])),
                Err(OriginRefusal::NotAllowed),
                "{bad}"
            );
        }
        assert_eq!(
            p.check(&with_origin(&[
                "https://good.example",
                "https://good.example"
            ])),
            Err(OriginRefusal::Several)
        );
        assert_eq!(p.check(&HeaderMap::new()), Ok(()));
        let strict = OriginPolicy::new(&["https://good.example".into()], true).unwrap();
        assert_eq!(strict.check(&HeaderMap::new()), Err(OriginRefusal::Missing));
    }

    #[test]
    fn the_default_port_is_dropped_as_browsers_do() {
        let p = OriginPolicy::new(
            &[
                "https://chat.example:443".into(),
                "http://plain.example:80".into(),
                "https://alt.example:8443".into(),
                "https://[::1]:443".into(),
            ],
            false,
        )
        .unwrap();
        for good in [
            "https://chat.example",
            "http://plain.example",
            "https://alt.example:8443",
            "https://[::1]",
        ] {
            assert_eq!(p.check(&with_origin(&[good])), Ok(()), "{good}");
        }
        for bad in [
            "https://plain.example",
            "http://chat.example",
            "https://alt.example",
        ] {
            assert_eq!(
                p.check(&with_origin(&[bad])),
                Err(OriginRefusal::NotAllowed),
                "{bad}"
            );
        }
        for bad in [
            "https://x:abc",
            "https://x:0",
            "https://x:70000",
            "https://:443",
        ] {
            assert!(OriginPolicy::new(&[bad.into()], false).is_err(), "{bad}");
        }
    }

    #[test]
    fn no_list_no_check_and_bad_config_refused() {
        let open = OriginPolicy::default();
        assert_eq!(open.check(&with_origin(&["null"])), Ok(()));
        assert!(OriginPolicy::new(&[], true).is_err());
        for bad in [
            "null",
            "good.example",
            "ftp://x",
            "https://x/path",
            "https://u@x",
        ] {
            assert!(OriginPolicy::new(&[bad.into()], false).is_err(), "{bad}");
        }
    }
}
