-- What a commit costs per message (bench/RESULTS.md, persist; measured on 1,000-message
-- batches):
-- * The foreign key from wschat_messages to wschat_rooms ran a trigger per inserted row
--   (about 10 µs each). wschat never deletes a room row, and every message's room_id comes
--   from the counter row its commit just locked, so the key could never be violated.
-- * Text compared under the database's collation (strcoll) made each insert into the
--   unique (user, client_msg_id) index cost about 10 µs. Byte order ("C") compares the same
--   for equality, and is the order room names are locked and listed in anyway.
ALTER TABLE wschat_messages DROP CONSTRAINT IF EXISTS wschat_messages_room_id_fkey;
ALTER TABLE wschat_messages
    ALTER COLUMN "user" TYPE text COLLATE "C",
    ALTER COLUMN client_msg_id TYPE text COLLATE "C";
ALTER TABLE wschat_rooms ALTER COLUMN name TYPE text COLLATE "C";
-- The repeat-detection index, client_msg_id first: it differs between messages of one user
-- (so a comparison ends there), and the leading column's offset in an index tuple is fixed.
DROP INDEX IF EXISTS wschat_messages_client_msg_id;
CREATE UNIQUE INDEX wschat_messages_client_msg_id
    ON wschat_messages (client_msg_id, "user")
    WHERE client_msg_id IS NOT NULL;
