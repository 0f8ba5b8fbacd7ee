-- Warden's fleet state: budgets, kill switches, approvals and call links.
-- Times are seconds since the epoch (double precision), as the sidecars write them.

CREATE TABLE budget_counters (
    counter  text NOT NULL,
    "window" text NOT NULL,
    subject  text NOT NULL,
    spent    double precision NOT NULL DEFAULT 0,
    reserved double precision NOT NULL DEFAULT 0,
    PRIMARY KEY (counter, "window", subject)
);

CREATE TABLE budget_reservations (
    id         text PRIMARY KEY,
    created_at double precision NOT NULL,
    holds      text NOT NULL
);
CREATE INDEX budget_reservations_age ON budget_reservations (created_at);

CREATE TABLE killswitches (
    id         text PRIMARY KEY,
    scope      text NOT NULL,
    target     text NOT NULL,
    reason     text NOT NULL,
    created_by text NOT NULL,
    created_at double precision NOT NULL,
    cleared_by text,
    cleared_at double precision
);
CREATE INDEX killswitches_active ON killswitches (cleared_at);

CREATE TABLE approvals (
    id               text PRIMARY KEY,
    decision_id      text NOT NULL,
    action_id        text NOT NULL,
    agent            text NOT NULL,
    tool             text,
    arguments        text NOT NULL,
    arguments_sha256 text NOT NULL,
    binding          text NOT NULL,
    mode             text NOT NULL,
    reason           text NOT NULL,
    risk             text,
    approvers        text NOT NULL,
    required         integer NOT NULL,
    redacted         text NOT NULL,
    status           text NOT NULL,
    created_at       double precision NOT NULL,
    expires_at       double precision NOT NULL,
    votes            text NOT NULL DEFAULT '[]',
    decided_at       double precision,
    decided_by       text,
    comment          text NOT NULL DEFAULT '',
    consumed_at      double precision,
    owner            text
);
CREATE INDEX approvals_status ON approvals (status, created_at);
CREATE INDEX approvals_binding ON approvals (binding, status);

CREATE TABLE approval_owners (
    instance     text PRIMARY KEY,
    host         text NOT NULL,
    pid          integer NOT NULL,
    started      text NOT NULL,
    heartbeat_at double precision NOT NULL
);

CREATE TABLE call_links (
    call_id     text PRIMARY KEY,
    decision_id text,
    action      bytea,
    created_at  double precision NOT NULL
);
CREATE INDEX call_links_age ON call_links (created_at);

-- Reservations: one call, one transaction. The counter rows are locked in key
-- order (FOR UPDATE), so concurrent reservations from any number of sidecars
-- queue on the rows they share, never deadlock, and see each other's holds.
-- Returns each hold's counter totals before it and whether it passes its limit.
CREATE FUNCTION warden_reserve(
    p_id text, p_counter text[], p_window text[], p_subject text[],
    p_amount double precision[], p_limit double precision[], p_force boolean,
    p_now double precision, p_holds text
) RETURNS TABLE (
    ok boolean, before_spent double precision[], before_reserved double precision[],
    over_limit boolean[]
) LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    n integer := coalesce(array_length(p_counter, 1), 0);
    s double precision[] := '{}';
    r double precision[] := '{}';
    o boolean[] := '{}';
    any_over boolean := false;
    v_spent double precision;
    v_reserved double precision;
    v_over boolean;
