-- Snapshots of a household's past (issue 18, `householdAt`): the fold of its
-- recorded events up to `at` (events::past::Past as JSON) and the log
-- cursor right after them, so a later instant folds only what follows.
-- Derived from the log: deleting any or all rows loses nothing.
CREATE TABLE IF NOT EXISTS household_snapshots (
    household_id uuid        NOT NULL,
    at           timestamptz NOT NULL,
    -- The history cursor (kit::history::Cursor) after the folded records.
    "cursor"     text        NOT NULL,
    events       bigint      NOT NULL,
    state        jsonb       NOT NULL,
    taken_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (household_id, at)
);
