-- nodejschat's first releases (the ones its README describes: `node ws_server/server.js`,
-- `insert into sessions values('1','Michael Redman')`) kept one room for everyone and its
-- history in `chat_log`:
--     chat_log("time" timestamp, "user" text, message text)   (one release added message_id)
-- written as `insert into chat_log values(now(), user, message)` and replayed to every
-- connection `order by time`. 0002 imports only the later releases' `log`. Here
-- `chat_log` is copied into room "0" (the room of a session without a `room`, as those
-- sessions are) in that order (then message_id where it exists, then the row's place),
-- with its original times, read as UTC as 0002 reads `log`'s.
--
-- History goes before what a room holds, and seqs cannot be put before a room's first:
-- when room "0" already holds messages (wschat ran on this database before, or 0002
-- imported `log` rows of room 0), `chat_log` goes to a room of its own, "nodejschat
-- chat_log", with a warning. `chat_log` is only read; the import runs once
-- (`wschat_legacy_chat_log_imported` records it, with the room and the seqs the rows got,
-- for docs/deploy.md's recipe that moves their times when nodejschat's database server
-- ran in another time zone).
CREATE TABLE IF NOT EXISTS wschat_legacy_chat_log_imported (
    imported_at timestamptz NOT NULL DEFAULT now(),
    messages    bigint NOT NULL,
    room_id     bigint NOT NULL,
    first_seq   bigint NOT NULL,
    last_seq    bigint NOT NULL
);

DO $import$
DECLARE
    imported bigint;
    target text := '0';
    room_id bigint;
    before bigint;
    tie_break text := '';
BEGIN
    IF to_regclass('chat_log') IS NULL
       OR EXISTS (SELECT 1 FROM wschat_legacy_chat_log_imported) THEN
        RETURN;
    END IF;
    -- nodejschat's columns, of its types: a timestamp and two texts.
    IF (SELECT count(DISTINCT a.attname)
          FROM pg_attribute a
         WHERE a.attrelid = to_regclass('chat_log')
           AND a.attnum > 0 AND NOT a.attisdropped
           AND ((a.attname = 'time'
                 AND a.atttypid IN ('timestamp'::regtype, 'timestamptz'::regtype))
             OR (a.attname IN ('user', 'message')
                 AND a.atttypid IN ('text'::regtype, 'varchar'::regtype, 'bpchar'::regtype)))) < 3 THEN
        RAISE NOTICE 'wschat: a "chat_log" table exists but is not nodejschat''s; nothing imported';
        RETURN;
    END IF;
    IF EXISTS (SELECT 1
                 FROM pg_attribute a
                WHERE a.attrelid = to_regclass('chat_log')
                  AND a.attnum > 0 AND NOT a.attisdropped
                  AND a.attname = 'message_id') THEN
        tie_break := 'c.message_id, ';
    END IF;

    IF EXISTS (SELECT 1 FROM wschat_rooms r WHERE r.name = '0' AND r.last_seq > 0) THEN
        target := 'nodejschat chat_log';
        RAISE WARNING 'wschat: room "0" already holds messages; nodejschat''s chat_log goes to the room "%"', target;
    END IF;
    INSERT INTO wschat_rooms (name) VALUES (target) ON CONFLICT (name) DO NOTHING;
    -- The room's counter row, locked as a commit locks it: seqs follow whatever the room
    -- holds.
    SELECT r.id, r.last_seq INTO room_id, before FROM wschat_rooms r WHERE r.name = target FOR UPDATE;

    -- Inserted in seq order, so ids follow the original order too.
    EXECUTE format($sql$
        INSERT INTO wschat_messages (room_id, seq, "user", text, created_at)
        SELECT r.id,
               r.last_seq + row_number() OVER (ORDER BY c."time", %s c.ctid),
               c."user",
               c.message,
               c."time"::timestamp AT TIME ZONE 'UTC'
          FROM chat_log c
          JOIN wschat_rooms r ON r.id = $1
         WHERE c."time" IS NOT NULL
           AND c."user" IS NOT NULL
           AND c.message IS NOT NULL
         ORDER BY 2
    $sql$, tie_break) USING room_id;
    GET DIAGNOSTICS imported = ROW_COUNT;

    UPDATE wschat_rooms r SET last_seq = r.last_seq + imported WHERE r.id = room_id;
    INSERT INTO wschat_legacy_chat_log_imported (messages, room_id, first_seq, last_seq)
    VALUES (imported, room_id, before + 1, before + imported);
    RAISE NOTICE 'wschat: imported % messages from nodejschat''s chat_log into room "%"', imported, target;
END
$import$;
