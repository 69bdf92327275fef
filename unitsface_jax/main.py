"""Entry point: ``python -m unitsface_jax.main --config=configs/x.py[:variant] --workdir=DIR``.

Fields are overridden with ``--config.a.b=value``; an unknown or ill-typed field stops the run
with a message naming it. Multi-process runs: on Cloud TPU pass ``--distributed`` (the
coordinator is found automatically); elsewhere also ``--coordinator_address=HOST:PORT
--num_processes=N --process_id=I`` (see launch/). On the CPU the run is tuned
(``unitsface_jax.cpu_tuning``) unless ``--nocpu_tuning`` or ``UNITSFACE_NO_XLA_FLAGS=1``.
"""

from __future__ import annotations

from absl import flags, logging
from flax import nnx
import jax
from ml_collections import config_flags

from unitsface_jax import checkpoint, cli, config_checks, lease, models, parallel, storage
from unitsface_jax import train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Recipe file (configs/*.py[:variant]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Start jax.distributed (multi-process).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
cli.define_flags()
flags.mark_flags_as_required(["config", "workdir"])


# The user's input (errors.UserError: the config, a path, the data, a weight file that does
# not fit, a workdir whose checkpoints cannot be read or belong to another run): exit 2. The
# run stopped: a non-finite loss, storage that refused a save, a lease another run took: exit 1.
@cli.command(failures=(train.NonFiniteLossError, checkpoint.CheckpointWriteError,
                      lease.LeaseLostError))
def main(argv) -> int:
  del argv
  config = _CONFIG.value
  config_checks.validate(config)
  storage.require_gcs_all({**storage.config_paths(config), "--workdir": _WORKDIR.value})
  config_checks.validate_paths(config, _WORKDIR.value)
  if _DISTRIBUTED.value or _COORDINATOR.value:
    parallel.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  # The backbone exactly as training builds it, shapes only.
  abstract = nnx.eval_shape(lambda: models.from_config(config.model, jax.random.key(0)))
  logging.info("%s", models.summary(config.model.name, abstract))
  train.train_and_evaluate(config, _WORKDIR.value)
  return 0


def run(argv: list[str] | None = None) -> None:
  """Parses the flags (reporting an unknown config field in one line), then runs ``main``."""
  cli.run(main, argv)


if __name__ == "__main__":
  run()
