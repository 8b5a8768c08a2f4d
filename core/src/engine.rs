//! The step state machine: given a run's state and what just happened (it became due, or an
//! attempt ended), what happens next. Pure: the worker loads a [`Run`], calls
//! [`on_due`] or [`on_outcome`], and writes back the run, its dirty steps and the
//! [`Effects`] in one transaction; requests are sent only after that transaction commits.
//!
//! A run walks its steps in order. A step with a request sends attempt 1, 2, ... per the
//! retry rules; then, if it has a wait, waits for its signal. When a step fails for good,
//! every earlier succeeded step with a `compensate` is compensated in reverse order, and the
//! run fails. The run's output is rendered when the last step succeeds.

use crate::definition::{Definition, IdempotencyHeader, Request};
use crate::directives::{self, Directive};
use crate::expr::{self, Context, Rendered};
use crate::hash;
use crate::hosts;
use crate::redact;
use crate::rules::{self, Failure, Next};
use serde_json::{json, Map, Value};

/// Margin added to a request's timeout for the lease of its task: if the worker dies, the
/// task becomes due again this long after the request's deadline.
pub const LEASE_MARGIN_MS: i64 = 15_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunStatus {
    Pending,
    Running,
    Waiting,
    Completed,
    Failed,
    Cancelled,
}

impl RunStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Pending => "pending",
            RunStatus::Running => "running",
            RunStatus::Waiting => "waiting",
            RunStatus::Completed => "completed",
            RunStatus::Failed => "failed",
            RunStatus::Cancelled => "cancelled",
        }
    }
    pub fn parse(s: &str) -> Option<RunStatus> {
        Some(match s {
            "pending" => RunStatus::Pending,
            "running" => RunStatus::Running,
            "waiting" => RunStatus::Waiting,
            "completed" => RunStatus::Completed,
            "failed" => RunStatus::Failed,
            "cancelled" => RunStatus::Cancelled,
            _ => return None,
        })
    }
    pub fn finished(self) -> bool {
        matches!(
            self,
            RunStatus::Completed | RunStatus::Failed | RunStatus::Cancelled
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepStatus {
    Pending,
    Running,
    Waiting,
    Succeeded,
    Failed,
    Compensated,
}

impl StepStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            StepStatus::Pending => "pending",
            StepStatus::Running => "running",
            StepStatus::Waiting => "waiting",
            StepStatus::Succeeded => "succeeded",
            StepStatus::Failed => "failed",
            StepStatus::Compensated => "compensated",
        }
    }
    pub fn parse(s: &str) -> Option<StepStatus> {
        Some(match s {
            "pending" => StepStatus::Pending,
            "running" => StepStatus::Running,
            "waiting" => StepStatus::Waiting,
            "succeeded" => StepStatus::Succeeded,
            "failed" => StepStatus::Failed,
            "compensated" => StepStatus::Compensated,
            _ => return None,
        })
    }
}

/// Where a step (or its compensation) is within its status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// an attempt is on the wire (or was, when its worker died)
    Request,
    /// waiting to send the next attempt
    Backoff,
    /// waiting for a signal
    Wait,
    /// waiting for a child run started with `mode=attach`
    Child,
    Done,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Request => "request",
            Phase::Backoff => "backoff",
            Phase::Wait => "wait",
            Phase::Child => "child",
            Phase::Done => "done",
        }
    }
    pub fn parse(s: &str) -> Option<Phase> {
        Some(match s {
            "request" => Phase::Request,
            "backoff" => Phase::Backoff,
            "wait" => Phase::Wait,
            "child" => Phase::Child,
            "done" => Phase::Done,
            _ => return None,
        })
    }
}

/// The stored state of one step of a run.
#[derive(Debug, Clone, PartialEq)]
pub struct StepRec {
    pub status: StepStatus,
    pub phase: Phase,
    pub attempt: u32,
    pub response: Option<Value>,
    pub signal: Option<Value>,
    pub error: Option<Value>,
    pub wait_deadline_ms: Option<i64>,
    /// invocation id of the attempt in flight (step or compensation)
    pub invocation: Option<String>,
    pub comp_attempt: u32,
    pub comp_phase: Option<Phase>,
    /// the child run this step waits for
    pub child: Option<String>,
    /// the row exists in the table (loaded); a new record is inserted, a stored one updated
    pub stored: bool,
    pub finished: bool,
    pub dirty: bool,
}

