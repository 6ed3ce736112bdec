-- Invite links (issue 10): an owner or admin creates one; a person signs up with its code.
-- Only the code's SHA-256 is stored (the code is 192 random bits, so a plain hash is
-- enough); `prefix` is its first characters, to tell invites apart in a list.
CREATE TABLE invites (
    id           BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    workspace_id BIGINT NOT NULL REFERENCES workspaces (id),
    code_hash    TEXT NOT NULL UNIQUE,
    prefix       TEXT NOT NULL,
    role         TEXT NOT NULL CHECK (role IN ('member', 'guest')),
    max_uses     INTEGER NOT NULL CHECK (max_uses >= 1),
    uses         INTEGER NOT NULL DEFAULT 0,
    expires_at   BIGINT NOT NULL,
    created_by   BIGINT NOT NULL REFERENCES users (id),
    created_at   BIGINT NOT NULL,
    revoked_at   BIGINT
);
CREATE INDEX invites_by_workspace ON invites (workspace_id, id);
