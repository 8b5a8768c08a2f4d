//! Shared memory (only when preloaded) and the commit hooks that use it.
//!
//! * `run_finished`: a condition variable broadcast at the commit of any transaction that
//!   finished a run; `attach` sleeps on it, so it wakes at once and never polls.
//! * `worker_procnos`: the `pgprocno` of each running worker; a transaction that made work due
//!   (`start_run`, `signal`, `cancel_run`) sets their latches at commit, never before, and
//!   never on abort.
//! * `ingress_procno`: the HTTP ingress, woken (its latch set) when a run finishes.

use pgrx::pg_sys;
use std::cell::Cell;
use std::mem::size_of;
use std::ptr::null_mut;
use std::sync::atomic::{AtomicI32, Ordering};

pub const MAX_WORKERS: usize = 32;

#[repr(C)]
pub struct Shared {
    pub run_finished: pg_sys::ConditionVariable,
    pub worker_procnos: [AtomicI32; MAX_WORKERS],
    /// The `pgprocno` of the HTTP ingress (-1: none); its latch is set when a run finishes,
    /// so that its pending `attach` requests are answered at once.
    pub ingress_procno: AtomicI32,
}

static mut SHARED: *mut Shared = null_mut();
static mut PREV_REQUEST: pg_sys::shmem_request_hook_type = None;
static mut PREV_STARTUP: pg_sys::shmem_startup_hook_type = None;

thread_local! {
    static CALLBACK_REGISTERED: Cell<bool> = const { Cell::new(false) };
    static WAKE_AT_COMMIT: Cell<bool> = const { Cell::new(false) };
    static FINISHED_AT_COMMIT: Cell<bool> = const { Cell::new(false) };
}

/// Installs the shared memory hooks. Called from `_PG_init` while preloading.
pub fn install() {
    unsafe {
        PREV_REQUEST = pg_sys::shmem_request_hook;
        pg_sys::shmem_request_hook = Some(on_request);
        PREV_STARTUP = pg_sys::shmem_startup_hook;
        pg_sys::shmem_startup_hook = Some(on_startup);
    }
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn on_request() {
    unsafe {
        if let Some(prev) = PREV_REQUEST {
            prev();
        }
        pg_sys::RequestAddinShmemSpace(size_of::<Shared>());
    }
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn on_startup() {
    unsafe {
        if let Some(prev) = PREV_STARTUP {
            prev();
        }
        let lock = &raw mut (*pg_sys::MainLWLockArray.add(21)).lock; // AddinShmemInitLock
        pg_sys::LWLockAcquire(lock, pg_sys::LWLockMode::LW_EXCLUSIVE);
        let mut found = false;
        let ptr = pg_sys::ShmemInitStruct(c"dispatched".as_ptr(), size_of::<Shared>(), &mut found)
            .cast::<Shared>();
        if !found {
            pg_sys::ConditionVariableInit(&raw mut (*ptr).run_finished);
            for slot in (*ptr).worker_procnos.iter() {
                slot.store(-1, Ordering::SeqCst);
            }
            (*ptr).ingress_procno.store(-1, Ordering::SeqCst);
        }
        SHARED = ptr;
        pg_sys::LWLockRelease(lock);
    }
}

/// The shared struct, when the library was preloaded.
pub fn shared() -> Option<&'static Shared> {
    unsafe { SHARED.as_ref() }
}

fn register_callback() {
    if !CALLBACK_REGISTERED.get() {
        unsafe { pg_sys::RegisterXactCallback(Some(on_xact), null_mut()) };
        CALLBACK_REGISTERED.set(true);
    }
}

/// Wake the workers when the current transaction commits.
pub fn wake_workers_at_commit() {
    register_callback();
    WAKE_AT_COMMIT.set(true);
}

/// Wake every `attach` when the current transaction commits (it finished a run).
pub fn run_finished_at_commit() {
    register_callback();
    FINISHED_AT_COMMIT.set(true);
}

/// Sets the latch of every registered worker.
pub fn wake_workers() {
    let Some(sh) = shared() else { return };
    for slot in sh.worker_procnos.iter() {
        set_latch_of(slot.load(Ordering::SeqCst));
    }
}

fn set_latch_of(procno: i32) {
    if procno >= 0 {
        unsafe {
            let proc_ = (*pg_sys::ProcGlobal).allProcs.add(procno as usize);
            pg_sys::SetLatch(&raw mut (*proc_).procLatch);
        }
    }
}

/// Wakes every backend sleeping in `attach`, and the HTTP ingress.
pub fn broadcast_run_finished() {
    if let Some(sh) = shared() {
        unsafe { pg_sys::ConditionVariableBroadcast((&raw const sh.run_finished).cast_mut()) };
        set_latch_of(sh.ingress_procno.load(Ordering::SeqCst));
    }
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn on_xact(event: pg_sys::XactEvent::Type, _arg: *mut std::ffi::c_void) {
    match event {
        pg_sys::XactEvent::XACT_EVENT_COMMIT | pg_sys::XactEvent::XACT_EVENT_PARALLEL_COMMIT => {
            if WAKE_AT_COMMIT.replace(false) {
                wake_workers();
            }
            if FINISHED_AT_COMMIT.replace(false) {
                broadcast_run_finished();
            }
        }
        pg_sys::XactEvent::XACT_EVENT_ABORT
        | pg_sys::XactEvent::XACT_EVENT_PARALLEL_ABORT
        | pg_sys::XactEvent::XACT_EVENT_PREPARE => {
            WAKE_AT_COMMIT.set(false);
            FINISHED_AT_COMMIT.set(false);
        }
        _ => {}
    }
}
