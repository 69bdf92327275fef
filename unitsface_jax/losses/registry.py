"""The loss registry: each sample-to-class and sample-to-sample loss is one spec, found by name.

A loss is one file in ``losses/s2c/`` (sample-to-class: cosines to the class centres W) or
``losses/s2s/`` (sample-to-sample: cosines to the memory bank M) that defines
``LOSS = registry.register(SampleToClassLoss(...))`` (or ``SampleToSampleLoss``): its
per-sample maths on a block of classes, its options with their defaults and checks, the
state it keeps, and the rows of the README's loss table. The files of those two folders are
found and imported on first use, so adding a loss is adding a file; a loss kept elsewhere is
registered by importing its file (``load_file``). The head (``unitsface_jax.head``), the
config defaults (``configs/default.py``), the config checks and the README's loss table read
this registry; nothing else names a loss.

Per-sample maths runs on ``Columns``: the cosines of the global batch to some classes, which
on one device are all the classes and in the class-sharded head are one device's block;
sums and maxima over the classes are finished by ``class_sum``/``class_max`` (the identity on
one device, ``psum``/``pmax`` in the head), so one function serves both (``class_axis``).
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import pathlib
import pkgutil
import sys
from typing import Any, Callable, Literal, Mapping, NamedTuple

import jax
import jax.numpy as jnp

from unitsface_jax.losses import class_axis

# Where a loss keeps a bias: nowhere, one replicated scalar, or one per class (sharded like W).
BiasKind = Literal["none", "scalar", "per_class"]


class Columns(NamedTuple):
  """The classes a loss scores for the global batch, and how to finish a class reduction.

  Attributes:
    cos: [B, k] cosines (compute dtype) of the batch to the k local classes (W rows for a
      sample-to-class loss, memory rows for a sample-to-sample one).
    target: [B, k] bool, column j is sample i's class (all False where this block does not
      hold it).
    mask: [B, k] bool, the columns that take part: real classes (not padding), and for a
      sample-to-sample loss only memory rows written at least once.
    class_sum: finishes a [B] sum over every block of classes.
    class_max: finishes a [B] max over every block of classes.
  """
  cos: jax.Array
  target: jax.Array
  mask: jax.Array
  class_sum: class_axis.ClassReduce = class_axis.identity
  class_max: class_axis.ClassReduce = class_axis.identity

  def cross_entropy(self, logits: jax.Array) -> jax.Array:
    """Softmax cross-entropy [B] of ``logits`` over the masked classes, target ``target``."""
    return class_axis.softmax_cross_entropy(logits, self.target, self.mask,
                                            class_max=self.class_max, class_sum=self.class_sum)

  def target_value(self, x: jax.Array) -> jax.Array:
    """x at each sample's own class [B], gathered from whichever block holds it."""
    return self.class_sum(class_axis.target_cosine(x, self.target))


# check(options, batch_size) -> None, or (field, what is wrong) for the first bad value;
# field is the config path ("loss.adaface_h", "batch_size").
Check = Callable[[Mapping[str, Any], int], "tuple[str, str] | None"]


def _no_check(options, batch_size):
  del options, batch_size
  return None


