//! The accept loop of the one listener (axum-server over hyper): plain HTTP or TLS,
//! TCP_NODELAY on every connection, HTTP/1.1 only, and the handshake limits: the TLS
//! handshake and then the first request head each within `handshake_timeout_secs`
//! (slowloris), later request heads too, and a request head over `max_header_bytes` answered
//! with 431.
//!
//! Graceful stop: when the shutdown token is cancelled the listener stops accepting and
//! plain HTTP requests in flight finish (bounded by `shutdown_grace_secs`). Upgraded
//! WebSockets are not hyper's any more: the `TaskTracker` in `Shared` waits for them.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum_server::accept::NoDelayAcceptor;
use axum_server::tls_rustls::RustlsAcceptor;
use axum_server::Handle;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use tokio::net::TcpListener;

use crate::app::Shared;
use crate::config::Settings;
use crate::tls::Tls;

/// hyper's smallest allowed read buffer: a smaller `max_header_bytes` is raised to it.
pub const MIN_HEADER_BYTES: usize = 8192;

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
    let stop = shared.shutdown.clone();
    let grace = settings.shutdown_grace();
    tokio::spawn(async move {
        stop.cancelled().await;
        stopper.graceful_shutdown(Some(grace));
    });
    let mut server = axum_server::Server::<SocketAddr>::from_listener(listener)
        .handle(handle)
        .first_request_timeout(settings.handshake_timeout());
    *server.http_builder() = http_builder(settings);
    let service = router.into_make_service_with_connect_info::<SocketAddr>();
    match tls {
        None => server.acceptor(NoDelayAcceptor::new()).serve(service).await,
        Some(tls) => {
            let acceptor = RustlsAcceptor::new(tls.rustls_config())
                .handshake_timeout(settings.handshake_timeout())
                .acceptor(NoDelayAcceptor::new());
            server.acceptor(acceptor).serve(service).await
        }
    }
}

fn http_builder(settings: &Settings) -> Builder<TokioExecutor> {
    let mut builder = Builder::new(TokioExecutor::new()).http1_only();
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(settings.handshake_timeout())
        .max_buf_size(settings.max_header_bytes.max(MIN_HEADER_BYTES));
    builder
}
