-- wschat schema for PostgreSQL. Runs beside the embedding application's own tables:
-- wschat owns every `wschat_*` object and shares `sessions` (nodejschat's contract: `key`,
-- `user`, `room` as the first three columns, so `insert into sessions values('1','x')` and
-- `insert into sessions values('k2','guest',3)` keep working).
CREATE TABLE IF NOT EXISTS sessions (
    key    text NOT NULL UNIQUE,
    "user" text NOT NULL,
    room   integer
);
-- An existing nodejschat table may predate the room column; expiry is wschat's addition.
ALTER TABLE sessions ADD COLUMN IF NOT EXISTS room integer;
ALTER TABLE sessions ADD COLUMN IF NOT EXISTS expires_at timestamptz;

-- Keys never rest in clear: a plain key is replaced by its hash in the same statement.
CREATE OR REPLACE FUNCTION wschat_hash_session_key() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.key IS NOT NULL AND NEW.key NOT LIKE 'sha256:%' THEN
        NEW.key := 'sha256:' || encode(sha256(convert_to(NEW.key, 'UTF8')), 'hex');
    END IF;
    RETURN NEW;
END
$$;
DROP TRIGGER IF EXISTS wschat_hash_session_key ON sessions;
CREATE TRIGGER wschat_hash_session_key
    BEFORE INSERT OR UPDATE OF key ON sessions
    FOR EACH ROW EXECUTE FUNCTION wschat_hash_session_key();
-- Keys already there (an upgraded nodejschat database) are hashed in place.
UPDATE sessions SET key = key WHERE key NOT LIKE 'sha256:%';

-- One row per room: the per-room sequence counter, bumped in the insert's transaction.
CREATE TABLE wschat_rooms (
    id       bigserial PRIMARY KEY,
    name     text NOT NULL UNIQUE,
    last_seq bigint NOT NULL DEFAULT 0
);

-- The log. `seq` is gap-free per room and assigned at commit.
CREATE TABLE wschat_messages (
    id            bigserial PRIMARY KEY,
    room_id       bigint NOT NULL REFERENCES wschat_rooms (id),
    seq           bigint NOT NULL,
    "user"        text NOT NULL,
    text          text NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    client_msg_id text,
    UNIQUE (room_id, seq)
);

CREATE UNIQUE INDEX wschat_messages_client_msg_id
    ON wschat_messages ("user", client_msg_id)
    WHERE client_msg_id IS NOT NULL;
