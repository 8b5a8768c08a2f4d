//! The background worker: claims due steps, sends their requests on the HTTP threads, and
//! records every outcome. The main thread alone touches Postgres.
//!
//! The loop: record the answers that came back (one transaction per batch), claim due
//! tasks (one transaction per batch), hand the resulting requests to the HTTP threads, then
//! sleep until the latch is set (a commit of `start_run`, `signal` or `cancel_run`), an
//! answer arrives (a byte on a pipe), or the next task is due. No transaction or row lock
//! is held while a request is on the wire.

mod deepjson;
mod http;
mod purge;
pub mod store;

use crate::{api, bgw, crypto, settings, shmem};
use dispatched_core::definition::Definition;
use dispatched_core::engine::{self, Env, OutRequest, Outcome};
use dispatched_core::fair::Fair;
use dispatched_core::hosts::HostRules;
use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder, SignalWakeFlags};
use pgrx::prelude::*;
use std::collections::{HashMap, HashSet};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use store::{Batch, Definitions, Res};

/// How many tasks one claim takes at most.
const CLAIM_BATCH: usize = 256;
/// The lease a claim starts with, before the state machine sets the real one.
const CLAIM_LEASE_MS: i64 = 60_000;
/// The longest sleep when nothing is due (the latch wakes the worker for new work).
const MAX_SLEEP_MS: i64 = 3_600_000;
/// How many requests may wait for their host, per HTTP thread.
const WAITING_PER_THREAD: usize = 4;
/// A request waiting for its host has its lease renewed this often (well within
/// engine::LEASE_MARGIN_MS).
const LEASE_RENEW_MS: i64 = 5_000;

/// The host:port a request goes to: the unit of [`Fair`] sharing.
fn origin(req: &OutRequest) -> String {
    format!("{}:{}", req.host, req.port)
}

