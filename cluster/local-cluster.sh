#!/usr/bin/env bash
# A multi-node Ray cluster on one machine, for development and tests: a head plus one worker
# node per machine profile of a serve config, each node advertising that profile's resources
# (logical CPUs, logical GPUs via --num-gpus, `accelerator_type:<T>`, custom resources). Every
# listener is on 127.0.0.1; `stop` ends only this cluster's processes.
#
#   cluster/local-cluster.sh start [--config serve_config.yaml] [--nodes-per-profile N]
#   cluster/local-cluster.sh status
#   cluster/local-cluster.sh stop
#   cluster/local-cluster.sh profiles [--config FILE]   # the worker nodes `start` would add
#
# Then: RAY_ADDRESS=127.0.0.1:$PORT RAY_AUTH_MODE=token serve deploy -a http://127.0.0.1:$DASHBOARD_PORT ...
# Ports: POOLSERVE_LOCAL_RAY_PORT (default 6390), POOLSERVE_LOCAL_DASHBOARD_PORT (default 8275).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="${POOLSERVE_PYTHON:-$ROOT/.venv/bin/python}"
RAY="$(dirname "$PY")/ray"
STATE_DIR="${POOLSERVE_LOCAL_STATE_DIR:-$ROOT/.cache/local-cluster}"
STATE_FILE="$STATE_DIR/state"
PORT="${POOLSERVE_LOCAL_RAY_PORT:-6390}"
DASHBOARD_PORT="${POOLSERVE_LOCAL_DASHBOARD_PORT:-8275}"

export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=token
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
unset RAY_ADDRESS
# Ray Serve's settings of app/serve_env.py, in every node's environment (unless already set)
eval "$("$PY" -m app.serve_env)"

log() { echo "[local-cluster] $*" >&2; }

free_port() {
  "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# One line per profile: name, logical CPUs, logical GPUs, resources JSON (for `ray start`).
profile_nodes() {
  "$PY" - "$1" <<'EOF'
import json, math, sys
import yaml
from app.config import AppConfig

config = yaml.safe_load(open(sys.argv[1]))
apps = [a for a in config["applications"] if a["import_path"] == "app.builder:build_app"]
for profile in AppConfig.model_validate(apps[0].get("args") or {}).profiles:
    replicas = max(profile.num_replicas, profile.max_replicas or 0, 1)  # room to scale up
    resources = {name: amount * replicas for name, amount in profile.resources.items()}
    if profile.accelerator_type:
        resources[f"accelerator_type:{profile.accelerator_type}"] = 1
    resources[f"profile:{profile.name}"] = replicas
    cpus = max(math.ceil(profile.num_cpus * replicas), 1)
    gpus = math.ceil(profile.num_gpus * replicas)
    print(profile.name, cpus, gpus, json.dumps(resources, separators=(",", ":")))
EOF
}

# PIDs of this cluster: processes naming its GCS address or temp dir, and their descendants.
cluster_pids() {
  "$PY" - "$1" "$2" <<'EOF'
import os, re, sys
from pathlib import Path

address = re.compile(rf"127\.0\.0\.1:{sys.argv[1]}(?!\d)")
temp_dir, me = sys.argv[2], {os.getpid(), os.getppid()}
children, roots = {}, []
for proc in Path("/proc").iterdir():
    if not proc.name.isdigit() or int(proc.name) in me:
        continue
    try:
        cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        parent = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        continue
    children.setdefault(parent, []).append(int(proc.name))
    if (address.search(cmdline) or temp_dir in cmdline) and "local-cluster.sh" not in cmdline:
        roots.append(int(proc.name))
found, todo = set(), roots
while todo:
    pid = todo.pop()
    if pid not in found:
        found.add(pid)
        todo.extend(children.get(pid, []))
print(" ".join(map(str, sorted(found))))
EOF
}

# What `ray start --address=...` does, minus its refusal of extra nodes when
# RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (which we need: with it on, `ray start` replaces
# 127.0.0.1 by the machine's address). Like `ray start`, the node outlives this command.
start_worker_node() {
  "$PY" - "127.0.0.1:$PORT" "$1" "$2" "$3" "$(free_port)" "$(free_port)" "$(free_port)" <<'EOF'
import json, sys
from ray._private.node import Node
from ray._private.parameter import RayParams

gcs, cpus, gpus, resources, agent_port, metrics_port, env_agent_port = sys.argv[1:]
params = RayParams(
    node_ip_address="127.0.0.1",
    gcs_address=gcs,
    num_cpus=int(cpus),
    num_gpus=int(gpus),
    resources=json.loads(resources),
    object_store_memory=200 * 1024 * 1024,
    min_worker_port=0,
    max_worker_port=0,
    node_manager_port=0,
    dashboard_agent_listen_port=int(agent_port),
    metrics_export_port=int(metrics_port),
    runtime_env_agent_port=int(env_agent_port),
    include_log_monitor=False,
)
Node(params, head=False, shutdown_at_exit=False, spawn_reaper=False)
EOF
}

node_ports() {
  echo "--dashboard-agent-listen-port=$(free_port) --dashboard-agent-grpc-port=$(free_port)" \
    "--metrics-export-port=$(free_port) --runtime-env-agent-port=$(free_port)"
}

start() {
  local config="$ROOT/serve_config.yaml" per_profile=1
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --config) config="$2"; shift 2 ;;
      --nodes-per-profile) per_profile="$2"; shift 2 ;;
      *) echo "unknown option $1" >&2; exit 2 ;;
    esac
  done
  if [[ -f "$STATE_FILE" ]]; then
    echo "a local cluster is already recorded in $STATE_FILE; run '$0 stop' first" >&2
    exit 1
  fi
  local nodes
  nodes="$(profile_nodes "$config")"
  mkdir -p "$STATE_DIR"
  local temp_dir
  temp_dir="$(mktemp -d /tmp/pslc-XXXXXX)"  # short: Ray's socket paths are length-limited
  printf 'PORT=%s\nDASHBOARD_PORT=%s\nTEMP_DIR=%s\n' "$PORT" "$DASHBOARD_PORT" "$temp_dir" \
    >"$STATE_FILE"
  "$RAY" get-auth-token --generate >/dev/null
  log "head on 127.0.0.1:$PORT (dashboard http://127.0.0.1:$DASHBOARD_PORT)"
  # shellcheck disable=SC2046
  "$RAY" start --head --node-ip-address=127.0.0.1 --port="$PORT" \
    --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT" \
    --ray-client-server-port="$(free_port)" $(node_ports) \
    --num-cpus=1 --num-gpus=0 --resources='{"profile:head":1}' --object-store-memory=300000000 \
    --temp-dir="$temp_dir" --disable-usage-stats >/dev/null
  local name cpus gpus resources index names=(head)
  while read -r name cpus gpus resources; do
    names+=("$name")
    for ((index = 0; index < per_profile; index++)); do
      log "worker node: profile $name, CPU $cpus, GPU $gpus, resources $resources"
      start_worker_node "$cpus" "$gpus" "$resources"
    done
  done <<<"$nodes"
  wait_for_profiles "${names[@]}"
  status
  echo "RAY_ADDRESS=127.0.0.1:$PORT"
  echo "DASHBOARD=http://127.0.0.1:$DASHBOARD_PORT"
}