@dataclasses.dataclass(frozen=True, eq=False)
class SampleToClassLoss:
  """A sample-to-class loss (``config.loss.s2c``).

  Attributes:
    name: the value of ``config.loss.s2c``.
    per_sample: ``(cols, *, scale, margin, options, norms, bias, stats) -> (loss [B],
      stats)``: the loss of each sample of the global batch and the running statistics after
      this step (returned unchanged by a loss without any). ``norms`` [B] are the feature
      norms of the raw embeddings (replicated; zeros unless ``needs_norms``), ``bias`` the
      loss's bias on the block's classes ([k], a scalar, or None), ``stats`` the statistics
      as ``update_stats`` left them.
    options: the loss's own options, name -> default; each is a ``config.loss`` field and a
      ``head.HeadConfig`` option of that name. Two losses may share an option (same
      default).
    check: the options' checks (``Check``), run by ``config_checks.validate``.
    bias: where its trained bias lives (``HeadParams.s2c_bias["bias"]``).
    initial_bias: ``num_classes -> value`` of that bias at the start (padded rows get 0).
    initial_stats: its running statistics (``HeadBuffers.s2c_stats``), name -> initial value;
      replicated float32 scalars, logged as ``s2c_<name>``.
    needs_norms: ``per_sample`` reads the feature norms.
    update_stats: ``(norms, stats, options) -> stats``, applied to the whole global batch
      before ``per_sample`` (outside the class-sharded part); None: no such update.
    variant: the recipe variant choosing this loss (``--config=configs/demo.py:<variant>``),
      None for none; ``variant_values``: the ``config.loss`` values it sets besides ``s2c``.
    formula, source, values: the README table's row (the per-sample formula, where it comes
      from, the reference values).
  """
  name: str
  per_sample: Callable[..., tuple[jax.Array, dict]]
  options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  check: Check = _no_check
  bias: BiasKind = "none"
  initial_bias: Callable[[int], float] | None = None
  initial_stats: Mapping[str, float] = dataclasses.field(default_factory=dict)
  needs_norms: bool = False
  update_stats: Callable[..., dict] | None = None
  variant: str | None = None
  variant_values: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  formula: str = ""
  source: str = ""
  values: str = ""

  kind = "s2c"


@dataclasses.dataclass(frozen=True, eq=False)
class SampleToSampleLoss:
  """A sample-to-sample loss against the memory bank (``config.loss.s2s``).

  Attributes:
    name: the value of ``config.loss.s2s``.
    per_sample: ``(cols, *, scale, margin, options, bias) -> loss [B]``; ``cols.mask`` holds
      only memory rows already written, ``bias`` is b as this step uses it (a scalar, [k] on
      the block's classes, or None).
    options, check: as ``SampleToClassLoss``.
    threshold: the bias b it learns, with a first value from the data on its first active
      step (``threshold.init_threshold_bias``, CVI-SZU/UniTSFace head.py): "scalar" (one b,
      ``HeadParams.bias``) or "per_class" (``HeadParams.class_bias``, the first value added
      to every class); "none": no b.
    formula, source, values: the README table's row.
  """
  name: str
  per_sample: Callable[..., jax.Array]
  options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  check: Check = _no_check
  threshold: BiasKind = "none"
  formula: str = ""
  source: str = ""
  values: str = ""

  kind = "s2s"


Loss = SampleToClassLoss | SampleToSampleLoss

_REGISTRY: dict[str, dict[str, Loss]] = {"s2c": {}, "s2s": {}}
_discovered = False


def register(loss: Loss) -> Loss:
  """Adds ``loss`` under its name and returns it (``LOSS = registry.register(...)``).

  Raises ValueError if another loss of its kind has that name, or if it declares an option
  another registered loss declares with a different default (a ``config.loss`` field has one
  default).
  """
  table = _REGISTRY[loss.kind]
  if table.get(loss.name, loss) is not loss:
    raise ValueError(f"a {loss.kind} loss named {loss.name!r} is already registered")
  for name, default in loss.options.items():
    for other in _all():
      if other is not loss and other.options.get(name, default) != default:
        raise ValueError(f"loss {loss.name!r}: option {name!r} defaults to {default!r}, "
                         f"loss {other.name!r} has it at {other.options[name]!r}")
  table[loss.name] = loss
  return loss


def unregister(name: str, kind: str = "s2c") -> None:
  """Removes a loss registered with ``register`` (a test's toy loss)."""
  del _REGISTRY[kind][name]


def _discover() -> None:
  """Imports every module of ``losses/s2c`` and ``losses/s2s`` once (each registers itself)."""
  global _discovered
  if _discovered:
    return
  _discovered = True
  for package in ("unitsface_jax.losses.s2c", "unitsface_jax.losses.s2s"):
    module = importlib.import_module(package)
    for info in sorted(pkgutil.iter_modules(module.__path__), key=lambda i: i.name):
      importlib.import_module(f"{package}.{info.name}")


def _all() -> list[Loss]:
  return [*_REGISTRY["s2c"].values(), *_REGISTRY["s2s"].values()]


