"""Plan a TPU run on any CPU: ``python -m unitsface_jax.plan --config=C --topology=v5p:4x4x4``.

Builds the train step ``main`` runs (``train.make_train_step`` over ``train.abstract_state``:
the same function, shardings, head layout, gradient accumulation and PartialFC, nothing
allocated), compiles it with XLA:TPU for compile-only devices of the named slice
(``jax.experimental.topologies``; libtpu from the ``plan`` extra), and reads the compiled
program: HBM per chip against the chip's capacity, FLOPs per chip beside the analytic count,
bytes per collective kind from the HLO, and a roofline bound on the step time. A config that
does not fit exits 2 with one line, then compiles the levers that exist (gradient
accumulation at a smaller per-chip batch, PartialFC, a bfloat16 head, backbone remat) and
names those that fit. ``--json`` prints one JSON object as the last line.

What the bound is: max(compute at the chip's bf16 peak, HBM traffic at its bandwidth,
collective traffic at its ICI bandwidth), from the published per-chip figures in ``CHIPS``;
a real step is slower (the three overlap imperfectly, and float32 convolutions run at a
fraction of the bf16 peak).
"""

from __future__ import annotations

import contextlib
import dataclasses
import faulthandler
import importlib.metadata
import json
import math
import os
import re
import sys
import tempfile
from typing import Any

from unitsface_jax import errors

# The chips, as Cloud TPU publishes them (docs.cloud.google.com/tpu/docs/v4, /v5e, /v5p,
# /v6e, "System architecture"): bf16 peak per chip, HBM capacity and bandwidth per chip, and
# the inter-chip interconnect bandwidth per chip in one direction (the pages give 2,400 /
# 1,600 / 4,800 Gbps for v4 / v5e / v5p, and 800 GBps bidirectional for v6e).
GIB = 1 << 30


@dataclasses.dataclass(frozen=True)
class Chip:
  generation: str
  device_kind: str
  bf16_flops: float  # FLOP/s
  hbm_bytes: int
  hbm_bandwidth: float  # bytes/s
  ici_bandwidth: float  # bytes/s, one direction


CHIPS = {
    "v4": Chip("v4", "TPU v4", 275e12, 32 * GIB, 1200e9, 2400e9 / 8),
    "v5e": Chip("v5e", "TPU v5 lite", 197e12, 16 * GIB, 819e9, 1600e9 / 8),
    "v5p": Chip("v5p", "TPU v5", 459e12, 95 * GIB, 2765e9, 4800e9 / 8),
    "v6e": Chip("v6e", "TPU v6 lite", 918e12, 32 * GIB, 1638e9, 800e9 / 2),
}
# Cloud TPU's accelerator-type names of the slices in BENCHMARKS.md's table (v4 and v5p count
# TensorCores, two per chip; v5e and v6e count chips).
ACCELERATOR_TYPES = {"v4-32": "v4:2x2x4", "v5e-64": "v5e:8x8", "v5p-64": "v5p:2x4x4",
                     "v6e-64": "v6e:8x8"}
_TOPOLOGY = re.compile(r"^(v4|v5e|v5p|v6e):(\d+)x(\d+)(?:x(\d+))?$")
# Headroom kept free of the compiled program's own count: the runtime's reserved HBM, the
# next batch already on the device while a step runs (two steps in flight,
# run_control.MAX_STEPS_IN_FLIGHT) and allocator fragmentation, none of which the compiler's
# memory analysis counts.
HBM_MARGIN = 0.10


class PlanError(errors.UserError, ValueError):
  """A user's input the plan cannot use (one line, exit 2)."""


def parse_topology(name: str) -> tuple[str, str]:
  """(generation, topology name for ``get_topology_desc``) from ``v5p:2x2x2`` or ``v5p-64``."""
  name = ACCELERATOR_TYPES.get(name, name)
  match = _TOPOLOGY.match(name)
  if not match:
    raise PlanError(f"--topology={name!r} is not a TPU slice: use GENERATION:AxB[xC] with a "
                    f"generation among {sorted(CHIPS)}, e.g. v5p:2x2x2 or v5e:4x4 (or one of "
                    f"{sorted(ACCELERATOR_TYPES)})")
  return match.group(1), name


