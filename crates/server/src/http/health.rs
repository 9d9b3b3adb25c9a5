//! `/readyz`: whether a load balancer should send this node traffic. 200 `ok` when the
//! store and the broker answer and the server is not draining; 503 with the reasons
//! otherwise, one line each (`draining`, `store unreachable`, `broker unreachable: …`).

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use crate::app::Shared;
use crate::broker::BrokerError;

/// A check that has not answered in this long has failed.
pub(crate) const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

pub(crate) async fn readyz(State(shared): State<Arc<Shared>>) -> Response {
    if shared.is_draining() {
        return (StatusCode::SERVICE_UNAVAILABLE, "draining\n").into_response();
    }
    let (store, broker) = tokio::join!(
        tokio::time::timeout(CHECK_TIMEOUT, shared.store.ping()),
        tokio::time::timeout(CHECK_TIMEOUT, shared.broker.ping()),
    );
    let mut problems = Vec::new();
    match store {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "readiness: store unreachable");
            problems.push("store unreachable".to_owned());
        }
        Err(_) => problems.push("store unreachable: no answer in 2 s".to_owned()),
    }
    let name = shared.broker.name();
    match broker {
        Ok(Ok(())) => {}
        Ok(Err(BrokerError::Unreachable(state))) => {
            problems.push(format!("broker unreachable: {state}"));
        }
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "readiness: broker unreachable");
            problems.push(format!("broker unreachable: {name}"));
        }
        Err(_) => problems.push(format!("broker unreachable: {name}: no answer in 2 s")),
    }
    if problems.is_empty() {
        (StatusCode::OK, "ok\n").into_response()
    } else {
        let mut body = problems.join("\n");
        body.push('\n');
        (StatusCode::SERVICE_UNAVAILABLE, body).into_response()
    }
}
