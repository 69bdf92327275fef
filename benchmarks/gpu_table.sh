#!/usr/bin/env bash
# The GPU table of BENCHMARKS.md: the project's train step against PyTorch's on one GPU
# (bf16, r50 and r100, batch 128 and 256, CASIA-size head), then flip-fused extraction.
#
#   bash benchmarks/gpu_table.sh OUT_DIR
#
# Each run's last line (its JSON) is appended to OUT_DIR/results.jsonl, everything it printed
# to OUT_DIR/log.txt. A run that fails or outlasts PER_RUN_TIMEOUT seconds is logged and the
# next one starts. Runs the same scripts as on the CPU, unchanged; only --steps differs: five
# steps per timed round, so that each framework's host can queue work ahead as in training.
set -u
out=${1:?usage: gpu_table.sh OUT_DIR}
cd "$(dirname "$0")/.."
mkdir -p "$out"
per_run=${PER_RUN_TIMEOUT:-200}
python3 - >>"$out/log.txt" 2>&1 <<'PY'
import jax, flax, torch
print("jax", jax.__version__, jax.devices(), "flax", flax.__version__, "torch", torch.__version__,
      torch.cuda.get_device_name() if torch.cuda.is_available() else "no cuda")
PY
run() {
  echo "=== $*" >>"$out/log.txt"
  timeout "$per_run" python3 "$@" >"$out/run.log" 2>&1
  echo "exit $?" >>"$out/run.log"
  grep -v "^I[0-9]\{4\} " "$out/run.log" >>"$out/log.txt"
  grep '^{' "$out/run.log" | tail -1 >>"$out/results.jsonl"
  pkill -f -- "--worker=" 2>/dev/null || true  # workers of a run that timed out
}
for cfg in "iresnet50 128" "iresnet100 128" "iresnet50 256" "iresnet100 256"; do
  set -- $cfg
  run benchmarks/train_step.py --model="$1" --batch="$2" --dtype=bfloat16 --compare_torch \
      --rounds=8 --steps=5
done
run benchmarks/embed.py --model=iresnet50 --batch=256 --dtype=bfloat16 --compare_torch --rounds=8
rm -f "$out/run.log"
