-- Rollback protection for signed policy bundles (warden.policy.bundle.order):
-- the newest signing time activated per bundle name, shared by the fleet.
-- A mark only moves up.

CREATE TABLE policy_signed_marks (
    bundle       text PRIMARY KEY,
    signed_at    bigint NOT NULL,
    revision     text NOT NULL,
    activated_at double precision NOT NULL
);
