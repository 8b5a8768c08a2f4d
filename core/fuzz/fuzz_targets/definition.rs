//! definition::parse on any JSON document the bytes spell. Whatever the document, parse must
//! return (a definition or a list of issues), never panic; a refusal always names a problem.
//! And depth::json_depth, which counts nesting on the text, agrees with the parsed document.
#![no_main]

use dispatched_core::{definition, depth};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fn value_depth(v: &Value) -> usize {
    match v {
        Value::Array(a) => 1 + a.iter().map(value_depth).max().unwrap_or(0),
        Value::Object(m) => 1 + m.values().map(value_depth).max().unwrap_or(0),
        _ => 0,
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(doc) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    // On canonical text (what PostgreSQL's jsonb::text gives) the count is exact; on any
    // text it is an upper bound (a duplicate key's earlier value is counted, then dropped).
    assert_eq!(depth::json_depth(&doc.to_string()), value_depth(&doc));
    if let Ok(text) = std::str::from_utf8(data) {
        assert!(depth::json_depth(text) >= value_depth(&doc), "{text:?}");
    }
    match definition::parse(&doc) {
        Ok(def) => {
            assert!(!def.steps.is_empty());
            assert!(def.steps.len() <= definition::MAX_STEPS);
        }
        Err(invalid) => {
            assert!(!invalid.0.is_empty());
            let _ = invalid.to_string();
        }
    }
});
