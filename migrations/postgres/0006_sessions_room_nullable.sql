-- nodejschat's later releases made `sessions.room` NOT NULL. wschat gives a session without
-- a room room "0" (its admin API, `wschat session create` and `insert into sessions
-- values('1','x')` make such sessions), so the column may be NULL again; the embedding
-- application's inserts, which always name a room, are unaffected.
--
-- ALTER TABLE takes the table's strongest lock, and every query on `sessions` (every
-- connect's key lookup, the application's inserts) queues behind a wait for it: the wait
-- is bounded (an application transaction that holds `sessions` makes this start fail,
-- naming the lock, and the next start tries again), and the ALTER runs only when needed.
SET LOCAL lock_timeout = '5s';
DO $nullable$
BEGIN
    IF EXISTS (SELECT 1
                 FROM pg_attribute a
                WHERE a.attrelid = to_regclass('sessions')
                  AND a.attname = 'room'
                  AND a.attnum > 0 AND NOT a.attisdropped
                  AND a.attnotnull) THEN
        ALTER TABLE sessions ALTER COLUMN room DROP NOT NULL;
    END IF;
END
$nullable$;
