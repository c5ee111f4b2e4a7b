#!/usr/bin/env bash
# Start a complete local stack on loopback, to try the cluster path on one machine:
#   - an S3 endpoint (moto's server) with the bucket `fcn-demo`,
#   - a Ray head (GCS, dashboard and job API on 127.0.0.1),
#   - a Prefect server (API and UI on 127.0.0.1),
#   - the deployments of prefect.yaml served by `python -m flows.serve`;
#   - with --workers N, N Ray worker nodes joined to the head (`ray start --address`), each its own
#     raylet, object store and CPUs: a multi-node cluster on one machine.
# Every service binds 127.0.0.1. State, logs and pids go to $STACK_DIR (default demo-data/stack);
# `source $STACK_DIR/env` sets AWS_*, RAY_ADDRESS and PREFECT_API_URL for your shell.
# Stop with infra/local/stop.sh. Ports: S3_PORT, RAY_PORT, RAY_DASHBOARD_PORT, RAY_AGENT_PORT (worker node i's
# agent: RAY_AGENT_PORT + i), PREFECT_PORT (keep Ray's ports outside Ray's worker port range, 10002-19999).
set -Eeuo pipefail

usage() {
  cat <<USAGE
Usage: infra/local/start.sh [--workers N] [--head-cpus C] [--worker-cpus C] [--worker-memory-mb M] [--dry-run]

Start the loopback stack: S3 (moto), a Ray head with the dashboard and job API, a Prefect server and
the served deployments; with --workers, also N Ray worker nodes on this machine.

  --workers N           Ray worker nodes beside the head (default 0: a single-node cluster)
  --head-cpus C         CPUs the head offers (default: all it detects; 0 with --workers, so that the
                        jobs' actors and train workers run on the worker nodes, as on a cluster)
  --worker-cpus C       CPUs each worker node offers (default 2)
  --worker-memory-mb M  object store of each worker node, MiB (default 1024)
  --dry-run             print the services and the commands that would start them; start nothing
  -h, --help            this help

Each worker node i also offers the custom resource "worker-i": 1 (to pin a task or actor to it), and
\`infra/local/stop.sh --kill-worker i\` SIGKILLs it (its raylet and its workers), as a lost machine.
USAGE
}

WORKERS=0 HEAD_CPUS="" WORKER_CPUS=2 WORKER_MEMORY_MB=1024 DRY_RUN=0
while (($#)); do
  case $1 in
    --workers | --head-cpus | --worker-cpus | --worker-memory-mb)
      [[ $# -ge 2 ]] || { echo "$1 needs a value" >&2; exit 2; }
      case $1 in
        --workers) WORKERS=$2 ;;
        --head-cpus) HEAD_CPUS=$2 ;;
        --worker-cpus) WORKER_CPUS=$2 ;;
        --worker-memory-mb) WORKER_MEMORY_MB=$2 ;;
      esac
      shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) echo "unknown argument: $1" >&2; usage >&2; exit 2 ;;
  esac
done
# check FLAG VALUE PATTERN WHAT: exit 2 naming the flag unless VALUE matches PATTERN.
check() { [[ $2 =~ $3 ]] || { echo "$1: must be $4, got '$2'" >&2; exit 2; }; }
check --workers "$WORKERS" '^[0-9]+$' "a whole number >= 0"
check --head-cpus "$HEAD_CPUS" '^[0-9]*$' "a whole number >= 0"
check --worker-cpus "$WORKER_CPUS" '^[1-9][0-9]*$' "a whole number >= 1"
check --worker-memory-mb "$WORKER_MEMORY_MB" '^[1-9][0-9]*$' "a whole number >= 1"
if [[ -z $HEAD_CPUS && $WORKERS -gt 0 ]]; then HEAD_CPUS=0; fi

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
BIN=$(dirname "$PYTHON")
STACK_DIR=${STACK_DIR:-$ROOT/demo-data/stack}
S3_PORT=${S3_PORT:-9000}
RAY_PORT=${RAY_PORT:-6380}
RAY_DASHBOARD_PORT=${RAY_DASHBOARD_PORT:-8265}
RAY_AGENT_PORT=${RAY_AGENT_PORT:-52365}  # the job API's agent
PREFECT_PORT=${PREFECT_PORT:-4200}
BUCKET=fcn-demo

S3_CMD=("$BIN/moto_server" -H 127.0.0.1 -p "$S3_PORT")
HEAD_CMD=("$BIN/ray" start --head --block --node-ip-address=127.0.0.1 --port="$RAY_PORT" --dashboard-host=127.0.0.1
  --dashboard-port="$RAY_DASHBOARD_PORT" --dashboard-agent-listen-port="$RAY_AGENT_PORT" --disable-usage-stats)
[[ -z $HEAD_CPUS ]] || HEAD_CMD+=(--num-cpus="$HEAD_CPUS")
PREFECT_CMD=("$BIN/prefect" server start --host 127.0.0.1 --port "$PREFECT_PORT")
SERVE_CMD=("$PYTHON" -m flows.serve)

# worker_cmd I: set WORKER_CMD to the command of worker node I: `ray start --address` through join_node.py,
# which lets a node join while the stack stays in Ray's single-machine mode, on 127.0.0.1. Several raylets
# share 127.0.0.1, so each takes its own agent port, and random ports for its Ray workers instead of the
# head's fixed range.
worker_cmd() {
  WORKER_CMD=("$PYTHON" "$ROOT/infra/local/join_node.py" start --address="127.0.0.1:$RAY_PORT" --block
    --node-ip-address=127.0.0.1 --num-cpus="$WORKER_CPUS" --resources="{\"worker-$1\": 1}"
    --object-store-memory=$((WORKER_MEMORY_MB * 1024 * 1024)) --dashboard-agent-listen-port=$((RAY_AGENT_PORT + $1))
    --min-worker-port=0 --max-worker-port=0 --disable-usage-stats)
}

if ((DRY_RUN)); then  # one line per service: NAME: COMMAND (shell-quoted)
  show() { printf '%s:' "$1"; shift; printf ' %q' "$@"; echo; }
  echo "stack dir: $STACK_DIR"
  show s3 "${S3_CMD[@]}"
  show ray "${HEAD_CMD[@]}"
  for i in $(seq 1 "$WORKERS"); do worker_cmd "$i"; show "ray-worker-$i" "${WORKER_CMD[@]}"; done
  show prefect "${PREFECT_CMD[@]}"
  show serve "${SERVE_CMD[@]}"
  echo "ray nodes: $((WORKERS + 1))"
  exit 0
fi

mkdir -p "$STACK_DIR"
for pidfile in "$STACK_DIR"/{s3,ray,prefect,serve}.pid "$STACK_DIR"/ray-worker-*.pid; do
  if [[ -f $pidfile ]] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
    echo "the local stack is already running ($pidfile); stop it with infra/local/stop.sh" >&2
    exit 1
  fi
done

# Ray token authentication with a token of this stack (head, drivers and `ray job submit` read it).
[[ -s $STACK_DIR/ray-auth-token ]] || (umask 077 && "$PYTHON" -c "import secrets; print(secrets.token_hex(32))" >"$STACK_DIR/ray-auth-token")

cat >"$STACK_DIR/env" <<ENV
export PATH=$BIN:\$PATH  # the project's Python first: Ray job entrypoints run \`python -m ...\`
export AWS_ACCESS_KEY_ID=local AWS_SECRET_ACCESS_KEY=local AWS_DEFAULT_REGION=us-east-1
export AWS_ENDPOINT_URL=http://127.0.0.1:$S3_PORT FSSPEC_S3_ENDPOINT_URL=http://127.0.0.1:$S3_PORT
export RAY_ADDRESS=127.0.0.1:$RAY_PORT
# Ray's single-machine mode (its default on macOS/Windows): drivers keep 127.0.0.1 as the address of
# the loopback-bound head instead of replacing it by the machine's IP.
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$STACK_DIR/ray-auth-token
export PREFECT_HOME=$STACK_DIR/prefect PREFECT_API_URL=http://127.0.0.1:$PREFECT_PORT/api
export PREFECT_SERVER_ANALYTICS_ENABLED=false
ENV
# shellcheck source=/dev/null
source "$STACK_DIR/env"

# launch NAME CMD...: run CMD in its own process group (stop.sh ends the whole group), log to NAME.log.
launch() {
  local name=$1
  shift
  setsid "$@" >"$STACK_DIR/$name.log" 2>&1 </dev/null &
  echo $! >"$STACK_DIR/$name.pid"
}

# wait_for NAME URL: poll the service's HTTP endpoint until it answers; fail (showing its log)
# if the service exits or takes more than 3 minutes.
wait_for() {
  "$PYTHON" - "$1" "$2" "$(cat "$STACK_DIR/$1.pid")" <<'PY' || { tail -n 20 "$STACK_DIR/$1.log" >&2; return 1; }
import os, sys, time, urllib.error, urllib.request
name, url, pid = sys.argv[1], sys.argv[2], int(sys.argv[3])
deadline = time.monotonic() + 180
while time.monotonic() < deadline:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        sys.exit(f"{name} exited; its log:")
    try:
        urllib.request.urlopen(url, timeout=2).close()
    except urllib.error.HTTPError:
        pass  # it answers (e.g. 401 from Ray's token authentication): it is up
    except OSError:
        time.sleep(0.5)
        continue
    print(f"{name} is up: {url}")
    sys.exit(0)
sys.exit(f"{name} did not answer at {url} within 3 minutes; its log:")
PY
}

# wait_nodes N: wait until N Ray nodes are alive in the head's GCS; fail (showing the worker nodes' logs)
# after 3 minutes.
wait_nodes() {
  "$PYTHON" - "$1" <<'PY' || { tail -n 20 "$STACK_DIR"/ray-worker-*.log >&2; return 1; }
import sys, time
import ray
want = int(sys.argv[1])
ray.init(logging_level="ERROR", log_to_driver=False)  # RAY_ADDRESS: the stack's head
deadline = time.monotonic() + 180
while (alive := sum(node["Alive"] for node in ray.nodes())) < want and time.monotonic() < deadline:
    time.sleep(0.5)
sys.exit(f"{alive} of {want} Ray nodes are up after 3 minutes; the worker nodes' logs:" if alive < want else None)
PY
}

# On any failure, stop whatever this script started.
trap 'echo "start failed; stopping the stack" >&2; "$(dirname "$0")/stop.sh"' ERR

launch s3 "${S3_CMD[@]}"
launch ray "${HEAD_CMD[@]}"
launch prefect "${PREFECT_CMD[@]}"

wait_for s3 "http://127.0.0.1:$S3_PORT/moto-api/"
"$PYTHON" -c "import s3fs; fs = s3fs.S3FileSystem(); fs.exists('$BUCKET') or fs.mkdir('$BUCKET')"
wait_for ray "http://127.0.0.1:$RAY_DASHBOARD_PORT/api/version"
# One worker node at a time: `ray start` picks its free ports before its raylet binds them, so nodes
# started together on one address can pick the same port.
for i in $(seq 1 "$WORKERS"); do
  worker_cmd "$i"
  launch "ray-worker-$i" "${WORKER_CMD[@]}"
  wait_nodes $((i + 1))
  echo "ray worker node $i is up"
done
wait_for prefect "http://127.0.0.1:$PREFECT_PORT/api/health"

(cd "$ROOT" && launch serve "${SERVE_CMD[@]}")
for _ in $(seq 1 60); do
  "$BIN/prefect" deployment inspect segment-bucket/segment-bucket >/dev/null 2>&1 && break
  kill -0 "$(cat "$STACK_DIR/serve.pid")" 2>/dev/null || { tail -n 20 "$STACK_DIR/serve.log" >&2; false; }
  sleep 2
done

NODES="the head${HEAD_CPUS:+ ($HEAD_CPUS CPUs)}"
if ((WORKERS)); then
  NODES+=" + $WORKERS worker nodes, $WORKER_CPUS CPUs each (lose one: infra/local/stop.sh --kill-worker I)"
fi
cat <<MSG

Local stack running (logs and pids in $STACK_DIR):
  S3 endpoint     http://127.0.0.1:$S3_PORT   bucket s3://$BUCKET
  Ray dashboard   http://127.0.0.1:$RAY_DASHBOARD_PORT   (jobs: ray job submit --address http://127.0.0.1:$RAY_DASHBOARD_PORT ...)
  Ray nodes       $NODES
  Prefect UI/API  http://127.0.0.1:$PREFECT_PORT
  Deployments     segment-bucket/segment-bucket, nightly-retrain/nightly-retrain (served)

  source $STACK_DIR/env
  prefect deployment run segment-bucket/segment-bucket --param input=s3://$BUCKET/bucket/ --param output=s3://$BUCKET/segmented/
  infra/local/stop.sh
MSG
