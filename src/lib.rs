//! `dispatched`: durable HTTP workflows inside PostgreSQL.
//!
//! The imperative shell. The rules live in the `dispatched-core` crate (`core/`); the schema
//! and the SQL API in `sql/`; this crate holds the settings, shared memory and the Rust
//! functions the SQL calls.

use pgrx::prelude::*;

pgrx::pg_module_magic!();

mod api;
mod bgw;
mod crypto;
mod ingress;
mod settings;
mod shmem;
mod worker;

#[cfg(any(test, feature = "pg_test"))]
#[path = "../pgrx-tests/mod.rs"]
mod pgrx_tests;

/// Declares the schema for pgrx; `sql/tables.sql` creates it first, so that it belongs to the
/// extension and DROP EXTENSION removes it.
#[pg_schema]
mod dispatched {}

extension_sql_file!("../sql/tables.sql", name = "tables", bootstrap);
extension_sql_file!("../sql/workflows.sql", name = "workflows");
extension_sql_file!("../sql/runs.sql", name = "runs");
extension_sql_file!("../sql/idempotency.sql", name = "idempotency");
extension_sql_file!("../sql/internal.sql", name = "internal");
extension_sql_file!("../sql/sessions.sql", name = "sessions");
extension_sql_file!(
    "../sql/admin.sql",
    name = "admin",
    requires = [
        "tables",
        "workflows",
        "runs",
        "idempotency",
        "internal",
        "sessions",
        api::_validate_definition,
        api::_check_json_depth,
        api::_check_key,
        api::_check_name,
        api::_new_run_id,
        api::_caller,
        api::_caller_is_superuser,
        api::invocation_id,
        api::idempotency_cache_key,
        api::_cache_decision,
        api::_setting_ms,
        api::_preloaded,
        api::_wake_workers_at_commit,
        api::_run_finished_at_commit,
        api::_wait_finished,
        crypto::decrypt,
        ingress::_new_session_token,
        ingress::_session_token_hash,
    ]
);
extension_sql_file!("../sql/privileges.sql", name = "privileges", finalize);

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    settings::define();
    if unsafe { pg_sys::process_shared_preload_libraries_in_progress } {
        shmem::install();
        worker::register();
        ingress::register();
    }
}

/// Settings for `cargo pgrx test`: preload the library like a real installation.
#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    pub fn postgresql_conf_options() -> Vec<&'static str> {
        vec!["shared_preload_libraries = 'dispatched'"]
    }
}
