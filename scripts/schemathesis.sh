#!/usr/bin/env bash
# Schemathesis with every check against a live `p2p-node discovery` on 127.0.0.1, on a
# port the OS picks, with its relay, and with the per-address write limit raised (every
# request comes from 127.0.0.1). Bounded in examples per operation and in time; fails on
# any failure. discovery/schemathesis.toml says which refusals of schema-valid data are
# expected, and why.
#
# Usage: scripts/schemathesis.sh [P2P_NODE_BINARY]
# Environment: ST (the schemathesis command, default `st`), ST_MAX_EXAMPLES (30),
# ST_MAX_TIME (seconds, 60), ST_SEED (fixed, so a run can be repeated).
set -euo pipefail
cd "$(dirname "$0")/.."
bin=$(realpath "${1:-target/debug/p2p-node}")
st=${ST:-st}
# A path (not a command on PATH) stays valid after the `cd discovery` below.
if [[ "$st" == */* ]]; then
  st=$(realpath "$st")
fi
work=$(mktemp -d)
chmod 700 "$work"
"$bin" --data-dir "$work/data" discovery --listen 127.0.0.1:0 --db "$work/discovery.redb" \
  --write-rate 100000 --write-burst 100000 >"$work/out" 2>"$work/err" &
pid=$!
cleanup() {
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
url=""
for _ in $(seq 1 200); do
  url=$(grep -o 'http://[0-9.:]*' "$work/out" | head -n1 || true)
  [ -n "$url" ] && break
  if ! kill -0 "$pid" 2>/dev/null; then
    cat "$work/err" >&2
    echo "the discovery server did not start" >&2
    exit 1
  fi
  sleep 0.05
done
[ -n "$url" ] || { echo "the discovery server did not say where it listens" >&2; exit 1; }
echo "schemathesis against $url"
cd discovery # for schemathesis.toml
"$st" run openapi.json --url "$url" --checks all --workers 1 --no-color \
  --max-examples "${ST_MAX_EXAMPLES:-30}" --max-time "${ST_MAX_TIME:-60}" \
  --seed "${ST_SEED:-20261130}" --generation-database none