@contextlib.contextmanager
def _stderr_to_file():
  """Sends what C++ libraries write to fd 2 inside the block to a temporary file that is then
  dropped: libtpu's warnings about TPU_ACCELERATOR_TYPE and TPU_WORKER_HOSTNAMES, and its
  stack trace, on a host without a TPU. A failure still reaches the user as the Python
  exception libtpu raises."""
  sys.stderr.flush()
  saved = os.dup(2)
  # A crash inside libtpu (a signal, no exception) still reaches the user: Python's fault
  # handler writes where it happened to the terminal's stderr, not to the dropped file.
  crash_report = os.fdopen(os.dup(saved), "w")
  handler_was_on = faulthandler.is_enabled()
  faulthandler.enable(file=crash_report)
  with tempfile.TemporaryFile(mode="w+b") as sink:
    os.dup2(sink.fileno(), 2)
    try:
      yield
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      faulthandler.disable()
      crash_report.close()
      if handler_was_on:  # as ``python -X faulthandler`` had it
        with contextlib.suppress(AttributeError, ValueError, OSError):
          faulthandler.enable(file=sys.__stderr__)


def topology_devices(generation: str, name: str) -> list:
  """Compile-only devices of the slice (libtpu's compiler; no TPU needed)."""
  try:
    import libtpu  # noqa: F401  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError as e:
    raise PlanError("the TPU compiler (libtpu) is not installed: pip install -e '.[plan]' "
                    "(or 'unitsface_jax[plan]')") from e
  # libtpu takes a machine-wide lock file for the TPU it would drive; compiling only, any
  # number of plans (and test workers) may load it at once.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  with _stderr_to_file():
    try:
      return list(topologies.get_topology_desc(topology_name=name, platform="tpu").devices)
    except Exception as e:  # pylint: disable=broad-except
      detail = " ".join(str(e).split())[:300]
      raise PlanError(f"--topology={name}: libtpu cannot describe this {generation} slice "
                      f"({detail})") from e


# ==================================================================== reading the program
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
                "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8,
                "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1}
_SHAPE = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([\d,]*)\]")
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all",
               "collective-permute")
# One HLO instruction: `%name = <result shape> <opcode>(<operands>), attributes`.
_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.*?)\s+(" + "|".join(COLLECTIVES) +
    r")(-start)?\((.*?)\)(.*)$")


def _shapes_bytes(text: str) -> list[int]:
  """Bytes of each array shape written in ``text`` (``f32[8,512]{1,0}``, tuples too)."""
  return [_DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
          for dtype, dims in _SHAPE.findall(text)]


def _group_size(attributes: str, default: int) -> int:
  """Devices in each replica group: ``{{0,1,2,3}}``, iota ``[2,4]<=[8]`` or XLA:TPU's
  ``mesh['axis_0'=4,'axis_1'=2] {'axis_0'}`` (the product of the named axes' sizes)."""
  mesh = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", attributes)
  if mesh:
    sizes = dict(re.findall(r"'([^']+)'=(\d+)", mesh.group(1)))
    return math.prod(int(sizes.get(a, 1)) for a in re.findall(r"'([^']+)'", mesh.group(2)))
  groups = re.search(r"replica_groups=\{\{([\d,]*)\}", attributes)
  if groups:
    return len(groups.group(1).split(","))
  iota = re.search(r"replica_groups=\[(\d+),(\d+)\]", attributes)
  if iota:
    return int(iota.group(2))
  return default


