//! The worker's SQL: claim due tasks, load runs, and write back everything the state machine
//! decided, in a few set-based statements per batch (one statement per table, whatever the
//! number of runs).

use super::deepjson::DeepJsonB;
use dispatched_core::definition::{self, Definition};
use dispatched_core::engine::{
    BufferedSignal, ChildState, Effects, Phase, Run, RunStatus, StepRec, StepStatus, TaskChange,
};
use pgrx::datum::DatumWithOid;
use pgrx::prelude::*;
use pgrx::spi::{OwnedPreparedStatement, SpiClient, SpiTupleTable};
use pgrx::JsonB;
use pgrx::PgOid;
use serde::Serialize;
use serde_json::{json, Value};
use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

pub type Res<T> = Result<T, String>;

fn e(x: pgrx::spi::Error) -> String {
    x.to_string()
}

thread_local! {
    /// The worker's statements, parsed and planned once (SPI_keepplan), by their text.
    static PLANS: RefCell<HashMap<&'static str, OwnedPreparedStatement>> = RefCell::new(HashMap::new());
}

/// Forgets every kept plan (after an error: whatever it was, the next try starts clean).
pub fn forget_plans() {
    PLANS.with(|p| p.borrow_mut().clear());
}

/// Runs one of the worker's statements with a plan kept across transactions: parsing and
/// planning them anew each time cost about as much as running them.
fn run<'c>(
    c: &mut SpiClient<'c>,
    sql: &'static str,
    args: &[DatumWithOid],
) -> Res<SpiTupleTable<'c>> {
    PLANS.with(|p| {
        let mut plans = p.borrow_mut();
        if !plans.contains_key(sql) {
            let oids: Vec<PgOid> = args.iter().map(|a| PgOid::from(a.oid())).collect();
            let plan = c.prepare_mut(sql, &oids).map_err(e)?.keep();
            plans.insert(sql, plan);
        }
        let plan = plans.get(sql).ok_or("no plan")?;
        c.update(plan, None, args).map_err(e)
    })
}

/// Runs a statement and returns its first column as JSON, one value per row.
pub fn rows_json(sql: &'static str, args: &[DatumWithOid]) -> Res<Vec<Value>> {
    Spi::connect_mut(|c| {
        let t = run(c, sql, args)?;
        let mut out = Vec::new();
        for row in t {
            if let Some(DeepJsonB(v)) = row.get::<DeepJsonB>(1).map_err(e)? {
                out.push(v);
            }
        }
        Ok(out)
    })
}

pub fn exec(sql: &'static str, args: &[DatumWithOid]) -> Res<()> {
    Spi::connect_mut(|c| run(c, sql, args).map(|_| ()))
}

/// Runs a statement once, without keeping its plan.
pub fn exec_once(sql: &str) -> Res<()> {
    Spi::connect_mut(|c| c.update(sql, None, &[]).map(|_| ()).map_err(e))
}

/// Like [`rows_json`], for a statement whose text is built at run time (not kept).
pub fn rows_json_once(sql: &str, args: &[DatumWithOid]) -> Res<Vec<Value>> {
    Spi::connect_mut(|c| {
        let t = c.update(sql, None, args).map_err(e)?;
        let mut out = Vec::new();
        for row in t {
            if let Some(DeepJsonB(v)) = row.get::<DeepJsonB>(1).map_err(e)? {
                out.push(v);
            }
        }
        Ok(out)
    })
}

pub fn extension_ready() -> Res<bool> {
    Spi::connect_mut(|c| {
        let t = run(
            c,
            "SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'dispatched')",
            &[],
        )?;
        Ok(t.first().get_one::<bool>().map_err(e)?.unwrap_or(false))
    })
}

/// Claims up to `limit` due tasks for worker `me`, leasing them for `lease_ms`.
/// Returns (run id, claims) pairs.
pub fn claim(me: i32, limit: i64, lease_ms: i64) -> Res<Vec<(String, i32)>> {
    Spi::connect_mut(|c| {
        let t = run(c, "WITH due AS (
                     SELECT t.run_id FROM dispatched.tasks t
                      WHERE t.due_at <= clock_timestamp()
                        AND (t.lease_until IS NULL OR t.lease_until <= clock_timestamp())
                      ORDER BY t.due_at
                      LIMIT $1
                      FOR UPDATE SKIP LOCKED)
                 UPDATE dispatched.tasks t
                    SET lease_owner = $2, lease_until = clock_timestamp() + $3 * interval '1 millisecond',
                        claims = t.claims + 1
                   FROM due
                  WHERE t.run_id = due.run_id
                 RETURNING t.run_id, t.claims", &[limit.into(), me.into(), lease_ms.into()],
            )?;
        let mut out = Vec::with_capacity(t.len());
        for row in t {
            if let (Some(id), Some(claims)) = (
                row.get::<String>(1).map_err(e)?,
                row.get::<i32>(2).map_err(e)?,
            ) {
                out.push((id, claims));
            }
        }
        Ok(out)
    })
}

