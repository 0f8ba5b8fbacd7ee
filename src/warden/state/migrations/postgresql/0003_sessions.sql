-- Session-aware policies: counters per session, Warden's record of the calls it
-- decided (to verify a conversation's history), and Responses API chains.

CREATE TABLE session_counters (
    session_id text NOT NULL,
    name       text NOT NULL,
    value      bigint NOT NULL DEFAULT 0,
    updated_at double precision NOT NULL,
    PRIMARY KEY (session_id, name)
);
CREATE INDEX session_counters_age ON session_counters (updated_at);

CREATE TABLE session_calls (
    call_id     text NOT NULL,
    decision_id text NOT NULL,
    tool        text NOT NULL,
    digest      text NOT NULL,
    effect      text NOT NULL,
    session_id  text,
    created_at  double precision NOT NULL,
    PRIMARY KEY (call_id, decision_id)
);
CREATE INDEX session_calls_age ON session_calls (created_at);

CREATE TABLE session_responses (
    response_id text PRIMARY KEY,
    session_id  text NOT NULL,
    previous_id text,
    calls       text NOT NULL,
    created_at  double precision NOT NULL
);
CREATE INDEX session_responses_age ON session_responses (created_at);
