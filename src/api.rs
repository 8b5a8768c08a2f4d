//! The Rust functions behind the SQL API: validation, ids, hashes, settings, waiting.
//! The contract's functions themselves are in `sql/`; they call these.

use crate::{settings, shmem};
use dispatched_core::{definition, depth, hash, keys, rules};
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::ffi::CStr;
use std::time::{Duration, Instant};

fn invalid(message: String) -> ! {
    ereport!(
        PgLogLevel::ERROR,
        PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
        message
    );
    unreachable!()
}

/// Validates a workflow definition (its jsonb as text); raises 22023 naming every problem
/// with its JSON path. A definition nested deeper than `MAX_JSON_DEPTH` is refused before it
/// is parsed (the text is counted, not recursed into), so no depth gives anything but 22023.
#[pg_extern(schema = "dispatched", immutable, parallel_safe)]
fn _validate_definition(definition: &str) -> bool {
    if let Err(e) = depth::check_json_depth("definition", definition) {
        invalid(e);
    }
    let doc: serde_json::Value = match serde_json::from_str(definition) {
        Ok(v) => v,
        Err(e) => invalid(format!("definition: not valid JSON: {e}")),
    };
    match definition::parse(&doc) {
        Ok(_) => true,
        Err(e) => invalid(e.to_string()),
    }
}

/// Raises 22023 naming `what` when the JSON text nests deeper than `MAX_JSON_DEPTH` (a run's
/// input, signal data, an activity-log outcome): the worker reads them back, and a document
/// it cannot parse must not get in.
#[pg_extern(schema = "dispatched", immutable, parallel_safe)]
fn _check_json_depth(what: &str, doc: &str) -> bool {
    match depth::check_json_depth(what, doc) {
        Ok(()) => true,
        Err(e) => invalid(e),
    }
}

/// Raises 22023 unless `key` is 1 to 255 RFC 3986 unreserved characters.
#[pg_extern(schema = "dispatched", immutable, parallel_safe)]
fn _check_key(what: &str, key: &str) -> bool {
    match keys::check_key(key) {
        Ok(()) => true,
        Err(e) => invalid(format!("{what}: {e}")),
    }
}

/// Raises 22023 unless `name` is a valid name (workflow, signal, secret).
#[pg_extern(schema = "dispatched", immutable, parallel_safe)]
fn _check_name(what: &str, name: &str, dotted: bool) -> bool {
    match keys::check_name(what, name, dotted) {
        Ok(()) => true,
        Err(e) => invalid(e),
    }
}

/// A new run id: `run_` and 22 URL-safe characters from 128 random bits.
#[pg_extern(schema = "dispatched", volatile, parallel_safe)]
fn _new_run_id() -> String {
    new_run_id()
}

pub fn new_run_id() -> String {
    let mut bytes = [0u8; 16];
    let ok = unsafe { pg_sys::pg_strong_random(bytes.as_mut_ptr().cast(), bytes.len()) };
    if !ok {
        error!("dispatched: could not generate random bytes for a run id");
    }
    keys::run_id_from_bytes(bytes)
}

/// The role the caller acts as (`current_user` outside any SECURITY DEFINER function): the
/// tenant of what it does.
#[pg_extern(schema = "dispatched", stable, parallel_safe)]
fn _caller() -> String {
    unsafe {
        let name = pg_sys::GetUserNameFromId(pg_sys::GetOuterUserId(), false);
        CStr::from_ptr(name).to_string_lossy().into_owned()
    }
}

/// Whether the caller is a superuser (who sees every tenant's runs).
#[pg_extern(schema = "dispatched", stable, parallel_safe)]
fn _caller_is_superuser() -> bool {
    unsafe { pg_sys::superuser_arg(pg_sys::GetOuterUserId()) }
}

/// Layer 2 invocation id: hex `sha256(run_id ':' node_id ':' attempt ':' provider_key)`.
#[pg_extern(schema = "dispatched", immutable, parallel_safe)]
fn invocation_id(run_id: &str, node_id: &str, attempt: i32, provider_key: &str) -> String {
    if attempt < 0 {
        invalid(format!(
            "attempt: must be zero or more (zero-based), not {attempt}"
        ));
    }
    hash::invocation_id(run_id, node_id, attempt as u32, provider_key)
}