/// Makes the tasks leased by worker `me` due now (the worker just started: it has nothing
/// in flight). Returns how many.
pub fn release_leases(me: i32) -> Res<i64> {
    let rows = rows_json(
        "WITH r AS (UPDATE dispatched.tasks t SET lease_owner = NULL, lease_until = NULL
                     WHERE t.lease_owner = $1 RETURNING 1)
         SELECT to_jsonb(count(*)) FROM r",
        &[me.into()],
    )?;
    Ok(rows.first().and_then(Value::as_i64).unwrap_or(0))
}

/// Extends the leases of (run id, claims, lease until in epoch ms) still held by worker `me`.
pub fn renew_leases(me: i32, leases: &[(String, i32, i64)]) -> Res<()> {
    let mut rows = Rows::default();
    for (run_id, claims, lease_ms) in leases {
        rows.push(&json!({"run_id": run_id, "claims": claims, "lease_ms": lease_ms}));
    }
    exec(
        "UPDATE dispatched.tasks t SET lease_until = to_timestamp(x.lease_ms / 1000.0)
           FROM json_to_recordset($1::json) AS x(run_id text, claims int, lease_ms bigint)
          WHERE t.run_id = x.run_id AND t.claims = x.claims AND t.lease_owner = $2",
        &[rows.take().into(), me.into()],
    )
}

/// Locks the tasks of these runs and returns their claims counter and lease owner (absent:
/// no task).
pub fn lock_tasks(ids: &[String]) -> Res<HashMap<String, (i32, Option<i32>)>> {
    Spi::connect_mut(|c| {
        let t = run(
            c,
            "SELECT t.run_id, t.claims, t.lease_owner
                   FROM dispatched.tasks t WHERE t.run_id = ANY($1)
                  ORDER BY t.run_id
                    FOR UPDATE",
            &[ids.to_vec().into()],
        )?;
        let mut out = HashMap::with_capacity(t.len());
        for row in t {
            if let (Some(id), Some(claims)) = (
                row.get::<String>(1).map_err(e)?,
                row.get::<i32>(2).map_err(e)?,
            ) {
                out.insert(id, (claims, row.get::<i32>(3).map_err(e)?));
            }
        }
        Ok(out)
    })
}

/// A run as loaded, with what the worker needs besides the state machine's view.
pub struct Loaded {
    pub run: Run,
    pub workflow: String,
    pub version: i32,
    pub logged: Option<Value>,
}

