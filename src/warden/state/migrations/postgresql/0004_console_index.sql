-- The console's decision index on the fleet's database: a few fields of each
-- audit record, so the console can filter, page and chart without reading the
-- log. Only a cache: `warden audit reindex` rebuilds a log's rows from the log,
-- which stays the source of truth (details and proofs are always read from it).
--
-- Every sidecar indexes its own log, keyed by the log's checkpoint origin, so
-- many sidecars share the tables without ever touching each other's rows.

CREATE TABLE console_index_logs (
    log_id     text PRIMARY KEY,                -- the log's checkpoint origin
    schema     integer NOT NULL,                -- the row format (warden.audit.index.SCHEMA)
    rebuilt_at double precision NOT NULL
);

CREATE TABLE console_index (
    log_id      text NOT NULL,
    seq         bigint NOT NULL,                -- the record's sequence number in its log
    id          text NOT NULL,
    "time"      text COLLATE "C" NOT NULL,      -- RFC 3339 as recorded: compared as bytes
    ts          double precision NOT NULL,      -- the same time, epoch seconds (charts)
    kind        text NOT NULL,
    agent       text,
    tool        text,
    effect      text,
    enforced    text,
    mode        text,
    guard       text,
    decision_id text,
    reason      text,
    revision    text,
    elapsed_us  bigint,
    error       text,
    risk        text,
    PRIMARY KEY (log_id, seq)
);
CREATE INDEX console_index_ts ON console_index (log_id, ts);
CREATE INDEX console_index_agent ON console_index (log_id, agent, seq);
CREATE INDEX console_index_tool ON console_index (log_id, tool, seq);
CREATE INDEX console_index_kind ON console_index (log_id, kind, seq);
CREATE INDEX console_index_decision ON console_index (log_id, decision_id);
CREATE INDEX console_index_id ON console_index (log_id, id);
