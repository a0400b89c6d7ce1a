-- Attempt budgets in fixed windows (issue 9): failed sign-ins per e-mail and
-- per client address, sign-ups per client address. One row per key, counted
-- with a single upsert, so concurrent attempts are counted atomically (the
-- row lock serializes them) — the check and the count are one statement.
-- Replaces identity_sign_in_failures, whose read-then-write let 100 parallel
-- guesses all pass.
CREATE TABLE identity_rate_limits (
    key          text        PRIMARY KEY,
    window_start timestamptz NOT NULL,
    count        int         NOT NULL
);
DROP TABLE identity_sign_in_failures;