def collective_bytes(hlo_text: str, num_devices: int) -> tuple[dict, dict, float]:
  """(bytes per collective kind, instructions per kind, bytes each device sends over ICI).

  Read from each instruction's result shape (the optimised HLO names its operands without
  shapes). The bytes of a collective are those of its whole buffer: an all-gather's result,
  a reduce-scatter's result times the group size, an all-reduce's and all-to-all's result
  (every output of a combined one); for an async all-gather or collective-permute start,
  whose result also holds its operand, its output. The ICI traffic per device is what a
  ring algorithm sends: 2(n-1)/n of the buffer for an all-reduce, (n-1)/n for the others, n
  the replica group's size. An async pair (``*-start``/``*-done``) counts once, by its start.
  """
  sizes = {kind: 0 for kind in COLLECTIVES}
  counts = {kind: 0 for kind in COLLECTIVES}
  traffic = 0.0
  for line in hlo_text.splitlines():
    match = _INSTRUCTION.match(line)
    if not match:
      continue
    result, kind, start, _, attributes = match.groups()
    n = _group_size(attributes, num_devices)
    shapes = _shapes_bytes(result)
    if start and kind == "all-gather" and len(shapes) >= 2:
      shapes = shapes[len(shapes) // 2:]  # (operands..., outputs...)
    elif start and kind == "collective-permute" and len(shapes) >= 2:
      shapes = shapes[1:2]  # (operand, output, contexts)
    size = sum(shapes)
    if kind == "reduce-scatter":
      size *= n
    sizes[kind] += size
    counts[kind] += 1
    share = (n - 1) / n if n > 1 else 0.0
    traffic += size * share * (2 if kind == "all-reduce" else 1)
  return sizes, counts, traffic


def _cost(compiled) -> dict:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return dict(cost or {})


def hlo_dtypes_of(hlo_text: str, opcode: str, op_name: str = "") -> dict[str, int]:
  """How many ``opcode`` instructions produce each element type, among those whose
  ``op_name`` metadata contains ``op_name`` (XLA:TPU writes matmuls as ``convolution`` too;
  JAX's op names tell ``conv_general_dilated`` from ``dot_general``)."""
  found = {}
  pattern = re.compile(r"=\s*(\w+)\[[\d,]*\]\S*\s" + re.escape(opcode) + r"\(")
  for line in hlo_text.splitlines():
    match = pattern.search(line)
    if match and op_name in line:
      found[match.group(1)] = found.get(match.group(1), 0) + 1
  return found


# ==================================================================== the plan
def _per_device_bytes(tree) -> int:
  import jax  # pylint: disable=g-import-not-at-top
  total = 0
  for leaf in jax.tree.leaves(tree):
    shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
    total += math.prod(shape) * leaf.dtype.itemsize
  return total


def state_breakdown(state) -> dict[str, int]:
  """Bytes per device of each part of the (abstract) train state."""
  from unitsface_jax import pytrees  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  head_opt, backbone_opt = [], []
  for path, leaf in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]:
    (head_opt if "head" in pytrees.path_names(path) else backbone_opt).append(leaf)
  head = state.params["head"]
  return {
      "backbone_params_and_stats": _per_device_bytes((state.params["backbone"],
                                                      state.model_state)),
      "backbone_optimizer_state": _per_device_bytes(backbone_opt),
      "head_w": _per_device_bytes(head.w),
      "head_memory_bank": _per_device_bytes(state.head_buffers),
      "head_other_params": _per_device_bytes((head.bias, head.class_bias, head.s2c_bias)),
      "head_optimizer_state": _per_device_bytes(head_opt),
      "step_counters": _per_device_bytes((state.step, state.first_nonfinite_step)),
  }


def analytic_flops_per_device(config, num_devices: int) -> float:
  """3 x 2 x forward multiply-adds per image x images per device (forward, and the backward's
  two products), plus the head's matmuls per device: cosines of the global batch against its
  k rows of W (2BkD forward, 4BkD backward) and of M (2BkD, no gradient)."""
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from unitsface_jax import head as head_lib  # pylint: disable=g-import-not-at-top
  from unitsface_jax import models, train  # pylint: disable=g-import-not-at-top
  macs = models.macs_per_image(nnx.eval_shape(lambda: models.from_config(
      config.model, jax.random.key(0))))
  batch = config.batch_size
  k = head_lib.num_sampled(train.head_config(config), num_devices, batch)
  return 6.0 * macs * batch / num_devices + 8.0 * batch * k * config.model.num_features


