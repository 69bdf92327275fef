"""Runs the package's command lines (``python -m unitsface_jax.evaluate``, ``.export``) in the
test process: the arguments are parsed into absl's flags as ``app.run`` parses them, then the
module's ``main`` is called.

The command lines define flags of the same names (--params, --workdir, --out, --cpu_tuning)
on absl's one registry, so a process cannot import two of them as they stand
(DuplicateFlagError). Each is imported here with the other's flags taken out and keeps its own
Flag objects; a call puts its set in place before parsing. Every run gets --nocpu_tuning: the
tuning is for a process whose JAX has not started, and it would change XLA's convolution
gradients for every later test in this one. No assertions here: the tests make them, where
pytest reports the values.
"""

import importlib
import sys

from absl import flags

FLAGS = flags.FLAGS
_OWN: dict[str, dict[str, flags.Flag]] = {}  # module name -> the flags its import defined


def _activate(module_name: str) -> None:
  for other, own in _OWN.items():
    if other != module_name:
      for name, flag in own.items():
        if name in FLAGS and FLAGS[name] is flag:
          delattr(FLAGS, name)
  for name, flag in _OWN.get(module_name, {}).items():
    if name not in FLAGS:
      FLAGS[name] = flag


def run_main(module_name: str, *args: str):
  """``main`` of ``module_name`` on the command-line arguments ``args``.

  Returns main's return value (the exit status ``app.run`` would use; None is 0) and raises
  what main raises (``app.UsageError`` exits 1 under ``app.run``); a flag absl rejects raises
  ``flags.Error`` (also exit 1).
  """
  _activate(module_name)
  if module_name not in _OWN:
    if module_name in sys.modules:
      raise RuntimeError(f"{module_name} was imported outside {__name__}: its flags are unknown")
    before = {name: FLAGS[name] for name in FLAGS}
    importlib.import_module(module_name)
    _OWN[module_name] = {name: FLAGS[name] for name in FLAGS
                         if before.get(name) is not FLAGS[name]}
  FLAGS.unparse_flags()
  try:
    argv = FLAGS([module_name, "--nocpu_tuning", *args])
    return sys.modules[module_name].main(argv)
  finally:
    # Back to the defaults, parsed: code that runs later in this process reads absl flags
    # (grain's worker processes do) and fails on unparsed ones.
    FLAGS.unparse_flags()
    FLAGS.mark_as_parsed()


def run_main_stderr(capsys, module_name: str, *args: str):
  """``run_main``, and what it wrote to stderr (``capsys``: the calling test's fixture)."""
  capsys.readouterr()
  status = run_main(module_name, *args)
  return status, capsys.readouterr().err.strip()
