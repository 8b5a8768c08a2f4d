//! The HTTP ingress: an optional background worker (`dispatched.http_port` > 0) that serves
//! the SQL API as JSON over HTTP (CONTRACT.md, "HTTP ingress"), and the dashboard page.
//!
//! Threads: a listener and one thread per connection do all network I/O (`server.rs`); the
//! main thread alone touches Postgres. A connection thread hands its parsed request over a
//! channel and writes a byte to a pipe; the main thread waits on that pipe and its latch
//! (`WaitLatchOrSocket`), answers every queued request, and sends each answer back over the
//! request's own channel. Signals are blocked in the threads.
//!
//! Tenancy: each request runs in its own transaction which first looks up the session
//! token's tenant (tokens are stored as sha256 hashes), then does `SET LOCAL ROLE <tenant>`
//! (`set_config('role', tenant, true)`) and calls the contract's SQL functions. They are
//! `SECURITY DEFINER` and scope everything to `GetOuterUserId()`, which `SET ROLE` changes:
//! so an HTTP request sees exactly what the same role sees in SQL, with no second
//! implementation of the rules. The role is reset when the transaction ends.
//!
//! Layer 1: a POST with `Idempotency-Key` goes through `idempotency_begin` (its own
//! transaction, committed first) and `idempotency_complete` (in the transaction that does
//! the work), with the endpoint `POST /<path>` and the tenant's role. Requests are handled
//! in batches: every request of a batch begins before any executes, so duplicates that are
//! in the server at the same time meet as `in_flight` (409).
//!
//! `attach` never blocks the main thread: a run not finished is parked until the run
//! finishes (a commit that finishes a run sets this worker's latch, see `shmem.rs`) or the
//! timeout passes.

mod server;

use crate::{bgw, settings, shmem};
use dispatched_core::{duration, keys};
use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder, SignalWakeFlags};
use pgrx::datum::DatumWithOid;
use pgrx::pg_sys::panic::CaughtError;
use pgrx::prelude::*;
use pgrx::JsonB;
use serde_json::{json, Value};
use server::{Job, Request, Response};
use sha2::{Digest, Sha256};
use std::collections::HashSet;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{channel, Sender};
use std::time::{Duration, Instant};

/// The dashboard: one HTML file with inline JS and CSS.
const PAGE: &str = include_str!("../../web/dashboard.html");
/// The longest `attach` timeout accepted over HTTP.
const MAX_ATTACH_MS: u64 = 600_000;
/// The longest sleep of the main thread when nothing is pending.
const MAX_SLEEP_MS: i64 = 60_000;

pub fn register() {
    if settings::HTTP_PORT.get() <= 0 {
        return;
    }
    BackgroundWorkerBuilder::new("dispatched ingress")
        .set_type("dispatched ingress")
        .set_library("dispatched")
        .set_function("dispatched_ingress_main")
        .enable_spi_access()
        .set_restart_time(Some(Duration::from_secs(5)))
        .load();
}

// -- session tokens (SQL side) -------------------------------------------------------------

