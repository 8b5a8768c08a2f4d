//! The expression language: parse_template on any string, and render (the evaluator) of that
//! string, alone and inside a JSON document, against a fixed context. Never a panic; a
//! template that parses renders or names what is missing.
#![no_main]

use dispatched_core::expr::{self, Context, Rendered};
use libfuzzer_sys::fuzz_target;
use serde_json::json;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let parsed = expr::parse_template(s);
    let input = json!({"amount": 4999, "order_id": 42, "customer": {"name": "Ann"},
                       "items": [{"sku": "a"}, {"sku": "b"}], "n": null, "t": true});
    let steps = json!({"charge": {"response": {"status": 200,
                                               "headers": {"x-request-id": "req-1"},
                                               "body": {"id": "txn_1", "list": [1, 2, {"x": [3]}]}},
                                  "signal": {"by": "bank"}}});
    let secret = |n: &str| (n == "stripe").then(|| "sk_live_abc".to_string());
    let ctx = Context {
        input: &input,
        run_id: "run_abcdefghijk",
        steps: &steps,
        secret: &secret,
    };
    let mut out = Rendered::default();
    let direct = expr::render_str(s, &ctx, &mut out);
    // render_str parses the same way: a syntax error there is a syntax error here
    if parsed.is_err() {
        assert!(direct.is_err());
    }
    let doc = json!({"a": s, "b": [s, {"c": s}], "n": 1});
    let _ = expr::render(&doc, &ctx, &mut out);
    if let Ok(t) = parsed {
        for e in t.exprs() {
            assert!(!e.segments.is_empty());
        }
    }
});
