-- The central audit store: every sidecar's audit records and signed checkpoints,
-- shipped from its local log (the spool) by `audit.ship`. Append-only.
--
-- A record is kept as the exact bytes of its local line (`line`), so verifying
-- from here recomputes the same hashes as the sidecar; the other columns index
-- it (they are checked against `line` by `warden audit verify --url`).
-- (log_id, idx) is the key: shipping again after a failure stores nothing twice.

CREATE TABLE audit_logs (
    log_id     text PRIMARY KEY,               -- the log's checkpoint origin
    vkey       text NOT NULL,                  -- the verifier key of its checkpoints
    created    text NOT NULL,                  -- when the sidecar created the log
    first_seen double precision NOT NULL
);

CREATE TABLE audit_records (
    log_id      text NOT NULL,
    idx         bigint NOT NULL,               -- the record's sequence number in its log
    record_id   text NOT NULL,
    kind        text NOT NULL,
    "time"      timestamptz NOT NULL,
    agent       text,
    decision_id text,
    effect      text,
    line        bytea NOT NULL,                -- the stored record, byte for byte
    shipped_at  double precision NOT NULL,
    PRIMARY KEY (log_id, idx)
);
CREATE INDEX audit_records_time ON audit_records ("time");
CREATE INDEX audit_records_agent ON audit_records (agent, "time");
CREATE INDEX audit_records_decision ON audit_records (decision_id) WHERE decision_id IS NOT NULL;

CREATE TABLE audit_checkpoints (
    log_id     text NOT NULL,
    size       bigint NOT NULL,
    note       text NOT NULL,                  -- the signed note, as the sidecar stored it
    shipped_at double precision NOT NULL,
    PRIMARY KEY (log_id, size)
);

-- Append-only for everyone, owners included: UPDATE, DELETE and TRUNCATE are
-- rejected. Only a superuser (or the tables' owner) can disable the triggers,
-- and `warden audit verify --url` finds what was changed behind them.
-- Give the role sidecars ship as INSERT and SELECT only (docs/audit.md):
--   GRANT INSERT, SELECT ON audit_logs, audit_records, audit_checkpoints TO warden_audit;
CREATE FUNCTION warden_audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the Warden audit store is append-only: % on % is not allowed',
        TG_OP, TG_TABLE_NAME
        USING ERRCODE = 'insufficient_privilege';
END
$$;

CREATE TRIGGER audit_logs_append_only BEFORE UPDATE OR DELETE ON audit_logs
    FOR EACH ROW EXECUTE FUNCTION warden_audit_append_only();
CREATE TRIGGER audit_logs_no_truncate BEFORE TRUNCATE ON audit_logs
    FOR EACH STATEMENT EXECUTE FUNCTION warden_audit_append_only();
CREATE TRIGGER audit_records_append_only BEFORE UPDATE OR DELETE ON audit_records
    FOR EACH ROW EXECUTE FUNCTION warden_audit_append_only();
CREATE TRIGGER audit_records_no_truncate BEFORE TRUNCATE ON audit_records
    FOR EACH STATEMENT EXECUTE FUNCTION warden_audit_append_only();
CREATE TRIGGER audit_checkpoints_append_only BEFORE UPDATE OR DELETE ON audit_checkpoints
    FOR EACH ROW EXECUTE FUNCTION warden_audit_append_only();
CREATE TRIGGER audit_checkpoints_no_truncate BEFORE TRUNCATE ON audit_checkpoints
    FOR EACH STATEMENT EXECUTE FUNCTION warden_audit_append_only();
