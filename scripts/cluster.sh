#!/usr/bin/env bash
# A throwaway PostgreSQL 15 cluster run as user postgres, with dispatched preloaded.
#   scripts/cluster.sh start DIR PORT [extra postgresql.conf lines...]
#   scripts/cluster.sh stop DIR
set -euo pipefail
BIN=$(pg_config --bindir)
as_postgres() {
  if [ "$(id -un)" = postgres ]; then "$@"; else runuser -u postgres -- "$@"; fi
}
cmd=${1:?usage: cluster.sh start DIR PORT | stop DIR}
dir=${2:?DIR}
case "$cmd" in
  start)
    port=${3:?PORT}; shift 3
    mkdir -p "$(dirname "$dir")"
    if [ ! -f "$dir/PG_VERSION" ]; then
      mkdir -p "$dir"; chown postgres: "$dir"; chmod 700 "$dir"
      as_postgres "$BIN/initdb" -D "$dir" -U postgres -A trust --no-sync >/dev/null
      {
        echo "port = $port"
        echo "listen_addresses = '127.0.0.1'"
        echo "unix_socket_directories = '$dir'"
        echo "shared_preload_libraries = 'dispatched'"
        echo "max_connections = 200"
        echo "log_min_messages = warning"
        for line in "$@"; do echo "$line"; done
      } >> "$dir/postgresql.conf"
    fi
    as_postgres "$BIN/pg_ctl" -D "$dir" -l "$dir/server.log" -w -t 60 start >/dev/null
    ;;
  stop)
    [ -f "$dir/postmaster.pid" ] && as_postgres "$BIN/pg_ctl" -D "$dir" -m fast -w stop >/dev/null || true
    ;;
  *) echo "unknown command $cmd" >&2; exit 2 ;;
esac
