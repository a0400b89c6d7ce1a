//! End-to-end tests against the real components live in `tests/`.
