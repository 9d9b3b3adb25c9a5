//! Encoding outgoing frames once into shareable bytes, for either protocol.

use axum::extract::ws::Utf8Bytes;
use wschat_protocol::v1::{MessageBody, ServerFrame};
use wschat_protocol::{legacy, ErrorCode};

use crate::store::{format_time, StoredMessage};

pub fn v1(frame: &ServerFrame) -> Utf8Bytes {
    Utf8Bytes::from(wschat_protocol::v1::encode_server(frame))
}

pub fn message_body(msg: &StoredMessage) -> MessageBody {
    MessageBody {
        room: msg.room.to_string(),
        seq: msg.seq,
        id: msg.id,
        user: msg.user.clone(),
        text: msg.text.clone(),
        time: format_time(msg.time_ms),
    }
}

pub fn v1_message(msg: &StoredMessage) -> Utf8Bytes {
    v1(&ServerFrame::Message(message_body(msg)))
}

pub fn legacy_message(msg: &StoredMessage) -> Utf8Bytes {
    Utf8Bytes::from(legacy::encode_message(
        &format_time(msg.time_ms),
        &msg.user,
        &msg.text,
    ))
}

pub fn legacy_error(code: ErrorCode, message: &str) -> Utf8Bytes {
    Utf8Bytes::from(legacy::encode_error(code, message))
}

pub fn v1_error(
    code: ErrorCode,
    message: impl Into<String>,
    reference: Option<wschat_protocol::v1::Ref>,
) -> Utf8Bytes {
    v1(&ServerFrame::Error {
        code,
        message: message.into(),
        reference,
    })
}