/// Loads runs, with their steps, buffered signals, the child an attached step waits for, and
/// (`with_logged`) the Layer 2 outcome of the attempt each run's current step has on the
/// wire. The caller holds their task rows locked (claimed or `lock_tasks`); `signal` and
/// `cancel_run` lock the task row before the run, so the task lock alone keeps them out.
///
/// Typed columns, one statement per table: building one JSON document per run in SQL and
/// parsing it again cost more than everything else the worker does for a step.
pub fn load_runs(ids: &[String], with_logged: bool) -> Res<Vec<Loaded>> {
    Spi::connect_mut(|c| {
        let mut runs: Vec<Loaded> = Vec::with_capacity(ids.len());
        let mut at: HashMap<String, usize> = HashMap::with_capacity(ids.len());
        let t = run(
            c,
            "SELECT r.id, r.tenant, r.status, r.step_index, r.compensating, r.waiting_for,
                        r.input, r.output, r.error, r.parent, r.workflow, r.version
                   FROM dispatched.runs r WHERE r.id = ANY($1)",
            &[ids.to_vec().into()],
        )?;
        for row in t {
            let id: String = row.get(1).map_err(e)?.unwrap_or_default();
            let status: String = row.get(3).map_err(e)?.unwrap_or_default();
            let Some(status) = RunStatus::parse(&status) else {
                warning!(
                    "dispatched: run {id} has a state the worker cannot read; it is left alone"
                );
                continue;
            };
            at.insert(id.clone(), runs.len());
            runs.push(Loaded {
                run: Run {
                    id,
                    tenant: row.get(2).map_err(e)?.unwrap_or_default(),
                    status,
                    step_index: row.get::<i32>(4).map_err(e)?.unwrap_or(0).max(0) as usize,
                    compensating: row.get(5).map_err(e)?.unwrap_or(false),
                    waiting_for: row.get(6).map_err(e)?,
                    input: row
                        .get::<DeepJsonB>(7)
                        .map_err(e)?
                        .map(|j| j.0)
                        .unwrap_or(Value::Null),
                    output: row.get::<DeepJsonB>(8).map_err(e)?.map(|j| j.0),
                    error: row.get::<DeepJsonB>(9).map_err(e)?.map(|j| j.0),
                    parent: row.get(10).map_err(e)?,
                    steps: Vec::new(),
                    signals: Vec::new(),
                    child: None,
                    dirty: false,
                },
                workflow: row.get(11).map_err(e)?.unwrap_or_default(),
                version: row.get(12).map_err(e)?.unwrap_or(0),
                logged: None,
            });
        }
        if runs.is_empty() {
            return Ok(runs);
        }
        let t = run(
            c,
            "SELECT s.run_id, s.idx, s.status, s.phase, s.attempt, s.response, s.signal, s.error,
                        (extract(epoch FROM s.wait_deadline) * 1000)::bigint, s.invocation,
                        s.comp_attempt, s.comp_phase, s.child
                   FROM dispatched.steps s WHERE s.run_id = ANY($1)",
            &[ids.to_vec().into()],
        )?;
        let mut unreadable: Vec<String> = Vec::new();
        for row in t {
            let run_id: String = row.get(1).map_err(e)?.unwrap_or_default();
            let Some(&k) = at.get(&run_id) else { continue };
            let idx = row.get::<i32>(2).map_err(e)?.unwrap_or(-1);
            let status = row
                .get::<String>(3)
                .map_err(e)?
                .and_then(|x| StepStatus::parse(&x));
            let phase = row
                .get::<String>(4)
                .map_err(e)?
                .and_then(|x| Phase::parse(&x));
            let (Some(status), Some(phase), true) = (status, phase, (0..10_000).contains(&idx))
            else {
                unreadable.push(run_id);
                continue;
            };
            let rec = StepRec {
                status,
                phase,
                attempt: row.get::<i32>(5).map_err(e)?.unwrap_or(0).max(0) as u32,
                response: row.get::<DeepJsonB>(6).map_err(e)?.map(|j| j.0),
                signal: row.get::<DeepJsonB>(7).map_err(e)?.map(|j| j.0),
                error: row.get::<DeepJsonB>(8).map_err(e)?.map(|j| j.0),
                wait_deadline_ms: row.get(9).map_err(e)?,
                invocation: row.get(10).map_err(e)?,
                comp_attempt: row.get::<i32>(11).map_err(e)?.unwrap_or(0).max(0) as u32,
                comp_phase: row
                    .get::<String>(12)
                    .map_err(e)?
                    .and_then(|x| Phase::parse(&x)),
                child: row.get(13).map_err(e)?,
                stored: true,
                finished: false,
                dirty: false,
            };
            let steps = &mut runs[k].run.steps;
            let idx = idx as usize;
            if steps.len() <= idx {
                steps.resize(idx + 1, None);
            }
            steps[idx] = Some(rec);
        }
        let t = run(
            c,
            "SELECT g.run_id, g.id, g.name, g.data FROM dispatched.signals g
                  WHERE g.run_id = ANY($1) AND g.taken_by_step IS NULL ORDER BY g.id",
            &[ids.to_vec().into()],
        )?;
        for row in t {
            let run_id: String = row.get(1).map_err(e)?.unwrap_or_default();
            let Some(&k) = at.get(&run_id) else { continue };
            runs[k].run.signals.push(BufferedSignal {
                id: row.get(2).map_err(e)?.unwrap_or(0),
                name: row.get(3).map_err(e)?.unwrap_or_default(),
                data: row.get::<DeepJsonB>(4).map_err(e)?.map(|j| j.0),
            });
        }
        let children: Vec<String> = runs
            .iter()
            .filter_map(|l| {
                l.run
                    .waiting_for
                    .as_deref()?
                    .strip_prefix("child:")
                    .map(String::from)
            })
            .collect();
        if !children.is_empty() {
            let t = run(c, "SELECT c.id, c.status, c.output, c.error FROM dispatched.runs c WHERE c.id = ANY($1)", &[children.into()],
                )?;
            let mut found: HashMap<String, ChildState> = HashMap::new();
            for row in t {
                let id: String = row.get(1).map_err(e)?.unwrap_or_default();
                let Some(status) = row
                    .get::<String>(2)
                    .map_err(e)?
                    .and_then(|x| RunStatus::parse(&x))
                else {
                    continue;
                };
                found.insert(
                    id.clone(),
                    ChildState {
                        id,
                        status,
                        output: row.get::<DeepJsonB>(3).map_err(e)?.map(|j| j.0),
                        error: row.get::<DeepJsonB>(4).map_err(e)?.map(|j| j.0),
                    },
                );
            }
            for l in runs.iter_mut() {
                let key = l
                    .run
                    .waiting_for
                    .as_deref()
                    .and_then(|w| w.strip_prefix("child:"));
                if let Some(key) = key {
                    l.run.child = found.get(key).cloned();
                }
            }
        }
        if with_logged {
            // the attempt on the wire of each run's current step (or its compensation)
            let mut tenants = Vec::new();
            let mut invs = Vec::new();
            for l in &runs {
                if let Some(Some(s)) = l.run.steps.get(l.run.step_index) {
                    if let Some(inv) = &s.invocation {
                        tenants.push(l.run.tenant.clone());
                        invs.push(inv.clone());
                    }
                }
            }
            if !invs.is_empty() {
                let t = run(
                    c,
                    "SELECT i.tenant, i.invocation_id, i.outcome
                           FROM unnest($1::text[], $2::text[]) AS x(tenant, invocation_id)
                           JOIN dispatched.invocations i
                             ON i.tenant = x.tenant AND i.invocation_id = x.invocation_id",
                    &[tenants.into(), invs.into()],
                )?;
                let mut found: HashMap<(String, String), Value> = HashMap::new();
                for row in t {
                    let tenant: String = row.get(1).map_err(e)?.unwrap_or_default();
                    let inv: String = row.get(2).map_err(e)?.unwrap_or_default();
                    if let Some(DeepJsonB(v)) = row.get::<DeepJsonB>(3).map_err(e)? {
                        found.insert((tenant, inv), v);
                    }
                }
                for l in runs.iter_mut() {
                    let inv = match l.run.steps.get(l.run.step_index) {
                        Some(Some(s)) => s.invocation.clone(),
                        _ => None,
                    };
                    if let Some(inv) = inv {
                        l.logged = found.remove(&(l.run.tenant.clone(), inv));
                    }
                }
            }
        }
        if !unreadable.is_empty() {
            for id in &unreadable {
                warning!("dispatched: run {id} has a step state the worker cannot read; it is left alone");
            }
            runs.retain(|l| !unreadable.contains(&l.run.id));
        }
        Ok(runs)
    })
}

