-- Warden's state on SQLite: the tables the stores have always created.
-- IF NOT EXISTS: a database file from before migrations is adopted as version 1.

CREATE TABLE IF NOT EXISTS budget_counters (
    counter  TEXT NOT NULL,
    window   TEXT NOT NULL,
    subject  TEXT NOT NULL,
    spent    REAL NOT NULL DEFAULT 0,
    reserved REAL NOT NULL DEFAULT 0,
    PRIMARY KEY (counter, window, subject)
);
CREATE TABLE IF NOT EXISTS budget_reservations (
    id         TEXT PRIMARY KEY,
    created_at REAL NOT NULL,
    holds      TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS killswitches (
    id         TEXT PRIMARY KEY,
    scope      TEXT NOT NULL,
    target     TEXT NOT NULL,
    reason     TEXT NOT NULL,
    created_by TEXT NOT NULL,
    created_at REAL NOT NULL,
    cleared_by TEXT,
    cleared_at REAL
);
CREATE INDEX IF NOT EXISTS killswitches_active ON killswitches (cleared_at);
CREATE TABLE IF NOT EXISTS approvals (
    id               TEXT PRIMARY KEY,
    decision_id      TEXT NOT NULL,
    action_id        TEXT NOT NULL,
    agent            TEXT NOT NULL,
    tool             TEXT,
    arguments        TEXT NOT NULL,
    arguments_sha256 TEXT NOT NULL,
    binding          TEXT NOT NULL,
    mode             TEXT NOT NULL,
    reason           TEXT NOT NULL,
    risk             TEXT,
    approvers        TEXT NOT NULL,
    required         INTEGER NOT NULL,
    redacted         TEXT NOT NULL,
    status           TEXT NOT NULL,
    created_at       REAL NOT NULL,
    expires_at       REAL NOT NULL,
    votes            TEXT NOT NULL DEFAULT '[]',
    decided_at       REAL,
    decided_by       TEXT,
    comment          TEXT NOT NULL DEFAULT '',
    consumed_at      REAL,
    owner            TEXT
);
CREATE INDEX IF NOT EXISTS approvals_status ON approvals (status, created_at);
CREATE INDEX IF NOT EXISTS approvals_binding ON approvals (binding, status);
CREATE TABLE IF NOT EXISTS approval_owners (
    instance     TEXT PRIMARY KEY,
    host         TEXT NOT NULL,
    pid          INTEGER NOT NULL,
    started      TEXT NOT NULL,
    heartbeat_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS call_links (
    call_id     TEXT PRIMARY KEY,
    decision_id TEXT,
    action      BLOB,
    created_at  REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS call_links_age ON call_links (created_at);
