-- Shadows that converge for any arrival order (issue 10): each reported
-- property and the battery remember the `seq` of the report that set them,
-- and `status_offset` is the position of the latest presence evidence (a
-- status message or a report), no longer only of status messages.
ALTER TABLE device_shadows
    ADD COLUMN property_seq jsonb NOT NULL DEFAULT '{}',
    ADD COLUMN battery_seq bigint NOT NULL DEFAULT 0;

-- Shadows from before: every property and the battery were set by the last report.
UPDATE device_shadows
   SET property_seq = COALESCE((SELECT jsonb_object_agg(k, seq) FROM jsonb_object_keys(reported) AS k), '{}'),
       battery_seq = CASE WHEN battery IS NULL THEN 0 ELSE seq END;

COMMENT ON COLUMN device_shadows.status_offset IS 'telemetry offset of the latest presence evidence: a status message or a report';
COMMENT ON COLUMN device_shadows.property_seq IS 'per reported property, the seq of the report that set it';
