//! definition::parse on any JSON document the bytes spell. Whatever the document, parse must
//! return (a definition or a list of issues), never panic; a refusal always names a problem.
#![no_main]

use dispatched_core::definition;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(doc) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
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
