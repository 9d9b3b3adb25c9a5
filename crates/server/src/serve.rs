//! The accept loop of the one listener (axum-server over hyper): plain HTTP or TLS,
//! TCP_NODELAY on every connection, HTTP/1.1 only, and the handshake limits: the TLS
//! handshake and then the first request head each within `handshake_timeout_secs`
//! (slowloris), later request heads too, and a request head over `max_header_bytes` answered
//! with 431.
//!
//! Graceful stop: when the shutdown token is cancelled the listener stops accepting and
//! plain HTTP requests in flight finish (bounded by `shutdown_grace_secs`). Upgraded
//! WebSockets are not hyper's any more: the `TaskTracker` in `Shared` waits for them.
//!
//! A plain TCP connection is shared (`SharedTcp`): hyper reads and writes through one
//! handle, and every request on the connection carries another (`RawSocket`), so that a
//! WebSocket upgraded on it writes its frames straight to the socket, without hyper's
//! upgrade layers in between (`hub::outbox`). A TLS connection has no such handle: its
//! frames go through the TLS stream.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use axum::Router;
use axum_server::accept::{Accept, NoDelayAcceptor};
use axum_server::tls_rustls::RustlsAcceptor;
use axum_server::Handle;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

use crate::app::Shared;
use crate::config::Settings;
use crate::tls::Tls;

/// hyper's smallest allowed read buffer: the buffer for a smaller `max_header_bytes` is
/// raised to it (the limit itself stays as set).
pub const MIN_BUF_BYTES: usize = 8192;

/// Serve `router` on `listener` until the shutdown token is cancelled.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    shared: &Arc<Shared>,
    tls: Option<Tls>,
) -> std::io::Result<()> {
    let settings = &shared.settings;
    let handle: Handle<SocketAddr> = Handle::new();
    let stopper = handle.clone();
    let grace = settings.shutdown_grace();
    let stopping = Arc::clone(shared);
    let served = tokio_util::sync::CancellationToken::new();
    let over = served.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = stopping.shutdown.cancelled() => {}
            _ = over.cancelled() => return,
        }
        // The stop's deadline counts from here (`Shared::stop_began`).
        stopping.stop_began(tokio::time::Instant::now());
        stopper.graceful_shutdown(Some(grace));
        // A hurried stop does not wait for HTTP requests still running either.
        tokio::select! {
            _ = stopping.hurry.cancelled() => stopper.shutdown(),
            _ = over.cancelled() => {}
        }
    });
    let _served = served.drop_guard();
    let mut server = axum_server::Server::<SocketAddr>::from_listener(listener)
        .handle(handle)
        .first_request_timeout(settings.handshake_timeout())
        .accept_error_handler(accept_failed);
    *server.http_builder() = http_builder(settings);
    let service = router.into_make_service_with_connect_info::<SocketAddr>();
    match tls {
        None => server.acceptor(PlainAcceptor).serve(service).await,
        Some(tls) => {
            let acceptor = RustlsAcceptor::new(tls.rustls_config())
                .handshake_timeout(settings.handshake_timeout())
                .acceptor(NoDelayAcceptor::new());
            server.acceptor(acceptor).serve(service).await
        }
    }
}

/// A connection that could not be taken: the listener's `accept` failed (out of file
/// descriptors: it is tried again every 50 ms, while clients wait in the backlog), or a
/// connection's TLS handshake did. Counted; the first logged at most once a second.
fn accept_failed(peer: Option<&SocketAddr>, e: &io::Error) {
    static LOGGED_AT_SEC: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    match peer {
        None => {
            metrics::counter!("wschat_accept_errors_total", "stage" => "accept").increment(1);
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            let before = LOGGED_AT_SEC.swap(now, std::sync::atomic::Ordering::Relaxed);
            if before != now {
                tracing::warn!(error = %e, "cannot accept connections (out of file descriptors? see LimitNOFILE); trying again");
            }
        }
        Some(peer) => {
            metrics::counter!("wschat_accept_errors_total", "stage" => "handshake").increment(1);
            tracing::debug!(%peer, error = %e, "a connection's TLS handshake failed");
        }
    }
}

fn http_builder(settings: &Settings) -> Builder<TokioExecutor> {
    let mut builder = Builder::new(TokioExecutor::new()).http1_only();
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(settings.handshake_timeout())
        // Twice the limit: a head up to that reaches `limits::limit_head_size`, which
        // answers and counts it (`wschat_refused_total{reason="header_size"}`); hyper
        // refuses a larger one itself, uncounted, before it is all in memory.
        .max_buf_size(
            settings
                .max_header_bytes
                .saturating_mul(2)
                .max(MIN_BUF_BYTES),
        );
    builder
}

/// A plain TCP connection's socket, for the requests on it: what an upgraded WebSocket
/// writes its frames to.
#[derive(Clone, Debug)]
pub(crate) struct RawSocket(pub Arc<TcpStream>);