/// A new session token: `dps_` and 43 URL-safe characters from 256 random bits.
#[pg_extern(schema = "dispatched", volatile, parallel_safe)]
fn _new_session_token() -> String {
    let mut bytes = [0u8; 32];
    let ok = unsafe { pg_sys::pg_strong_random(bytes.as_mut_ptr().cast(), bytes.len()) };
    if !ok {
        error!("dispatched: could not generate random bytes for a session token");
    }
    use base64::Engine;
    format!(
        "dps_{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    )
}

/// Hex sha256 of a token: the only form in which tokens are stored.
pub fn token_hash(token: &str) -> String {
    Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Hex sha256 of a session token, as stored in `dispatched.session_tokens`.
#[pg_extern(schema = "dispatched", immutable, parallel_safe)]
fn _session_token_hash(token: &str) -> String {
    token_hash(token)
}

// -- transactions ----------------------------------------------------------------------------

struct DbError {
    code: Option<PgSqlErrorCode>,
    message: String,
}

/// Runs `f` in its own transaction; an ERROR inside is caught, the transaction rolled back
/// and the error returned, so the ingress survives it. `Err` from `f` also rolls back.
fn tx<R>(f: impl FnOnce() -> Result<R, String>) -> Result<R, DbError> {
    unsafe {
        pg_sys::SetCurrentStatementStartTimestamp();
        pg_sys::StartTransactionCommand();
        pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
    }
    let f = AssertUnwindSafe(f);
    let result = PgTryBuilder::new(move || {
        let whole = f;
        match (whole.0)() {
            Ok(r) => {
                unsafe {
                    pg_sys::PopActiveSnapshot();
                    pg_sys::CommitTransactionCommand();
                }
                Ok(r)
            }
            Err(message) => Err(DbError {
                code: None,
                message,
            }),
        }
    })
    .catch_others(|e| {
        Err(match e {
            CaughtError::PostgresError(r)
            | CaughtError::ErrorReport(r)
            | CaughtError::RustPanic { ereport: r, .. } => DbError {
                code: Some(r.sql_error_code()),
                message: r.message().to_string(),
            },
        })
    })
    .execute();
    if result.is_err() {
        unsafe { pg_sys::AbortCurrentTransaction() };
    }
    result
}

/// Runs a statement whose first column is jsonb; the first row's value (None: no row or NULL).
fn q(sql: &str, args: &[DatumWithOid]) -> Result<Option<Value>, String> {
    Spi::connect_mut(|c| {
        let t = c.update(sql, None, args).map_err(|e| e.to_string())?;
        match t.into_iter().next() {
            Some(row) => Ok(row.get::<JsonB>(1).map_err(|e| e.to_string())?.map(|j| j.0)),
            None => Ok(None),
        }
    })
}

fn exec(sql: &str, args: &[DatumWithOid]) -> Result<(), String> {
    Spi::connect_mut(|c| {
        c.update(sql, None, args)
            .map(|_| ())
            .map_err(|e| e.to_string())
    })
}

/// Looks up the token's tenant (None: unknown or revoked token, or its role is gone), then
/// acts as that role until the transaction ends.
fn become_tenant_of(token: &str) -> Result<Option<String>, String> {
    let tenant = q(
        "SELECT to_jsonb(t.tenant) FROM dispatched.session_tokens t
           JOIN pg_catalog.pg_roles r ON r.rolname = t.tenant
          WHERE t.token_hash = $1",
        &[token_hash(token).into()],
    )?;
    let Some(Value::String(tenant)) = tenant else {
        return Ok(None);
    };
    act_as(&tenant)?;
    Ok(Some(tenant))
}

fn act_as(tenant: &str) -> Result<(), String> {
    q(
        "SELECT to_jsonb(pg_catalog.set_config('role', $1, true))",
        &[tenant.into()],
    )?;
    Ok(())
}

fn extension_ready() -> Result<bool, String> {
    Ok(q(
        "SELECT to_jsonb(EXISTS (SELECT 1 FROM pg_catalog.pg_extension WHERE extname = 'dispatched'))",
        &[],
    )?
    .and_then(|v| v.as_bool())
    .unwrap_or(false))
}

// -- routes ----------------------------------------------------------------------------------

#[derive(Debug, Clone)]
enum Route {
    Capabilities,
    List {
        status: Option<String>,
        q: Option<String>,
        limit: i32,
    },
    Start {
        workflow: String,
        input: Value,
        delay: Option<String>,
    },
    Run(String),
    Output(String),
    Attach(String, u64),
    Signal(String, String, Option<Value>),
    Cancel(String, Option<String>),
    Events(String),
}

fn bad(message: impl Into<String>) -> Response {
    Response::error(400, "bad_request", message)
}

fn not_found() -> Response {
    Response::error(404, "not_found", "not found")
}

fn json_body(req: &Request) -> Result<Option<Value>, Response> {
    if req.body.iter().all(|b| b.is_ascii_whitespace()) {
        return Ok(None);
    }
    serde_json::from_slice(&req.body)
        .map(Some)
        .map_err(|e| bad(format!("the body is not JSON: {e}")))
}

fn route(req: &Request) -> Result<Route, Response> {
    let seg: Vec<&str> = req.segments.iter().map(String::as_str).collect();
    let m = req.method.as_str();
    let wrong = |allowed: &str| {
        Response::error(
            405,
            "method_not_allowed",
            format!("{m} is not allowed here; use {allowed}"),
        )
        .with_header("Allow", allowed)
    };
    match seg.as_slice() {
        ["api", "capabilities"] => match m {
            "GET" => Ok(Route::Capabilities),
            _ => Err(wrong("GET")),
        },
        ["api", "runs"] => match m {
            "GET" => {
                let limit = match req.query("limit") {
                    None => 50,
                    Some(l) => match l.parse::<i32>() {
                        Ok(n) if (1..=500).contains(&n) => n,
                        _ => return Err(bad(format!("limit: 1 to 500, not {l:?}"))),
                    },
                };
                let opt = |k: &str| req.query(k).filter(|s| !s.is_empty()).map(String::from);
                Ok(Route::List {
                    status: opt("status"),
                    q: opt("q"),
                    limit,
                })
            }
            "POST" => {
                let body = json_body(req)?.ok_or_else(|| bad("the body is required"))?;
                let Value::Object(o) = body else {
                    return Err(bad("the body must be a JSON object"));
                };
                let workflow = match o.get("workflow") {
                    Some(Value::String(w)) => w.clone(),
                    Some(_) => return Err(bad("workflow: must be a string")),
                    None => return Err(bad("workflow: required")),
                };
                let input = match o.get("input") {
                    None | Some(Value::Null) => json!({}),
                    Some(v) => v.clone(),
                };
                let delay = match o.get("delay") {
                    None | Some(Value::Null) => None,
                    Some(Value::String(d)) => Some(d.clone()),
                    Some(_) => {
                        return Err(bad(
                            "delay: must be a duration string such as \"30s\" or \"5 minutes\"",
                        ))
                    }
                };
                Ok(Route::Start {
                    workflow,
                    input,
                    delay,
                })
            }
            _ => Err(wrong("GET, POST")),
        },
        ["api", "runs", id] => match m {
            "GET" => Ok(Route::Run(id.to_string())),
            _ => Err(wrong("GET")),
        },
        ["api", "runs", id, "output"] => match m {
            "GET" => Ok(Route::Output(id.to_string())),
            _ => Err(wrong("GET")),
        },
        ["api", "runs", id, "events"] => match m {
            "GET" => Ok(Route::Events(id.to_string())),
            _ => Err(wrong("GET")),
        },
        ["api", "runs", id, "attach"] => match m {
            "GET" => {
                let t = req.query("timeout").unwrap_or("30s");
                let ms = duration::parse_ms(t).map_err(|e| bad(format!("timeout: {}", e.0)))?;
                if ms > MAX_ATTACH_MS {
                    return Err(bad(format!(
                        "timeout: at most {} over HTTP",
                        duration::format_ms(MAX_ATTACH_MS)
                    )));
                }
                Ok(Route::Attach(id.to_string(), ms))
            }
            _ => Err(wrong("GET")),
        },
        ["api", "runs", id, "signal", name] => match m {
            "POST" => Ok(Route::Signal(
                id.to_string(),
                name.to_string(),
                json_body(req)?,
            )),
            _ => Err(wrong("POST")),
        },
        ["api", "runs", id, "cancel"] => match m {
            "POST" => {
                let reason = match json_body(req)? {
                    None => None,
                    Some(Value::Object(o)) => match o.get("reason") {
                        None | Some(Value::Null) => None,
                        Some(Value::String(r)) => Some(r.clone()),
                        Some(_) => return Err(bad("reason: must be a string")),
                    },
                    Some(_) => return Err(bad("the body must be a JSON object")),
                };
                Ok(Route::Cancel(id.to_string(), reason))
            }
            _ => Err(wrong("POST")),
        },
        _ => Err(Response::error(
            404,
            "not_found",
            format!("no such endpoint: {} {}", m, req.path),
        )),
    }
}

// -- handlers (inside the tenant's transaction) ----------------------------------------------

/// What a handler gives: an answer now, or an attach to park until the run finishes.
enum Outcome {
    Now(Response),
    Park(String, Instant),
}

fn run_visible(id: &str) -> Result<bool, String> {
    Ok(q(
        "SELECT to_jsonb(dispatched.run($1) IS NOT NULL)",
        &[id.into()],
    )?
    .and_then(|v| v.as_bool())
    .unwrap_or(false))
}

/// `output` over HTTP: 200 with the output (or the error document of a failed or cancelled
/// run), 202 not ready, 404 not found.
fn output_response(id: &str) -> Result<Response, String> {
    let v = q(
        "SELECT jsonb_build_object('status', dispatched.run($1) ->> 'status', 'output', dispatched.output($1))",
        &[id.into()],
    )?
    .unwrap_or(Value::Null);
    Ok(match v.get("status").and_then(Value::as_str) {
        None => not_found(),
        Some("completed" | "failed" | "cancelled") => {
            Response::json(200, v.get("output").unwrap_or(&Value::Null))
        }
        Some(_) => Response::json(202, &json!({"message": "not ready"})),
    })
}

fn handle(route: &Route, key: Option<&str>) -> Result<Outcome, String> {
    let r = match route {
        Route::Capabilities => Response::json(
            200,
            &q("SELECT dispatched.capabilities()", &[])?.unwrap_or(Value::Null),
        ),
        Route::List {
            status,
            q: text,
            limit,
        } => Response::json(
            200,
            &q(
                "SELECT dispatched.list_runs($1, $2, $3)",
                &[status.clone().into(), text.clone().into(), (*limit).into()],
            )?
            .unwrap_or(Value::Null),
        ),
        Route::Start {
            workflow,
            input,
            delay,
        } => {
            let id = q(
                "SELECT to_jsonb(dispatched.start_run($1, $2, $3, $4::interval))",
                &[
                    workflow.as_str().into(),
                    JsonB(input.clone()).into(),
                    key.into(),
                    delay.clone().into(),
                ],
            )?
            .and_then(|v| v.as_str().map(String::from))
            .ok_or("start_run returned no run id")?;
            Response::json(201, &json!({"run_id": id}))
                .with_header("Location", format!("/api/runs/{id}"))
        }
        Route::Run(id) => match q("SELECT dispatched.run($1)", &[id.as_str().into()])? {
            Some(doc) => Response::json(200, &doc),
            None => not_found(),
        },
        Route::Output(id) => output_response(id)?,
        Route::Attach(id, ms) => {
            let r = output_response(id)?;
            if r.status == 202 && *ms > 0 {
                return Ok(Outcome::Park(
                    id.clone(),
                    Instant::now() + Duration::from_millis(*ms),
                ));
            }
            r
        }
        Route::Signal(id, name, data) => {
            let delivered = q(
                "SELECT to_jsonb(dispatched.signal($1, $2, $3, $4))",
                &[
                    id.as_str().into(),
                    name.as_str().into(),
                    data.clone().map(JsonB).into(),
                    key.into(),
                ],
            )?
            .and_then(|v| v.as_bool())
            .unwrap_or(false);
            Response::json(202, &json!({"delivered": delivered}))
        }
        Route::Cancel(id, reason) => {
            if !run_visible(id)? {
                not_found()
            } else {
                let cancelled = q(
                    "SELECT to_jsonb(dispatched.cancel_run($1, $2))",
                    &[id.as_str().into(), reason.clone().into()],
                )?
                .and_then(|v| v.as_bool())
                .unwrap_or(false);
                Response::json(200, &json!({"cancelled": cancelled}))
            }
        }
        Route::Events(id) => {
            if !run_visible(id)? {
                not_found()
            } else {
                let events = q(
                    "SELECT coalesce(jsonb_agg(jsonb_build_object('seq', e.seq, 'at', e.at, 'type', e.type,
                                                                  'step', e.step, 'data', e.data) ORDER BY e.seq), '[]')
                       FROM dispatched.events($1) e",
                    &[id.as_str().into()],
                )?
                .unwrap_or(json!([]));
                Response::json(200, &json!({"run_id": id, "events": events}))
            }
        }
    };
    Ok(Outcome::Now(r))
}

