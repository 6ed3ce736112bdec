-- Core schema. Times are milliseconds since the epoch (BIGINT) in both dialects.

CREATE TABLE workspaces (
    id             BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name           TEXT NOT NULL UNIQUE,
    -- The workspace event position: bumped once per committed batch of events.
    last_event_seq BIGINT NOT NULL DEFAULT 0,
    created_at     BIGINT NOT NULL
);

CREATE TABLE users (
    id            BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    workspace_id  BIGINT NOT NULL REFERENCES workspaces (id),
    handle        TEXT NOT NULL,
    display_name  TEXT NOT NULL,
    real_name     TEXT NOT NULL DEFAULT '',
    avatar_url    TEXT NOT NULL DEFAULT '',
    tz            TEXT NOT NULL DEFAULT 'UTC',
    role          TEXT NOT NULL CHECK (role IN ('owner', 'admin', 'member', 'guest')),
    deactivated   BOOLEAN NOT NULL DEFAULT FALSE,
    password_hash TEXT,
    created_at    BIGINT NOT NULL,
    UNIQUE (workspace_id, handle)
);

CREATE TABLE channels (
    id           BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    workspace_id BIGINT NOT NULL REFERENCES workspaces (id),
    kind         TEXT NOT NULL CHECK (kind IN ('public', 'private', 'dm', 'group_dm')),
    name         TEXT NOT NULL,
    topic        TEXT NOT NULL DEFAULT '',
    purpose      TEXT NOT NULL DEFAULT '',
    archived     BOOLEAN NOT NULL DEFAULT FALSE,
    created_by   BIGINT NOT NULL REFERENCES users (id),
    created_at   BIGINT NOT NULL,
    -- Per-channel message position, bumped by every message (replies included).
    last_seq     BIGINT NOT NULL DEFAULT 0,
    -- Sorted member ids of a DM / group DM: opening the same DM twice finds the first.
    dm_key       TEXT,
    UNIQUE (workspace_id, dm_key)
);
CREATE UNIQUE INDEX channels_named ON channels (workspace_id, name) WHERE dm_key IS NULL;

CREATE TABLE channel_members (
    channel_id    BIGINT NOT NULL REFERENCES channels (id),
    user_id       BIGINT NOT NULL REFERENCES users (id),
    joined_at     BIGINT NOT NULL,
    last_read_seq BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (channel_id, user_id)
);
CREATE INDEX channel_members_by_user ON channel_members (user_id, channel_id);

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
    UNIQUE (channel_id, seq),
    -- Idempotent send: a retry with the same client id finds the first message.
    UNIQUE (user_id, client_msg_id)
);
CREATE INDEX messages_top_level ON messages (channel_id, seq) WHERE thread_root_id IS NULL;
CREATE INDEX messages_thread ON messages (thread_root_id, seq) WHERE thread_root_id IS NOT NULL;

-- Who a message mentions (explicitly, by @channel, or by @here), for mention counts.
CREATE TABLE mentions (
    message_id BIGINT NOT NULL REFERENCES messages (id),
    user_id    BIGINT NOT NULL REFERENCES users (id),
    channel_id BIGINT NOT NULL REFERENCES channels (id),
    seq        BIGINT NOT NULL,
    PRIMARY KEY (message_id, user_id)
);
CREATE INDEX mentions_by_user ON mentions (user_id, channel_id, seq);

CREATE TABLE reactions (
    message_id BIGINT NOT NULL REFERENCES messages (id),
    emoji      TEXT NOT NULL,
    user_id    BIGINT NOT NULL REFERENCES users (id),
    created_at BIGINT NOT NULL,
    PRIMARY KEY (message_id, emoji, user_id)
);

-- The event log and outbox: every durable event, numbered per workspace in commit order,
-- with the audience it was delivered to. Source for resume beyond the replay window.
CREATE TABLE events (
    workspace_id BIGINT NOT NULL REFERENCES workspaces (id),
    seq          BIGINT NOT NULL,
    type         TEXT NOT NULL,
    audience     TEXT NOT NULL,
    payload      TEXT NOT NULL,
    created_at   BIGINT NOT NULL,
    PRIMARY KEY (workspace_id, seq)
);

CREATE TABLE sessions (
    id         TEXT PRIMARY KEY,
    user_id    BIGINT NOT NULL REFERENCES users (id),
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    revoked_at BIGINT
);
CREATE INDEX sessions_by_user ON sessions (user_id);
