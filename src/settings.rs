//! The `dispatched.*` settings (GUCs). Every duration setting is checked when it is set, so
//! a bad value is refused with a message naming the setting, never found at use time.

use dispatched_core::duration;
use pgrx::guc::{GucContext, GucFlags, GucRegistry, GucSetting};
use pgrx::pg_sys;
use std::ffi::{CStr, CString};

pub static DATABASE: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"postgres"));
pub static WORKERS: GucSetting<i32> = GucSetting::<i32>::new(1);
pub static MAX_CONCURRENT_REQUESTS: GucSetting<i32> = GucSetting::<i32>::new(64);
pub static MAX_REQUESTS_PER_HOST: GucSetting<i32> = GucSetting::<i32>::new(0);
pub static DEFAULT_TIMEOUT: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"30s"));
pub static IDEMPOTENCY_RETENTION: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"24h"));
pub static IDEMPOTENCY_LOCK_TIMEOUT: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"60s"));
pub static INVOCATION_RETENTION: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"14 days"));
pub static MAX_RESPONSE_BYTES: GucSetting<i32> = GucSetting::<i32>::new(10 * 1024 * 1024);
pub static ALLOWED_HOSTS: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c""));
pub static ENCRYPTION_KEY: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c""));
pub static HTTP_PORT: GucSetting<i32> = GucSetting::<i32>::new(0);
pub static HTTP_LISTEN: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"127.0.0.1"));
pub static HTTP_MAX_CONNECTIONS: GucSetting<i32> = GucSetting::<i32>::new(64);
pub static HTTP_MAX_BODY_BYTES: GucSetting<i32> = GucSetting::<i32>::new(1024 * 1024);
pub static HTTP_READ_TIMEOUT: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"10s"));

/// Check hook of every duration setting: the value must parse as a duration.
#[pgrx::pg_guard]
unsafe extern "C-unwind" fn check_duration(
    newval: *mut *mut std::ffi::c_char,
    _extra: *mut *mut std::ffi::c_void,
    _source: pg_sys::GucSource::Type,
) -> bool {
    unsafe {
        if newval.is_null() || (*newval).is_null() {
            return true;
        }
        let text = CStr::from_ptr(*newval).to_string_lossy();
        match duration::parse_ms(&text) {
            Ok(_) => true,
            Err(e) => {
                if let Ok(msg) = CString::new(e.0) {
                    pg_sys::GUC_check_errdetail_string = pg_sys::pstrdup(msg.as_ptr());
                }
                false
            }
        }
    }
}

fn duration_guc(
    name: &'static CStr,
    short: &'static CStr,
    long: &'static CStr,
    setting: &'static GucSetting<Option<CString>>,
    context: GucContext,
) {
    unsafe {
        GucRegistry::define_string_guc_with_hooks(
            name,
            short,
            long,
            setting,
            context,
            GucFlags::default(),
            Some(check_duration),
            None,
            None,
        );
    }
}

