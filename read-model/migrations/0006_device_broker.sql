-- The MQTT broker a device was assigned at registration (an index into the
-- deployment's broker list): the bridge publishes its commands there.
ALTER TABLE devices ADD COLUMN IF NOT EXISTS broker smallint NOT NULL DEFAULT 0;
