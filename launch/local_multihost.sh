#!/usr/bin/env bash
# Multi-host training without a pod: N local processes, each with D simulated
# CPU devices, joined by jax.distributed (gloo collectives) on localhost.
#
#   launch/local_multihost.sh 2 4 --gin_file=gin/demo.gin --gin.MODEL_DIR="'/tmp/mh'"
#
# Process 0 logs to the terminal; every process's log is in $LOG_DIR, by default a
# fresh private directory (mktemp -d) whose path is printed first.
# The caller's XLA_FLAGS are kept, with the device count appended.
set -euo pipefail
if [[ $# -lt 2 ]]; then
  echo "usage: $0 NUM_PROCESSES DEVICES_PER_PROCESS [dsbs-train flags...]" >&2
  exit 2
fi
num_processes=$1; devices=$2; shift 2
port=${PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
if [[ -n "${LOG_DIR:-}" ]]; then
  log_dir=$LOG_DIR
  mkdir -p "$log_dir"
else
  log_dir=$(mktemp -d -t dsbs_multihost.XXXXXX)
fi
echo "logs: $log_dir"
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true' INT TERM
for ((i = 0; i < num_processes; i++)); do
  XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$devices" JAX_PLATFORMS=cpu \
    python3 -m dsbs_jax --coordinator_address="127.0.0.1:$port" \
    --num_processes="$num_processes" --process_id="$i" "$@" > "$log_dir/process_$i.log" 2>&1 &
  pids+=($!)
done
tail -n +1 -f "$log_dir/process_0.log" --pid="${pids[0]}" &
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
