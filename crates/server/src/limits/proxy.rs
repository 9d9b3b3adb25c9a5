//! The client's address: the TCP peer, or, when the peer is a trusted proxy, the nearest
//! untrusted hop of the header the proxies write (`X-Forwarded-For`, or `Forwarded`, RFC
//! 7239). Only that header is read: a proxy that writes one passes the other through as
//! the client sent it, so believing it would let a client choose its address.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use axum::http::{header, HeaderMap, HeaderValue};

/// An address range: `10.0.0.0/8`, `2001:db8::/32`, or one address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    net: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let (addr, prefix) = match text.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (text, None),
        };
        let net: IpAddr = addr
            .parse()
            .map_err(|_| format!("trusted proxy {text:?}: not an IP address or CIDR"))?;
        let net = net.to_canonical();
        let max = if net.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => match p.parse::<u8>() {
                Ok(p) if p <= max => p,
                _ => return Err(format!("trusted proxy {text:?}: bad prefix length")),
            },
        };
        Ok(Self { net, prefix })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.net, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// Which forwarding header the proxies write.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ProxyHeader {
    #[default]
    XForwardedFor,
    Forwarded,
}

/// The proxies whose forwarding header is believed.
#[derive(Debug, Clone, Default)]
pub struct TrustedProxies {
    ranges: Vec<Cidr>,
    header: ProxyHeader,
}

impl ProxyHeader {
    /// `x-forwarded-for` or `forwarded`, any case.
    pub fn parse(text: &str) -> Result<Self, String> {
        match text.trim().to_ascii_lowercase().as_str() {
            "x-forwarded-for" => Ok(Self::XForwardedFor),
            "forwarded" => Ok(Self::Forwarded),
            other => Err(format!(
                "proxy header {other:?}: expected x-forwarded-for or forwarded"
            )),
        }
    }
}

impl TrustedProxies {
    /// `list` of ranges, whose proxies write `header`.
    pub fn parse(list: &[String], header: ProxyHeader) -> Result<Self, String> {
        let ranges = list
            .iter()
            .map(|c| Cidr::parse(c))
            .collect::<Result<_, _>>()?;
        Ok(Self { ranges, header })
    }

    fn trusts(&self, ip: IpAddr) -> bool {
        self.ranges.iter().any(|c| c.contains(ip))
    }

    /// The client's address. Without trusted proxies, or when the peer is not one, the
    /// peer. Otherwise the hops the proxies recorded are read from the right (the one the
    /// nearest proxy added) and the first that is not itself a trusted proxy is the client.
    /// A hop that cannot be read (`unknown`, an obfuscated name) ends the walk at the last
    /// trusted hop: nothing left of it can be believed.
    pub fn client_ip(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let peer = peer.to_canonical();
        if self.ranges.is_empty() || !self.trusts(peer) {
            return peer;
        }
        let hops = match self.header {
            ProxyHeader::XForwardedFor => x_forwarded_for_hops(headers),
            ProxyHeader::Forwarded => forwarded_hops(headers).unwrap_or_default(),
        };
        let mut client = peer;
        for hop in hops.iter().rev() {
            let Some(ip) = hop else {
                return client;
            };
            client = *ip;
            if !self.trusts(*ip) {
                return client;
            }
        }
        client
    }
}

/// The `for=` hops of every `Forwarded` header, in order; `None` when there is none.
fn forwarded_hops(headers: &HeaderMap) -> Option<Vec<Option<IpAddr>>> {
    let mut hops = Vec::new();
    let mut any = false;
    for value in headers.get_all(header::FORWARDED) {
        any = true;
        for element in elements(value) {
            let Some(element) = element else {
                hops.push(None);
                continue;
            };
            let node = element.split(';').find_map(|pair| {
                let (name, value) = pair.split_once('=')?;
                name.trim()
                    .eq_ignore_ascii_case("for")
                    .then(|| value.trim().trim_matches('"'))
            });
            if let Some(node) = node {
                hops.push(parse_node(node));
            }
        }
    }
    any.then_some(hops)
}

/// The hops of every `X-Forwarded-For` header, in order.
fn x_forwarded_for_hops(headers: &HeaderMap) -> Vec<Option<IpAddr>> {
    let mut hops = Vec::new();
    for value in headers.get_all("x-forwarded-for") {
        hops.extend(elements(value).map(|h| h.and_then(|h| parse_node(h.trim()))));
    }
    hops
}

/// A header line's comma-separated elements, each decoded on its own (`None`: not text).
/// A proxy appends its hop to the line the client sent: were the line decoded whole, bytes
/// a client put in its part would hide the hop the proxy appended, and the walk would stop
/// at the proxy's own address.
fn elements(value: &HeaderValue) -> impl Iterator<Item = Option<&str>> {
    value
        .as_bytes()
        .split(|&b| b == b',')
        .map(|element| std::str::from_utf8(element).ok())
}