pub fn register() {
    let n = settings::WORKERS.get();
    for i in 0..n {
        BackgroundWorkerBuilder::new(&format!("dispatched worker {i}"))
            .set_type("dispatched worker")
            .set_library("dispatched")
            .set_function("dispatched_worker_main")
            .set_argument(Some(pg_sys::Datum::from(i as usize)))
            .enable_spi_access()
            .set_restart_time(Some(Duration::from_secs(1)))
            .load();
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Runs `f` in its own transaction. An ERROR inside is caught, the transaction rolled back,
/// and the error returned, so the worker survives it.
fn tx<R>(f: impl FnOnce() -> Res<R>) -> Res<R> {
    unsafe {
        pg_sys::SetCurrentStatementStartTimestamp();
        pg_sys::StartTransactionCommand();
        pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
    }
    let f = AssertUnwindSafe(f);
    let result = PgTryBuilder::new(move || {
        let whole = f;
        let r = (whole.0)();
        if r.is_ok() {
            unsafe {
                pg_sys::PopActiveSnapshot();
                pg_sys::CommitTransactionCommand();
            }
        }
        r
    })
    .catch_others(|e| {
        Err(match e {
            pg_sys::panic::CaughtError::PostgresError(r)
            | pg_sys::panic::CaughtError::ErrorReport(r)
            | pg_sys::panic::CaughtError::RustPanic { ereport: r, .. } => {
                format!("{} ({:?})", r.message(), r.sql_error_code())
            }
        })
    })
    .execute();
    if result.is_err() {
        unsafe { pg_sys::AbortCurrentTransaction() };
        store::forget_plans();
    }
    result
}

fn limits() -> http::Limits {
    let text = settings::text(&settings::ALLOWED_HOSTS);
    let rules = match HostRules::parse(&text) {
        Ok(r) => r,
        Err(e) => {
            warning!("dispatched.allowed_hosts: {e}; refusing every host until it is fixed");
            HostRules::parse("invalid.invalid").unwrap_or_default()
        }
    };
    http::Limits {
        rules,
        max_response_bytes: settings::MAX_RESPONSE_BYTES.get().max(1024) as u64,
    }
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let x = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D);
        (x >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// What a batch produced: requests to send after commit.
struct Produced {
    requests: Vec<(OutRequest, i32)>,
    claimed: usize,
    /// milliseconds until the next task is due (None: no task left)
    next_due_ms: Option<i64>,
}

struct Worker {
    me: i32,
    defs: Definitions,
    rng: Rng,
}

impl Worker {
    /// Applies the state machine to loaded runs and writes the result.
    fn apply(
        &mut self,
        loaded: Vec<store::Loaded>,
        mut call: impl FnMut(
            &mut engine::Run,
            &Definition,
            &mut Env,
            Option<Outcome>,
        ) -> Option<engine::Effects>,
        claims_of: &HashMap<String, i32>,
    ) -> Res<Produced> {
        let secrets = store::secrets()?;
        let mut all: Vec<String> = secrets
            .values()
            .filter(|v| !v.is_empty())
            .cloned()
            .collect();
        all.sort_by_key(|s| std::cmp::Reverse(s.len()));
        let default_timeout = settings::duration_ms("default_timeout").unwrap_or(30_000);
        let retention =
            settings::duration_ms("invocation_retention").unwrap_or(14 * 86_400_000) as i64;
        let key = settings::text(&settings::ENCRYPTION_KEY);
        let encrypt = |data: &mut serde_json::Value| crypto::encrypt_large_body(data, &key);
        let mut batch = Batch::default();
        let mut requests = Vec::new();
        let secret = |n: &str| secrets.get(n).cloned();
        let exists = |w: &str| {
            store::workflows_existing(&[w.to_string()])
                .map(|v| !v.is_empty())
                .unwrap_or(false)
        };
        let rng = &mut self.rng;
        let mut jitter = || rng.next();
        let mut new_id = api::new_run_id;
        for mut l in loaded {
            let def = match self.defs.get(&l.workflow, l.version) {
                Ok(d) => d,
                Err(e) => {
                    // Never let one run stop a batch: a definition that cannot be read fails
                    // its run, with the reason.
                    warning!("dispatched: run {}: {e}", l.run.id);
                    let mut fx = fail_unreadable(&mut l.run, &e);
                    batch.add(&l.run, &[], &mut fx, self.me, &encrypt);
                    continue;
                }
            };
            let mut env = Env {
                now_ms: now_ms(),
                default_timeout_ms: default_timeout,
                secret: &secret,
                all_secrets: &all,
                jitter: &mut jitter,
                new_run_id: &mut new_id,
                workflow_exists: &exists,
            };
            let logged = l.logged.as_ref().and_then(Outcome::from_log);
            let Some(mut fx) = call(&mut l.run, &def, &mut env, logged) else {
                continue;
            };
            let step_ids: Vec<&str> = def.steps.iter().map(|s| s.id.as_str()).collect();
            batch.add(&l.run, &step_ids, &mut fx, self.me, &encrypt);
            let claims = claims_of.get(&l.run.id).copied().unwrap_or(0);
            requests.extend(fx.requests.into_iter().map(|r| (r, claims)));
        }
        let batch = batch.flush(retention)?;
        if batch.finished {
            shmem::run_finished_at_commit();
        }
        if batch.due_now {
            shmem::wake_workers_at_commit();
        }
        Ok(Produced {
            requests,
            claimed: 0,
            next_due_ms: None,
        })
    }

    fn claim_and_run(&mut self, limit: usize) -> Res<Produced> {
        let claimed = store::claim(self.me, limit as i64, CLAIM_LEASE_MS)?;
        if claimed.is_empty() {
            return Ok(Produced {
                requests: Vec::new(),
                claimed: 0,
                next_due_ms: store::next_due_ms()?,
            });
        }
        let n = claimed.len();
        let claims: HashMap<String, i32> = claimed.into_iter().collect();
        let ids: Vec<String> = claims.keys().cloned().collect();
        let loaded = store::load_runs(&ids, true)?;
        let mut p = self.apply(
            loaded,
            |run, def, env, logged| Some(engine::on_due(run, def, env, logged)),
            &claims,
        )?;
        p.claimed = n;
        // a full claim means more is due now: the loop claims again at once
        p.next_due_ms = if n < limit {
            store::next_due_ms()?
        } else {
            Some(0)
        };
        Ok(p)
    }

    fn record(&mut self, done: &[http::Done]) -> Res<Produced> {
        let ids: Vec<String> = done
            .iter()
            .map(|d| d.req.run_id.clone())
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        let tasks = store::lock_tasks(&ids)?;
        let loaded = store::load_runs(&ids, false)?;
        let by_run: HashMap<&str, &http::Done> =
            done.iter().map(|d| (d.req.run_id.as_str(), d)).collect();
        let me = self.me;
        let mut claims = HashMap::new();
        let mut current = Vec::new();
        for l in loaded {
            let Some(d) = by_run.get(l.run.id.as_str()) else {
                continue;
            };
            // The answer counts only if this worker still holds the task (not cancelled, not
            // taken over after a lease ran out) and the step still waits for this attempt.
            let holds = matches!(tasks.get(&l.run.id), Some((c, Some(owner))) if *c == d.claims && *owner == me);
            let expected = l
                .run
                .steps
                .get(d.req.step_idx)
                .and_then(|s| s.as_ref())
                .and_then(|s| s.invocation.as_deref())
                == Some(d.req.invocation_id.as_str());
            if holds && expected && !l.run.status.finished() {
                claims.insert(l.run.id.clone(), d.claims);
                current.push(l);
            }
        }
        self.apply(
            current,
            |run, def, env, _| {
                let d = by_run.get(run.id.as_str())?;
                // the answer and, when it follows at once, the next request in one transaction
                let mut fx = engine::on_outcome_then_due(
                    run,
                    def,
                    env,
                    d.req.step_idx,
                    d.req.compensate,
                    d.req.attempt,
                    d.outcome.clone(),
                );
                // the attempt's duration goes on the first event about its outcome
                if let Some(ev) = fx.events.iter_mut().find(|e| {
                    e.step.as_deref() == Some(d.req.step_id.as_str())
                        && matches!(
                            e.kind,
                            "step.response"
                                | "step.succeeded"
                                | "step.retry_scheduled"
                                | "step.failed"
                                | "compensation.succeeded"
                                | "compensation.failed"
                        )
                }) {
                    ev.data["duration_ms"] = serde_json::json!(d.duration.as_secs_f64() * 1000.0);
                }
                Some(fx)
            },
            &claims,
        )
    }
}

/// Fails a run whose definition cannot be read.
fn fail_unreadable(run: &mut engine::Run, why: &str) -> engine::Effects {
    let error = serde_json::json!({"message": format!("the workflow definition cannot be read: {why}"),
                                   "step": null, "status": null});
    run.status = engine::RunStatus::Failed;
    run.error = Some(error.clone());
    run.waiting_for = None;
    run.dirty = true;
    engine::Effects {
        events: vec![engine::Event {
            run_id: run.id.clone(),
            kind: "run.failed",
            step: None,
            data: serde_json::json!({"error": error}),
        }],
        requests: Vec::new(),
        task: engine::TaskChange::Delete,
        invocations: Vec::new(),
        signals_taken: Vec::new(),
        spawns: Vec::new(),
        signals_out: Vec::new(),
        cancels_out: Vec::new(),
        finished: true,
    }
}

#[pg_guard]
#[no_mangle]
pub extern "C-unwind" fn dispatched_worker_main(arg: pg_sys::Datum) {
    let me = arg.value() as i32;
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let db = settings::text(&settings::DATABASE);
    BackgroundWorker::connect_worker_to_spi(Some(&db), None);

    if let Some(sh) = shmem::shared() {
        let procno = unsafe { (*pg_sys::MyProc).pgprocno };
        if let Some(slot) = sh.worker_procnos.get(me as usize) {
            slot.store(procno, Ordering::SeqCst);
        }
    }

    let (pipe_r, pipe_w) = bgw::make_pipe("dispatched worker");
    let threads = settings::MAX_CONCURRENT_REQUESTS.get().max(1) as usize;
    let pool = http::Pool::start(threads, limits(), pipe_w);
    log!("dispatched worker {me} started in database \"{db}\" with {threads} HTTP threads");

    let mut w = Worker {
        me,
        defs: Definitions::default(),
        rng: Rng((now_ms() as u64) ^ ((std::process::id() as u64) << 32) | 1),
    };
    // requests handed to the HTTP threads; those that wait for their host are in `fair`
    let mut inflight: usize = 0;
    let mut fair: Fair<http::Job> = Fair::new(settings::per_host_cap());
    let mut pending: Vec<http::Done> = Vec::new();
    let mut said_waiting = false;
    // the extension exists in the database (checked again after any error)
    let mut ready = false;
    // the leases of this worker's previous life were taken back (once, at the start: after a
    // later error the leases under its number are its own requests, still in flight). Until
    // its first claim it has nothing in flight, so a release that failed is tried again.
    let mut took_back = false;
    let mut failures: u32 = 0;
    let mut purger = purge::Purger::default();

    while !BackgroundWorker::sigterm_received() {
        if BackgroundWorker::sighup_received() {
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
            if let Ok(mut l) = pool.limits.write() {
                *l = limits();
            }
            fair.set_cap(settings::per_host_cap());
        }
        bgw::drain(pipe_r);
        while let Ok(d) = pool.done.try_recv() {
            inflight = inflight.saturating_sub(1);
            // the next request waiting for this host takes its place on the wire
            if let Some(next) = fair.done(&origin(&d.req)) {
                if pool.submit(next) {
                    inflight += 1;
                }
            }
            pending.push(d);
        }

        let mut sleep_ms: i64 = MAX_SLEEP_MS;
        if !ready {
            match tx(store::extension_ready) {
                Ok(true) => {
                    // The worker's statements are short and run over and over: compiling them
                    // (JIT, for the large batches' estimated cost) costs more than it saves.
                    // And the worker reads and writes only by key: a batch of 256 ids must
                    // never become a scan of the whole runs table, which the planner picks when
                    // it prices 256 index probes above one sequential pass; nor a hash or
                    // merge join over a whole index, which a kept plan made while a table was
                    // small (just created, truncated or purged) goes on doing as it grows: the
                    // steps update did so, and halved the throughput of a second 20k batch.
                    if let Err(e) = tx(|| {
                        store::exec_once(
                            "SET jit = off; SET enable_seqscan = off; \
                             SET enable_hashjoin = off; SET enable_mergejoin = off",
                        )
                    }) {
                        warning!("dispatched worker {me}: {e}");
                    }
                    // At its start this worker holds nothing in flight: tasks leased under
                    // its number (by its previous life, before a crash or restart) are due
                    // again at once, with the same attempt numbers. Never later: after an
                    // error its leases belong to requests it still has on the wire, and
                    // releasing them would send those requests a second time.
                    if !took_back {
                        match tx(|| store::release_leases(me)) {
                            Ok(n) => {
                                took_back = true;
                                if n > 0 {
                                    log!("dispatched worker {me}: took back {n} tasks leased before a restart");
                                }
                            }
                            Err(e) => warning!("dispatched worker {me}: {e}"),
                        }
                    }
                    ready = true;
                    said_waiting = false;
                }
                Ok(false) | Err(_) => {
                    if !said_waiting {
                        log!("dispatched worker {me}: waiting for CREATE EXTENSION dispatched in database \"{db}\"");
                        said_waiting = true;
                    }
                    bgw::wait(pipe_r, 5_000);
                    continue;
                }
            }
        }

        let mut to_send: Vec<(OutRequest, i32)> = Vec::new();
        let mut busy = false;
        let mut wrote = false;
        if !pending.is_empty() {
            let batch: Vec<http::Done> = std::mem::take(&mut pending);
            match tx(|| w.record(&batch)) {
                Ok(p) => {
                    to_send.extend(p.requests);
                    failures = 0;
                    wrote = true;
                }
                Err(e) => {
                    failures += 1;
                    warning!("dispatched worker {me}: recording {} outcomes failed (try {failures}): {e}", batch.len());
                    if failures < 5 {
                        pending = batch; // try again; until then the tasks stay leased
                    }
                    sleep_ms = 1000 * failures as i64;
                    ready = false;
                }
            }
        }

        let max = settings::MAX_CONCURRENT_REQUESTS.get().max(1) as usize;
        // requests waiting for a busy host take no thread, so they do not stop the worker
        // from claiming other hosts' steps; but they are bounded
        let room = if fair.queued() >= max * WAITING_PER_THREAD {
            0
        } else {
            max.min(pool.threads)
                .saturating_sub(inflight + to_send.len())
        };
        if room > 0 && failures == 0 {
            let limit = room.min(CLAIM_BATCH);
            match tx(|| w.claim_and_run(limit)) {
                Ok(p) => {
                    // from now on it holds leases of its own (the old ones end by themselves)
                    took_back |= p.claimed > 0;
                    busy = p.claimed == limit;
                    wrote |= p.claimed > 0;
                    to_send.extend(p.requests);
                    if let Some(ms) = p.next_due_ms {
                        sleep_ms = ms.clamp(0, MAX_SLEEP_MS);
                    }
                }
                Err(e) => {
                    warning!("dispatched worker {me}: claiming due steps failed: {e}");
                    sleep_ms = 1000;
                    ready = false;
                }
            }
        }

        let now = now_ms();
        for (req, claims) in to_send {
            let host = origin(&req);
            if let Some(job) = fair.offer(&host, http::Job { req, claims }, now) {
                if pool.submit(job) {
                    inflight += 1;
                }
            }
        }
        // a request that waits for its host keeps its task leased
        let waited = fair.waited_since(now - LEASE_RENEW_MS, now);
        if !waited.is_empty() {
            let leases: Vec<(String, i32, i64)> = waited
                .iter()
                .map(|j| {
                    let lease = now + j.req.timeout_ms as i64 + engine::LEASE_MARGIN_MS;
                    (j.req.run_id.clone(), j.claims, lease)
                })
                .collect();
            if let Err(e) = tx(|| store::renew_leases(me, &leases)) {
                warning!(
                    "dispatched worker {me}: renewing the leases of waiting requests failed: {e}"
                );
            }
        }
        if fair.queued() > 0 {
            sleep_ms = sleep_ms.min(LEASE_RENEW_MS);
        }
        if wrote {
            // let autovacuum see the worker's churn
            unsafe { pg_sys::pgstat_report_stat(true) };
        }

        let purge_in_ms = purger.tick(me);
        if busy {
            continue;
        }
        sleep_ms = sleep_ms.min(purge_in_ms);
        if sleep_ms > 0 {
            bgw::wait(pipe_r, sleep_ms);
        }
    }
    log!(
        "dispatched worker {me} stopping ({inflight} requests in flight are left to their leases)"
    );
    if let Some(sh) = shmem::shared() {
        if let Some(slot) = sh.worker_procnos.get(me as usize) {
            slot.store(-1, Ordering::SeqCst);
        }
    }
}