/// Workflow definitions by (name, version), parsed once per worker.
#[derive(Default)]
pub struct Definitions {
    cache: HashMap<(String, i32), Arc<Definition>>,
}

impl Definitions {
    pub fn get(&mut self, name: &str, version: i32) -> Res<Arc<Definition>> {
        if let Some(d) = self.cache.get(&(name.to_string(), version)) {
            return Ok(d.clone());
        }
        let rows = rows_json(
            "SELECT w.definition FROM dispatched.workflows w WHERE w.name = $1 AND w.version = $2",
            &[name.into(), version.into()],
        )?;
        let doc = rows
            .into_iter()
            .next()
            .ok_or_else(|| format!("workflow {name} version {version} not found"))?;
        let def =
            definition::parse(&doc).map_err(|e| format!("workflow {name} v{version}: {e}"))?;
        let def = Arc::new(def);
        self.cache.insert((name.to_string(), version), def.clone());
        Ok(def)
    }
}

/// All secrets, name to value.
pub fn secrets() -> Res<HashMap<String, String>> {
    let rows = rows_json(
        "SELECT jsonb_build_array(s.name, s.value) FROM dispatched.secrets s",
        &[],
    )?;
    Ok(rows
        .into_iter()
        .filter_map(|v| {
            Some((
                v.get(0)?.as_str()?.to_string(),
                v.get(1)?.as_str()?.to_string(),
            ))
        })
        .collect())
}

