//! Workflow definitions: the JSON format, parsed into types and validated as a whole.
//!
//! Every problem is reported with its JSON path (`steps[1].request.url: required`), all of
//! them at once, so a user fixes a definition in one go.

use crate::duration;
use crate::expr::{self, Root, StepPart};
use crate::keys;
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::fmt;

pub const MAX_STEPS: usize = 1000;
pub const MAX_ATTEMPTS: u32 = 1000;
pub const MAX_TIMEOUT_MS: u64 = 24 * 3600 * 1000;
pub const METHODS: [&str; 7] = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"];
/// Request headers the engine sets itself; a definition may not set them.
pub const RESERVED_HEADERS: [&str; 9] = [
    "dispatched-run",
    "dispatched-step",
    "dispatched-attempt",
    "dispatched-invocation",
    "idempotency-key",
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
];

#[derive(Debug, Clone, PartialEq)]
pub struct Definition {
    pub steps: Vec<Step>,
    /// Template of the run's output; `None` means the last step's result.
    pub output: Option<Value>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    pub id: String,
    pub request: Option<Request>,
    pub wait: Option<Wait>,
    pub timeout_ms: Option<u64>,
    pub retry: Option<RetryPolicy>,
    pub compensate: Option<Request>,
    pub provider_key: Option<String>,
    pub idempotency_header: IdempotencyHeader,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdempotencyHeader {
    /// `<run id>/<step id>`, stable across attempts (the default).
    Key,
    /// The Layer 2 invocation id of the attempt.
    Invocation,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub method: String,
    pub url: String,
    pub headers: BTreeMap<String, String>,
    pub body: Option<Value>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    pub max_attempts: u32,
    pub initial_interval_ms: u64,
    pub backoff_coefficient: f64,
    pub max_interval_ms: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Wait {
    pub signal: String,
    pub timeout_ms: Option<u64>,
}

/// One problem in a definition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issue {
    pub path: String,
    pub message: String,
}

impl fmt::Display for Issue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// All problems of a definition, in document order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid(pub Vec<Issue>);

impl fmt::Display for Invalid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.0.iter().map(|i| i.to_string()).collect();
        f.write_str(&parts.join("; "))
    }
}

struct V {
    issues: Vec<Issue>,
}

/// What a template at some place may refer to.
struct Scope<'a> {
    /// Steps that may be referred to, with (has request, has wait).
    steps: &'a [(String, bool, bool)],
    /// Steps at or after this index run later: referring to them is an error.
    visible: usize,
    secrets: bool,
}

impl V {
    fn err(&mut self, path: &str, message: impl Into<String>) {
        self.issues.push(Issue {
            path: path.to_string(),
            message: message.into(),
        });
    }

