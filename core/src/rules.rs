//! What a status code means. The one place for the status rules of the contract.

/// What `idempotency_complete` does with an outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheDecision {
    /// A final outcome (2xx, non-retryable 4xx): cached and replayed for the retention period.
    Cache,
    /// A retryable outcome (408, 429, 5xx), a malformed-request or auth failure (400, 401,
    /// 403), or anything not final: the key is released and the next caller re-executes.
    Release,
}

/// Layer 1: which outcomes are final and replayed (OpenWOP rules 5 and 6).
pub fn cache_decision(status: u16) -> CacheDecision {
    match status {
        200..=299 => CacheDecision::Cache,
        400 | 401 | 403 | 408 | 429 => CacheDecision::Release,
        402..=499 => CacheDecision::Cache,
        _ => CacheDecision::Release,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer1_caches_final_outcomes_only() {
        for s in [200, 201, 204, 299, 402, 404, 409, 410, 422, 451, 499] {
            assert_eq!(cache_decision(s), CacheDecision::Cache, "{s}");
        }
        for s in [
            100, 301, 304, 400, 401, 403, 408, 429, 500, 502, 503, 504, 599,
        ] {
            assert_eq!(cache_decision(s), CacheDecision::Release, "{s}");
        }
    }
}

// ---------------------------------------------------------------------------------------
// Step outcomes: the status table of the contract, retry policies and backoff.

use crate::definition::RetryPolicy;

/// The default policy for 5xx when a step has no `retry`: 3 attempts, 1 s, x2.
pub const DEFAULT_5XX: RetryPolicy = RetryPolicy {
    max_attempts: 3,
    initial_interval_ms: 1000,
    backoff_coefficient: 2.0,
    max_interval_ms: 100_000,
};

/// The default policy for 429 when a step has no `retry`: 5 attempts, 1 s, x2.
pub const DEFAULT_429: RetryPolicy = RetryPolicy {
    max_attempts: 5,
    initial_interval_ms: 1000,
    backoff_coefficient: 2.0,
    max_interval_ms: 100_000,
};

/// The longest wait a `Retry-After` may impose (a day).
pub const MAX_RETRY_AFTER_MS: u64 = 86_400_000;

/// How an attempt ended, as far as retrying goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// An HTTP status other than 2xx.
    Status(u16),
    /// The step's timeout passed (connect to last byte).
    Timeout,
    /// The connection could not be made or broke.
    Network,
    /// Retrying cannot help: refused host, oversized or malformed answer, bad URL.
    Permanent,
}

/// What happens after a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Next {
    /// Send attempt `attempt + 1` after this many milliseconds.
    RetryAfter(u64),
    /// The step failed for good.
    GiveUp,
}

/// The policy that governs a failure, or None when it is never retried.
pub fn policy_for(failure: Failure, step_policy: Option<&RetryPolicy>) -> Option<RetryPolicy> {
    match failure {
        Failure::Status(408) | Failure::Timeout | Failure::Network => step_policy.cloned(),
        Failure::Status(429) => Some(step_policy.cloned().unwrap_or(DEFAULT_429)),
        Failure::Status(500..=599) => Some(step_policy.cloned().unwrap_or(DEFAULT_5XX)),
        Failure::Status(_) | Failure::Permanent => None,
    }
}

/// Whether `Retry-After` is honoured for this failure (429 and 503).
pub fn honours_retry_after(failure: Failure) -> bool {
    matches!(failure, Failure::Status(429) | Failure::Status(503))
}

/// Backoff before attempt `attempt + 1`, after attempt `attempt` (1-based) failed:
/// `initial * coefficient^(attempt-1)`, with ±20% jitter (`jitter` in [0, 1)), never more
/// than `max_interval`.
pub fn backoff_ms(policy: &RetryPolicy, attempt: u32, jitter: f64) -> u64 {
    let exp = policy
        .backoff_coefficient
        .powi(attempt.saturating_sub(1).min(1000) as i32);
    let base = (policy.initial_interval_ms as f64 * exp).min(policy.max_interval_ms as f64);
    let jittered = base * (0.8 + 0.4 * jitter.clamp(0.0, 1.0));
    (jittered.round() as u64).min(policy.max_interval_ms).max(1)
}

/// Decides what follows failed attempt `attempt` (1-based).
pub fn after_failure(
    failure: Failure,
    attempt: u32,
    step_policy: Option<&RetryPolicy>,
    retry_after_ms: Option<u64>,
    jitter: f64,
) -> Next {
    let Some(policy) = policy_for(failure, step_policy) else {
        return Next::GiveUp;
    };
    if attempt >= policy.max_attempts {
        return Next::GiveUp;
    }
    let mut delay = backoff_ms(&policy, attempt, jitter);
    if honours_retry_after(failure) {
        if let Some(ra) = retry_after_ms {
            delay = delay.max(ra.min(MAX_RETRY_AFTER_MS));
        }
    }
    Next::RetryAfter(delay)
}

/// Parses `Retry-After`: delay-seconds, or an HTTP-date (IMF-fixdate,
/// `Sun, 06 Nov 1994 08:49:37 GMT`) turned into a delay from `now_ms` (epoch ms).
pub fn parse_retry_after(value: &str, now_ms: i64) -> Option<u64> {
    let v = value.trim();
    if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) {
        return v
            .parse::<u64>()
            .ok()
            .map(|s| s.saturating_mul(1000).min(MAX_RETRY_AFTER_MS));
    }
    let at = parse_http_date(v)?;
    Some((at - now_ms).max(0) as u64)
}

