-- Checkpoints signed where a run of Warden stopped cleanly (`closed`) or resumed
-- a closed log (`reopened`), kept even when audit_checkpoints already holds one of
-- their size: that table keeps the first checkpoint of each size, and on a quiet
-- log the checkpoint of a clean stop has the size of a periodic one shipped
-- before it. Without it `warden audit verify --url` could not tell records
-- appended after a clean stop, then taken on as a crash's, from Warden's own.
--
-- digest is the SHA-256 (hex) of the checkpoint's text, as `reopened` lines name
-- it; verify checks it against the note. Additive: older sidecars never use it.
-- Give the role sidecars ship as INSERT and SELECT on it too (docs/audit.md):
--   GRANT INSERT, SELECT ON audit_run_checkpoints TO warden_audit;

CREATE TABLE audit_run_checkpoints (
    log_id     text NOT NULL,
    size       bigint NOT NULL,
    digest     text NOT NULL,
    note       text NOT NULL,                  -- the signed note, as the sidecar stored it
    shipped_at double precision NOT NULL,
    PRIMARY KEY (log_id, size, digest)
);

-- Append-only, like the other audit tables (0002_audit_store).
CREATE TRIGGER audit_run_checkpoints_append_only BEFORE UPDATE OR DELETE ON audit_run_checkpoints
    FOR EACH ROW EXECUTE FUNCTION warden_audit_append_only();
CREATE TRIGGER audit_run_checkpoints_no_truncate BEFORE TRUNCATE ON audit_run_checkpoints
    FOR EACH STATEMENT EXECUTE FUNCTION warden_audit_append_only();
