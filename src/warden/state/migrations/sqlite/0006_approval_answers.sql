-- What an approver of an MCP retry needs to see besides the arguments: the client's
-- answers to the server's questions (inputResponses), in display form (credentials
-- masked, the decision's redactions applied), as JSON; NULL for every other action.

ALTER TABLE approvals ADD COLUMN answers TEXT;