/// `192.0.2.1`, `192.0.2.1:4711`, `[2001:db8::1]`, `[2001:db8::1]:4711`, `2001:db8::1`.
fn parse_node(node: &str) -> Option<IpAddr> {
    if let Some(rest) = node.strip_prefix('[') {
        let (addr, _port) = rest.split_once(']')?;
        return addr
            .parse::<Ipv6Addr>()
            .ok()
            .map(|ip| IpAddr::V6(ip).to_canonical());
    }
    if let Ok(ip) = node.parse::<IpAddr>() {
        return Some(ip.to_canonical());
    }
    let (addr, _port) = node.rsplit_once(':')?;
    addr.parse::<Ipv4Addr>().ok().map(IpAddr::V4)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                axum::http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                value.parse().unwrap(),
            );
        }
        map
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn cidrs() {
        let c = Cidr::parse("10.0.0.0/8").unwrap();
        assert!(c.contains(ip("10.1.2.3")));
        assert!(c.contains(ip("::ffff:10.1.2.3")));
        assert!(!c.contains(ip("11.0.0.1")));
        assert!(Cidr::parse("0.0.0.0/0").unwrap().contains(ip("8.8.8.8")));
        assert!(Cidr::parse("::1").unwrap().contains(ip("::1")));
        assert!(Cidr::parse("2001:db8::/32")
            .unwrap()
            .contains(ip("2001:db8:1::5")));
        assert!(Cidr::parse("10.0.0.0/33").is_err());
        assert!(Cidr::parse("proxy.example").is_err());
    }

    /// A client's own part of the line that is not text does not hide the hop the proxy
    /// appended after it (nginx's `$proxy_add_x_forwarded_for` appends to the client's line).
    #[test]
    fn bytes_that_are_not_text_hide_only_their_own_element() {
        let ranges = ["127.0.0.0/8".into()];
        let line = |value: &[u8]| {
            let mut map = HeaderMap::new();
            let value = HeaderValue::from_bytes(value).unwrap();
            map.append("x-forwarded-for", value.clone());
            map.append(header::FORWARDED, value);
            map
        };
        let xff = TrustedProxies::parse(&ranges, ProxyHeader::XForwardedFor).unwrap();
        let both = line(b"\xff, 203.0.113.9");
        assert_eq!(xff.client_ip(ip("127.0.0.1"), &both), ip("203.0.113.9"));
        let fwd = TrustedProxies::parse(&ranges, ProxyHeader::Forwarded).unwrap();
        let both = line(b"for=\xff, for=203.0.113.9");
        assert_eq!(fwd.client_ip(ip("127.0.0.1"), &both), ip("203.0.113.9"));
    }

    #[test]
    fn forwarding_headers_are_believed_only_from_trusted_peers() {
        let ranges = ["127.0.0.0/8".into(), "10.0.0.0/8".into()];
        let proxies = TrustedProxies::parse(&ranges, ProxyHeader::XForwardedFor).unwrap();
        let xff = headers(&[("x-forwarded-for", "203.0.113.9, 198.51.100.7, 10.0.0.2")]);
        // Not from a proxy: the peer, whatever the header says.
        assert_eq!(proxies.client_ip(ip("192.0.2.1"), &xff), ip("192.0.2.1"));
        // From a proxy: the nearest untrusted hop (a client cannot forge past it).
        assert_eq!(proxies.client_ip(ip("127.0.0.1"), &xff), ip("198.51.100.7"));
        // No header: the peer.
        assert_eq!(
            proxies.client_ip(ip("127.0.0.1"), &HeaderMap::new()),
            ip("127.0.0.1")
        );
        // Only the header the proxies write is read: a client's own `Forwarded` passes
        // through a proxy that writes X-Forwarded-For, and the other way round.
        let fwd = headers(&[
            ("x-forwarded-for", "192.0.2.200"),
            (
                "forwarded",
                "for=192.0.2.43, for=\"[2001:db8:cafe::17]:4711\";proto=https",
            ),
        ]);
        assert_eq!(proxies.client_ip(ip("10.9.9.9"), &fwd), ip("192.0.2.200"));
        let rfc = TrustedProxies::parse(&ranges, ProxyHeader::parse("Forwarded").unwrap()).unwrap();
        // Quoted IPv6 with a port.
        assert_eq!(rfc.client_ip(ip("10.9.9.9"), &fwd), ip("2001:db8:cafe::17"));
        assert_eq!(rfc.client_ip(ip("10.9.9.9"), &xff), ip("10.9.9.9"));
        // An unreadable hop stops the walk at the last trusted one.
        let hidden = headers(&[("forwarded", "for=192.0.2.43, for=_hidden, for=10.0.0.5")]);
        assert_eq!(rfc.client_ip(ip("10.0.0.1"), &hidden), ip("10.0.0.5"));
        assert!(ProxyHeader::parse("x-real-ip").is_err());
        // No trusted proxies configured: always the peer.
        assert_eq!(
            TrustedProxies::default().client_ip(ip("127.0.0.1"), &xff),
            ip("127.0.0.1")
        );
    }
}
