//! wschat's wire types: protocol v1 (`v1`) and nodejschat's legacy frames (`legacy`).
//!
//! This crate is the contract between the server, the load client and any outside client.
//! It knows nothing of tokio, axum or the database: only serde types, the stable error
//! codes, the close codes and the room-name rules.

pub mod close;
pub mod error;
#[doc(hidden)]
pub mod fuzzing;
pub mod legacy;
pub mod room;
pub mod v1;

pub use error::ErrorCode;
pub use room::{RoomName, RoomNameError};

/// The protocol version spoken at `/ws`.
pub const PROTOCOL_VERSION: u32 = 1;

/// The WebSocket subprotocol that selects protocol v1.
pub const SUBPROTOCOL_V1: &str = "wschat.v1";

/// Prefix of the subprotocol entry that carries a session key outside the URL:
/// `Sec-WebSocket-Protocol: wschat.v1, wschat.key.<KEY>`.
pub const SUBPROTOCOL_KEY_PREFIX: &str = "wschat.key.";

/// Whether `text` can only be a JSON object: its first character after JSON whitespace
/// is `{`. serde reads structs and tagged enums from JSON arrays as well; frames of both
/// protocols are objects, and this is checked first.
pub(crate) fn starts_as_object(text: &str) -> bool {
    text.trim_start_matches([' ', '\t', '\n', '\r'])
        .starts_with('{')
}