pub fn workflows_existing(names: &[String]) -> Res<Vec<String>> {
    if names.is_empty() {
        return Ok(Vec::new());
    }
    let rows = rows_json(
        "SELECT DISTINCT to_jsonb(w.name) FROM dispatched.workflows w WHERE w.name = ANY($1)",
        &[names.to_vec().into()],
    )?;
    Ok(rows
        .into_iter()
        .filter_map(|v| v.as_str().map(String::from))
        .collect())
}

/// Rows for one statement, written straight to JSON text from borrowed data (no value tree,
/// no copies), read in SQL with `json_to_recordset($1::json)`: only the jsonb columns inside
/// are parsed into jsonb, not the whole array.
#[derive(Default)]
struct Rows {
    buf: String,
}

impl Rows {
    fn push<T: Serialize>(&mut self, row: &T) {
        self.buf.push(if self.buf.is_empty() { '[' } else { ',' });
        // serializing plain structs and serde_json values into a String cannot fail
        if let Ok(text) = serde_json::to_string(row) {
            self.buf.push_str(&text);
        }
    }

    fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    fn take(&mut self) -> String {
        let mut text = std::mem::take(&mut self.buf);
        text.push(']');
        text
    }
}

#[derive(Serialize)]
struct RunRow<'a> {
    id: &'a str,
    status: &'a str,
    step_index: usize,
    compensating: bool,
    waiting_for: &'a Option<String>,
    output: &'a Option<Value>,
    error: &'a Option<Value>,
    finished: bool,
}

#[derive(Serialize)]
struct StepRow<'a> {
    run_id: &'a str,
    idx: usize,
    step_id: &'a str,
    status: &'a str,
    phase: &'a str,
    attempt: u32,
    response: &'a Option<Value>,
    signal: &'a Option<Value>,
    error: &'a Option<Value>,
    wait_deadline_ms: Option<i64>,
    invocation: &'a Option<String>,
    comp_attempt: u32,
    comp_phase: Option<&'a str>,
    child: &'a Option<String>,
    finished: bool,
}

#[derive(Serialize)]
struct EventRow<'a> {
    run_id: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    step: &'a Option<String>,
    data: &'a Value,
    answer_in_step: bool,
}

#[derive(Serialize)]
struct TaskRow<'a> {
    run_id: &'a str,
    due_ms: Option<i64>,
    lease_ms: Option<i64>,
    lease_owner: Option<i32>,
}

#[derive(Serialize)]
struct InvocationRow<'a> {
    tenant: &'a str,
    invocation_id: &'a str,
    run_id: &'a str,
    node_id: &'a str,
    attempt: u32,
    provider_key: &'a str,
    outcome: &'a Value,
}

#[derive(Serialize)]
struct NotifyRow<'a> {
    id: &'a str,
    status: &'a str,
}

/// Everything to write for a batch.
#[derive(Default)]
pub struct Batch {
    runs: Rows,
    notify: Rows,
    steps: Rows,
    steps_new: Rows,
    events: Rows,
    task_set: Rows,
    task_delete: Vec<String>,
    invocations: Rows,
    signals_taken: Rows,
    spawns: Rows,
    parents: Rows,
    pub signals_out: Vec<(String, String, Option<Value>, String, String)>,
    pub cancels_out: Vec<(String, String, String)>,
    pub finished: bool,
    pub due_now: bool,
    /// something other than sending requests happened (an answer recorded, a signal taken,
    /// a wait timed out, a run finished, ...): the batch must commit synchronously
    pub decided: bool,
}

