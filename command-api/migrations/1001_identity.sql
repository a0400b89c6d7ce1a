-- command-api's own tables: identity (users, refresh tokens, signing keys) and
-- idempotency records. These are NOT derived from the Kafka log: secrets do
-- not belong in a log that analysts replay. Back them up with the database.
-- Versions 1000+ keep them apart from the projector's migrations.

CREATE TABLE identity_users (
    user_id       uuid PRIMARY KEY,
    email         text NOT NULL UNIQUE,
    display_name  text NOT NULL,
    password_hash text NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now()
);

-- Opaque refresh tokens, stored as SHA-256 hashes. Every use spends the token
-- and issues the next one of the same family; presenting a spent token again
-- revokes the whole family.
CREATE TABLE identity_refresh_tokens (
    token_hash text PRIMARY KEY,
    family_id  uuid NOT NULL,
    user_id    uuid NOT NULL,
    issued_at  timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL,
    used_at    timestamptz,
    revoked_at timestamptz
);
CREATE INDEX identity_refresh_tokens_family ON identity_refresh_tokens (family_id);

-- Token signing keys (Ed25519). DEVELOPMENT ONLY: the private key is stored
-- here in PEM; production keeps it in a KMS and stores a reference.
-- A key is published in the JWKS from `created_at`, signs from `activates_at`
-- and keeps verifying until `retires_at` + the access-token lifetime.
CREATE TABLE identity_signing_keys (
    kid          text PRIMARY KEY,
    algorithm    text NOT NULL,
    private_pem  text NOT NULL,
    public_x     text NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    activates_at timestamptz NOT NULL,
    retires_at   timestamptz
);

-- Idempotency-Key records: per caller and key, the request's hash and the
-- response it got (status NULL while the first request is in progress).
CREATE TABLE idempotency_keys (
    scope        text NOT NULL,
    key          text NOT NULL,
    request_hash text NOT NULL,
    status       int,
    content_type text,
    body         bytea,
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (scope, key)
);
CREATE INDEX idempotency_keys_created ON idempotency_keys (created_at);
