#!/usr/bin/env bash
# Start a complete local stack on loopback, to try the cluster path on one machine:
#   - an S3 endpoint (moto's server) with the bucket `fcn-demo`,
#   - a Ray head (GCS, dashboard and job API on 127.0.0.1),
#   - a Prefect server (API and UI on 127.0.0.1),
#   - the deployments of prefect.yaml served by `python -m flows.serve`.
# Every service binds 127.0.0.1. State, logs and pids go to $STACK_DIR (default demo-data/stack);
# `source $STACK_DIR/env` sets AWS_*, RAY_ADDRESS and PREFECT_API_URL for your shell.
# Stop with infra/local/stop.sh. Ports: S3_PORT, RAY_PORT, RAY_DASHBOARD_PORT, RAY_AGENT_PORT, PREFECT_PORT (keep Ray's
# ports outside Ray's worker port range, 10002-19999).
set -Eeuo pipefail

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

mkdir -p "$STACK_DIR"
for service in s3 ray prefect serve; do
  if [[ -f $STACK_DIR/$service.pid ]] && kill -0 "$(cat "$STACK_DIR/$service.pid")" 2>/dev/null; then
    echo "the local stack is already running ($STACK_DIR/$service.pid); stop it with infra/local/stop.sh" >&2
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
# On any failure, stop whatever this script started.
trap 'echo "start failed; stopping the stack" >&2; "$(dirname "$0")/stop.sh"' ERR

launch s3 "$BIN/moto_server" -H 127.0.0.1 -p "$S3_PORT"
launch ray "$BIN/ray" start --head --block --node-ip-address=127.0.0.1 --port="$RAY_PORT" \
  --dashboard-host=127.0.0.1 --dashboard-port="$RAY_DASHBOARD_PORT" \
  --dashboard-agent-listen-port="$RAY_AGENT_PORT" --disable-usage-stats
launch prefect "$BIN/prefect" server start --host 127.0.0.1 --port "$PREFECT_PORT"

wait_for s3 "http://127.0.0.1:$S3_PORT/moto-api/"
"$PYTHON" -c "import s3fs; fs = s3fs.S3FileSystem(); fs.exists('$BUCKET') or fs.mkdir('$BUCKET')"
wait_for ray "http://127.0.0.1:$RAY_DASHBOARD_PORT/api/version"
wait_for prefect "http://127.0.0.1:$PREFECT_PORT/api/health"

(cd "$ROOT" && launch serve "$PYTHON" -m flows.serve)
for _ in $(seq 1 60); do
  "$BIN/prefect" deployment inspect segment-bucket/segment-bucket >/dev/null 2>&1 && break
  kill -0 "$(cat "$STACK_DIR/serve.pid")" 2>/dev/null || { tail -n 20 "$STACK_DIR/serve.log" >&2; false; }
  sleep 2
done

cat <<MSG

Local stack running (logs and pids in $STACK_DIR):
  S3 endpoint     http://127.0.0.1:$S3_PORT   bucket s3://$BUCKET
  Ray dashboard   http://127.0.0.1:$RAY_DASHBOARD_PORT   (jobs: ray job submit --address http://127.0.0.1:$RAY_DASHBOARD_PORT ...)
  Prefect UI/API  http://127.0.0.1:$PREFECT_PORT
  Deployments     segment-bucket/segment-bucket, nightly-retrain/nightly-retrain (served)

  source $STACK_DIR/env
  prefect deployment run segment-bucket/segment-bucket --param input=s3://$BUCKET/bucket/ --param output=s3://$BUCKET/segmented/
  infra/local/stop.sh
MSG
