"""Entry point: ``python -m unitsface_jax.main --config=configs/x.py[:variant] --workdir=DIR``.

Fields are overridden with ``--config.a.b=value``; an unknown or ill-typed field stops the run
with a message naming it. Multi-process runs: on Cloud TPU pass ``--distributed`` (the
coordinator is found automatically); elsewhere also ``--coordinator_address=HOST:PORT
--num_processes=N --process_id=I`` (see launch/). On the CPU the run is tuned
(``unitsface_jax.cpu_tuning``) unless ``--nocpu_tuning`` or ``UNITSFACE_NO_XLA_FLAGS=1``.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from flax import nnx
import jax
from ml_collections import config_flags

from unitsface_jax import config_checks, cpu_tuning, models, parallel, storage

_CONFIG = config_flags.DEFINE_config_file("config", None, "Recipe file (configs/*.py[:variant]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Start jax.distributed (multi-process).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_CPU_TUNING = cpu_tuning.define_flag()
flags.mark_flags_as_required(["config", "workdir"])
# Exit status when another process of the run was lost.
_PEER_LOST_STATUS = 3


def main(argv) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  # First, before JAX starts its backends (XLA reads XLA_FLAGS then) or jax.distributed.
  cpu_tuning.skip_absent_tpu()  # before JAX starts: no TPU probe without a TPU
  if _CPU_TUNING.value:
    cpu_tuning.enable()
  config = _CONFIG.value
  try:
    config_checks.validate(config)
    storage.require_gcs_all({**storage.config_paths(config), "--workdir": _WORKDIR.value})
    config_checks.validate_paths(config, _WORKDIR.value)
  except (config_checks.ConfigError, storage.MissingExtraError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if _DISTRIBUTED.value or _COORDINATOR.value:
    parallel.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  from unitsface_jax import checkpoint, finetune, train  # pylint: disable=g-import-not-at-top
  checkpoint.quiet_abandoned_reads()  # an unreadable checkpoint is reported in one line
  # The backbone exactly as training builds it, shapes only.
  abstract = nnx.eval_shape(lambda: models.from_config(config.model, jax.random.key(0)))
  logging.info("%s", models.summary(config.model.name, abstract))
  try:
    train.train_and_evaluate(config, _WORKDIR.value)
  except finetune.InitError as e:  # a user's file that does not fit: before step 0
    print(f"error: {e}", file=sys.stderr)
    return 2
  except Exception as e:  # pylint: disable=broad-except
    if not parallel.lost_peer(e):
      if isinstance(e, checkpoint.UnreadableCheckpointError):  # names the directory
        print(f"error: {e}", file=sys.stderr)
        return 2
      if not isinstance(e, (train.NonFiniteLossError, ValueError,
                            checkpoint.CheckpointWriteError)):
        raise
      logging.exception("training stopped")
      print(f"error: {e}", file=sys.stderr)
      return 1
    # The run cannot go on without that process, and the normal exit would wait for it in
    # jax.distributed's shutdown barrier until the missed heartbeats abort this process.
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    print(f"error: lost a peer process of this multi-process run ({first[:200]}); stopping. "
          "Restart every process with the same command to resume from the last checkpoint",
          file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(_PEER_LOST_STATUS)  # pylint: disable=protected-access
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
