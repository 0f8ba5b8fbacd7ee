-- Who may use what an upstream issued through a sidecar, when the upstream cannot
-- tell agents apart (Warden holds its key, or agents share one); shared by the fleet.
--
-- mcp_session_owners: the agent that opened each MCP session, by upstream and
-- Mcp-Session-Id; another agent naming it is answered as for an unknown session.
-- session_responses.agent_id: the agent a Responses answer was made for; another
-- agent continuing, fetching or deleting it is refused (NULL: kept before this).

CREATE TABLE mcp_session_owners (
    upstream   text NOT NULL,
    session_id text NOT NULL,
    agent_id   text NOT NULL,
    opened_at  double precision NOT NULL,
    PRIMARY KEY (upstream, session_id)
);
CREATE INDEX mcp_session_owners_age ON mcp_session_owners (opened_at);
ALTER TABLE session_responses ADD COLUMN agent_id text;
