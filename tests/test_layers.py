"""The layering of docs/design.md ("Layers"): which parts of the package may import which.

Every ``import unitsface_jax.X`` / ``from unitsface_jax[.X] import Y`` in every module of the
package, at any depth (function-level imports too), is checked against the table below.
"""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "unitsface_jax"

# Layer of each top-level part of the package -> the parts it may import (besides itself).
ALLOWED = {
    "errors": set(),
    "losses": set(),
    "parallel": set(),
    "pytrees": set(),
    "optim": {"pytrees"},
    "storage": set(),
    "metric_writer": {"storage"},
    "cpu_tuning": set(),
    "orbax_noise": set(),
    "models": {"cpu_tuning"},
    "data": {"storage"},
    "head": {"losses", "parallel"},
    "checkpoint": {"models", "orbax_noise", "parallel", "pytrees"},
    "config_checks": {"head", "losses", "models", "optim", "parallel", "run_control", "data"},
    "evaluation": {"data", "parallel"},
    "export": {"models"},
    "finetune": {"checkpoint", "export", "models"},
    "run_control": {"parallel"},
    "lease": {"parallel", "storage"},
    "cli": {"cpu_tuning", "orbax_noise", "parallel"},
    "train": {"checkpoint", "head", "losses", "metric_writer", "models", "optim", "parallel",
              "pytrees", "run_control", "lease", "data", "evaluation", "cpu_tuning", "finetune"},
}
# Parts every part may import: the exception base classes (errors.py imports nothing).
EVERYONE = {"errors"}
# Entry points: command-line programs that may use anything.
ENTRY_POINTS = {"main.py", "evaluate.py", "plan.py", "export/__main__.py", "data/prepare.py",
                "data/demo.py", "__init__.py"}


def _part(relative: pathlib.Path) -> str:
  return relative.parts[0].removesuffix(".py")


def _imported_parts(path: pathlib.Path) -> set[str]:
  """Top-level package parts that ``path`` imports (``unitsface_jax.data.x`` -> ``data``)."""
  parts = set()
  for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
    names = []
    if isinstance(node, ast.Import):
      names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      if node.module == "unitsface_jax":
        names = [f"unitsface_jax.{alias.name}" for alias in node.names]
      else:
        names = [node.module]
    for name in names:
      pieces = name.split(".")
      if pieces[0] == "unitsface_jax" and len(pieces) > 1:
        parts.add(pieces[1])
  return parts


MODULES = sorted(p.relative_to(PACKAGE) for p in PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("relative", MODULES, ids=str)
def test_module_imports_only_the_layers_below_it(relative):
  if str(relative) in ENTRY_POINTS:
    return
  part = _part(relative)
  assert part in ALLOWED, f"{relative}: part {part!r} is missing from docs/design.md's table"
  crossing = _imported_parts(PACKAGE / relative) - ALLOWED[part] - EVERYONE - {part}
  assert not crossing, f"{relative} imports {sorted(crossing)}: not allowed for {part!r}"


def test_imports_are_found_at_any_depth(tmp_path):
  """The reader sees every import form, also inside functions, so a crossing is caught."""
  module = tmp_path / "m.py"
  module.write_text("from unitsface_jax import models\nimport unitsface_jax.head\n"
                    "def f():\n  from unitsface_jax.evaluation import extract\n"
                    "import jax.numpy\n")
  assert _imported_parts(module) == {"models", "head", "evaluation"}
