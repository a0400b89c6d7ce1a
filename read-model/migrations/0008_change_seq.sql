-- Subscriptions that resume (issue 11): every change pushed on a household
-- subscription has a per-household, gap-free, increasing sequence number,
-- assigned in the transaction that commits it; the changes themselves are
-- retained for a while (24 h by default) so a subscriber can resume `after`
-- one of them.
CREATE TABLE IF NOT EXISTS household_change_seqs (
    household_id uuid PRIMARY KEY,
    last_seq     bigint NOT NULL
);

CREATE TABLE IF NOT EXISTS household_changes (
    household_id uuid NOT NULL,
    change_seq   bigint NOT NULL,
    -- `shadow` (a ShadowChanged) or `registry` (a RegistryChanged)
    kind         text NOT NULL,
    change       jsonb NOT NULL,
    at           timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (household_id, change_seq)
);
CREATE INDEX IF NOT EXISTS household_changes_at ON household_changes (at);
