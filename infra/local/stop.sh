#!/usr/bin/env bash
# Stop the local stack started by infra/local/start.sh: ends each service's process group by the pid
# it recorded (nothing else on the machine is touched). Data under $STACK_DIR stays.
set -uo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
STACK_DIR=${STACK_DIR:-$ROOT/demo-data/stack}

for service in serve prefect ray s3; do
  pidfile=$STACK_DIR/$service.pid
  [[ -f $pidfile ]] || continue
  pid=$(cat "$pidfile")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid"
    for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    kill -0 "$pid" 2>/dev/null && kill -KILL -- "-$pid" 2>/dev/null
    echo "stopped $service (process group $pid)"
  fi
  rm -f "$pidfile"
done
