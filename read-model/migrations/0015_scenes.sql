-- Scenes (issue 17): a household's named target states, folded from the
-- household stream; their activations, from the commands topic; and each
-- device command's cause (the activation that sent it).
CREATE TABLE scenes (
    scene_id      uuid PRIMARY KEY,
    household_id  uuid NOT NULL,
    name          text NOT NULL,
    -- [{deviceId, set}], in the scene's order
    devices       jsonb NOT NULL,
    child_allowed boolean NOT NULL DEFAULT false,
    created_at    timestamptz NOT NULL,
    updated_at    timestamptz NOT NULL
);
CREATE INDEX scenes_household ON scenes (household_id);

CREATE TABLE scene_activations (
    activation_id uuid PRIMARY KEY,
    household_id  uuid NOT NULL,
    scene_id      uuid NOT NULL,
    actor         jsonb NOT NULL,
    at            timestamptz NOT NULL,
    -- [{deviceId, commandId}] and [{deviceId, reason}]
    commands      jsonb NOT NULL,
    skipped       jsonb NOT NULL DEFAULT '[]'
);
CREATE INDEX scene_activations_scene ON scene_activations (scene_id, at DESC);

ALTER TABLE device_commands ADD COLUMN caused_by uuid;
CREATE INDEX device_commands_caused_by ON device_commands (caused_by) WHERE caused_by IS NOT NULL;
