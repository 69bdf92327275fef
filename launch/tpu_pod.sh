#!/usr/bin/env bash
# Cloud TPU pod slice: the same commands on every worker, over gcloud ssh. Each worker installs
# the package with its `tpu` extra (JAX's TPU runtime and the GCS filesystem: data, checkpoints
# and logs live in gs://), then starts training; jax.distributed finds the coordinator itself
# (--distributed).
#
#   launch/tpu_pod.sh TPU_NAME ZONE --config=configs/glint_r100.py --config.data.path=gs://BUCKET/glint360k --workdir=gs://BUCKET/runs/r100
#
# The repository must be at ~/unitsface_jax on every worker (REPO=... for another place, e.g.
# cloned by a startup script). INSTALL=0 skips the install. A dry run (--dry_run as the first
# argument, or DRY_RUN=1) prints the commands every worker would run, one a line, and runs
# nothing.
set -euo pipefail
dry=${DRY_RUN:-0}
if [[ ${1:-} == --dry_run ]]; then dry=1; shift; fi
tpu=${1:?TPU name}; zone=${2:?zone}; shift 2
repo=${REPO:-"~/unitsface_jax"}  # expanded by the worker's shell
steps=("cd $repo")
if [[ ${INSTALL:-1} != 0 ]]; then steps+=("python -m pip install -e '.[tpu]'"); fi
steps+=("python -m unitsface_jax.main --distributed$(printf ' %q' "$@")")
if [[ $dry != 0 ]]; then
  echo "every worker of TPU $tpu (zone $zone) runs:"
  printf '  %s\n' "${steps[@]}"
  exit 0
fi
command=$(printf ' && %s' "${steps[@]}")
gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all --command="${command:4}"
