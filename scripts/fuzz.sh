#!/usr/bin/env bash
# Fuzzes the pure core (core/fuzz, cargo-fuzz + libFuzzer): the definition parser, the
# expression parser and evaluator, the duration parser, the directive parser, and allowed
# hosts and URLs. Separate from scripts/test.sh (it takes minutes):
#
#   scripts/fuzz.sh [SECONDS [TARGET...]]     default: 60 seconds for every target
#
# Installs cargo-fuzz when it is missing. libFuzzer needs nightly compiler features; on a
# stable toolchain RUSTC_BOOTSTRAP=1 unlocks them. Each target starts from the committed
# seeds in core/fuzz/corpus/<target> and keeps what it learns in a scratch corpus
# (FUZZ_WORK, default /tmp/dispatched-fuzz/<target>), so the committed seeds stay small.
# A crash or hang stops the script non-zero and leaves the input in core/fuzz/artifacts/.
# Ends with one line per target: executions, executions per second, coverage (edges),
# features and corpus size.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../core"

SECONDS_EACH=${1:-60}
shift || true
TARGETS=("$@")
if [ "${#TARGETS[@]}" -eq 0 ]; then
  TARGETS=(definition expr duration directives hosts)
fi
WORK=${FUZZ_WORK:-/tmp/dispatched-fuzz}
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
  cargo install cargo-fuzz --locked
fi

SUMMARY=()
for t in "${TARGETS[@]}"; do
  mkdir -p "$WORK/$t"
  log="$WORK/$t.log"
  printf '\n==> fuzz %s for %ss\n' "$t" "$SECONDS_EACH"
  rc=0
  cargo fuzz run "$t" "$WORK/$t" "fuzz/corpus/$t" -- \
    -max_total_time="$SECONDS_EACH" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
    >"$log" 2>&1 || rc=$?
  tail -n 25 "$log"
  line=$(python3 - "$log" "$t" <<'PY'
import re, sys
text = open(sys.argv[1], errors="replace").read()
stat = lambda k: (re.findall(rf"^stat::{k}:\s+(\d+)", text, re.M) or ["?"])[-1]
last = re.findall(r"#(\d+)\s+\w+\s+cov: (\d+) ft: (\d+) corp: (\d+)", text)
cov, ft, corp = (last[-1][1:] if last else ("?", "?", "?"))
print(f"{sys.argv[2]:<11} execs {stat('number_of_executed_units'):>10}  "
      f"exec/s {stat('average_exec_per_sec'):>7}  cov {cov:>5}  ft {ft:>6}  corpus {corp}")
PY
)
  SUMMARY+=("$line")
  if [ "$rc" -ne 0 ]; then
    printf '%s\n' "${SUMMARY[@]}"
    echo "fuzz target $t failed (exit $rc); see $log and core/fuzz/artifacts/$t/" >&2
    exit "$rc"
  fi
done
printf '\n==> fuzz summary (%ss each)\n' "$SECONDS_EACH"
printf '%s\n' "${SUMMARY[@]}"
