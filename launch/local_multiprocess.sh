#!/usr/bin/env bash
# N cooperating JAX processes on one machine (CPU by default), the multi-host runtime in miniature.
# Each process gets its own fake CPU devices; together they form one mesh and one global batch.
#   launch/local_multiprocess.sh NUM_PROCESSES DEVICES_PER_PROCESS CONFIG WORKDIR [--config.x=y ...]
# Example (the demo, 2 processes x 2 devices):
#   launch/local_multiprocess.sh 2 2 configs/synthetic_demo.py runs/demo_2proc --config.data.batch_size=4
set -euo pipefail
num_processes=${1:?number of processes}
devices_per_process=${2:?devices per process}
config=${3:?config file}
workdir=${4:?workdir}
shift 4
port=${PORT:-$((20000 + RANDOM % 20000))}
pids=()
for ((i = 0; i < num_processes; i++)); do
  JAX_PLATFORMS=${JAX_PLATFORMS:-cpu} \
  XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${devices_per_process}" \
  python -m t2s_jax.main --config="$config" --workdir="$workdir" \
    --coordinator_address="127.0.0.1:${port}" --num_processes="$num_processes" --process_id="$i" \
    "$@" > >(sed "s/^/[process $i] /") 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