/// IMF-fixdate to epoch milliseconds.
pub fn parse_http_date(v: &str) -> Option<i64> {
    // "Sun, 06 Nov 1994 08:49:37 GMT"
    let (_, rest) = v.split_once(", ")?;
    let parts: Vec<&str> = rest.split(' ').collect();
    if parts.len() != 5 || parts[4] != "GMT" {
        return None;
    }
    let day: i64 = parts[0].parse().ok()?;
    let month = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ]
    .iter()
    .position(|m| *m == parts[1])? as i64
        + 1;
    let year: i64 = parts[2].parse().ok()?;
    let hms: Vec<i64> = parts[3]
        .split(':')
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    if hms.len() != 3 || !(1..=31).contains(&day) || hms[0] > 23 || hms[1] > 59 || hms[2] > 60 {
        return None;
    }
    // days from civil (Howard Hinnant's algorithm)
    let y = if month <= 2 { year - 1 } else { year };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(((days * 86_400) + hms[0] * 3600 + hms[1] * 60 + hms[2]) * 1000)
}

#[cfg(test)]
mod step_tests {
    use super::*;

    fn policy(n: u32) -> RetryPolicy {
        RetryPolicy {
            max_attempts: n,
            initial_interval_ms: 1000,
            backoff_coefficient: 2.0,
            max_interval_ms: 5000,
        }
    }

    #[test]
    fn status_table() {
        // permanent 4xx: never retried, with or without a policy
        for s in [400, 401, 403, 404, 422, 409, 418] {
            assert_eq!(
                after_failure(Failure::Status(s), 1, Some(&policy(5)), None, 0.5),
                Next::GiveUp,
                "{s}"
            );
        }
        // 408, timeouts, network errors: only with a policy
        for f in [Failure::Status(408), Failure::Timeout, Failure::Network] {
            assert_eq!(after_failure(f, 1, None, None, 0.5), Next::GiveUp);
            assert_eq!(
                after_failure(f, 1, Some(&policy(3)), None, 0.5),
                Next::RetryAfter(1000)
            );
            assert_eq!(
                after_failure(f, 3, Some(&policy(3)), None, 0.5),
                Next::GiveUp
            );
        }
        // 429: always, default 5 attempts
        assert_eq!(
            after_failure(Failure::Status(429), 4, None, None, 0.5),
            Next::RetryAfter(8000)
        );
        assert_eq!(
            after_failure(Failure::Status(429), 5, None, None, 0.5),
            Next::GiveUp
        );
        // 5xx: default 3 attempts, 1 s, x2
        for s in [500, 502, 503, 504, 599] {
            assert_eq!(
                after_failure(Failure::Status(s), 1, None, None, 0.5),
                Next::RetryAfter(1000)
            );
            assert_eq!(
                after_failure(Failure::Status(s), 2, None, None, 0.5),
                Next::RetryAfter(2000)
            );
            assert_eq!(
                after_failure(Failure::Status(s), 3, None, None, 0.5),
                Next::GiveUp
            );
        }
        assert_eq!(
            after_failure(Failure::Permanent, 1, Some(&policy(9)), None, 0.5),
            Next::GiveUp
        );
    }

    #[test]
    fn retry_after_is_the_earliest_next_attempt_on_429_and_503_only() {
        assert_eq!(
            after_failure(Failure::Status(429), 1, None, Some(60_000), 0.5),
            Next::RetryAfter(60_000)
        );
        assert_eq!(
            after_failure(Failure::Status(503), 1, None, Some(7_000), 0.5),
            Next::RetryAfter(7_000)
        );
        assert_eq!(
            after_failure(Failure::Status(500), 1, None, Some(7_000), 0.5),
            Next::RetryAfter(1000)
        );
        // a short Retry-After never shortens the backoff
        assert_eq!(
            after_failure(Failure::Status(503), 2, None, Some(10), 0.5),
            Next::RetryAfter(2000)
        );
    }

    #[test]
    fn backoff_grows_is_jittered_and_bounded() {
        let p = policy(10);
        assert_eq!(backoff_ms(&p, 1, 0.5), 1000);
        assert_eq!(backoff_ms(&p, 2, 0.5), 2000);
        assert_eq!(backoff_ms(&p, 3, 0.5), 4000);
        assert_eq!(backoff_ms(&p, 4, 0.5), 5000);
        assert_eq!(backoff_ms(&p, 60, 0.5), 5000);
        assert_eq!(backoff_ms(&p, 1, 0.0), 800);
        assert_eq!(backoff_ms(&p, 1, 0.999_999), 1200);
        assert_eq!(backoff_ms(&p, 9, 0.999), 5000);
    }

    #[test]
    fn retry_after_values() {
        assert_eq!(parse_retry_after("60", 0), Some(60_000));
        assert_eq!(parse_retry_after(" 2 ", 0), Some(2_000));
        // date -d 'Sun, 06 Nov 1994 08:49:37 GMT' +%s  => 784111777
        assert_eq!(
            parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT"),
            Some(784_111_777_000)
        );
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:47 GMT", 784_111_777_000),
            Some(10_000)
        );
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT", 784_111_999_000),
            Some(0)
        );
        for bad in [
            "",
            "soon",
            "-1",
            "1.5",
            "Sun, 06 Nov 1994 08:49:37 UTC",
            "Sun, 32 Nov 1994 08:49:37 GMT",
        ] {
            assert_eq!(parse_retry_after(bad, 0), None, "{bad}");
        }
        assert_eq!(
            parse_retry_after("99999999999", 0),
            Some(MAX_RETRY_AFTER_MS)
        );
    }
}
