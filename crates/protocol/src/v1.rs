//! Protocol v1 frames (spoken at `/ws`), as typed serde enums tagged by `"type"`.
//!
//! `docs/protocol.md` shows an example exchange for every frame. Room names travel as
//! strings and are validated by the server with [`crate::RoomName::new`], so that a bad
//! name gets the specific `invalid_room` code rather than a generic decode error.

use serde::{Deserialize, Serialize};

use crate::ErrorCode;

/// A client's correlation tag, echoed back on the reply (`ack`, `joined`, `error`, …).
/// Strings and non-negative integers are accepted and echoed as sent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Ref {
    Num(u64),
    Str(String),
}

/// One room in a `join`, with the last seq the client already has.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinRoom {
    pub room: String,
    /// The last seq the client has shown; the server sends everything after it.
    /// Absent: the server sends the room's last messages (the `history_limit` of `hello`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<u64>,
}

/// Frames a client sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientFrame {
    /// Authenticate with a session key (when it was not given in the handshake).
    Auth {
        key: String,
        #[serde(default, rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<Ref>,
    },
    /// Join one or more rooms, each optionally resuming after `since`.
    Join {
        rooms: Vec<JoinRoom>,
        #[serde(default, rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<Ref>,
    },
    /// Stop receiving a room's messages, presence and typing notices.
    Leave {
        room: String,
        #[serde(default, rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<Ref>,
    },
    /// Post a message. Answered by `ack` once committed. Joining is not required.
    Send {
        room: String,
        text: String,
        /// Idempotency key chosen by the client: a retry with the same id (from the same
        /// user) returns the first ack and stores nothing new.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        client_msg_id: Option<String>,
        #[serde(default, rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<Ref>,
    },
    /// Ask for one page of older messages.
    History {
        room: String,
        /// Only messages with a seq below this; absent: the newest page.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        before_seq: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        limit: Option<u32>,
        #[serde(default, rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<Ref>,
    },
    /// "I am typing" in a joined room; relayed to the room's other members.
    Typing { room: String },
    /// Application-level ping; answered by `pong`.
    Ping {
        #[serde(default, rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<Ref>,
    },
}

impl ClientFrame {
    /// The client's correlation tag, if the frame carries one.
    pub fn reference(&self) -> Option<&Ref> {
        match self {
            Self::Auth { reference, .. }
            | Self::Join { reference, .. }
            | Self::Leave { reference, .. }
            | Self::Send { reference, .. }
            | Self::History { reference, .. }
            | Self::Ping { reference } => reference.as_ref(),
            Self::Typing { .. } => None,
        }
    }
}

/// A stored message as it travels to clients.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageBody {
    pub room: String,
    pub seq: u64,
    pub id: i64,
    pub user: String,
    pub text: String,
    /// RFC 3339, UTC, milliseconds: `2016-08-08T17:20:32.421Z`.
    pub time: String,
}

/// The limits this server applies, announced in `hello`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Longest message text, in bytes.
    pub max_message_bytes: usize,
    /// Messages sent on `join` without `since`.
    pub history_limit: u32,
    /// Largest `limit` a `history` request may ask for.
    pub max_history_page: u32,
    /// Rooms one connection may be in at once.
    pub max_rooms_per_connection: usize,
}

