-- wschat schema for the embedded store (SQLite).
-- `sessions` is the contract with the embedding application (nodejschat's table):
-- `key` and `user` are the first two columns and `room` the third, so that
-- `insert into sessions values('1','Michael Redman')` keeps working. wschat stores keys
-- only as 'sha256:<hex>' and looks them up by hash.
CREATE TABLE IF NOT EXISTS sessions (
    key        TEXT NOT NULL UNIQUE,
    "user"     TEXT NOT NULL,
    room       INTEGER,
    expires_at INTEGER
);

-- One row per room: the per-room sequence counter, bumped in the insert's transaction.
CREATE TABLE wschat_rooms (
    id       INTEGER PRIMARY KEY,
    name     TEXT NOT NULL UNIQUE,
    last_seq INTEGER NOT NULL DEFAULT 0
);

-- The log. `seq` is gap-free per room and assigned at commit.
CREATE TABLE wschat_messages (
    id            INTEGER PRIMARY KEY,
    room_id       INTEGER NOT NULL REFERENCES wschat_rooms(id),
    seq           INTEGER NOT NULL,
    "user"        TEXT NOT NULL,
    text          TEXT NOT NULL,
    created_at    INTEGER NOT NULL, -- unix milliseconds, UTC
    client_msg_id TEXT,
    UNIQUE (room_id, seq)
);

-- A retried send (same user, same client_msg_id) finds its first row.
CREATE UNIQUE INDEX wschat_messages_client_msg_id
    ON wschat_messages ("user", client_msg_id)
    WHERE client_msg_id IS NOT NULL;
