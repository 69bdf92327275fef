"""The unified threshold integrated sample-to-sample (USS) loss of UniTSFace.

form="code" (CVI-SZU/UniTSFace head.py
``Unified_Threshold_Integrated_Sample_to_Sample_Loss``):
  softplus(−clip(s(c_y − m) − b, −s, s)) + Σ_{j≠y} softplus(clip(s c_j − b, −s, s)).
form="paper" (arXiv 2311.02523, Sec. 3, USS with margin): the same positive term, and the
  negative term log(1 + Σ_{j≠y} exp(s c_j − b)), unclipped.
One scalar b, learnt, with a first value from the data; the unified threshold is t = b/s.
"""

from typing import Literal

import jax
import jax.numpy as jnp

from unitsface_jax.losses import class_axis
from unitsface_jax.losses import registry

FORMS = ("code", "paper")


def uss_parts(cos: jax.Array, target: jax.Array, mask: jax.Array, bias: jax.Array, *,
              scale: float, margin: float, form: Literal["code", "paper"],
              class_max: class_axis.ClassReduce = class_axis.identity,
              class_sum: class_axis.ClassReduce = class_axis.identity
              ) -> tuple[jax.Array, jax.Array]:
  """The USS positive and negative terms [B] on local classes (``mask``: the valid memory
  rows), reductions finished by ``class_max``/``class_sum``."""
  pos, neg = class_axis.threshold_bce(cos, target, mask, bias, scale=scale, margin=margin,
                                      class_sum=class_sum)
  if form == "paper":
    neg = class_axis.threshold_softmax_negative(cos, target, mask, bias, scale=scale,
                                                class_max=class_max, class_sum=class_sum)
  elif form != "code":
    raise ValueError(f"USS form must be 'code' or 'paper', got {form!r}")
  return pos, neg


def uss(cos: jax.Array, labels: jax.Array, bias: jax.Array, *, scale: float = 64.0,
        margin: float = 0.1, valid: jax.Array | None = None,
        form: Literal["code", "paper"] = "code") -> jax.Array:
  """USS of each sample [B] from cosines to the memory bank [B, C], in fp32.

  Invalid classes (``valid`` [C] False: memory rows never written) are left out of both
  terms; the official code has no such mask and reads uninitialised memory until epoch 0
  has written every class. ``valid=None`` counts every class (the official behaviour once
  M is full).

  Args:
    cos: [B, C] cosines to the memory bank.
    labels: [B] int labels.
    bias: scalar b.
    scale: s.
    margin: m.
    valid: [C] bool, memory rows written at least once; None means all.
    form: "code" or "paper".
  """
  cols, dtype = registry.one_device_columns(cos, labels, valid)
  bias = jnp.reshape(class_axis.as_compute(bias, dtype), ())
  pos, neg = uss_parts(cols.cos, cols.target, cols.mask, bias, scale=scale, margin=margin,
                       form=form)
  return pos + neg


def _per_sample(cols, *, scale, margin, options, bias):
  pos, neg = uss_parts(cols.cos, cols.target, cols.mask, bias, scale=scale, margin=margin,
                       form=options["uss_form"], class_max=cols.class_max,
                       class_sum=cols.class_sum)
  return pos + neg


def _check(options, batch_size):
  del batch_size
  if options["uss_form"] not in FORMS:
    return "loss.uss_form", f"must be one of {FORMS}"
  return None


LOSS = registry.register(registry.SampleToSampleLoss(
    name="uss", per_sample=_per_sample, options={"uss_form": "code"}, check=_check,
    threshold="scalar",
    formula="softplus(−clip(s(c_y − m) − b, ±s)) + Σ_{j≠y} softplus(clip(s c_j − b, ±s)) "
            "(`uss_form=\"code\"`); the paper's negative term log(1 + Σ_{j≠y} exp(s c_j − b)) "
            "with `uss_form=\"paper\"`",
    source="CVI-SZU/UniTSFace head.py `Unified_Threshold_Integrated_Sample_to_Sample_Loss`; "
           "arXiv 2311.02523 Sec. 3",
    values="m 0.1 (default), b from the data on first use"))
