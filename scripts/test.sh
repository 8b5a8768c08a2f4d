#!/usr/bin/env bash
# The one command that runs every test of dispatched (as root on Debian 12):
#
#   1. scripts/setup.sh         packages, cargo-pgrx, Python deps; builds and installs the
#                               release build of the extension
#   2. cargo fmt --check        formatting
#   3. cargo clippy             lints, warnings are errors
#   4. scripts/pgspot.sh        pgspot over the generated install script
#   5. cargo test -p dispatched-core      unit tests of the pure core
#   6. cargo pgrx test pg15     in-database tests (pgrx-tests/), in a throwaway cluster run
#                               as postgres
#   7. reinstall the release build (step 6 installs its test build in its place)
#   8. python3 -m pytest tests/ black-box tests against the release build, in throwaway
#                               clusters started by the tests themselves
#
# Stops at the first failing step and exits non-zero; ends with each step's time and the
# total of tests passed and failed. Extra arguments go to pytest (scripts/test.sh -k attach).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PG_CONFIG=/usr/bin/pg_config
T0=$(date +%s)
SUMMARY=()
CURRENT=""
PGRX_DIR=""
LOG=$(mktemp /tmp/dispatched-test-log.XXXXXX)

step() {
  CURRENT="$*"
  STEP_T0=$(date +%s)
  printf '\n==> %s\n' "$CURRENT"
}
done_step() {
  local secs=$(($(date +%s) - STEP_T0))
  SUMMARY+=("$(printf '%5ss  %s' "$secs" "$CURRENT")")
}
# Runs a test command with its output shown and kept for the totals.
counted() { "$@" 2>&1 | tee -a "$LOG"; }
# Adds up the closing lines of cargo test (`test result: ok. N passed; M failed; ...`) and
# pytest (`N passed, M failed, K xfailed in 1.2s`).
totals() {
  python3 - "$LOG" <<'PY'
import re, sys
passed = failed = skipped = xfailed = 0
text = open(sys.argv[1], errors="replace").read()
text = re.sub(r"\x1b\[[0-9;]*m", "", text)
for m in re.finditer(r"^test result: \w+\. (\d+) passed; (\d+) failed", text, re.M):
    passed += int(m[1]); failed += int(m[2])
for line in re.findall(r"^=*\s*(\d+ (?:passed|failed|errors?|skipped|xfailed|xpassed)\b.* in [\d.]+s)", text, re.M):
    for n, word in re.findall(r"(\d+) (passed|failed|errors?|skipped|xfailed|xpassed)", line):
        if word == "passed": passed += int(n)
        elif word in ("failed", "error", "errors"): failed += int(n)
        elif word == "skipped": skipped += int(n)
        else: xfailed += int(n)
if xfailed:
    print(f"({xfailed} pytest test(s) xfailed or xpassed: see pytest's summary above)")
print(f"total: {passed} passed, {failed} failed" + (f", {skipped} skipped" if skipped else ""))
PY
}
finish() {
  local rc=$?
  if [ -n "$PGRX_DIR" ]; then rm -rf "$PGRX_DIR"; fi
  printf '\n==> summary\n'
  if [ "${#SUMMARY[@]}" -gt 0 ]; then printf '%s\n' "${SUMMARY[@]}"; fi
  if [ "$rc" -ne 0 ]; then
    printf 'FAILED at: %s (exit %s) after %ss\n' "$CURRENT" "$rc" "$(($(date +%s) - T0))"
  else
    printf 'all green in %ss\n' "$(($(date +%s) - T0))"
  fi
  totals || true
  rm -f "$LOG"
  exit "$rc"
}
trap finish EXIT

step "setup (scripts/setup.sh)"
bash scripts/setup.sh
done_step

step "cargo fmt --all -- --check"
cargo fmt --all -- --check
done_step

step "cargo clippy --all-targets -- -D warnings"
cargo clippy --quiet --all-targets -- -D warnings
done_step

step "pgspot over the extension's SQL (scripts/pgspot.sh)"
bash scripts/pgspot.sh --release
done_step

step "cargo test -p dispatched-core (unit tests of the pure core)"
counted cargo test -p dispatched-core
done_step

step "cargo pgrx test pg15 (in-database tests)"
# The test cluster runs as postgres: its data directory's parent must be postgres's.
PGRX_DIR=$(mktemp -d /tmp/dispatched-pgrx-test.XXXXXX)
chown postgres: "$PGRX_DIR"
counted cargo pgrx test pg15 --runas postgres --pgdata "$PGRX_DIR/pgdata"
done_step

step "reinstall the release build (cargo pgrx test installed its test build)"
reinstall_log=$(mktemp)
if ! cargo pgrx install --release --pg-config "$PG_CONFIG" >"$reinstall_log" 2>&1; then
  cat "$reinstall_log"; rm -f "$reinstall_log"; exit 1
fi
rm -f "$reinstall_log"
done_step

step "black-box tests (python3 -m pytest -q tests/)"
counted python3 -m pytest -q tests/ "$@"
done_step
