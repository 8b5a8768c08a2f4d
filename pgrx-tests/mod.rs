//! In-database tests (`cargo pgrx test`): every SQL function, every bad input with its
//! SQLSTATE and message. Behaviour that starts at commit is tested black-box in `tests/`.
//!
//! Each `#[pg_test]` runs in its own transaction that is rolled back, possibly in parallel
//! with the others, so every test uses its own workflow, role and key names.

use pgrx::prelude::*;

#[pg_schema]
mod tests {
    use pgrx::datum::DatumWithOid;
    use pgrx::prelude::*;
    use pgrx::JsonB;
    use serde_json::{json, Value};
    use std::time::{Duration, Instant};

    // ---------------------------------------------------------------------------------------
    // Helpers
    // ---------------------------------------------------------------------------------------

    /// Runs a statement that returns nothing of interest.
    fn exec(sql: &str) {
        Spi::run(sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    fn exec_a(sql: &str, args: &[DatumWithOid<'_>]) {
        Spi::run_with_args(sql, args).unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    /// The first column of the first row (NULL as None).
    fn opt<T: FromDatum + IntoDatum>(sql: &str, args: &[DatumWithOid<'_>]) -> Option<T> {
        Spi::get_one_with_args::<T>(sql, args).unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    /// The first column of the first row, which must not be NULL.
    fn one<T: FromDatum + IntoDatum>(sql: &str, args: &[DatumWithOid<'_>]) -> T {
        opt(sql, args).unwrap_or_else(|| panic!("{sql}: returned NULL"))
    }

    fn js(sql: &str, args: &[DatumWithOid<'_>]) -> Value {
        one::<JsonB>(sql, args).0
    }

    fn js_opt(sql: &str, args: &[DatumWithOid<'_>]) -> Option<Value> {
        opt::<JsonB>(sql, args).map(|j| j.0)
    }

    /// Runs `sql` and returns `SQLSTATE: message` (and ` | detail` when there is one), or
    /// `no error`. The statement runs in a subtransaction, so the test goes on after it.
    fn err(sql: &str) -> String {
        let exists = one::<bool>(
            "SELECT to_regprocedure('pg_temp.err(text)') IS NOT NULL",
            &[],
        );
        if !exists {
            exec(
                "CREATE FUNCTION pg_temp.err(q text) RETURNS text LANGUAGE plpgsql AS $$
                 DECLARE d text;
                 BEGIN
                     EXECUTE q;
                     RETURN 'no error';
                 EXCEPTION WHEN OTHERS THEN
                     GET STACKED DIAGNOSTICS d = PG_EXCEPTION_DETAIL;
                     RETURN SQLSTATE || ': ' || SQLERRM || coalesce(nullif(' | ' || d, ' | '), '');
                 END $$",
            );
        }
        one("SELECT pg_temp.err($1)", &[sql.into()])
    }

    /// A statement must succeed (checked through `err`, so it also works as another role).
    fn ok(sql: &str) {
        assert_eq!(err(sql), "no error", "{sql}");
    }

    /// Two steps: a request, then a wait for signal `go`.
    const TWO_STEPS: &str = r#"{"steps": [
        {"id": "a", "request": {"url": "https://api.example.com/a"}},
        {"id": "b", "wait": {"signal": "go"}}
    ]}"#;

    fn define(name: &str, definition: &str) -> i32 {
        one(
            "SELECT dispatched.define_workflow($1, $2::jsonb)",
            &[name.into(), definition.into()],
        )
    }

    fn start(workflow: &str, input: &str) -> String {
        one(
            "SELECT dispatched.start_run($1, $2::jsonb)",
            &[workflow.into(), input.into()],
        )
    }

    fn start_key(workflow: &str, input: &str, key: &str) -> String {
        one(
            "SELECT dispatched.start_run($1, $2::jsonb, $3)",
            &[workflow.into(), input.into(), key.into()],
        )
    }

    fn run_doc(id: &str) -> Option<Value> {
        js_opt("SELECT dispatched.run($1)", &[id.into()])
    }

    fn output(id: &str) -> Value {
        js("SELECT dispatched.output($1)", &[id.into()])
    }

    fn status(id: &str) -> String {
        one(
            "SELECT status FROM dispatched.runs WHERE id = $1",
            &[id.into()],
        )
    }

    fn count(sql: &str, args: &[DatumWithOid<'_>]) -> i64 {
        one::<i64>(sql, args)
    }

    /// The run's events as (seq, type, step, data).
    fn events(id: &str) -> Vec<(i64, String, Option<String>, Value)> {
        let v = js(
            "SELECT coalesce(jsonb_agg(jsonb_build_array(seq, type, step, data) ORDER BY seq), '[]')
               FROM dispatched.events($1)",
            &[id.into()],
        );
        v.as_array()
            .unwrap()
            .iter()
            .map(|e| {
                (
                    e[0].as_i64().unwrap(),
                    e[1].as_str().unwrap().to_string(),
                    e[2].as_str().map(str::to_string),
                    e[3].clone(),
                )
            })
            .collect()
    }

    fn event_types(id: &str) -> Vec<String> {
        events(id).into_iter().map(|e| e.1).collect()
    }

    fn begin(endpoint: &str, key: &str) -> Value {
        js(
            "SELECT dispatched.idempotency_begin($1, $2)",
            &[endpoint.into(), key.into()],
        )
    }

    fn complete(endpoint: &str, key: &str, status: i32, body: &str, headers: &str) {
        exec_a(
            "SELECT dispatched.idempotency_complete($1, $2, $3, $4::jsonb, $5::jsonb)",
            &[
                endpoint.into(),
                key.into(),
                status.into(),
                body.into(),
                headers.into(),
            ],
        );
    }

    fn sha256_hex(text: &str) -> String {
        one(
            "SELECT encode(sha256(convert_to($1, 'UTF8')), 'hex')",
            &[text.into()],
        )
    }

    fn set_role(role: &str) {
        exec(&format!("SET LOCAL ROLE {role}"));
    }

    fn reset_role() {
        exec("RESET ROLE");
    }

    // ---------------------------------------------------------------------------------------
    // define_workflow
    // ---------------------------------------------------------------------------------------

    #[pg_test]
    fn define_workflow_versions() {
        let a = r#"{"steps": [{"id": "a", "request": {"url": "https://h.example/a"}}]}"#;
        // The same document with other key order and spacing is the same jsonb.
        let a2 = r#"{ "steps":[{"request":{"url":"https://h.example/a"},"id":"a"}] }"#;
        let b = r#"{"steps": [{"id": "a", "wait": {"signal": "go"}}]}"#;
        assert_eq!(define("t_ver", a), 1);
        assert_eq!(define("t_ver", a), 1);
        assert_eq!(define("t_ver", a2), 1);
        assert_eq!(define("t_ver", b), 2);
        assert_eq!(define("t_ver", b), 2);
        assert_eq!(define("t_ver", a), 3);
        assert_eq!(define("t_ver", b), 4);
        // another name has its own versions
        assert_eq!(define("t_ver.other", b), 1);
        assert_eq!(define("t_ver.other", a), 2);

        let stored = js(
            "SELECT jsonb_agg(jsonb_build_array(version, definition, created_by) ORDER BY version)
               FROM dispatched.workflows WHERE name = 't_ver'",
            &[],
        );
        let (va, vb): (Value, Value) = (
            serde_json::from_str(a).unwrap(),
            serde_json::from_str(b).unwrap(),
        );
        assert_eq!(
            stored,
            json!([
                [1, va, "postgres"],
                [2, vb, "postgres"],
                [3, va, "postgres"],
                [4, vb, "postgres"]
            ])
        );
        assert_eq!(
            count(
                "SELECT count(*) FROM dispatched.workflows WHERE name = 't_ver.other'",
                &[]
            ),
            2
        );
    }

    #[pg_test]
    fn define_workflow_rejects_invalid_definitions_with_their_json_path() {
        let cases: &[(&str, &str)] = &[
            (
                r#"{"steps": [{"id": "a", "wait": {"signal": "s"}}, {"id": "b", "request": {"method": "POST"}}]}"#,
                "steps[1].request.url: required",
            ),
            (
                r#"{"steps": [{"id": "a", "wait": {"signal": "s"}}, {"id": "a", "wait": {"signal": "t"}}]}"#,
                r#"steps[1].id: duplicate id "a""#,
            ),
            (
                r#"{"steps": [{"id": "a", "request": {}}, {"id": "a", "wait": {}}]}"#,
                r#"steps[1].id: duplicate id "a"; steps[0].request.url: required; steps[1].wait.signal: required"#,
            ),
            (r#"{}"#, "steps: required"),
            (r#"[]"#, "(definition): must be an object, not an array"),
            (r#"null"#, "(definition): must be an object, not null"),
            (r#"{"steps": {}}"#, "steps: must be an array, not an object"),
            (r#"{"steps": []}"#, "steps: must have at least one step"),
            (
                r#"{"steps": [{"id": "a"}]}"#,
                "steps[0]: a step needs a request, a wait, or both",
            ),
            (
                r#"{"steps": [{"id": "a", "wait": {"signal": "s"}}], "extra": 1}"#,
                "extra: unknown field (allowed: steps, output)",
            ),
            (
                r#"{"steps": [{"id": "a", "request": {"url": "ftp://h/"}}]}"#,
                r#"steps[0].request.url: "ftp://h/" is not an http:// or https:// URL"#,
            ),
            (
                r#"{"steps": [{"id": "a", "wait": {"signal": "s", "timeout": "soon"}}]}"#,
                r#"steps[0].wait.timeout: invalid duration "soon": a number must come before each unit (expected e.g. 500ms, 30s, 10m, 2h, 1d)"#,
            ),
            (
                r#"{"steps": [{"id": "a", "request": {"url": "http://h/"}, "timeout": "2d"}]}"#,
                "steps[0].timeout: must be at most 1d",
            ),
            (
                r#"{"steps": [{"id": "a", "request": {"url": "http://h/"}, "retry": {"max_attempts": 0}}]}"#,
                "steps[0].retry.max_attempts: must be an integer from 1 to 1000",
            ),
            (
                r#"{"steps": [{"id": "a", "request": {"url": "http://h/", "headers": {"Idempotency-Key": "x"}}}]}"#,
                "steps[0].request.headers.Idempotency-Key: set by dispatched itself; a definition may not set it",
            ),
            (
                r#"{"steps": [{"id": "a", "request": {"url": "http://h/"}}], "output": {"k": "{{ secrets.x }}"}}"#,
                "output.k: secrets.x: secrets may only be used in request and compensate",
            ),
            (
                r#"{"steps": [{"id": "a", "request": {"url": "http://h/", "body": {"x": "{{ steps.b.response.body }}"}}}, {"id": "b", "request": {"url": "http://h/"}}]}"#,
                r#"steps[0].request.body.x: steps.b.response.body: step "b" has not run yet at this point"#,
            ),
        ];
        for (definition, message) in cases {
            let sql = format!(
                "SELECT dispatched.define_workflow('t_invalid', '{}'::jsonb)",
                definition.replace('\'', "''")
            );
            assert_eq!(err(&sql), format!("22023: {message}"), "{definition}");
        }
        // nothing was stored
        assert_eq!(
            count(
                "SELECT count(*) FROM dispatched.workflows WHERE name = 't_invalid'",
                &[]
            ),
            0
        );

        // An invalid new version leaves the stored one alone; versions stay gapless.
        assert_eq!(define("t_invalid2", TWO_STEPS), 1);
        assert_eq!(
            err(r#"SELECT dispatched.define_workflow('t_invalid2', '{"steps": []}')"#),
            "22023: steps: must have at least one step"
        );
        assert_eq!(
            count(
                "SELECT count(*) FROM dispatched.workflows WHERE name = 't_invalid2'",
                &[]
            ),
            1
        );
        assert_eq!(
            define(
                "t_invalid2",
                r#"{"steps": [{"id": "x", "wait": {"signal": "s"}}]}"#
            ),
            2
        );
    }

    #[pg_test(error = "steps[1].request.url: required")]
    fn define_workflow_raises_the_path_of_the_problem() {
        define(
            "t_raise",
            r#"{"steps": [{"id": "a", "wait": {"signal": "s"}}, {"id": "b", "request": {}}]}"#,
        );
    }

    #[pg_test]
    fn define_workflow_null_arguments_and_bad_names() {
        let def = TWO_STEPS.replace('\n', " ");
        let call = |name: &str| format!("SELECT dispatched.define_workflow({name}, '{def}')");
        assert_eq!(err(&call("NULL")), "22023: name: required");
        assert_eq!(
            err("SELECT dispatched.define_workflow('t_nulldef', NULL)"),
            "22023: definition: required"
        );
        assert_eq!(err(&call("''")), "22023: workflow name must not be empty");
        assert_eq!(
            err(&call("'a b'")),
            r#"22023: workflow name "a b" contains ' '; only A-Z a-z 0-9 - _ . : are allowed"#
        );
        assert_eq!(
            err(&call("'a/b'")),
            r#"22023: workflow name "a/b" contains '/'; only A-Z a-z 0-9 - _ . : are allowed"#
        );
        assert_eq!(
            err(&call("repeat('w', 129)")),
            "22023: workflow name is longer than 128 characters"
        );
        // 65 non-ASCII characters are 130 bytes: refused for the character, not the length
        assert_eq!(
            err(&call("repeat('é', 65)")),
            format!(
                r#"22023: workflow name "{}" contains 'é'; only A-Z a-z 0-9 - _ . : are allowed"#,
                "é".repeat(65)
            )
        );
        // nothing was stored
        assert_eq!(
            count(
                "SELECT count(*) FROM dispatched.workflows
                  WHERE name IN ('t_nulldef', '', 'a b', 'a/b', repeat('w', 129), repeat('é', 65))",
                &[]
            ),
            0
        );
        // the longest name and the dotted form are fine
        assert_eq!(define(&"w".repeat(128), TWO_STEPS), 1);
        assert_eq!(define("t_billing.checkout:v2", TWO_STEPS), 1);
    }

    // ---------------------------------------------------------------------------------------
    // set_secret
    // ---------------------------------------------------------------------------------------

    #[pg_test]
    fn set_secret_stores_and_replaces() {
        exec("SELECT dispatched.set_secret('t_stripe', 'sk_one')");
        assert_eq!(
            js(
                "SELECT jsonb_agg(jsonb_build_array(value, updated_by))
                   FROM dispatched.secrets WHERE name = 't_stripe'",
                &[]
            ),
            json!([["sk_one", "postgres"]])
        );
        exec("SELECT dispatched.set_secret('t_stripe', 'sk_two')");
        assert_eq!(
            js(
                "SELECT jsonb_agg(value) FROM dispatched.secrets WHERE name = 't_stripe'",
                &[]
            ),
            json!(["sk_two"])
        );
        assert_eq!(
            err("SELECT dispatched.set_secret(NULL, 'x')"),
            "22023: name: required"
        );
        assert_eq!(
            err("SELECT dispatched.set_secret('t_x', NULL)"),
            "22023: value: required"
        );
        assert_eq!(
            err("SELECT dispatched.set_secret('', 'x')"),
            "22023: secret name must not be empty"
        );
        assert_eq!(
            err("SELECT dispatched.set_secret('a.b', 'x')"),
            r#"22023: secret name "a.b" contains '.'; only A-Z a-z 0-9 - _ are allowed"#
        );
        assert_eq!(
            count(
                "SELECT count(*) FROM dispatched.secrets WHERE name IN ('t_x', '', 'a.b')",
                &[]
            ),
            0
        );
    }

    // ---------------------------------------------------------------------------------------
    // start_run
    // ---------------------------------------------------------------------------------------

    #[pg_test]
    fn start_run_returns_a_url_safe_id_and_a_pending_run() {
        define("t_start", TWO_STEPS);
        let id = start("t_start", r#"{"order": 7}"#);
        assert!(id.starts_with("run_"), "{id}");
        assert!(id.len() >= 14, "{id}");
        assert!(
            id[4..]
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'),
            "{id}"
        );
        let other = start("t_start", r#"{"order": 7}"#);
        assert_ne!(id, other);

        assert_eq!(status(&id), "pending");
        // due at once: a task row due now()
        assert!(one::<bool>(
            "SELECT due_at = now() AND lease_owner IS NULL AND claims = 0
               FROM dispatched.tasks WHERE run_id = $1",
            &[id.as_str().into()]
        ));
        let ev = events(&id);
        assert_eq!(ev.len(), 1);
        assert_eq!(
            ev[0],
            (
                1,
                "run.started".to_string(),
                None,
                json!({"workflow": "t_start", "version": 1, "input": {"order": 7}})
            )
        );
    }

    #[pg_test]
    fn start_run_null_input_becomes_an_empty_object() {
        define("t_nullinput", TWO_STEPS);
        let id: String = one("SELECT dispatched.start_run('t_nullinput', NULL)", &[]);
        assert_eq!(run_doc(&id).unwrap()["input"], json!({}));
        let id2: String = one("SELECT dispatched.start_run('t_nullinput')", &[]);
        assert_eq!(run_doc(&id2).unwrap()["input"], json!({}));
        // nulls inside the input are kept, in the run and in its run.started event
        let id3 = start("t_nullinput", r#"{"a": null, "b": {"c": null}}"#);
        assert_eq!(
            run_doc(&id3).unwrap()["input"],
            json!({"a": null, "b": {"c": null}})
        );
        assert_eq!(
            events(&id3)[0].3,
            json!({"workflow": "t_nullinput", "version": 1, "input": {"a": null, "b": {"c": null}}})
        );
    }

    #[pg_test]
    fn start_run_with_an_idempotency_key() {
        define("t_idem", TWO_STEPS);
        define("t_idem_other", TWO_STEPS);
        let id = start_key("t_idem", r#"{"n": 1}"#, "order-42");
        assert_eq!(start_key("t_idem", r#"{"n": 1}"#, "order-42"), id);
        assert_eq!(start_key("t_idem", r#"{ "n":1 }"#, "order-42"), id);
        assert_eq!(
            count(
                "SELECT count(*) FROM dispatched.runs WHERE workflow = 't_idem'",
                &[]
            ),
            1
        );
        // one run, one run.started event carrying the key
        assert_eq!(
            events(&id)
                .into_iter()
                .map(|e| (e.0, e.1, e.3))
                .collect::<Vec<_>>(),
            vec![(
                1,
                "run.started".to_string(),
                json!({"workflow": "t_idem", "version": 1, "input": {"n": 1}, "idempotency_key": "order-42"})
            )]
        );
        assert_eq!(run_doc(&id).unwrap()["idempotency_key"], json!("order-42"));

        let reused = format!(
            r#"23505: idempotency_key_reused: key "order-42" already started run {id} with another workflow or input"#
        );
        assert_eq!(
            err(r#"SELECT dispatched.start_run('t_idem', '{"n": 2}', 'order-42')"#),
            reused
        );
        assert_eq!(
            err(r#"SELECT dispatched.start_run('t_idem_other', '{"n": 1}', 'order-42')"#),
            reused
        );
        assert_eq!(
            err(r#"SELECT dispatched.start_run('t_idem', NULL, 'order-42')"#),
            reused
        );
        // NULL input is {}: the same key with NULL or {} is the same request
        let empty = start_key("t_idem", "{}", "order-43");
        assert_eq!(
            one::<String>(
                "SELECT dispatched.start_run('t_idem', NULL, 'order-43')",
                &[]
            ),
            empty
        );
        // another key is another run
        assert_ne!(start_key("t_idem", r#"{"n": 1}"#, "order-44"), id);
        assert_eq!(
            count(
                "SELECT count(*) FROM dispatched.runs WHERE workflow IN ('t_idem', 't_idem_other')",
                &[]
            ),
            3
        );
    }

    #[pg_test]
    fn start_run_refuses_bad_keys() {
        define("t_keys", TWO_STEPS);
        let only = "only A-Z a-z 0-9 - . _ ~ are allowed";
        let cases = [
            ("''", "idempotency key must not be empty".to_string()),
            (
                "repeat('k', 256)",
                "idempotency key is 256 characters long; at most 255 are allowed".to_string(),
            ),
            ("'a b'", format!("idempotency key contains ' '; {only}")),
            ("'a/b'", format!("idempotency key contains '/'; {only}")),
            ("'ordér'", format!("idempotency key contains 'é'; {only}")),
            // 128 characters, 256 bytes: refused for the character, not the length
            (
                "repeat('é', 128)",
                format!("idempotency key contains 'é'; {only}"),
            ),
        ];
        for (key, message) in cases {
            assert_eq!(
                err(&format!(
                    "SELECT dispatched.start_run('t_keys', '{{}}', {key})"
                )),
                format!("22023: idempotency_key: {message}"),
                "{key}"
            );
        }
        assert_eq!(
            count(
                "SELECT count(*) FROM dispatched.runs WHERE workflow = 't_keys'",
                &[]
            ),
            0
        );
        let long = format!("{}-._~Z9", "k".repeat(249));
        assert_eq!(long.len(), 255);
        let id = start_key("t_keys", "{}", &long);
        assert_eq!(start_key("t_keys", "{}", &long), id);
        assert_eq!(run_doc(&id).unwrap()["idempotency_key"], json!(long));
    }

    #[pg_test]
    fn start_run_unknown_workflow_null_workflow_and_negative_delay() {
        assert_eq!(
            err("SELECT dispatched.start_run('t_nope')"),
            r#"42704: workflow "t_nope" does not exist"#
        );
        assert_eq!(
            err("SELECT dispatched.start_run(NULL)"),
            "22023: workflow: required"
        );
        define("t_delay_neg", TWO_STEPS);
        assert_eq!(
            err("SELECT dispatched.start_run('t_delay_neg', '{}', NULL, interval '-1 second')"),
            "22023: delay: must not be negative, got -00:00:01"
        );
        assert_eq!(
            count(
                "SELECT count(*) FROM dispatched.runs WHERE workflow = 't_delay_neg'",
                &[]
            ),
            0
        );
    }

    #[pg_test(error = "workflow \"t_missing\" does not exist")]
    fn start_run_of_an_unknown_workflow_raises() {
        start("t_missing", "{}");
    }

    #[pg_test]
    fn start_run_with_a_delay_is_pending_until_due() {
        define("t_delay", TWO_STEPS);
        let id: String = one(
            "SELECT dispatched.start_run('t_delay', '{}', NULL, interval '1 hour')",
            &[],
        );
        assert_eq!(status(&id), "pending");
        assert_eq!(run_doc(&id).unwrap()["status"], json!("pending"));
        assert_eq!(output(&id), json!({"message": "not ready"}));
        // due an hour after the call (clock time, not transaction start)
        assert!(one::<bool>(
            "SELECT due_at > now() + interval '1 hour' AND due_at <= clock_timestamp() + interval '1 hour'
               FROM dispatched.tasks WHERE run_id = $1",
            &[id.as_str().into()]
        ));
        // the run.started event says when
        assert!(one::<bool>(
            "SELECT (e.data ->> 'not_before')::timestamptz = t.due_at
               FROM dispatched.events($1) e, dispatched.tasks t
              WHERE t.run_id = $1 AND e.type = 'run.started'",
            &[id.as_str().into()]
        ));
        // a zero delay is allowed
        let id0: String = one(
            "SELECT dispatched.start_run('t_delay', '{}', NULL, interval '0')",
            &[],
        );
        assert_eq!(status(&id0), "pending");
    }

    #[pg_test]
    fn runs_keep_their_version() {
        let v1 = r#"{"steps": [{"id": "first", "request": {"url": "https://h.example/1"}}]}"#;
        assert_eq!(define("t_keep", v1), 1);
        let r1 = start("t_keep", "{}");
        assert_eq!(define("t_keep", TWO_STEPS), 2);
        let r2 = start("t_keep", "{}");
        let d1 = run_doc(&r1).unwrap();
        let d2 = run_doc(&r2).unwrap();
        assert_eq!(d1["version"], json!(1));
        assert_eq!(d2["version"], json!(2));
        let ids = |d: &Value| -> Vec<String> {
            d["steps"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| s["id"].as_str().unwrap().to_string())
                .collect()
        };
        assert_eq!(ids(&d1), vec!["first"]);
        assert_eq!(ids(&d2), vec!["a", "b"]);
        assert_eq!(events(&r1)[0].3["version"], json!(1));
        assert_eq!(events(&r2)[0].3["version"], json!(2));
    }

    // ---------------------------------------------------------------------------------------
    // run, output, attach
    // ---------------------------------------------------------------------------------------

    #[pg_test]
    fn run_returns_the_run_document() {
        define(
            "t_doc",
            r#"{"steps": [
                {"id": "charge", "request": {"url": "https://h.example/charge"}},
                {"id": "confirm", "wait": {"signal": "confirmed"}},
                {"id": "ship", "request": {"url": "https://h.example/ship"}}
            ]}"#,
        );
        let id = start_key("t_doc", r#"{"order": 42, "note": null}"#, "doc-1");
        let pending_step = |sid: &str| {
            json!({"id": sid, "status": "pending", "attempt": 0, "response": null,
                   "signal": null, "error": null, "started_at": null, "finished_at": null})
        };
        let doc = js(
            "SELECT dispatched.run($1) - 'created_at' - 'updated_at'",
            &[id.as_str().into()],
        );
        assert_eq!(
            doc,
            json!({
                "id": id,
                "workflow": "t_doc",
                "version": 1,
                "status": "pending",
                "input": {"order": 42, "note": null},
                "output": null,
                "error": null,
                "parent": null,
                "idempotency_key": "doc-1",
                "tenant": "postgres",
                "steps": [pending_step("charge"), pending_step("confirm"), pending_step("ship")],
                "finished_at": null
            })
        );
        assert!(one::<bool>(
            "SELECT (d ->> 'created_at')::timestamptz = now() AND (d ->> 'updated_at')::timestamptz = now()
               FROM dispatched.run($1) d",
            &[id.as_str().into()]
        ));
        assert_eq!(run_doc("run_doesnotexist00000000"), None);
        assert_eq!(js_opt("SELECT dispatched.run(NULL)", &[]), None);
    }

    #[pg_test]
    fn output_answers_for_every_state() {
        define("t_output", TWO_STEPS);
        let id = start("t_output", "{}");
        assert_eq!(output(&id), json!({"message": "not ready"}));
        assert_eq!(
            output("run_doesnotexist00000000"),
            json!({"message": "not found"})
        );
        assert_eq!(
            js("SELECT dispatched.output(NULL)", &[]),
            json!({"message": "not found"})
        );

        // The states a worker leads to, set by hand.
        for st in ["running", "waiting"] {
            exec_a(
                "UPDATE dispatched.runs SET status = $2 WHERE id = $1",
                &[id.as_str().into(), st.into()],
            );
            assert_eq!(output(&id), json!({"message": "not ready"}), "{st}");
        }
        exec_a(
            r#"UPDATE dispatched.runs SET status = 'completed', output = '{"ok": true, "n": [1, 2]}' WHERE id = $1"#,
            &[id.as_str().into()],
        );
        assert_eq!(output(&id), json!({"ok": true, "n": [1, 2]}));
        exec_a(
            "UPDATE dispatched.runs SET status = 'completed', output = NULL WHERE id = $1",
            &[id.as_str().into()],
        );
        assert_eq!(output(&id), Value::Null);
        exec_a(
            r#"UPDATE dispatched.runs SET status = 'failed', output = NULL,
                   error = '{"message": "HTTP 404", "step": "a", "status": 404}' WHERE id = $1"#,
            &[id.as_str().into()],
        );
        assert_eq!(
            output(&id),
            json!({"message": "HTTP 404", "step": "a", "status": 404})
        );

        let c = start("t_output", "{}");
        assert!(one::<bool>(
            "SELECT dispatched.cancel_run($1, 'no longer needed')",
            &[c.as_str().into()]
        ));
        assert_eq!(
            output(&c),
            json!({"message": "cancelled: no longer needed", "step": null, "status": null,
                   "reason": "no longer needed"})
        );
    }

    #[pg_test]
    fn attach_times_out_on_a_pending_run() {
        define("t_attach", TWO_STEPS);
        let id = start("t_attach", "{}");
        let t = Instant::now();
        assert_eq!(
            js(
                "SELECT dispatched.attach($1, interval '200 milliseconds')",
                &[id.as_str().into()]
            ),
            json!({"message": "not ready"})
        );
        let waited = t.elapsed();
        assert!(waited >= Duration::from_millis(200), "{waited:?}");
        assert!(waited < Duration::from_secs(10), "{waited:?}");

        let t = Instant::now();
        assert_eq!(
            js(
                "SELECT dispatched.attach($1, interval '0')",
                &[id.as_str().into()]
            ),
            json!({"message": "not ready"})
        );
        assert!(t.elapsed() < Duration::from_secs(5));
        assert_eq!(status(&id), "pending");
    }

    #[pg_test]
    fn attach_answers_at_once_when_there_is_nothing_to_wait_for() {
        define("t_attach_now", TWO_STEPS);
        let t = Instant::now();
        assert_eq!(
            js(
                "SELECT dispatched.attach('run_doesnotexist00000000', interval '30s')",
                &[]
            ),
            json!({"message": "not found"})
        );
        let id = start("t_attach_now", "{}");
        assert!(one::<bool>(
            "SELECT dispatched.cancel_run($1)",
            &[id.as_str().into()]
        ));
        assert_eq!(
            js("SELECT dispatched.attach($1)", &[id.as_str().into()]),
            json!({"message": "cancelled", "step": null, "status": null, "reason": null})
        );
        exec_a(
            r#"UPDATE dispatched.runs SET status = 'completed', output = '"done"', error = NULL WHERE id = $1"#,
            &[id.as_str().into()],
        );
        assert_eq!(
            js(
                "SELECT dispatched.attach($1, interval '30s')",
                &[id.as_str().into()]
            ),
            json!("done")
        );
        assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());

        assert_eq!(
            err(&format!(
                "SELECT dispatched.attach('{id}', interval '-1 second')"
            )),
            "22023: timeout: must be zero or more, got -00:00:01"
        );
        assert_eq!(
            err(&format!("SELECT dispatched.attach('{id}', NULL)")),
            "22023: timeout: must be zero or more, got NULL"
        );
    }

    // ---------------------------------------------------------------------------------------
    // signal
    // ---------------------------------------------------------------------------------------

    #[pg_test]
    fn signal_is_buffered_until_a_step_waits_for_it() {
        define("t_signal", TWO_STEPS);
        let id = start("t_signal", "{}");
        assert!(one::<bool>(
            r#"SELECT dispatched.signal($1, 'go', '{"ok": true, "note": null}')"#,
            &[id.as_str().into()]
        ));
        assert!(one::<bool>(
            "SELECT dispatched.signal($1, 'payment.confirmed:v1')",
            &[id.as_str().into()]
        ));
        assert_eq!(
            js(
                "SELECT jsonb_agg(jsonb_build_array(name, data, idempotency_key, taken_by_step) ORDER BY id)
                   FROM dispatched.signals WHERE run_id = $1",
                &[id.as_str().into()]
            ),
            json!([
                ["go", {"ok": true, "note": null}, null, null],
                ["payment.confirmed:v1", null, null, null]
            ])
        );
        assert_eq!(
            events(&id)
                .into_iter()
                .map(|e| (e.0, e.1, e.2, e.3))
                .collect::<Vec<_>>(),
            vec![
                (
                    1,
                    "run.started".to_string(),
                    None,
                    json!({"workflow": "t_signal", "version": 1, "input": {}})
                ),
                (
                    2,
                    "signal.received".to_string(),
                    None,
                    json!({"name": "go", "data": {"ok": true, "note": null}})
                ),
                (
                    3,
                    "signal.received".to_string(),
                    None,
                    json!({"name": "payment.confirmed:v1"})
                ),
            ]
        );
        // the run is not waiting, so nothing was made due beyond its start
        assert_eq!(status(&id), "pending");
        assert_eq!(
            count(
                "SELECT count(*) FROM dispatched.tasks WHERE run_id = $1",
                &[id.as_str().into()]
            ),
            1
        );
    }

    #[pg_test]
    fn signal_with_an_idempotency_key_is_delivered_once() {
        define("t_signal_key", TWO_STEPS);
        let id = start("t_signal_key", "{}");
        for _ in 0..3 {
            assert!(one::<bool>(
                r#"SELECT dispatched.signal($1, 'go', '{"n": 1}', 'sig-1')"#,
                &[id.as_str().into()]
            ));
        }
        assert_eq!(
            count(
                "SELECT count(*) FROM dispatched.signals WHERE run_id = $1",
                &[id.as_str().into()]
            ),
            1
        );
        assert_eq!(event_types(&id), vec!["run.started", "signal.received"]);
        assert_eq!(
            events(&id)[1].3,
            json!({"name": "go", "data": {"n": 1}, "idempotency_key": "sig-1"})
        );
        // another key is another signal
        assert!(one::<bool>(
            r#"SELECT dispatched.signal($1, 'go', '{"n": 2}', 'sig-2')"#,
            &[id.as_str().into()]
        ));
        assert_eq!(
            js(
                "SELECT jsonb_agg(jsonb_build_array(data, idempotency_key) ORDER BY id)
                   FROM dispatched.signals WHERE run_id = $1",
                &[id.as_str().into()]
            ),
            json!([[{"n": 1}, "sig-1"], [{"n": 2}, "sig-2"]])
        );
        // keys are per run: the same key on another run is delivered there
        let other = start("t_signal_key", "{}");
        assert!(one::<bool>(
            "SELECT dispatched.signal($1, 'go', NULL, 'sig-1')",
            &[other.as_str().into()]
        ));
        assert_eq!(
            count(
                "SELECT count(*) FROM dispatched.signals WHERE run_id = $1",
                &[other.as_str().into()]
            ),
            1
        );
    }

    #[pg_test]
    fn signal_to_a_finished_or_unknown_run_and_bad_input() {
        define("t_signal_bad", TWO_STEPS);
        let id = start("t_signal_bad", "{}");
        let only_names = "only A-Z a-z 0-9 - _ . : are allowed";
        let only_keys = "only A-Z a-z 0-9 - . _ ~ are allowed";
        let cases = [
            (format!("'{id}', NULL"), "22023: name: required".to_string()),
            (
                format!("'{id}', ''"),
                "22023: signal name must not be empty".to_string(),
            ),
            (
                format!("'{id}', 'a b'"),
                format!(r#"22023: signal name "a b" contains ' '; {only_names}"#),
            ),
            (
                format!("'{id}', repeat('s', 129)"),
                "22023: signal name is longer than 128 characters".to_string(),
            ),
            (
                format!("'{id}', 'go', NULL, ''"),
                "22023: idempotency_key: idempotency key must not be empty".to_string(),
            ),
            (
                format!("'{id}', 'go', NULL, 'a/b'"),
                format!("22023: idempotency_key: idempotency key contains '/'; {only_keys}"),
            ),
            (
                format!("'{id}', 'go', NULL, repeat('k', 256)"),
                "22023: idempotency_key: idempotency key is 256 characters long; at most 255 are allowed"
                    .to_string(),
            ),
            (
                "'run_doesnotexist00000000', 'go'".to_string(),
                r#"P0002: run "run_doesnotexist00000000" does not exist"#.to_string(),
            ),
        ];
        for (args, want) in cases {
            assert_eq!(
                err(&format!("SELECT dispatched.signal({args})")),
                want,
                "{args}"
            );
        }
        assert_eq!(
            count(
                "SELECT count(*) FROM dispatched.signals WHERE run_id = $1",
                &[id.as_str().into()]
            ),
            0
        );

        // finished runs: false, nothing stored
        assert!(one::<bool>(
            "SELECT dispatched.cancel_run($1)",
            &[id.as_str().into()]
        ));
        assert!(!one::<bool>(
            "SELECT dispatched.signal($1, 'go')",
            &[id.as_str().into()]
        ));
        for st in ["completed", "failed"] {
            let r = start("t_signal_bad", "{}");
            exec_a(
                "UPDATE dispatched.runs SET status = $2 WHERE id = $1",
                &[r.as_str().into(), st.into()],
            );
            assert!(
                !one::<bool>("SELECT dispatched.signal($1, 'go')", &[r.as_str().into()]),
                "{st}"
            );
            assert_eq!(
                count(
                    "SELECT count(*) FROM dispatched.signals WHERE run_id = $1",
                    &[r.as_str().into()]
                ),
                0
            );
        }
        assert_eq!(
            count(
                "SELECT count(*) FROM dispatched.signals WHERE run_id = $1",
                &[id.as_str().into()]
            ),
            0
        );
        assert_eq!(event_types(&id), vec!["run.started", "run.cancelled"]);
    }

    #[pg_test]
    fn signal_makes_a_run_waiting_for_it_due() {
        define("t_signal_wake", TWO_STEPS);
        let id = start("t_signal_wake", "{}");
        // what a worker leaves behind when step b waits for `go` without a timeout
        exec_a(
            "UPDATE dispatched.runs SET status = 'waiting', waiting_for = 'go', step_index = 1 WHERE id = $1",
            &[id.as_str().into()],
        );
        exec_a(
            "DELETE FROM dispatched.tasks WHERE run_id = $1",
            &[id.as_str().into()],
        );
        // another name is only buffered
        assert!(one::<bool>(
            "SELECT dispatched.signal($1, 'other')",
            &[id.as_str().into()]
        ));
        assert_eq!(
            count(
                "SELECT count(*) FROM dispatched.tasks WHERE run_id = $1",
                &[id.as_str().into()]
            ),
            0
        );
        // the awaited name makes the run due now
        assert!(one::<bool>(
            "SELECT dispatched.signal($1, 'go')",
            &[id.as_str().into()]
        ));
        assert!(one::<bool>(
            "SELECT due_at = now() AND lease_owner IS NULL FROM dispatched.tasks WHERE run_id = $1",
            &[id.as_str().into()]
        ));
        assert_eq!(
            count(
                "SELECT count(*) FROM dispatched.signals WHERE run_id = $1 AND taken_by_step IS NULL",
                &[id.as_str().into()]
            ),
            2
        );
    }

    // ---------------------------------------------------------------------------------------
    // cancel_run
    // ---------------------------------------------------------------------------------------

    #[pg_test]
    fn cancel_run_cancels_once() {
        define("t_cancel", TWO_STEPS);
        let id = start("t_cancel", "{}");
        assert_eq!(
            count(
                "SELECT count(*) FROM dispatched.tasks WHERE run_id = $1",
                &[id.as_str().into()]
            ),
            1
        );
        assert!(one::<bool>(
            "SELECT dispatched.cancel_run($1, 'customer asked')",
            &[id.as_str().into()]
        ));
        assert!(!one::<bool>(
            "SELECT dispatched.cancel_run($1, 'again')",
            &[id.as_str().into()]
        ));
        assert!(!one::<bool>(
            "SELECT dispatched.cancel_run('run_doesnotexist00000000')",
            &[]
        ));
        assert!(!one::<bool>("SELECT dispatched.cancel_run(NULL)", &[]));

        let doc = run_doc(&id).unwrap();
        assert_eq!(doc["status"], json!("cancelled"));
        assert_eq!(
            doc["error"],
            json!({"message": "cancelled: customer asked", "step": null, "status": null,
                   "reason": "customer asked"})
        );
        assert!(doc["error"]["message"]
            .as_str()
            .unwrap()
            .contains("customer asked"));
        assert!(one::<bool>(
            "SELECT finished_at = now() FROM dispatched.runs WHERE id = $1",
            &[id.as_str().into()]
        ));
        // no further step starts: the task row is gone
        assert_eq!(
            count(
                "SELECT count(*) FROM dispatched.tasks WHERE run_id = $1",
                &[id.as_str().into()]
            ),
            0
        );
        let ev = events(&id);
        assert_eq!(ev.len(), 2);
        assert_eq!(
            (ev[1].0, ev[1].1.as_str(), ev[1].2.as_deref(), &ev[1].3),
            (
                2,
                "run.cancelled",
                None,
                &json!({"reason": "customer asked"})
            )
        );

        // without a reason
        let id2 = start("t_cancel", "{}");
        assert!(one::<bool>(
            "SELECT dispatched.cancel_run($1)",
            &[id2.as_str().into()]
        ));
        assert_eq!(
            run_doc(&id2).unwrap()["error"],
            json!({"message": "cancelled", "step": null, "status": null, "reason": null})
        );
        assert_eq!(events(&id2)[1].3, json!({"reason": null}));

        // completed and failed runs are finished
        for st in ["completed", "failed"] {
            let r = start("t_cancel", "{}");
            exec_a(
                "UPDATE dispatched.runs SET status = $2 WHERE id = $1",
                &[r.as_str().into(), st.into()],
            );
            assert!(
                !one::<bool>("SELECT dispatched.cancel_run($1)", &[r.as_str().into()]),
                "{st}"
            );
            assert_eq!(status(&r), st);
        }
    }

    #[pg_test]
    fn cancel_run_fails_the_step_in_progress() {
        define("t_cancel_step", TWO_STEPS);
        let id = start("t_cancel_step", "{}");
        // what a worker leaves behind while step a's request is on the wire
        exec_a(
            "UPDATE dispatched.runs SET status = 'running', step_index = 0 WHERE id = $1",
            &[id.as_str().into()],
        );
        exec_a(
            "INSERT INTO dispatched.steps (run_id, idx, step_id, status, attempt, started_at)
             VALUES ($1, 0, 'a', 'running', 1, now())",
            &[id.as_str().into()],
        );
        assert!(one::<bool>(
            "SELECT dispatched.cancel_run($1, 'stop')",
            &[id.as_str().into()]
        ));
        let doc = run_doc(&id).unwrap();
        assert_eq!(
            doc["error"],
            json!({"message": "cancelled: stop", "step": "a", "status": null, "reason": "stop"})
        );
        assert_eq!(doc["steps"][0]["status"], json!("failed"));
        assert_eq!(doc["steps"][0]["attempt"], json!(1));
        assert_eq!(doc["steps"][0]["error"], json!({"message": "cancelled"}));
        assert_eq!(doc["steps"][1]["status"], json!("pending"));
        let ev = events(&id);
        assert_eq!(ev[1].1, "run.cancelled");
        assert_eq!(ev[1].2.as_deref(), Some("a"));
    }

    // ---------------------------------------------------------------------------------------
    // events
    // ---------------------------------------------------------------------------------------

    #[pg_test]
    fn events_are_numbered_per_run_in_order() {
        define("t_events", TWO_STEPS);
        let a = start("t_events", r#"{"run": "a"}"#);
        let b = start("t_events", r#"{"run": "b"}"#);
        // interleave the two runs' events
        assert!(one::<bool>(
            "SELECT dispatched.signal($1, 's1')",
            &[a.as_str().into()]
        ));
        assert!(one::<bool>(
            "SELECT dispatched.signal($1, 's1')",
            &[b.as_str().into()]
        ));
        assert!(one::<bool>(
            r#"SELECT dispatched.signal($1, 's2', '{"x": 1}')"#,
            &[a.as_str().into()]
        ));
        assert!(one::<bool>(
            "SELECT dispatched.cancel_run($1, 'done')",
            &[a.as_str().into()]
        ));
        let ea = events(&a);
        assert_eq!(
            ea.iter()
                .map(|e| (e.0, e.1.as_str(), e.3.clone()))
                .collect::<Vec<_>>(),
            vec![
                (
                    1,
                    "run.started",
                    json!({"workflow": "t_events", "version": 1, "input": {"run": "a"}})
                ),
                (2, "signal.received", json!({"name": "s1"})),
                (
                    3,
                    "signal.received",
                    json!({"name": "s2", "data": {"x": 1}})
                ),
                (4, "run.cancelled", json!({"reason": "done"})),
            ]
        );
        assert_eq!(
            events(&b)
                .iter()
                .map(|e| (e.0, e.1.as_str()))
                .collect::<Vec<_>>(),
            vec![(1, "run.started"), (2, "signal.received")]
        );
        // `at` never goes back
        assert!(one::<bool>(
            "SELECT bool_and(at >= prev) FROM (
                SELECT at, lag(at, 1, '-infinity') OVER (ORDER BY seq) AS prev FROM dispatched.events($1)) x",
            &[a.as_str().into()]
        ));
        assert_eq!(
            count(
                "SELECT count(*) FROM dispatched.events('run_doesnotexist00000000')",
                &[]
            ),
            0
        );
    }

    // ---------------------------------------------------------------------------------------
    // Layer 1: idempotency_begin / idempotency_complete / idempotency_cache_key
    // ---------------------------------------------------------------------------------------

    #[pg_test]
    fn idempotency_begin_claims_a_key() {
        assert_eq!(begin("POST /t_claim", "k1"), json!({"state": "new"}));
        assert_eq!(
            begin("POST /t_claim", "k1"),
            json!({"state": "in_flight", "retry_after": 1})
        );
        // other keys and endpoints are independent
        assert_eq!(begin("POST /t_claim", "k2"), json!({"state": "new"}));
        assert_eq!(begin("POST /t_claim_other", "k1"), json!({"state": "new"}));
        // as are tenants
        assert_eq!(
            js(
                "SELECT dispatched.idempotency_begin('POST /t_claim', 'k1', 't_tenant_a')",
                &[]
            ),
            json!({"state": "new"})
        );
        assert_eq!(
            js(
                "SELECT dispatched.idempotency_begin('POST /t_claim', 'k1', 't_tenant_b')",
                &[]
            ),
            json!({"state": "new"})
        );
        assert_eq!(
            js(
                "SELECT dispatched.idempotency_begin('POST /t_claim', 'k1', 't_tenant_a')",
                &[]
            ),
            json!({"state": "in_flight", "retry_after": 1})
        );
        // the default tenant is current_user
        assert_eq!(
            js(
                "SELECT dispatched.idempotency_begin('POST /t_claim', 'k1', 'postgres')",
                &[]
            ),
            json!({"state": "in_flight", "retry_after": 1})
        );
        assert_eq!(
            js(
                "SELECT jsonb_agg(jsonb_build_array(tenant, key, state, cache_key) ORDER BY tenant)
                   FROM dispatched.idempotency_cache WHERE endpoint = 'POST /t_claim' AND key = 'k1'",
                &[]
            ),
            json!([
                ["postgres", "k1", "in_flight", sha256_hex("postgres:POST /t_claim:k1")],
                ["t_tenant_a", "k1", "in_flight", sha256_hex("t_tenant_a:POST /t_claim:k1")],
                ["t_tenant_b", "k1", "in_flight", sha256_hex("t_tenant_b:POST /t_claim:k1")]
            ])
        );
    }

    #[pg_test]
    fn idempotency_complete_caches_final_answers_for_replay() {
        assert_eq!(begin("POST /t_orders", "o-1"), json!({"state": "new"}));
        complete(
            "POST /t_orders",
            "o-1",
            201,
            r#"{"id": 17, "note": null}"#,
            r#"{"Location": "/orders/17", "Set-Cookie": "s=1", "set-cookie": "t=2", "X-Request-Id": "abc"}"#,
        );
        let replay = json!({"state": "replay", "status": 201,
                            "headers": {"Location": "/orders/17", "X-Request-Id": "abc"},
                            "body": {"id": 17, "note": null}});
        assert_eq!(begin("POST /t_orders", "o-1"), replay);
        assert_eq!(begin("POST /t_orders", "o-1"), replay);

        // default headers: {}
        assert_eq!(begin("POST /t_orders", "o-2"), json!({"state": "new"}));
        exec("SELECT dispatched.idempotency_complete('POST /t_orders', 'o-2', 200, '[1, 2]')");
        assert_eq!(
            begin("POST /t_orders", "o-2"),
            json!({"state": "replay", "status": 200, "headers": {}, "body": [1, 2]})
        );
        // NULL headers and a NULL body
        assert_eq!(begin("POST /t_orders", "o-3"), json!({"state": "new"}));
        exec("SELECT dispatched.idempotency_complete('POST /t_orders', 'o-3', 204, NULL, NULL)");
        assert_eq!(
            begin("POST /t_orders", "o-3"),
            json!({"state": "replay", "status": 204, "headers": {}, "body": null})
        );

        // non-retryable 4xx other than 400/401/403 are final too
        for (i, st) in [404, 409, 422].into_iter().enumerate() {
            let key = format!("fin-{i}");
            assert_eq!(begin("POST /t_orders", &key), json!({"state": "new"}));
            complete(
                "POST /t_orders",
                &key,
                st,
                r#"{"error": "nope"}"#,
                r#"{"Content-Type": "application/json"}"#,
            );
            assert_eq!(
                begin("POST /t_orders", &key),
                json!({"state": "replay", "status": st,
                       "headers": {"Content-Type": "application/json"},
                       "body": {"error": "nope"}}),
                "{st}"
            );
        }
    }

    #[pg_test]
    fn idempotency_complete_releases_retryable_and_auth_failures() {
        for st in [503, 500, 502, 504, 429, 408, 400, 401, 403] {
            let key = format!("rel-{st}");
            assert_eq!(begin("POST /t_release", &key), json!({"state": "new"}));
            complete("POST /t_release", &key, st, r#"{"error": "x"}"#, "{}");
            assert_eq!(
                count(
                    "SELECT count(*) FROM dispatched.idempotency_cache WHERE endpoint = 'POST /t_release' AND key = $1",
                    &[key.as_str().into()]
                ),
                0,
                "{st}"
            );
            // the next caller executes again
            assert_eq!(
                begin("POST /t_release", &key),
                json!({"state": "new"}),
                "{st}"
            );
            assert_eq!(
                begin("POST /t_release", &key),
                json!({"state": "in_flight", "retry_after": 1}),
                "{st}"
            );
        }
    }

    #[pg_test]
    fn idempotency_a_final_answer_is_never_replaced() {
        assert_eq!(begin("POST /t_final", "f1"), json!({"state": "new"}));
        complete("POST /t_final", "f1", 201, r#"{"v": 1}"#, "{}");
        let replay = json!({"state": "replay", "status": 201, "headers": {}, "body": {"v": 1}});
        // a late retryable outcome does not release it
        complete("POST /t_final", "f1", 503, r#"{"v": 2}"#, "{}");
        assert_eq!(begin("POST /t_final", "f1"), replay);
        // another final outcome does not replace it
        complete("POST /t_final", "f1", 200, r#"{"v": 3}"#, "{}");
        assert_eq!(begin("POST /t_final", "f1"), replay);
        // completing without begin caches too
        complete("POST /t_final", "f2", 200, r#"{"v": 4}"#, "{}");
        assert_eq!(
            begin("POST /t_final", "f2"),
            json!({"state": "replay", "status": 200, "headers": {}, "body": {"v": 4}})
        );
    }

    #[pg_test]
    fn idempotency_bad_input() {
        let only = "only A-Z a-z 0-9 - . _ ~ are allowed";
        let cases = [
            (
                "SELECT dispatched.idempotency_begin(NULL, 'k')",
                "22023: endpoint: required".to_string(),
            ),
            (
                "SELECT dispatched.idempotency_begin('', 'k')",
                "22023: endpoint: required".to_string(),
            ),
            (
                "SELECT dispatched.idempotency_begin('e', NULL)",
                "22023: key: required".to_string(),
            ),
            (
                "SELECT dispatched.idempotency_begin('e', '')",
                "22023: key: idempotency key must not be empty".to_string(),
            ),
            (
                "SELECT dispatched.idempotency_begin('e', 'a b')",
                format!("22023: key: idempotency key contains ' '; {only}"),
            ),
            (
                "SELECT dispatched.idempotency_begin('e', repeat('k', 256))",
                "22023: key: idempotency key is 256 characters long; at most 255 are allowed"
                    .to_string(),
            ),
            (
                "SELECT dispatched.idempotency_complete(NULL, 'k', 200, '{}')",
                "22023: endpoint: required".to_string(),
            ),
            (
                "SELECT dispatched.idempotency_complete('', 'k', 200, '{}')",
                "22023: endpoint: required".to_string(),
            ),
            (
                "SELECT dispatched.idempotency_complete('e', NULL, 200, '{}')",
                "22023: key: required".to_string(),
            ),
            (
                "SELECT dispatched.idempotency_complete('e', 'a/b', 200, '{}')",
                format!("22023: key: idempotency key contains '/'; {only}"),
            ),
            (
                "SELECT dispatched.idempotency_complete('e', 'k', NULL, '{}')",
                "22023: status: required".to_string(),
            ),
            (
                "SELECT dispatched.idempotency_complete('e', 'k', 99, '{}')",
                "22023: status: must be an HTTP status from 100 to 599, not 99".to_string(),
            ),
            (
                "SELECT dispatched.idempotency_complete('e', 'k', 600, '{}')",
                "22023: status: must be an HTTP status from 100 to 599, not 600".to_string(),
            ),
            (
                "SELECT dispatched.idempotency_complete('e', 'k', 200, '{}', '[]')",
                "22023: headers: must be a JSON object, not array".to_string(),
            ),
        ];
        for (sql, want) in cases {
            assert_eq!(err(sql), want, "{sql}");
        }
        assert_eq!(
            count("SELECT count(*) FROM dispatched.idempotency_cache WHERE endpoint IN ('e', '') OR endpoint IS NULL", &[]),
            0
        );
        // 100 and 599 are statuses (both release)
        ok("SELECT dispatched.idempotency_complete('e', 'k', 100, '{}')");
        ok("SELECT dispatched.idempotency_complete('e', 'k', 599, '{}')");
        // a 255-character key is fine
        assert_eq!(
            js(
                "SELECT dispatched.idempotency_begin('e', repeat('k', 255))",
                &[]
            ),
            json!({"state": "new"})
        );
    }

    #[pg_test]
    fn idempotency_cache_key_is_sha256_of_tenant_endpoint_key() {
        let got: String = one(
            "SELECT dispatched.idempotency_cache_key('alice', 'POST /api/runs', 'k1')",
            &[],
        );
        // printf 'alice:POST /api/runs:k1' | sha256sum
        assert_eq!(
            got,
            "29cde931b01d6b122ca7af89fe9270d286c6daf34a4fe330976d0cd0835b83c3"
        );
        assert!(one::<bool>(
            "SELECT dispatched.idempotency_cache_key('t1', 'e', 'k')
                    = encode(sha256(convert_to('t1:e:k', 'UTF8')), 'hex')",
            &[]
        ));
        assert!(one::<bool>(
            "SELECT dispatched.idempotency_cache_key('tenänt', 'POST /ü', 'k-1')
                    = encode(sha256(convert_to('tenänt:POST /ü:k-1', 'UTF8')), 'hex')",
            &[]
        ));
        // the tenant defaults to current_user
        assert!(one::<bool>(
            "SELECT dispatched.idempotency_cache_key(NULL, 'e', 'k')
                    = encode(sha256(convert_to(current_user || ':e:k', 'UTF8')), 'hex')",
            &[]
        ));
        assert_eq!(
            one::<String>(
                "SELECT dispatched.idempotency_cache_key(NULL, 'e', 'k')",
                &[]
            ),
            sha256_hex("postgres:e:k")
        );
        // different tenants and endpoints give different keys
        assert_ne!(
            one::<String>(
                "SELECT dispatched.idempotency_cache_key('t1', 'e', 'k')",
                &[]
            ),
            one::<String>(
                "SELECT dispatched.idempotency_cache_key('t2', 'e', 'k')",
                &[]
            )
        );
        // a NULL endpoint or key gives NULL, like any strict hash
        assert_eq!(
            opt::<String>(
                "SELECT dispatched.idempotency_cache_key('t', NULL, 'k')",
                &[]
            ),
            None
        );
        assert_eq!(
            opt::<String>(
                "SELECT dispatched.idempotency_cache_key('t', 'e', NULL)",
                &[]
            ),
            None
        );
        assert_eq!(
            err("SELECT dispatched.idempotency_cache_key('t', NULL, 'k')"),
            "no error"
        );
    }

    #[pg_test]
    fn idempotency_retention_expires_cached_answers() {
        exec("SET LOCAL dispatched.idempotency_retention = '1ms'");
        assert_eq!(begin("POST /t_ret", "r1"), json!({"state": "new"}));
        complete("POST /t_ret", "r1", 201, r#"{"v": 1}"#, "{}");
        exec("SELECT pg_sleep(0.01)");
        // expired: the next caller executes again, and may cache a new answer
        assert_eq!(begin("POST /t_ret", "r1"), json!({"state": "new"}));
        exec("SET LOCAL dispatched.idempotency_retention = '24h'");
        complete("POST /t_ret", "r1", 201, r#"{"v": 2}"#, "{}");
        assert_eq!(
            begin("POST /t_ret", "r1"),
            json!({"state": "replay", "status": 201, "headers": {}, "body": {"v": 2}})
        );
        assert!(one::<bool>(
            "SELECT expires_at > clock_timestamp() + interval '23 hours'
                    AND expires_at <= clock_timestamp() + interval '24 hours'
               FROM dispatched.idempotency_cache WHERE endpoint = 'POST /t_ret' AND key = 'r1'",
            &[]
        ));
    }

    #[pg_test]
    fn idempotency_an_abandoned_claim_lapses() {
        exec("SET LOCAL dispatched.idempotency_lock_timeout = '1ms'");
        assert_eq!(begin("POST /t_lapse", "l1"), json!({"state": "new"}));
        exec("SELECT pg_sleep(0.01)");
        assert_eq!(begin("POST /t_lapse", "l1"), json!({"state": "new"}));
        exec("SET LOCAL dispatched.idempotency_lock_timeout = '60s'");
        assert_eq!(begin("POST /t_lapse", "l2"), json!({"state": "new"}));
        exec("SELECT pg_sleep(0.01)");
        assert_eq!(
            begin("POST /t_lapse", "l2"),
            json!({"state": "in_flight", "retry_after": 1})
        );
    }

    // ---------------------------------------------------------------------------------------
    // Layer 2: invocation_id / record_invocation / lookup_invocation
    // ---------------------------------------------------------------------------------------

    #[pg_test]
    fn invocation_id_is_sha256_of_run_node_attempt_provider() {
        // printf 'run_1:charge:0:stripe:create-charge' | sha256sum
        assert_eq!(
            one::<String>(
                "SELECT dispatched.invocation_id('run_1', 'charge', 0, 'stripe:create-charge')",
                &[]
            ),
            "851a1bfed72f2580bb58693ebd4dd6c4fe959581d73df6a63b0b16b12006c9e6"
        );
        assert!(one::<bool>(
            "SELECT dispatched.invocation_id('run_x', 'node', 3, 'http:POST:h.example:8080')
                    = encode(sha256(convert_to('run_x:node:3:http:POST:h.example:8080', 'UTF8')), 'hex')",
            &[]
        ));
        assert_ne!(
            one::<String>("SELECT dispatched.invocation_id('r', 'n', 0, 'p')", &[]),
            one::<String>("SELECT dispatched.invocation_id('r', 'n', 1, 'p')", &[])
        );
        assert_eq!(
            err("SELECT dispatched.invocation_id('r', 'n', -1, 'p')"),
            "22023: attempt: must be zero or more (zero-based), not -1"
        );
        assert_eq!(
            opt::<String>("SELECT dispatched.invocation_id(NULL, 'n', 0, 'p')", &[]),
            None
        );
    }

    #[pg_test]
    fn record_invocation_first_write_wins() {
        let id = sha256_hex("t_run_rec:charge:0:stripe");
        assert_eq!(
            js_opt(
                "SELECT dispatched.lookup_invocation($1)",
                &[id.as_str().into()]
            ),
            None
        );
        assert_eq!(
            js(
                r#"SELECT dispatched.record_invocation('t_run_rec', 'charge', 0, 'stripe', '{"charge_id": "ch_1"}')"#,
                &[]
            ),
            json!({"charge_id": "ch_1"})
        );
        // a second write returns the first outcome
        assert_eq!(
            js(
                r#"SELECT dispatched.record_invocation('t_run_rec', 'charge', 0, 'stripe', '{"charge_id": "ch_2"}')"#,
                &[]
            ),
            json!({"charge_id": "ch_1"})
        );
        assert_eq!(
            js_opt(
                "SELECT dispatched.lookup_invocation($1)",
                &[id.as_str().into()]
            ),
            Some(json!({"charge_id": "ch_1"}))
        );
        assert_eq!(
            js(
                "SELECT jsonb_agg(jsonb_build_array(tenant, run_id, node_id, attempt, provider_key))
                   FROM dispatched.invocations WHERE invocation_id = $1",
                &[id.as_str().into()]
            ),
            json!([["postgres", "t_run_rec", "charge", 0, "stripe"]])
        );

        // failures are outcomes too, and also win
        let fid = sha256_hex("t_run_rec:charge:1:stripe");
        let failure = json!({"error": {"code": "card_declined", "status": 402}});
        assert_eq!(
            js(
                r#"SELECT dispatched.record_invocation('t_run_rec', 'charge', 1, 'stripe',
                          '{"error": {"code": "card_declined", "status": 402}}')"#,
                &[]
            ),
            failure
        );
        assert_eq!(
            js(
                r#"SELECT dispatched.record_invocation('t_run_rec', 'charge', 1, 'stripe', '{"ok": true}')"#,
                &[]
            ),
            failure
        );
        assert_eq!(
            js_opt(
                "SELECT dispatched.lookup_invocation($1)",
                &[fid.as_str().into()]
            ),
            Some(failure)
        );
        // no run is needed, and unknown ids are NULL
        assert_eq!(
            count(
                "SELECT count(*) FROM dispatched.runs WHERE id = 't_run_rec'",
                &[]
            ),
            0
        );
        assert_eq!(
            js_opt("SELECT dispatched.lookup_invocation('0000')", &[]),
            None
        );
        assert_eq!(
            js_opt("SELECT dispatched.lookup_invocation(NULL)", &[]),
            None
        );
    }

    #[pg_test]
    fn record_invocation_bad_input() {
        let base = ["'r'", "'n'", "0", "'p'", r#"'{"ok": true}'"#];
        let names = ["run_id", "node_id", "attempt", "provider_key", "outcome"];
        for (i, name) in names.into_iter().enumerate() {
            let mut args = base;
            args[i] = "NULL";
            assert_eq!(
                err(&format!(
                    "SELECT dispatched.record_invocation({})",
                    args.join(", ")
                )),
                format!("22023: {name}: required")
            );
        }
        assert_eq!(
            err(r#"SELECT dispatched.record_invocation('r', 'n', -1, 'p', '{"ok": true}')"#),
            "22023: attempt: must be zero or more (zero-based), not -1"
        );
        assert_eq!(
            count(
                "SELECT count(*) FROM dispatched.invocations WHERE run_id = 'r'",
                &[]
            ),
            0
        );
    }

    #[pg_test]
    fn invocation_retention_expires_outcomes() {
        exec("SET LOCAL dispatched.invocation_retention = '1ms'");
        let id = sha256_hex("t_run_exp:n:0:p");
        assert_eq!(
            js(
                r#"SELECT dispatched.record_invocation('t_run_exp', 'n', 0, 'p', '{"v": 1}')"#,
                &[]
            ),
            json!({"v": 1})
        );
        exec("SELECT pg_sleep(0.01)");
        assert_eq!(
            js_opt(
                "SELECT dispatched.lookup_invocation($1)",
                &[id.as_str().into()]
            ),
            None
        );
        // an expired outcome is replaced by the next write
        exec("SET LOCAL dispatched.invocation_retention = '14 days'");
        assert_eq!(
            js(
                r#"SELECT dispatched.record_invocation('t_run_exp', 'n', 0, 'p', '{"v": 2}')"#,
                &[]
            ),
            json!({"v": 2})
        );
        assert_eq!(
            js_opt(
                "SELECT dispatched.lookup_invocation($1)",
                &[id.as_str().into()]
            ),
            Some(json!({"v": 2}))
        );
        assert!(one::<bool>(
            "SELECT expires_at > clock_timestamp() + interval '13 days'
                    AND expires_at <= clock_timestamp() + interval '14 days'
               FROM dispatched.invocations WHERE invocation_id = $1",
            &[id.as_str().into()]
        ));
    }

    // ---------------------------------------------------------------------------------------
    // capabilities and settings
    // ---------------------------------------------------------------------------------------

    #[pg_test]
    fn capabilities_has_the_openwop_shape() {
        let caps = js("SELECT dispatched.capabilities()", &[]);
        assert_eq!(
            caps,
            json!({"capabilities": {"idempotency": {
                "supported": true,
                "layer1RetentionSeconds": 86400,
                "layer2RetentionSeconds": 1_209_600,
                "crossRegion": "single-region"
            }}})
        );
    }

    #[pg_test]
    fn capabilities_follow_the_retention_settings() {
        let figures = || {
            let c = js("SELECT dispatched.capabilities()", &[]);
            (
                c["capabilities"]["idempotency"]["layer1RetentionSeconds"].clone(),
                c["capabilities"]["idempotency"]["layer2RetentionSeconds"].clone(),
            )
        };
        exec("SET LOCAL dispatched.idempotency_retention = '2h'");
        assert_eq!(figures(), (json!(7200), json!(1_209_600)));
        exec("SET LOCAL dispatched.invocation_retention = '3d'");
        assert_eq!(figures(), (json!(7200), json!(259_200)));
        exec("SET LOCAL dispatched.idempotency_retention = '14 days'");
        exec("SET LOCAL dispatched.invocation_retention = '1h30m'");
        assert_eq!(figures(), (json!(1_209_600), json!(5400)));
        exec("SET LOCAL dispatched.idempotency_retention = '90s'");
        assert_eq!(figures(), (json!(90), json!(5400)));
    }

    #[pg_test]
    fn settings_exist_with_their_defaults() {
        let cases = [
            ("dispatched.database", "postgres"),
            ("dispatched.workers", "1"),
            ("dispatched.max_concurrent_requests", "64"),
            ("dispatched.max_requests_per_host", "0"),
            ("dispatched.default_timeout", "30s"),
            ("dispatched.idempotency_retention", "24h"),
            ("dispatched.idempotency_lock_timeout", "60s"),
            ("dispatched.invocation_retention", "14 days"),
            ("dispatched.max_response_bytes", "10MB"),
            ("dispatched.allowed_hosts", ""),
            ("dispatched.encryption_key", ""),
            ("dispatched.http_port", "0"),
            ("dispatched.http_listen", "127.0.0.1"),
            ("dispatched.http_max_connections", "64"),
            ("dispatched.http_max_body_bytes", "1MB"),
            ("dispatched.http_read_timeout", "10s"),
        ];
        for (name, want) in cases {
            assert_eq!(
                opt::<String>("SELECT current_setting($1)", &[name.into()]).as_deref(),
                Some(want),
                "{name}"
            );
        }
        assert_eq!(
            one::<String>("SHOW dispatched.invocation_retention", &[]),
            "14 days"
        );
        assert_eq!(
            one::<String>(
                "SELECT setting FROM pg_settings WHERE name = 'dispatched.max_response_bytes'",
                &[]
            ),
            "10485760"
        );
        assert_eq!(
            js(
                "SELECT jsonb_object_agg(name, context) FROM pg_settings WHERE name LIKE 'dispatched.%'",
                &[]
            ),
            json!({
                "dispatched.database": "postmaster",
                "dispatched.workers": "postmaster",
                "dispatched.max_concurrent_requests": "sighup",
                "dispatched.max_requests_per_host": "sighup",
                "dispatched.default_timeout": "sighup",
                "dispatched.idempotency_retention": "superuser",
                "dispatched.idempotency_lock_timeout": "superuser",
                "dispatched.invocation_retention": "superuser",
                "dispatched.max_response_bytes": "sighup",
                "dispatched.allowed_hosts": "sighup",
                "dispatched.http_port": "postmaster",
                "dispatched.http_listen": "postmaster",
                "dispatched.http_max_connections": "postmaster",
                "dispatched.http_max_body_bytes": "postmaster",
                "dispatched.http_read_timeout": "postmaster"
            })
        );
    }

    #[pg_test]
    fn settings_refuse_bad_durations() {
        let hint = "(expected e.g. 500ms, 30s, 10m, 2h, 1d)";
        for name in [
            "idempotency_retention",
            "invocation_retention",
            "idempotency_lock_timeout",
        ] {
            assert_eq!(
                err(&format!("SET dispatched.{name} = 'soon'")),
                format!(
                    r#"22023: invalid value for parameter "dispatched.{name}": "soon" | invalid duration "soon": a number must come before each unit {hint}"#
                )
            );
            assert_eq!(
                err(&format!("SET LOCAL dispatched.{name} = '400d'")),
                format!(
                    r#"22023: invalid value for parameter "dispatched.{name}": "400d" | invalid duration "400d": longer than 366 days {hint}"#
                )
            );
            assert_eq!(
                err(&format!("SET dispatched.{name} = '30'")),
                format!(
                    r#"22023: invalid value for parameter "dispatched.{name}": "30" | invalid duration "30": missing unit {hint}"#
                )
            );
        }
        // unchanged after the refusals
        assert_eq!(
            one::<String>(
                "SELECT current_setting('dispatched.idempotency_retention')",
                &[]
            ),
            "24h"
        );
        // SIGHUP settings are not set per session
        assert_eq!(
            err("SET dispatched.default_timeout = '10s'"),
            r#"55P02: parameter "dispatched.default_timeout" cannot be changed now"#
        );
        assert_eq!(
            err("SET dispatched.allowed_hosts = 'example.com'"),
            r#"55P02: parameter "dispatched.allowed_hosts" cannot be changed now"#
        );
    }

    // ---------------------------------------------------------------------------------------
    // Privileges: a role reaches its own data through the functions only
    // ---------------------------------------------------------------------------------------

    #[pg_test]
    fn privileges_tables_and_administration_are_closed() {
        define("t_priv_wf", TWO_STEPS);
        exec("CREATE ROLE t_priv_alice");
        set_role("t_priv_alice");
        assert_eq!(
            one::<String>("SELECT dispatched._caller()", &[]),
            "t_priv_alice"
        );
        for table in [
            "runs",
            "secrets",
            "idempotency_cache",
            "invocations",
            "workflows",
            "steps",
            "tasks",
            "signals",
            "events",
        ] {
            assert_eq!(
                err(&format!("SELECT * FROM dispatched.{table}")),
                format!("42501: permission denied for table {table}"),
                "{table}"
            );
        }
        assert_eq!(
            err("DELETE FROM dispatched.idempotency_cache"),
            "42501: permission denied for table idempotency_cache"
        );
        assert_eq!(
            err(
                r#"SELECT dispatched.define_workflow('t_priv_wf', '{"steps": [{"id": "x", "wait": {"signal": "s"}}]}')"#
            ),
            "42501: permission denied for function define_workflow"
        );
        assert_eq!(
            err("SELECT dispatched.set_secret('t_priv_secret', 'v')"),
            "42501: permission denied for function set_secret"
        );
        assert_eq!(
            err("SELECT dispatched._wait_finished('run_x', 1)"),
            "42501: permission denied for function _wait_finished"
        );
        assert_eq!(
            err("SET dispatched.idempotency_retention = '1h'"),
            r#"42501: permission denied to set parameter "dispatched.idempotency_retention""#
        );
        assert_eq!(
            err("SELECT current_setting('dispatched.encryption_key')"),
            r#"42501: must be superuser or have privileges of pg_read_all_settings to examine "dispatched.encryption_key""#
        );
        // what every role may use
        assert_eq!(
            js("SELECT dispatched.capabilities()", &[])["capabilities"]["idempotency"]
                ["layer1RetentionSeconds"],
            json!(86400)
        );
        reset_role();
        assert_eq!(
            count(
                "SELECT count(*) FROM dispatched.workflows WHERE name = 't_priv_wf'",
                &[]
            ),
            1
        );
        assert_eq!(
            count(
                "SELECT count(*) FROM dispatched.secrets WHERE name = 't_priv_secret'",
                &[]
            ),
            0
        );
    }

    #[pg_test]
    fn privileges_a_role_sees_only_its_own_runs() {
        define("t_tenant_wf", TWO_STEPS);
        exec("CREATE ROLE t_runs_alice");
        exec("CREATE ROLE t_runs_bob");
        let admins = start_key("t_tenant_wf", "{}", "shared-key");

        set_role("t_runs_alice");
        let mine = start_key("t_tenant_wf", r#"{"who": "alice"}"#, "shared-key");
        assert_ne!(mine, admins);
        // the same key is per tenant: alice's key names her run
        assert_eq!(
            start_key("t_tenant_wf", r#"{"who": "alice"}"#, "shared-key"),
            mine
        );
        let doc = run_doc(&mine).unwrap();
        assert_eq!(doc["tenant"], json!("t_runs_alice"));
        assert_eq!(doc["input"], json!({"who": "alice"}));
        assert_eq!(output(&mine), json!({"message": "not ready"}));
        assert_eq!(event_types(&mine), vec!["run.started"]);
        assert!(one::<bool>(
            "SELECT dispatched.signal($1, 'go')",
            &[mine.as_str().into()]
        ));

        // the superuser's run does not exist for her
        assert_eq!(run_doc(&admins), None);
        assert_eq!(output(&admins), json!({"message": "not found"}));
        assert_eq!(
            js(
                "SELECT dispatched.attach($1, interval '10s')",
                &[admins.as_str().into()]
            ),
            json!({"message": "not found"})
        );
        assert!(events(&admins).is_empty());
        assert_eq!(
            err(&format!("SELECT dispatched.signal('{admins}', 'go')")),
            format!(r#"P0002: run "{admins}" does not exist"#)
        );
        assert!(!one::<bool>(
            "SELECT dispatched.cancel_run($1)",
            &[admins.as_str().into()]
        ));

        // nor does alice's run for bob
        set_role("t_runs_bob");
        assert_eq!(run_doc(&mine), None);
        assert_eq!(output(&mine), json!({"message": "not found"}));
        assert!(events(&mine).is_empty());
        assert_eq!(
            err(&format!("SELECT dispatched.signal('{mine}', 'go')")),
            format!(r#"P0002: run "{mine}" does not exist"#)
        );
        assert!(!one::<bool>(
            "SELECT dispatched.cancel_run($1)",
            &[mine.as_str().into()]
        ));
        // bob's same key starts his own run
        let bobs = start_key("t_tenant_wf", r#"{"who": "alice"}"#, "shared-key");
        assert_ne!(bobs, mine);

        // the superuser sees every run
        reset_role();
        assert_eq!(status(&admins), "pending");
        assert_eq!(run_doc(&mine).unwrap()["tenant"], json!("t_runs_alice"));
        assert_eq!(run_doc(&bobs).unwrap()["tenant"], json!("t_runs_bob"));
        assert_eq!(status(&mine), "pending");
        assert_eq!(event_types(&mine), vec!["run.started", "signal.received"]);
        assert_eq!(
            count(
                "SELECT count(*) FROM dispatched.signals WHERE run_id = $1",
                &[admins.as_str().into()]
            ),
            0
        );
    }

    #[pg_test]
    fn privileges_idempotency_entries_are_per_role() {
        exec("CREATE ROLE t_layers_alice");
        exec("CREATE ROLE t_layers_bob");

        set_role("t_layers_alice");
        assert_eq!(begin("POST /t_layers", "k"), json!({"state": "new"}));
        complete("POST /t_layers", "k", 201, r#"{"by": "alice"}"#, "{}");
        let replay =
            json!({"state": "replay", "status": 201, "headers": {}, "body": {"by": "alice"}});
        assert_eq!(begin("POST /t_layers", "k"), replay);
        assert_eq!(
            js(
                "SELECT dispatched.record_invocation('t_run_layers', 'n', 0, 'p', '{\"by\": \"alice\"}')",
                &[]
            ),
            json!({"by": "alice"})
        );
        let inv: String = one(
            "SELECT dispatched.invocation_id('t_run_layers', 'n', 0, 'p')",
            &[],
        );
        assert_eq!(
            js_opt(
                "SELECT dispatched.lookup_invocation($1)",
                &[inv.as_str().into()]
            ),
            Some(json!({"by": "alice"}))
        );

        // a superuser finds her invocation (the worker's view), but not through Layer 1
        reset_role();
        assert_eq!(
            js_opt(
                "SELECT dispatched.lookup_invocation($1)",
                &[inv.as_str().into()]
            ),
            Some(json!({"by": "alice"}))
        );

        set_role("t_layers_bob");
        // bob does not see alice's Layer 1 entry, even naming her as tenant
        assert_eq!(begin("POST /t_layers", "k"), json!({"state": "new"}));
        assert_eq!(
            js(
                "SELECT dispatched.idempotency_begin('POST /t_layers', 'k', 't_layers_alice')",
                &[]
            ),
            json!({"state": "new"})
        );
        // nor can he complete it for her
        complete("POST /t_layers", "k", 200, r#"{"by": "bob"}"#, "{}");
        // nor her Layer 2 entry; his own write is his
        assert_eq!(
            js_opt(
                "SELECT dispatched.lookup_invocation($1)",
                &[inv.as_str().into()]
            ),
            None
        );
        assert_eq!(
            js(
                "SELECT dispatched.record_invocation('t_run_layers', 'n', 0, 'p', '{\"by\": \"bob\"}')",
                &[]
            ),
            json!({"by": "bob"})
        );
        assert_eq!(
            js_opt(
                "SELECT dispatched.lookup_invocation($1)",
                &[inv.as_str().into()]
            ),
            Some(json!({"by": "bob"}))
        );

        set_role("t_layers_alice");
        assert_eq!(begin("POST /t_layers", "k"), replay);
        assert_eq!(
            js_opt(
                "SELECT dispatched.lookup_invocation($1)",
                &[inv.as_str().into()]
            ),
            Some(json!({"by": "alice"}))
        );
        reset_role();
        assert_eq!(
            js(
                "SELECT jsonb_agg(jsonb_build_array(role, tenant, state, status, body) ORDER BY role, tenant)
                   FROM dispatched.idempotency_cache WHERE endpoint = 'POST /t_layers'",
                &[]
            ),
            json!([
                ["t_layers_alice", "t_layers_alice", "final", 201, {"by": "alice"}],
                ["t_layers_bob", "t_layers_alice", "in_flight", null, null],
                ["t_layers_bob", "t_layers_bob", "final", 200, {"by": "bob"}]
            ])
        );
    }

    // ---------------------------------------------------------------------------------------
    // psql administration: views, retry_run, purge, comments (NOTIFY is tested black-box:
    // notifications are sent at commit, and these tests roll back)
    // ---------------------------------------------------------------------------------------

    /// A run row written directly, for the views.
    fn insert_run(id: &str, workflow: &str, status: &str) {
        exec_a(
            "INSERT INTO dispatched.runs (id, tenant, workflow, version, input, status)
             VALUES ($1, 'postgres', $2, 1, '{}', $3)",
            &[id.into(), workflow.into(), status.into()],
        );
    }

    fn insert_event(run: &str, step: &str, kind: &str, at_ms: i64, data: &str) {
        exec_a(
            "INSERT INTO dispatched.events (run_id, type, step, data, at)
             VALUES ($1, $3, $2, $5::jsonb, timestamptz '2026-01-01 00:00:00+00' + $4 * interval '1 millisecond')",
            &[
                run.into(),
                step.into(),
                kind.into(),
                at_ms.into(),
                data.into(),
            ],
        );
    }

    #[pg_test]
    fn admin_step_stats_derive_durations_from_events() {
        define("t_stats", TWO_STEPS);
        insert_run("t_run_stats", "t_stats", "failed");
        let a = r#"{"attempt": 1, "url": "http://h.example:8080/a?x=1"}"#;
        let a2 = r#"{"attempt": 2, "url": "http://user@h.example:8080/a"}"#;
        insert_event("t_run_stats", "a", "step.started", 0, a);
        insert_event(
            "t_run_stats",
            "a",
            "step.retry_scheduled",
            100,
            r#"{"attempt": 1, "status": 503}"#,
        );
        insert_event("t_run_stats", "a", "step.started", 1000, a2);
        insert_event(
            "t_run_stats",
            "a",
            "step.response",
            1300,
            r#"{"attempt": 2, "status": 200}"#,
        );
        insert_event("t_run_stats", "a", "step.succeeded", 1301, "{}");
        insert_event(
            "t_run_stats",
            "b",
            "step.started",
            2000,
            r#"{"attempt": 1, "url": "https://other.example/b"}"#,
        );
        // a compensation's retry is not the end of the step's attempt
        insert_event(
            "t_run_stats",
            "b",
            "step.retry_scheduled",
            2010,
            r#"{"attempt": 1, "compensation": true}"#,
        );
        insert_event(
            "t_run_stats",
            "b",
            "step.failed",
            2050,
            r#"{"attempt": 1, "status": 422}"#,
        );
        insert_event(
            "t_run_stats",
            "b",
            "step.started",
            3000,
            r#"{"attempt": 2, "url": "https://other.example/b"}"#,
        );
        assert_eq!(
            js(
                "SELECT jsonb_agg(jsonb_build_array(host, attempts, succeeded, retried, failed, in_flight,
                                                    retry_rate, failure_rate, p50_ms, p99_ms) ORDER BY host)
                   FROM dispatched.step_stats WHERE workflow = 't_stats'",
                &[]
            ),
            json!([
                ["h.example:8080", 2, 1, 1, 0, 0, 0.5, 0.0, 200.0, 298.0],
                ["other.example", 2, 0, 0, 1, 1, 0.0, 0.5, 50.0, 50.0]
            ])
        );
        assert_eq!(
            js(
                "SELECT jsonb_agg(jsonb_build_array(step, attempt, outcome, http_status, duration_ms::int) ORDER BY started_at)
                   FROM dispatched.step_attempts WHERE run_id = 't_run_stats'",
                &[]
            ),
            json!([
                ["a", 1, "step.retry_scheduled", 503, 100],
                ["a", 2, "step.response", 200, 300],
                ["b", 1, "step.failed", 422, 50],
                ["b", 2, null, null, null]
            ])
        );
    }

    #[pg_test]
    fn admin_runs_by_status_steps_due_and_oldest_waiting_run() {
        define("t_views", TWO_STEPS);
        for (id, st) in [
            ("t_run_v1", "waiting"),
            ("t_run_v2", "waiting"),
            ("t_run_v3", "running"),
            ("t_run_v4", "pending"),
            ("t_run_v5", "completed"),
        ] {
            insert_run(id, "t_views", st);
        }
        exec(
            "UPDATE dispatched.runs SET step_index = 1, waiting_for = 'go', updated_at = '2001-01-01'
              WHERE id = 't_run_v2';
             UPDATE dispatched.runs SET step_index = 1, waiting_for = 'go', updated_at = '2002-01-01'
              WHERE id = 't_run_v1';
             INSERT INTO dispatched.steps (run_id, idx, step_id, status, phase, attempt)
             VALUES ('t_run_v2', 1, 'b', 'waiting', 'wait', 0), ('t_run_v3', 0, 'a', 'running', 'request', 2);
             INSERT INTO dispatched.tasks (run_id, due_at, lease_owner, lease_until, claims) VALUES
                 ('t_run_v3', now() - interval '1 second', 0, now() + interval '30 seconds', 2),
                 ('t_run_v4', now() - interval '1 second', NULL, NULL, 0),
                 ('t_run_v1', now() + interval '1 hour', NULL, NULL, 0);",
        );
        assert_eq!(
            js(
                "SELECT jsonb_object_agg(status, runs) FROM dispatched.runs_by_status WHERE workflow = 't_views'",
                &[]
            ),
            json!({"waiting": 2, "running": 1, "pending": 1, "completed": 1})
        );
        assert_eq!(
            js(
                "SELECT jsonb_agg(jsonb_build_array(run_id, step, step_status, attempt, state, worker, claims) ORDER BY run_id)
                   FROM dispatched.steps_due WHERE workflow = 't_views'",
                &[]
            ),
            json!([
                ["t_run_v1", "b", "pending", 0, "scheduled", null, 0],
                ["t_run_v3", "a", "running", 2, "in_flight", 0, 2],
                ["t_run_v4", "a", "pending", 0, "due", null, 0]
            ])
        );
        assert_eq!(
            js(
                "SELECT jsonb_build_array(run_id, step, waiting_for, waiting_since = '2001-01-01', waited > interval '20 years')
                   FROM dispatched.oldest_waiting_run",
                &[]
            ),
            json!(["t_run_v2", "b", "go", true, true])
        );
    }

    #[pg_test]
    fn admin_retry_run_rules() {
        define("t_retry", TWO_STEPS);
        let id = start("t_retry", "{}");
        // not failed: nothing to do
        assert!(!one::<bool>(
            "SELECT dispatched.retry_run($1)",
            &[id.as_str().into()]
        ));
        assert_eq!(
            err("SELECT dispatched.retry_run('t_no_such_run')"),
            "P0002: run \"t_no_such_run\" does not exist"
        );
        // failed at step a, attempt 3
        exec_a(
            "UPDATE dispatched.runs SET status = 'failed', finished_at = now(),
                    error = '{\"message\": \"HTTP 500\", \"step\": \"a\", \"status\": 500}' WHERE id = $1;
             DELETE FROM dispatched.tasks WHERE run_id = $1;",
            &[id.as_str().into()],
        );
        assert_eq!(
            err(&format!("SELECT dispatched.retry_run('{id}')")),
            format!("55000: run \"{id}\" cannot be retried: no step failed (its output could not be rendered)")
        );
        exec_a(
            "INSERT INTO dispatched.steps (run_id, idx, step_id, status, phase, attempt, error, finished_at)
             VALUES ($1, 0, 'a', 'failed', 'done', 3, '{\"message\": \"HTTP 500\"}', now())",
            &[id.as_str().into()],
        );
        assert!(one::<bool>(
            "SELECT dispatched.retry_run($1)",
            &[id.as_str().into()]
        ));
        assert_eq!(
            js(
                "SELECT jsonb_build_array(r.status, r.step_index, r.error, r.finished_at,
                                          s.status, s.phase, s.attempt, s.error,
                                          (SELECT t.due_at <= now() AND t.lease_owner IS NULL FROM dispatched.tasks t WHERE t.run_id = r.id))
                   FROM dispatched.runs r JOIN dispatched.steps s ON s.run_id = r.id AND s.idx = 0 WHERE r.id = $1",
                &[id.as_str().into()]
            ),
            json!(["running", 0, null, null, "running", "backoff", 3, null, true])
        );
        assert_eq!(
            event_types(&id).last().map(String::as_str),
            Some("run.retried")
        );
        // a compensated failure is refused
        let id2 = start("t_retry", "{}");
        exec_a(
            "UPDATE dispatched.runs SET status = 'failed', step_index = 1 WHERE id = $1;
             INSERT INTO dispatched.steps (run_id, idx, step_id, status, phase, attempt, comp_attempt)
             VALUES ($1, 0, 'a', 'compensated', 'done', 1, 1), ($1, 1, 'b', 'failed', 'done', 1, 0);",
            &[id2.as_str().into()],
        );
        assert!(
            err(&format!("SELECT dispatched.retry_run('{id2}')")).starts_with(&format!(
                "55000: run \"{id2}\" cannot be retried: its failure was compensated"
            ))
        );
        // another tenant's run does not exist for a role
        exec("CREATE ROLE t_retry_bob");
        set_role("t_retry_bob");
        assert!(err(&format!("SELECT dispatched.retry_run('{id}')")).starts_with("P0002"));
        reset_role();
    }

    #[pg_test]
    fn admin_purge_deletes_old_finished_runs() {
        define("t_purge", TWO_STEPS);
        let old = start("t_purge", "{}");
        let recent = start("t_purge", "{}");
        let live = start("t_purge", "{}");
        assert!(one::<bool>(
            "SELECT dispatched.cancel_run($1)",
            &[old.as_str().into()]
        ));
        assert!(one::<bool>(
            "SELECT dispatched.cancel_run($1)",
            &[recent.as_str().into()]
        ));
        exec_a(
            "UPDATE dispatched.runs SET finished_at = now() - interval '3 days' WHERE id = $1",
            &[old.as_str().into()],
        );
        assert_eq!(one::<i64>("SELECT dispatched.purge('2 days')", &[]), 1);
        assert!(run_doc(&old).is_none());
        assert_eq!(
            one::<i64>(
                "SELECT count(*) FROM dispatched.events WHERE run_id = $1",
                &[old.as_str().into()]
            ),
            0
        );
        assert!(run_doc(&recent).is_some() && run_doc(&live).is_some());
        assert_eq!(
            err("SELECT dispatched.purge('-1 day')"),
            "22023: older_than: must be zero or more, got -1 days"
        );
    }

    #[pg_test]
    fn admin_every_table_view_and_function_has_a_comment() {
        assert_eq!(
            js(
                "SELECT coalesce(jsonb_agg(x), '[]') FROM (
                   SELECT c.relname::text AS x FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                    WHERE n.nspname = 'dispatched' AND c.relkind IN ('r', 'v')
                      AND obj_description(c.oid, 'pg_class') IS NULL
                   UNION ALL
                   SELECT p.oid::regprocedure::text FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
                    WHERE n.nspname = 'dispatched' AND obj_description(p.oid, 'pg_proc') IS NULL
                      AND p.proname NOT LIKE 'test%') y",
                &[]
            ),
            json!([])
        );
    }
}