fn db_error_response(e: &DbError) -> Response {
    use PgSqlErrorCode::*;
    match e.code {
        Some(
            ERRCODE_INVALID_PARAMETER_VALUE
            | ERRCODE_INVALID_DATETIME_FORMAT
            | ERRCODE_INVALID_TEXT_REPRESENTATION
            | ERRCODE_DATETIME_FIELD_OVERFLOW
            | ERRCODE_INTERVAL_FIELD_OVERFLOW,
        ) => Response::error(400, "invalid_argument", &e.message),
        Some(ERRCODE_UNDEFINED_OBJECT) => Response::error(404, "workflow_not_found", &e.message),
        Some(ERRCODE_NO_DATA_FOUND) => Response::error(404, "not_found", &e.message),
        Some(ERRCODE_UNIQUE_VIOLATION) if e.message.contains("idempotency_key_reused") => {
            Response::error(422, "idempotency_key_reused", &e.message)
        }
        Some(ERRCODE_INSUFFICIENT_PRIVILEGE) => Response::error(403, "forbidden", &e.message),
        _ => {
            warning!("dispatched ingress: {}", e.message);
            Response::error(500, "internal", &e.message)
        }
    }
}

// -- the request cycle -----------------------------------------------------------------------

/// A request that passed routing, authentication and Layer 1, ready to execute.
struct Ready {
    reply: Sender<Response>,
    route: Route,
    tenant: String,
    token: String,
    /// Layer 1: (endpoint, key) of a keyed POST.
    layer1: Option<(String, String)>,
}

