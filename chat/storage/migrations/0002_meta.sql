-- Node-wide settings kept with the data, such as the generated token-signing secret of an
-- installation that did not configure one.
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