impl Batch {
    /// `step_ids`: the ids of the run's steps, in order (from its definition). The events'
    /// data is taken out of `fx` (encrypted first where it is large).
    pub fn add(
        &mut self,
        run: &Run,
        step_ids: &[&str],
        fx: &mut Effects,
        me: i32,
        encrypt: &dyn Fn(&mut Value),
    ) {
        let lease_only = !fx.finished
            && fx.invocations.is_empty()
            && fx.signals_taken.is_empty()
            && fx.spawns.is_empty()
            && fx
                .events
                .iter()
                .all(|e| e.kind == "step.started" || e.kind == "compensation.started");
        if !lease_only {
            self.decided = true;
        }
        if run.dirty || fx.finished {
            let finished = run.status.finished();
            self.runs.push(&RunRow {
                id: &run.id,
                status: run.status.as_str(),
                step_index: run.step_index,
                compensating: run.compensating,
                waiting_for: &run.waiting_for,
                output: &run.output,
                error: &run.error,
                finished,
            });
            if finished {
                self.notify.push(&NotifyRow {
                    id: &run.id,
                    status: run.status.as_str(),
                });
            }
        }
        for (i, s) in run.steps.iter().enumerate() {
            let Some(s) = s else { continue };
            if !s.dirty {
                continue;
            }
            let rows = if s.stored {
                &mut self.steps
            } else {
                &mut self.steps_new
            };
            rows.push(&StepRow {
                run_id: &run.id,
                idx: i,
                step_id: step_ids.get(i).copied().unwrap_or(""),
                status: s.status.as_str(),
                phase: s.phase.as_str(),
                attempt: s.attempt,
                response: &s.response,
                signal: &s.signal,
                error: &s.error,
                wait_deadline_ms: s.wait_deadline_ms,
                invocation: &s.invocation,
                comp_attempt: s.comp_attempt,
                comp_phase: s.comp_phase.map(|p| p.as_str()),
                child: &s.child,
                finished: s.finished,
            });
        }
        for ev in fx.events.iter_mut() {
            encrypt(&mut ev.data);
            // a step's answer is stored once, in its step row (unless encrypted here)
            let response = ev
                .step
                .as_deref()
                .and_then(|id| step_ids.iter().position(|s| *s == id))
                .and_then(|i| run.steps.get(i))
                .and_then(|s| s.as_ref())
                .and_then(|s| s.response.as_ref());
            let answer_in_step = ev.answer_in_step(response);
            self.events.push(&EventRow {
                run_id: &ev.run_id,
                kind: ev.kind,
                step: &ev.step,
                data: &ev.data,
                answer_in_step,
            });
        }
        match fx.task {
            TaskChange::DueAt(ms) => self.task_set.push(&TaskRow {
                run_id: &run.id,
                due_ms: Some(ms),
                lease_ms: None,
                lease_owner: None,
            }),
            TaskChange::Lease(ms) => self.task_set.push(&TaskRow {
                run_id: &run.id,
                due_ms: None,
                lease_ms: Some(ms),
                lease_owner: Some(me),
            }),
            TaskChange::Delete => self.task_delete.push(run.id.clone()),
        }
        for inv in &fx.invocations {
            self.invocations.push(&InvocationRow {
                tenant: &run.tenant,
                invocation_id: &inv.invocation_id,
                run_id: &run.id,
                node_id: &inv.node_id,
                attempt: inv.attempt,
                provider_key: &inv.provider_key,
                outcome: &inv.outcome,
            });
        }
        for (id, idx) in &fx.signals_taken {
            self.signals_taken.push(&json!({"id": id, "idx": idx}));
        }
        for sp in &fx.spawns {
            self.spawns.push(&json!({
                "id": sp.id, "tenant": run.tenant, "workflow": sp.workflow, "input": sp.input,
                "parent": run.id, "attach": sp.attach,
            }));
            self.due_now = true;
        }
        for s in &fx.signals_out {
            self.signals_out.push((
                s.run.clone(),
                s.name.clone(),
                s.data.clone(),
                run.tenant.clone(),
                run.id.clone(),
            ));
        }
        for c in &fx.cancels_out {
            self.cancels_out
                .push((c.clone(), run.tenant.clone(), run.id.clone()));
        }
        if fx.finished {
            self.finished = true;
            if let Some(p) = &run.parent {
                self.parents.push(&json!({"parent": p, "child": run.id}));
                self.due_now = true;
            }
        }
    }