struct Parked {
    reply: Sender<Response>,
    token: String,
    run_id: String,
    deadline: Instant,
}

enum Begun {
    Go(String),
    /// An answer without executing: a Layer 1 replay, or a bad request.
    Replay(Response),
    InFlight(i64),
    Unauthorized,
}

fn replay_response(v: &Value) -> Response {
    let status = v
        .get("status")
        .and_then(Value::as_u64)
        .filter(|s| (100..600).contains(s))
        .unwrap_or(200) as u16;
    let mut r = Response::json(status, v.get("body").unwrap_or(&Value::Null));
    if let Some(Value::Object(h)) = v.get("headers") {
        for (k, val) in h {
            if !k.eq_ignore_ascii_case("content-type") && !k.eq_ignore_ascii_case("content-length")
            {
                if let Some(s) = val.as_str() {
                    r = r.with_header(k, s);
                }
            }
        }
    }
    r.with_header("openwop-Idempotent-Replay", "true")
}

/// What phase one needs of a request: its token (Err: 401 at once), its route and Layer 1
/// key (each Err: the answer, given once the token is known to be good).
type Prepared = (
    String,
    Result<Route, Response>,
    Result<Option<(String, String)>, Response>,
);

fn prepare(req: &Request) -> Result<Prepared, Response> {
    let Some(token) = req.header("dispatched-session").filter(|t| !t.is_empty()) else {
        return Err(Response::error(
            401,
            "unauthorized",
            "a Dispatched-Session header with a session token is required",
        ));
    };
    let layer1 = match (req.method.as_str(), req.header("idempotency-key")) {
        ("POST", Some(k)) => match keys::check_key(k) {
            Ok(()) => Ok(Some((
                format!("POST /{}", req.segments.join("/")),
                k.to_string(),
            ))),
            Err(e) => Err(Response::error(400, "invalid_idempotency_key", e)),
        },
        _ => Ok(None),
    };
    Ok((token.to_string(), route(req), layer1))
}

