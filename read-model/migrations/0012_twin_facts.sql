-- The facts of each device's commands the twin's desired side is derived
-- from (issue 15: order-independent), see events/src/twin.rs.
ALTER TABLE device_shadows ADD COLUMN twin jsonb NOT NULL DEFAULT '{}';
