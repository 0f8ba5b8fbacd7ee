-- Session-aware policies: counters per session, Warden's record of the calls it
-- decided (to verify a conversation's history), and Responses API chains.
-- IF NOT EXISTS: the session store creates the same tables when it opens.

CREATE TABLE IF NOT EXISTS session_counters (
    session_id TEXT NOT NULL,
    name       TEXT NOT NULL,
    value      INTEGER NOT NULL DEFAULT 0,
    updated_at REAL NOT NULL,
    PRIMARY KEY (session_id, name)
);
CREATE INDEX IF NOT EXISTS session_counters_age ON session_counters (updated_at);
CREATE TABLE IF NOT EXISTS session_calls (
    call_id     TEXT NOT NULL,
    decision_id TEXT NOT NULL,
    tool        TEXT NOT NULL,
    digest      TEXT NOT NULL,
    effect      TEXT NOT NULL,
    session_id  TEXT,
    created_at  REAL NOT NULL,
    PRIMARY KEY (call_id, decision_id)
);
CREATE INDEX IF NOT EXISTS session_calls_age ON session_calls (created_at);
CREATE TABLE IF NOT EXISTS session_responses (
    response_id TEXT PRIMARY KEY,
    session_id  TEXT NOT NULL,
    previous_id TEXT,
    calls       TEXT NOT NULL,
    created_at  REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS session_responses_age ON session_responses (created_at);
