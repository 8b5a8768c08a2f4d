//! Plumbing shared by the background workers (the HTTP worker and the ingress): network
//! threads report to the main thread, the only one that touches Postgres, through a pipe the
//! main thread waits on together with its latch.

use pgrx::prelude::*;

/// A non-blocking, close-on-exec pipe: (read end, write end).
pub fn make_pipe(who: &str) -> (i32, i32) {
    let mut fds = [0i32; 2];
    unsafe {
        if libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) != 0 {
            error!("{who}: could not create a pipe");
        }
    }
    (fds[0], fds[1])
}

/// Empties the pipe (its bytes only say "look at the channel").
pub fn drain(fd: i32) {
    let mut buf = [0u8; 256];
    loop {
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n <= 0 {
            break;
        }
    }
}

/// Writes one byte to the pipe: wakes the main thread (callable from any thread).
pub fn poke(fd: i32) {
    let b = 1u8;
    unsafe {
        libc::write(fd, (&b as *const u8).cast(), 1);
    }
}

/// Blocks every signal in the calling thread while `f` runs (threads spawned inside inherit
/// the mask), so that Postgres' signal handlers only ever run on the main thread.
pub fn with_signals_blocked<R>(f: impl FnOnce() -> R) -> R {
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_BLOCK, &all, &mut old);
        let r = f();
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
        r
    }
}

/// Sleeps until the latch is set, a byte arrives on the pipe, or `ms` pass.
pub fn wait(pipe_r: i32, ms: i64) {
    unsafe {
        pg_sys::WaitLatchOrSocket(
            pg_sys::MyLatch,
            (pg_sys::WL_LATCH_SET
                | pg_sys::WL_SOCKET_READABLE
                | pg_sys::WL_TIMEOUT
                | pg_sys::WL_EXIT_ON_PM_DEATH) as i32,
            pipe_r,
            ms.max(1) as std::ffi::c_long,
            pg_sys::PG_WAIT_EXTENSION,
        );
        pg_sys::ResetLatch(pg_sys::MyLatch);
    }
}