def make_mesh(devices):
  """The mesh ``main`` builds (``parallel.make_mesh``: JAX orders the devices along the
  torus). libtpu's compile-only v4 devices are TensorCores, two per chip, which JAX's mesh
  builder refuses (it wants megacore, one device per chip): those keep libtpu's order."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from unitsface_jax import parallel  # pylint: disable=g-import-not-at-top
  if len({getattr(d, "core_on_chip", 0) for d in devices}) == 1:
    return parallel.make_mesh(devices=devices)
  return jax.sharding.Mesh(np.asarray(devices), (parallel.DEVICE_AXIS,),
                           axis_types=(jax.sharding.AxisType.Auto,))


def _libtpu_version() -> str:
  try:
    return importlib.metadata.version("libtpu")
  except importlib.metadata.PackageNotFoundError:
    return "unknown version"


def compile_step(config, devices):
  """(compiled train step, abstract state) of ``config`` on a mesh of ``devices``."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from unitsface_jax import models, optim, parallel, train  # pylint: disable=g-import-not-at-top
  from unitsface_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  mesh = make_mesh(devices)
  steps_per_epoch = max(pipeline.steps_per_epoch(config.data.num_images, config.batch_size), 1)
  tx = optim.make(config, steps_per_epoch)
  graphdef, rng_shapes, state = train.abstract_state(config, mesh, tx)
  step = train.make_train_step(config, mesh, graphdef, rng_shapes, tx, steps_per_epoch)
  rows = parallel.batch_sharding(mesh)
  b = config.batch_size
  batch = train.Batch(jax.ShapeDtypeStruct((b, 112, 112, 3), jnp.uint8, sharding=rows),
                      jax.ShapeDtypeStruct((b,), jnp.int32, sharding=rows),
                      jax.ShapeDtypeStruct((b,), jnp.bool_, sharding=rows))
  # Minutes for a large recipe on a small host; a crash inside libtpu then has a context.
  print(f"compiling the train step for {len(devices)} {devices[0].device_kind} devices "
        f"(XLA:TPU {_libtpu_version()})...", file=sys.stderr, flush=True)
  with _stderr_to_file(), models.target_platform("tpu"):
    compiled = step.lower(state, batch).compile()
  return compiled, state


def check_layout(config, devices, topology: str) -> tuple[int, int]:
  """(hosts, devices) of the slice; the global batch must split over both."""
  from unitsface_jax import train  # pylint: disable=g-import-not-at-top
  hosts = len({d.process_index for d in devices})
  if config.batch_size % len(devices):
    raise PlanError(f"config.batch_size = {config.batch_size} does not divide over the "
                    f"{len(devices)} devices of {topology}: set --config.batch_size to a "
                    f"multiple of {len(devices)}")
  train.check_batch_layout(config.batch_size, len(devices), hosts)
  return hosts, len(devices)


def abstract_state_breakdown(config, devices) -> dict[str, int]:
  """``state_breakdown`` of the abstract train state on a mesh of ``devices`` (no compile)."""
  from unitsface_jax import optim, train  # pylint: disable=g-import-not-at-top
  mesh = make_mesh(devices)
  _, _, state = train.abstract_state(config, mesh, optim.make(config, 1))
  return state_breakdown(state)


