#!/usr/bin/env bash
# The first command for a newcomer (as root on Debian 12): sets the machine up, starts a local
# PostgreSQL 15 cluster with dispatched in /tmp/dispatched-demo (port 54329), and shows the
# SQL API at work in psql. The cluster keeps running afterwards so that you can play with it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

DIR=/tmp/dispatched-demo
PORT=54329
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
bash scripts/cluster.sh start "$DIR" "$PORT" "dispatched.database = 'postgres'"

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

cat <<'NOTE'

Note: the HTTP worker, which performs the steps, is still being written. Until it lands,
runs stay "pending": start_run stores the run, signal keeps the signal for the step that
waits for it, and attach answers {"message": "not ready"} when its timeout passes.
NOTE

# ---------------------------------------------------------------------------------------
# HTTP WORKFLOW DEMO: NOT YET. When the HTTP worker lands, this is where the demo will start
# a small local HTTP service on 127.0.0.1 and run a 3-step HTTP workflow against it
# (request, retry, compensation), showing run() and events() of that run.
# ---------------------------------------------------------------------------------------

cat <<EOF

The demo cluster is still running. Connect with:
    psql -h 127.0.0.1 -p $PORT -U postgres
and try, for example:
    SELECT dispatched.run(id) FROM dispatched.runs;     -- as superuser
Stop it (and remove it) with:
    bash scripts/cluster.sh stop $DIR && rm -rf $DIR
EOF
