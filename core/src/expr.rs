//! The `{{ ... }}` expression language of requests, compensations and outputs.
//!
//! A template is a string with zero or more `{{ expr }}` parts. An expression is a dotted path
//! from one of the roots:
//!
//! * `input.<path>`
//! * `steps.<id>.response.status`, `steps.<id>.response.headers.<lower-case-name>`,
//!   `steps.<id>.response.body.<path>` (or the whole `response` / `body`)
//! * `steps.<id>.signal.<path>`
//! * `run.id`
//! * `secrets.<name>`
//!
//! Path segments are `[A-Za-z0-9_-]+`; array elements are addressed as `items.0` or `items[0]`.
//! A string that is exactly one expression evaluates to the JSON value; otherwise each
//! expression is rendered as text inside the string.

use serde_json::Value;
use std::collections::BTreeSet;
use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Root {
    Input,
    Step { id: String, part: StepPart },
    RunId,
    Secret(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StepPart {
    /// `steps.x.response` with what follows it (status, headers.<name>, body.<path>)
    Response,
    /// `steps.x.signal` with what follows it
    Signal,
}

/// One parsed expression: its text as written (trimmed) and its path segments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expr {
    pub text: String,
    pub root: Root,
    /// Every segment of the path, roots included (`["steps","a","response","body","x"]`).
    pub segments: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    Lit(String),
    Expr(Expr),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    pub pieces: Vec<Piece>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExprError(pub String);

impl fmt::Display for ExprError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn is_seg_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == '-'
}

fn split_path(text: &str) -> Result<Vec<String>, ExprError> {
    let mut segs = Vec::new();
    let mut cur = String::new();
    let mut chars = text.chars().peekable();
    let bad = |why: &str| ExprError(format!("invalid expression \"{text}\": {why}"));
    let mut after_bracket = false;
    while let Some(c) = chars.next() {
        if c == '.' {
            if cur.is_empty() && !after_bracket {
                return Err(bad("empty path segment"));
            }
            if !cur.is_empty() {
                segs.push(std::mem::take(&mut cur));
            }
            after_bracket = false;
            if chars.peek().is_none() {
                return Err(bad("path ends with '.'"));
            }
        } else if c == '[' {
            if cur.is_empty() && !after_bracket {
                return Err(bad("'[' must follow a name"));
            }
            if !cur.is_empty() {
                segs.push(std::mem::take(&mut cur));
            }
            let mut idx = String::new();
            loop {
                match chars.next() {
                    Some(']') => break,
                    Some(d) if d.is_ascii_digit() => idx.push(d),
                    _ => return Err(bad("array index must be [<digits>]")),
                }
            }
            if idx.is_empty() {
                return Err(bad("empty array index"));
            }
            segs.push(idx);
            after_bracket = true;
        } else if is_seg_char(c) {
            if after_bracket {
                return Err(bad("expected '.' or '[' after ']'"));
            }
            cur.push(c);
        } else {
            return Err(bad(&format!("unexpected character '{c}'")));
        }
    }
    if !cur.is_empty() {
        segs.push(cur);
    }
    if segs.is_empty() {
        return Err(bad("empty expression"));
    }
    Ok(segs)
}

/// Parses one expression (the text between `{{` and `}}`).
pub fn parse_expr(text: &str) -> Result<Expr, ExprError> {
    let text = text.trim();
    let segs = split_path(text)?;
    let bad = |why: &str| ExprError(format!("invalid expression \"{text}\": {why}"));
    let root = match segs[0].as_str() {
        "input" => Root::Input,
        "run" => {
            if segs.len() != 2 || segs[1] != "id" {
                return Err(bad("the only field of run is run.id"));
            }
            Root::RunId
        }
        "secrets" => {
            if segs.len() != 2 {
                return Err(bad("expected secrets.<name>"));
            }
            Root::Secret(segs[1].clone())
        }
        "steps" => {
            if segs.len() < 3 {
                return Err(bad("expected steps.<id>.response or steps.<id>.signal"));
            }
            let part = match segs[2].as_str() {
                "response" => {
                    if segs.len() > 3 {
                        match segs[3].as_str() {
                            "status" if segs.len() == 4 => {}
                            "status" => return Err(bad("response.status has no fields")),
                            "headers" if segs.len() <= 5 => {
                                if segs.len() == 5 && segs[4] != segs[4].to_ascii_lowercase() {
                                    return Err(bad("header names are written in lower case"));
                                }
                            }
                            "headers" => return Err(bad("a header value has no fields")),
                            "body" => {}
                            _ => {
                                return Err(bad(
                                    "a response has status, headers.<name> and body.<path>",
                                ))
                            }
                        }
                    }
                    StepPart::Response
                }
                "signal" => StepPart::Signal,
                _ => return Err(bad("expected steps.<id>.response or steps.<id>.signal")),
            };
            Root::Step {
                id: segs[1].clone(),
                part,
            }
        }
        other => {
            return Err(bad(&format!(
                "unknown root \"{other}\" (expected input, steps, run or secrets)"
            )))
        }
    };
    Ok(Expr {
        text: text.to_string(),
        root,
        segments: segs,
    })
}

/// Parses a template string into literal text and expressions.
pub fn parse_template(s: &str) -> Result<Template, ExprError> {
    let mut pieces = Vec::new();
    let mut rest = s;
    while let Some(open) = rest.find("{{") {
        if open > 0 {
            pieces.push(Piece::Lit(rest[..open].to_string()));
        }
        let after = &rest[open + 2..];
        let close = after
            .find("}}")
            .ok_or_else(|| ExprError("unclosed \"{{\" (missing \"}}\")".to_string()))?;
        pieces.push(Piece::Expr(parse_expr(&after[..close])?));
        rest = &after[close + 2..];
    }
    if !rest.is_empty() {
        pieces.push(Piece::Lit(rest.to_string()));
    }
    Ok(Template { pieces })
}

impl Template {
    /// The template is exactly one expression: it evaluates to a JSON value, not text.
    pub fn single(&self) -> Option<&Expr> {
        match self.pieces.as_slice() {
            [Piece::Expr(e)] => Some(e),
            _ => None,
        }
    }

    pub fn exprs(&self) -> impl Iterator<Item = &Expr> {
        self.pieces.iter().filter_map(|p| match p {
            Piece::Expr(e) => Some(e),
            Piece::Lit(_) => None,
        })
    }

    pub fn has_exprs(&self) -> bool {
        self.exprs().next().is_some()
    }
}

/// Calls `f` with every template found in the strings of a JSON value, and the JSON path
/// (relative to `base`) of each string.
pub fn walk_strings<F>(value: &Value, base: &str, f: &mut F)
where
    F: FnMut(&str, &str),
{
    match value {
        Value::String(s) => f(base, s),
        Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                walk_strings(v, &format!("{base}[{i}]"), f);
            }
        }
        Value::Object(map) => {
            for (k, v) in map {
                walk_strings(v, &format!("{base}.{k}"), f);
            }
        }
        _ => {}
    }
}

