-- Automation runs (issue 17): each run's trace, folded from the engine's
-- AutomationTriggered / AutomationRunStepped / AutomationRunFinished.
CREATE TABLE automation_runs (
    run_id        uuid PRIMARY KEY,
    automation_id uuid NOT NULL,
    household_id  uuid NOT NULL,
    started_at    timestamptz NOT NULL,
    trigger       int NOT NULL,
    cause         uuid,
    what          text NOT NULL,
    conditions    jsonb NOT NULL DEFAULT '[]',
    -- run, conditions, skipped, stopped; then done / stopped / failed when it ends
    outcome       text NOT NULL,
    reason        text,
    -- [{step, outcome, commands, detail, at}] in order
    steps         jsonb NOT NULL DEFAULT '[]',
    finished_at   timestamptz
);
CREATE INDEX automation_runs_newest ON automation_runs (automation_id, started_at DESC, run_id DESC);