def plan(config, topology: str, *, hlo_path: str | None = None) -> dict[str, Any]:
  """Compiles ``config``'s train step for ``topology`` and returns the plan (see the module
  docstring); raises ``PlanError`` for an unknown topology, a missing libtpu or a batch that
  does not split over the slice."""
  import time  # pylint: disable=g-import-not-at-top
  generation, name = parse_topology(topology)
  chip = CHIPS[generation]
  devices = topology_devices(generation, name)
  devices_per_chip = len({getattr(d, "core_on_chip", 0) for d in devices})
  chips = len(devices) // devices_per_chip
  hosts, num_devices = check_layout(config, devices, name)
  common = {"topology": name, "generation": generation, "chips": chips, "hosts": hosts,
            "devices": num_devices, "devices_per_chip": devices_per_chip,
            "batch_size": config.batch_size, "batch_per_host": config.batch_size // hosts,
            "batch_per_chip": config.batch_size / chips,
            "grad_accum_steps": config.optimizer.grad_accum_steps,
            "hbm_capacity_bytes": chip.hbm_bytes,
            "hbm_usable_bytes": int(chip.hbm_bytes * (1 - HBM_MARGIN))}
  state_bytes = {k: v * devices_per_chip
                 for k, v in abstract_state_breakdown(config, devices).items()}
  if sum(state_bytes.values()) > common["hbm_usable_bytes"]:
    # The state alone does not fit: no need to compile to know.
    return {**common, "compiled": False, "fits": False,
            "hbm_bytes_per_chip": sum(state_bytes.values()), "hbm_breakdown_bytes": state_bytes}
  start = time.perf_counter()
  compiled, state = compile_step(config, devices)
  compile_s = time.perf_counter() - start
  hlo = compiled.as_text()
  if hlo_path:
    with open(hlo_path, "w", encoding="utf-8") as f:
      f.write(hlo)
  memory = compiled.memory_analysis()
  cost = _cost(compiled)
  sizes, counts, ici_per_device = collective_bytes(hlo, num_devices)

  per_chip = devices_per_chip  # a v4 compile-only device is one TensorCore, half a chip
  temp = memory.temp_size_in_bytes
  program = memory.generated_code_size_in_bytes
  arguments = memory.argument_size_in_bytes
  outputs_not_aliased = memory.output_size_in_bytes - memory.alias_size_in_bytes
  total = (arguments + outputs_not_aliased + temp + program) * per_chip
  capacity = chip.hbm_bytes
  flops = float(cost.get("flops", 0.0)) * per_chip
  analytic = analytic_flops_per_device(config, num_devices) * per_chip
  hbm_traffic = float(cost.get("bytes accessed", 0.0)) * per_chip
  t_compute = flops / chip.bf16_flops
  t_hbm = hbm_traffic / chip.hbm_bandwidth
  t_ici = ici_per_device * per_chip / chip.ici_bandwidth
  step_s = max(t_compute, t_hbm, t_ici)
  images_per_chip = config.batch_size / chips
  breakdown = {k: v * per_chip for k, v in state_breakdown(state).items()}
  breakdown["batch_inputs"] = (arguments * per_chip - sum(breakdown.values()))
  breakdown["activations_and_temporaries"] = temp * per_chip
  breakdown["program"] = program * per_chip
  breakdown["outputs_not_aliased"] = outputs_not_aliased * per_chip
  return {
      **common, "compiled": True, "hbm_bytes_per_chip": total,
      "fits": total <= capacity * (1 - HBM_MARGIN),
      "hbm_breakdown_bytes": breakdown,
      "flops_per_step_per_chip": flops, "analytic_flops_per_step_per_chip": analytic,
      "hbm_traffic_bytes_per_chip": hbm_traffic,
      "collective_bytes": sizes, "collective_counts": counts,
      "ici_bytes_per_chip": ici_per_device * per_chip,
      "roofline_terms_s": {"compute": t_compute, "hbm": t_hbm, "ici": t_ici},
      "roofline_step_s": step_s, "bound_by": max(("compute", t_compute), ("hbm", t_hbm),
                                                 ("ici", t_ici), key=lambda x: x[1])[0],
      "img_s_per_chip": images_per_chip / step_s if step_s else 0.0,
      "mfu_at_bound": analytic / (step_s * chip.bf16_flops) if step_s else 0.0,
      "compile_s": compile_s,
  }


# ==================================================================== levers
def levers(config) -> list[tuple[str, Any]]:
  """The changes that lower HBM per chip, each as (flags to name it, a config with it)."""
  candidates = []
  for k in (2, 4, 8):
    if config.batch_size % k == 0:
      c = config.copy_and_resolve_references()
      c.batch_size = config.batch_size // k
      c.optimizer.grad_accum_steps = config.optimizer.grad_accum_steps * k
      candidates.append((f"--config.batch_size={c.batch_size} "
                         f"--config.optimizer.grad_accum_steps={c.optimizer.grad_accum_steps}"
                         " (same global batch)", c))
  if config.loss.sample_rate >= 1.0:
    c = config.copy_and_resolve_references()
    c.loss.sample_rate = 0.3
    candidates.append(("--config.loss.sample_rate=0.3", c))
  if config.loss.head_dtype != "bfloat16":
    c = config.copy_and_resolve_references()
    c.loss.head_dtype = "bfloat16"
    candidates.append(("--config.loss.head_dtype=bfloat16", c))
  from unitsface_jax import models  # pylint: disable=g-import-not-at-top
  if not config.model.get("remat", False) and models.supports_remat(config.model.name):
    c = config.copy_and_resolve_references()
    c.model.remat = True
    candidates.append(("--config.model.remat=True", c))
  return candidates