pub fn define() {
    GucRegistry::define_string_guc(
        c"dispatched.database",
        c"The database whose runs the dispatched workers perform.",
        c"Workers connect to this one database; the extension must be created there.",
        &DATABASE,
        GucContext::Postmaster,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"dispatched.workers",
        c"How many dispatched background workers run (0 disables them).",
        c"Workers share the due steps without stepping on each other.",
        &WORKERS,
        0,
        crate::shmem::MAX_WORKERS as i32,
        GucContext::Postmaster,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"dispatched.max_concurrent_requests",
        c"How many step requests each worker may have on the wire at once.",
        c"",
        &MAX_CONCURRENT_REQUESTS,
        1,
        10_000,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"dispatched.max_requests_per_host",
        c"How many of a worker's requests may be on the wire to one host:port at once (0: a quarter of max_concurrent_requests).",
        c"The rest wait in order without taking a connection, so that a slow service cannot hold up the others.",
        &MAX_REQUESTS_PER_HOST,
        0,
        10_000,
        GucContext::Sighup,
        GucFlags::default(),
    );
    duration_guc(
        c"dispatched.default_timeout",
        c"Timeout of a step request whose step sets none (connect to last byte).",
        c"A duration: 500ms, 30s, 10m, 2h, 1d.",
        &DEFAULT_TIMEOUT,
        GucContext::Sighup,
    );
    duration_guc(
        c"dispatched.idempotency_retention",
        c"How long idempotency_complete keeps a final outcome for replay (Layer 1).",
        c"A duration or interval text: 24h, 2h, 3d, 14 days.",
        &IDEMPOTENCY_RETENTION,
        GucContext::Suset,
    );
    duration_guc(
        c"dispatched.idempotency_lock_timeout",
        c"How long idempotency_begin's claim on a key lasts before another caller may take it over.",
        c"Protects a key whose owner died before calling idempotency_complete.",
        &IDEMPOTENCY_LOCK_TIMEOUT,
        GucContext::Suset,
    );
    duration_guc(
        c"dispatched.invocation_retention",
        c"How long the activity log (Layer 2) keeps an invocation's outcome.",
        c"A duration or interval text: 24h, 2h, 3d, 14 days.",
        &INVOCATION_RETENTION,
        GucContext::Suset,
    );
    GucRegistry::define_int_guc(
        c"dispatched.max_response_bytes",
        c"The largest response body a step accepts; a larger one fails the step.",
        c"",
        &MAX_RESPONSE_BYTES,
        1024,
        i32::MAX,
        GucContext::Sighup,
        GucFlags::UNIT_BYTE,
    );
    GucRegistry::define_string_guc(
        c"dispatched.allowed_hosts",
        c"Hosts step requests may reach: names (*.example.com), IP addresses, CIDR ranges.",
        c"Empty allows any host except link-local and cloud metadata addresses.",
        &ALLOWED_HOSTS,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"dispatched.encryption_key",
        c"Key for encrypting large bodies in the event stream (empty: not encrypted).",
        c"Readable by superusers only.",
        &ENCRYPTION_KEY,
        GucContext::Sighup,
        GucFlags::SUPERUSER_ONLY | GucFlags::NO_SHOW_ALL,
    );
    GucRegistry::define_int_guc(
        c"dispatched.http_port",
        c"Port of the HTTP ingress worker (0: off).",
        c"",
        &HTTP_PORT,
        0,
        65535,
        GucContext::Postmaster,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"dispatched.http_listen",
        c"Address the HTTP ingress listens on.",
        c"",
        &HTTP_LISTEN,
        GucContext::Postmaster,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"dispatched.http_max_connections",
        c"How many client connections the HTTP ingress serves at once; more are answered 503.",
        c"",
        &HTTP_MAX_CONNECTIONS,
        1,
        10_000,
        GucContext::Postmaster,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"dispatched.http_max_body_bytes",
        c"The largest request body the HTTP ingress accepts; a larger one is answered 413.",
        c"",
        &HTTP_MAX_BODY_BYTES,
        1024,
        i32::MAX,
        GucContext::Postmaster,
        GucFlags::UNIT_BYTE,
    );
    duration_guc(
        c"dispatched.http_read_timeout",
        c"How long the HTTP ingress waits for a request's headers, and then for its body.",
        c"A client slower than this is answered 408 and disconnected.",
        &HTTP_READ_TIMEOUT,
        GucContext::Postmaster,
    );
}

pub fn text(setting: &GucSetting<Option<CString>>) -> String {
    setting
        .get()
        .map(|c| c.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// A duration setting in milliseconds. The check hook guarantees it parses.
pub fn duration_ms(name: &str) -> Option<u64> {
    let setting = match name {
        "default_timeout" => &DEFAULT_TIMEOUT,
        "idempotency_retention" => &IDEMPOTENCY_RETENTION,
        "idempotency_lock_timeout" => &IDEMPOTENCY_LOCK_TIMEOUT,
        "invocation_retention" => &INVOCATION_RETENTION,
        "http_read_timeout" => &HTTP_READ_TIMEOUT,
        _ => return None,
    };
    duration::parse_ms(&text(setting)).ok()
}

/// Requests on the wire per host:port for one worker.
pub fn per_host_cap() -> usize {
    match MAX_REQUESTS_PER_HOST.get() {
        n if n > 0 => n as usize,
        _ => (MAX_CONCURRENT_REQUESTS.get().max(4) / 4) as usize,
    }
}
