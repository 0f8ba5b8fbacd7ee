-- What an approver needs to see, and what erasure needs to find: the upstream and
-- method of the held call, and the keyed references of the data subjects it names
-- (audit.subjects sources, space-separated; never the subject ids themselves).

ALTER TABLE approvals ADD COLUMN upstream TEXT;
ALTER TABLE approvals ADD COLUMN method TEXT;
ALTER TABLE approvals ADD COLUMN subjects TEXT NOT NULL DEFAULT '';
