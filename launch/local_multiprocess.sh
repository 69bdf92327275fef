#!/usr/bin/env bash
# N processes on this machine, each with D simulated CPU devices (or its own GPU), joined by
# jax.distributed on 127.0.0.1 -- the multi-host code path, testable on one machine.
#
#   launch/local_multiprocess.sh NUM_PROCESSES DEVICES_PER_PROCESS --config=configs/demo.py:smoke --workdir=/tmp/mp
#
# Every process writes the same workdir (orbax coordinates the checkpoint; process 0 writes
# the metrics). Process I logs to /tmp/unitsface_proc<I>.log.
set -euo pipefail
n=${1:?number of processes}; d=${2:?devices per process}; shift 2
port=$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
pids=()
for ((i = 0; i < n; i++)); do
  XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$d" JAX_PLATFORMS=${JAX_PLATFORMS:-cpu} \
    python -m unitsface_jax.main --coordinator_address="127.0.0.1:$port" --num_processes="$n" \
    --process_id="$i" "$@" > "/tmp/unitsface_proc$i.log" 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