/// Frames the server sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame {
    /// Sent once, after authentication.
    Hello {
        user: String,
        protocol: u32,
        server: String,
        /// The only room this session may use, when its session row names one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        session_room: Option<String>,
        /// The room this session's legacy connections are in (`session_room`, or `"0"`
        /// for a session without one): where a client with no rooms of its own starts, so
        /// that it meets nodejschat's clients of the same session.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        default_room: Option<String>,
        limits: Limits,
    },
    /// A room was joined. `last_seq` is the room's newest seq when the backfill was read;
    /// the backfill (messages after `since`, or the last ones) follows, then live messages.
    Joined {
        room: String,
        last_seq: u64,
        #[serde(default, rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<Ref>,
    },
    /// The `since` of a join is older than what the server keeps: drop what you show of
    /// this room; the room's last messages follow, and older ones are there by `history`.
    Reset {
        room: String,
        since: u64,
        /// The oldest seq the server still keeps.
        first_seq: u64,
    },
    /// A room was left.
    Left {
        room: String,
        #[serde(default, rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<Ref>,
    },
    /// A message of a joined room (backfill or live), in seq order per room.
    Message(MessageBody),
    /// A `send` was committed.
    Ack {
        room: String,
        seq: u64,
        id: i64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        client_msg_id: Option<String>,
        time: String,
        #[serde(default, rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<Ref>,
    },
    /// One page of older messages, oldest first.
    History {
        room: String,
        messages: Vec<MessageBody>,
        /// Whether messages older than the first of this page exist.
        has_more: bool,
        #[serde(default, rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<Ref>,
    },
    /// Who is in the room now (sent after `joined`).
    Presence { room: String, users: Vec<String> },
    /// Who came and who went since the last presence frame.
    PresenceDiff {
        room: String,
        joined: Vec<String>,
        left: Vec<String>,
    },
    /// Someone in the room is typing.
    Typing { room: String, user: String },
    /// The answer to `ping`.
    Pong {
        #[serde(default, rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<Ref>,
    },
    /// A request failed; the connection goes on.
    Error {
        code: ErrorCode,
        message: String,
        #[serde(default, rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<Ref>,
    },
}

/// Why a client frame could not be decoded, with what the error frame should say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError {
    pub code: ErrorCode,
    pub message: String,
    pub reference: Option<Ref>,
}

const CLIENT_TYPES: &[&str] = &["auth", "join", "leave", "send", "history", "typing", "ping"];

/// Decode one client text frame. On failure, tells `bad_json` (not JSON), `unknown_type`
/// (no known `type`) and `invalid_frame` (a known type with bad fields) apart, and keeps
/// the frame's `ref` when it can be read.
pub fn decode_client(text: &str) -> Result<ClientFrame, DecodeError> {
    // serde would also read a struct or tagged enum from a JSON array (`["ping",3]` is a
    // `ping` with ref 3): a frame is an object, nothing else.
    if !crate::starts_as_object(text) {
        let err = serde_json::from_str::<serde_json::Value>(text).err();
        return Err(match err {
            None => DecodeError {
                code: ErrorCode::UnknownType,
                message: "a frame must be a JSON object with a \"type\"".into(),
                reference: None,
            },
            Some(err) => DecodeError {
                code: ErrorCode::BadJson,
                message: format!("not valid JSON: {err}"),
                reference: None,
            },
        });
    }
    match serde_json::from_str::<ClientFrame>(text) {
        Ok(frame) => Ok(frame),
        Err(err) => Err(classify(text, err)),
    }
}

fn classify(text: &str, err: serde_json::Error) -> DecodeError {
    #[derive(Deserialize)]
    struct Envelope {
        #[serde(rename = "type")]
        kind: Option<serde_json::Value>,
        #[serde(rename = "ref")]
        reference: Option<serde_json::Value>,
    }
    let Ok(envelope) = serde_json::from_str::<Envelope>(text) else {
        let value = serde_json::from_str::<serde_json::Value>(text);
        return match value {
            Ok(_) => DecodeError {
                code: ErrorCode::UnknownType,
                message: "a frame must be a JSON object with a \"type\"".into(),
                reference: None,
            },
            Err(_) => DecodeError {
                code: ErrorCode::BadJson,
                message: format!("not valid JSON: {err}"),
                reference: None,
            },
        };
    };
    let reference = envelope
        .reference
        .and_then(|r| serde_json::from_value::<Ref>(r).ok());
    match envelope.kind {
        Some(serde_json::Value::String(kind)) if CLIENT_TYPES.contains(&kind.as_str()) => {
            DecodeError {
                code: ErrorCode::InvalidFrame,
                message: format!("bad \"{kind}\" frame: {err}"),
                reference,
            }
        }
        Some(kind) => DecodeError {
            code: ErrorCode::UnknownType,
            message: format!("unknown frame type {kind}"),
            reference,
        },
        None => DecodeError {
            code: ErrorCode::UnknownType,
            message: "a frame must have a \"type\"".into(),
            reference,
        },
    }
}

