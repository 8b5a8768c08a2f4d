//! `Dispatched-*` response headers: a service's instructions to the engine. A malformed one
//! is reported (and becomes a `directive.invalid` event), never fatal.

use crate::duration;
use crate::keys;
use base64::Engine;
use serde_json::Value;

#[derive(Debug, Clone, PartialEq)]
pub enum Directive {
    Spawn {
        workflow: String,
        input: Value,
        attach: bool,
    },
    Signal {
        run: String,
        name: String,
        data: Option<Value>,
    },
    Cancel {
        run: String,
    },
    Delay {
        ms: u64,
    },
    Log {
        message: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidDirective {
    pub header: String,
    pub value: String,
    pub reason: String,
}

pub const MAX_LOG_CHARS: usize = 4096;

fn params(value: &str) -> (String, Vec<(String, String)>) {
    let mut parts = value.split(';');
    let head = parts.next().unwrap_or("").trim().to_string();
    let mut kv = Vec::new();
    for p in parts {
        let p = p.trim();
        if p.is_empty() {
            continue;
        }
        match p.split_once('=') {
            Some((k, v)) => kv.push((k.trim().to_ascii_lowercase(), v.trim().to_string())),
            None => kv.push((p.to_ascii_lowercase(), String::new())),
        }
    }
    (head, kv)
}

fn b64_json(what: &str, text: &str) -> Result<Value, String> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .or_else(|_| base64::engine::general_purpose::URL_SAFE.decode(text.trim()))
        .or_else(|_| base64::engine::general_purpose::STANDARD_NO_PAD.decode(text.trim()))
        .or_else(|_| base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(text.trim()))
        .map_err(|_| format!("{what} is not base64"))?;
    serde_json::from_slice(&bytes).map_err(|e| format!("{what} is not base64 of JSON: {e}"))
}

fn check_run_id(run: &str) -> Result<(), String> {
    if run.is_empty() {
        return Err("run id missing".into());
    }
    keys::check_key(run).map_err(|_| format!("\"{run}\" is not a run id"))
}

/// Parses one directive header. `name` is the header name in any case.
pub fn parse_one(name: &str, value: &str) -> Option<Result<Directive, String>> {
    let lname = name.to_ascii_lowercase();
    Some(match lname.as_str() {
        "dispatched-spawn" => (|| {
            let (workflow, kv) = params(value);
            keys::check_name("workflow name", &workflow, true)?;
            let mut input = Value::Object(Default::default());
            let mut attach = false;
            for (k, v) in kv {
                match k.as_str() {
                    "input" => input = b64_json("input", &v)?,
                    "mode" => match v.as_str() {
                        "detach" => attach = false,
                        "attach" => attach = true,
                        other => {
                            return Err(format!("mode must be attach or detach, not \"{other}\""))
                        }
                    },
                    other => return Err(format!("unknown parameter \"{other}\"")),
                }
            }
            Ok(Directive::Spawn {
                workflow,
                input,
                attach,
            })
        })(),
        "dispatched-signal" => (|| {
            let (head, mut kv) = params(value);
            if !head.is_empty() {
                // "run=..." is the first part itself
                match head.split_once('=') {
                    Some((k, v)) => {
                        kv.insert(0, (k.trim().to_ascii_lowercase(), v.trim().to_string()))
                    }
                    None => return Err(format!("expected run=<id>; name=<name>, got \"{head}\"")),
                }
            }
            let (mut run, mut sname, mut data) = (None, None, None);
            for (k, v) in kv {
                match k.as_str() {
                    "run" => run = Some(v),
                    "name" => sname = Some(v),
                    "data" => data = Some(b64_json("data", &v)?),
                    other => return Err(format!("unknown parameter \"{other}\"")),
                }
            }
            let run = run.ok_or("run=<id> missing")?;
            check_run_id(&run)?;
            let sname = sname.ok_or("name=<signal> missing")?;
            keys::check_name("signal name", &sname, true)?;
            Ok(Directive::Signal {
                run,
                name: sname,
                data,
            })
        })(),
        "dispatched-cancel" => {
            let run = value.trim().to_string();
            check_run_id(&run).map(|_| Directive::Cancel { run })
        }
        "dispatched-delay" => duration::parse_ms(value)
            .map(|ms| Directive::Delay { ms })
            .map_err(|e| e.0),
        "dispatched-log" => {
            let message: String = value.trim().chars().take(MAX_LOG_CHARS).collect();
            if message.is_empty() {
                Err("empty log message".to_string())
            } else {
                Ok(Directive::Log { message })
            }
        }
        _ => return None,
    })
}

/// Parses every directive among the response headers (in order; a header may repeat).
pub fn parse_all(headers: &[(String, String)]) -> (Vec<Directive>, Vec<InvalidDirective>) {
    let mut ok = Vec::new();
    let mut bad = Vec::new();
    for (name, value) in headers {
        match parse_one(name, value) {
            None => {}
            Some(Ok(d)) => ok.push(d),
            Some(Err(reason)) => bad.push(InvalidDirective {
                header: name.clone(),
                value: value.clone(),
                reason,
            }),
        }
    }
    (ok, bad)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn b64(v: &Value) -> String {
        base64::engine::general_purpose::STANDARD.encode(v.to_string())
    }

    #[test]
    fn spawn() {
        let inp = b64(&json!({"order_id": 7}));
        assert_eq!(
            parse_one(
                "Dispatched-Spawn",
                &format!("fulfill-order; input={inp}; mode=detach")
            ),
            Some(Ok(Directive::Spawn {
                workflow: "fulfill-order".into(),
                input: json!({"order_id": 7}),
                attach: false
            }))
        );
        assert_eq!(
            parse_one(
                "dispatched-spawn",
                &format!("child;input={inp};mode=attach")
            ),
            Some(Ok(Directive::Spawn {
                workflow: "child".into(),
                input: json!({"order_id": 7}),
                attach: true
            }))
        );
        assert_eq!(
            parse_one("dispatched-spawn", "child"),
            Some(Ok(Directive::Spawn {
                workflow: "child".into(),
                input: json!({}),
                attach: false
            }))
        );
        assert!(
            matches!(parse_one("dispatched-spawn", "child; input=!!!"), Some(Err(e)) if e == "input is not base64")
        );
        // base64 of `{"a`: not JSON
        assert!(
            matches!(parse_one("dispatched-spawn", "child; input=eyJh"), Some(Err(e)) if e.starts_with("input is not base64 of JSON"))
        );
        assert!(
            matches!(parse_one("dispatched-spawn", "child; mode=later"), Some(Err(e)) if e.contains("mode must be"))
        );
        assert!(
            matches!(parse_one("dispatched-spawn", "; mode=attach"), Some(Err(e)) if e.contains("must not be empty"))
        );
    }

    #[test]
    fn signal_cancel_delay_log() {
        let d = b64(&json!({"ok": true}));
        assert_eq!(
            parse_one(
                "Dispatched-Signal",
                &format!("run=run_abcdefghijk; name=payment-ready; data={d}")
            ),
            Some(Ok(Directive::Signal {
                run: "run_abcdefghijk".into(),
                name: "payment-ready".into(),
                data: Some(json!({"ok": true}))
            }))
        );
        assert_eq!(
            parse_one("Dispatched-Signal", "run=run_x; name=go"),
            Some(Ok(Directive::Signal {
                run: "run_x".into(),
                name: "go".into(),
                data: None
            }))
        );
        assert!(
            matches!(parse_one("Dispatched-Signal", "name=go"), Some(Err(e)) if e.contains("run=<id> missing"))
        );
        assert!(
            matches!(parse_one("Dispatched-Signal", "run=a b; name=go"), Some(Err(e)) if e.contains("not a run id"))
        );
        assert_eq!(
            parse_one("Dispatched-Cancel", " run_xyz "),
            Some(Ok(Directive::Cancel {
                run: "run_xyz".into()
            }))
        );
        assert!(matches!(parse_one("Dispatched-Cancel", ""), Some(Err(_))));
        assert_eq!(
            parse_one("Dispatched-Delay", "30s"),
            Some(Ok(Directive::Delay { ms: 30_000 }))
        );
        assert!(
            matches!(parse_one("Dispatched-Delay", "soon"), Some(Err(e)) if e.contains("invalid duration"))
        );
        assert_eq!(
            parse_one("Dispatched-Log", "Processed 42 items"),
            Some(Ok(Directive::Log {
                message: "Processed 42 items".into()
            }))
        );
        assert_eq!(parse_one("Content-Type", "application/json"), None);
    }

    #[test]
    fn repeated_headers_in_order_and_invalid_ones_reported() {
        let headers = vec![
            ("dispatched-log".to_string(), "one".to_string()),
            ("x-other".to_string(), "1".to_string()),
            ("dispatched-log".to_string(), "two".to_string()),
            ("dispatched-delay".to_string(), "later".to_string()),
        ];
        let (ok, bad) = parse_all(&headers);
        assert_eq!(
            ok,
            vec![
                Directive::Log {
                    message: "one".into()
                },
                Directive::Log {
                    message: "two".into()
                }
            ]
        );
        assert_eq!(bad.len(), 1);
        assert_eq!(bad[0].header, "dispatched-delay");
        assert_eq!(bad[0].value, "later");
    }
}
