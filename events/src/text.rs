//! Text that every store can hold. PostgreSQL's `text` and `jsonb` refuse the
//! NUL character (`\u0000`), so a string carrying one must be refused at the
//! edge where it enters (HTTP body, MQTT payload, GraphQL request) with a
//! clear error, never discovered by the projector.

use serde_json::Value;

/// True if `s` holds a character no read model can store.
pub fn has_nul(s: &str) -> bool {
    s.contains('\0')
}

/// True if any string in `v` — object keys included — holds a NUL.
pub fn value_has_nul(v: &Value) -> bool {
    match v {
        Value::String(s) => has_nul(s),
        Value::Array(a) => a.iter().any(value_has_nul),
        Value::Object(m) => m.iter().any(|(k, v)| has_nul(k) || value_has_nul(v)),
        Value::Null | Value::Bool(_) | Value::Number(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn finds_a_nul_anywhere() {
        assert!(!value_has_nul(&json!({"a": ["b", 1, null, {"c": "d"}]})));
        assert!(value_has_nul(&json!({"a": ["b", {"c": "d\u{0}"}]})));
        assert!(value_has_nul(&json!({"a\u{0}": 1})));
        assert!(value_has_nul(&serde_json::from_str::<Value>(r#"["x\u0000y"]"#).unwrap()));
        assert!(!value_has_nul(&serde_json::from_str::<Value>(r#"["x\\u0000y"]"#).unwrap()));
    }
}
