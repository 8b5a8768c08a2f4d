//! Retention: worker 0 deletes expired Layer 1 entries (`idempotency_cache`, final answers
//! past `dispatched.idempotency_retention` and claims past `idempotency_lock_timeout`) and
//! expired Layer 2 rows (`invocations`, past `dispatched.invocation_retention`).
//!
//! Reads already ignore expired rows, so the purge is only about space. It never holds a
//! long lock: each batch of at most [`BATCH`] rows is one short transaction that deletes rows
//! found through the `expires_at` index and skips rows another transaction has locked, and a
//! round stops after [`MAX_BATCHES`] batches per table so that steps are not held up; what is
//! left waits for the next round, which then comes soon.

use super::tx;
use crate::settings;
use pgrx::prelude::*;
use std::time::Instant;

/// Rows deleted per transaction.
const BATCH: i64 = 1000;
/// Batches per table in one round.
const MAX_BATCHES: usize = 20;
/// The longest time between rounds (shorter when a retention is shorter).
const MAX_INTERVAL_MS: u64 = 60_000;
const MIN_INTERVAL_MS: u64 = 1_000;

const TABLES: [(&str, &str); 2] = [
    ("idempotency_cache", "expired idempotency entries"),
    ("invocations", "expired invocation log rows"),
];

#[derive(Default)]
pub struct Purger {
    next: Option<Instant>,
}

fn interval_ms() -> u64 {
    let shortest = [
        "idempotency_retention",
        "idempotency_lock_timeout",
        "invocation_retention",
    ]
    .iter()
    .filter_map(|n| settings::duration_ms(n))
    .min()
    .unwrap_or(MAX_INTERVAL_MS);
    shortest.clamp(MIN_INTERVAL_MS, MAX_INTERVAL_MS)
}

/// Deletes one batch of expired rows of `table`; returns how many.
fn purge_batch(table: &str) -> Result<i64, String> {
    let sql = format!(
        "WITH gone AS (
             DELETE FROM dispatched.{table} t
              WHERE t.ctid = ANY (ARRAY(
                        SELECT x.ctid FROM dispatched.{table} x
                         WHERE x.expires_at < pg_catalog.clock_timestamp()
                         ORDER BY x.expires_at
                         LIMIT $1
                           FOR UPDATE SKIP LOCKED))
                AND t.expires_at < pg_catalog.clock_timestamp()
             RETURNING 1)
         SELECT to_jsonb(count(*)) FROM gone"
    );
    let rows = super::store::rows_json_once(&sql, &[BATCH.into()])?;
    Ok(rows
        .first()
        .and_then(serde_json::Value::as_i64)
        .unwrap_or(0))
}

impl Purger {
    /// Runs a round when one is due. Returns the milliseconds until the next round, for the
    /// worker's sleep.
    pub fn tick(&mut self, me: i32) -> i64 {
        if me != 0 {
            return i64::MAX;
        }
        let now = Instant::now();
        if let Some(next) = self.next {
            if now < next {
                return next.duration_since(now).as_millis() as i64;
            }
        }
        let mut more = false;
        for (table, what) in TABLES {
            let mut total = 0i64;
            for _ in 0..MAX_BATCHES {
                match tx(|| purge_batch(table)) {
                    Ok(n) => {
                        total += n;
                        if n < BATCH {
                            break;
                        }
                        more = more || total >= BATCH * MAX_BATCHES as i64;
                    }
                    Err(e) => {
                        warning!("dispatched worker {me}: purging {what} failed: {e}");
                        break;
                    }
                }
            }
            if total > 0 {
                log!("dispatched worker {me}: purged {total} {what}");
            }
        }
        let wait = if more { MIN_INTERVAL_MS } else { interval_ms() };
        self.next = Some(Instant::now() + std::time::Duration::from_millis(wait));
        wait as i64
    }
}
