-- The engine's breaker pauses an automation that fires too often (issue 17):
-- the owner sees when and why on the automation until it is saved again.
ALTER TABLE automations ADD COLUMN paused_at timestamptz, ADD COLUMN paused_reason text;
