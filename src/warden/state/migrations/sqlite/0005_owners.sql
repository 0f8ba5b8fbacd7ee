-- Who may use what an upstream issued through Warden, when the upstream cannot
-- tell agents apart (Warden holds its key, or agents share one).
--
-- mcp_session_owners: the agent that opened each MCP session, by upstream and
-- Mcp-Session-Id; another agent naming it is answered as for an unknown session.
-- session_responses.agent_id: the agent a Responses answer was made for; another
-- agent continuing, fetching or deleting it is refused (NULL: kept before this).

CREATE TABLE IF NOT EXISTS mcp_session_owners (
    upstream   TEXT NOT NULL,
    session_id TEXT NOT NULL,
    agent_id   TEXT NOT NULL,
    opened_at  REAL NOT NULL,
    PRIMARY KEY (upstream, session_id)
);
CREATE INDEX IF NOT EXISTS mcp_session_owners_age ON mcp_session_owners (opened_at);
ALTER TABLE session_responses ADD COLUMN agent_id TEXT;
