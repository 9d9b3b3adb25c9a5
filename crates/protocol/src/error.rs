//! The flat, stable set of error codes clients see in `error` frames (v1) and
//! `{"error": CODE, "message": TEXT}` frames (legacy). Never rename a variant: clients
//! match on these strings.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The frame is not valid JSON.
    BadJson,
    /// The frame is JSON but not an object with a known `type`.
    UnknownType,
    /// The frame has a known `type` but a missing or ill-typed field.
    InvalidFrame,
    /// A command other than `auth` or `ping` before authentication.
    NotAuthenticated,
    /// `auth` sent on a connection that is already authenticated.
    AlreadyAuthenticated,
    /// The session key is unknown, revoked or expired.
    AuthFailed,
    /// The room name is empty, too long or has control characters.
    InvalidRoom,
    /// The session may not use this room.
    ForbiddenRoom,
    /// The message text is empty or only whitespace.
    EmptyMessage,
    /// The message text is over the size limit.
    MessageTooLarge,
    /// The message text contains a NUL character.
    InvalidText,
    /// `client_msg_id` is empty or over 128 bytes.
    InvalidClientMsgId,
    /// A `since` beyond the room's last seq.
    BadSince,
    /// A command about a room this connection has not joined.
    NotJoined,
    /// The connection is in as many rooms as it may be.
    TooManyRooms,
    /// Too many messages too fast; slow down.
    RateLimited,
    /// The store could not commit or read right now; retry (with the same `client_msg_id`).
    Unavailable,
    /// The server is shutting down; reconnect elsewhere and retry.
    ShuttingDown,
    /// Anything else; the connection goes on.
    Internal,
}

impl ErrorCode {
    /// The code as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BadJson => "bad_json",
            Self::UnknownType => "unknown_type",
            Self::InvalidFrame => "invalid_frame",
            Self::NotAuthenticated => "not_authenticated",
            Self::AlreadyAuthenticated => "already_authenticated",
            Self::AuthFailed => "auth_failed",
            Self::InvalidRoom => "invalid_room",
            Self::ForbiddenRoom => "forbidden_room",
            Self::EmptyMessage => "empty_message",
            Self::MessageTooLarge => "message_too_large",
            Self::InvalidText => "invalid_text",
            Self::InvalidClientMsgId => "invalid_client_msg_id",
            Self::BadSince => "bad_since",
            Self::NotJoined => "not_joined",
            Self::TooManyRooms => "too_many_rooms",
            Self::RateLimited => "rate_limited",
            Self::Unavailable => "unavailable",
            Self::ShuttingDown => "shutting_down",
            Self::Internal => "internal",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_form_matches_as_str() {
        for code in [
            ErrorCode::BadJson,
            ErrorCode::UnknownType,
            ErrorCode::RateLimited,
            ErrorCode::Unavailable,
            ErrorCode::InvalidClientMsgId,
        ] {
            let json = serde_json::to_string(&code).unwrap();
            assert_eq!(json, format!("\"{}\"", code.as_str()));
        }
    }
}
