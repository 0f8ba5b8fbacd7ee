-- The agent that opened each MCP session through Warden, by upstream and
-- Mcp-Session-Id: another agent naming it is answered as for an unknown session,
-- after a restart too (a server cannot tell agents apart when Warden holds its key).

CREATE TABLE IF NOT EXISTS mcp_session_owners (
    upstream   TEXT NOT NULL,
    session_id TEXT NOT NULL,
    agent_id   TEXT NOT NULL,
    opened_at  REAL NOT NULL,
    PRIMARY KEY (upstream, session_id)
);
CREATE INDEX IF NOT EXISTS mcp_session_owners_age ON mcp_session_owners (opened_at);