def _merge(base, variant):
  """``base`` with the loss and model levers of ``variant`` applied too."""
  merged = base.copy_and_resolve_references()
  with merged.unlocked():
    for section, key in (("loss", "sample_rate"), ("loss", "head_dtype"), ("model", "remat")):
      if variant[section].get(key) != base[section].get(key):
        merged[section][key] = variant[section][key]
  return merged


def format_plan(p: dict[str, Any]) -> str:
  g = lambda b: f"{b / GIB:.2f} GiB"  # noqa: E731
  lines = [
      f"on {p['topology']}: {p['chips']} chips ({p['devices']} devices), "
      f"{p['hosts']} hosts, batch {p['batch_size']} ({p['batch_per_host']} per host, "
      f"{p['batch_per_chip']:g} per chip, gradient accumulation {p['grad_accum_steps']})",
      f"HBM per chip: {g(p['hbm_bytes_per_chip'])} of {g(p['hbm_capacity_bytes'])} "
      f"({g(p['hbm_usable_bytes'])} usable, {HBM_MARGIN:.0%} kept free): "
      + ("fits" if p["fits"] else "DOES NOT FIT")]
  for key, value in p["hbm_breakdown_bytes"].items():
    lines.append(f"  {key.replace('_', ' '):<30} {g(value)}")
  if not p["compiled"]:
    lines.append("  (the train state alone exceeds the usable HBM: not compiled)")
    return "\n".join(lines)
  lines += [
      f"FLOPs per step per chip: {p['flops_per_step_per_chip'] / 1e12:.3f} T compiled, "
      f"{p['analytic_flops_per_step_per_chip'] / 1e12:.3f} T analytic",
      f"HBM traffic per step per chip: {p['hbm_traffic_bytes_per_chip'] / 1e9:.2f} GB",
      "collectives (bytes of the whole buffers, instructions): " + ", ".join(
          f"{k} {p['collective_bytes'][k] / 1e6:.1f} MB ({p['collective_counts'][k]})"
          for k in COLLECTIVES if p["collective_counts"][k]),
      f"ICI traffic per chip: {p['ici_bytes_per_chip'] / 1e6:.1f} MB",
      "roofline: " + ", ".join(f"{k} {v * 1e3:.2f} ms"
                               for k, v in p["roofline_terms_s"].items())
      + f" -> step >= {p['roofline_step_s'] * 1e3:.2f} ms ({p['bound_by']}-bound), "
      f"<= {p['img_s_per_chip']:.0f} img/s per chip, MFU {p['mfu_at_bound']:.1%} at the bound",
      f"(compiled for {p['topology']} in {p['compile_s']:.0f} s)"]
  return "\n".join(lines)


