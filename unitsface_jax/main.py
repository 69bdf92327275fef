"""Entry point: ``python -m unitsface_jax.main --config=configs/x.py[:variant] --workdir=DIR``.

Fields are overridden with ``--config.a.b=value``; an unknown or ill-typed field stops the run
with a message naming it. Training is not implemented yet: today the job checks the config and
prints it with the model summary.
"""

from __future__ import annotations

import sys

from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from unitsface_jax import config_checks, models

_CONFIG = config_flags.DEFINE_config_file("config", None, "Recipe file (configs/*.py[:variant]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  try:
    config_checks.validate(config)
  except config_checks.ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(config)
  abstract = nnx.eval_shape(lambda: models.create(
      config.model.name, rngs=nnx.Rngs(0), dtype=config.model.dtype,
      dropout=config.model.dropout, num_features=config.model.num_features))
  print(models.summary(config.model.name, abstract))
  print(f"workdir: {_WORKDIR.value}")
  print("The config is valid. Training is not implemented yet in this version of "
        "unitsface_jax; nothing was trained or written.")
  return 0


def run(argv: list[str] | None = None) -> None:
  """Parses the flags (reporting an unknown config field in one line), then runs ``main``."""
  argv = list(sys.argv if argv is None else argv)
  try:
    remaining = flags.FLAGS(argv)
  except (AttributeError, KeyError) as e:
    # ml_collections raises these (not a flags.Error) for --config.<unknown field>=...
    bad = [a for a in argv if a.startswith("--config.")]
    detail = " ".join(str(e).replace("\\n", " ").replace("\\'", "'").strip("'").split())
    sys.exit(f"error: unknown config field among {bad}: {detail}")
  except flags.Error as e:
    sys.exit(f"error: {e}")
  app.run(main, argv=argv, flags_parser=lambda _: remaining)


if __name__ == "__main__":
  run()