def _lookup(kind: str, name: str) -> Loss:
  _discover()
  table = _REGISTRY[kind]
  if name not in table:
    raise KeyError(f"unknown {kind} loss {name!r}: one of {tuple(table)}")
  return table[name]


def s2c(name: str) -> SampleToClassLoss:
  """The sample-to-class loss named ``name`` (KeyError listing the names if none)."""
  return _lookup("s2c", name)


def s2s(name: str) -> SampleToSampleLoss:
  """The sample-to-sample loss named ``name`` (KeyError listing the names if none)."""
  return _lookup("s2s", name)


def s2c_names() -> tuple[str, ...]:
  """The registered sample-to-class losses, by name."""
  _discover()
  return tuple(sorted(_REGISTRY["s2c"]))


def s2s_names() -> tuple[str, ...]:
  """The registered sample-to-sample losses, by name."""
  _discover()
  return tuple(sorted(_REGISTRY["s2s"]))


def option_defaults(kind: str | None = None) -> dict[str, Any]:
  """Every option of every registered loss (of ``kind``, if given) -> its default."""
  _discover()
  kinds = (kind,) if kind else ("s2c", "s2s")
  return {name: default for k in kinds for loss in _REGISTRY[k].values()
          for name, default in loss.options.items()}


def variants() -> dict[str, SampleToClassLoss]:
  """Recipe variant name -> the sample-to-class loss it chooses."""
  _discover()
  return {loss.variant: loss for loss in _REGISTRY["s2c"].values() if loss.variant}


def one_device_columns(cos: jax.Array, labels: jax.Array,
                       valid: jax.Array | None = None) -> tuple[Columns, Any]:
  """``Columns`` of all C classes for the single-device losses, and the compute dtype.

  ``cos`` [B, C] in any float dtype (computed in fp32; float64 stays float64), ``labels`` [B]
  in [0, C), ``valid`` [C] bool (memory rows written; None: all).
  """
  dtype = class_axis.compute_dtype(cos)
  cos = class_axis.as_compute(cos, dtype)
  num_classes = cos.shape[-1]
  target = jax.nn.one_hot(labels, num_classes, dtype=jnp.bool_)
  if valid is None:
    valid = jnp.ones((num_classes,), jnp.bool_)
  mask = jnp.broadcast_to(jnp.asarray(valid, jnp.bool_), cos.shape)
  return Columns(cos, target, mask), dtype


def load_file(path: str | pathlib.Path) -> Loss:
  """Imports the Python file ``path`` (which registers its loss) and returns its ``LOSS``."""
  path = pathlib.Path(path)
  name = f"unitsface_jax_loss_{path.stem}"
  spec = importlib.util.spec_from_file_location(name, path)
  if spec is None or spec.loader is None:
    raise ImportError(f"{path}: not a Python file")
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module
  spec.loader.exec_module(module)
  if not isinstance(getattr(module, "LOSS", None), (SampleToClassLoss, SampleToSampleLoss)):
    raise ImportError(f"{path}: defines no LOSS = registry.register(...)")
  return module.LOSS


def markdown_tables() -> str:
  """The README's loss tables (section "Losses"), written from the registry."""
  _discover()
  lines = ["| `loss.s2c` | per-sample loss (θ = arccos cos, s = `s2c_scale`, m = `s2c_margin`) "
           "| formula source | config values (variant) |", "|---|---|---|---|"]
  for loss in map(s2c, s2c_names()):
    values = loss.values + (f" (`:{loss.variant}`)" if loss.variant else "")
    lines.append(f"| `{loss.name}` | {loss.formula} | {loss.source} | {values} |")
  lines += ["", "| `loss.s2s` | per-sample loss against the memory bank (s = `s2s_scale`, "
            "m = `s2s_margin`, b learnt, t = b/s) | formula source | config values |",
            "|---|---|---|---|"]
  for loss in map(s2s, s2s_names()):
    lines.append(f"| `{loss.name}` | {loss.formula} | {loss.source} | {loss.values} |")
  return "\n".join(lines) + "\n"


if __name__ == "__main__":
  print(markdown_tables(), end="")
