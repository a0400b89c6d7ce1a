-- Failed sign-ins per e-mail (known or not), for throttling password guessing.
CREATE TABLE identity_sign_in_failures (
    email text NOT NULL,
    at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX identity_sign_in_failures_email_at ON identity_sign_in_failures (email, at);
