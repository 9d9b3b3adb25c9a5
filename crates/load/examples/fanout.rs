//! A minimal legacy-protocol broadcaster for measuring the load client's own ceiling:
//! `{"authenticated":true}` on connect, then every `{"message"}` goes to every client as
//! one shared, pre-encoded frame (like bench/peers/node-floor, multi-threaded).
//!
//! `cargo run --release -p wschat-load --example fanout -- [PORT]` (default 56498).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
use wschat_protocol::legacy;

type Clients = Arc<RwLock<HashMap<u64, mpsc::UnboundedSender<Message>>>>;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let port: u16 = std::env::args()
        .nth(1)
        .map(|p| p.parse())
        .transpose()?
        .unwrap_or(56498);
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let listener = TcpListener::bind(("127.0.0.1", port)).await?;
    eprintln!("fanout listening on ws://127.0.0.1:{port}/");
    let clients: Clients = Arc::default();
    let next = AtomicU64::new(0);
    let config = WebSocketConfig::default()
        .read_buffer_size(8 * 1024)
        .write_buffer_size(8 * 1024);
    loop {
        let (tcp, _) = listener.accept().await?;
        tcp.set_nodelay(true)?;
        let id = next.fetch_add(1, Ordering::Relaxed);
        let clients = Arc::clone(&clients);
        tokio::spawn(async move {
            let Ok(ws) = tokio_tungstenite::accept_async_with_config(tcp, Some(config)).await
            else {
                return;
            };
            let (mut sink, mut stream) = ws.split();
            let (tx, mut rx) = mpsc::unbounded_channel::<Message>();
            let _ = tx.send(Message::text(legacy::AUTHENTICATED));
            if let Ok(mut c) = clients.write() {
                c.insert(id, tx);
            }
            tokio::spawn(async move {
                while let Some(m) = rx.recv().await {
                    if sink.feed(m).await.is_err() {
                        return;
                    }
                    while let Ok(m) = rx.try_recv() {
                        if sink.feed(m).await.is_err() {
                            return;
                        }
                    }
                    if sink.flush().await.is_err() {
                        return;
                    }
                }
            });
            while let Some(Ok(msg)) = stream.next().await {
                let Message::Text(t) = msg else { continue };
                let Ok(legacy::LegacyInbound::Say(text)) = legacy::decode_inbound(t.as_str())
                else {
                    continue;
                };
                let out = Message::Text(Utf8Bytes::from(legacy::encode_message(
                    "2016-08-08T17:20:32.421Z",
                    "fanout",
                    &text,
                )));
                if let Ok(c) = clients.read() {
                    for tx in c.values() {
                        let _ = tx.send(out.clone());
                    }
                }
            }
            if let Ok(mut c) = clients.write() {
                c.remove(&id);
            }
        });
    }
}
