#!/usr/bin/env bash
# Sets up a Debian 12 machine (as root) to build, install and test dispatched. Idempotent:
# every step is skipped when its result is already there, so a second run takes seconds.
#
#   1. Debian packages: postgresql-15 postgresql-server-dev-15 libclang-dev sudo python3-pip
#      chromium (the dashboard's browser test)
#   2. cargo-pgrx 0.18.1 (cargo install), unless `cargo pgrx --version` already says 0.18.1
#   3. `cargo pgrx init --pg15 /usr/bin/pg_config`, unless ~/.pgrx/config.toml has pg15
#   4. the Python test dependencies of tests/requirements.txt (pinned)
#   5. builds dispatched in release mode and installs it into PostgreSQL 15
#
# Output is quiet: one line per step; a failing step prints its full log.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PG_CONFIG=/usr/bin/pg_config
PGRX_VERSION=0.18.1
APT_PACKAGES=(postgresql-15 postgresql-server-dev-15 libclang-dev sudo python3-pip chromium)
export DEBIAN_FRONTEND=noninteractive

step() { printf '[setup] %s\n' "$*"; }

# Runs a command with its output kept in a log that is shown only when it fails.
quiet() {
  local log rc=0
  log=$(mktemp)
  "$@" >"$log" 2>&1 || rc=$?
  if [ "$rc" -ne 0 ]; then
    printf '[setup] FAILED (exit %s): %s\n' "$rc" "$*" >&2
    cat "$log" >&2
  fi
  rm -f "$log"
  return "$rc"
}

if [ "$(id -u)" -ne 0 ]; then
  echo "[setup] run me as root (apt-get, cargo pgrx install into the system PostgreSQL)" >&2
  exit 1
fi
if [ -f "$HOME/.cargo/env" ]; then
  # shellcheck disable=SC1091
  . "$HOME/.cargo/env"
fi
command -v cargo >/dev/null || { echo "[setup] cargo not found: install Rust (rustup) first" >&2; exit 1; }

# 1. Debian packages
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed'; then
    missing+=("$pkg")
  fi
done
if [ "${#missing[@]}" -gt 0 ]; then
  step "apt-get update"
  quiet apt-get update
  step "apt-get install ${missing[*]}"
  quiet apt-get install -y --no-install-recommends "${missing[@]}"
  # Debian's postgresql-15 creates and may start a "main" cluster on port 5432; dispatched's
  # scripts and tests start clusters of their own, so stop the one this install started.
  if [[ " ${missing[*]} " == *" postgresql-15 "* ]] && pg_ctlcluster 15 main status >/dev/null 2>&1; then
    step "stopping the Debian 'main' cluster the package install started (not used)"
    quiet pg_ctlcluster 15 main stop
  fi
else
  step "Debian packages: all there (${APT_PACKAGES[*]})"
fi
[ -x "$PG_CONFIG" ] || { echo "[setup] $PG_CONFIG is missing after the package install" >&2; exit 1; }

# 2. cargo-pgrx
if cargo pgrx --version 2>/dev/null | grep -qx "cargo-pgrx $PGRX_VERSION"; then
  step "cargo-pgrx $PGRX_VERSION: there"
else
  step "cargo install cargo-pgrx $PGRX_VERSION (takes several minutes)"
  quiet cargo install cargo-pgrx --version "$PGRX_VERSION" --locked
fi

# 3. cargo pgrx init
PGRX_CONFIG="${PGRX_HOME:-$HOME/.pgrx}/config.toml"
if [ -f "$PGRX_CONFIG" ] && grep -q '^pg15[[:space:]]*=' "$PGRX_CONFIG"; then
  step "cargo pgrx init: pg15 already configured in $PGRX_CONFIG"
else
  step "cargo pgrx init --pg15 $PG_CONFIG"
  quiet cargo pgrx init --pg15 "$PG_CONFIG"
fi

# 4. Python test dependencies
pip_args=(-q --disable-pip-version-check --root-user-action=ignore -r tests/requirements.txt)
if python3 -c 'import os, sys, sysconfig; sys.exit(0 if os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")) else 1)'; then
  # Debian's own python3 refuses pip installs (PEP 668) unless told.
  pip_args+=(--break-system-packages)
fi
step "pip install -r tests/requirements.txt ($(python3 --version 2>&1))"
quiet python3 -m pip install "${pip_args[@]}"

# 5. Build and install the extension
step "cargo pgrx install --release (build and install dispatched into $("$PG_CONFIG" --pkglibdir))"
quiet cargo pgrx install --release --pg-config "$PG_CONFIG"
step "done"
