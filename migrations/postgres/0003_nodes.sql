-- Nodes serving this database, with a heartbeat (a node whose heartbeat is old is gone).
CREATE TABLE wschat_nodes (
    id           text PRIMARY KEY,
    broker       text NOT NULL,
    started_at   timestamptz NOT NULL DEFAULT now(),
    heartbeat_at timestamptz NOT NULL DEFAULT now()
);
