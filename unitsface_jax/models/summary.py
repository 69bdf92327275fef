"""Model summary: parameter counts and multiply-accumulates per image, without running a model.

MACs are read off the traced forward pass (``jax.make_jaxpr`` on abstract values), counting the
convolutions and matrix products, which is what the field's tables (and insightface's FLOPs
counter) report; BatchNorm and PReLU are left out, as there.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.extend import core as jex_core
from flax import nnx

from unitsface_jax.models.layers import Frozen, grouped_conv_as_taps


def count_params(model: nnx.Module) -> int:
  """Trainable parameters plus frozen weights: what ``sum(p.numel() for p in
  torch_model.parameters())`` counts. Works on abstract models from ``nnx.eval_shape``."""
  state = nnx.state(model, nnx.Any(nnx.Param, Frozen))
  return sum(math.prod(x.shape) for x in jax.tree.leaves(state))


def _macs_of_jaxpr(jaxpr: jex_core.Jaxpr) -> int:
  total = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "conv_general_dilated":
      lhs, rhs = (v.aval for v in eqn.invars)
      out = eqn.outvars[0].aval
      dn = eqn.params["dimension_numbers"]
      # rhs_spec = (out_channel_dim, in_channel_dim, *spatial_dims) of the kernel.
      in_ch = rhs.shape[dn.rhs_spec[1]]
      window = math.prod(rhs.shape[d] for d in dn.rhs_spec[2:])
      total += math.prod(out.shape) * window * in_ch
    elif eqn.primitive.name == "dot_general":
      lhs = eqn.invars[0].aval
      (contract, _), _ = eqn.params["dimension_numbers"]
      total += math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs.shape[d] for d in contract)
    for param in eqn.params.values():  # nested jaxprs (pjit, custom_vjp, remat)
      if isinstance(param, jex_core.ClosedJaxpr):
        total += _macs_of_jaxpr(param.jaxpr)
      elif isinstance(param, jex_core.Jaxpr):
        total += _macs_of_jaxpr(param)
  return total


def macs_per_image(model: nnx.Module, image_size: int = 112) -> int:
  """Multiply-accumulates of one inference forward pass on one image."""
  graphdef, state = nnx.split(model)

  def forward(state, x):
    m = nnx.merge(graphdef, state)
    m.eval()
    return m(x)

  x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  abstract_state = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state)
  with grouped_conv_as_taps(False):  # count grouped convolutions as convolutions
    return _macs_of_jaxpr(jax.make_jaxpr(forward)(abstract_state, x).jaxpr)


def summary(name: str, model: nnx.Module) -> str:
  """One line: name, parameters (M) and GMACs per 112x112 image."""
  return (f"{name}: {count_params(model) / 1e6:.2f}M parameters, "
          f"{macs_per_image(model) / 1e9:.2f} GMACs per image")
