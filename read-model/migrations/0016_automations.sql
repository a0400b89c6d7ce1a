-- Automations and the household's time zone (issue 17), folded from the
-- household stream.
ALTER TABLE households ADD COLUMN time_zone text;

CREATE TABLE automations (
    automation_id uuid PRIMARY KEY,
    household_id  uuid NOT NULL,
    name          text NOT NULL,
    enabled       boolean NOT NULL,
    -- whose rights it acts with
    created_by    uuid NOT NULL,
    definition    jsonb NOT NULL,
    created_at    timestamptz NOT NULL,
    updated_at    timestamptz NOT NULL
);
CREATE INDEX automations_household ON automations (household_id);
