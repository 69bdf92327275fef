"""Every recipe on TPU slices, from XLA:TPU's compiled programs (``unitsface_jax.plan``).

For each (recipe, slice) it runs the plan command in a child process (one compile at a time:
an IResNet-100 step takes minutes and ~10 GB of host memory), keeps its JSON line in
``--out`` (one line per run, appended, so an interrupted sweep resumes where it stopped),
and prints the Markdown table of BENCHMARKS.md ("TPU plan") from all the lines there.

Usage (from the repository root, libtpu installed: the ``plan`` extra):
  python benchmarks/tpu_plan.py [--recipes glint_r100,casia_mbf] [--topologies v5p-64,v5e:4x4]
      [--out benchmarks/tpu_plan.jsonl] [--table_only]
"""

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
RECIPES = ("casia_r50", "casia_mbf", "glint_r100", "glint_mbf", "ms1mv3_r100", "ms1mv3_mbf",
           "wf42m_r100", "wf42m_vit_b")
TOPOLOGIES = ("v4-32", "v5e-64", "v5p-64", "v6e-64")
GIB = 2**30
HLO_DIR = ""  # --hlo_dir: keep each compiled program's HLO there


def run_plan(recipe: str, topology: str, extra: list[str]) -> dict:
  """The plan's JSON object for ``recipe`` on ``topology`` (``fits`` false when it exits 2)."""
  config = recipe if ":" in recipe or recipe.endswith(".py") else f"configs/{recipe}.py"
  if not config.startswith("configs/"):
    config = f"configs/{config}"
  command = [sys.executable, "-m", "unitsface_jax.plan", f"--config={config}",
             f"--topology={topology}", "--json", "--nolevers", *extra]
  if HLO_DIR:
    name = f"{recipe}_{topology}_{'_'.join(extra)}".replace("/", "_").replace(":", "_")
    command.append(f"--dump_hlo={os.path.join(HLO_DIR, name[:150])}.hlo")
  start = time.time()
  proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True,
                        env=dict(os.environ, PYTHONPATH=str(ROOT)))
  lines = proc.stdout.strip().splitlines()
  if proc.returncode not in (0, 2) or not lines or not lines[-1].startswith("{"):
    raise RuntimeError(f"{' '.join(command)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
  result = json.loads(lines[-1])
  result.update(recipe=recipe, extra=" ".join(extra), wall_s=time.time() - start)
  return result


def table(rows: list[dict]) -> str:
  out = ["| recipe | slice | chips / hosts | batch per chip | fits | GiB per chip (of) | "
         "TFLOP per chip: compiled / analytic | collectives MB (AG / RS / AR) | "
         "bound | roofline img/s per chip | MFU at bound | compile s |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    name = r["recipe"] + (f" {r['extra']}" if r.get("extra") else "")
    head = (f"| {name} | {r['topology']} | {r['chips']} / {r['hosts']} | "
            f"{r['batch_per_chip']:g} | {'yes' if r['fits'] else '**no**'} | "
            f"{r['hbm_bytes_per_chip'] / GIB:.2f} ({r['hbm_capacity_bytes'] / GIB:.0f}) | ")
    if not r.get("compiled", True):
      out.append(head + "state alone too large: not compiled | | | | | |")
      continue
    c = r["collective_bytes"]
    out.append(
        head + f"{r['flops_per_step_per_chip'] / 1e12:.2f} / "
        f"{r['analytic_flops_per_step_per_chip'] / 1e12:.2f} | "
        f"{c['all-gather'] / 1e6:.1f} / {c['reduce-scatter'] / 1e6:.1f} / "
        f"{c['all-reduce'] / 1e6:.0f} | {r['bound_by']} | {r['img_s_per_chip']:.0f} | "
        f"{r['mfu_at_bound']:.0%} | {r['compile_s']:.0f} |")
  return "\n".join(out)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--recipes", default=",".join(RECIPES))
  parser.add_argument("--topologies", default=",".join(TOPOLOGIES))
  parser.add_argument("--extra", default="", help="config overrides for every run, e.g. "
                      "'--config.model.remat=True' (a variant row)")
  parser.add_argument("--out", default=str(ROOT / "benchmarks" / "tpu_plan.jsonl"))
  parser.add_argument("--table_only", action="store_true")
  parser.add_argument("--hlo_dir", default="", help="keep each compiled program's HLO here")
  args = parser.parse_args()
  global HLO_DIR
  HLO_DIR = args.hlo_dir
  out = pathlib.Path(args.out)
  done = [json.loads(l) for l in out.read_text().splitlines() if l] if out.exists() else []
  if not args.table_only:
    extra = args.extra.split()
    for recipe in args.recipes.split(","):
      for topology in args.topologies.split(","):
        if any(r["recipe"] == recipe and r["extra"] == " ".join(extra)
               and r["topology"] in (topology, _name(topology)) for r in done):
          continue
        result = run_plan(recipe, topology, extra)
        done.append(result)
        with out.open("a") as f:
          f.write(json.dumps(result, sort_keys=True) + "\n")
        print(f"{recipe} {topology}: {'fits' if result['fits'] else 'does not fit'}, "
              f"{result['hbm_bytes_per_chip'] / GIB:.2f} GiB, {result['wall_s']:.0f} s",
              file=sys.stderr, flush=True)
  print(table(sorted(done, key=_order)))


def _order(row: dict):
  """Recipes in RECIPES' order, then generations v4, v5e, v5p, v6e, then chips."""
  recipe = RECIPES.index(row["recipe"]) if row["recipe"] in RECIPES else len(RECIPES)
  return recipe, row["generation"], row["chips"], row.get("extra", "")


def _name(topology: str) -> str:
  sys.path.insert(0, str(ROOT))
  from unitsface_jax import plan  # pylint: disable=g-import-not-at-top
  return plan.ACCELERATOR_TYPES.get(topology, topology)


if __name__ == "__main__":
  main()
