-- Nodes serving this database, with a heartbeat (a node whose heartbeat is old is gone).
CREATE TABLE wschat_nodes (
    id           TEXT PRIMARY KEY,
    broker       TEXT NOT NULL,
    started_at   INTEGER NOT NULL,
    heartbeat_at INTEGER NOT NULL
);
