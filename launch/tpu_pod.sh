#!/usr/bin/env bash
# Cloud TPU pod slice: the same command on every worker; jax.distributed finds the
# coordinator itself (--distributed). Data and checkpoints live in GCS (gs:// paths).
#
#   launch/tpu_pod.sh TPU_NAME ZONE --config=configs/glint_r100.py --workdir=gs://BUCKET/runs/r100
#
# The repository must be on every worker (e.g. git clone in a startup script) and installed
# with: pip install -e . "jax[tpu]".
set -euo pipefail
tpu=${1:?TPU name}; zone=${2:?zone}; shift 2
args=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all \
  --command="cd ~/unitsface_jax && python -m unitsface_jax.main --distributed$args"
