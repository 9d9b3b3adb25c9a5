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
    Messages {
        msgs: Vec<WireMessage>,
    },
    Typing {
        room: String,
        user: String,
    },
    /// A node's users in a room. A list too long for one envelope goes in `parts`
    /// envelopes, published one after the other; the receiver takes the list when it has
    /// the last part (an envelope without the fields is the whole list).
    Presence {
        room: String,
        users: Vec<String>,
        #[serde(default, skip_serializing_if = "is_zero")]
        part: u32,
        #[serde(default = "one_part", skip_serializing_if = "is_one")]
        parts: u32,
    },
    PresenceQuery {
        room: String,
    },
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

fn is_one(n: &u32) -> bool {
    *n == 1
}

fn one_part() -> u32 {
    1
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

/// Encode `event` into one envelope of at most `max_bytes` where possible: committed
/// messages that do not all fit become bells, by reference, one per room with its highest
/// seq (the receivers read the store, one range per room, instead of the publisher paying
/// for many envelopes). Only a bell list itself too long is split.
pub fn encode_compact(node: &str, event: &BusEvent, max_bytes: usize) -> Vec<String> {
    let BusEvent::Committed(messages) = event else {
        return encode(node, event, max_bytes);
    };
    let wire: Vec<WireMessage> = messages.iter().map(|m| to_wire(m)).collect();
    let total: usize = envelope_bound(node) + wire.iter().map(size_bound).sum::<usize>();
    if total <= max_bytes {
        return envelopes(node, wire, max_bytes);
    }
    let mut heads: std::collections::BTreeMap<String, u64> = std::collections::BTreeMap::new();
    for m in wire {
        let seq = heads.entry(m.room).or_default();
        *seq = (*seq).max(m.seq);
    }
    let bells = heads
        .into_iter()
        .map(|(room, seq)| WireMessage {
            room,
            seq,
            payload: None,
        })
        .collect();
    envelopes(node, bells, max_bytes)
}

/// A committed message as it travels: inline, or by reference when its text is large.
fn to_wire(m: &crate::store::StoredMessage) -> WireMessage {
    let inline = m.text.len() + m.user.len() <= INLINE_TEXT_BYTES;
    WireMessage {
        room: m.room.to_string(),
        seq: m.seq,
        payload: inline.then(|| Payload {
            id: m.id,
            user: m.user.clone(),
            text: m.text.clone(),
            time_ms: m.time_ms,
            cmid: m.client_msg_id.clone(),
        }),
    }
}

/// A generous bound on a message's encoded size (JSON escapes grow text up to 6×).
fn size_bound(wm: &WireMessage) -> usize {
    96 + wm.room.len() * 6
        + wm.payload.as_ref().map_or(0, |p| {
            let cmid = p.cmid.as_ref().map_or(0, |c| c.len() * 6 + 16);
            (p.user.len() + p.text.len()) * 6 + cmid + 64
        })
}

/// A bound on an envelope's size without its messages.
fn envelope_bound(node: &str) -> usize {
    64 + node.len() * 6
}

/// `msgs` in order, split into `Messages` envelopes of at most `max_bytes` each.
fn envelopes(node: &str, msgs: Vec<WireMessage>, max_bytes: usize) -> Vec<String> {
    let one = |msgs: Vec<WireMessage>| {
        serde_json::to_string(&Envelope {
            node: node.to_owned(),
            body: Body::Messages { msgs },
        })
        .unwrap_or_default()
    };
    let mut out = Vec::new();
    let mut chunk: Vec<WireMessage> = Vec::new();
    let mut size = envelope_bound(node);
    for wm in msgs {
        let bound = size_bound(&wm);
        if !chunk.is_empty() && size + bound > max_bytes {
            out.push(one(std::mem::take(&mut chunk)));
            size = envelope_bound(node);
        }
        size += bound;
        chunk.push(wm);
    }
    if !chunk.is_empty() {
        out.push(one(chunk));
    }
    out
}

/// Encode `event` into envelopes of at most `max_bytes` each. User names come from the
/// embedding application's `sessions` table, of any length: a typing notice, or a name in
/// a presence list, that cannot fit in one envelope is left out (on PostgreSQL one
/// payload over the limit would fail every event published with it).
pub fn encode(node: &str, event: &BusEvent, max_bytes: usize) -> Vec<String> {
    let one = |body: Body| {
        serde_json::to_string(&Envelope {
            node: node.to_owned(),
            body,
        })
        .unwrap_or_default()
    };
    match event {
        BusEvent::Committed(messages) => envelopes(
            node,
            messages.iter().map(|m| to_wire(m)).collect(),
            max_bytes,
        ),
        BusEvent::Typing { room, user } => {
            let envelope = one(Body::Typing {
                room: room.to_string(),
                user: user.clone(),
            });
            if envelope.len() > max_bytes {
                tracing::debug!(room = %room, "a typing notice too long for the broker, not sent");
                return Vec::new();
            }
            vec![envelope]
        }
        BusEvent::Presence { room, users } => {
            // Cut where the next name could pass the limit (JSON escapes grow a name up
            // to 6×); always at least one name a part.
            let room = room.to_string();
            let overhead = envelope_bound(node) + room.len() * 6 + 64;
            let mut chunks: Vec<Vec<String>> = vec![Vec::new()];
            let mut size = overhead;
            for user in users {
                // A name that does not fit in an envelope of its own is left out.
                let exact = serde_json::to_string(user).map_or(usize::MAX, |s| s.len() + 1);
                if overhead.saturating_add(exact) > max_bytes {
                    tracing::warn!(
                        room = %room,
                        bytes = user.len(),
                        "a user name too long for the broker; the other nodes do not list it"
                    );
                    continue;
                }
                let bound = user.len() * 6 + 4;
                let last = chunks
                    .last_mut()
                    .filter(|c| c.is_empty() || size + bound <= max_bytes);
                match last {
                    Some(chunk) => chunk.push(user.clone()),
                    None => {
                        chunks.push(vec![user.clone()]);
                        size = overhead;
                    }
                }
                size += bound;
            }
            let parts = u32::try_from(chunks.len()).unwrap_or(u32::MAX);
            chunks
                .into_iter()
                .zip(0..)
                .map(|(users, part)| {
                    one(Body::Presence {
                        room: room.clone(),
                        users,
                        part,
                        parts,
                    })
                })
                .collect()
        }
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

    /// Short texts with the longest client_msg_ids, all quotes: the ids count towards the
    /// bound too (NOTIFY refuses a payload of 8,000 bytes or more, and every bell of the
    /// commit with it).
    #[test]
    fn client_msg_ids_count_towards_the_envelope_size() {
        // Up to three digits, then quotes to the longest id accepted.
        let quotes = "\"".repeat(crate::gateway::v1::MAX_CLIENT_MSG_ID_BYTES - 3);
        let messages: Vec<_> = (1..=100)
            .map(|s| {
                let mut m = (*msg(s, "ok")).clone();
                m.client_msg_id = Some(format!("{s}{quotes}"));
                Arc::new(m)
            })
            .collect();
        let envelopes = encode("n1", &BusEvent::Committed(messages), 7900);
        let mut seqs = Vec::new();
        for e in &envelopes {
            assert!(e.len() <= 7900, "{}", e.len());
            let Envelope { body, .. } = serde_json::from_str(e).unwrap();
            let Body::Messages { msgs } = body else {
                panic!("messages")
            };
            seqs.extend(msgs.iter().map(|m| m.seq));
        }
        assert_eq!(seqs, (1..=100).collect::<Vec<_>>());
    }

    #[test]
    fn compact_encoding_rings_one_bell_per_room_when_the_payloads_do_not_fit() {
        let small: Vec<_> = (1..=3).map(|s| msg(s, "hi")).collect();
        let one = encode_compact("n1", &BusEvent::Committed(small), 7900);
        assert_eq!(one.len(), 1);
        let Envelope { body, .. } = serde_json::from_str(&one[0]).unwrap();
        let Body::Messages { msgs } = body else {
            panic!("messages")
        };
        assert!(
            msgs.iter().all(|m| m.payload.is_some()),
            "fits: sent inline"
        );

        let mut many: Vec<_> = (1..=200).map(|s| msg(s, &"x".repeat(100))).collect();
        let mut other = msg(7, "y");
        Arc::make_mut(&mut other).room = RoomName::new("q").unwrap();
        many.push(other);
        let bells = encode_compact("n1", &BusEvent::Committed(many), 7900);
        assert_eq!(bells.len(), 1);
        let Envelope { body, .. } = serde_json::from_str(&bells[0]).unwrap();
        let Body::Messages { msgs } = body else {
            panic!("messages")
        };
        let heads: Vec<(String, u64, bool)> = msgs
            .iter()
            .map(|m| (m.room.clone(), m.seq, m.payload.is_some()))
            .collect();
        assert_eq!(
            heads,
            vec![("q".to_owned(), 7, false), ("r".to_owned(), 200, false)]
        );
    }

    /// PostgreSQL's NOTIFY takes at most 8,000 bytes: a room's list of a few hundred
    /// users goes in parts, each under the limit, numbered, together the whole list.
    #[test]
    fn a_long_presence_list_goes_in_parts_that_fit() {
        let users: Vec<String> = (0..2000).map(|i| format!("user-é-{i:04}")).collect();
        let event = BusEvent::Presence {
            room: RoomName::new("lobby").unwrap(),
            users: users.clone(),
        };
        let envelopes = encode("n1", &event, 7900);
        assert!(envelopes.len() > 1);
        let mut got = Vec::new();
        for (i, e) in envelopes.iter().enumerate() {
            assert!(e.len() <= 7900, "{}", e.len());
            let Envelope { body, .. } = serde_json::from_str(e).unwrap();
            let Body::Presence {
                room,
                users,
                part,
                parts,
            } = body
            else {
                panic!("presence")
            };
            assert_eq!(room, "lobby");
            assert_eq!((part as usize, parts as usize), (i, envelopes.len()));
            got.extend(users);
        }
        assert_eq!(got, users);
        // A short list is one envelope without the part fields, as before them.
        let short = encode(
            "n1",
            &BusEvent::Presence {
                room: RoomName::new("lobby").unwrap(),
                users: vec!["ada".into()],
            },
            7900,
        );
        assert_eq!(short.len(), 1);
        assert!(!short[0].contains("part"), "{}", short[0]);
        let Envelope { body, .. } =
            serde_json::from_str(r#"{"node":"n0","t":"presence","room":"r","users":["x"]}"#)
                .unwrap();
        assert!(matches!(
            body,
            Body::Presence {
                part: 0,
                parts: 1,
                ..
            }
        ));
    }

    /// A user name is the application's, of any length: one too long for a payload is left
    /// out (a typing notice of it is not sent), and everything else still fits.
    #[test]
    fn a_name_too_long_for_a_payload_is_left_out() {
        let room = RoomName::new("lobby").unwrap();
        let long = "\"".repeat(4000); // 8,000 bytes once escaped
        let typing = BusEvent::Typing {
            room: room.clone(),
            user: long.clone(),
        };
        assert!(encode("n1", &typing, 7900).is_empty());
        let presence = BusEvent::Presence {
            room,
            users: vec!["ada".into(), long, "bob".into()],
        };
        let envelopes = encode("n1", &presence, 7900);
        let mut got = Vec::new();
        for e in &envelopes {
            assert!(e.len() <= 7900, "{}", e.len());
            let Envelope { body, .. } = serde_json::from_str(e).unwrap();
            let Body::Presence { users, .. } = body else {
                panic!("presence")
            };
            got.extend(users);
        }
        assert_eq!(got, ["ada", "bob"]);
    }
}