def run(config, topology: str, *, try_levers: bool = True, hlo_path: str | None = None,
        out=print) -> tuple[int, dict]:
  """The command: prints the plan; (exit status, plan). Exit 2 when it does not fit."""
  p = plan(config, topology, hlo_path=hlo_path)
  out(format_plan(p))
  if p["fits"]:
    return 0, p
  sys.stdout.flush()
  print(f"error: the config needs {p['hbm_bytes_per_chip'] / GIB:.2f} GiB "
        f"of HBM per chip on {p['topology']}, {p['hbm_usable_bytes'] / GIB:.2f} GiB usable "
        f"of {p['hbm_capacity_bytes'] / GIB:.0f}", file=sys.stderr, flush=True)
  p["levers"] = []
  if try_levers:
    candidates = levers(config)
    for flags_text, variant in candidates:
      try:
        q = plan(variant, topology)
      except PlanError:  # e.g. a per-chip batch below one image
        continue
      p["levers"].append({"flags": flags_text, "fits": q["fits"],
                          "hbm_bytes_per_chip": q["hbm_bytes_per_chip"],
                          "img_s_per_chip": q.get("img_s_per_chip")})
      rate = (f", <= {q['img_s_per_chip']:.0f} img/s per chip" if q["compiled"] else
              " (state alone)")
      out(f"  lever {flags_text}: {q['hbm_bytes_per_chip'] / GIB:.2f} GiB per chip, "
          + ("fits" if q["fits"] else "does not fit") + rate)
    fitting = [x["flags"] for x in p["levers"] if x["fits"]]
    if not fitting and len(candidates) > 1:
      # None alone: all of them at once (the smallest per-chip batch that splits).
      combined, used = None, []
      for flags_text, variant in candidates:
        if flags_text.startswith("--config.batch_size") and combined is not None:
          continue  # one batch split: the first (the largest per-chip batch)
        combined = variant if combined is None else _merge(combined, variant)
        used.append(flags_text.replace(" (same global batch)", ""))
      flags_text = " ".join(used)
      try:
        q = plan(combined, topology)
        p["levers"].append({"flags": flags_text, "fits": q["fits"],
                            "hbm_bytes_per_chip": q["hbm_bytes_per_chip"],
                            "img_s_per_chip": q.get("img_s_per_chip")})
        out(f"  lever {flags_text}: {q['hbm_bytes_per_chip'] / GIB:.2f} GiB per chip, "
            + ("fits" if q["fits"] else "does not fit"))
        if q["fits"]:
          fitting.append(flags_text)
      except PlanError:
        pass
    out("fits with: " + ("; ".join(fitting) if fitting else
                         "none of the levers alone; combine them or use a larger slice"))
  return 2, p


# ==================================================================== command line
def main(argv: list[str] | None = None) -> int:
  """``python -m unitsface_jax.plan --config=configs/x.py[:variant] --topology=v5p:2x2x2
  [--json] [--nolevers]``: prints the plan; exit 0 (fits), 2 (does not fit, or bad input)."""
  # The plan compiles for compile-only TPU devices; JAX's own backend stays the CPU, so no
  # TPU is probed on this host (libtpu would print its warnings about a missing TPU).
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  from unitsface_jax import config_checks  # pylint: disable=g-import-not-at-top

  flag_values = flags.FlagValues()
  config_flag = config_flags.DEFINE_config_file(
      "config", None, "Recipe file (configs/*.py[:variant]).", flag_values=flag_values,
      lock_config=True)
  topology_flag = flags.DEFINE_string(
      "topology", None, "TPU slice: GENERATION:AxB[xC] (v4, v5e, v5p, v6e), e.g. v5p:2x2x2, "
      f"or one of {sorted(ACCELERATOR_TYPES)}.", flag_values=flag_values)
  json_flag = flags.DEFINE_bool("json", False, "Also print the plan as one JSON line, last.",
                                flag_values=flag_values)
  levers_flag = flags.DEFINE_bool("levers", True, "When it does not fit, compile the levers.",
                                  flag_values=flag_values)
  hlo_flag = flags.DEFINE_string("dump_hlo", None, "Write the compiled program's HLO here.",
                                 flag_values=flag_values)
  argv = list(sys.argv if argv is None else argv)
  try:
    rest = flag_values(argv)
  except (flags.Error, AttributeError, KeyError) as e:
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
    return 2
  if len(rest) > 1 or config_flag.value is None or not topology_flag.value:
    print("error: usage: python -m unitsface_jax.plan --config=configs/x.py[:variant] "
          "--topology=v5p:2x2x2 [--json]", file=sys.stderr)
    return 2
  config = config_flag.value
  name = config_flags.get_config_filename(flag_values["config"])
  variant = flag_values["config"].serialize().split("=", 1)[-1]
  try:
    config_checks.validate(config)
    status, result = run(config, topology_flag.value, try_levers=levers_flag.value,
                         hlo_path=hlo_flag.value)
  except (PlanError, config_checks.ConfigError, ValueError) as e:
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
    return 2
  result["config"] = variant or name
  if json_flag.value:
    print(json.dumps(result, sort_keys=True))
  return status


if __name__ == "__main__":
  sys.exit(main())
