//! WebSocket close codes wschat sends, and what a client should do after each.

/// Normal closure.
pub const NORMAL: u16 = 1000;
/// The server is going away (not used for restarts; see [`SERVICE_RESTART`]).
pub const GOING_AWAY: u16 = 1001;
/// A WebSocket protocol violation (unmasked frame, reserved bits).
pub const PROTOCOL_ERROR: u16 = 1002;
/// A binary frame on the text protocol.
pub const UNSUPPORTED_DATA: u16 = 1003;
/// Invalid UTF-8 in a text frame.
pub const INVALID_PAYLOAD: u16 = 1007;
/// Policy violation: the session was revoked or expired, or sustained abuse.
pub const POLICY_VIOLATION: u16 = 1008;
/// The reason of a [`POLICY_VIOLATION`] close for too many frames refused by the rate
/// limit: unlike a revoked session, reconnecting after a backoff is fine.
pub const RATE_LIMIT_REASON: &str = "rate limit exceeded";
/// A frame over the message size limit.
pub const MESSAGE_TOO_BIG: u16 = 1009;
/// An internal error on the server side.
pub const INTERNAL_ERROR: u16 = 1011;
/// The server is restarting or draining: reconnect (to any node) and resume with `since`.
pub const SERVICE_RESTART: u16 = 1012;
/// A connection limit refused an `auth` frame (too many connections for the session, or
/// too many unknown keys from the address): reconnect after a backoff.
pub const TRY_AGAIN_LATER: u16 = 1013;

/// v1 authentication failed (unknown key in the `auth` frame).
pub const AUTH_FAILED: u16 = 4001;
/// No `auth` frame arrived in time.
pub const AUTH_TIMEOUT: u16 = 4002;
/// The client did not read fast enough and its outbound queue overflowed: reconnect and
/// resume each room with `since` = the last seq shown; nothing is lost.
pub const SLOW_CONSUMER: u16 = 4008;
/// Too many bad frames in a row.
pub const TOO_MANY_ERRORS: u16 = 4009;