/// Encode a server frame. Serializing these types cannot fail (no maps with non-string
/// keys, no custom serializers that error), so this returns the text directly.
pub fn encode_server(frame: &ServerFrame) -> String {
    serde_json::to_string(frame).unwrap_or_else(|e| {
        // Unreachable with the types above; keep the connection informed if it ever happens.
        format!(r#"{{"type":"error","code":"internal","message":"encode failed: {e}"}}"#)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_every_client_frame() {
        let cases = [
            r#"{"type":"auth","key":"k"}"#,
            r#"{"type":"join","rooms":[{"room":"a"},{"room":"b","since":4}],"ref":1}"#,
            r#"{"type":"leave","room":"a"}"#,
            r#"{"type":"send","room":"a","text":"hi","client_msg_id":"c1","ref":"x"}"#,
            r#"{"type":"history","room":"a","before_seq":10,"limit":50}"#,
            r#"{"type":"typing","room":"a"}"#,
            r#"{"type":"ping"}"#,
        ];
        for case in cases {
            let frame = decode_client(case).unwrap();
            let again = serde_json::to_string(&frame).unwrap();
            assert_eq!(decode_client(&again).unwrap(), frame, "{case}");
        }
    }

    #[test]
    fn tells_bad_json_unknown_type_and_invalid_frame_apart() {
        assert_eq!(decode_client("{nope").unwrap_err().code, ErrorCode::BadJson);
        assert_eq!(
            decode_client("[1,2]").unwrap_err().code,
            ErrorCode::UnknownType
        );
        assert_eq!(
            decode_client("{}").unwrap_err().code,
            ErrorCode::UnknownType
        );
        // Found by fuzzing: serde reads tagged enums from arrays too.
        for array in [r#"["ping",3]"#, r#"["send","a","b"]"#, r#" ["join",[]]"#] {
            assert_eq!(
                decode_client(array).unwrap_err().code,
                ErrorCode::UnknownType,
                "{array}"
            );
        }
        assert_eq!(
            decode_client(" \n\t{\"type\":\"ping\"}"),
            Ok(ClientFrame::Ping { reference: None })
        );
        let e = decode_client(r#"{"type":"dance","ref":7}"#).unwrap_err();
        assert_eq!(e.code, ErrorCode::UnknownType);
        assert_eq!(e.reference, Some(Ref::Num(7)));
        let e = decode_client(r#"{"type":"send","room":"a","ref":"r"}"#).unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidFrame);
        assert_eq!(e.reference, Some(Ref::Str("r".into())));
    }

    #[test]
    fn server_frames_round_trip() {
        let frame = ServerFrame::Message(MessageBody {
            room: "a".into(),
            seq: 3,
            id: 9,
            user: "u".into(),
            text: "<b>hi</b>".into(),
            time: "2016-08-08T17:20:32.421Z".into(),
        });
        let text = encode_server(&frame);
        assert!(
            text.starts_with(r#"{"type":"message","room":"a","seq":3"#),
            "{text}"
        );
        assert_eq!(serde_json::from_str::<ServerFrame>(&text).unwrap(), frame);
        let err = ServerFrame::Error {
            code: ErrorCode::RateLimited,
            message: "slow down".into(),
            reference: Some(Ref::Num(2)),
        };
        assert_eq!(
            encode_server(&err),
            r#"{"type":"error","code":"rate_limited","message":"slow down","ref":2}"#
        );
    }
}
