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
