//! Idempotency keys, names and run ids.

/// RFC 3986 "unreserved": `A-Z a-z 0-9 - . _ ~`.
pub fn is_unreserved(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_' | '~')
}

/// Checks an idempotency key: 1 to 255 unreserved characters. The error names the problem.
pub fn check_key(key: &str) -> Result<(), String> {
    if key.is_empty() {
        return Err("idempotency key must not be empty".into());
    }
    if key.chars().count() > 255 {
        return Err(format!(
            "idempotency key is {} characters long; at most 255 are allowed",
            key.chars().count()
        ));
    }
    if let Some(c) = key.chars().find(|c| !is_unreserved(*c)) {
        return Err(format!(
            "idempotency key contains {c:?}; only A-Z a-z 0-9 - . _ ~ are allowed"
        ));
    }
    Ok(())
}

/// Names of workflows, steps, signals and secrets: 1 to 128 of `A-Z a-z 0-9 - _`, plus `.`
/// and `:` where `dotted` (workflow names like `billing.checkout`, provider keys).
pub fn check_name(what: &str, name: &str, dotted: bool) -> Result<(), String> {
    if name.is_empty() {
        return Err(format!("{what} must not be empty"));
    }
    if name.chars().count() > 128 {
        return Err(format!("{what} is longer than 128 characters"));
    }
    let ok = |c: char| {
        c.is_ascii_alphanumeric() || c == '-' || c == '_' || (dotted && (c == '.' || c == ':'))
    };
    if let Some(c) = name.chars().find(|c| !ok(*c)) {
        let allowed = if dotted {
            "A-Z a-z 0-9 - _ . :"
        } else {
            "A-Z a-z 0-9 - _"
        };
        return Err(format!(
            "{what} \"{name}\" contains {c:?}; only {allowed} are allowed"
        ));
    }
    Ok(())
}

const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/// A run id from 16 random bytes: `run_` + 22 URL-safe characters (128 bits).
pub fn run_id_from_bytes(bytes: [u8; 16]) -> String {
    let mut n = u128::from_be_bytes(bytes);
    let mut out = String::with_capacity(26);
    out.push_str("run_");
    for _ in 0..22 {
        out.push(ALPHABET[(n & 63) as usize] as char);
        n >>= 6;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys() {
        assert!(check_key("order-42").is_ok());
        assert!(check_key("A.b_c~9").is_ok());
        assert!(check_key(&"k".repeat(255)).is_ok());
        assert!(check_key("").unwrap_err().contains("empty"));
        assert!(check_key(&"k".repeat(256))
            .unwrap_err()
            .contains("256 characters"));
        assert!(check_key("a b").unwrap_err().contains("' '"));
        assert!(check_key("a/b").unwrap_err().contains("'/'"));
        assert!(check_key("é").unwrap_err().contains("'é'"));
        // Length counts characters, not bytes: 128 'é' are 256 bytes but only 128 characters.
        assert!(check_key(&"é".repeat(128)).unwrap_err().contains("'é'"));
    }

    #[test]
    fn names() {
        assert!(check_name("step id", "charge-payment", false).is_ok());
        assert!(check_name("step id", "a.b", false)
            .unwrap_err()
            .contains("'.'"));
        assert!(check_name("workflow name", "billing.checkout", true).is_ok());
        assert!(check_name("workflow name", "", true)
            .unwrap_err()
            .contains("empty"));
        assert!(check_name("workflow name", &"é".repeat(65), true)
            .unwrap_err()
            .contains("'é'"));
    }

    #[test]
    fn run_ids() {
        let a = run_id_from_bytes([0; 16]);
        let b = run_id_from_bytes([255; 16]);
        assert_eq!(a, format!("run_{}", "A".repeat(22)));
        assert_eq!(b.len(), 26);
        assert!(b[4..].chars().all(is_unreserved));
        assert_ne!(run_id_from_bytes([1; 16]), run_id_from_bytes([2; 16]));
    }
}
