-- Who may use what an upstream issued through Warden, when the upstream cannot
-- tell agents apart (Warden holds its key, or agents share one).
--
-- id_owners: the agent that owns an id an upstream gave out, by scope: an MCP
-- session (mcp:<server URL>, by Mcp-Session-Id), which another agent naming is
-- answered as for an unknown session; a Responses API conversation
-- (conversation:) or a streamed answer until its link is kept (answer:), which
-- another agent may not use. Rows go once unused for sessions.ttl_s.
-- session_responses.agent_id: the agent a Responses answer was made for; another
-- agent continuing, fetching or deleting it is refused (NULL: kept before this).

CREATE TABLE IF NOT EXISTS id_owners (
    scope      TEXT NOT NULL,
    id         TEXT NOT NULL,
    agent_id   TEXT NOT NULL,
    used_at REAL NOT NULL,
    PRIMARY KEY (scope, id)
);
CREATE INDEX IF NOT EXISTS id_owners_age ON id_owners (used_at);
ALTER TABLE session_responses ADD COLUMN agent_id TEXT;
