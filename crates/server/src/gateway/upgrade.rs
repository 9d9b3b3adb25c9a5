//! The WebSocket handshake over hyper's upgrade, as axum's `WebSocketUpgrade` does it, but
//! handing over the upgraded socket itself: tungstenite reads it and the outbox writes
//! encoded frames (`hub::outbox`): straight to the TCP socket on a plain connection
//! (`serve::RawSocket`), through the other half of the TLS stream otherwise.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::extract::FromRequestParts;
use axum::http::{header, request::Parts, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf, ReadHalf};
use tokio::net::TcpStream;

use crate::hub::Outbox;
use crate::serve::RawSocket;

/// The upgraded connection's socket.
pub(crate) type Io = TokioIo<Upgraded>;

/// What a connection gets once hyper hands its socket over.
pub(crate) struct Handover {
    pub io: Io,
    /// The TCP socket itself, on a plain connection.
    pub raw: Option<Arc<TcpStream>>,
}

/// Why a request is not a WebSocket handshake (axum's answers to the same requests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Rejection {
    MethodNotGet,
    ConnectionHeader,
    UpgradeHeader,
    VersionHeader,
    KeyMissing,
    NotUpgradable,
}

impl IntoResponse for Rejection {
    fn into_response(self) -> Response {
        let (status, text) = match self {
            Self::MethodNotGet => (
                StatusCode::METHOD_NOT_ALLOWED,
                "Request method must be `GET`",
            ),
            Self::ConnectionHeader => (
                StatusCode::BAD_REQUEST,
                "Connection header did not include 'upgrade'",
            ),
            Self::UpgradeHeader => (
                StatusCode::BAD_REQUEST,
                "`Upgrade` header did not include 'websocket'",
            ),
            Self::VersionHeader => (
                StatusCode::UPGRADE_REQUIRED,
                "`Sec-WebSocket-Version` header did not include '13'",
            ),
            Self::KeyMissing => (
                StatusCode::BAD_REQUEST,
                "`Sec-WebSocket-Key` header missing",
            ),
            Self::NotUpgradable => (
                StatusCode::UPGRADE_REQUIRED,
                "WebSocket request couldn't be upgraded since no upgrade state was present",
            ),
        };
        let mut response = (status, text).into_response();
        if self == Self::VersionHeader {
            // RFC 6455 4.2.2: the answer names the version this server speaks.
            response.headers_mut().insert(
                axum::http::header::SEC_WEBSOCKET_VERSION,
                HeaderValue::from_static("13"),
            );
        }
        response
    }
}

/// A valid WebSocket handshake request.
pub(crate) struct Upgrade {
    key: HeaderValue,
    on_upgrade: OnUpgrade,
    /// The subprotocols the client offered.
    offered: Vec<String>,
    raw: Option<RawSocket>,
}

impl<S: Send + Sync> FromRequestParts<S> for Upgrade {
    type Rejection = Rejection;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Rejection> {
        if parts.method != Method::GET {
            return Err(Rejection::MethodNotGet);
        }
        let headers = &parts.headers;
        if !header_contains(headers, header::CONNECTION, "upgrade") {
            return Err(Rejection::ConnectionHeader);
        }
        if !header_is(headers, header::UPGRADE, "websocket") {
            return Err(Rejection::UpgradeHeader);
        }
        if !header_is(headers, header::SEC_WEBSOCKET_VERSION, "13") {
            return Err(Rejection::VersionHeader);
        }
        let key = headers
            .get(header::SEC_WEBSOCKET_KEY)
            .ok_or(Rejection::KeyMissing)?
            .clone();
        let offered = headers
            .get_all(header::SEC_WEBSOCKET_PROTOCOL)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(|p| p.trim().to_owned())
            .collect();
        let on_upgrade = parts
            .extensions
            .remove::<OnUpgrade>()
            .ok_or(Rejection::NotUpgradable)?;
        let raw = parts.extensions.remove::<RawSocket>();
        Ok(Self {
            key,
            on_upgrade,
            offered,
            raw,
        })
    }
}

impl Upgrade {
    /// Did the client offer `protocol` in `Sec-WebSocket-Protocol`?
    pub fn offers(&self, protocol: &str) -> bool {
        self.offered.iter().any(|p| p == protocol)
    }

    /// The first subprotocol the client offered other than `but`, if any.
    pub fn first_offered_but(&self, but: &str) -> Option<String> {
        self.offered
            .iter()
            .find(|p| !p.is_empty() && *p != but)
            .cloned()
    }

    /// The `101 Switching Protocols` answer (selecting `protocol`, when given); `run` gets
    /// the socket once hyper hands it over.
    pub fn respond<F, Fut>(self, protocol: Option<String>, run: F) -> Response
    where
        F: FnOnce(Handover) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let accept = tungstenite::handshake::derive_accept_key(self.key.as_bytes());
        let on_upgrade = self.on_upgrade;
        let raw = self.raw.map(|r| r.0);
        tokio::spawn(async move {
            match on_upgrade.await {
                Ok(upgraded) => {
                    let io = TokioIo::new(upgraded);
                    run(Handover { io, raw }).await
                }
                Err(e) => tracing::debug!(error = %e, "upgrade failed"),
            }
        });
        let mut response = (
            StatusCode::SWITCHING_PROTOCOLS,
            [
                (header::CONNECTION, HeaderValue::from_static("upgrade")),
                (header::UPGRADE, HeaderValue::from_static("websocket")),
            ],
        )
            .into_response();
        let headers = response.headers_mut();
        if let Ok(accept) = HeaderValue::from_str(&accept) {
            headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
        }
        if let Some(protocol) = protocol.and_then(|p| HeaderValue::from_str(&p).ok()) {
            headers.insert(header::SEC_WEBSOCKET_PROTOCOL, protocol);
        }
        response
    }
}

fn header_is(headers: &HeaderMap, name: header::HeaderName, value: &str) -> bool {
    headers
        .get(name)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(value.as_bytes()))
}

fn header_contains(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.to_ascii_lowercase().contains(token))
}

/// What tungstenite reads: the whole upgraded socket when the outbox writes to the TCP
/// socket itself, else the read half of it.
pub(crate) enum ReadIo {
    Whole(Io),
    Half(ReadHalf<Io>),
}

/// What tungstenite reads from and writes to: the socket, and the outbox for what
/// tungstenite writes itself (pongs), so that those bytes keep their place among the
/// frames the outbox writes. (Its answer to a client's close it would write only on a next
/// read, which never comes: the gateway answers with the outbox's own close frame.)
pub(crate) struct ReadSide {
    read: ReadIo,
    outbox: Arc<Outbox>,
}

impl ReadSide {
    pub fn new(read: ReadIo, outbox: Arc<Outbox>) -> Self {
        Self { read, outbox }
    }
}

impl AsyncRead for ReadSide {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match &mut self.read {
            ReadIo::Whole(io) => Pin::new(io).poll_read(cx, buf),
            ReadIo::Half(half) => Pin::new(half).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ReadSide {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.outbox.push_raw(Bytes::copy_from_slice(buf));
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