# Return once `ray status` (refreshed every few seconds) shows a node of every profile.
wait_for_profiles() {
  local deadline=$((SECONDS + 180)) out missing name
  while true; do
    out="$("$RAY" status --address="127.0.0.1:$PORT" 2>/dev/null || true)"
    missing=""
    for name in "$@"; do
      grep -q "profile:$name\b" <<<"$out" || missing+=" $name"
    done
    [[ -z "$missing" ]] && return 0
    if ((SECONDS >= deadline)); then
      log "nodes of these profiles did not register within 180 s:$missing"
      return 1
    fi
    sleep 2
  done
}

status() {
  [[ -f "$STATE_FILE" ]] || { log "no local cluster recorded"; return 1; }
  # shellcheck disable=SC1090
  source "$STATE_FILE"
  "$RAY" status --address="127.0.0.1:$PORT"
}

stop() {
  [[ -f "$STATE_FILE" ]] || { log "no local cluster recorded"; return 0; }
  # shellcheck disable=SC1090
  source "$STATE_FILE"
  local pids signal
  for signal in TERM KILL; do
    pids="$(cluster_pids "$PORT" "$TEMP_DIR")"
    [[ -n "$pids" ]] || break
    log "SIG$signal to $(wc -w <<<"$pids") processes of the cluster on port $PORT"
    # shellcheck disable=SC2086
    kill -s "$signal" $pids 2>/dev/null || true
    for _ in $(seq 1 50); do
      [[ -n "$(cluster_pids "$PORT" "$TEMP_DIR")" ]] || break
      sleep 0.3
    done
  done
  pids="$(cluster_pids "$PORT" "$TEMP_DIR")"
  if [[ -n "$pids" ]]; then
    log "still running: $pids"
    exit 1
  fi
  rm -rf "$TEMP_DIR" "$STATE_FILE"
  log "stopped"
}

case "${1:-}" in
  start) shift; start "$@" ;;
  profiles) profile_nodes "${3:-$ROOT/serve_config.yaml}" ;;
  status) status ;;
  stop) stop ;;
  *) sed -n '2,14p' "$0" >&2; exit 2 ;;
esac
