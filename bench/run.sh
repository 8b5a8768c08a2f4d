#!/usr/bin/env bash
# The benchmark of issue 4, one command (as root on Debian 12):
#   bench/run.sh [bench.py options]     e.g. bench/run.sh --scenarios throughput --n 500
# Sets the machine up (scripts/setup.sh: release build installed), installs nginx (the fast
# target), then runs bench/bench.py: a throwaway cluster with fsync and synchronous_commit on,
# the scenarios, a table and one JSON line per scenario (appended to bench/results/).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
if ! command -v nginx >/dev/null; then
  echo "[bench] installing nginx-light"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light >/dev/null
fi
exec python3 bench/bench.py "$@"