impl StepRec {
    fn new() -> StepRec {
        StepRec {
            status: StepStatus::Pending,
            phase: Phase::Request,
            attempt: 0,
            response: None,
            signal: None,
            error: None,
            wait_deadline_ms: None,
            invocation: None,
            comp_attempt: 0,
            comp_phase: None,
            child: None,
            stored: false,
            finished: false,
            dirty: true,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct BufferedSignal {
    pub id: i64,
    pub name: String,
    pub data: Option<Value>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ChildState {
    pub id: String,
    pub status: RunStatus,
    pub output: Option<Value>,
    pub error: Option<Value>,
}

/// A run as the worker loaded it.
#[derive(Debug, Clone, PartialEq)]
pub struct Run {
    pub id: String,
    pub tenant: String,
    pub status: RunStatus,
    pub step_index: usize,
    pub compensating: bool,
    pub waiting_for: Option<String>,
    pub input: Value,
    pub output: Option<Value>,
    pub error: Option<Value>,
    pub parent: Option<String>,
    /// one entry per step of the definition; None for steps not reached
    pub steps: Vec<Option<StepRec>>,
    /// buffered signals not taken yet, oldest first
    pub signals: Vec<BufferedSignal>,
    /// the child run the current step waits for, when it does
    pub child: Option<ChildState>,
    pub dirty: bool,
}

/// What an attempt came back with.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Any HTTP answer: headers in order with lower-case names.
    Response {
        status: u16,
        headers: Vec<(String, String)>,
        body: Value,
    },
    /// No usable answer: timeout, network error, or a permanent problem (refused host,
    /// oversized or malformed body).
    Failed { failure: Failure, message: String },
}

impl Outcome {
    /// The Layer 2 form of the outcome (secrets and credential headers redacted).
    pub fn to_log(&self, secrets: &[String]) -> Value {
        match self {
            Outcome::Response {
                status,
                headers,
                body,
            } => {
                let directives: Vec<Value> = headers
                    .iter()
                    .filter(|(n, _)| n.starts_with("dispatched-") || n == "retry-after")
                    .map(|(n, v)| json!([n, redact::redact_str(v, secrets)]))
                    .collect();
                json!({
                    "status": status,
                    "headers": redact::headers_json(headers, secrets),
                    "body": redact::redact_json(body, secrets),
                    "directives": directives,
                })
            }
            Outcome::Failed { failure, message } => json!({
                "error": redact::redact_str(message, secrets),
                "kind": match failure {
                    Failure::Timeout => "timeout",
                    Failure::Network => "network",
                    Failure::Permanent => "permanent",
                    Failure::Status(_) => "status",
                },
            }),
        }
    }

    /// Reads an outcome back from the Layer 2 log (for a request replayed after a crash).
    pub fn from_log(v: &Value) -> Option<Outcome> {
        if let Some(status) = v.get("status").and_then(Value::as_u64) {
            let mut headers: Vec<(String, String)> = Vec::new();
            if let Some(Value::Object(h)) = v.get("headers") {
                for (k, val) in h {
                    if !k.starts_with("dispatched-") && k != "retry-after" {
                        headers.push((k.clone(), val.as_str().unwrap_or_default().to_string()));
                    }
                }
            }
            if let Some(Value::Array(ds)) = v.get("directives") {
                for d in ds {
                    if let (Some(n), Some(val)) = (
                        d.get(0).and_then(Value::as_str),
                        d.get(1).and_then(Value::as_str),
                    ) {
                        headers.push((n.to_string(), val.to_string()));
                    }
                }
            }
            return Some(Outcome::Response {
                status: status as u16,
                headers,
                body: v.get("body").cloned().unwrap_or(Value::Null),
            });
        }
        let message = v.get("error")?.as_str()?.to_string();
        let failure = match v.get("kind").and_then(Value::as_str) {
            Some("timeout") => Failure::Timeout,
            Some("network") => Failure::Network,
            _ => Failure::Permanent,
        };
        Some(Outcome::Failed { failure, message })
    }
}

/// A request to send once the transaction that decided it has committed.
#[derive(Debug, Clone, PartialEq)]
pub struct OutRequest {
    pub run_id: String,
    pub step_idx: usize,
    pub step_id: String,
    pub compensate: bool,
    pub attempt: u32,
    pub method: String,
    pub url: String,
    pub host: String,
    /// the port the URL names, or its scheme's
    pub port: u16,
    pub headers: Vec<(String, String)>,
    pub body: Option<Vec<u8>>,
    pub timeout_ms: u64,
    pub invocation_id: String,
    /// secret values used in the request, to redact from anything shown
    pub secrets: Vec<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub run_id: String,
    pub kind: &'static str,
    pub step: Option<String>,
    pub data: Value,
}

/// The parts of a step's answer that `step.succeeded` shows and the step's `response` keeps.
const ANSWER_KEYS: [&str; 3] = ["status", "headers", "body"];

impl Event {
    /// Stores an answer once: when this is a `step.succeeded` event whose status, headers
    /// and body are exactly the step's stored `response`, takes them out of the event's data
    /// and returns true (the event is then stored with `answer_in_step`, and
    /// `dispatched.events()` puts the step's response back). Anything else (another event, an
    /// answer that differs, e.g. an encrypted body) is left as it is: false.
    pub fn answer_in_step(&mut self, response: Option<&Value>) -> bool {
        if self.kind != "step.succeeded" {
            return false;
        }
        let (Some(Value::Object(resp)), Value::Object(data)) = (response, &mut self.data) else {
            return false;
        };
        let same = resp.len() == ANSWER_KEYS.len()
            && ANSWER_KEYS
                .iter()
                .all(|k| resp.get(*k).is_some() && data.get(*k) == resp.get(*k));
        if same {
            for k in ANSWER_KEYS {
                data.remove(k);
            }
        }
        same
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum TaskChange {
    /// due at this time (epoch ms)
    DueAt(i64),
    /// held by this worker until (epoch ms): a request is on the wire
    Lease(i64),
    /// nothing to do until a signal, a child or a cancel arrives, or the run is finished
    Delete,
}

#[derive(Debug, Clone, PartialEq)]
pub struct InvocationRec {
    pub invocation_id: String,
    pub node_id: String,
    pub attempt: u32,
    pub provider_key: String,
    pub outcome: Value,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Spawn {
    pub id: String,
    pub workflow: String,
    pub input: Value,
    pub attach: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SignalOut {
    pub run: String,
    pub name: String,
    pub data: Option<Value>,
}

/// Everything that follows from one call, for one run.
#[derive(Debug, Clone, PartialEq)]
pub struct Effects {
    pub events: Vec<Event>,
    pub requests: Vec<OutRequest>,
    pub task: TaskChange,
    pub invocations: Vec<InvocationRec>,
    /// buffered signals taken: (signal id, step index)
    pub signals_taken: Vec<(i64, usize)>,
    pub spawns: Vec<Spawn>,
    pub signals_out: Vec<SignalOut>,
    pub cancels_out: Vec<String>,
    /// the run finished in this call
    pub finished: bool,
}

/// What the state machine needs from outside.
pub struct Env<'a> {
    pub now_ms: i64,
    pub default_timeout_ms: u64,
    pub secret: &'a dyn Fn(&str) -> Option<String>,
    /// every secret value, to redact wherever data is shown
    pub all_secrets: &'a [String],
    /// in [0, 1): jitter of backoff
    pub jitter: &'a mut dyn FnMut() -> f64,
    pub new_run_id: &'a mut dyn FnMut() -> String,
    pub workflow_exists: &'a dyn Fn(&str) -> bool,
}

struct M<'r, 'd, 'e, 'a> {
    run: &'r mut Run,
    def: &'d Definition,
    env: &'e mut Env<'a>,
    fx: Effects,
    /// a Dispatched-Delay received with a step that still waits for its signal
    pending_delay: u64,
    /// the answer of a step that succeeds with it, for its step.succeeded event
    pending_response: Option<Value>,
}

/// The run's task became due (start, next step, retry, delay end, signal, wait timeout, or a
/// lease that ran out). `logged` is the Layer 2 outcome of the attempt that was in flight,
/// when one was recorded.
pub fn on_due(run: &mut Run, def: &Definition, env: &mut Env, logged: Option<Outcome>) -> Effects {
    let mut m = M::new(run, def, env);
    m.due(logged);
    m.fx
}

/// An attempt of step `idx` (or of its compensation) ended.
pub fn on_outcome(
    run: &mut Run,
    def: &Definition,
    env: &mut Env,
    idx: usize,
    compensate: bool,
    attempt: u32,
    outcome: Outcome,
) -> Effects {
    let mut m = M::new(run, def, env);
    if m.run.status.finished() {
        m.fx.task = TaskChange::Delete;
        return m.fx;
    }
    if compensate {
        m.comp_outcome(idx, attempt, outcome);
    } else {
        m.step_outcome(idx, attempt, outcome);
    }
    m.fx
}

/// An attempt ended and, when what follows is due at once (the next step, a compensation),
/// goes on to it in the same call: the answer and the next request are recorded together,
/// and the run never goes back through the queue between two steps. Whatever is due later
/// (a backoff, a delay, a wait) is left to the queue.
#[allow(clippy::too_many_arguments)]
pub fn on_outcome_then_due(
    run: &mut Run,
    def: &Definition,
    env: &mut Env,
    idx: usize,
    compensate: bool,
    attempt: u32,
    outcome: Outcome,
) -> Effects {
    let mut fx = on_outcome(run, def, env, idx, compensate, attempt, outcome);
    if let TaskChange::DueAt(at) = fx.task {
        if at <= env.now_ms && !fx.finished && !run.status.finished() {
            let next = on_due(run, def, env, None);
            fx.then(next);
        }
    }
    fx
}

impl Effects {
    /// Appends what a later call on the same run produced; its task change wins.
    pub fn then(&mut self, next: Effects) {
        self.events.extend(next.events);
        self.requests.extend(next.requests);
        self.task = next.task;
        self.invocations.extend(next.invocations);
        self.signals_taken.extend(next.signals_taken);
        self.spawns.extend(next.spawns);
        self.signals_out.extend(next.signals_out);
        self.cancels_out.extend(next.cancels_out);
        self.finished |= next.finished;
    }
}

/// The `steps` object expressions see: `{"<id>": {"response": .., "signal": ..}}`.
pub fn steps_context(run: &Run, def: &Definition) -> Value {
    let mut m = Map::new();
    for (i, s) in def.steps.iter().enumerate() {
        if let Some(Some(rec)) = run.steps.get(i) {
            let mut o = Map::new();
            if let Some(r) = &rec.response {
                o.insert("response".into(), r.clone());
            }
            if let Some(sg) = &rec.signal {
                o.insert("signal".into(), sg.clone());
            }
            m.insert(s.id.clone(), Value::Object(o));
        }
    }
    Value::Object(m)
}

fn error_doc(message: &str, step: Option<&str>, status: Option<u16>) -> Value {
    json!({"message": message, "step": step, "status": status})
}

impl<'r, 'd, 'e, 'a> M<'r, 'd, 'e, 'a> {
    fn new(run: &'r mut Run, def: &'d Definition, env: &'e mut Env<'a>) -> Self {
        if run.steps.len() < def.steps.len() {
            run.steps.resize(def.steps.len(), None);
        }
        M {
            run,
            def,
            env,
            fx: Effects {
                events: Vec::new(),
                requests: Vec::new(),
                task: TaskChange::Delete,
                invocations: Vec::new(),
                signals_taken: Vec::new(),
                spawns: Vec::new(),
                signals_out: Vec::new(),
                cancels_out: Vec::new(),
                finished: false,
            },
            pending_delay: 0,
            pending_response: None,
        }
    }

    fn event(&mut self, kind: &'static str, step: Option<usize>, data: Value) {
        let step = step.map(|i| self.def.steps[i].id.clone());
        self.fx.events.push(Event {
            run_id: self.run.id.clone(),
            kind,
            step,
            data,
        });
    }

    fn set_status(&mut self, s: RunStatus) {
        if self.run.status != s {
            self.run.status = s;
            self.run.dirty = true;
        }
    }

    fn step_mut(&mut self, i: usize) -> &mut StepRec {
        let slot = &mut self.run.steps[i];
        if slot.is_none() {
            *slot = Some(StepRec::new());
        }
        let rec = slot.as_mut().expect("just set");
        rec.dirty = true;
        rec
    }

    fn due(&mut self, logged: Option<Outcome>) {
        if self.run.status.finished() {
            self.fx.task = TaskChange::Delete;
            return;
        }
        let i = self
            .run
            .step_index
            .min(self.def.steps.len().saturating_sub(1));
        if self.run.compensating {
            let (phase, attempt) = match &self.run.steps[i] {
                Some(s) => (s.comp_phase, s.comp_attempt),
                None => (None, 0),
            };
            match phase {
                Some(Phase::Request) => match logged {
                    Some(o) => self.comp_outcome(i, attempt, o),
                    None => self.send(i, true, attempt.max(1)),
                },
                Some(Phase::Backoff) => self.send(i, true, attempt + 1),
                _ => self.next_compensation(i),
            }
            return;
        }
        let Some(rec) = self.run.steps[i].clone() else {
            self.start_step(i);
            return;
        };
        match (rec.status, rec.phase) {
            (StepStatus::Succeeded, _) => self.next_step(i, 0),
            (StepStatus::Running, Phase::Request) => match logged {
                Some(o) => self.step_outcome(i, rec.attempt, o),
                // The worker that sent this attempt died before recording its answer:
                // send the same attempt again (same key, same attempt number).
                None => self.send(i, false, rec.attempt.max(1)),
            },
            (StepStatus::Running, Phase::Backoff) => self.send(i, false, rec.attempt + 1),
            (StepStatus::Waiting, Phase::Wait) => self.check_wait(i),
            (StepStatus::Waiting, Phase::Child) => self.check_child(i),
            (StepStatus::Failed, _) | (StepStatus::Compensated, _) => self.begin_compensation(i),
            _ => self.start_step(i),
        }
    }

    fn start_step(&mut self, i: usize) {
        self.run.step_index = i;
        self.run.waiting_for = None;
        self.run.dirty = true;
        if self.def.steps[i].request.is_some() {
            self.send(i, false, 1);
        } else {
            self.step_mut(i);
            self.enter_wait(i);
        }
    }

    /// Renders and queues attempt `attempt` of step `i` (or of its compensation).
    fn send(&mut self, i: usize, compensate: bool, attempt: u32) {
        let step = &self.def.steps[i];
        let req = if compensate {
            step.compensate.as_ref()
        } else {
            step.request.as_ref()
        };
        let Some(req) = req else {
            // nothing to send: a compensation-less step needs no compensation
            if compensate {
                self.next_compensation(i);
            } else {
                self.enter_wait(i);
            }
            return;
        };
        let built = build_request(self.run, self.def, i, compensate, attempt, req, self.env);
        self.set_status(RunStatus::Running);
        self.run.waiting_for = None;
        match built {
            Ok(out) => {
                let timeout = out.timeout_ms as i64;
                // The Dispatched-* and Idempotency-Key headers are derived from the run, step,
                // attempt and invocation shown here; the event keeps the others.
                let shown: Vec<(String, String)> = out
                    .headers
                    .iter()
                    .filter(|(n, _)| {
                        let n = n.to_ascii_lowercase();
                        !n.starts_with("dispatched-") && n != "idempotency-key"
                    })
                    .cloned()
                    .collect();
                let ev = json!({
                    "attempt": attempt,
                    "method": out.method,
                    "url": redact::redact_str(&out.url, self.env.all_secrets),
                    "headers": redact::headers_json(&shown, &out.secrets),
                    "idempotency_key": header_value(&out.headers, "idempotency-key"),
                    "invocation": out.invocation_id,
                });
                let invocation = out.invocation_id.clone();
                {
                    let rec = self.step_mut(i);
                    if compensate {
                        rec.comp_attempt = attempt;
                        rec.comp_phase = Some(Phase::Request);
                    } else {
                        rec.status = StepStatus::Running;
                        rec.phase = Phase::Request;
                        rec.attempt = attempt;
                    }
                    rec.invocation = Some(invocation);
                }
                self.event(
                    if compensate {
                        "compensation.started"
                    } else {
                        "step.started"
                    },
                    Some(i),
                    redact::redact_json(&ev, self.env.all_secrets),
                );
                self.fx.requests.push(out);
                self.fx.task = TaskChange::Lease(self.env.now_ms + timeout + LEASE_MARGIN_MS);
            }
            Err(message) => {
                let message = redact::redact_str(&message, self.env.all_secrets);
                if compensate {
                    self.step_mut(i).comp_attempt = attempt;
                    self.comp_failed_for_good(i, &message, None);
                } else {
                    self.step_mut(i).attempt = attempt;
                    self.fail_step(i, &message, None);
                }
            }
        }
    }

    fn step_outcome(&mut self, i: usize, attempt: u32, outcome: Outcome) {
        let step = &self.def.steps[i];
        self.log_invocation(i, false, attempt, &outcome);
        match outcome {
            Outcome::Response {
                status,
                headers,
                body,
            } if (200..=299).contains(&status) => {
                let secrets = self.env.all_secrets;
                let response = json!({
                    "status": status,
                    "headers": redact::headers_json(&headers, secrets),
                    "body": redact::redact_json(&body, secrets),
                });
                {
                    let rec = self.step_mut(i);
                    rec.response = Some(response.clone());
                    rec.error = None;
                    rec.invocation = None;
                }
                let shown = json!({"attempt": attempt, "status": status,
                                   "headers": response["headers"], "body": response["body"]});
                let (delay, child) = self.apply_directives(i, &headers);
                if child.is_some() || step.wait.is_some() {
                    // the step goes on waiting: the answer gets an event of its own
                    self.event("step.response", Some(i), shown);
                } else {
                    // the step is done: its answer goes into step.succeeded
                    self.pending_response = Some(shown);
                }
                if let Some(child_id) = child {
                    let rec = self.step_mut(i);
                    rec.status = StepStatus::Waiting;
                    rec.phase = Phase::Child;
                    rec.child = Some(child_id.clone());
                    self.run.waiting_for = Some(format!("child:{child_id}"));
                    self.run.dirty = true;
                    self.set_status(RunStatus::Waiting);
                    self.fx.task = TaskChange::Delete;
                    return;
                }
                if step.wait.is_some() {
                    self.pending_delay = delay;
                    self.enter_wait(i);
                } else {
                    self.succeed(i, delay);
                }
            }
            Outcome::Response {
                status, headers, ..
            } => {
                let retry_after = headers
                    .iter()
                    .find(|(n, _)| n == "retry-after")
                    .and_then(|(_, v)| rules::parse_retry_after(v, self.env.now_ms));
                let message = format!("HTTP {status}");
                self.attempt_failed(
                    i,
                    false,
                    attempt,
                    Failure::Status(status),
                    &message,
                    Some(status),
                    retry_after,
                );
            }
            Outcome::Failed { failure, message } => {
                self.attempt_failed(i, false, attempt, failure, &message, None, None);
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn attempt_failed(
        &mut self,
        i: usize,
        compensate: bool,
        attempt: u32,
        failure: Failure,
        message: &str,
        status: Option<u16>,
        retry_after: Option<u64>,
    ) {
        let message = redact::redact_str(message, self.env.all_secrets);
        let jitter = (self.env.jitter)();
        match rules::after_failure(
            failure,
            attempt,
            self.def.steps[i].retry.as_ref(),
            retry_after,
            jitter,
        ) {
            Next::RetryAfter(ms) => {
                {
                    let rec = self.step_mut(i);
                    if compensate {
                        rec.comp_phase = Some(Phase::Backoff);
                    } else {
                        rec.phase = Phase::Backoff;
                        rec.error = Some(error_doc(&message, None, status));
                    }
                    rec.invocation = None;
                }
                self.event(
                    "step.retry_scheduled",
                    Some(i),
                    json!({"attempt": attempt, "next_attempt": attempt + 1, "delay_ms": ms,
                           "error": message, "status": status, "compensation": compensate}),
                );
                self.set_status(RunStatus::Running);
                self.fx.task = TaskChange::DueAt(self.env.now_ms + ms as i64);
            }
            Next::GiveUp => {
                if compensate {
                    self.comp_failed_for_good(i, &message, status);
                } else {
                    self.fail_step(i, &message, status);
                }
            }
        }
    }

    fn log_invocation(&mut self, i: usize, compensate: bool, attempt: u32, outcome: &Outcome) {
        let Some(inv) = self.run.steps[i]
            .as_ref()
            .and_then(|s| s.invocation.clone())
        else {
            return;
        };
        let step = &self.def.steps[i];
        let node_id = if compensate {
            format!("{}/compensate", step.id)
        } else {
            step.id.clone()
        };
        self.fx.invocations.push(InvocationRec {
            invocation_id: inv,
            node_id,
            attempt: attempt.saturating_sub(1),
            provider_key: provider_key_of(self.run, self.def, i, compensate, self.env),
            outcome: outcome.to_log(self.env.all_secrets),
        });
    }

    /// Applies a successful answer's directives; returns the delay before the next step and
    /// the child run to wait for (mode=attach).
    fn apply_directives(
        &mut self,
        i: usize,
        headers: &[(String, String)],
    ) -> (u64, Option<String>) {
        let (ds, bad) = directives::parse_all(headers);
        for b in bad {
            self.event(
                "directive.invalid",
                Some(i),
                json!({"header": b.header, "value": redact::redact_str(&b.value, self.env.all_secrets), "reason": b.reason}),
            );
        }
        let mut delay = 0u64;
        let mut attach_child = None;
        for d in ds {
            match d {
                Directive::Log { message } => {
                    let message = redact::redact_str(&message, self.env.all_secrets);
                    self.event("log", Some(i), json!({"message": message}));
                }
                Directive::Delay { ms } => delay = delay.max(ms),
                Directive::Cancel { run } => self.fx.cancels_out.push(run),
                Directive::Signal { run, name, data } => {
                    self.fx.signals_out.push(SignalOut { run, name, data })
                }
                Directive::Spawn {
                    workflow,
                    input,
                    attach,
                } => {
                    if !(self.env.workflow_exists)(&workflow) {
                        self.event(
                            "directive.invalid",
                            Some(i),
                            json!({"header": "dispatched-spawn", "value": workflow,
                                   "reason": format!("workflow \"{workflow}\" does not exist")}),
                        );
                        continue;
                    }
                    if attach && attach_child.is_some() {
                        self.event(
                            "directive.invalid",
                            Some(i),
                            json!({"header": "dispatched-spawn", "value": workflow,
                                   "reason": "only one child per step may be attached"}),
                        );
                        continue;
                    }
                    let id = (self.env.new_run_id)();
                    self.event(
                        "child.spawned",
                        Some(i),
                        json!({"child": id, "workflow": workflow, "mode": if attach {"attach"} else {"detach"}}),
                    );
                    if attach {
                        attach_child = Some(id.clone());
                    }
                    self.fx.spawns.push(Spawn {
                        id,
                        workflow,
                        input,
                        attach,
                    });
                }
            }
        }
        (delay, attach_child)
    }

    fn enter_wait(&mut self, i: usize) {
        let Some(wait) = self.def.steps[i].wait.clone() else {
            let delay = std::mem::take(&mut self.pending_delay);
            self.succeed(i, delay);
            return;
        };
        if self.take_signal(i, &wait.signal) {
            return;
        }
        let deadline = wait.timeout_ms.map(|t| self.env.now_ms + t as i64);
        {
            let rec = self.step_mut(i);
            rec.status = StepStatus::Waiting;
            rec.phase = Phase::Wait;
            rec.wait_deadline_ms = deadline;
            rec.invocation = None;
        }
        self.run.waiting_for = Some(wait.signal.clone());
        self.run.dirty = true;
        self.set_status(RunStatus::Waiting);
        self.event(
            "step.waiting",
            Some(i),
            json!({"signal": wait.signal, "timeout_ms": wait.timeout_ms}),
        );
        self.fx.task = match deadline {
            Some(d) => TaskChange::DueAt(d),
            None => TaskChange::Delete,
        };
    }

    /// Takes the oldest buffered signal of that name, if any, and completes the step's wait.
    fn take_signal(&mut self, i: usize, name: &str) -> bool {
        let Some(pos) = self.run.signals.iter().position(|s| s.name == name) else {
            return false;
        };
        let sig = self.run.signals.remove(pos);
        self.fx.signals_taken.push((sig.id, i));
        self.step_mut(i).signal = Some(sig.data.clone().unwrap_or(Value::Null));
        self.run.waiting_for = None;
        self.run.dirty = true;
        let delay = std::mem::take(&mut self.pending_delay);
        self.succeed(i, delay);
        true
    }

    fn check_wait(&mut self, i: usize) {
        let Some(wait) = self.def.steps[i].wait.clone() else {
            self.succeed(i, 0);
            return;
        };
        if self.take_signal(i, &wait.signal) {
            return;
        }
        let deadline = self.run.steps[i].as_ref().and_then(|s| s.wait_deadline_ms);
        match deadline {
            Some(d) if self.env.now_ms >= d => {
                let t = crate::duration::format_ms(wait.timeout_ms.unwrap_or(0));
                self.fail_step(
                    i,
                    &format!("wait for signal \"{}\" timed out after {t}", wait.signal),
                    None,
                );
            }
            Some(d) => self.fx.task = TaskChange::DueAt(d),
            None => self.fx.task = TaskChange::Delete,
        }
    }

    fn check_child(&mut self, i: usize) {
        let Some(child) = self.run.child.clone() else {
            self.fx.task = TaskChange::Delete;
            return;
        };
        match child.status {
            RunStatus::Completed => {
                let out = child.output.clone().unwrap_or(Value::Null);
                {
                    let rec = self.step_mut(i);
                    let mut resp = rec
                        .response
                        .clone()
                        .unwrap_or_else(|| json!({"status": 200, "headers": {}}));
                    resp["body"] = out;
                    rec.response = Some(resp);
                    rec.child = None;
                }
                self.run.waiting_for = None;
                self.run.dirty = true;
                self.event("child.completed", Some(i), json!({"child": child.id}));
                if self.def.steps[i].wait.is_some() {
                    self.enter_wait(i);
                } else {
                    self.succeed(i, 0);
                }
            }
            RunStatus::Failed | RunStatus::Cancelled => {
                let why = child
                    .error
                    .as_ref()
                    .and_then(|e| e.get("message"))
                    .and_then(Value::as_str)
                    .unwrap_or("no message")
                    .to_string();
                self.fail_step(
                    i,
                    &format!("child run {} {}: {why}", child.id, child.status.as_str()),
                    None,
                );
            }
            _ => self.fx.task = TaskChange::Delete,
        }
    }

    fn succeed(&mut self, i: usize, delay_ms: u64) {
        let (attempt, has_signal) = {
            let rec = self.step_mut(i);
            rec.status = StepStatus::Succeeded;
            rec.phase = Phase::Done;
            rec.finished = true;
            rec.invocation = None;
            rec.error = None;
            (rec.attempt, rec.signal.is_some())
        };
        let signal = self.run.steps[i].as_ref().and_then(|s| s.signal.clone());
        let mut data = self
            .pending_response
            .take()
            .unwrap_or_else(|| json!({"attempt": attempt}));
        if has_signal {
            data["signal"] = signal.unwrap_or(Value::Null);
        }
        self.event("step.succeeded", Some(i), data);
        self.next_step(i, delay_ms);
    }

    fn next_step(&mut self, i: usize, delay_ms: u64) {
        if i + 1 >= self.def.steps.len() {
            self.complete();
            return;
        }
        if delay_ms > 0 {
            self.set_status(RunStatus::Running);
            self.run.waiting_for = None;
            self.event("step.delayed", Some(i), json!({"delay_ms": delay_ms}));
            self.fx.task = TaskChange::DueAt(self.env.now_ms + delay_ms as i64);
            return;
        }
        self.start_step(i + 1);
    }

    fn complete(&mut self) {
        let steps = steps_context(self.run, self.def);
        let output = match &self.def.output {
            Some(template) => {
                let no_secret = |_: &str| None;
                let ctx = Context {
                    input: &self.run.input,
                    run_id: &self.run.id,
                    steps: &steps,
                    secret: &no_secret,
                };
                let mut rendered = Rendered::default();
                match expr::render(template, &ctx, &mut rendered) {
                    Ok(v) => v,
                    Err(e) => {
                        self.run.error = Some(error_doc(&format!("output: {}", e.0), None, None));
                        self.finish(RunStatus::Failed);
                        return;
                    }
                }
            }
            None => default_output(self.run, self.def),
        };
        self.run.output = Some(redact::redact_json(&output, self.env.all_secrets));
        self.finish(RunStatus::Completed);
    }

    fn finish(&mut self, status: RunStatus) {
        self.set_status(status);
        self.run.compensating = false;
        self.run.waiting_for = None;
        self.run.dirty = true;
        let data = match status {
            RunStatus::Completed => json!({"output": self.run.output}),
            _ => json!({"error": self.run.error}),
        };
        self.event(
            if status == RunStatus::Completed {
                "run.completed"
            } else {
                "run.failed"
            },
            None,
            data,
        );
        self.fx.task = TaskChange::Delete;
        self.fx.finished = true;
    }

    fn fail_step(&mut self, i: usize, message: &str, status: Option<u16>) {
        let id = self.def.steps[i].id.clone();
        let attempt = {
            let rec = self.step_mut(i);
            rec.status = StepStatus::Failed;
            rec.phase = Phase::Done;
            rec.finished = true;
            rec.invocation = None;
            rec.error = Some(error_doc(message, None, status));
            rec.attempt
        };
        self.event(
            "step.failed",
            Some(i),
            json!({"attempt": attempt, "error": message, "status": status}),
        );
        self.run.error = Some(error_doc(message, Some(&id), status));
        self.run.dirty = true;
        self.begin_compensation(i);
    }

    fn begin_compensation(&mut self, failed: usize) {
        match self.prev_compensable(failed) {
            Some(j) => {
                self.run.compensating = true;
                self.run.step_index = j;
                self.run.dirty = true;
                self.send(j, true, 1);
            }
            None => self.finish(RunStatus::Failed),
        }
    }

    /// The closest succeeded step before `i` that has a compensation.
    fn prev_compensable(&self, i: usize) -> Option<usize> {
        (0..i).rev().find(|&j| {
            self.def.steps[j].compensate.is_some()
                && matches!(&self.run.steps[j], Some(s) if s.status == StepStatus::Succeeded)
        })
    }

    fn next_compensation(&mut self, j: usize) {
        match self.prev_compensable(j) {
            Some(k) => {
                self.run.step_index = k;
                self.run.dirty = true;
                self.send(k, true, 1);
            }
            None => self.finish(RunStatus::Failed),
        }
    }

    fn comp_outcome(&mut self, j: usize, attempt: u32, outcome: Outcome) {
        self.log_invocation(j, true, attempt, &outcome);
        match outcome {
            Outcome::Response { status, .. } if (200..=299).contains(&status) => {
                {
                    let rec = self.step_mut(j);
                    rec.status = StepStatus::Compensated;
                    rec.comp_phase = Some(Phase::Done);
                    rec.invocation = None;
                }
                self.event(
                    "compensation.succeeded",
                    Some(j),
                    json!({"attempt": attempt, "status": status}),
                );
                self.next_compensation(j);
            }
            Outcome::Response {
                status, headers, ..
            } => {
                let retry_after = headers
                    .iter()
                    .find(|(n, _)| n == "retry-after")
                    .and_then(|(_, v)| rules::parse_retry_after(v, self.env.now_ms));
                self.attempt_failed(
                    j,
                    true,
                    attempt,
                    Failure::Status(status),
                    &format!("HTTP {status}"),
                    Some(status),
                    retry_after,
                );
            }
            Outcome::Failed { failure, message } => {
                self.attempt_failed(j, true, attempt, failure, &message, None, None)
            }
        }
    }

    fn comp_failed_for_good(&mut self, j: usize, message: &str, status: Option<u16>) {
        let attempt = {
            let rec = self.step_mut(j);
            rec.comp_phase = Some(Phase::Done);
            rec.invocation = None;
            rec.comp_attempt
        };
        self.event(
            "compensation.failed",
            Some(j),
            json!({"attempt": attempt, "error": message, "status": status}),
        );
        self.next_compensation(j);
    }
}

/// Without an `output` template, a run's output is what its last step produced: the signal
/// data if it waited, else its response body.
pub fn default_output(run: &Run, def: &Definition) -> Value {
    let Some(Some(last)) = run.steps.get(def.steps.len().saturating_sub(1)) else {
        return Value::Null;
    };
    if let Some(s) = &last.signal {
        return s.clone();
    }
    last.response
        .as_ref()
        .and_then(|r| r.get("body").cloned())
        .unwrap_or(Value::Null)
}

fn provider_key_of(run: &Run, def: &Definition, i: usize, compensate: bool, env: &Env) -> String {
    let step = &def.steps[i];
    if !compensate {
        if let Some(pk) = &step.provider_key {
            return pk.clone();
        }
    }
    let req = if compensate {
        step.compensate.as_ref()
    } else {
        step.request.as_ref()
    };
    let Some(req) = req else { return String::new() };
    // a URL without expressions needs no rendering
    let url = if req.url.contains("{{") {
        render_url(run, def, req, env).unwrap_or_default()
    } else {
        req.url.clone()
    };
    let authority = hosts::parse_url(&url)
        .map(|p| p.authority)
        .unwrap_or_default();
    format!("http:{}:{}", req.method, authority)
}

fn render_url(run: &Run, def: &Definition, req: &Request, env: &Env) -> Result<String, String> {
    let steps = steps_context(run, def);
    let ctx = Context {
        input: &run.input,
        run_id: &run.id,
        steps: &steps,
        secret: env.secret,
    };
    let mut rendered = Rendered::default();
    match expr::render_str(&req.url, &ctx, &mut rendered).map_err(|e| e.0)? {
        Value::String(s) => Ok(s),
        other => Err(format!("url: the expression gives {other}, not a string")),
    }
}

fn header_value(headers: &[(String, String)], name: &str) -> Option<String> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.clone())
}

fn as_header_text(v: Value) -> String {
    match v {
        Value::String(s) => s,
        other => other.to_string(),
    }
}

/// Renders the request of attempt `attempt` of step `i` (or of its compensation) with the
/// contract's headers.
pub fn build_request(
    run: &Run,
    def: &Definition,
    i: usize,
    compensate: bool,
    attempt: u32,
    req: &Request,
    env: &Env,
) -> Result<OutRequest, String> {
    let step = &def.steps[i];
    let steps = steps_context(run, def);
    let ctx = Context {
        input: &run.input,
        run_id: &run.id,
        steps: &steps,
        secret: env.secret,
    };
    let mut rendered = Rendered::default();
    let url = match expr::render_str(&req.url, &ctx, &mut rendered).map_err(|e| e.0)? {
        Value::String(s) => s,
        other => return Err(format!("url: the expression gives {other}, not a string")),
    };
    let parts = hosts::parse_url(&url).map_err(|e| format!("url: {e}"))?;
    let mut headers: Vec<(String, String)> = Vec::new();
    for (name, value) in &req.headers {
        let v = expr::render_str(value, &ctx, &mut rendered).map_err(|e| e.0)?;
        let text = as_header_text(v);
        if text.contains(['\r', '\n']) {
            return Err(format!("headers.{name}: the value contains a line break"));
        }
        headers.push((name.clone(), text));
    }
    let mut body = None;
    if let Some(b) = &req.body {
        let v = expr::render(b, &ctx, &mut rendered).map_err(|e| e.0)?;
        let user_type = headers
            .iter()
            .any(|(n, _)| n.eq_ignore_ascii_case("content-type"));
        body = Some(match (&v, user_type) {
            (Value::String(s), true) => s.clone().into_bytes(),
            _ => serde_json::to_vec(&v).map_err(|e| e.to_string())?,
        });
        if !user_type {
            headers.push(("Content-Type".into(), "application/json".into()));
        }
    }
    let provider_key = match (&step.provider_key, compensate) {
        (Some(pk), false) => pk.clone(),
        _ => format!("http:{}:{}", req.method, parts.authority),
    };
    let node_id = if compensate {
        format!("{}/compensate", step.id)
    } else {
        step.id.clone()
    };
    let invocation_id = hash::invocation_id(&run.id, &node_id, attempt - 1, &provider_key);
    let key = if compensate {
        format!("{}/{}/compensate", run.id, step.id)
    } else {
        match step.idempotency_header {
            IdempotencyHeader::Key => format!("{}/{}", run.id, step.id),
            IdempotencyHeader::Invocation => invocation_id.clone(),
        }
    };
    headers.push(("Dispatched-Run".into(), run.id.clone()));
    headers.push(("Dispatched-Step".into(), step.id.clone()));
    headers.push(("Dispatched-Attempt".into(), attempt.to_string()));
    headers.push(("Idempotency-Key".into(), key));
    headers.push(("Dispatched-Invocation".into(), invocation_id.clone()));
    Ok(OutRequest {
        run_id: run.id.clone(),
        step_idx: i,
        step_id: step.id.clone(),
        compensate,
        attempt,
        method: req.method.clone(),
        url,
        host: parts.host,
        port: parts.port,
        headers,
        body,
        timeout_ms: step.timeout_ms.unwrap_or(env.default_timeout_ms),
        invocation_id,
        secrets: rendered.secrets_used.into_iter().collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::definition;

    #[test]
    fn a_step_succeeded_event_leaves_an_answer_equal_to_the_steps_response_to_the_step() {
        let response = json!({"status": 200, "headers": {"a": "b"}, "body": {"ok": true}});
        let event = |kind: &'static str, data: Value| Event {
            run_id: "run_x".into(),
            kind,
            step: Some("s".into()),
            data,
        };
        let mut e = event(
            "step.succeeded",
            json!({"attempt": 2, "duration_ms": 1.5, "status": 200, "headers": {"a": "b"}, "body": {"ok": true}}),
        );
        assert!(e.answer_in_step(Some(&response)));
        assert_eq!(e.data, json!({"attempt": 2, "duration_ms": 1.5}));
        // an answer that differs from the response (an encrypted body), another event, a step
        // without a response, an event without the answer: left whole
        let encrypted = json!({"attempt": 1, "status": 200, "headers": {"a": "b"}, "body": {"$encrypted": "..."}});
        for (kind, data, resp) in [
            ("step.succeeded", encrypted, Some(&response)),
            (
                "step.response",
                json!({"attempt": 1, "status": 200, "headers": {"a": "b"}, "body": {"ok": true}}),
                Some(&response),
            ),
            (
                "step.succeeded",
                json!({"attempt": 1, "status": 200, "headers": {"a": "b"}, "body": {"ok": true}}),
                None,
            ),
            (
                "step.succeeded",
                json!({"attempt": 1, "signal": {"x": 1}}),
                Some(&response),
            ),
        ] {
            let mut e = event(kind, data.clone());
            assert!(!e.answer_in_step(resp), "{kind} {data}");
            assert_eq!(e.data, data);
        }
    }

    fn def(v: Value) -> Definition {
        definition::parse(&v).expect("valid definition")
    }

    fn new_run(def: &Definition, input: Value) -> Run {
        Run {
            id: "run_TESTTESTTEST".into(),
            tenant: "t".into(),
            status: RunStatus::Pending,
            step_index: 0,
            compensating: false,
            waiting_for: None,
            input,
            output: None,
            error: None,
            parent: None,
            steps: vec![None; def.steps.len()],
            signals: vec![],
            child: None,
            dirty: false,
        }
    }

    struct T {
        now: i64,
        ids: u32,
    }

    impl T {
        /// Runs `f` with the test environment: one secret, fixed jitter, numbered child ids.
        fn with_env(&mut self, f: impl FnOnce(&mut Env) -> Effects) -> Effects {
            let secret = |n: &str| (n == "key").then(|| "sk_test_secret".to_string());
            let all = vec!["sk_test_secret".to_string()];
            let mut jitter = || 0.5;
            let ids = &mut self.ids;
            let mut new_id = || {
                *ids += 1;
                format!("run_CHILD{:08}", *ids)
            };
            let exists = |w: &str| w != "nope";
            let mut env = Env {
                now_ms: self.now,
                default_timeout_ms: 30_000,
                secret: &secret,
                all_secrets: &all,
                jitter: &mut jitter,
                new_run_id: &mut new_id,
                workflow_exists: &exists,
            };
            f(&mut env)
        }

        fn due(&mut self, run: &mut Run, d: &Definition, logged: Option<Outcome>) -> Effects {
            self.with_env(|env| on_due(run, d, env, logged))
        }

        fn answer(
            &mut self,
            run: &mut Run,
            d: &Definition,
            req: &OutRequest,
            o: Outcome,
        ) -> Effects {
            self.with_env(|env| {
                on_outcome(run, d, env, req.step_idx, req.compensate, req.attempt, o)
            })
        }
    }

    impl T {
        fn answer_then_due(
            &mut self,
            run: &mut Run,
            d: &Definition,
            req: &OutRequest,
            o: Outcome,
        ) -> Effects {
            self.with_env(|env| {
                on_outcome_then_due(run, d, env, req.step_idx, req.compensate, req.attempt, o)
            })
        }
    }

    #[test]
    fn an_answer_goes_on_to_the_next_step_at_once_but_leaves_backoff_to_the_queue() {
        let d = def(json!({"steps": [
            {"id": "a", "request": {"url": "http://svc/a"}},
            {"id": "b", "request": {"url": "http://svc/b"}}
        ]}));
        let mut run = new_run(&d, json!({}));
        let mut t = T {
            now: 1_000_000,
            ids: 0,
        };
        let fx = t.due(&mut run, &d, None);
        let a = fx.requests[0].clone();
        // a succeeds: b starts in the same call, and the task stays leased
        let fx = t.answer_then_due(&mut run, &d, &a, ok(200, json!({})));
        assert_eq!(kinds(&fx), ["step.succeeded", "step.started"]);
        assert_eq!(fx.invocations.len(), 1);
        assert_eq!(fx.requests.len(), 1);
        assert_eq!(fx.requests[0].step_id, "b");
        assert_eq!(
            fx.task,
            TaskChange::Lease(1_000_000 + 30_000 + LEASE_MARGIN_MS)
        );
        // b answers 503: the retry waits in the queue for its backoff
        let b = fx.requests[0].clone();
        let fx = t.answer_then_due(&mut run, &d, &b, ok(503, json!({})));
        assert!(fx.requests.is_empty());
        assert!(matches!(fx.task, TaskChange::DueAt(at) if at > 1_000_000));
        // the retry succeeds and the run finishes; nothing follows
        let fx = t.due(&mut run, &d, None);
        let b2 = fx.requests[0].clone();
        let fx = t.answer_then_due(&mut run, &d, &b2, ok(200, json!({})));
        assert!(fx.finished && fx.requests.is_empty());
        assert_eq!(fx.task, TaskChange::Delete);
        assert_eq!(run.status, RunStatus::Completed);
    }

    fn ok(status: u16, body: Value) -> Outcome {
        Outcome::Response {
            status,
            headers: vec![("content-type".into(), "application/json".into())],
            body,
        }
    }

    fn header<'a>(r: &'a OutRequest, name: &str) -> &'a str {
        r.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .unwrap_or("")
    }

    fn kinds(fx: &Effects) -> Vec<&'static str> {
        fx.events.iter().map(|e| e.kind).collect()
    }

    #[test]
    fn three_steps_run_in_order_with_the_contract_headers() {
        let d = def(json!({"steps": [
            {"id": "a", "request": {"url": "http://svc:8080/a", "headers": {"Authorization": "Bearer {{ secrets.key }}"},
                                    "body": {"n": "{{ input.n }}"}}},
            {"id": "b", "request": {"method": "GET", "url": "http://svc:8080/b/{{ steps.a.response.body.id }}"}},
            {"id": "c", "request": {"url": "http://svc:8080/c"}, "provider_key": "svc:c"}
        ], "output": {"a": "{{ steps.a.response.body.id }}", "c": "{{ steps.c.response.status }}"}}));
        let mut run = new_run(&d, json!({"n": 5}));
        let mut t = T {
            now: 1_000_000,
            ids: 0,
        };
        let fx = t.due(&mut run, &d, None);
        assert_eq!(fx.requests.len(), 1);
        let r = &fx.requests[0];
        assert_eq!(r.url, "http://svc:8080/a");
        assert_eq!(r.body.as_deref(), Some(br#"{"n":5}"#.as_slice()));
        assert_eq!(header(r, "Dispatched-Run"), "run_TESTTESTTEST");
        assert_eq!(header(r, "Dispatched-Step"), "a");
        assert_eq!(header(r, "Dispatched-Attempt"), "1");
        assert_eq!(header(r, "Idempotency-Key"), "run_TESTTESTTEST/a");
        assert_eq!(header(r, "Authorization"), "Bearer sk_test_secret");
        assert_eq!(
            header(r, "Dispatched-Invocation"),
            hash::invocation_id("run_TESTTESTTEST", "a", 0, "http:POST:svc:8080")
        );
        assert_eq!(
            fx.task,
            TaskChange::Lease(1_000_000 + 30_000 + LEASE_MARGIN_MS)
        );
        assert_eq!(run.status, RunStatus::Running);
        // the step.started event never shows the secret
        let shown = fx.events[0].data.to_string();
        assert!(!shown.contains("sk_test_secret"), "{shown}");
        assert!(shown.contains("[redacted]"), "{shown}");

        let fx = t.answer(
            &mut run,
            &d,
            &fx.requests[0].clone(),
            ok(200, json!({"id": "x1"})),
        );
        assert_eq!(fx.invocations.len(), 1);
        assert_eq!(fx.invocations[0].provider_key, "http:POST:svc:8080");
        let r = &fx.requests[0];
        assert_eq!(
            (r.method.as_str(), r.url.as_str(), r.body.is_none()),
            ("GET", "http://svc:8080/b/x1", true)
        );
        let fx = t.answer(&mut run, &d, &r.clone(), ok(200, json!({})));
        let r = fx.requests[0].clone();
        assert_eq!(
            header(&r, "Dispatched-Invocation"),
            hash::invocation_id("run_TESTTESTTEST", "c", 0, "svc:c")
        );
        let fx = t.answer(&mut run, &d, &r, ok(201, json!({})));
        assert!(fx.finished);
        assert_eq!(fx.task, TaskChange::Delete);
        assert_eq!(run.status, RunStatus::Completed);
        assert_eq!(run.output, Some(json!({"a": "x1", "c": 201})));
        assert_eq!(kinds(&fx), vec!["step.succeeded", "run.completed"]);
    }

    #[test]
    fn a_503_is_retried_with_the_same_key_and_the_next_attempt_number() {
        let d = def(json!({"steps": [{"id": "a", "request": {"url": "http://svc/a"}}]}));
        let mut run = new_run(&d, json!({}));
        let mut t = T { now: 0, ids: 0 };
        let r1 = t.due(&mut run, &d, None).requests[0].clone();
        let fx = t.answer(&mut run, &d, &r1, ok(503, json!({})));
        assert_eq!(fx.task, TaskChange::DueAt(1000));
        assert_eq!(kinds(&fx), vec!["step.retry_scheduled"]);
        t.now = 1000;
        let r2 = t.due(&mut run, &d, None).requests[0].clone();
        assert_eq!(header(&r2, "Dispatched-Attempt"), "2");
        assert_eq!(
            header(&r2, "Idempotency-Key"),
            header(&r1, "Idempotency-Key")
        );
        assert_ne!(
            header(&r2, "Dispatched-Invocation"),
            header(&r1, "Dispatched-Invocation")
        );
        let fx = t.answer(&mut run, &d, &r2, ok(503, json!({})));
        assert_eq!(fx.task, TaskChange::DueAt(3000));
        t.now = 3000;
        let r3 = t.due(&mut run, &d, None).requests[0].clone();
        let fx = t.answer(&mut run, &d, &r3, ok(503, json!({})));
        assert_eq!(run.status, RunStatus::Failed);
        assert_eq!(
            run.error,
            Some(json!({"message": "HTTP 503", "step": "a", "status": 503}))
        );
        assert_eq!(kinds(&fx), vec!["step.failed", "run.failed"]);
    }

    #[test]
    fn permanent_failure_compensates_earlier_steps_in_reverse_order() {
        let d = def(json!({"steps": [
            {"id": "a", "request": {"url": "http://svc/a"}, "compensate": {"url": "http://svc/undo-a"}},
            {"id": "b", "request": {"url": "http://svc/b"}},
            {"id": "c", "request": {"url": "http://svc/c"}, "compensate": {"url": "http://svc/undo-c/{{ steps.c.response.body.id }}"}},
            {"id": "d", "request": {"url": "http://svc/d"}}
        ]}));
        let mut run = new_run(&d, json!({}));
        let mut t = T { now: 0, ids: 0 };
        let mut r = t.due(&mut run, &d, None).requests[0].clone();
        for body in [json!({}), json!({}), json!({"id": "c9"})] {
            r = t.answer(&mut run, &d, &r, ok(200, body)).requests[0].clone();
        }
        assert_eq!(r.step_id, "d");
        let fx = t.answer(&mut run, &d, &r, ok(422, json!({"error": "bad"})));
        let c = fx.requests[0].clone();
        assert_eq!(
            (c.url.as_str(), c.compensate),
            ("http://svc/undo-c/c9", true)
        );
        assert_eq!(
            header(&c, "Idempotency-Key"),
            "run_TESTTESTTEST/c/compensate"
        );
        assert_eq!(kinds(&fx), vec!["step.failed", "compensation.started"]);
        assert_eq!(run.status, RunStatus::Running);
        // a compensation is retried per its step's policy (default for 5xx)
        let fx = t.answer(&mut run, &d, &c, ok(500, json!({})));
        assert_eq!(fx.task, TaskChange::DueAt(1000));
        t.now = 1000;
        let c2 = t.due(&mut run, &d, None).requests[0].clone();
        assert_eq!(
            (c2.step_id.as_str(), c2.attempt, c2.compensate),
            ("c", 2, true)
        );
        let fx = t.answer(&mut run, &d, &c2, ok(200, json!({})));
        let a = fx.requests[0].clone();
        assert_eq!(
            (a.url.as_str(), header(&a, "Idempotency-Key")),
            ("http://svc/undo-a", "run_TESTTESTTEST/a/compensate")
        );
        let fx = t.answer(&mut run, &d, &a, ok(200, json!({})));
        assert_eq!(kinds(&fx), vec!["compensation.succeeded", "run.failed"]);
        assert_eq!(run.status, RunStatus::Failed);
        assert_eq!(
            run.error,
            Some(json!({"message": "HTTP 422", "step": "d", "status": 422}))
        );
        let st: Vec<_> = run
            .steps
            .iter()
            .map(|s| s.as_ref().map(|s| s.status))
            .collect();
        assert_eq!(
            st,
            vec![
                Some(StepStatus::Compensated),
                Some(StepStatus::Succeeded),
                Some(StepStatus::Compensated),
                Some(StepStatus::Failed)
            ]
        );
    }

    #[test]
    fn a_compensation_that_fails_for_good_is_reported_and_the_others_still_run() {
        let d = def(json!({"steps": [
            {"id": "a", "request": {"url": "http://svc/a"}, "compensate": {"url": "http://svc/undo-a"}},
            {"id": "b", "request": {"url": "http://svc/b"}, "compensate": {"url": "http://svc/undo-b"}},
            {"id": "c", "request": {"url": "http://svc/c"}}
        ]}));
        let mut run = new_run(&d, json!({}));
        let mut t = T { now: 0, ids: 0 };
        let mut r = t.due(&mut run, &d, None).requests[0].clone();
        for _ in 0..2 {
            r = t.answer(&mut run, &d, &r, ok(200, json!({}))).requests[0].clone();
        }
        let b = t.answer(&mut run, &d, &r, ok(404, json!({}))).requests[0].clone();
        let fx = t.answer(&mut run, &d, &b, ok(400, json!({})));
        assert_eq!(
            kinds(&fx),
            vec!["compensation.failed", "compensation.started"]
        );
        let a = fx.requests[0].clone();
        let fx = t.answer(&mut run, &d, &a, ok(200, json!({})));
        assert_eq!(kinds(&fx), vec!["compensation.succeeded", "run.failed"]);
        assert_eq!(run.status, RunStatus::Failed);
    }

    #[test]
    fn timeouts_and_network_errors_retry_only_with_a_policy() {
        let d = def(
            json!({"steps": [{"id": "a", "request": {"url": "http://svc/a"}, "timeout": "2s"}]}),
        );
        let mut run = new_run(&d, json!({}));
        let mut t = T { now: 0, ids: 0 };
        let r = t.due(&mut run, &d, None).requests[0].clone();
        assert_eq!(r.timeout_ms, 2000);
        t.answer(
            &mut run,
            &d,
            &r,
            Outcome::Failed {
                failure: Failure::Timeout,
                message: "timed out after 2s".into(),
            },
        );
        assert_eq!(run.status, RunStatus::Failed);
        assert_eq!(
            run.error
                .as_ref()
                .and_then(|e| e.get("message"))
                .and_then(Value::as_str),
            Some("timed out after 2s")
        );

        let d = def(
            json!({"steps": [{"id": "a", "request": {"url": "http://svc/a"}, "retry": {"max_attempts": 2, "initial_interval": "100ms"}}]}),
        );
        let mut run = new_run(&d, json!({}));
        let r = t.due(&mut run, &d, None).requests[0].clone();
        let fx = t.answer(
            &mut run,
            &d,
            &r,
            Outcome::Failed {
                failure: Failure::Network,
                message: "connection refused".into(),
            },
        );
        assert_eq!(fx.task, TaskChange::DueAt(100));
    }

    #[test]
    fn waits_take_buffered_signals_and_time_out() {
        let d = def(json!({"steps": [
            {"id": "job", "request": {"url": "http://svc/job"}, "wait": {"signal": "done", "timeout": "10m"}},
            {"id": "ok", "wait": {"signal": "approve"}}
        ], "output": {"report": "{{ steps.job.signal.url }}", "by": "{{ steps.ok.signal.by }}"}}));
        let mut run = new_run(&d, json!({}));
        let mut t = T { now: 0, ids: 0 };
        let r = t.due(&mut run, &d, None).requests[0].clone();
        let fx = t.answer(&mut run, &d, &r, ok(202, json!({"job_id": 1})));
        assert_eq!(run.status, RunStatus::Waiting);
        assert_eq!(run.waiting_for.as_deref(), Some("done"));
        assert_eq!(fx.task, TaskChange::DueAt(600_000));
        assert_eq!(kinds(&fx), vec!["step.response", "step.waiting"]);
        // a signal for the second step arrives early and is kept; then the awaited one
        run.signals.push(BufferedSignal {
            id: 7,
            name: "approve".into(),
            data: Some(json!({"by": "ann"})),
        });
        run.signals.push(BufferedSignal {
            id: 8,
            name: "done".into(),
            data: Some(json!({"url": "u"})),
        });
        t.now = 5000;
        let fx = t.due(&mut run, &d, None);
        assert_eq!(fx.signals_taken, vec![(8, 0), (7, 1)]);
        assert_eq!(run.status, RunStatus::Completed);
        assert_eq!(run.output, Some(json!({"report": "u", "by": "ann"})));

        let mut run = new_run(&d, json!({}));
        let r = t.due(&mut run, &d, None).requests[0].clone();
        t.answer(&mut run, &d, &r, ok(202, json!({})));
        t.now += 600_000;
        let fx = t.due(&mut run, &d, None);
        assert_eq!(run.status, RunStatus::Failed);
        assert_eq!(
            run.error
                .as_ref()
                .and_then(|e| e.get("message"))
                .and_then(Value::as_str),
            Some("wait for signal \"done\" timed out after 10m")
        );
        assert_eq!(kinds(&fx), vec!["step.failed", "run.failed"]);
    }

    #[test]
    fn a_wait_without_timeout_parks_the_run_without_a_task() {
        let d = def(json!({"steps": [{"id": "w", "wait": {"signal": "go"}}]}));
        let mut run = new_run(&d, json!({}));
        let mut t = T { now: 0, ids: 0 };
        let fx = t.due(&mut run, &d, None);
        assert_eq!(fx.task, TaskChange::Delete);
        assert_eq!(run.status, RunStatus::Waiting);
        // woken without a signal for it: parks again
        assert_eq!(t.due(&mut run, &d, None).task, TaskChange::Delete);
        run.signals.push(BufferedSignal {
            id: 1,
            name: "go".into(),
            data: None,
        });
        t.due(&mut run, &d, None);
        assert_eq!(run.status, RunStatus::Completed);
        assert_eq!(run.output, Some(Value::Null));
    }

    #[test]
    fn a_missing_expression_path_fails_the_step_naming_it() {
        let d = def(json!({"steps": [
            {"id": "a", "request": {"url": "http://svc/a"}},
            {"id": "b", "request": {"url": "http://svc/b", "body": {"x": "{{ steps.a.response.body.x }}"}}}
        ]}));
        let mut run = new_run(&d, json!({}));
        let mut t = T { now: 0, ids: 0 };
        let r = t.due(&mut run, &d, None).requests[0].clone();
        let fx = t.answer(&mut run, &d, &r, ok(200, json!({"y": 1})));
        assert!(fx.requests.is_empty());
        assert_eq!(run.status, RunStatus::Failed);
        assert_eq!(
            run.error,
            Some(
                json!({"message": "steps.a.response.body.x: path does not exist", "step": "b", "status": null})
            )
        );
    }

    #[test]
    fn after_a_crash_the_same_attempt_is_resent_or_the_logged_answer_is_used() {
        let d = def(
            json!({"steps": [{"id": "a", "request": {"url": "http://svc/a"}}, {"id": "b", "request": {"url": "http://svc/b"}}]}),
        );
        let mut run = new_run(&d, json!({}));
        let mut t = T { now: 0, ids: 0 };
        let r1 = t.due(&mut run, &d, None).requests[0].clone();
        // the lease ran out: due again with attempt 1 still in flight
        let again = t.due(&mut run, &d, None).requests[0].clone();
        assert_eq!(again.attempt, 1);
        assert_eq!(
            header(&again, "Idempotency-Key"),
            header(&r1, "Idempotency-Key")
        );
        assert_eq!(again.invocation_id, r1.invocation_id);
        let logged = Outcome::from_log(&ok(200, json!({"v": 1})).to_log(&[]));
        let fx = t.due(&mut run, &d, logged);
        assert_eq!(fx.requests[0].step_id, "b");
        assert_eq!(
            run.steps[0]
                .as_ref()
                .and_then(|s| s.response.clone())
                .map(|r| r["body"].clone()),
            Some(json!({"v": 1}))
        );
    }

    #[test]
    fn directives_log_delay_spawn_and_invalid() {
        let d = def(
            json!({"steps": [{"id": "a", "request": {"url": "http://svc/a"}}, {"id": "b", "request": {"url": "http://svc/b"}}]}),
        );
        let mut run = new_run(&d, json!({}));
        let mut t = T { now: 0, ids: 0 };
        let r = t.due(&mut run, &d, None).requests[0].clone();
        let fx = t.answer(
            &mut run,
            &d,
            &r,
            Outcome::Response {
                status: 200,
                headers: vec![
                    ("dispatched-log".into(), "hello sk_test_secret".into()),
                    ("dispatched-delay".into(), "30s".into()),
                    ("dispatched-spawn".into(), "child; mode=detach".into()),
                    ("dispatched-spawn".into(), "nope".into()),
                    ("dispatched-cancel".into(), "run_other".into()),
                    ("dispatched-signal".into(), "run=run_other; name=go".into()),
                    ("dispatched-delay".into(), "whenever".into()),
                ],
                body: json!("text"),
            },
        );
        assert!(fx.requests.is_empty());
        assert_eq!(fx.task, TaskChange::DueAt(30_000));
        assert_eq!(
            fx.spawns,
            vec![Spawn {
                id: "run_CHILD00000001".into(),
                workflow: "child".into(),
                input: json!({}),
                attach: false
            }]
        );
        assert_eq!(fx.cancels_out, vec!["run_other".to_string()]);
        assert_eq!(
            fx.signals_out,
            vec![SignalOut {
                run: "run_other".into(),
                name: "go".into(),
                data: None
            }]
        );
        let log = fx
            .events
            .iter()
            .find(|e| e.kind == "log")
            .map(|e| e.data.clone());
        assert_eq!(log, Some(json!({"message": "hello [redacted]"})));
        let invalid: Vec<_> = fx
            .events
            .iter()
            .filter(|e| e.kind == "directive.invalid")
            .map(|e| e.data["header"].clone())
            .collect();
        assert_eq!(
            invalid,
            vec![json!("dispatched-delay"), json!("dispatched-spawn")]
        );
        t.now = 30_000;
        assert_eq!(t.due(&mut run, &d, None).requests[0].step_id, "b");
    }

    #[test]
    fn spawn_attach_waits_for_the_child_and_exposes_its_output() {
        let d = def(
            json!({"steps": [{"id": "a", "request": {"url": "http://svc/a"}}], "output": "{{ steps.a.response.body }}"}),
        );
        let mut run = new_run(&d, json!({}));
        let mut t = T { now: 0, ids: 0 };
        let r = t.due(&mut run, &d, None).requests[0].clone();
        let fx = t.answer(
            &mut run,
            &d,
            &r,
            Outcome::Response {
                status: 200,
                headers: vec![("dispatched-spawn".into(), "child; mode=attach".into())],
                body: json!({}),
            },
        );
        assert_eq!(fx.task, TaskChange::Delete);
        assert_eq!(run.status, RunStatus::Waiting);
        assert_eq!(run.waiting_for.as_deref(), Some("child:run_CHILD00000001"));
        run.child = Some(ChildState {
            id: "run_CHILD00000001".into(),
            status: RunStatus::Completed,
            output: Some(json!({"shipped": true})),
            error: None,
        });
        t.due(&mut run, &d, None);
        assert_eq!(run.status, RunStatus::Completed);
        assert_eq!(run.output, Some(json!({"shipped": true})));
    }

    #[test]
    fn layer2_log_round_trip() {
        let o = Outcome::Response {
            status: 429,
            headers: vec![
                ("retry-after".into(), "5".into()),
                ("dispatched-log".into(), "a".into()),
                ("dispatched-log".into(), "b".into()),
                ("x-k".into(), "v".into()),
            ],
            body: json!({"e": 1}),
        };
        let back = Outcome::from_log(&o.to_log(&[])).unwrap();
        match back {
            Outcome::Response {
                status,
                headers,
                body,
            } => {
                assert_eq!(status, 429);
                assert_eq!(body, json!({"e": 1}));
                assert!(headers.contains(&("retry-after".into(), "5".into())));
                assert_eq!(
                    headers
                        .iter()
                        .filter(|(n, _)| n == "dispatched-log")
                        .count(),
                    2
                );
            }
            _ => panic!("not a response"),
        }
        let f = Outcome::Failed {
            failure: Failure::Timeout,
            message: "timed out".into(),
        };
        assert_eq!(Outcome::from_log(&f.to_log(&[])), Some(f));
    }
}