BEGIN
    INSERT INTO budget_counters (counter, "window", subject)
        SELECT DISTINCT * FROM unnest(p_counter, p_window, p_subject)
        ON CONFLICT DO NOTHING;
    PERFORM 1 FROM budget_counters c
        JOIN unnest(p_counter, p_window, p_subject) AS k (kc, kw, ks)
            ON c.counter = k.kc AND c."window" = k.kw AND c.subject = k.ks
        ORDER BY c.counter, c."window", c.subject
        FOR UPDATE OF c;
    FOR i IN 1..n LOOP
        SELECT c.spent, c.reserved INTO v_spent, v_reserved FROM budget_counters c
            WHERE c.counter = p_counter[i] AND c."window" = p_window[i]
              AND c.subject = p_subject[i];
        -- A zero-value hold is refused once the cap is used up, not only passed.
        v_over := p_limit[i] IS NOT NULL AND (
            v_spent + v_reserved + p_amount[i] > p_limit[i]
            OR (p_amount[i] = 0 AND v_spent + v_reserved >= p_limit[i]));
        s := s || v_spent;
        r := r || v_reserved;
        o := o || v_over;
        any_over := any_over OR v_over;
    END LOOP;
    IF any_over AND NOT p_force THEN
        RETURN QUERY SELECT false, s, r, o;
        RETURN;
    END IF;
    UPDATE budget_counters c SET reserved = c.reserved + k.amount
        FROM (SELECT u.kc, u.kw, u.ks, sum(u.ka) AS amount
              FROM unnest(p_counter, p_window, p_subject, p_amount) AS u (kc, kw, ks, ka)
              GROUP BY 1, 2, 3) AS k
        WHERE c.counter = k.kc AND c."window" = k.kw AND c.subject = k.ks;
    INSERT INTO budget_reservations (id, created_at, holds) VALUES (p_id, p_now, p_holds)
        ON CONFLICT (id) DO UPDATE SET created_at = excluded.created_at, holds = excluded.holds;
    RETURN QUERY SELECT true, s, r, o;
END
$$;

-- Settling: drop the reservation and move its holds into spend, in one call.
-- p_actual maps a counter name to the value really spent (NULL: as held).
CREATE FUNCTION warden_settle(p_id text, p_actual jsonb)
RETURNS TABLE (
    o_counter text, o_window text, o_subject text,
    o_spent double precision, o_reserved double precision
) LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_holds jsonb;
BEGIN
    DELETE FROM budget_reservations WHERE id = p_id RETURNING holds::jsonb INTO v_holds;
    IF v_holds IS NULL THEN
        RETURN;
    END IF;
    PERFORM 1 FROM budget_counters c
        JOIN (SELECT DISTINCT e->>0 AS kc, e->>1 AS kw, e->>2 AS ks
              FROM jsonb_array_elements(v_holds) AS e) AS k
            ON c.counter = k.kc AND c."window" = k.kw AND c.subject = k.ks
        ORDER BY c.counter, c."window", c.subject
        FOR UPDATE OF c;
    RETURN QUERY UPDATE budget_counters c
        SET reserved = greatest(0, c.reserved - k.amount), spent = c.spent + k.spend
        FROM (SELECT e->>0 AS kc, e->>1 AS kw, e->>2 AS ks,
                     sum((e->>3)::double precision) AS amount,
                     sum(CASE WHEN p_actual IS NULL THEN (e->>3)::double precision
                         ELSE greatest(0, coalesce((p_actual->>(e->>0))::double precision, 0))
                         END) AS spend
              FROM jsonb_array_elements(v_holds) AS e GROUP BY 1, 2, 3) AS k
        WHERE c.counter = k.kc AND c."window" = k.kw AND c.subject = k.ks
        RETURNING c.counter, c."window", c.subject, c.spent, c.reserved;
END
$$;

-- The change feed: every change to a kill switch or an approval, by whoever
-- makes it (a sidecar, `warden db`, psql), is published to the sidecars
-- listening on the channel named by the trigger's argument.
CREATE FUNCTION warden_notify_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        PERFORM pg_notify(TG_ARGV[0], OLD.id);
    ELSE
        PERFORM pg_notify(TG_ARGV[0], NEW.id);
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER killswitches_notify AFTER INSERT OR UPDATE OR DELETE ON killswitches
    FOR EACH ROW EXECUTE FUNCTION warden_notify_change('warden_killswitches');
CREATE TRIGGER approvals_notify AFTER INSERT OR UPDATE OR DELETE ON approvals
    FOR EACH ROW EXECUTE FUNCTION warden_notify_change('warden_approvals');
