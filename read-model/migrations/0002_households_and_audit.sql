-- Households, members and the audit log (issue 3). Derived from the log like
-- every table of the projector.

-- The household aggregate's version: the number of household-stream events
-- applied. The command API decides against it and the next event must carry
-- version + 1, so an event decided on stale state is refused by the fold.
ALTER TABLE households ADD COLUMN version bigint NOT NULL DEFAULT 0;
-- The partition of the households topic that holds this household's stream.
ALTER TABLE households ADD COLUMN log_partition int;

CREATE TABLE household_members (
    household_id uuid NOT NULL,
    user_id      uuid NOT NULL,
    role         text NOT NULL,
    joined_at    timestamptz NOT NULL,
    PRIMARY KEY (household_id, user_id)
);
CREATE INDEX household_members_user ON household_members (user_id);

CREATE TABLE household_invitations (
    invitation_id uuid PRIMARY KEY,
    household_id  uuid NOT NULL,
    role          text NOT NULL,
    code_hash     text NOT NULL UNIQUE,
    expires_at    timestamptz NOT NULL,
    created_by    text,
    created_at    timestamptz NOT NULL,
    used_by       uuid,
    used_at       timestamptz
);
CREATE INDEX household_invitations_household ON household_invitations (household_id);

-- Household-stream events the fold refused (decided on a stale version, or
-- breaking an invariant), kept for operators and the audit log.
CREATE TABLE household_refused_events (
    event_id     uuid PRIMARY KEY,
    household_id uuid NOT NULL,
    event_type   text NOT NULL,
    reason       text NOT NULL,
    occurred_at  timestamptz NOT NULL
);

-- Every command, accepted or refused: who, in which role, from which client,
-- what, on what, with which outcome, when.
CREATE TABLE audit_log (
    event_id     uuid PRIMARY KEY,
    household_id uuid NOT NULL,
    at           timestamptz NOT NULL,
    actor_kind   text NOT NULL,
    actor_id     text NOT NULL,
    role         text,
    client       text,
    action       text NOT NULL,
    target       text,
    outcome      text NOT NULL,
    status       int NOT NULL,
    detail       text
);
CREATE INDEX audit_log_household_at ON audit_log (household_id, at DESC, event_id DESC);