/// What expressions are evaluated against. `secrets` are looked up by name only when used.
pub struct Context<'a> {
    pub input: &'a Value,
    pub run_id: &'a str,
    /// `{"<step id>": {"response": {...}, "signal": ...}}`
    pub steps: &'a Value,
    pub secret: &'a dyn Fn(&str) -> Option<String>,
}

/// Evaluation also reports which secret values went into the result, so that callers can
/// redact them wherever the rendered request is shown.
#[derive(Default, Debug)]
pub struct Rendered {
    pub secrets_used: BTreeSet<String>,
}

fn lookup<'v>(mut v: &'v Value, segs: &[String]) -> Option<&'v Value> {
    for s in segs {
        v = match v {
            Value::Object(m) => m.get(s.as_str())?,
            Value::Array(a) => a.get(s.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    Some(v)
}

fn eval_expr(e: &Expr, ctx: &Context, out: &mut Rendered) -> Result<Value, ExprError> {
    let missing = || ExprError(format!("{}: path does not exist", e.segments.join(".")));
    match &e.root {
        Root::Input => lookup(ctx.input, &e.segments[1..])
            .cloned()
            .ok_or_else(missing),
        Root::RunId => Ok(Value::String(ctx.run_id.to_string())),
        Root::Secret(name) => {
            let value = (ctx.secret)(name)
                .ok_or_else(|| ExprError(format!("secrets.{name}: no such secret")))?;
            out.secrets_used.insert(value.clone());
            Ok(Value::String(value))
        }
        Root::Step { .. } => lookup(ctx.steps, &e.segments[1..])
            .cloned()
            .ok_or_else(missing),
    }
}

fn as_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Evaluates one template string.
pub fn render_str(s: &str, ctx: &Context, out: &mut Rendered) -> Result<Value, ExprError> {
    let t = parse_template(s)?;
    if let Some(e) = t.single() {
        return eval_expr(e, ctx, out);
    }
    if !t.has_exprs() {
        return Ok(Value::String(s.to_string()));
    }
    let mut text = String::new();
    for p in &t.pieces {
        match p {
            Piece::Lit(l) => text.push_str(l),
            Piece::Expr(e) => text.push_str(&as_text(&eval_expr(e, ctx, out)?)),
        }
    }
    Ok(Value::String(text))
}

/// Evaluates every template string inside a JSON value (object keys are left as they are).
pub fn render(value: &Value, ctx: &Context, out: &mut Rendered) -> Result<Value, ExprError> {
    Ok(match value {
        Value::String(s) => render_str(s, ctx, out)?,
        Value::Array(items) => Value::Array(
            items
                .iter()
                .map(|v| render(v, ctx, out))
                .collect::<Result<_, _>>()?,
        ),
        Value::Object(map) => {
            let mut m = serde_json::Map::new();
            for (k, v) in map {
                m.insert(k.clone(), render(v, ctx, out)?);
            }
            Value::Object(m)
        }
        other => other.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ctx_eval(s: &str) -> Result<Value, ExprError> {
        let input = json!({"amount": 4999, "order_id": 42, "customer": {"name": "Ann"}, "items": [{"sku": "a"}, {"sku": "b"}]});
        let steps = json!({"charge-payment": {"response": {"status": 200, "headers": {"x-request-id": "req-1"}, "body": {"transaction_id": "txn_123", "nested": {"ok": true}}}, "signal": {"by": "bank"}}});
        let secret = |n: &str| (n == "stripe").then(|| "sk_live_abc".to_string());
        let ctx = Context {
            input: &input,
            run_id: "run_abcdefghijk",
            steps: &steps,
            secret: &secret,
        };
        let mut out = Rendered::default();
        render(&json!(s), &ctx, &mut out)
    }

    #[test]
    fn single_expression_keeps_json_type() {
        assert_eq!(ctx_eval("{{ input.amount }}"), Ok(json!(4999)));
        assert_eq!(ctx_eval("{{input.customer}}"), Ok(json!({"name": "Ann"})));
        assert_eq!(
            ctx_eval("{{ steps.charge-payment.response.status }}"),
            Ok(json!(200))
        );
        assert_eq!(
            ctx_eval("{{ steps.charge-payment.response.body.nested.ok }}"),
            Ok(json!(true))
        );
        assert_eq!(ctx_eval("{{ input.items.1.sku }}"), Ok(json!("b")));
        assert_eq!(ctx_eval("{{ input.items[0].sku }}"), Ok(json!("a")));
        assert_eq!(
            ctx_eval("{{ steps.charge-payment.signal.by }}"),
            Ok(json!("bank"))
        );
        assert_eq!(ctx_eval("{{ run.id }}"), Ok(json!("run_abcdefghijk")));
    }

    #[test]
    fn embedded_expressions_render_as_text() {
        assert_eq!(
            ctx_eval("Bearer {{ secrets.stripe }}"),
            Ok(json!("Bearer sk_live_abc"))
        );
        assert_eq!(
            ctx_eval("order {{ input.order_id }} by {{ input.customer.name }}"),
            Ok(json!("order 42 by Ann"))
        );
        assert_eq!(
            ctx_eval("c={{ input.customer }}"),
            Ok(json!("c={\"name\":\"Ann\"}"))
        );
        assert_eq!(
            ctx_eval("{{ steps.charge-payment.response.headers.x-request-id }}!"),
            Ok(json!("req-1!"))
        );
        assert_eq!(ctx_eval("no expressions"), Ok(json!("no expressions")));
    }

    #[test]
    fn missing_paths_are_named_in_full() {
        let e = ctx_eval("{{ steps.charge-payment.response.body.x }}").unwrap_err();
        assert_eq!(
            e.0,
            "steps.charge-payment.response.body.x: path does not exist"
        );
        let e = ctx_eval("{{ steps.a.response.body.x }}").unwrap_err();
        assert!(e.0.starts_with("steps.a.response.body.x:"), "{e}");
        let e = ctx_eval("id {{ input.nope.deeper }}").unwrap_err();
        assert!(e.0.starts_with("input.nope.deeper:"), "{e}");
        let e = ctx_eval("{{ input.items.7 }}").unwrap_err();
        assert!(e.0.starts_with("input.items.7:"), "{e}");
    }

    #[test]
    fn missing_secret_names_only_the_name() {
        let e = ctx_eval("{{ secrets.other }}").unwrap_err();
        assert_eq!(e.0, "secrets.other: no such secret");
    }

    #[test]
    fn secrets_used_are_reported() {
        let input = json!({});
        let steps = json!({});
        let secret = |_: &str| Some("s3cr3t".to_string());
        let ctx = Context {
            input: &input,
            run_id: "run_x",
            steps: &steps,
            secret: &secret,
        };
        let mut out = Rendered::default();
        let v = render(
            &json!({"h": "Bearer {{ secrets.k }}", "n": 1}),
            &ctx,
            &mut out,
        )
        .unwrap();
        assert_eq!(v, json!({"h": "Bearer s3cr3t", "n": 1}));
        assert!(out.secrets_used.contains("s3cr3t"));
    }

    #[test]
    fn syntax_errors() {
        for (s, want) in [
            ("{{ input.amount", "unclosed"),
            ("{{ }}", "empty expression"),
            ("{{ nope.x }}", "unknown root \"nope\""),
            ("{{ input..x }}", "empty path segment"),
            ("{{ input.x. }}", "ends with '.'"),
            ("{{ input.a b }}", "unexpected character ' '"),
            ("{{ run.started }}", "run.id"),
            ("{{ secrets }}", "secrets.<name>"),
            ("{{ secrets.a.b }}", "secrets.<name>"),
            ("{{ steps.a }}", "steps.<id>.response"),
            ("{{ steps.a.output }}", "steps.<id>.response"),
            ("{{ steps.a.response.code }}", "a response has"),
            ("{{ steps.a.response.headers.X-Id }}", "lower case"),
            ("{{ steps.a.response.status.x }}", "no fields"),
            ("{{ input.items[x] }}", "array index"),
            ("{{ input.items[] }}", "empty array index"),
        ] {
            let e = parse_template(s).unwrap_err();
            assert!(e.0.contains(want), "{s}: {e}");
        }
    }
}
