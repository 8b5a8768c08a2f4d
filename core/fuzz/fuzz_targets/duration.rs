//! The duration parser: never a panic, never more than MAX_MS, and what it accepts formats
//! back to a text that parses to the same value.
#![no_main]

use dispatched_core::duration;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(ms) = duration::parse_ms(s) {
        assert!(ms <= duration::MAX_MS);
        let text = duration::format_ms(ms);
        assert_eq!(duration::parse_ms(&text), Ok(ms), "{s:?} -> {ms} -> {text:?}");
    }
});