    /// Writes the batch: one statement per table.
    ///
    /// A batch that only starts attempts (claims leases and sends requests) commits
    /// asynchronously: if it is lost in a crash, the same attempts are sent again with the same
    /// numbers, which is what a crash with requests in flight does anyway. Any batch that
    /// records an answer or decides anything commits synchronously, before anything is sent
    /// or shown.
    pub fn flush(mut self, invocation_retention_ms: i64) -> Res<Batch> {
        if !self.decided {
            exec("SET LOCAL synchronous_commit TO off", &[])?;
        }
        if !self.runs.is_empty() {
            exec(
                "UPDATE dispatched.runs r
                    SET status = x.status, step_index = x.step_index, compensating = x.compensating,
                        waiting_for = x.waiting_for, output = x.output, error = x.error,
                        updated_at = clock_timestamp(),
                        finished_at = CASE WHEN x.finished THEN clock_timestamp() ELSE r.finished_at END
                   FROM json_to_recordset($1::json) AS x(id text, status text, step_index int, compensating bool,
                        waiting_for text, output jsonb, error jsonb, finished bool)
                  WHERE r.id = x.id",
                &[self.runs.take().into()],
            )?;
        }
        if !self.notify.is_empty() {
            // LISTEN dispatched: one notification per finished run, sent at commit
            exec(
                "SELECT pg_notify('dispatched', jsonb_build_object('run_id', x.id, 'status', x.status)::text)
                   FROM json_to_recordset($1::json) AS x(id text, status text)",
                &[self.notify.take().into()],
            )?;
        }
        if !self.steps_new.is_empty() {
            exec(
                "INSERT INTO dispatched.steps
                        (run_id, idx, step_id, status, phase, attempt, response, signal, error,
                         wait_deadline, invocation, comp_attempt, comp_phase, child,
                         started_at, finished_at, updated_at)
                 SELECT x.run_id, x.idx, x.step_id, x.status, x.phase,
                        x.attempt, x.response, x.signal, x.error,
                        to_timestamp(x.wait_deadline_ms / 1000.0), x.invocation, x.comp_attempt,
                        x.comp_phase, x.child, clock_timestamp(),
                        CASE WHEN x.finished THEN clock_timestamp() END, clock_timestamp()
                   FROM json_to_recordset($1::json) AS x(run_id text, idx int, step_id text, status text,
                        phase text, attempt int, response jsonb, signal jsonb, error jsonb,
                        wait_deadline_ms bigint, invocation text, comp_attempt int, comp_phase text,
                        child text, finished bool)",
                &[self.steps_new.take().into()],
            )?;
        }
        if !self.steps.is_empty() {
            exec(
                "UPDATE dispatched.steps s
                    SET status = x.status, phase = x.phase, attempt = x.attempt,
                        response = x.response, signal = x.signal, error = x.error,
                        wait_deadline = to_timestamp(x.wait_deadline_ms / 1000.0),
                        invocation = x.invocation, comp_attempt = x.comp_attempt,
                        comp_phase = x.comp_phase, child = x.child,
                        finished_at = CASE WHEN x.finished THEN coalesce(s.finished_at, clock_timestamp()) END,
                        updated_at = clock_timestamp()
                   FROM json_to_recordset($1::json) AS x(run_id text, idx int, status text, phase text,
                        attempt int, response jsonb, signal jsonb, error jsonb, wait_deadline_ms bigint,
                        invocation text, comp_attempt int, comp_phase text, child text, finished bool)
                  WHERE s.run_id = x.run_id AND s.idx = x.idx",
                &[self.steps.take().into()],
            )?;
        }
        if !self.spawns.is_empty() {
            exec(
                "WITH x AS (
                     SELECT * FROM json_to_recordset($1::json) AS x(id text, tenant text, workflow text,
                            input jsonb, parent text, attach bool)),
                 ins AS (
                     INSERT INTO dispatched.runs (id, tenant, workflow, version, input, parent)
                     SELECT x.id, x.tenant, x.workflow,
                            (SELECT max(w.version) FROM dispatched.workflows w WHERE w.name = x.workflow),
                            x.input, x.parent
                       FROM x
                     RETURNING id),
                 tsk AS (
                     INSERT INTO dispatched.tasks (run_id, due_at)
                     SELECT ins.id, clock_timestamp() FROM ins)
                 INSERT INTO dispatched.events (run_id, type, data)
                 SELECT x.id, 'run.started',
                        jsonb_build_object('workflow', x.workflow, 'input', x.input, 'parent', x.parent,
                                           'mode', CASE WHEN x.attach THEN 'attach' ELSE 'detach' END)
                   FROM x",
                &[self.spawns.take().into()],
            )?;
        }
        if !self.events.is_empty() {
            exec(
                "INSERT INTO dispatched.events (run_id, type, step, data, answer_in_step)
                 SELECT x.run_id, x.type, x.step, x.data, x.answer_in_step
                   FROM ROWS FROM (json_to_recordset($1::json) AS (run_id text, type text, step text, data jsonb,
                                   answer_in_step bool))
                        WITH ORDINALITY AS x(run_id, type, step, data, answer_in_step, n)
                  ORDER BY x.n",
                &[self.events.take().into()],
            )?;
        }
        if !self.task_set.is_empty() {
            // every run the worker processes holds its task row (claimed or locked)
            exec(
                "UPDATE dispatched.tasks t
                    SET due_at = coalesce(to_timestamp(x.due_ms / 1000.0), t.due_at),
                        lease_owner = x.lease_owner,
                        lease_until = to_timestamp(x.lease_ms / 1000.0)
                   FROM json_to_recordset($1::json) AS x(run_id text, due_ms bigint, lease_ms bigint,
                        lease_owner int)
                  WHERE t.run_id = x.run_id",
                &[self.task_set.take().into()],
            )?;
        }
        if !self.task_delete.is_empty() {
            exec(
                "DELETE FROM dispatched.tasks t WHERE t.run_id = ANY($1)",
                &[std::mem::take(&mut self.task_delete).into()],
            )?;
        }
        if !self.invocations.is_empty() {
            exec(
                "INSERT INTO dispatched.invocations
                        (tenant, invocation_id, run_id, node_id, attempt, provider_key, outcome, expires_at)
                 SELECT x.tenant, x.invocation_id, x.run_id, x.node_id, x.attempt, x.provider_key, x.outcome,
                        clock_timestamp() + $2 * interval '1 millisecond'
                   FROM json_to_recordset($1::json) AS x(tenant text, invocation_id text, run_id text,
                        node_id text, attempt int, provider_key text, outcome jsonb)
                 ON CONFLICT (tenant, invocation_id) DO NOTHING",
                &[self.invocations.take().into(), invocation_retention_ms.into()],
            )?;
        }
        if !self.signals_taken.is_empty() {
            exec(
                "UPDATE dispatched.signals g SET taken_by_step = x.idx
                   FROM json_to_recordset($1::json) AS x(id bigint, idx int)
                  WHERE g.id = x.id",
                &[self.signals_taken.take().into()],
            )?;
        }
        if !self.parents.is_empty() {
            exec(
                "INSERT INTO dispatched.tasks AS t (run_id, due_at)
                 SELECT p.id, clock_timestamp()
                   FROM json_to_recordset($1::json) AS x(parent text, child text)
                   JOIN dispatched.runs p ON p.id = x.parent AND p.waiting_for = 'child:' || x.child
                 ON CONFLICT (run_id) DO UPDATE SET due_at = least(t.due_at, EXCLUDED.due_at)
                    WHERE t.lease_owner IS NULL",
                &[self.parents.take().into()],
            )?;
        }
        for (target, name, data, tenant, from) in &self.signals_out {
            let delivered = rows_json(
                "SELECT to_jsonb(dispatched._deliver_signal($1, $2, $3, NULL, $4))",
                &[
                    target.as_str().into(),
                    name.as_str().into(),
                    data.clone().map(JsonB).into(),
                    tenant.as_str().into(),
                ],
            )?;
            if delivered.first().is_none_or(Value::is_null) {
                invalid_directive(from, "dispatched-signal", target, "no such run")?;
            }
        }
        for (target, tenant, from) in &self.cancels_out {
            let done = rows_json(
                "SELECT to_jsonb(dispatched._cancel_run($1, $2, $3))",
                &[
                    target.as_str().into(),
                    format!("cancelled by run {from}").into(),
                    tenant.as_str().into(),
                ],
            )?;
            if done.first().and_then(Value::as_bool) != Some(true) {
                invalid_directive(
                    from,
                    "dispatched-cancel",
                    target,
                    "no such run, or it is finished",
                )?;
            }
        }
        Ok(self)
    }
}

fn invalid_directive(run: &str, header: &str, value: &str, reason: &str) -> Res<()> {
    exec(
        "INSERT INTO dispatched.events (run_id, type, data) VALUES ($1, 'directive.invalid', $2)",
        &[
            run.into(),
            JsonB(json!({"header": header, "value": value, "reason": reason})).into(),
        ],
    )
}

/// Milliseconds until the next due task or the end of the next lease (None: no task).
pub fn next_due_ms() -> Res<Option<i64>> {
    // Leased tasks have a due time in the past, so both parts read only the start of the
    // due_at index, however many tasks wait further ahead.
    let rows = rows_json(
        "SELECT to_jsonb((extract(epoch FROM (least(
                    (SELECT min(t.due_at) FROM dispatched.tasks t WHERE t.lease_until IS NULL),
                    (SELECT min(t.lease_until) FROM dispatched.tasks t
                      WHERE t.due_at <= clock_timestamp() AND t.lease_until IS NOT NULL))
                - clock_timestamp())) * 1000)::bigint)",
        &[],
    )?;
    Ok(rows.first().and_then(Value::as_i64))
}