/// Phase one in one transaction: the token, then the route and key, then Layer 1 begin.
fn begin(
    token: &str,
    route: &Result<Route, Response>,
    layer1: &Result<Option<(String, String)>, Response>,
) -> Result<Begun, String> {
    let Some(tenant) = become_tenant_of(token)? else {
        return Ok(Begun::Unauthorized);
    };
    let route = match route {
        Ok(r) => r,
        Err(resp) => return Ok(Begun::Replay(resp.clone())),
    };
    let layer1 = match layer1 {
        Ok(l) => l,
        Err(resp) => return Ok(Begun::Replay(resp.clone())),
    };
    let Some((endpoint, key)) = layer1 else {
        return Ok(Begun::Go(tenant));
    };
    let v = q(
        "SELECT dispatched.idempotency_begin($1, $2)",
        &[endpoint.as_str().into(), key.as_str().into()],
    )?
    .unwrap_or(Value::Null);
    match v.get("state").and_then(Value::as_str) {
        Some("new") => Ok(Begun::Go(tenant)),
        Some("replay") => {
            // A start under a reused key with another workflow or input is not a replay.
            if let Route::Start {
                workflow, input, ..
            } = route
            {
                let run_id = v.pointer("/body/run_id").and_then(Value::as_str);
                if let Some(run_id) = run_id {
                    let doc = q("SELECT dispatched.run($1)", &[run_id.into()])?;
                    let same = doc.as_ref().is_some_and(|d| {
                        d.get("workflow").and_then(Value::as_str) == Some(workflow.as_str())
                            && d.get("input") == Some(input)
                    });
                    if !same {
                        return Ok(Begun::Replay(Response::error(
                            422,
                            "idempotency_key_reused",
                            format!("idempotency_key_reused: key \"{key}\" already started run {run_id} with another workflow or input"),
                        )));
                    }
                }
            }
            Ok(Begun::Replay(replay_response(&v)))
        }
        _ => Ok(Begun::InFlight(
            v.get("retry_after").and_then(Value::as_i64).unwrap_or(1),
        )),
    }
}

