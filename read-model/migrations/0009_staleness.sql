-- Staleness (issue 11): each device's expected report interval (set at
-- registration, default 30 s), and which sighting the stale sweep last
-- announced as stale (so each transition is announced once).
ALTER TABLE devices ADD COLUMN IF NOT EXISTS report_interval_secs integer NOT NULL DEFAULT 30;
ALTER TABLE device_shadows ADD COLUMN IF NOT EXISTS stale_announced timestamptz;
-- The sweep reads online devices not seen for a while: few, by this index.
CREATE INDEX IF NOT EXISTS device_shadows_online_last_seen ON device_shadows (last_seen) WHERE online;
