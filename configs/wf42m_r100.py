"""WebFace42M with IResNet-100: 2,059,906 classes, PartialFC r = 0.3, SGD, 20 epochs.

insightface arcface_torch ``configs/wf42m_pfc03_32gpu_r100.py``: batch 128 on each of 32
GPUs (global 4096), lr 0.4, momentum 0.9, weight decay 5e-4, warm-up 2 of 20 epochs then the
polynomial decay, sample rate 0.3, CosFace (s 64, m 0.4), fp16 (here bfloat16 activations).
The loss adds this package's USS term from epoch 1, as every recipe here. Differences:
arcface_torch clips the backbone's gradient norm at 5, this package the global norm of
backbone and head (``optimizer.clip_norm``). The lr decays linearly after the warm-up, as
``train_v2.py``'s ``PolynomialLRWarmup`` (power 1, ``config.schedule.power``).

Variants: ``runlocal`` (float32, batch 16), ``synthetic`` (random images of the recipe's
classes and epoch length, for trying the memory and the speed of a slice without the data).
"""

from configs import default, glint_r100

VARIANTS = ("runlocal", "synthetic")


def get_config(arg=None):
  """WebFace42M IResNet-100 recipe; variants: runlocal, synthetic."""
  variants = default.variants(arg, known=VARIANTS)
  # IResNet-100, bfloat16, polynomial schedule; runlocal: float32, batch 16.
  config = glint_r100.get_config("runlocal" if "runlocal" in variants else None)
  config.data.path = "gs://YOUR_BUCKET/webface42m"
  config.data.num_classes = 2_059_906
  config.data.num_images = 42_474_557
  config.loss.sample_rate = 0.3
  config.optimizer.lr = 0.4
  config.optimizer.clip_norm = 5.0
  config.schedule.warmup_epochs = 2.0
  if "runlocal" not in variants:
    config.batch_size = 4096
  if "synthetic" in variants:
    config.data.source = "synthetic"
  return config
