-- The agent that opened each MCP session through a sidecar, by upstream and
-- Mcp-Session-Id, shared by the fleet: another agent naming it is answered as for
-- an unknown session, on any sidecar and after a restart.

CREATE TABLE mcp_session_owners (
    upstream   text NOT NULL,
    session_id text NOT NULL,
    agent_id   text NOT NULL,
    opened_at  double precision NOT NULL,
    PRIMARY KEY (upstream, session_id)
);
CREATE INDEX mcp_session_owners_age ON mcp_session_owners (opened_at);
