//! The directive parser: response headers built from the bytes, one per line; the first byte
//! of a line picks the header name (one of the five directives, or the line's own name).
//! Never a panic; every directive header yields exactly one directive or one invalid entry.
#![no_main]

use dispatched_core::directives;
use libfuzzer_sys::fuzz_target;

const NAMES: [&str; 5] = [
    "Dispatched-Spawn",
    "Dispatched-Signal",
    "Dispatched-Cancel",
    "Dispatched-Delay",
    "Dispatched-Log",
];

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut headers = Vec::new();
    for line in text.split('\n') {
        let mut chars = line.chars();
        let Some(first) = chars.next() else { continue };
        let rest: String = chars.collect();
        let pick = first as usize % 6;
        if pick < NAMES.len() {
            headers.push((NAMES[pick].to_string(), rest));
        } else {
            let (n, v) = rest.split_once(':').unwrap_or((rest.as_str(), ""));
            headers.push((n.to_string(), v.to_string()));
        }
    }
    let (ok, bad) = directives::parse_all(&headers);
    let expected = headers
        .iter()
        .filter(|(n, _)| NAMES.iter().any(|d| d.eq_ignore_ascii_case(n)))
        .count();
    assert_eq!(ok.len() + bad.len(), expected);
    for d in &ok {
        if let directives::Directive::Log { message } = d {
            assert!(!message.is_empty());
            assert!(message.chars().count() <= directives::MAX_LOG_CHARS);
        }
    }
});
