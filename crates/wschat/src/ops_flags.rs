//! The rest of `serve`'s flags: one per setting, named after its key (`--max-commit-batch`
//! is `max_commit_batch`). Each one given overrides the file and the environment; the
//! defaults are `wschat config defaults`.

use serde::Serialize;

#[derive(clap::Args, Serialize)]
pub struct OpsFlags {
    /// NATS subject shared by the nodes of one deployment [default: wschat.events].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    nats_subject: Option<String>,
    /// On SQLite, create a demo session when there is none [default: true without
    /// --config, false with one].
    #[arg(long, value_name = "BOOL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    demo_session: Option<bool>,
    /// Largest page a `history` request gets [default: 500].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    max_history_page: Option<u32>,
    /// Rooms one v1 connection may be in at once [default: 100].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    max_rooms_per_connection: Option<usize>,
    /// Bytes queued for one connection before it is closed with 4008 [default: 4194304].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    outbound_queue_bytes: Option<usize>,
    /// WebSocket read buffer per connection, bytes [default: 1024].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    ws_read_buffer_bytes: Option<usize>,
    /// Most bytes of queued frames joined into one socket write [default: 32768].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    ws_write_buffer_bytes: Option<usize>,
    /// Milliseconds a busy connection holds its next write, under load [default: 10].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    write_delay_ms: Option<u64>,
    /// Frames written per second above which writes are held [default: 50000].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    write_delay_above_per_sec: Option<u64>,
    /// Seconds a v1 client has to authenticate [default: 10].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    auth_timeout_secs: Option<u64>,
    /// Seconds between server pings [default: 30].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    ping_interval_secs: Option<u64>,
    /// Seconds of silence after which a connection is closed [default: 90].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    idle_timeout_secs: Option<u64>,
    /// Upper bound of a graceful stop, seconds [default: 10].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    shutdown_grace_secs: Option<u64>,
    /// SQLite: milliseconds between commit starts while the node is busy [default: 2].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    commit_delay_ms: Option<u64>,
    /// Most messages committed in one transaction [default: 10000].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    max_commit_batch: Option<usize>,
    /// Messages kept per room; 0 keeps everything [default: 0].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    retention_per_room: Option<u64>,
    /// Seconds between two applications of retention [default: 60].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    retention_interval_secs: Option<u64>,
    /// Seconds between checks of open connections' sessions (revoked or expired: 1008).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    session_check_secs: Option<u64>,
    /// Seconds an address that tried too many unknown keys is refused [default: 60].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    failed_key_block_secs: Option<u64>,
}
