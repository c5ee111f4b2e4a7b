#!/usr/bin/env bash
# Stop the local stack started by infra/local/start.sh: ends each service's process group by the pid
# it recorded (nothing else on the machine is touched). Data under $STACK_DIR stays.
#
#   infra/local/stop.sh                  stop everything (the worker nodes first, the head after them)
#   infra/local/stop.sh --kill-worker I  only SIGKILL Ray worker node I: its process group (raylet, agents)
#                                        and every process under it (its Ray workers), no graceful stop, as
#                                        a machine that is lost; jobs on the stack recover on the other nodes
set -uo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
STACK_DIR=${STACK_DIR:-$ROOT/demo-data/stack}

# descendants PID: the pids of every process under PID (children, grandchildren, ...).
descendants() {
  local child
  for child in $(ps -o pid= --ppid "$1"); do
    echo "$child"
    descendants "$child"
  done
}

case ${1:-} in
  "") ;;
  --kill-worker)
    pidfile=$STACK_DIR/ray-worker-${2:-}.pid
    [[ ${2:-} =~ ^[0-9]+$ && -f $pidfile ]] || { echo "no Ray worker node '${2:-}' ($pidfile)" >&2; exit 2; }
    pid=$(cat "$pidfile")
    kill -0 "$pid" 2>/dev/null || { echo "Ray worker node $2 is not running" >&2; exit 1; }
    # The node's process group (`ray start`, its raylet and agents) and every process under it: Ray
    # gives each of its workers a process group of its own.
    mapfile -t under < <(descendants "$pid")
    kill -KILL -- "-$pid" "${under[@]}" 2>/dev/null
    rm -f "$pidfile"
    echo "killed Ray worker node $2 (SIGKILL to process group $pid and the ${#under[@]} processes under it)"
    exit 0 ;;
  -h | --help) sed -n '2,9s/^# \{0,1\}//p' "$0"; exit 0 ;;
  *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
esac

shopt -s nullglob
for pidfile in "$STACK_DIR"/serve.pid "$STACK_DIR"/prefect.pid "$STACK_DIR"/ray-worker-*.pid "$STACK_DIR"/ray.pid \
  "$STACK_DIR"/s3.pid; do
  [[ -f $pidfile ]] || continue
  service=$(basename "$pidfile" .pid)
  pid=$(cat "$pidfile")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid"
    for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    kill -0 "$pid" 2>/dev/null && kill -KILL -- "-$pid" 2>/dev/null
    echo "stopped $service (process group $pid)"
  fi
  rm -f "$pidfile"
done
