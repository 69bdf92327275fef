"""The optimisers and learning-rate schedules of the official recipe and of insightface.

``make(config, steps_per_epoch)`` builds the one ``config.optimizer.name`` names:

``sgd`` is torch.optim.SGD as the official code uses it: the weight decay is *coupled* (added
to the gradient before momentum, on every parameter including the USS bias b), momentum
without dampening, after a global-norm clip of the raw gradient (``clip_grad_norm_`` runs
before ``optimizer.step()`` in CVI-SZU/UniTSFace ``train.py``).

``adamw`` is torch.optim.AdamW as insightface arcface_torch's ViT recipes use it
(``train_v2.py``: ``AdamW(params=[backbone, partial_fc], lr, weight_decay)``, default betas
and eps, no parameter excluded from the decay): Adam moments, then the *decoupled* decay
``lr * weight_decay * p``, after the same global-norm clip. The Adam moments and their step
count are kept per part of the parameters (``backbone``, ``head``), as PyTorch keeps a step
count per parameter: a backbone frozen for the first steps of a fine-tuning run
(``config.init.head_only_steps``) starts its bias correction when it starts training.

Both are optionally accumulated over several micro-batches (optax.MultiSteps: one update on
the mean gradient of ``grad_accum_steps`` micro-batches, the schedule counting updates).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax

from unitsface_jax import pytrees


# The schedules ``learning_rate_schedule`` builds (``config.schedule.name``).
SCHEDULES = ("multistep", "polynomial")


def learning_rate_schedule(config: ml_collections.ConfigDict,
                           steps_per_epoch: float) -> optax.Schedule:
  """The lr per optimiser step: ``multistep`` (official) or ``polynomial`` (insightface).

  multistep: lr x decay_factor at each of ``schedule.decay_epochs``.
  polynomial: linear warm-up from 0 over ``warmup_epochs``, then lr * (1 - p)^power to 0 at
  the end of training, p the fraction of the post-warm-up steps done (insightface arcface_torch
  ``lr_scheduler.py`` PolynomialLRWarmup, whose default power 1 ``train_v2.py`` keeps; its
  older PolyScheduler used 2).
  """
  lr = config.optimizer.lr
  total = int(round(config.num_epochs * steps_per_epoch))
  warmup = int(round(config.schedule.warmup_epochs * steps_per_epoch))
  if config.schedule.name == "multistep":
    main = optax.piecewise_constant_schedule(
        lr, {int(e * steps_per_epoch): config.schedule.decay_factor
             for e in config.schedule.decay_epochs})
  elif config.schedule.name == "polynomial":
    main = optax.polynomial_schedule(lr, 0.0, power=config.schedule.power,
                                     transition_steps=max(total - warmup, 1))
  else:
    raise ValueError(f"config.schedule.name = {config.schedule.name!r}: unknown schedule")
  if warmup == 0:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])


def update_schedule(config: ml_collections.ConfigDict,
                    steps_per_epoch: float) -> optax.Schedule:
  """The lr of each optimiser update, for epochs of ``steps_per_epoch`` train steps.

  A train step is one micro-batch: with ``optimizer.grad_accum_steps`` = k an update takes k
  of them, so the schedule's epochs are ``steps_per_epoch / k`` updates long, and the update
  made at train step s (0-based) is update ``s // k``.
  """
  return learning_rate_schedule(config, steps_per_epoch / config.optimizer.grad_accum_steps)


def sgd(config: ml_collections.ConfigDict,
        steps_per_epoch: float) -> optax.GradientTransformation:
  """Clip -> coupled weight decay -> momentum SGD, as the official training script.

  ``steps_per_epoch`` counts train steps (micro-batches); see :func:`update_schedule`.
  """
  parts = []
  if config.optimizer.clip_norm > 0:
    parts.append(optax.clip_by_global_norm(config.optimizer.clip_norm))
  if config.optimizer.weight_decay > 0:
    parts.append(optax.add_decayed_weights(config.optimizer.weight_decay))
  parts.append(optax.sgd(update_schedule(config, steps_per_epoch),
                         momentum=config.optimizer.momentum or None))
  tx = optax.chain(*parts)
  if config.optimizer.grad_accum_steps > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=config.optimizer.grad_accum_steps)
  return tx


def adamw(config: ml_collections.ConfigDict, steps_per_epoch: float,
          parts=("backbone", "head")) -> optax.GradientTransformation:
  """Clip -> Adam (moments and step count per top-level part of the parameters) ->
  decoupled weight decay -> lr schedule: torch.optim.AdamW after clip_grad_norm_.

  The parameters are a dict with the keys ``parts``. ``steps_per_epoch`` counts train steps
  (micro-batches); see :func:`update_schedule`.
  """
  o = config.optimizer
  parts = tuple(parts)
  tx = optax.chain(
      optax.clip_by_global_norm(o.clip_norm) if o.clip_norm > 0 else optax.identity(),
      optax.multi_transform(
          {part: optax.scale_by_adam(b1=o.b1, b2=o.b2, eps=o.eps) for part in parts},
          lambda params: {k: jax.tree.map(lambda _, k=k: k, v) for k, v in params.items()}),
      optax.add_decayed_weights(o.weight_decay),
      optax.scale_by_learning_rate(update_schedule(config, steps_per_epoch)))
  if o.grad_accum_steps > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=o.grad_accum_steps)
  return tx


OPTIMIZERS = {"sgd": sgd, "adamw": adamw}


def make(config: ml_collections.ConfigDict,
         steps_per_epoch: float) -> optax.GradientTransformation:
  """The optimiser ``config.optimizer.name`` names, for parameters {"backbone", "head"}."""
  name = config.optimizer.get("name", "sgd")
  if name not in OPTIMIZERS:
    raise ValueError(f"config.optimizer.name = {name!r}: must be one of {sorted(OPTIMIZERS)}")
  return OPTIMIZERS[name](config, steps_per_epoch)


def keep_frozen(new, old, frozen: str = "backbone"):
  """``new`` (parameters or optimiser state) with every leaf under a ``frozen`` key taken
  from ``old``: the update of a step that trains only the other parts.

  In the optimiser state these are the moments, accumulated gradients and (adamw) the step
  count of the frozen part; the counters shared by all parts (the schedule's, MultiSteps')
  advance. The selection is made when tracing, so the compiled step computes nothing for the
  frozen leaves.
  """
  return pytrees.map_with_names(lambda names, n, o: o if frozen in names else n, new, old)


def clamp_prelu(params, minimum: float = 0.01):
  """PReLU slopes clamped to >= ``minimum`` (the official ``restrict_weights()`` each step)."""
  return pytrees.map_with_names(
      lambda names, x: jnp.maximum(x, minimum) if "slope" in names else x, params)
