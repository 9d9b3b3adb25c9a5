//! The admin API under `/admin/v1/…` (docs/admin-api.md): sessions (create, revoke), a
//! message to a room from a named system sender, rooms with their members, and nodes.
//!
//! Off unless `admin_token` is set: every admin route is then 404, as if it did not
//! exist. With a token, a request without `Authorization: Bearer <token>` gets 401. The
//! token is compared in constant time (both sides hashed first, so that neither its length
//! nor its content leaks through timing). Keys and message bodies never reach a log line.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use wschat_protocol::RoomName;

use crate::app::{Shared, NODE_TTL};
use crate::commit::CommitError;
use crate::store::{self, format_time, CommitOutcome, NewMessage, StoreError};

/// Longest user name the admin API accepts, in bytes.
const MAX_USER_BYTES: usize = 256;
/// Longest chosen session key, in bytes.
const MAX_KEY_BYTES: usize = 512;
/// Most rooms one `GET /admin/v1/rooms` returns.
const MAX_ROOMS_PAGE: u32 = 1000;

/// The admin routes (nested under `/admin/v1`), behind the token check.
pub fn router(shared: Arc<Shared>) -> Router<Arc<Shared>> {
    Router::new()
        .route("/sessions", post(create_session))
        .route("/sessions/revoke", post(revoke_sessions))
        .route("/rooms", get(list_rooms))
        .route("/rooms/{room}/messages", post(post_message))
        .route("/nodes", get(list_nodes))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route") })
        .layer(middleware::from_fn_with_state(shared, check_token))
}

/// An error answer: `{"error": code, "message": …}`.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    fn unavailable(e: &StoreError) -> Self {
        tracing::warn!(error = %e, "admin API: store error");
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "the store could not answer; retry",
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Json(serde_json::json!({"error": self.code, "message": self.message}));
        if self.status == StatusCode::UNAUTHORIZED {
            return (
                self.status,
                [(header::WWW_AUTHENTICATE, "Bearer realm=\"wschat admin\"")],
                body,
            )
                .into_response();
        }
        (self.status, body).into_response()
    }
}

/// 404 when the admin API is off; 401 unless the bearer token matches.
async fn check_token(State(shared): State<Arc<Shared>>, request: Request, next: Next) -> Response {
    let Some(expected) = shared.settings.admin_token.as_ref() else {
        return StatusCode::NOT_FOUND.into_response();
    };
    if token_matches(request.headers(), expected.expose()) {
        next.run(request).await
    } else {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing or wrong bearer token",
        )
        .into_response()
    }
}

fn token_matches(headers: &HeaderMap, expected: &str) -> bool {
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim)
        .unwrap_or("");
    let given = Sha256::digest(given.as_bytes());
    let expected = Sha256::digest(expected.as_bytes());
    bool::from(given[..].ct_eq(&expected[..]))
}

/// Parse a JSON body, answering 400 with serde's reason when it does not fit.
fn body<T: serde::de::DeserializeOwned>(
    body: Result<Json<T>, axum::extract::rejection::JsonRejection>,
) -> Result<T, ApiError> {
    body.map(|Json(t)| t)
        .map_err(|rejection| ApiError::bad_request(rejection.body_text()))
}

