-- Idempotent send is scoped to (channel, user): the same client_msg_id in another channel is
-- another message, and a retry never answers with a message from a channel the sender may
-- no longer read (defect 7). The old key was (user_id, client_msg_id).
--% postgres
ALTER TABLE messages DROP CONSTRAINT messages_user_id_client_msg_id_key;
--% sqlite
-- SQLite cannot drop a table constraint: rebuild the table. A rename carries the foreign
-- keys that point at it (mentions, reactions, thread_root_id) to the old copy, so those
-- two tables are rebuilt as well, in one transaction; the old copies are then dropped
-- children first.
ALTER TABLE messages RENAME TO messages_old;
ALTER TABLE mentions RENAME TO mentions_old;
ALTER TABLE reactions RENAME TO reactions_old;
CREATE TABLE messages (
    id              BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    channel_id      BIGINT NOT NULL REFERENCES channels (id),
    seq             BIGINT NOT NULL,
    user_id         BIGINT NOT NULL REFERENCES users (id),
    client_msg_id   TEXT NOT NULL,
    text            TEXT NOT NULL,
    ts              BIGINT NOT NULL,
    thread_root_id  BIGINT REFERENCES messages (id),
    reply_count     INTEGER NOT NULL DEFAULT 0,
    latest_reply_ts BIGINT,
    edited_ts       BIGINT,
    deleted         BOOLEAN NOT NULL DEFAULT FALSE,
    mentions        TEXT NOT NULL DEFAULT '[]',
    mention_channel BOOLEAN NOT NULL DEFAULT FALSE,
    mention_here    BOOLEAN NOT NULL DEFAULT FALSE,
    UNIQUE (channel_id, seq)
);
CREATE TABLE mentions (
    message_id BIGINT NOT NULL REFERENCES messages (id),
    user_id    BIGINT NOT NULL REFERENCES users (id),
    channel_id BIGINT NOT NULL REFERENCES channels (id),
    seq        BIGINT NOT NULL,
    PRIMARY KEY (message_id, user_id)
);
CREATE TABLE reactions (
    message_id BIGINT NOT NULL REFERENCES messages (id),
    emoji      TEXT NOT NULL,
    user_id    BIGINT NOT NULL REFERENCES users (id),
    created_at BIGINT NOT NULL,
    PRIMARY KEY (message_id, emoji, user_id)
);
INSERT INTO messages (id, channel_id, seq, user_id, client_msg_id, text, ts, thread_root_id,
    reply_count, latest_reply_ts, edited_ts, deleted, mentions, mention_channel, mention_here)
SELECT id, channel_id, seq, user_id, client_msg_id, text, ts, thread_root_id, reply_count,
    latest_reply_ts, edited_ts, deleted, mentions, mention_channel, mention_here
FROM messages_old ORDER BY id;
INSERT INTO mentions (message_id, user_id, channel_id, seq)
SELECT message_id, user_id, channel_id, seq FROM mentions_old;
INSERT INTO reactions (message_id, emoji, user_id, created_at)
SELECT message_id, emoji, user_id, created_at FROM reactions_old;
DROP TABLE reactions_old;
DROP TABLE mentions_old;
DROP TABLE messages_old;
CREATE INDEX messages_top_level ON messages (channel_id, seq) WHERE thread_root_id IS NULL;
CREATE INDEX messages_thread ON messages (thread_root_id, seq) WHERE thread_root_id IS NOT NULL;
CREATE INDEX mentions_by_user ON mentions (user_id, channel_id, seq);
--% both
CREATE UNIQUE INDEX messages_client_msg_id ON messages (channel_id, user_id, client_msg_id);
