#!/usr/bin/env bash
# Cloud TPU pod slice: the same command on every worker; jax.distributed.initialize() discovers
# the slice from the TPU VM metadata. The workdir must be shared by all workers (a Filestore/NFS
# mount or a gcsfuse mount of a bucket), and the prepared datasets readable from every worker.
#   launch/tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [--config.x=y ...]
# Example: launch/tpu_pod.sh t2s-v5e-64 us-west4-a configs/gta_cs_daformer.py /mnt/shared/runs/t2s \
#            --config.data.batch_size=64 --config.data.data_dir=/mnt/shared/tfds
set -euo pipefail
tpu=${1:?TPU name}
zone=${2:?zone}
config=${3:?config file}
workdir=${4:?shared workdir}
shift 4
extra_flags=$(printf ' %q' "$@")
# Install once per worker (repo copied to ~/t2s_jax on each worker beforehand, e.g. with scp --worker=all).
gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all --command="
  set -e; cd ~/t2s_jax
  python3 -m pip install -q -e . 'jax[tpu]'
  python3 -m t2s_jax.main --config=$config --workdir=$workdir $extra_flags
"
