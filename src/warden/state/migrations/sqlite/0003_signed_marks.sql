-- Rollback protection for signed policy bundles (warden.policy.bundle.order):
-- the newest signing time activated per bundle name. A mark only moves up.

CREATE TABLE IF NOT EXISTS policy_signed_marks (
    bundle       TEXT PRIMARY KEY,
    signed_at    INTEGER NOT NULL,
    revision     TEXT NOT NULL,
    activated_at REAL NOT NULL
);
