//! The HTTP side of the one listener: health, metrics, the chat page and its assets,
//! `/ws` (protocol v1), and every other WebSocket upgrade routed to the legacy protocol.

pub mod admin;
pub mod assets;
mod health;
pub mod origin;

use std::sync::{Arc, OnceLock};

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;

use crate::app::Shared;
use crate::gateway;

static METRICS: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Install the process-wide Prometheus recorder (once; later calls do nothing).
pub fn install_metrics() {
    METRICS.get_or_init(|| match crate::telemetry::builder().install_recorder() {
        Ok(handle) => {
            crate::telemetry::registered(&handle);
            Some(handle)
        }
        Err(e) => {
            tracing::warn!(error = %e, "metrics recorder not installed");
            None
        }
    });
}

pub fn router(shared: Arc<Shared>) -> Router {
    let page = assets::Assets::new(&shared.settings.frame_ancestors);
    let asset = page.clone();
    let chat = get(move || async move { page.chat_page() });
    Router::new()
        .route("/livez", get(|| async { "ok\n" }))
        .route("/healthz", get(healthz))
        .route("/readyz", get(health::readyz))
        .route("/metrics", get(metrics_text))
        .route("/ws", get(gateway::v1::handle))
        // nodejschat's page server (express) answered `/chat/` too.
        .route("/chat", chat.clone())
        .route("/chat/", chat)
        .route(
            "/assets/{file}",
            get(move |file| async move { asset.asset(file) }),
        )
        .nest("/admin/v1", admin::router(shared.clone()))
        .layer(middleware::from_fn_with_state(
            shared.clone(),
            route_legacy_upgrades,
        ))
        .layer(middleware::from_fn_with_state(
            shared.clone(),
            crate::limits::limit_head_size,
        ))
        .with_state(shared)
}

/// nodejschat's clients upgrade on any path: every upgrade but `/ws` is legacy.
async fn route_legacy_upgrades(
    State(shared): State<Arc<Shared>>,
    request: Request,
    next: Next,
) -> Response {
    let is_upgrade = request
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    if is_upgrade && request.uri().path() != "/ws" {
        return gateway::legacy::handle(shared, request).await;
    }
    next.run(request).await
}

/// 200 once the server can serve (migrations applied, store reachable, not draining).
async fn healthz(State(shared): State<Arc<Shared>>) -> Response {
    if shared.is_draining() {
        return (StatusCode::SERVICE_UNAVAILABLE, "draining\n").into_response();
    }
    // Bounded as `/readyz`'s checks are: a stalled database answers 503 in 2 s, not when
    // its statement timeout ends the ping.
    match tokio::time::timeout(health::CHECK_TIMEOUT, shared.store.ping()).await {
        Ok(Ok(())) => (StatusCode::OK, "ok\n").into_response(),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "health check: store unreachable");
            (StatusCode::SERVICE_UNAVAILABLE, "store unreachable\n").into_response()
        }
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "store unreachable: no answer in 2 s\n",
        )
            .into_response(),
    }
}

async fn metrics_text(State(shared): State<Arc<Shared>>) -> Response {
    metrics::gauge!("wschat_rooms").set(shared.hub.room_count() as f64);
    match METRICS.get().and_then(Option::as_ref) {
        Some(handle) => (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4"),
            )],
            handle.render(),
        )
            .into_response(),
        None => (StatusCode::SERVICE_UNAVAILABLE, "metrics unavailable\n").into_response(),
    }
}
