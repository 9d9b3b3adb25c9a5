//! How broker events travel between nodes: JSON envelopes tagged with the sending node,
//! split to fit the engine's payload limit. A message whose text is large travels by
//! reference (room and seq only): the receiver reads it from the store.

use serde::{Deserialize, Serialize};

use super::BusEvent;

/// Texts longer than this travel by reference.
pub const INLINE_TEXT_BYTES: usize = 2048;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Envelope {
    pub node: String,
    #[serde(flatten)]
    pub body: Body,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub enum Body {
    Messages { msgs: Vec<WireMessage> },
    Typing { room: String, user: String },
    Presence { room: String, users: Vec<String> },
    PresenceQuery { room: String },
}

/// A committed message; `payload` is absent when it travels by reference.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WireMessage {
    pub room: String,
    pub seq: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<Payload>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Payload {
    pub id: i64,
    pub user: String,
    pub text: String,
    pub time_ms: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmid: Option<String>,
}

/// Encode `event` into envelopes of at most `max_bytes` each.
pub fn encode(node: &str, event: &BusEvent, max_bytes: usize) -> Vec<String> {
    let one = |body: Body| {
        serde_json::to_string(&Envelope {
            node: node.to_owned(),
            body,
        })
        .unwrap_or_default()
    };
    match event {
        BusEvent::Committed(messages) => {
            let mut out = Vec::new();
            let mut chunk: Vec<WireMessage> = Vec::new();
            let mut size = 64 + node.len();
            for m in messages {
                let inline = m.text.len() + m.user.len() <= INLINE_TEXT_BYTES;
                let wm = WireMessage {
                    room: m.room.to_string(),
                    seq: m.seq,
                    payload: inline.then(|| Payload {
                        id: m.id,
                        user: m.user.clone(),
                        text: m.text.clone(),
                        time_ms: m.time_ms,
                        cmid: m.client_msg_id.clone(),
                    }),
                };
                // A generous bound on the message's encoded size (JSON escapes grow text).
                let estimate = 96
                    + wm.room.len() * 2
                    + wm.payload
                        .as_ref()
                        .map_or(0, |p| (p.user.len() + p.text.len()) * 6 + 64);
                if !chunk.is_empty() && size + estimate > max_bytes {
                    out.push(one(Body::Messages {
                        msgs: std::mem::take(&mut chunk),
                    }));
                    size = 64 + node.len();
                }
                size += estimate;
                chunk.push(wm);
            }
            if !chunk.is_empty() {
                out.push(one(Body::Messages { msgs: chunk }));
            }
            out
        }
        BusEvent::Typing { room, user } => vec![one(Body::Typing {
            room: room.to_string(),
            user: user.clone(),
        })],
        BusEvent::Presence { room, users } => vec![one(Body::Presence {
            room: room.to_string(),
            users: users.clone(),
        })],
        BusEvent::PresenceQuery { room } => vec![one(Body::PresenceQuery {
            room: room.to_string(),
        })],
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use wschat_protocol::RoomName;

    use super::*;
    use crate::store::StoredMessage;

    fn msg(seq: u64, text: &str) -> Arc<StoredMessage> {
        Arc::new(StoredMessage {
            room: RoomName::new("r").unwrap(),
            seq,
            id: seq as i64,
            user: "u".into(),
            text: text.into(),
            time_ms: 1,
            client_msg_id: None,
        })
    }

    #[test]
    fn splits_to_fit_and_sends_large_texts_by_reference() {
        let messages: Vec<_> = (1..=200).map(|s| msg(s, &"é\"".repeat(40))).collect();
        let envelopes = encode("n1", &BusEvent::Committed(messages), 7900);
        assert!(envelopes.len() > 1);
        let mut seqs = Vec::new();
        for e in &envelopes {
            assert!(e.len() <= 7900, "{}", e.len());
            let Envelope { node, body } = serde_json::from_str(e).unwrap();
            assert_eq!(node, "n1");
            let Body::Messages { msgs } = body else {
                panic!("messages")
            };
            seqs.extend(msgs.iter().map(|m| m.seq));
            assert!(msgs.iter().all(|m| m.payload.is_some()));
        }
        assert_eq!(seqs, (1..=200).collect::<Vec<_>>());
        let big = encode(
            "n1",
            &BusEvent::Committed(vec![msg(1, &"x".repeat(9000))]),
            7900,
        );
        assert_eq!(big.len(), 1);
        assert!(big[0].len() < 200, "by reference: {}", big[0]);
    }
}
