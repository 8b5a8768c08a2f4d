//! Durations as users write them: `500ms`, `30s`, `10m`, `2h`, `1d`, compounds such as
//! `1h30m`, and the interval-style words settings use (`14 days`, `2 hours`).

use std::fmt;

/// The longest duration accepted anywhere (a year), so that arithmetic never overflows.
pub const MAX_MS: u64 = 366 * 24 * 3600 * 1000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DurationError(pub String);

impl fmt::Display for DurationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn unit_ms(unit: &str) -> Option<u64> {
    Some(match unit {
        "ms" | "msec" | "msecs" | "millisecond" | "milliseconds" => 1,
        "s" | "sec" | "secs" | "second" | "seconds" => 1000,
        "m" | "min" | "mins" | "minute" | "minutes" => 60_000,
        "h" | "hr" | "hrs" | "hour" | "hours" => 3_600_000,
        "d" | "day" | "days" => 86_400_000,
        _ => return None,
    })
}

/// Parses a duration into milliseconds.
///
/// A duration is one or more `<integer><unit>` parts, optionally separated by spaces:
/// `500ms`, `30s`, `1h30m`, `14 days`, `1 day 2 hours`. Units: ms, s, m (minutes), h, d and
/// their spelled-out forms. The total must not exceed [`MAX_MS`].
pub fn parse_ms(text: &str) -> Result<u64, DurationError> {
    let bad = |why: &str| {
        DurationError(format!(
            "invalid duration \"{text}\": {why} (expected e.g. 500ms, 30s, 10m, 2h, 1d)"
        ))
    };
    let s = text.trim();
    if s.is_empty() {
        return Err(bad("empty"));
    }
    let bytes = s.as_bytes();
    let mut i = 0;
    let mut total: u64 = 0;
    while i < bytes.len() {
        while i < bytes.len() && bytes[i] == b' ' {
            i += 1;
        }
        if i >= bytes.len() {
            break;
        }
        let start = i;
        while i < bytes.len() && bytes[i].is_ascii_digit() {
            i += 1;
        }
        if start == i {
            return Err(bad("a number must come before each unit"));
        }
        let number: u64 = s[start..i].parse().map_err(|_| bad("number too large"))?;
        if bytes.get(i) == Some(&b'.') {
            return Err(bad("no fractions; use a smaller unit (1500ms, not 1.5s)"));
        }
        while i < bytes.len() && bytes[i] == b' ' {
            i += 1;
        }
        let ustart = i;
        while i < bytes.len() && bytes[i].is_ascii_alphabetic() {
            i += 1;
        }
        if ustart == i {
            return Err(bad("missing unit"));
        }
        let unit = s[ustart..i].to_ascii_lowercase();
        let per = unit_ms(&unit).ok_or_else(|| bad(&format!("unknown unit \"{unit}\"")))?;
        let part = number.checked_mul(per).ok_or_else(|| bad("too large"))?;
        total = total.checked_add(part).ok_or_else(|| bad("too large"))?;
        if total > MAX_MS {
            return Err(bad("longer than 366 days"));
        }
    }
    Ok(total)
}

/// Formats milliseconds back into the shortest exact form (`90000` → `90s`, `5400000` → `90m`).
pub fn format_ms(ms: u64) -> String {
    for (unit, per) in [
        ("d", 86_400_000u64),
        ("h", 3_600_000),
        ("m", 60_000),
        ("s", 1000),
    ] {
        if ms > 0 && ms.is_multiple_of(per) {
            return format!("{}{unit}", ms / per);
        }
    }
    format!("{ms}ms")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simple_units() {
        assert_eq!(parse_ms("500ms"), Ok(500));
        assert_eq!(parse_ms("30s"), Ok(30_000));
        assert_eq!(parse_ms("10m"), Ok(600_000));
        assert_eq!(parse_ms("2h"), Ok(7_200_000));
        assert_eq!(parse_ms("1d"), Ok(86_400_000));
        assert_eq!(parse_ms("0s"), Ok(0));
    }

    #[test]
    fn compounds_and_words() {
        assert_eq!(parse_ms("1h30m"), Ok(5_400_000));
        assert_eq!(parse_ms("14 days"), Ok(14 * 86_400_000));
        assert_eq!(parse_ms("1 day 2 hours"), Ok(26 * 3_600_000));
        assert_eq!(parse_ms(" 24h "), Ok(86_400_000));
        assert_eq!(parse_ms("3D"), Ok(3 * 86_400_000));
    }

    #[test]
    fn rejects_bad_text() {
        for bad in [
            "",
            "  ",
            "30",
            "s",
            "10 parsecs",
            "1.5s",
            "-1s",
            "1h 30",
            "ten seconds",
        ] {
            let err = parse_ms(bad).unwrap_err();
            assert!(err.0.contains("invalid duration"), "{bad}: {err}");
        }
        assert!(parse_ms("367d").unwrap_err().0.contains("366 days"));
        assert_eq!(
            parse_ms("1.5s").unwrap_err().0,
            "invalid duration \"1.5s\": no fractions; use a smaller unit (1500ms, not 1.5s) (expected e.g. 500ms, 30s, 10m, 2h, 1d)"
        );
        assert!(parse_ms("99999999999999999999999s")
            .unwrap_err()
            .0
            .contains("too large"));
    }

    #[test]
    fn formats_shortest() {
        assert_eq!(format_ms(500), "500ms");
        assert_eq!(format_ms(90_000), "90s");
        assert_eq!(format_ms(5_400_000), "90m");
        assert_eq!(format_ms(86_400_000), "1d");
        assert_eq!(format_ms(0), "0ms");
    }
}
