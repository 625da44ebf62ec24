#!/usr/bin/env bash
# N cooperating JAX processes on one machine (CPU by default), the multi-host runtime in miniature.
# Each process gets its own fake CPU devices; together they form one mesh and one global batch.
#   launch/local_multiprocess.sh NUM_PROCESSES DEVICES_PER_PROCESS CONFIG WORKDIR [--config.x=y ...]
# Example (the demo, 2 processes x 2 devices):
#   launch/local_multiprocess.sh 2 2 configs/synthetic_demo.py runs/demo_2proc --config.data.batch_size=4
# Output lines carry "[process i]". SIGTERM / SIGINT to this script reach every process (they
# checkpoint the same step and stop). When one process fails, the launcher names it; the others
# notice the lost peer and stop by themselves, and any still running GRACE_S seconds later (one
# waiting in a barrier) are killed rather than left waiting. (Not TERM: a run cannot checkpoint
# without its lost process.) Exit status: the first non-zero one of the processes, else 0.
set -uo pipefail
num_processes=${1:?number of processes}
devices_per_process=${2:?devices per process}
config=${3:?config file}
workdir=${4:?workdir}
shift 4
port=${PORT:-$((20000 + RANDOM % 20000))}
grace_s=${GRACE_S:-30}

pids=()
declare -A index_of
for ((i = 0; i < num_processes; i++)); do
  JAX_PLATFORMS=${JAX_PLATFORMS:-cpu} \
  XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${devices_per_process}" \
  python -m t2s_jax.main --config="$config" --workdir="$workdir" \
    --coordinator_address="127.0.0.1:${port}" --num_processes="$num_processes" --process_id="$i" \
    "$@" > >(sed -u "s/^/[process $i] /") 2>&1 &
  pids+=($!)
  index_of[$!]=$i
done

signal_all() { kill "-$1" "${pids[@]}" 2>/dev/null; }
trap 'signal_all TERM' TERM
trap 'signal_all INT' INT

killer=""
declare -A running
for pid in "${pids[@]}"; do running[$pid]=1; done
status=0
while ((${#running[@]})); do
  finished=""
  wait -n -p finished "${!running[@]}"
  code=$?
  [[ -z $finished ]] && continue # woken by a trapped signal: keep waiting
  unset "running[$finished]"
  if ((code != 0 && status == 0)); then
    status=$code
    how="exited with status $code"
    ((code > 128)) && how="ended with status $code (signal $(kill -l $((code - 128))))"
    echo "[launcher] process ${index_of[$finished]} of $num_processes (pid $finished) $how;" \
      "the others stop, or are killed in ${grace_s} s" >&2
    # Its own output is closed and its sleep ends with it: neither holds this script's output open.
    (trap 'kill $nap 2>/dev/null; exit' TERM; sleep "$grace_s" & nap=$!; wait $nap && signal_all KILL) >/dev/null 2>&1 &
    killer=$!
  fi
done
[[ -n $killer ]] && kill "$killer" 2>/dev/null
wait # the output prefixers
exit $status
