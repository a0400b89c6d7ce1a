//! The text rules of the API, stated once: each is a function the handlers
//! call and the pattern the OpenAPI document publishes, and a test holds the
//! two to the same answers — so the document says exactly what the server
//! does (issue 9: a request valid by the document is never refused).
//!
//! Whitespace is Unicode `White_Space` (what Rust's `char::is_whitespace`
//! means); control characters are Unicode `Cc` (`char::is_control`). The
//! patterns spell both out as character ranges rather than `\s`, whose
//! meaning differs between regex dialects.

use crate::problem::ApiError;

/// Control characters (`Cc`).
macro_rules! cc {
    () => {
        "\\u0000-\\u001f\\u007f-\\u009f"
    };
}
/// `White_Space` characters that are not control characters.
macro_rules! ws {
    () => {
        " \\u00a0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000"
    };
}

/// A name (household, device, room, display name): 1 to 80 characters, no
/// control characters, no whitespace at either end.
pub const NAME_PATTERN: &str = concat!("^[^", cc!(), ws!(), "](?:[^", cc!(), "]*[^", cc!(), ws!(), "])?$");
pub const NAME_MAX: usize = 80;

/// An e-mail address as sign-up takes it: one `@`, something before it, a
/// domain that does not start with a dot and has one, no whitespace or
/// control characters; at most 254 characters.
pub const EMAIL_PATTERN: &str =
    concat!("^[^@", cc!(), ws!(), "]+@[^@.", cc!(), ws!(), "][^@", cc!(), ws!(), "]*\\.[^@", cc!(), ws!(), "]*$");
pub const EMAIL_MAX: usize = 254;

/// An `Idempotency-Key`: 1 to 255 visible ASCII characters.
pub const KEY_PATTERN: &str = "^[!-~]{1,255}$";

/// A certificate signing request in PEM armour (what the document can
/// state; whether its DER is a valid, self-signed PKCS#10 request is checked
/// after, and a request that is not answers 422).
pub const CSR_PATTERN: &str =
    "^-----BEGIN CERTIFICATE REQUEST-----\\r?\\n[A-Za-z0-9+/=\\r\\n]+-----END CERTIFICATE REQUEST-----(?:\\r?\\n)?$";
pub const CSR_MAX: usize = 8 * 1024;

/// A CSR's armour, checked against [`CSR_PATTERN`] and [`CSR_MAX`].
pub fn csr_armour(raw: &str) -> Result<(), ApiError> {
    let Some(body) = raw.strip_prefix("-----BEGIN CERTIFICATE REQUEST-----") else {
        return Err(bad_csr());
    };
    let body = body.strip_prefix("\r\n").or_else(|| body.strip_prefix('\n')).ok_or_else(bad_csr)?;
    let end = "-----END CERTIFICATE REQUEST-----";
    let body = body.strip_suffix("\r\n").or_else(|| body.strip_suffix('\n')).unwrap_or(body);
    let inner = body.strip_suffix(end).ok_or_else(bad_csr)?;
    if raw.chars().count() > CSR_MAX || inner.is_empty() || !inner.bytes().all(|b| b.is_ascii_alphanumeric() || b"+/=\r\n".contains(&b)) {
        return Err(bad_csr());
    }
    Ok(())
}

fn bad_csr() -> ApiError {
    ApiError::BadRequest(format!("csr must be a PEM certificate request of at most {CSR_MAX} characters"))
}

/// A manufacturer serial: 1 to 64 of `A-Z a-z 0-9 . _ : -` (compared upper-cased).
pub const SERIAL_PATTERN: &str = "^[A-Za-z0-9._:-]{1,64}$";

fn white(c: char) -> bool {
    c.is_whitespace() || c.is_control()
}

/// A name, checked against [`NAME_PATTERN`] and [`NAME_MAX`].
pub fn name(raw: &str, what: &str) -> Result<String, ApiError> {
    let n = raw.chars().count();
    let ends_ok = raw.chars().next().is_some_and(|c| !white(c)) && raw.chars().last().is_some_and(|c| !white(c));
    if n == 0 || n > NAME_MAX || !ends_ok || raw.chars().any(char::is_control) {
        return Err(ApiError::BadRequest(format!(
            "{what} must be 1 to {NAME_MAX} characters without control characters or whitespace at either end"
        )));
    }
    Ok(raw.to_owned())
}

/// An e-mail address for sign-up, checked against [`EMAIL_PATTERN`];
/// returned lower-cased (addresses compare case-insensitively).
pub fn email(raw: &str) -> Result<String, ApiError> {
    let ok = raw.chars().count() <= EMAIL_MAX
        && !raw.chars().any(white)
        && raw
            .split_once('@')
            .is_some_and(|(local, domain)| !local.is_empty() && !domain.contains('@') && !domain.starts_with('.') && domain.contains('.'));
    if !ok {
        return Err(ApiError::BadRequest("email must be an e-mail address (see the OpenAPI document for the rule)".into()));
    }
    Ok(raw.to_lowercase())
}

/// An `Idempotency-Key` value, checked against [`KEY_PATTERN`].
pub fn idempotency_key(k: &str) -> bool {
    (1..=255).contains(&k.len()) && k.bytes().all(|b| b.is_ascii_graphic())
}

