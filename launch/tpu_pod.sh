#!/usr/bin/env bash
# Cloud TPU pod slice: the same commands on every worker, over gcloud ssh. First, on this
# machine, the plan (python -m unitsface_jax.plan: the train step compiled for the slice by
# XLA:TPU, no TPU needed; the `plan` extra) checks that the config fits the slice's HBM and
# splits over its chips; a config that does not stops here, before any worker runs. Then each
# worker installs the package with its `tpu` extra (JAX's TPU runtime and the GCS filesystem:
# data, checkpoints and logs live in gs://) and starts training; jax.distributed finds the
# coordinator itself (--distributed).
#
#   launch/tpu_pod.sh TPU_NAME ZONE --config=configs/glint_r100.py --config.data.path=gs://BUCKET/glint360k --workdir=gs://BUCKET/runs/r100
#
# The slice's topology (e.g. v5p:2x4x4) is read from the TPU (gcloud ... describe), or given
# as TOPOLOGY=...; PLAN=0 skips the check. The repository must be at ~/unitsface_jax on every
# worker (REPO=... for another place, e.g. cloned by a startup script). INSTALL=0 skips the
# install. A dry run (--dry_run as the first argument, or DRY_RUN=1) prints the check and the
# commands every worker would run, one a line, and runs nothing.
set -euo pipefail
dry=${DRY_RUN:-0}
if [[ ${1:-} == --dry_run ]]; then dry=1; shift; fi
tpu=${1:?TPU name}; zone=${2:?zone}; shift 2
repo=${REPO:-"~/unitsface_jax"}  # expanded by the worker's shell
steps=("cd $repo")
if [[ ${INSTALL:-1} != 0 ]]; then steps+=("python -m pip install -e '.[tpu]'"); fi
steps+=("python -m unitsface_jax.main --distributed$(printf ' %q' "$@")")

# The plan reads the config flags only (not --workdir and the like).
config_args=()
for arg in "$@"; do
  if [[ $arg == --config=* || $arg == --config.* ]]; then config_args+=("$arg"); fi
done
topology=${TOPOLOGY:-}
if [[ -z $topology && ${PLAN:-1} != 0 && $dry == 0 ]]; then
  # e.g. "V5P 2x4x4" -> v5p:2x4x4 (acceleratorConfig: type and topology of the slice).
  read -r kind shape < <(gcloud compute tpus tpu-vm describe "$tpu" --zone="$zone" \
      --format='value(acceleratorConfig.type,acceleratorConfig.topology)') || true
  case ${kind:-} in
    V4) topology="v4:$shape" ;;
    V5LITE_POD) topology="v5e:$shape" ;;
    V5P) topology="v5p:$shape" ;;
    V6E) topology="v6e:$shape" ;;
  esac
  if [[ -z $topology ]]; then
    echo "error: cannot read the topology of TPU $tpu; set TOPOLOGY=GENERATION:AxB[xC] (e.g. v5p:2x4x4) or PLAN=0" >&2
    exit 2
  fi
fi
plan=(python -m unitsface_jax.plan "--topology=${topology:-TOPOLOGY}" "${config_args[@]}")

if [[ $dry != 0 ]]; then
  if [[ ${PLAN:-1} != 0 ]]; then
    echo "this machine checks first (exit 2: the config does not fit the slice):"
    echo "  $(printf '%q ' "${plan[@]}" | sed 's/ $//')"
  fi
  echo "every worker of TPU $tpu (zone $zone) runs:"
  printf '  %s\n' "${steps[@]}"
  exit 0
fi
if [[ ${PLAN:-1} != 0 ]]; then "${plan[@]}"; fi
command=$(printf ' && %s' "${steps[@]}")
gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all --command="${command:4}"