fn complete(endpoint: &str, key: &str, r: &Response) -> Result<(), String> {
    let body: Value = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
    let headers: serde_json::Map<String, Value> = r
        .headers
        .iter()
        .filter(|(k, _)| !k.eq_ignore_ascii_case("content-type"))
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect();
    exec(
        "SELECT dispatched.idempotency_complete($1, $2, $3, $4, $5)",
        &[
            endpoint.into(),
            key.into(),
            (r.status as i32).into(),
            JsonB(body).into(),
            JsonB(Value::Object(headers)).into(),
        ],
    )
}

fn handle_batch(jobs: Vec<Job>, parked: &mut Vec<Parked>) {
    match tx(extension_ready) {
        Ok(true) => {}
        _ => {
            for j in jobs {
                let _ = j.reply.send(Response::error(
                    503,
                    "unavailable",
                    "the dispatched extension is not created in dispatched.database yet",
                ));
            }
            return;
        }
    }
    // Phase one: every request authenticates and begins its Layer 1 key.
    let mut ready = Vec::new();
    for job in jobs {
        let (token, route, layer1) = match prepare(&job.req) {
            Ok(x) => x,
            Err(r) => {
                let _ = job.reply.send(r);
                continue;
            }
        };
        let answer = match tx(|| begin(&token, &route, &layer1)) {
            Ok(Begun::Go(tenant)) => {
                let (Ok(route), Ok(layer1)) = (route, layer1) else {
                    // begin answers Go only when both are Ok
                    let _ = job.reply.send(Response::error(500, "internal", "request lost its route"));
                    continue;
                };
                ready.push(Ready {
                    reply: job.reply,
                    route,
                    tenant,
                    token,
                    layer1,
                });
                continue;
            }
            Ok(Begun::Replay(r)) => r,
            Ok(Begun::InFlight(secs)) => Response::json(
                409,
                &json!({"error": "idempotency_in_flight",
                        "message": "a request with this Idempotency-Key is in progress; retry later",
                        "retryAfter": secs}),
            )
            .with_header("Retry-After", secs.to_string()),
            Ok(Begun::Unauthorized) => Response::error(
                401,
                "unauthorized",
                "unknown or revoked session token",
            ),
            Err(e) => db_error_response(&e),
        };
        let _ = job.reply.send(answer);
    }
    // Phase two: execute, and complete the Layer 1 key in the same transaction.
    for r in ready {
        let Ready {
            reply,
            route,
            tenant,
            token,
            layer1,
        } = r;
        let key = layer1.as_ref().map(|(_, k)| k.as_str());
        let result = tx(|| {
            act_as(&tenant)?;
            let out = handle(&route, key)?;
            if let (Some((endpoint, key)), Outcome::Now(resp)) = (&layer1, &out) {
                complete(endpoint, key, resp)?;
            }
            Ok(out)
        });
        match result {
            Ok(Outcome::Now(resp)) => {
                let _ = reply.send(resp);
            }
            Ok(Outcome::Park(run_id, deadline)) => parked.push(Parked {
                reply,
                token,
                run_id,
                deadline,
            }),
            Err(e) => {
                let resp = db_error_response(&e);
                if let Some((endpoint, key)) = &layer1 {
                    // caches a final 4xx, releases the key for 400 and 5xx
                    if let Err(e2) = tx(|| {
                        act_as(&tenant)?;
                        complete(endpoint, key, &resp)
                    }) {
                        warning!(
                            "dispatched ingress: completing idempotency key failed: {}",
                            e2.message
                        );
                    }
                }
                let _ = reply.send(resp);
            }
        }
    }
}