/// Plain TCP: `TCP_NODELAY`, the socket shared between hyper (`SharedTcp`) and the
/// requests (`RawSocket` in their extensions).
#[derive(Clone, Copy, Debug, Default)]
struct PlainAcceptor;

impl<S> Accept<TcpStream, S> for PlainAcceptor {
    type Stream = SharedTcp;
    type Service = WithSocket<S>;
    type Future = std::future::Ready<io::Result<(SharedTcp, WithSocket<S>)>>;

    fn accept(&self, stream: TcpStream, service: S) -> Self::Future {
        std::future::ready(stream.set_nodelay(true).map(|()| {
            let stream = Arc::new(stream);
            let service = WithSocket {
                inner: service,
                socket: RawSocket(Arc::clone(&stream)),
            };
            (SharedTcp(stream), service)
        }))
    }
}

/// A connection's service, adding its `RawSocket` to every request.
#[derive(Clone)]
pub(crate) struct WithSocket<S> {
    inner: S,
    socket: RawSocket,
}

impl<S, B> tower_service::Service<http::Request<B>> for WithSocket<S>
where
    S: tower_service::Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        request.extensions_mut().insert(self.socket.clone());
        self.inner.call(request)
    }
}

/// A TCP stream read and written through a shared handle (tokio's readiness, then the
/// non-blocking call), so that others can hold it too.
pub(crate) struct SharedTcp(pub Arc<TcpStream>);

impl AsyncRead for SharedTcp {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            ready!(self.0.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            let len = unfilled.len();
            match once(&self.0, Interest::READABLE, len, || {
                self.0.try_read(unfilled)
            }) {
                Ok(n) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

/// One non-blocking call on the socket. A call that moved fewer bytes than asked drained
/// the socket (or filled it): its readiness is cleared, as tokio's own `TcpStream` does,
/// so that the next call waits for the next event instead of a system call that would
/// only say `WouldBlock` (one `recvfrom` too many per inbound message).
fn once(
    tcp: &TcpStream,
    interest: Interest,
    len: usize,
    call: impl FnOnce() -> io::Result<usize>,
) -> io::Result<usize> {
    let mut moved = 0;
    let result = tcp.try_io(interest, || {
        moved = call()?;
        // Where readiness is edge-triggered (epoll, kqueue), as tokio's own check.
        if cfg!(not(windows)) && moved > 0 && moved < len {
            // Clears the readiness this call was made under (not a newer event's).
            Err(io::ErrorKind::WouldBlock.into())
        } else {
            Ok(moved)
        }
    });
    match result {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock && moved > 0 => Ok(moved),
        other => other,
    }
}

impl AsyncWrite for SharedTcp {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            ready!(self.0.poll_write_ready(cx))?;
            match once(&self.0, Interest::WRITABLE, buf.len(), || {
                self.0.try_write(buf)
            }) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                result => return Poll::Ready(result),
            }
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        // Not through `once`, as in tokio: a short `writev` may only mean more slices
        // than one call takes (IOV_MAX), on a socket that is still writable.
        loop {
            ready!(self.0.poll_write_ready(cx))?;
            match self.0.try_write_vectored(bufs) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                result => return Poll::Ready(result),
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let result = socket2::SockRef::from(&*self.0).shutdown(std::net::Shutdown::Write);
        Poll::Ready(match result {
            Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(()),
            other => other,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Whether tokio still holds the socket readable: asked without a system call (the
    /// closure runs only when it does, and leaves the readiness as it is).
    fn still_readable(tcp: &TcpStream) -> bool {
        tcp.try_io(Interest::READABLE, || Ok(())).is_ok()
    }

    /// A read that took less than the buffer drained the socket: the next read waits for
    /// the next event rather than calling `recvfrom` to learn that nothing is there. A
    /// read that filled the buffer may have left more behind: it stays readable.
    #[tokio::test]
    async fn a_short_read_clears_the_readiness_and_a_full_one_keeps_it() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let mut client = TcpStream::connect(listener.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        let tcp = Arc::new(server);
        let mut shared = SharedTcp(Arc::clone(&tcp));

        client.write_all(b"hello").await.expect("write");
        let mut buf = [0u8; 64];
        assert_eq!(shared.read(&mut buf).await.expect("read"), 5);
        assert!(
            !still_readable(&tcp),
            "a short read left the socket readable"
        );

        client.write_all(&[7u8; 100]).await.expect("write");
        let mut small = [0u8; 64];
        assert_eq!(shared.read(&mut small).await.expect("read"), 64);
        assert!(
            still_readable(&tcp),
            "a full read may have left bytes behind"
        );
        assert_eq!(shared.read(&mut small).await.expect("read"), 36);

        // What comes next is read: the cleared readiness comes back with the next event.
        client.write_all(b"again").await.expect("write");
        assert_eq!(shared.read(&mut buf).await.expect("read"), 5);
        assert_eq!(&buf[..5], b"again");
    }
}