/// A serial, checked against [`SERIAL_PATTERN`]; returned upper-cased.
pub fn serial(raw: &str) -> Result<String, ApiError> {
    if raw.is_empty() || raw.len() > 64 || !raw.bytes().all(|b| b.is_ascii_alphanumeric() || b".-_:".contains(&b)) {
        return Err(ApiError::BadRequest("serial must be 1 to 64 characters of A-Z, a-z, 0-9, '.', '-', '_', ':'".into()));
    }
    Ok(raw.to_uppercase())
}

/// A whole number as JSON Schema counts one (`90` or `90.0`) into a `u32`,
/// for optional fields: the document says `integer`, so `90.0` is valid.
pub fn opt_whole<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    use serde::de::Error;
    use serde::Deserialize;
    let n: Option<serde_json::Number> = Option::deserialize(d)?;
    n.map(|n| whole(&n).ok_or_else(|| D::Error::custom(format!("expected a whole number from 0 to {}, got {n}", u32::MAX)))).transpose()
}

/// Like [`opt_whole`], for a version (0 to 2^63 - 1).
pub fn opt_whole_u64<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    use serde::de::Error;
    use serde::Deserialize;
    let n: Option<serde_json::Number> = Option::deserialize(d)?;
    n.map(|n| {
        n.as_u64()
            .or_else(|| n.as_f64().filter(|f| f.fract() == 0.0 && *f >= 0.0 && *f < 9.2e18).map(|f| f as u64))
            .filter(|u| *u <= i64::MAX as u64)
            .ok_or_else(|| D::Error::custom(format!("expected a whole number from 0 to {}, got {n}", i64::MAX)))
    })
    .transpose()
}

fn whole(n: &serde_json::Number) -> Option<u32> {
    match n.as_u64() {
        Some(u) => u32::try_from(u).ok(),
        None => n.as_f64().filter(|f| f.fract() == 0.0 && *f >= 0.0 && *f <= f64::from(u32::MAX)).map(|f| f as u32),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn matches(pattern: &str, s: &str) -> bool {
        // The document's patterns are ECMA-262; these use only what the
        // `regex` crate reads the same way (classes, ranges, \uXXXX).
        regex::Regex::new(pattern).expect("pattern compiles").is_match(s)
    }

    const EDGES: &[&str] = &[
        "",
        " ",
        "a",
        " a",
        "a ",
        "a b",
        "\u{a0}a",
        "a\u{3000}",
        "\u{feff}a",
        "a\u{85}",
        "\t",
        "x\ny",
        "ok\u{7f}",
        "Ω",
        "\u{1F3E0} home",
        "a@b.c",
        "A@B.C",
        "a@.b",
        "a@b",
        "@b.c",
        "a@b@c.d",
        "a b@c.d",
        "a@b.",
        "a@b.c ",
        "\u{2028}@b.c",
        "é@ü.de",
        "SN-1",
        "sn.1:2_x",
        "SN 1",
        "ÄB",
    ];

    #[test]
    fn the_published_patterns_and_the_checks_agree_on_the_edges() {
        for s in EDGES {
            let long_ok = s.chars().count() <= NAME_MAX;
            assert_eq!(matches(NAME_PATTERN, s) && long_ok, name(s, "x").is_ok(), "name {s:?}");
            assert_eq!(matches(EMAIL_PATTERN, s) && s.chars().count() <= EMAIL_MAX, email(s).is_ok(), "email {s:?}");
            assert_eq!(matches(SERIAL_PATTERN, s), serial(s).is_ok(), "serial {s:?}");
            assert_eq!(matches(KEY_PATTERN, s), idempotency_key(s), "key {s:?}");
        }
        let csr = |body: &str| format!("-----BEGIN CERTIFICATE REQUEST-----{body}-----END CERTIFICATE REQUEST-----");
        for s in [
            csr("\nAAAA\n"),
            csr("\r\nAB+/=\r\n") + "\r\n",
            csr("\nAAAA\n") + "\n",
            csr("AAAA\n"),
            csr("\n\n"),
            csr("\n"),
            csr("\nA A\n"),
            csr("\nAAAA\n") + " ",
            "x".into(),
        ] {
            assert_eq!(matches(CSR_PATTERN, &s), csr_armour(&s).is_ok(), "csr {s:?}");
        }
    }

    proptest! {
        #[test]
        fn the_published_patterns_and_the_checks_agree(s in "\\PC{0,6}|[ -~]{0,12}|.{0,4}", t in any::<String>()) {
            for x in [&s, &t] {
                prop_assert_eq!(matches(NAME_PATTERN, x) && x.chars().count() <= NAME_MAX, name(x, "x").is_ok(), "name {:?}", x);
                prop_assert_eq!(matches(EMAIL_PATTERN, x) && x.chars().count() <= EMAIL_MAX, email(x).is_ok(), "email {:?}", x);
                prop_assert_eq!(matches(SERIAL_PATTERN, x), serial(x).is_ok(), "serial {:?}", x);
                prop_assert_eq!(matches(KEY_PATTERN, x), idempotency_key(x), "key {:?}", x);
            }
        }
    }
}
