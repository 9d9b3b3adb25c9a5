//! The properties the fuzz targets (`fuzz/`) check, shared with the regression test that
//! replays every saved input (`tests/fuzz_regressions.rs`). Not part of the protocol.

use crate::legacy::{decode_inbound, encode_error, encode_message, LegacyInbound};
use crate::v1::{decode_client, encode_server, ServerFrame};
use crate::ErrorCode;

/// Whether `text` is one JSON object (frames of both protocols must be). A number beyond
/// f64's range is still JSON (JavaScript's `JSON.parse` takes `1e999` as Infinity), so
/// this checks the syntax only (`IgnoredAny`) rather than building a `Value`, which
/// refuses it. The legacy decoder skips members it does not know unread and so accepts
/// `{"message":7,"x":1e999}`; v1's tagged frames read every member and refuse it
/// (`invalid_frame`). Both are kept in `fuzz/regressions/`.
fn is_json_object(text: &str) -> bool {
    crate::starts_as_object(text) && serde_json::from_str::<serde::de::IgnoredAny>(text).is_ok()
}

/// The `message` member of a legacy frame, read as the decoder reads it (other members
/// skipped unread).
fn legacy_message(text: &str) -> Option<serde_json::Value> {
    #[derive(serde::Deserialize)]
    struct Said {
        message: serde_json::Value,
    }
    serde_json::from_str::<Said>(text).ok().map(|s| s.message)
}

/// `decode_client` on any bytes: never panics; only a JSON object decodes, and a decoded
/// frame survives a round trip; a refusal is one of the three decode codes, and its
/// message encodes.
pub fn v1_decode(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match decode_client(text) {
        Ok(frame) => {
            assert!(is_json_object(text), "decoded a non-object: {text:?}");
            let again = serde_json::to_string(&frame).unwrap_or_default();
            assert_eq!(
                decode_client(&again).ok(),
                Some(frame),
                "round trip of {text:?}"
            );
        }
        Err(e) => {
            assert!(
                matches!(
                    e.code,
                    ErrorCode::BadJson | ErrorCode::UnknownType | ErrorCode::InvalidFrame
                ),
                "{:?} for {text:?}",
                e.code
            );
            let frame = encode_server(&ServerFrame::Error {
                code: e.code,
                message: e.message,
                reference: e.reference,
            });
            assert!(serde_json::from_str::<serde_json::Value>(&frame).is_ok());
        }
    }
}

/// `decode_inbound` (a legacy client frame) on any bytes: never panics; only a JSON object
/// decodes; the text of a
/// message is kept exactly (a JSON string as sent, a number as JavaScript prints it); a refusal
/// is `bad_json` or `invalid_frame`; the frames the server would send encode as JSON.
pub fn legacy_decode(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match decode_inbound(text) {
        Ok(LegacyInbound::Say(message)) => {
            assert!(is_json_object(text), "decoded a non-object: {text:?}");
            match legacy_message(text) {
                Some(serde_json::Value::String(s)) => assert_eq!(s, message),
                // As JavaScript prints it: the same value, no ".0" on a whole number.
                Some(serde_json::Value::Number(n)) => {
                    assert_eq!(message.parse::<f64>().ok(), n.as_f64(), "{text:?}");
                    assert!(!message.ends_with(".0"), "{message:?} from {text:?}");
                }
                other => panic!("decoded {message:?} from a message of {other:?}"),
            }
            let out = encode_message("2016-08-08T17:20:32.421Z", "u", &message);
            let back: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
            assert_eq!(back["message"].as_str(), Some(message.as_str()));
        }
        Err(e) => {
            assert!(
                matches!(e.code, ErrorCode::BadJson | ErrorCode::InvalidFrame),
                "{:?} for {text:?}",
                e.code
            );
            let out = encode_error(e.code, &e.message);
            assert!(serde_json::from_str::<serde_json::Value>(&out).is_ok());
        }
    }
}
