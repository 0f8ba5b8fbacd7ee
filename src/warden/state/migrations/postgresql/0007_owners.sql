-- Who may use what an upstream issued through a sidecar, when the upstream cannot
-- tell agents apart (Warden holds its key, or agents share one); shared by the fleet.
--
-- id_owners: the agent that owns an id an upstream gave out, by scope: an MCP
-- session (mcp:<server URL>, by Mcp-Session-Id), which another agent naming is
-- answered as for an unknown session; a Responses API conversation
-- (conversation:) or a streamed answer until its link is kept (answer:), which
-- another agent may not use. Rows go once unused for sessions.ttl_s.
-- session_responses.agent_id: the agent a Responses answer was made for; another
-- agent continuing, fetching or deleting it is refused (NULL: kept before this).

CREATE TABLE id_owners (
    scope      text NOT NULL,
    id         text NOT NULL,
    agent_id   text NOT NULL,
    used_at double precision NOT NULL,
    PRIMARY KEY (scope, id)
);
CREATE INDEX id_owners_age ON id_owners (used_at);
ALTER TABLE session_responses ADD COLUMN agent_id text;
