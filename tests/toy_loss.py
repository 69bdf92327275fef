"""A loss that lives outside the package, for tests/test_loss_registry.py: NormFace with a
temperature, a per-class bias and a running statistic, so it exercises every part of the
registry's contract (options and their check, a bias, statistics, feature norms).

NormFace (arXiv 1704.06369): CE(s·cos/τ − b) with no margin; the running statistic is the
batch's mean target cosine, and the feature norms enter as a tiny penalty on their mean.
"""

import jax.numpy as jnp

from unitsface_jax.losses import registry


def _per_sample(cols, *, scale, margin, options, norms, bias, stats):
  del margin
  logits = scale * cols.cos / options["toy_temperature"] - bias
  mean_cos = jnp.mean(cols.target_value(cols.cos))
  stats = {"mean_target_cos": 0.5 * stats["mean_target_cos"] + 0.5 * mean_cos}
  return cols.cross_entropy(logits) + 1e-3 * norms, stats


def _check(options, batch_size):
  del batch_size
  if not options["toy_temperature"] > 0:
    return "loss.toy_temperature", "must be positive"
  return None


LOSS = registry.register(registry.SampleToClassLoss(
    name="toy_normface", per_sample=_per_sample, options={"toy_temperature": 2.0},
    check=_check, bias="per_class", initial_bias=lambda num_classes: 0.25,
    initial_stats={"mean_target_cos": 0.0}, needs_norms=True,
    formula="CE(s·cos/τ − b)", source="NormFace (arXiv 1704.06369)", values="τ 2"))