    fn object<'v>(&mut self, v: &'v Value, path: &str) -> Option<&'v Map<String, Value>> {
        match v {
            Value::Object(m) => Some(m),
            other => {
                self.err(path, format!("must be an object, not {}", kind(other)));
                None
            }
        }
    }

    fn unknown_fields(&mut self, m: &Map<String, Value>, path: &str, allowed: &[&str]) {
        for k in m.keys() {
            if !allowed.contains(&k.as_str()) {
                self.err(
                    &join(path, k),
                    format!("unknown field (allowed: {})", allowed.join(", ")),
                );
            }
        }
    }

    fn string<'v>(&mut self, v: &'v Value, path: &str) -> Option<&'v str> {
        match v {
            Value::String(s) => Some(s),
            other => {
                self.err(path, format!("must be a string, not {}", kind(other)));
                None
            }
        }
    }

    fn duration(&mut self, v: &Value, path: &str, max: u64) -> Option<u64> {
        let s = self.string(v, path)?;
        match duration::parse_ms(s) {
            Ok(0) => {
                self.err(path, "must be longer than 0");
                None
            }
            Ok(ms) if ms > max => {
                self.err(
                    path,
                    format!("must be at most {}", duration::format_ms(max)),
                );
                None
            }
            Ok(ms) => Some(ms),
            Err(e) => {
                self.err(path, e.0);
                None
            }
        }
    }

    fn template(&mut self, s: &str, path: &str, scope: &Scope) {
        let t = match expr::parse_template(s) {
            Ok(t) => t,
            Err(e) => return self.err(path, e.0),
        };
        for e in t.exprs() {
            match &e.root {
                Root::Secret(_) if !scope.secrets => self.err(
                    path,
                    format!(
                        "{}: secrets may only be used in request and compensate",
                        e.text
                    ),
                ),
                Root::Step { id, part } => {
                    match scope.steps.iter().position(|(sid, _, _)| sid == id) {
                        None => self.err(path, format!("{}: no step \"{id}\"", e.text)),
                        Some(i) if i >= scope.visible => self.err(
                            path,
                            format!("{}: step \"{id}\" has not run yet at this point", e.text),
                        ),
                        Some(i) => {
                            let (_, has_request, has_wait) = scope.steps[i];
                            if *part == StepPart::Response && !has_request {
                                self.err(
                                    path,
                                    format!(
                                        "{}: step \"{id}\" has no request, so no response",
                                        e.text
                                    ),
                                );
                            }
                            if *part == StepPart::Signal && !has_wait {
                                self.err(
                                    path,
                                    format!("{}: step \"{id}\" has no wait, so no signal", e.text),
                                );
                            }
                        }
                    }
                }
                _ => {}
            }
        }
    }

    fn templates_in(&mut self, v: &Value, path: &str, scope: &Scope) {
        let mut found = Vec::new();
        expr::walk_strings(v, path, &mut |p, s| {
            found.push((p.to_string(), s.to_string()))
        });
        for (p, s) in found {
            self.template(&s, &p, scope);
        }
    }

    fn request(&mut self, v: &Value, path: &str, scope: &Scope) -> Option<Request> {
        let m = self.object(v, path)?;
        self.unknown_fields(m, path, &["method", "url", "headers", "body"]);
        let method = match m.get("method") {
            None => Some("POST".to_string()),
            Some(mv) => self.string(mv, &join(path, "method")).and_then(|s| {
                let up = s.to_ascii_uppercase();
                if METHODS.contains(&up.as_str()) {
                    Some(up)
                } else {
                    self.err(
                        &join(path, "method"),
                        format!(
                            "unsupported method \"{s}\" (use one of {})",
                            METHODS.join(", ")
                        ),
                    );
                    None
                }
            }),
        };
        let url = match m.get("url") {
            None => {
                self.err(&join(path, "url"), "required");
                None
            }
            Some(uv) => self.string(uv, &join(path, "url")).and_then(|s| {
                let p = join(path, "url");
                self.template(s, &p, scope);
                match check_url(s) {
                    Ok(()) => Some(s.to_string()),
                    Err(e) => {
                        self.err(&p, e);
                        None
                    }
                }
            }),
        };
        let mut headers = BTreeMap::new();
        if let Some(hv) = m.get("headers") {
            let hp = join(path, "headers");
            if let Some(hm) = self.object(hv, &hp) {
                for (name, value) in hm {
                    let p = join(&hp, name);
                    if name.is_empty() || !name.bytes().all(is_token_byte) {
                        self.err(&p, "not a valid header name");
                        continue;
                    }
                    if RESERVED_HEADERS.contains(&name.to_ascii_lowercase().as_str()) {
                        self.err(&p, "set by dispatched itself; a definition may not set it");
                        continue;
                    }
                    if let Some(s) = self.string(value, &p) {
                        if s.contains(['\r', '\n']) {
                            self.err(&p, "header values may not contain line breaks");
                        }
                        self.template(s, &p, scope);
                        headers.insert(name.clone(), s.to_string());
                    }
                }
            }
        }
        let body = m.get("body").cloned();
        if let Some(b) = &body {
            self.templates_in(b, &join(path, "body"), scope);
            if let Some(meth) = &method {
                if meth == "GET" || meth == "HEAD" {
                    self.err(&join(path, "body"), format!("a {meth} request has no body"));
                }
            }
        }
        Some(Request {
            method: method?,
            url: url?,
            headers,
            body,
        })
    }

    fn retry(&mut self, v: &Value, path: &str) -> Option<RetryPolicy> {
        let m = self.object(v, path)?;
        self.unknown_fields(
            m,
            path,
            &[
                "max_attempts",
                "initial_interval",
                "backoff_coefficient",
                "max_interval",
            ],
        );
        let mut ok = true;
        let max_attempts = match m.get("max_attempts") {
            None => 3,
            Some(Value::Number(n))
                if n.as_u64()
                    .is_some_and(|n| (1..=MAX_ATTEMPTS as u64).contains(&n)) =>
            {
                n.as_u64().unwrap_or(3) as u32
            }
            Some(_) => {
                self.err(
                    &join(path, "max_attempts"),
                    format!("must be an integer from 1 to {MAX_ATTEMPTS}"),
                );
                ok = false;
                0
            }
        };
        let initial = match m.get("initial_interval") {
            None => Some(1000),
            Some(iv) => self.duration(iv, &join(path, "initial_interval"), duration::MAX_MS),
        };
        let coefficient = match m.get("backoff_coefficient") {
            None => Some(2.0),
            Some(Value::Number(n)) if n.as_f64().is_some_and(|f| (1.0..=100.0).contains(&f)) => {
                n.as_f64()
            }
            Some(_) => {
                self.err(
                    &join(path, "backoff_coefficient"),
                    "must be a number from 1.0 to 100.0",
                );
                None
            }
        };
        let max_interval = match m.get("max_interval") {
            None => initial.map(|i| (i.saturating_mul(100)).min(duration::MAX_MS)),
            Some(mv) => self.duration(mv, &join(path, "max_interval"), duration::MAX_MS),
        };
        if let (Some(i), Some(mx)) = (initial, max_interval) {
            if mx < i {
                self.err(
                    &join(path, "max_interval"),
                    "must not be shorter than initial_interval",
                );
                ok = false;
            }
        }
        if !ok {
            return None;
        }
        Some(RetryPolicy {
            max_attempts,
            initial_interval_ms: initial?,
            backoff_coefficient: coefficient?,
            max_interval_ms: max_interval?,
        })
    }

    fn wait(&mut self, v: &Value, path: &str) -> Option<Wait> {
        let m = self.object(v, path)?;
        self.unknown_fields(m, path, &["signal", "timeout"]);
        let signal =
            match m.get("signal") {
                None => {
                    self.err(&join(path, "signal"), "required");
                    None
                }
                Some(sv) => self.string(sv, &join(path, "signal")).and_then(|s| {
                    match keys::check_name("signal name", s, true) {
                        Ok(()) => Some(s.to_string()),
                        Err(e) => {
                            self.err(&join(path, "signal"), e);
                            None
                        }
                    }
                }),
            };
        let timeout_ms = match m.get("timeout") {
            None => None,
            Some(tv) => Some(self.duration(tv, &join(path, "timeout"), duration::MAX_MS)?),
        };
        Some(Wait {
            signal: signal?,
            timeout_ms,
        })
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn join(path: &str, field: &str) -> String {
    if path.is_empty() {
        field.to_string()
    } else {
        format!("{path}.{field}")
    }
}

fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Checks a URL template: a literal `http://` or `https://` scheme and, where the host is
/// written literally, a valid host and port. A URL that starts with an expression is checked
/// when the step runs.
pub fn check_url(url: &str) -> Result<(), String> {
    if url.starts_with("{{") {
        return Ok(());
    }
    if url.chars().any(|c| c.is_whitespace()) && !url.contains("{{") {
        return Err("must not contain spaces".into());
    }
    let rest = if let Some(r) = url.strip_prefix("https://") {
        r
    } else if let Some(r) = url.strip_prefix("http://") {
        r
    } else {
        return Err(format!("\"{url}\" is not an http:// or https:// URL"));
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    if authority.contains("{{") || rest.starts_with("{{") {
        return Ok(());
    }
    if authority.is_empty() {
        return Err(format!("\"{url}\" has no host"));
    }
    if authority.contains('@') {
        return Err("credentials in the URL are not allowed; use a header with a secret".into());
    }
    let (host, port) = if let Some(stripped) = authority.strip_prefix('[') {
        match stripped.split_once(']') {
            Some((h, rest)) => (h, rest.strip_prefix(':')),
            None => return Err(format!("\"{url}\" has an unclosed IPv6 address")),
        }
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return Err(format!("\"{url}\" has no host"));
    }
    if !authority.starts_with('[')
        && !host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
    {
        return Err(format!("\"{host}\" is not a valid host name"));
    }
    if let Some(p) = port {
        if p.parse::<u16>().map(|n| n == 0).unwrap_or(true) {
            return Err(format!("\"{p}\" is not a valid port"));
        }
    }
    Ok(())
}

/// Parses and validates a definition. Either every part is valid, or every problem is returned.
pub fn parse(doc: &Value) -> Result<Definition, Invalid> {
    let mut v = V { issues: Vec::new() };
    let def = parse_inner(doc, &mut v);
    match def {
        Some(d) if v.issues.is_empty() => Ok(d),
        _ => {
            if v.issues.is_empty() {
                v.err("", "invalid definition");
            }
            Err(Invalid(v.issues))
        }
    }
}

fn parse_inner(doc: &Value, v: &mut V) -> Option<Definition> {
    let top = match doc {
        Value::Object(m) => m,
        other => {
            v.err(
                "(definition)",
                format!("must be an object, not {}", kind(other)),
            );
            return None;
        }
    };
    v.unknown_fields(top, "", &["steps", "output"]);
    let steps_v = match top.get("steps") {
        None => {
            v.err("steps", "required");
            return None;
        }
        Some(Value::Array(a)) => a,
        Some(other) => {
            v.err("steps", format!("must be an array, not {}", kind(other)));
            return None;
        }
    };
    if steps_v.is_empty() {
        v.err("steps", "must have at least one step");
    }
    if steps_v.len() > MAX_STEPS {
        v.err("steps", format!("at most {MAX_STEPS} steps are allowed"));
        return None;
    }

    // First pass: ids and shapes, so that templates can refer to any step by id.
    let mut ids: Vec<(String, bool, bool)> = Vec::new();
    for (i, s) in steps_v.iter().enumerate() {
        let path = format!("steps[{i}]");
        let (id, has_req, has_wait) = match s {
            Value::Object(m) => {
                let id = match m.get("id") {
                    None => {
                        v.err(&join(&path, "id"), "required");
                        String::new()
                    }
                    Some(Value::String(id)) => {
                        if let Err(e) = keys::check_name("step id", id, false) {
                            v.err(&join(&path, "id"), e);
                        } else if ids.iter().any(|(o, _, _)| o == id) {
                            v.err(&join(&path, "id"), format!("duplicate id \"{id}\""));
                        }
                        id.clone()
                    }
                    Some(other) => {
                        v.err(
                            &join(&path, "id"),
                            format!("must be a string, not {}", kind(other)),
                        );
                        String::new()
                    }
                };
                (id, m.contains_key("request"), m.contains_key("wait"))
            }
            _ => (String::new(), false, false),
        };
        ids.push((id, has_req, has_wait));
    }

    let mut steps = Vec::with_capacity(steps_v.len());
    for (i, s) in steps_v.iter().enumerate() {
        let path = format!("steps[{i}]");
        let Some(m) = v.object(s, &path) else {
            continue;
        };
        v.unknown_fields(
            m,
            &path,
            &[
                "id",
                "request",
                "wait",
                "timeout",
                "retry",
                "compensate",
                "provider_key",
                "idempotency_header",
            ],
        );
        if !m.contains_key("request") && !m.contains_key("wait") {
            v.err(&path, "a step needs a request, a wait, or both");
        }
        let has_request = m.contains_key("request");
        for field in [
            "timeout",
            "retry",
            "compensate",
            "provider_key",
            "idempotency_header",
        ] {
            if m.contains_key(field) && !has_request {
                v.err(&join(&path, field), "only allowed on a step with a request");
            }
        }
        let request_scope = Scope {
            steps: &ids,
            visible: i,
            secrets: true,
        };
        let request = m
            .get("request")
            .and_then(|r| v.request(r, &join(&path, "request"), &request_scope));
        let compensate_scope = Scope {
            steps: &ids,
            visible: i + 1,
            secrets: true,
        };
        let compensate = m
            .get("compensate")
            .and_then(|c| v.request(c, &join(&path, "compensate"), &compensate_scope));
        let wait = m.get("wait").and_then(|w| v.wait(w, &join(&path, "wait")));
        let timeout_ms = m
            .get("timeout")
            .and_then(|t| v.duration(t, &join(&path, "timeout"), MAX_TIMEOUT_MS));
        let retry = m
            .get("retry")
            .and_then(|r| v.retry(r, &join(&path, "retry")));
        let provider_key = m.get("provider_key").and_then(|p| {
            let pp = join(&path, "provider_key");
            let s = v.string(p, &pp)?;
            match keys::check_name("provider_key", s, true) {
                Ok(()) => Some(s.to_string()),
                Err(e) => {
                    v.err(&pp, e);
                    None
                }
            }
        });
        let idempotency_header = match m.get("idempotency_header") {
            None => IdempotencyHeader::Key,
            Some(Value::String(s)) if s == "key" => IdempotencyHeader::Key,
            Some(Value::String(s)) if s == "invocation" => IdempotencyHeader::Invocation,
            Some(_) => {
                v.err(
                    &join(&path, "idempotency_header"),
                    "must be \"key\" or \"invocation\"",
                );
                IdempotencyHeader::Key
            }
        };
        steps.push(Step {
            id: ids[i].0.clone(),
            request,
            wait,
            timeout_ms,
            retry,
            compensate,
            provider_key,
            idempotency_header,
        });
    }

    let output = top.get("output").cloned();
    if let Some(o) = &output {
        let scope = Scope {
            steps: &ids,
            visible: ids.len(),
            secrets: false,
        };
        v.templates_in(o, "output", &scope);
    }
    Some(Definition { steps, output })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn issues(doc: Value) -> Vec<String> {
        match parse(&doc) {
            Ok(_) => vec![],
            Err(Invalid(is)) => is.iter().map(|i| i.to_string()).collect(),
        }
    }

    fn has(doc: Value, want: &str) {
        let got = issues(doc);
        assert!(
            got.iter().any(|g| g == want),
            "wanted {want:?}, got {got:?}"
        );
    }

    #[test]
    fn the_contract_example_is_valid() {
        let doc = json!({
          "steps": [{
              "id": "charge-payment",
              "request": {
                "method": "POST",
                "url": "https://api.example.com/charge",
                "headers": {"Authorization": "Bearer {{ secrets.stripe }}"},
                "body": {"amount": "{{ input.amount }}", "order": "{{ input.order_id }}"}
              },
              "timeout": "30s",
              "retry": {"max_attempts": 5, "initial_interval": "1s", "backoff_coefficient": 2.0, "max_interval": "5m"},
              "compensate": {"method": "POST", "url": "https://api.example.com/refund",
                             "body": {"charge_id": "{{ steps.charge-payment.response.body.transaction_id }}"}},
              "wait": {"signal": "payment-confirmed", "timeout": "10m"},
              "provider_key": "stripe:create-charge"
          }],
          "output": "{{ steps.charge-payment.response.body }}"
        });
        let d = parse(&doc).expect("valid");
        let s = &d.steps[0];
        assert_eq!(s.id, "charge-payment");
        assert_eq!(s.timeout_ms, Some(30_000));
        assert_eq!(
            s.retry,
            Some(RetryPolicy {
                max_attempts: 5,
                initial_interval_ms: 1000,
                backoff_coefficient: 2.0,
                max_interval_ms: 300_000
            })
        );
        assert_eq!(
            s.wait,
            Some(Wait {
                signal: "payment-confirmed".into(),
                timeout_ms: Some(600_000)
            })
        );
        assert_eq!(s.provider_key.as_deref(), Some("stripe:create-charge"));
        assert_eq!(s.request.as_ref().map(|r| r.method.as_str()), Some("POST"));
        assert!(s.compensate.is_some());
    }

    #[test]
    fn minimal_steps_and_defaults() {
        let d = parse(&json!({"steps": [
            {"id": "a", "request": {"url": "http://localhost:8080/a"}},
            {"id": "b", "wait": {"signal": "go"}},
            {"id": "c", "request": {"method": "get", "url": "{{ input.url }}"}, "retry": {}}
        ]}))
        .expect("valid");
        assert_eq!(
            d.steps[0].request.as_ref().map(|r| r.method.as_str()),
            Some("POST")
        );
        assert!(d.steps[1].request.is_none());
        assert_eq!(d.steps[1].wait.as_ref().and_then(|w| w.timeout_ms), None);
        assert_eq!(
            d.steps[2].request.as_ref().map(|r| r.method.as_str()),
            Some("GET")
        );
        assert_eq!(
            d.steps[2].retry,
            Some(RetryPolicy {
                max_attempts: 3,
                initial_interval_ms: 1000,
                backoff_coefficient: 2.0,
                max_interval_ms: 100_000
            })
        );
        assert_eq!(d.steps[0].idempotency_header, IdempotencyHeader::Key);
    }

    #[test]
    fn top_level_problems() {
        has(json!([]), "(definition): must be an object, not an array");
        has(json!({}), "steps: required");
        has(
            json!({"steps": {}}),
            "steps: must be an array, not an object",
        );
        has(json!({"steps": []}), "steps: must have at least one step");
        has(
            json!({"steps": [{"id": "a", "wait": {"signal": "s"}}], "extra": 1}),
            "extra: unknown field (allowed: steps, output)",
        );
    }

    #[test]
    fn step_problems_name_their_path() {
        has(
            json!({"steps": [{"id": "a", "wait": {"signal": "s"}}, {"id": "b", "request": {"method": "POST"}}]}),
            "steps[1].request.url: required",
        );
        has(
            json!({"steps": [{"id": "a", "wait": {"signal": "s"}}, {"id": "a", "wait": {"signal": "t"}}]}),
            "steps[1].id: duplicate id \"a\"",
        );
        has(
            json!({"steps": [{"wait": {"signal": "s"}}]}),
            "steps[0].id: required",
        );
        has(
            json!({"steps": [{"id": 5, "wait": {"signal": "s"}}]}),
            "steps[0].id: must be a string, not a number",
        );
        has(
            json!({"steps": [{"id": "a"}]}),
            "steps[0]: a step needs a request, a wait, or both",
        );
        has(
            json!({"steps": ["a"]}),
            "steps[0]: must be an object, not a string",
        );
        has(
            json!({"steps": [{"id": "a.b", "wait": {"signal": "s"}}]}),
            "steps[0].id: step id \"a.b\" contains '.'; only A-Z a-z 0-9 - _ are allowed",
        );
        has(
            json!({"steps": [{"id": "a", "wait": {"signal": "s"}, "retry": {}}]}),
            "steps[0].retry: only allowed on a step with a request",
        );
        has(
            json!({"steps": [{"id": "a", "wait": {"signal": "s"}, "colour": "red"}]}),
            "steps[0].colour: unknown field (allowed: id, request, wait, timeout, retry, compensate, provider_key, idempotency_header)",
        );
    }

    #[test]
    fn request_problems() {
        let step = |req: Value| json!({"steps": [{"id": "a", "request": req}]});
        has(
            step(json!("x")),
            "steps[0].request: must be an object, not a string",
        );
        has(
            step(json!({"url": "http://h/", "method": "FETCH"})),
            "steps[0].request.method: unsupported method \"FETCH\" (use one of GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS)",
        );
        has(
            step(json!({"url": "ftp://h/"})),
            "steps[0].request.url: \"ftp://h/\" is not an http:// or https:// URL",
        );
        has(
            step(json!({"url": "http:///x"})),
            "steps[0].request.url: \"http:///x\" has no host",
        );
        has(
            step(json!({"url": "http://h:99999/"})),
            "steps[0].request.url: \"99999\" is not a valid port",
        );
        has(step(json!({"url": "http://u:p@h/"})), "steps[0].request.url: credentials in the URL are not allowed; use a header with a secret");
        has(
            step(json!({"url": 7})),
            "steps[0].request.url: must be a string, not a number",
        );
        has(
            step(json!({"url": "http://h/", "headers": {"Bad Name": "x"}})),
            "steps[0].request.headers.Bad Name: not a valid header name",
        );
        has(
            step(json!({"url": "http://h/", "headers": {"Idempotency-Key": "x"}})),
            "steps[0].request.headers.Idempotency-Key: set by dispatched itself; a definition may not set it",
        );
        has(
            step(json!({"url": "http://h/", "headers": {"X-N": 1}})),
            "steps[0].request.headers.X-N: must be a string, not a number",
        );
        has(
            step(json!({"url": "http://h/", "method": "GET", "body": {}})),
            "steps[0].request.body: a GET request has no body",
        );
        has(
            step(json!({"url": "http://h/", "query": {}})),
            "steps[0].request.query: unknown field (allowed: method, url, headers, body)",
        );
        assert!(issues(step(json!({"url": "http://[::1]:8080/x"}))).is_empty());
        assert!(issues(step(json!({"url": "https://{{ input.host }}/x"}))).is_empty());
    }

    #[test]
    fn durations_and_retry_bounds() {
        let step = |extra: Value| {
            let mut s = json!({"id": "a", "request": {"url": "http://h/"}});
            for (k, v) in extra.as_object().cloned().unwrap_or_default() {
                s[k] = v;
            }
            json!({"steps": [s]})
        };
        has(step(json!({"timeout": "30"})), "steps[0].timeout: invalid duration \"30\": missing unit (expected e.g. 500ms, 30s, 10m, 2h, 1d)");
        has(
            step(json!({"timeout": "0s"})),
            "steps[0].timeout: must be longer than 0",
        );
        has(
            step(json!({"timeout": "2d"})),
            "steps[0].timeout: must be at most 1d",
        );
        has(
            step(json!({"timeout": 30})),
            "steps[0].timeout: must be a string, not a number",
        );
        has(
            step(json!({"retry": {"max_attempts": 0}})),
            "steps[0].retry.max_attempts: must be an integer from 1 to 1000",
        );
        has(
            step(json!({"retry": {"max_attempts": 2.5}})),
            "steps[0].retry.max_attempts: must be an integer from 1 to 1000",
        );
        has(
            step(json!({"retry": {"backoff_coefficient": 0.5}})),
            "steps[0].retry.backoff_coefficient: must be a number from 1.0 to 100.0",
        );
        has(
            step(json!({"retry": {"initial_interval": "10s", "max_interval": "1s"}})),
            "steps[0].retry.max_interval: must not be shorter than initial_interval",
        );
        has(step(json!({"retry": {"tries": 3}})), "steps[0].retry.tries: unknown field (allowed: max_attempts, initial_interval, backoff_coefficient, max_interval)");
        has(
            step(json!({"idempotency_header": "both"})),
            "steps[0].idempotency_header: must be \"key\" or \"invocation\"",
        );
        has(step(json!({"provider_key": "a b"})), "steps[0].provider_key: provider_key \"a b\" contains ' '; only A-Z a-z 0-9 - _ . : are allowed");
    }

    #[test]
    fn wait_problems() {
        let step = |w: Value| json!({"steps": [{"id": "a", "wait": w}]});
        has(step(json!({})), "steps[0].wait.signal: required");
        has(step(json!({"signal": "s", "timeout": "soon"})), "steps[0].wait.timeout: invalid duration \"soon\": a number must come before each unit (expected e.g. 500ms, 30s, 10m, 2h, 1d)");
        has(
            step(json!({"signal": "s", "after": "1s"})),
            "steps[0].wait.after: unknown field (allowed: signal, timeout)",
        );
        has(
            step(json!({"signal": ""})),
            "steps[0].wait.signal: signal name must not be empty",
        );
    }

    #[test]
    fn expression_scoping() {
        has(
            json!({"steps": [{"id": "a", "request": {"url": "http://h/", "body": {"x": "{{ steps.b.response.body }}"}}},
                             {"id": "b", "request": {"url": "http://h/"}}]}),
            "steps[0].request.body.x: steps.b.response.body: step \"b\" has not run yet at this point",
        );
        has(
            json!({"steps": [{"id": "a", "request": {"url": "http://h/", "body": ["{{ steps.zz.response.status }}"]}}]}),
            "steps[0].request.body[0]: steps.zz.response.status: no step \"zz\"",
        );
        has(
            json!({"steps": [{"id": "a", "wait": {"signal": "s"}}, {"id": "b", "request": {"url": "http://h/{{ steps.a.response.body.x }}"}}]}),
            "steps[1].request.url: steps.a.response.body.x: step \"a\" has no request, so no response",
        );
        has(
            json!({"steps": [{"id": "a", "request": {"url": "http://h/"}}], "output": "{{ steps.a.signal }}"}),
            "output: steps.a.signal: step \"a\" has no wait, so no signal",
        );
        has(
            json!({"steps": [{"id": "a", "request": {"url": "http://h/"}}], "output": {"k": "{{ secrets.x }}"}}),
            "output.k: secrets.x: secrets may only be used in request and compensate",
        );
        has(
            json!({"steps": [{"id": "a", "request": {"url": "http://h/", "headers": {"X": "{{ inputs.x }}"}}}]}),
            "steps[0].request.headers.X: invalid expression \"inputs.x\": unknown root \"inputs\" (expected input, steps, run or secrets)",
        );
        // A compensation may read its own step's response; an output may read any step.
        assert!(issues(json!({"steps": [
            {"id": "a", "request": {"url": "http://h/"}, "compensate": {"url": "http://h/undo/{{ steps.a.response.body.id }}"}},
            {"id": "b", "request": {"url": "http://h/"}, "wait": {"signal": "s"}}
        ], "output": {"a": "{{ steps.a.response.status }}", "b": "{{ steps.b.signal.x }}", "r": "{{ run.id }}"}})).is_empty());
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let got = issues(json!({"steps": [
            {"id": "a", "request": {}},
            {"id": "a", "wait": {}}
        ]}));
        assert_eq!(
            got,
            vec![
                "steps[1].id: duplicate id \"a\"",
                "steps[0].request.url: required",
                "steps[1].wait.signal: required"
            ]
        );
        let joined =
            parse(&json!({"steps": [{"id": "a", "request": {}}, {"id": "a", "wait": {}}]}))
                .unwrap_err()
                .to_string();
        assert_eq!(
            joined,
            "steps[1].id: duplicate id \"a\"; steps[0].request.url: required; steps[1].wait.signal: required"
        );
    }
}
