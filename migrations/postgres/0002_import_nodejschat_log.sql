-- An existing nodejschat database is upgraded in place: its history, the `log` table of
-- nodejschat's schema.psql
--     log(message_id integer unique, room integer, "time" timestamp, "user" text, message text)
-- is copied into wschat's rooms in its original order (message_id) with its original
-- times: log room N becomes room "N" (the legacy protocol's mapping), each room's messages
-- get seq 1, 2, 3, … after whatever the room already holds, and the room's last_seq is
-- set. nodejschat stored `time` as a timestamp without time zone written by servers running
-- in UTC: it is read as UTC.
--
-- `log` itself, its sequence and every other table of the application are only read.
-- Which log rows were imported is recorded in `wschat_legacy_imported`, so running the
-- import again (or over a log that grew since) never stores a row twice.
CREATE TABLE IF NOT EXISTS wschat_legacy_imported (
    message_id bigint PRIMARY KEY,
    -- No foreign key: retention deletes old messages, and a pruned row must still
    -- count as imported.
    id         bigint NOT NULL
);

DO $import$
DECLARE
    imported bigint;
BEGIN
    IF to_regclass('log') IS NULL THEN
        RETURN;
    END IF;
    IF (SELECT count(DISTINCT a.attname)
          FROM pg_attribute a
         WHERE a.attrelid = to_regclass('log')
           AND a.attnum > 0 AND NOT a.attisdropped
           AND a.attname IN ('message_id', 'room', 'time', 'user', 'message')) < 5 THEN
        RAISE NOTICE 'wschat: a "log" table exists but is not nodejschat''s; nothing imported';
        RETURN;
    END IF;

    INSERT INTO wschat_rooms (name)
    SELECT DISTINCT l.room::text FROM log l WHERE l.room IS NOT NULL
    ORDER BY 1
    ON CONFLICT (name) DO NOTHING;

    -- The rows still to import, with the seq each gets in its room.
    CREATE TEMPORARY TABLE wschat_import ON COMMIT DROP AS
    SELECT l.message_id::bigint AS message_id,
           r.id AS room_id,
           r.last_seq + row_number() OVER (PARTITION BY r.id ORDER BY l.message_id) AS seq,
           l."user" AS "user",
           l.message AS text,
           l."time" AT TIME ZONE 'UTC' AS created_at
      FROM log l
      JOIN wschat_rooms r ON r.name = l.room::text
     WHERE l.message_id IS NOT NULL
       AND l."user" IS NOT NULL
       AND l.message IS NOT NULL
       AND l."time" IS NOT NULL
       AND NOT EXISTS (SELECT 1 FROM wschat_legacy_imported i
                        WHERE i.message_id = l.message_id);

    -- Inserted in message_id order, so ids follow the original order too.
    WITH inserted AS (
        INSERT INTO wschat_messages (room_id, seq, "user", text, created_at)
        SELECT room_id, seq, "user", text, created_at
          FROM wschat_import
         ORDER BY message_id
        RETURNING id, room_id, seq
    )
    INSERT INTO wschat_legacy_imported (message_id, id)
    SELECT w.message_id, ins.id
      FROM inserted ins
      JOIN wschat_import w ON w.room_id = ins.room_id AND w.seq = ins.seq;
    GET DIAGNOSTICS imported = ROW_COUNT;

    UPDATE wschat_rooms r
       SET last_seq = m.last_seq
      FROM (SELECT room_id, max(seq) AS last_seq FROM wschat_import GROUP BY room_id) m
     WHERE r.id = m.room_id;

    RAISE NOTICE 'wschat: imported % messages from nodejschat''s log', imported;
END
$import$;