/// Answers parked attaches whose run finished (or vanished) or whose timeout passed.
fn check_parked(parked: &mut Vec<Parked>) {
    if parked.is_empty() {
        return;
    }
    let ids: Vec<String> = parked.iter().map(|p| p.run_id.clone()).collect();
    let done: HashSet<String> = match tx(|| {
        q(
            "SELECT coalesce(jsonb_agg(x), '[]') FROM unnest($1::text[]) x
              WHERE NOT EXISTS (SELECT 1 FROM dispatched.runs r
                                 WHERE r.id = x AND r.status NOT IN ('completed', 'failed', 'cancelled'))",
            &[ids.into()],
        )
    }) {
        Ok(Some(Value::Array(a))) => a
            .into_iter()
            .filter_map(|v| v.as_str().map(String::from))
            .collect(),
        Ok(_) => HashSet::new(),
        Err(e) => {
            warning!(
                "dispatched ingress: checking attached runs failed: {}",
                e.message
            );
            HashSet::new()
        }
    };
    let now = Instant::now();
    let mut keep = Vec::new();
    for p in parked.drain(..) {
        if !done.contains(&p.run_id) && p.deadline > now {
            keep.push(p);
            continue;
        }
        // The token is checked again: a token revoked meanwhile gets no output.
        let resp = match tx(|| match become_tenant_of(&p.token)? {
            Some(_) => output_response(&p.run_id),
            None => Ok(Response::error(
                401,
                "unauthorized",
                "unknown or revoked session token",
            )),
        }) {
            Ok(r) => r,
            Err(e) => db_error_response(&e),
        };
        let _ = p.reply.send(resp);
    }
    *parked = keep;
}

#[pg_guard]
#[no_mangle]
pub extern "C-unwind" fn dispatched_ingress_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let db = settings::text(&settings::DATABASE);
    BackgroundWorker::connect_worker_to_spi(Some(&db), None);

    let host = settings::text(&settings::HTTP_LISTEN);
    let port = settings::HTTP_PORT.get().clamp(0, 65535) as u16;
    let listener = match std::net::TcpListener::bind((host.as_str(), port)) {
        Ok(l) => l,
        Err(e) => {
            // ERROR ends the worker with exit code 1: the postmaster starts it again later.
            error!("dispatched ingress: cannot listen on {host}:{port}: {e}");
        }
    };
    let limits = server::Limits {
        max_connections: settings::HTTP_MAX_CONNECTIONS.get().max(1) as usize,
        read_timeout: Duration::from_millis(
            settings::duration_ms("http_read_timeout")
                .unwrap_or(10_000)
                .max(1),
        ),
        max_body: settings::HTTP_MAX_BODY_BYTES.get().max(1024) as usize,
    };
    let (pipe_r, pipe_w) = bgw::make_pipe("dispatched ingress");
    let (jobs_tx, jobs_rx) = channel::<Job>();
    let started = bgw::with_signals_blocked(|| {
        server::start(listener, limits.clone(), jobs_tx, pipe_w, PAGE)
    });
    if let Err(e) = started {
        error!("dispatched ingress: cannot start the listener thread: {e}");
    }
    if let Some(sh) = shmem::shared() {
        let procno = unsafe { (*pg_sys::MyProc).pgprocno };
        sh.ingress_procno.store(procno, Ordering::SeqCst);
    }
    log!(
        "dispatched ingress listening on {host}:{port} for database \"{db}\" (at most {} connections)",
        limits.max_connections
    );

    let mut parked: Vec<Parked> = Vec::new();
    while !BackgroundWorker::sigterm_received() {
        if BackgroundWorker::sighup_received() {
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
        }
        bgw::drain(pipe_r);
        let mut batch = Vec::new();
        while let Ok(j) = jobs_rx.try_recv() {
            batch.push(j);
        }
        if !batch.is_empty() {
            handle_batch(batch, &mut parked);
        }
        check_parked(&mut parked);
        unsafe { pg_sys::pgstat_report_stat(true) };
        let now = Instant::now();
        let sleep_ms = parked
            .iter()
            .map(|p| p.deadline.saturating_duration_since(now).as_millis() as i64 + 1)
            .min()
            .unwrap_or(MAX_SLEEP_MS)
            .min(MAX_SLEEP_MS);
        bgw::wait(pipe_r, sleep_ms);
    }
    if let Some(sh) = shmem::shared() {
        sh.ingress_procno.store(-1, Ordering::SeqCst);
    }
    for p in parked {
        let _ = p.reply.send(Response::error(
            503,
            "unavailable",
            "the ingress is stopping",
        ));
    }
    log!("dispatched ingress stopping");
}
