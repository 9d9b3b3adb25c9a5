//! Room names: the one rule for what a room is called, shared by both protocols.
//!
//! Legacy room number `N` and the v1 room named `"N"` are the same room.

use serde::{Deserialize, Serialize};

/// Longest room name, in bytes.
pub const MAX_ROOM_NAME_BYTES: usize = 64;

/// A validated room name: 1 to 64 bytes, no control characters, no leading or
/// trailing whitespace.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct RoomName(String);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoomNameError {
    Empty,
    TooLong,
    ControlCharacter,
    SurroundingWhitespace,
}

impl std::fmt::Display for RoomNameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Empty => "room name is empty",
            Self::TooLong => "room name is longer than 64 bytes",
            Self::ControlCharacter => "room name contains a control character",
            Self::SurroundingWhitespace => "room name starts or ends with whitespace",
        })
    }
}

impl std::error::Error for RoomNameError {}

impl RoomName {
    pub fn new(name: impl Into<String>) -> Result<Self, RoomNameError> {
        let name = name.into();
        if name.is_empty() {
            return Err(RoomNameError::Empty);
        }
        if name.len() > MAX_ROOM_NAME_BYTES {
            return Err(RoomNameError::TooLong);
        }
        if name.chars().any(char::is_control) {
            return Err(RoomNameError::ControlCharacter);
        }
        if name.trim() != name {
            return Err(RoomNameError::SurroundingWhitespace);
        }
        Ok(Self(name))
    }

    /// The room a legacy session with room number `n` uses.
    pub fn legacy(n: i64) -> Self {
        Self(n.to_string())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for RoomName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for RoomName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::new(s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_names() {
        assert_eq!(RoomName::new("general").unwrap().as_str(), "general");
        assert_eq!(RoomName::new("3").unwrap(), RoomName::legacy(3));
        assert!(RoomName::new("Ünïcødé room 🎉").is_ok());
    }

    #[test]
    fn rejects_bad_names() {
        assert_eq!(RoomName::new(""), Err(RoomNameError::Empty));
        assert_eq!(RoomName::new("a".repeat(65)), Err(RoomNameError::TooLong));
        assert_eq!(RoomName::new("a\nb"), Err(RoomNameError::ControlCharacter));
        assert_eq!(
            RoomName::new(" a"),
            Err(RoomNameError::SurroundingWhitespace)
        );
    }
}