/// Layer 1 composite cache key: hex `sha256(tenant ':' endpoint ':' key)`; a NULL tenant is
/// the caller; a NULL endpoint or key gives NULL (like a strict function).
#[pg_extern(schema = "dispatched", stable, parallel_safe)]
fn idempotency_cache_key(
    tenant: Option<&str>,
    endpoint: Option<&str>,
    key: Option<&str>,
) -> Option<String> {
    let (endpoint, key) = (endpoint?, key?);
    let caller;
    let tenant = match tenant {
        Some(t) => t,
        None => {
            caller = _caller();
            &caller
        }
    };
    Some(hash::cache_key(tenant, endpoint, key))
}

/// `cache` or `release`: what idempotency_complete does with a status.
#[pg_extern(schema = "dispatched", immutable, parallel_safe)]
fn _cache_decision(status: i32) -> &'static str {
    if !(100..=599).contains(&status) {
        invalid(format!(
            "status: must be an HTTP status from 100 to 599, not {status}"
        ));
    }
    match rules::cache_decision(status as u16) {
        rules::CacheDecision::Cache => "cache",
        rules::CacheDecision::Release => "release",
    }
}

/// A duration setting (`idempotency_retention`, ...) in milliseconds.
#[pg_extern(schema = "dispatched", stable, parallel_safe)]
fn _setting_ms(name: &str) -> i64 {
    match settings::duration_ms(name) {
        Some(ms) => ms as i64,
        None => invalid(format!("dispatched.{name}: not a duration setting")),
    }
}

/// Whether the library was loaded by `shared_preload_libraries` (so workers can run).
#[pg_extern(schema = "dispatched", stable, parallel_safe)]
fn _preloaded() -> bool {
    shmem::shared().is_some()
}

/// Wakes the workers when the calling transaction commits (nothing happens on abort).
#[pg_extern(schema = "dispatched", volatile)]
fn _wake_workers_at_commit() {
    shmem::wake_workers_at_commit();
}

/// Wakes every `attach` when the calling transaction commits.
#[pg_extern(schema = "dispatched", volatile)]
fn _run_finished_at_commit() {
    shmem::run_finished_at_commit();
}

/// Waits until the run is finished (or unknown) or the timeout passes. Holds no lock and
/// does not poll: it sleeps on a condition variable that is broadcast when a transaction that
/// finished a run commits. Each check takes a fresh snapshot (READ COMMITTED).
#[pg_extern(schema = "dispatched", volatile)]
fn _wait_finished(run_id: &str, timeout_ms: i64) -> bool {
    let deadline = Instant::now() + Duration::from_millis(timeout_ms.max(0) as u64);
    let cv = shmem::shared().map(|s| (&raw const s.run_finished).cast_mut());
    if let Some(cv) = cv {
        unsafe { pg_sys::ConditionVariablePrepareToSleep(cv) };
    }
    let finished = loop {
        let done = Spi::get_one_with_args::<bool>(
            "SELECT coalesce((SELECT status IN ('completed', 'failed', 'cancelled') \
             FROM dispatched.runs WHERE id = $1), true)",
            &[run_id.into()],
        )
        .ok()
        .flatten()
        .unwrap_or(true);
        if done {
            break true;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break false;
        }
        let ms = left.as_millis().clamp(1, i64::MAX as u128) as std::ffi::c_long;
        unsafe {
            match cv {
                Some(cv) => {
                    pg_sys::ConditionVariableTimedSleep(cv, ms, pg_sys::PG_WAIT_EXTENSION);
                }
                None => {
                    // Not preloaded: no worker finishes runs; only another session's
                    // cancel_run can. Sleep in short steps on our own latch.
                    pg_sys::WaitLatch(
                        pg_sys::MyLatch,
                        (pg_sys::WL_LATCH_SET | pg_sys::WL_TIMEOUT | pg_sys::WL_EXIT_ON_PM_DEATH)
                            as i32,
                        ms.min(100),
                        pg_sys::PG_WAIT_EXTENSION,
                    );
                    pg_sys::ResetLatch(pg_sys::MyLatch);
                }
            }
        }
        pg_sys::check_for_interrupts!();
    };
    if cv.is_some() {
        unsafe { pg_sys::ConditionVariableCancelSleep() };
    }
    finished
}
