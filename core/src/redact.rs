//! Redaction: what the extension shows (events, run documents, errors, logs) never contains
//! a credential header or a secret value.

use serde_json::{Map, Value};

pub const REDACTED: &str = "[redacted]";
/// Headers whose values are always hidden.
pub const SENSITIVE_HEADERS: [&str; 4] = ["authorization", "x-api-key", "cookie", "set-cookie"];

/// Replaces every occurrence of every secret value in a string.
pub fn redact_str(s: &str, secrets: &[String]) -> String {
    let mut out = s.to_string();
    for secret in secrets {
        if !secret.is_empty() && out.contains(secret.as_str()) {
            out = out.replace(secret.as_str(), REDACTED);
        }
    }
    out
}

/// Redacts secret values in every string (and object key) of a JSON value.
pub fn redact_json(v: &Value, secrets: &[String]) -> Value {
    if secrets.is_empty() {
        return v.clone();
    }
    match v {
        Value::String(s) => Value::String(redact_str(s, secrets)),
        Value::Array(a) => Value::Array(a.iter().map(|x| redact_json(x, secrets)).collect()),
        Value::Object(m) => Value::Object(
            m.iter()
                .map(|(k, x)| (redact_str(k, secrets), redact_json(x, secrets)))
                .collect(),
        ),
        other => other.clone(),
    }
}

/// Headers as a JSON object with lower-case names (repeated headers joined with ", "),
/// sensitive headers and secret values redacted.
pub fn headers_json(headers: &[(String, String)], secrets: &[String]) -> Value {
    let mut m: Map<String, Value> = Map::new();
    for (name, value) in headers {
        let lname = name.to_ascii_lowercase();
        let shown = if SENSITIVE_HEADERS.contains(&lname.as_str()) {
            REDACTED.to_string()
        } else {
            redact_str(value, secrets)
        };
        match m.get_mut(&lname) {
            Some(Value::String(prev)) if !SENSITIVE_HEADERS.contains(&lname.as_str()) => {
                prev.push_str(", ");
                prev.push_str(&shown);
            }
            Some(_) => {}
            None => {
                m.insert(lname, Value::String(shown));
            }
        }
    }
    Value::Object(m)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn sensitive_headers_and_secrets() {
        let secrets = vec!["sk_live_123".to_string()];
        let h = vec![
            (
                "Authorization".to_string(),
                "Bearer sk_live_123".to_string(),
            ),
            ("X-Api-Key".to_string(), "k".to_string()),
            ("Cookie".to_string(), "a=1".to_string()),
            ("Set-Cookie".to_string(), "b=2".to_string()),
            ("X-Echo".to_string(), "token sk_live_123 here".to_string()),
            ("X-Multi".to_string(), "1".to_string()),
            ("x-multi".to_string(), "2".to_string()),
        ];
        assert_eq!(
            headers_json(&h, &secrets),
            json!({"authorization": "[redacted]", "x-api-key": "[redacted]", "cookie": "[redacted]",
                   "set-cookie": "[redacted]", "x-echo": "token [redacted] here", "x-multi": "1, 2"})
        );
    }

    #[test]
    fn json_everywhere() {
        let secrets = vec!["s3cr3t".to_string()];
        let v = json!({"a": ["x s3cr3t y", 1, {"s3cr3t": "s3cr3t"}], "b": null});
        assert_eq!(
            redact_json(&v, &secrets),
            json!({"a": ["x [redacted] y", 1, {"[redacted]": "[redacted]"}], "b": null})
        );
        assert_eq!(redact_json(&v, &[]), v);
    }
}
