//! How deeply JSON nests, measured on its text without recursion, so that a document nested
//! thousands of levels deep is refused with a clear error before anything parses it
//! recursively (serde_json stops at 128 levels; the stack would not take much more).

/// The deepest nesting accepted in a definition, a run's input, signal data and an
/// activity-log outcome. Anything deeper is refused with SQLSTATE 22023.
pub const MAX_JSON_DEPTH: usize = 100;

/// The deepest nesting of arrays and objects in a JSON text (0 for a scalar). Brackets inside
/// strings do not count. The text need not be valid JSON: this only counts.
pub fn json_depth(text: &str) -> usize {
    let (mut depth, mut max) = (0usize, 0usize);
    let (mut in_string, mut escaped) = (false, false);
    for b in text.bytes() {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                max = max.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    max
}

/// `Err` naming `what` when `text` nests deeper than [`MAX_JSON_DEPTH`].
pub fn check_json_depth(what: &str, text: &str) -> Result<(), String> {
    let d = json_depth(text);
    if d > MAX_JSON_DEPTH {
        Err(format!(
            "{what}: nested {d} levels deep; at most {MAX_JSON_DEPTH} levels are allowed"
        ))
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_arrays_and_objects_not_strings() {
        assert_eq!(json_depth("1"), 0);
        assert_eq!(json_depth("\"[[[\""), 0);
        assert_eq!(json_depth("[]"), 1);
        assert_eq!(json_depth(r#"{"a": [1, {"b": "}}]]\"[["}]}"#), 3);
        assert_eq!(json_depth(r#"[["\\"], [[]]]"#), 3);
    }

    #[test]
    fn ten_thousand_levels_are_counted_not_recursed() {
        let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        assert_eq!(json_depth(&deep), 10_000);
        let e = check_json_depth("definition", &deep).unwrap_err();
        assert_eq!(
            e,
            "definition: nested 10000 levels deep; at most 100 levels are allowed"
        );
        let ok = format!("{}{}", "{\"a\":".repeat(100), "}".repeat(100));
        assert!(check_json_depth("input", &ok).is_ok());
        let bad = format!("{}1{}", "{\"a\":".repeat(101), "}".repeat(101));
        assert!(check_json_depth("input", &bad).is_err());
    }
}