fn check_user(user: &str) -> Result<(), ApiError> {
    if user.trim().is_empty() {
        return Err(ApiError::bad_request("`user` must not be empty"));
    }
    if user.len() > MAX_USER_BYTES {
        return Err(ApiError::bad_request(format!(
            "`user` is longer than {MAX_USER_BYTES} bytes"
        )));
    }
    if user.chars().any(char::is_control) {
        return Err(ApiError::bad_request("`user` contains control characters"));
    }
    Ok(())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateSession {
    user: String,
    /// The one room the session may use (nodejschat's `room` column).
    room: Option<i64>,
    /// A chosen key; by default a random one (256 bits).
    key: Option<String>,
}

#[derive(Serialize)]
struct CreatedSession {
    key: String,
    user: String,
    room: Option<i64>,
}

/// `POST /admin/v1/sessions`: 201 with the key, shown this once (only its hash is kept).
async fn create_session(
    State(shared): State<Arc<Shared>>,
    request: Result<Json<CreateSession>, axum::extract::rejection::JsonRejection>,
) -> Result<(StatusCode, Json<CreatedSession>), ApiError> {
    let request = body(request)?;
    check_user(&request.user)?;
    if let Some(room) = request.room {
        if i32::try_from(room).is_err() || room < 0 {
            return Err(ApiError::bad_request(
                "`room` must be a number from 0 to 2147483647",
            ));
        }
    }
    let key = match request.key {
        Some(key) if key.is_empty() || key.len() > MAX_KEY_BYTES => {
            return Err(ApiError::bad_request(format!(
                "`key` must be 1 to {MAX_KEY_BYTES} bytes"
            )))
        }
        Some(key) => key,
        None => store::generate_key(),
    };
    match shared
        .store
        .create_session(&store::hash_key(&key), &request.user, request.room)
        .await
    {
        Ok(()) => {}
        Err(StoreError::Query(sqlx::Error::Database(e))) if e.is_unique_violation() => {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "conflict",
                "a session with this key exists",
            ))
        }
        Err(e) => return Err(ApiError::unavailable(&e)),
    }
    tracing::info!(user = %request.user, room = ?request.room, "admin: session created");
    Ok((
        StatusCode::CREATED,
        Json(CreatedSession {
            key,
            user: request.user,
            room: request.room,
        }),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Revoke {
    key: Option<String>,
    user: Option<String>,
}

/// `POST /admin/v1/sessions/revoke` with `{"key": …}` or `{"user": …}`: 200
/// `{"revoked": n}`. The key travels in the body, never in a URL (URLs reach access logs).
async fn revoke_sessions(
    State(shared): State<Arc<Shared>>,
    request: Result<Json<Revoke>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let revoked = match body(request)? {
        Revoke {
            key: Some(key),
            user: None,
        } if !key.is_empty() => shared.store.revoke_session(&store::hash_key(&key)).await,
        Revoke {
            key: None,
            user: Some(user),
        } if !user.is_empty() => shared.store.revoke_user_sessions(&user).await,
        _ => {
            return Err(ApiError::bad_request(
                "give exactly one of `key` or `user`, not empty",
            ))
        }
    }
    .map_err(|e| ApiError::unavailable(&e))?;
    tracing::info!(revoked, "admin: sessions revoked");
    Ok(Json(serde_json::json!({ "revoked": revoked })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PostMessage {
    text: String,
    /// The sender's name as shown [default: "system"].
    #[serde(default = "system")]
    user: String,
    /// Makes a retried post safe: the same `(user, client_msg_id)` is stored once.
    client_msg_id: Option<String>,
}

fn system() -> String {
    "system".into()
}

/// `POST /admin/v1/rooms/{room}/messages`: committed like any send (it gets the room's
/// next seq and reaches every member, on every node); 201 once committed.
async fn post_message(
    State(shared): State<Arc<Shared>>,
    Path(room): Path<String>,
    request: Result<Json<PostMessage>, axum::extract::rejection::JsonRejection>,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    let room = RoomName::new(room).map_err(|e| ApiError::bad_request(format!("room: {e}")))?;
    let request = body(request)?;
    check_user(&request.user)?;
    crate::gateway::check_text(&shared.settings, &request.text)
        .map_err(|(_code, message)| ApiError::bad_request(message))?;
    if let Some(cmid) = &request.client_msg_id {
        crate::gateway::check_client_msg_id(cmid)
            .map_err(|(_code, message)| ApiError::bad_request(message))?;
    }
    let has_id = request.client_msg_id.is_some();
    let outcome = shared
        .committer
        .send_and_wait(NewMessage {
            room,
            user: request.user,
            text: request.text,
            client_msg_id: request.client_msg_id,
        })
        .await
        .map_err(|e| {
            let code = match e {
                CommitError::Unavailable(_) | CommitError::Unconfirmed(_) => "unavailable",
                CommitError::ShuttingDown => "shutting_down",
            };
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, code, e.told(has_id))
        })?;
    let duplicate = matches!(outcome, CommitOutcome::Duplicate(_));
    let m = outcome.message();
    tracing::info!(room = %m.room, seq = m.seq, duplicate, "admin: message posted");
    Ok((
        if duplicate {
            StatusCode::OK
        } else {
            StatusCode::CREATED
        },
        Json(serde_json::json!({
            "room": m.room.as_str(),
            "seq": m.seq,
            "id": m.id,
            "user": m.user,
            "time": format_time(m.time_ms),
            "client_msg_id": m.client_msg_id,
            "duplicate": duplicate,
        })),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RoomsQuery {
    /// Rooms whose name sorts after this one (the previous page's `next`).
    after: Option<String>,
    limit: Option<u32>,
}

#[derive(Serialize)]
struct RoomSummary {
    room: String,
    /// The room's newest seq (0: no message yet).
    last_seq: u64,
    /// This node's connections in the room.
    connections: usize,
    /// Users present in the room, on any node.
    users: Vec<String>,
}

/// `GET /admin/v1/rooms[?after=NAME&limit=N]`: rooms by name (byte order), those known to
/// the store and those with members on this node, with `next` for the following page.
async fn list_rooms(
    State(shared): State<Arc<Shared>>,
    query: Result<Query<RoomsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let limit = query
        .limit
        .unwrap_or(MAX_ROOMS_PAGE)
        .clamp(1, MAX_ROOMS_PAGE);
    let after = match query.after {
        Some(name) => {
            Some(RoomName::new(name).map_err(|e| ApiError::bad_request(format!("after: {e}")))?)
        }
        None => None,
    };
    let stored = shared
        .store
        .list_rooms(after.as_ref(), limit)
        .await
        .map_err(|e| ApiError::unavailable(&e))?;
    let store_page_full = stored.len() == limit as usize;
    let last_stored = stored.last().map(|(name, _)| name.clone());
    let mut rooms: BTreeMap<RoomName, RoomSummary> = stored
        .into_iter()
        .map(|(name, last_seq)| {
            let summary = RoomSummary {
                room: name.to_string(),
                last_seq,
                connections: 0,
                users: Vec::new(),
            };
            (name, summary)
        })
        .collect();
    for (name, connections, users) in shared.hub.room_summaries() {
        let in_page = after.as_ref().is_none_or(|a| &name > a)
            && (!store_page_full || last_stored.as_ref().is_some_and(|l| &name <= l));
        if !in_page {
            continue;
        }
        let entry = rooms.entry(name.clone()).or_insert_with(|| RoomSummary {
            room: name.to_string(),
            last_seq: 0,
            connections: 0,
            users: Vec::new(),
        });
        entry.connections = connections;
        entry.users = users;
    }
    let mut rooms: Vec<RoomSummary> = rooms.into_values().collect();
    let truncated = rooms.len() > limit as usize;
    rooms.truncate(limit as usize);
    let next = if truncated || store_page_full {
        rooms.last().map(|r| r.room.clone())
    } else {
        None
    };
    Ok(Json(serde_json::json!({ "rooms": rooms, "next": next })))
}

/// `GET /admin/v1/nodes`: the nodes serving this database (heartbeat within the node TTL).
async fn list_nodes(
    State(shared): State<Arc<Shared>>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let nodes = shared
        .store
        .live_nodes(NODE_TTL)
        .await
        .map_err(|e| ApiError::unavailable(&e))?;
    let nodes: Vec<serde_json::Value> = nodes
        .into_iter()
        .map(|n| {
            serde_json::json!({
                "id": n.id,
                "broker": n.broker,
                "this": n.id == shared.node.id,
            })
        })
        .collect();
    Ok(Json(serde_json::json!({ "nodes": nodes })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_must_match_exactly() {
        let mut headers = HeaderMap::new();
        assert!(!token_matches(&headers, "s3cret-token-0123"));
        headers.insert(
            header::AUTHORIZATION,
            "Bearer s3cret-token-0123".parse().unwrap(),
        );
        assert!(token_matches(&headers, "s3cret-token-0123"));
        assert!(!token_matches(&headers, "s3cret-token-012"));
        assert!(!token_matches(&headers, "s3cret-token-01234"));
        headers.insert(header::AUTHORIZATION, "s3cret-token-0123".parse().unwrap());
        assert!(!token_matches(&headers, "s3cret-token-0123"));
    }
}
