"""Meshes, shardings, multi-process start-up and global batches for data- and class-parallelism.

One mesh axis, ``DEVICE_AXIS``, spans every device of every process: the backbone is
data-parallel over it (the batch is split on it) and the head's class centres and memory bank
are split on it by rows (classes), as PartialFC does (docs/design.md, "The head").
"""

import math
import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

DEVICE_AXIS = "devices"

# Over which samples BatchNorm takes its statistics (``config.model.bn_stats``): the global
# batch, or each device's slice (PyTorch DDP without SyncBN).
BN_STATS = ("global", "per_device")


def make_mesh(num_devices: int | None = None, *,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh named ``DEVICE_AXIS`` over ``devices`` (default: all, or the first n).

  The axis is ``AxisType.Auto``, not the Explicit default of ``jax.make_mesh`` in this JAX:
  the only hand-partitioned computation is the head, which runs inside ``jax.shard_map``
  with explicit specs either way, while the data-parallel backbone wants the compiler's
  sharding propagation (Explicit would make every op with an ambiguous output sharding,
  e.g. a contraction over a sharded axis, an error until annotated by hand).

  Args:
    num_devices: how many devices; None for all of ``devices``.
    devices: the devices, in mesh order; default ``jax.devices()``.

  Returns:
    The mesh.
  """
  devices = list(jax.devices() if devices is None else devices)
  if num_devices is not None:
    if num_devices > len(devices):
      raise ValueError(f"asked for {num_devices} devices, {len(devices)} available")
    devices = devices[:num_devices]
  return jax.make_mesh((len(devices),), (DEVICE_AXIS,),
                       axis_types=(jax.sharding.AxisType.Auto,), devices=devices)


def mesh_from_config(config: Any) -> Mesh:
  """``make_mesh`` with ``config.num_devices`` (absent or 0: every device)."""
  num = getattr(config, "num_devices", None) or None
  return make_mesh(num)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over the devices; the rest replicated."""
  return NamedSharding(mesh, P(DEVICE_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  """The same full value on every device."""
  return NamedSharding(mesh, P())


def padded_classes(num_classes: int, num_shards: int) -> int:
  """n·⌈C/n⌉: the class count padded so every shard holds the same number of rows."""
  return num_shards * math.ceil(num_classes / num_shards)


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None) -> None:
  """Start ``jax.distributed`` once; a no-op when it is already running.

  On Cloud TPU and SLURM the arguments may be None (auto-detected). Must run before any
  other JAX call creates the backend.
  """
  if jax.distributed.is_initialized():
    return
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)


def coordination_client():
  """jax.distributed's client of the coordination service (its key-value store), or None
  when jax.distributed is not running. (JAX exposes it only as ``jax._src`` state.)"""
  from jax._src import distributed  # pylint: disable=g-import-not-at-top
  return distributed.global_state.client


def key_value_try_get(client, key: str) -> str | None:
  """The value of ``key`` in the coordination service's store, or None if it is not set."""
  try:
    return client.key_value_try_get(key)
  except jax.errors.JaxRuntimeError as e:
    if "NOT_FOUND" in str(e):
      return None
    raise


def key_value_set_once(client, key: str, value: str) -> str:
  """Sets ``key`` to ``value`` unless another process set it first; returns the value kept."""
  try:
    client.key_value_set(key, value, allow_overwrite=False)
    return value
  except jax.errors.JaxRuntimeError as e:
    if "ALREADY_EXISTS" not in str(e):
      raise
    return client.blocking_key_value_get(key, 60_000)


# How a collective reports that a process it spans has gone: gloo (CPU) and NCCL (GPU) errors,
# a closed connection, the coordination service's missed heartbeats.
_PEER_LOST = re.compile(r"gloo|nccl|connection (reset|closed|refused)|broken pipe|heartbeat|"
                        r"socket closed|unavailable", re.IGNORECASE)


def lost_peer(error: BaseException) -> bool:
  """Whether ``error``, raised by a computation of a multi-process run, says that another
  process of the run stopped (its host died, it was killed) rather than a fault of this one."""
  return jax.process_count() > 1 and bool(_PEER_LOST.search(str(error)))


# Smallest message, per pair of devices, of the warm-up reduce-scatter below. Anything of a few
# 64 KiB loopback segments avoids the stall; 1 MiB is well clear of it and cheap.
_GLOO_WARMUP_MESSAGE_BYTES = 1 << 20


def warm_up_cpu_collectives(mesh: Mesh) -> None:
  """Sizes gloo's TCP send buffers with one large reduce-scatter before training starts.

  Why: XLA:CPU runs cross-process collectives with gloo over TCP, every device a rank. Its
  reduce-scatter is gloo's old ``ReduceScatterHalvingDoubling``, whose sends go through
  ``tcp::Pair::send``; that sets ``SO_SNDBUF`` to the size of the first message on each
  socket pair (raising it only for a later, larger old-style message). Setting SO_SNDBUF
  turns off the kernel's send-buffer autotuning, so the train step's small reduce-scatter
  (the head's backward psum_scatter of the batch x 512 feature gradient: 4 and 8 KiB
  messages) pinned those sockets at 8-16 KiB for good. The ring all-reduce of the backbone
  gradients (~100 MB per step) then crossed them one 64 KiB loopback segment at a time, each
  waiting for the receiver's 40 ms delayed ACK: ~1.6 MB/s, 80-110 s per step with 2
  processes x 2 devices. (With 2 ranks the ring runs both ways over the one pair, so ACKs
  presumably ride on data: 2 processes x 1 device stayed fast.)

  Running a reduce-scatter over the same devices first makes the first message on every pair
  that the halving-doubling algorithm uses (the same pairs for any later reduce-scatter over
  this mesh; the communicator is cached per device group) at least
  ``_GLOO_WARMUP_MESSAGE_BYTES``, so the buffers are sized once, large. JAX gives the CPU
  client gloo whenever ``jax.distributed`` is up, even with one process; without it the
  collectives are in-process (no sockets) and this is a no-op, as on accelerators (no gloo).
  """
  if (not jax.distributed.is_initialized() or mesh.size == 1
      or mesh.devices.flat[0].platform != "cpu"):
    return
  n = mesh.size
  # Halving-doubling sends halves, quarters, ... down to 1/n of the buffer: make 1/n the size.
  cols = n * (_GLOO_WARMUP_MESSAGE_BYTES // 4)
  sharding = batch_sharding(mesh)
  x = jax.jit(lambda: jnp.zeros((n, cols), jnp.float32), out_shardings=sharding)()
  scatter = jax.jit(jax.shard_map(
      lambda v: jax.lax.psum_scatter(v, DEVICE_AXIS, scatter_dimension=1, tiled=True),
      mesh=mesh, in_specs=P(DEVICE_AXIS), out_specs=P(DEVICE_AXIS)))
  jax.block_until_ready(scatter(x))


def global_batch(local_batch: Any, mesh: Mesh) -> Any:
  """Global batch-sharded arrays from this process's share of the batch (a pytree).

  Each process passes its own rows (local batch = global batch / process count) in process
  order; ``jax.make_array_from_process_local_data`` places them on the local devices.
  """
  sharding = batch_sharding(mesh)

  def one(x):
    x = np.asarray(x)
    global_shape = (x.shape[0] * jax.process_count(),) + x.shape[1:]
    return jax.make_array_from_process_local_data(sharding, x, global_shape)

  return jax.tree.map(one, local_batch)
