//! nodejschat's frames (the "legacy" protocol), kept exactly:
//! `{"authenticated":true}`, then `{"time","user","message"}` frames; the client sends
//! `{"message": <text or number>}` and other fields are ignored. Errors that nodejschat had
//! no word for are `{"error": CODE, "message": TEXT}`.

use serde::{Deserialize, Serialize};

use crate::ErrorCode;

/// The first frame after a legacy upgrade.
pub const AUTHENTICATED: &str = r#"{"authenticated":true}"#;

/// A chat message as nodejschat sent it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LegacyMessage {
    /// RFC 3339, UTC, milliseconds.
    pub time: String,
    pub user: String,
    pub message: String,
}

/// An error frame on the legacy endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LegacyError {
    pub error: ErrorCode,
    pub message: String,
}

/// What a legacy client sent, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LegacyInbound {
    /// A message to post; numbers are kept as their JSON text (`0.123`).
    Say(String),
}

/// Why a legacy frame was not accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LegacyDecodeError {
    pub code: ErrorCode,
    pub message: String,
}

/// Decode one legacy client frame.
pub fn decode_inbound(text: &str) -> Result<LegacyInbound, LegacyDecodeError> {
    #[derive(Deserialize)]
    struct Raw {
        message: Option<serde_json::Value>,
    }
    // serde would also read the struct from an array (`["hi"]`): a frame is an object.
    if !crate::starts_as_object(text) {
        let valid = serde_json::from_str::<serde_json::Value>(text);
        return Err(LegacyDecodeError {
            code: if valid.is_ok() {
                ErrorCode::InvalidFrame
            } else {
                ErrorCode::BadJson
            },
            message: match valid {
                Ok(_) => "expected {\"message\": …}: not a JSON object".into(),
                Err(e) => format!("expected {{\"message\": …}}: {e}"),
            },
        });
    }
    let raw: Raw = serde_json::from_str(text).map_err(|e| LegacyDecodeError {
        code: if serde_json::from_str::<serde_json::Value>(text).is_ok() {
            ErrorCode::InvalidFrame
        } else {
            ErrorCode::BadJson
        },
        message: format!("expected {{\"message\": …}}: {e}"),
    })?;
    match raw.message {
        Some(serde_json::Value::String(s)) => Ok(LegacyInbound::Say(s)),
        Some(serde_json::Value::Number(n)) => Ok(LegacyInbound::Say(js_number_text(&n))),
        Some(_) => Err(LegacyDecodeError {
            code: ErrorCode::InvalidFrame,
            message: "\"message\" must be a string or a number".into(),
        }),
        None => Err(LegacyDecodeError {
            code: ErrorCode::InvalidFrame,
            message: "missing \"message\"".into(),
        }),
    }
}

/// A number as JavaScript's `String(n)` prints it, as nodejschat stored one: `1e2` and
/// `7.0` are "100" and "7" (not serde_json's "100.0"), `1e21` is "1e+21".
fn js_number_text(n: &serde_json::Number) -> String {
    let Some(f) = n.as_f64() else {
        return n.to_string();
    };
    if f == 0.0 {
        // -0 too.
        return "0".to_owned();
    }
    if (1e-6..1e21).contains(&f.abs()) {
        // Rust's `Display` is the shortest text that reads back as `f`, never with an
        // exponent, and no ".0" for a whole number: JavaScript's in this range.
        return format!("{f}");
    }
    let text = format!("{f:e}");
    match text.split_once('e') {
        Some((mantissa, exp)) if !exp.starts_with('-') => format!("{mantissa}e+{exp}"),
        _ => text,
    }
}

/// Encode a legacy chat message frame.
pub fn encode_message(time: &str, user: &str, message: &str) -> String {
    #[derive(Serialize)]
    struct Out<'a> {
        time: &'a str,
        user: &'a str,
        message: &'a str,
    }
    serde_json::to_string(&Out {
        time,
        user,
        message,
    })
    .unwrap_or_default()
}

/// Encode a legacy error frame.
pub fn encode_error(code: ErrorCode, message: &str) -> String {
    serde_json::to_string(&LegacyError {
        error: code,
        message: message.to_owned(),
    })
    .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_and_numbers_are_messages() {
        assert_eq!(
            decode_inbound(r#"{"message":"hi","extra":1}"#).unwrap(),
            LegacyInbound::Say("hi".into())
        );
        assert_eq!(
            decode_inbound(r#"{"message":0.123}"#).unwrap(),
            LegacyInbound::Say("0.123".into())
        );
        assert_eq!(
            decode_inbound(r#"{"message":7}"#).unwrap(),
            LegacyInbound::Say("7".into())
        );
    }

    /// As nodejschat stored them: JavaScript's `String(n)` of the parsed number.
    #[test]
    fn numbers_are_kept_as_javascript_prints_them() {
        for (json, js) in [
            ("1e2", "100"),
            ("7.0", "7"),
            ("-0", "0"),
            ("-2.50", "-2.5"),
            ("0.000001", "0.000001"),
            ("1.5e-7", "1.5e-7"),
            ("1e-7", "1e-7"),
            ("1e21", "1e+21"),
            ("12345678901234567890", "12345678901234567000"),
            ("9007199254740993", "9007199254740992"),
        ] {
            assert_eq!(
                decode_inbound(&format!(r#"{{"message":{json}}}"#)).unwrap(),
                LegacyInbound::Say(js.into()),
                "{json}"
            );
        }
    }

    #[test]
    fn bad_frames_get_codes() {
        assert_eq!(decode_inbound("nope").unwrap_err().code, ErrorCode::BadJson);
        assert_eq!(
            decode_inbound(r#"{"msg":"x"}"#).unwrap_err().code,
            ErrorCode::InvalidFrame
        );
        assert_eq!(
            decode_inbound(r#"{"message":[1]}"#).unwrap_err().code,
            ErrorCode::InvalidFrame
        );
        assert_eq!(
            decode_inbound("[]").unwrap_err().code,
            ErrorCode::InvalidFrame
        );
        // Found by fuzzing: serde reads structs from arrays too.
        for array in [r#"["hi"]"#, r#"["leave"]"#, r#"[7]"#, "\"hi\""] {
            assert_eq!(
                decode_inbound(array).unwrap_err().code,
                ErrorCode::InvalidFrame,
                "{array}"
            );
        }
        assert_eq!(decode_inbound("[1,").unwrap_err().code, ErrorCode::BadJson);
    }

    #[test]
    fn encodes_like_nodejschat() {
        assert_eq!(
            encode_message("2016-08-08T17:20:32.421Z", "Michael", "a \"q\""),
            r#"{"time":"2016-08-08T17:20:32.421Z","user":"Michael","message":"a \"q\""}"#
        );
        assert_eq!(
            encode_error(ErrorCode::RateLimited, "slow"),
            r#"{"error":"rate_limited","message":"slow"}"#
        );
    }
}
