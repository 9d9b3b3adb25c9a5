//! Outgoing frames, encoded once into shareable bytes, WebSocket header included.
//!
//! A server's frames are not masked, so one message's frame is the same bytes for every
//! recipient: the hub encodes it once (tungstenite's framing) and each connection writes
//! those bytes, without a copy or a per-connection encoder.

use bytes::Bytes;
use tungstenite::protocol::frame::coding::{CloseCode, Data, OpCode};
use tungstenite::protocol::frame::Frame;
use tungstenite::protocol::CloseFrame;
use wschat_protocol::v1::{MessageBody, ServerFrame};
use wschat_protocol::{legacy, ErrorCode};

use crate::store::{format_time, StoredMessage};

/// An encoded WebSocket frame.
pub type Encoded = Bytes;

fn encode(frame: Frame) -> Encoded {
    let mut out = Vec::with_capacity(frame.len());
    // Writing into a Vec cannot fail.
    let _infallible = frame.format(&mut out);
    Bytes::from(out)
}

/// A text frame carrying `text`.
pub fn text(text: impl Into<Bytes>) -> Encoded {
    encode(Frame::message(text.into(), OpCode::Data(Data::Text), true))
}

/// A ping (the server's keepalive).
pub fn ping() -> Encoded {
    encode(Frame::ping(Bytes::new()))
}

/// A close frame with `code` and `reason`.
pub fn close(code: u16, reason: &str) -> Encoded {
    encode(Frame::close(Some(CloseFrame {
        code: CloseCode::from(code),
        reason: reason.into(),
    })))
}

pub fn v1(frame: &ServerFrame) -> Encoded {
    text(wschat_protocol::v1::encode_server(frame))
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

pub fn v1_message(msg: &StoredMessage) -> Encoded {
    v1(&ServerFrame::Message(message_body(msg)))
}

pub fn legacy_message(msg: &StoredMessage) -> Encoded {
    text(legacy::encode_message(
        &format_time(msg.time_ms),
        &msg.user,
        &msg.text,
    ))
}

pub fn legacy_error(code: ErrorCode, message: &str) -> Encoded {
    text(legacy::encode_error(code, message))
}

pub fn v1_error(
    code: ErrorCode,
    message: impl Into<String>,
    reference: Option<wschat_protocol::v1::Ref>,
) -> Encoded {
    v1(&ServerFrame::Error {
        code,
        message: message.into(),
        reference,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_unmasked_with_the_right_length_encoding() {
        assert_eq!(&text("hi")[..], b"\x81\x02hi");
        let long = text("x".repeat(300));
        assert_eq!(&long[..4], &[0x81, 126, 1, 44]);
        assert_eq!(long.len(), 304);
        assert_eq!(&ping()[..], &[0x89, 0]);
        assert_eq!(&close(1000, "bye")[..], b"\x88\x05\x03\xe8bye");
    }
}
