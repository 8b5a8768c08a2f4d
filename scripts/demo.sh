#!/usr/bin/env bash
# The first command for a newcomer (as root on Debian 12): sets the machine up, starts a local
# PostgreSQL 15 cluster with dispatched in /tmp/dispatched-demo (port 54329, the HTTP ingress
# and dashboard on 54331), shows the SQL API at work in psql, then the HTTP API with curl.
# The cluster keeps running afterwards so that you can play with it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

DIR=/tmp/dispatched-demo
PORT=54329
SVC_PORT=54330
HTTP_PORT=54331
PSQL=(psql -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PORT" -U postgres -d postgres)

say() { printf '\n==> %s\n' "$*"; }

say "setup (scripts/setup.sh): packages, cargo-pgrx, build and install dispatched"
bash scripts/setup.sh

if [ -e "$DIR" ]; then
  say "removing the previous demo cluster in $DIR"
  bash scripts/cluster.sh stop "$DIR"
  rm -rf "$DIR"
fi
say "starting a PostgreSQL 15 cluster in $DIR on port $PORT (dispatched preloaded)"
bash scripts/cluster.sh start "$DIR" "$PORT" "dispatched.database = 'postgres'" "dispatched.http_port = $HTTP_PORT"

say "CREATE EXTENSION dispatched"
"${PSQL[@]}" -c "CREATE EXTENSION dispatched"

say "a workflow, a run, a signal"
"${PSQL[@]}" <<'SQL'
\pset pager off
\echo
\echo '-- A workflow whose one step waits for the signal "approved" (no HTTP needed):'
\echo
SELECT dispatched.define_workflow('approval', $${
  "steps": [{"id": "approve", "wait": {"signal": "approved", "timeout": "1h"}}],
  "output": {"approved_by": "{{ steps.approve.signal.by }}", "order": "{{ input.order }}"}
}$$) AS version;

\echo '-- Start a run (transactional: it exists once this statement commits):'
SELECT dispatched.start_run('approval', '{"order": 42}', 'order-42') AS run_id \gset
\echo :run_id
\echo
\echo '-- The same idempotency key gives the same run, never a second one:'
SELECT dispatched.start_run('approval', '{"order": 42}', 'order-42') = :'run_id' AS same_run;

\echo '-- Signal it:'
SELECT dispatched.signal(:'run_id', 'approved', '{"by": "alice"}') AS delivered;

\echo '-- Wait up to 3 seconds for the run to finish:'
SELECT dispatched.attach(:'run_id', '3s') AS attach;

\echo '-- The run document:'
SELECT jsonb_pretty(dispatched.run(:'run_id')) AS run;

\echo '-- Its event stream:'
SELECT seq, type, step, data FROM dispatched.events(:'run_id');
SQL

say "a local service on 127.0.0.1:$SVC_PORT (scripts/demo_service.py)"
python3 scripts/demo_service.py "$SVC_PORT" &
SVC_PID=$!
trap 'kill $SVC_PID 2>/dev/null || true' EXIT
for _ in $(seq 50); do
  python3 -c "import socket,sys; socket.create_connection(('127.0.0.1', int(sys.argv[1])), 1)" "$SVC_PORT" 2>/dev/null && break
  sleep 0.1
done

say "an HTTP workflow: reserve, charge (retried after a 503), ship; compensations on failure"
"${PSQL[@]}" -v svc="http://127.0.0.1:$SVC_PORT" <<'SQL'
\pset pager off
SELECT dispatched.define_workflow('order', format($${
  "steps": [
    {"id": "reserve",
     "request": {"url": "%1$s/inventory/reserve", "body": {"sku": "{{ input.sku }}"}},
     "compensate": {"url": "%1$s/inventory/release",
                    "body": {"reservation_id": "{{ steps.reserve.response.body.reservation_id }}"}}},
    {"id": "charge",
     "request": {"url": "%1$s/payments/charge", "body": {"amount": "{{ input.amount }}"}},
     "retry": {"max_attempts": 3, "initial_interval": "500ms"},
     "compensate": {"url": "%1$s/payments/refund",
                    "body": {"charge_id": "{{ steps.charge.response.body.charge_id }}"}}},
    {"id": "ship",
     "request": {"url": "%1$s/shipping/label", "body": {"address": "{{ input.address }}"}}}
  ],
  "output": {"label": "{{ steps.ship.response.body.label }}",
             "charge": "{{ steps.charge.response.body.charge_id }}"}
}$$, :'svc')::jsonb) AS version;

\echo '-- Run 1: everything succeeds (the charge after one retry):'
SELECT dispatched.start_run('order', '{"sku": "book-1", "amount": 1200, "address": "Main St 1"}') AS ok_run \gset
SELECT dispatched.attach(:'ok_run', '20s') AS output;
SELECT seq, type, step, left(data::text, 110) AS data FROM dispatched.events(:'ok_run');

\echo '-- Run 2: shipping refuses the address (422): the charge is refunded, the item released:'
SELECT dispatched.start_run('order', '{"sku": "book-2", "amount": 900, "address": "nowhere"}') AS bad_run \gset
SELECT dispatched.attach(:'bad_run', '20s') AS error;
SELECT seq, type, step, left(data::text, 110) AS data FROM dispatched.events(:'bad_run');
SELECT s->>'id' AS step, s->>'status' AS status, s->>'attempt' AS attempt
  FROM jsonb_array_elements(dispatched.run(:'bad_run')->'steps') AS s;
SQL

say "the HTTP ingress on 127.0.0.1:$HTTP_PORT: a run started and signalled with curl"
TOKEN=$("${PSQL[@]}" -Atc "SELECT dispatched.create_session_token()")
API="http://127.0.0.1:$HTTP_PORT/api"
for _ in $(seq 100); do
  curl -s -o /dev/null "$API/capabilities" && break
  sleep 0.1
done
show() { printf '\n$'; printf ' %q' "$@"; printf '\n'; "$@"; echo; }
echo "TOKEN=\$(psql -Atc \"SELECT dispatched.create_session_token()\")   # $TOKEN"
show curl -sS -i -X POST "$API/runs" -H "Dispatched-Session: $TOKEN" -H 'Idempotency-Key: web-order-7' \
  -d '{"workflow": "approval", "input": {"order": 7}}'
RUN=$(curl -sS -X POST "$API/runs" -H "Dispatched-Session: $TOKEN" -H 'Idempotency-Key: web-order-7' \
  -d '{"workflow": "approval", "input": {"order": 7}}' | python3 -c 'import json, sys; print(json.load(sys.stdin)["run_id"])')
show curl -sS "$API/runs/$RUN/output" -H "Dispatched-Session: $TOKEN"
show curl -sS -X POST "$API/runs/$RUN/signal/approved" -H "Dispatched-Session: $TOKEN" -d '{"by": "bob"}'
show curl -sS "$API/runs/$RUN/attach?timeout=10s" -H "Dispatched-Session: $TOKEN"

cat <<EOF

The dashboard (runs, filters, each run's steps as a timeline and its events):
    http://127.0.0.1:$HTTP_PORT/#token=$TOKEN
(the page keeps the token in the browser; without it, paste the token when asked). From
another machine, forward the port first: ssh -L $HTTP_PORT:127.0.0.1:$HTTP_PORT this-host

The demo cluster is still running. Connect with:
    psql -h 127.0.0.1 -p $PORT -U postgres
and try, for example:
    SELECT dispatched.run(id) FROM dispatched.runs;     -- as superuser
Stop it (and remove it) with:
    bash scripts/cluster.sh stop $DIR && rm -rf $DIR
EOF
