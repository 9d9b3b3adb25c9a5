//! A property test of the room/sequence logic against a simple model: random batches of
//! sends from several users into several rooms, with retries (repeated client_msg_ids,
//! within a batch and across batches), through `Store::commit_batch` on SQLite and on
//! PostgreSQL (each commits a batch in one statement or command, or in a transaction when
//! the batch repeats a `client_msg_id` or retries one already stored).
//!
//! The model: each room's seqs are 1..n, gap-free, in commit order (batch order, since
//! rooms are independent); a `(user, client_msg_id)` is stored once; a repeat returns the
//! first message unchanged (same room, seq, id and text), whatever room or text it named.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::sync::Arc;

mod common;

use common::Backend;
use proptest::prelude::*;
use wschat_protocol::RoomName;
use wschat_server::store::{self, CommitOutcome, NewMessage};

const ROOMS: &[&str] = &["a", "b", "c"];
const USERS: &[&str] = &["ada", "bob"];

/// One send: (user, room, client_msg_id).
type Send = (usize, usize, Option<u8>);

fn send() -> impl Strategy<Value = Send> {
    (
        0..USERS.len(),
        0..ROOMS.len(),
        prop_oneof![1 => Just(None), 3 => (0u8..12).prop_map(Some)],
    )
}

fn batches() -> impl Strategy<Value = Vec<Vec<Send>>> {
    prop::collection::vec(prop::collection::vec(send(), 1..12), 1..8)
}

/// What the model expects of one stored message.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Expected {
    room: String,
    seq: u64,
    user: String,
    text: String,
}

fn run(batches: Vec<Vec<Send>>, backend: Backend) -> Result<(), TestCaseError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let (settings, _dir) = common::fresh(backend).await;
        let store = store::open(&settings.database).await.unwrap();
        store.migrate().await.unwrap();
        let result = check(&*store, batches).await;
        drop(store);
        common::drop_database(&settings.database).await;
        result
    })
}

async fn check(store: &dyn store::Store, batches: Vec<Vec<Send>>) -> Result<(), TestCaseError> {
    {
        let mut last_seq: HashMap<&str, u64> = HashMap::new();
        let mut first: HashMap<(String, String), (Expected, i64)> = HashMap::new();
        let mut logs: HashMap<&str, Vec<Expected>> = HashMap::new();
        let mut n = 0;
        for batch in batches {
            let msgs: Arc<[NewMessage]> = batch
                .iter()
                .map(|(user, room, cmid)| {
                    n += 1;
                    NewMessage {
                        room: RoomName::new(ROOMS[*room]).unwrap(),
                        user: USERS[*user].into(),
                        text: format!("text {n}"),
                        client_msg_id: cmid.map(|c| format!("cmid-{c}")),
                    }
                })
                .collect();
            let outcomes = store.commit_batch(msgs.clone()).await.unwrap();
            prop_assert_eq!(outcomes.len(), msgs.len());
            for (msg, outcome) in msgs.iter().zip(&outcomes) {
                let got = outcome.message();
                let key = msg.client_msg_id.clone().map(|c| (msg.user.clone(), c));
                match key.as_ref().and_then(|k| first.get(k)) {
                    Some((expected, id)) => {
                        prop_assert!(
                            matches!(outcome, CommitOutcome::Duplicate(_)),
                            "{:?}",
                            outcome
                        );
                        prop_assert_eq!(&got.room.to_string(), &expected.room);
                        prop_assert_eq!(got.seq, expected.seq);
                        prop_assert_eq!(&got.text, &expected.text);
                        prop_assert_eq!(got.id, *id);
                    }
                    None => {
                        prop_assert!(matches!(outcome, CommitOutcome::Stored(_)), "{:?}", outcome);
                        let room = ROOMS.iter().find(|r| **r == msg.room.as_str()).unwrap();
                        let seq = last_seq.entry(room).or_insert(0);
                        *seq += 1;
                        let expected = Expected {
                            room: room.to_string(),
                            seq: *seq,
                            user: msg.user.clone(),
                            text: msg.text.clone(),
                        };
                        prop_assert_eq!(got.seq, expected.seq, "seq of {:?}", msg);
                        prop_assert_eq!(&got.text, &msg.text);
                        prop_assert_eq!(&got.client_msg_id, &msg.client_msg_id);
                        logs.entry(room).or_default().push(expected.clone());
                        if let Some(key) = key {
                            first.insert(key, (expected, got.id));
                        }
                    }
                }
            }
        }
        // The log: per room, seqs 1..n gap-free in commit order, the model's rows exactly;
        // one row per (user, client_msg_id) across rooms.
        let mut ids = std::collections::HashSet::new();
        for room in ROOMS {
            let name = RoomName::new(*room).unwrap();
            let stored = store.messages_after(&name, 0, 10_000).await.unwrap();
            let got: Vec<Expected> = stored
                .iter()
                .map(|m| Expected {
                    room: m.room.to_string(),
                    seq: m.seq,
                    user: m.user.clone(),
                    text: m.text.clone(),
                })
                .collect();
            let want = logs.remove(room).unwrap_or_default();
            prop_assert_eq!(&got, &want, "room {}", room);
            let head = store.room_head(&name).await.unwrap();
            prop_assert_eq!(head.last_seq, want.len() as u64);
            for m in &stored {
                if let Some(c) = &m.client_msg_id {
                    prop_assert!(
                        ids.insert((m.user.clone(), c.clone())),
                        "two rows for {:?}",
                        c
                    );
                }
            }
        }
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn commit_batch_matches_the_model_on_sqlite(batches in batches()) {
        run(batches, Backend::Sqlite)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn commit_batch_matches_the_model_on_postgres(batches in batches()) {
        run(batches, Backend::Postgres)?;
    }
}

/// The interleaving that matters most, spelled out: a retry in the same batch as its
/// first send, and one in a later batch naming another room.
#[test]
fn a_retry_in_the_same_batch_and_in_another_room() {
    for backend in [Backend::Sqlite, Backend::Postgres] {
        run(
            vec![
                vec![(0, 0, Some(1)), (0, 1, Some(1)), (1, 0, Some(1))],
                vec![(0, 2, Some(1)), (1, 1, None), (0, 0, None)],
            ],
            backend,
        )
        .unwrap();
    }
}
