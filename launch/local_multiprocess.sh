#!/usr/bin/env bash
# N processes on this machine, each with D simulated CPU devices (or its own GPU), joined by
# jax.distributed on 127.0.0.1 -- the multi-host code path, testable on one machine.
#
#   launch/local_multiprocess.sh NUM_PROCESSES DEVICES_PER_PROCESS --config=configs/demo.py:smoke --workdir=/tmp/mp
#
# Every process writes the same workdir (orbax coordinates the checkpoint; process 0 writes
# the metrics). Process I logs to LOG_DIR/unitsface_proc<I>.log (LOG_DIR: default /tmp).
# When one process fails, the others are stopped (SIGTERM, then SIGKILL after 10 s) and the
# script exits with the first failure's status; Ctrl-C or SIGTERM stops them all. A dry run
# (--dry_run as the first argument, or DRY_RUN=1) prints each process's command and starts
# nothing.
set -euo pipefail
dry=${DRY_RUN:-0}
if [[ ${1:-} == --dry_run ]]; then dry=1; shift; fi
n=${1:?number of processes}; d=${2:?devices per process}; shift 2
log_dir=${LOG_DIR:-/tmp}
port=$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])')
xla_flags="${XLA_FLAGS:+$XLA_FLAGS }--xla_force_host_platform_device_count=$d"
platforms=${JAX_PLATFORMS:-cpu}
command() {  # the command of process $1
  echo "env XLA_FLAGS=$(printf %q "$xla_flags") JAX_PLATFORMS=$platforms python -m" \
    "unitsface_jax.main --distributed --coordinator_address=127.0.0.1:$port" \
    "--num_processes=$n --process_id=$1$(printf ' %q' "${args[@]}")"
}
args=("$@")
if [[ $dry != 0 ]]; then
  for ((i = 0; i < n; i++)); do
    echo "process $i runs (log: $log_dir/unitsface_proc$i.log):"
    echo "  $(command "$i")"
  done
  exit 0
fi
pids=()
stop_all() {
  local pid
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for ((t = 0; t < 100; t++)); do
    local alive=0
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    ((alive)) || return 0
    sleep 0.1
  done
  for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
}
trap 'stop_all; exit 143' TERM
trap 'stop_all; exit 130' INT
for ((i = 0; i < n; i++)); do
  # exactly the dry run's command; exec, so that $! is the training process itself
  eval "exec $(command "$i")" > "$log_dir/unitsface_proc$i.log" 2>&1 &
  pids+=($!)
done
status=0
for ((i = 0; i < n; i++)); do
  set +e
  wait -n
  code=$?
  set -e
  if ((code != 0 && status == 0)); then
    status=$code
    echo "a process exited with status $code: stopping the others" \
      "(logs: $log_dir/unitsface_proc*.log)" >&2
    stop_all
  fi
done
exit $status
