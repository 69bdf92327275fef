"""The combined margin cos(m1·θ_y + m2) − m3 of ArcFace, per sample.

Reference: ArcFace (arXiv 1801.07698, Eq. 4; m1 SphereFace's multiplicative, m2 ArcFace's
additive angular, m3 CosFace's additive cosine margin); insightface arcface_torch losses.py
``CombinedMarginLoss``, which is not that formula: with m3 > 0 it runs CosFace with m3 and
ignores m1 and m2, with (m1, m3) = (1, 0) ArcFace with a gradient-free margin, and nothing
else. ``combined_form = "arcface_torch"`` reproduces those two branches, ``"formula"``
computes the formula for any m1, m2, m3 with its gradient.
"""

import math

import jax
import jax.numpy as jnp

from unitsface_jax.losses import class_axis
from unitsface_jax.losses import registry

FORMS = ("formula", "arcface_torch")


def _safe_arccos(c: jax.Array) -> jax.Array:
  """arccos(c) for c in [-1, 1] whose gradient at c = ±1 (infinite) is taken as 0."""
  inner = jnp.abs(c) < 1.0
  return jnp.where(inner, jnp.arccos(jnp.where(inner, c, 0.0)),
                   jnp.arccos(jax.lax.stop_gradient(c)))


def combined_margin_logits(cos: jax.Array, target: jax.Array, *, scale: float, m1: float,
                           m2: float, m3: float, straight_through: bool = False) -> jax.Array:
  """s·cos for other classes, s·(cos(m1·θ_y + m2) − m3) for the target.

  Like ``CombinedMarginLoss`` (which takes arccos, adds m2 and takes cos), the target logit
  is cos(m1·θ + m2) for every θ: past m1·θ + m2 = π it rises again; nothing substitutes a
  monotonic value there (the older insightface ``ArcFace`` used cos θ − m·sin m beyond
  π − m, not reproduced). cos is clipped to [−1, 1]. With m1 = 1 the target is computed as
  cos·cos m2 − sin θ·sin m2 (``class_axis.arc_target_logit``: finite gradient at cos = ±1);
  otherwise through arccos, whose gradient at cos = ±1 is taken as 0. ``straight_through``
  drops the margin's gradient (d logit/d cos = s), as arcface_torch's in-place edit under
  ``torch.no_grad`` does.
  """
  c = class_axis.clip_through(cos, -1.0, 1.0)
  c_y = class_axis.target_cosine(c, target)
  if m1 == 1.0:
    arc = class_axis.arc_target_logit(c_y, m2)
  else:
    arc = jnp.cos(m1 * _safe_arccos(c_y) + m2)
  arc = arc - m3
  if straight_through:
    arc = c_y + jax.lax.stop_gradient(arc - c_y)
  return scale * jnp.where(target, arc[:, None], c)


def combined_margin(cos: jax.Array, labels: jax.Array, *, scale: float = 64.0,
                    m1: float = 1.0, m2: float = 0.3, m3: float = 0.2,
                    straight_through: bool = False) -> jax.Array:
  """Combined margin loss CE(``combined_margin_logits``) of each sample [B], in fp32."""
  cols, _ = registry.one_device_columns(cos, labels)
  return cols.cross_entropy(combined_margin_logits(
      cols.cos, cols.target, scale=scale, m1=m1, m2=m2, m3=m3,
      straight_through=straight_through))


def form_logits(cos: jax.Array, target: jax.Array, *, scale: float, m1: float, m2: float,
                m3: float, form: str, straight_through: bool = False) -> jax.Array:
  """The combined margin's logits in ``form`` ("formula", with or without the margin's
  gradient, or "arcface_torch")."""
  if form == "formula":
    return combined_margin_logits(cos, target, scale=scale, m1=m1, m2=m2, m3=m3,
                                  straight_through=straight_through)
  if form != "arcface_torch":
    raise ValueError(f"unknown combined_form {form!r}")
  # insightface arcface_torch losses.py CombinedMarginLoss: two branches, nothing else.
  if m3 > 0:
    return scale * (cos - m3 * target)
  if m1 == 1.0 and m3 == 0.0:
    return combined_margin_logits(cos, target, scale=scale, m1=1.0, m2=m2, m3=0.0,
                                  straight_through=True)
  raise ValueError(f"arcface_torch's combined margin runs m3 > 0 or (m1, m3) = (1, 0), got "
                   f"{(m1, m2, m3)}")


def _per_sample(cols, *, scale, margin, options, norms, bias, stats):
  del margin, norms, bias
  return cols.cross_entropy(form_logits(
      cols.cos, cols.target, scale=scale, m1=options["combined_m1"],
      m2=options["combined_m2"], m3=options["combined_m3"],
      form=options["combined_form"],
      straight_through=options["arcface_straight_through"])), stats


def _check(options, batch_size):
  del batch_size
  m1, m2, m3 = (options[f"combined_m{i}"] for i in (1, 2, 3))
  if options["combined_form"] not in FORMS:
    return "loss.combined_form", f"must be one of {FORMS}"
  if not m1 > 0:
    return "loss.combined_m1", "must be positive"
  if not 0.0 <= m2 < math.pi:
    return "loss.combined_m2", "must be in [0, π)"
  if not 0.0 <= m3 < 1.0:
    return "loss.combined_m3", "must be in [0, 1)"
  if options["combined_form"] == "arcface_torch" and not (m3 > 0 or m1 == 1.0):
    return "loss.combined_m1", ("arcface_torch's CombinedMarginLoss runs m3 > 0 (CosFace) or "
                                "m1 = 1 with m3 = 0 (ArcFace) only; use combined_form = "
                                "'formula'")
  return None


# insightface recognition/arcface_mxnet sample_config's "combined" (1, 0.3, 0.2).
_REFERENCE = {"combined_m1": 1.0, "combined_m2": 0.3, "combined_m3": 0.2}

LOSS = registry.register(registry.SampleToClassLoss(
    name="combined", per_sample=_per_sample,
    options={**_REFERENCE, "combined_form": "formula", "arcface_straight_through": False},
    check=_check,
    variant="combined", variant_values=_REFERENCE,
    formula="CE with target s·(cos(m1·θ_y + m2) − m3)",
    source="ArcFace paper Eq. 4; arcface_torch losses.py `CombinedMarginLoss`",
    values="`combined_m1/m2/m3` 1.0, 0.3, 0.2 (insightface arcface_mxnet sample_config "
           "\"combined\"), `combined_form` \"formula\" or \"arcface_torch\""))
