#!/usr/bin/env bash
# Runs pgspot (PyPI, version pinned in tests/requirements.txt) over the extension's SQL: the
# install script `cargo pgrx schema` generates (sql/*.sql and the functions pgrx declares),
# exactly what CREATE EXTENSION runs. Any finding, warning or error, fails the script.
#
#   scripts/pgspot.sh [--release]     (--release reuses a release build, as scripts/test.sh does)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PG_CONFIG=${PG_CONFIG:-/usr/bin/pg_config}
if ! command -v pgspot >/dev/null 2>&1; then
  want=$(grep -i '^pgspot==' tests/requirements.txt)
  python3 -m pip install --quiet --break-system-packages "$want" 2>/dev/null \
    || python3 -m pip install --quiet "$want"
fi

out=$(mktemp /tmp/dispatched-schema.XXXXXX.sql)
trap 'rm -f "$out"' EXIT
cargo pgrx schema pg15 --pg-config "$PG_CONFIG" "$@" -o "$out" >/dev/null
echo "pgspot $(pgspot --version 2>/dev/null || true) over $(wc -l <"$out") lines of generated SQL"
report=$(pgspot "$out" 2>&1) || true
echo "$report"
# pgspot exits 0 on warnings; count them from its closing line ("Errors: N Warnings: M ...")
if ! echo "$report" | grep -Eq 'Errors: 0 Warnings: 0 Unknown: 0'; then
  echo "pgspot found problems in the extension's SQL" >&2
  exit 1
fi
