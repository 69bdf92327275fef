"""WebFace42M with ViT-B: 2,059,906 classes, PartialFC r = 0.3, AdamW, 40 epochs.

insightface arcface_torch ``configs/wf42m_pfc03_40epoch_8gpu_vit_b.py``: batch 256 on each
of 8 GPUs with 12 micro-batches accumulated per update (24,576 images an update; the 64-GPU
recipe takes 384 x 64 = 24,576 in one step), AdamW lr 1e-3, weight decay 0.1 on every
parameter, warm-up 4 of 40 epochs then the polynomial decay, sample rate 0.3, CosFace (s 64,
m 0.4), fp16 (here bfloat16 activations). On 64 chips set ``batch_size=24576`` and
``optimizer.grad_accum_steps=1``: the same updates. The loss adds this package's USS term from
epoch 1, as every recipe here. The clip differs from arcface_torch's as in
``configs/wf42m_r100.py``.

Variants: ``runlocal`` (float32, batch 16, no accumulation), ``synthetic`` (random images of
the recipe's classes and epoch length).
"""

from configs import default, wf42m_r100

VARIANTS = wf42m_r100.VARIANTS


def get_config(arg=None):
  """WebFace42M ViT-B recipe; variants: runlocal, synthetic."""
  variants = default.variants(arg, known=VARIANTS)
  config = wf42m_r100.get_config(arg)  # the data, PartialFC, clip and schedule
  config.model.name = "vit_b"
  config.optimizer.name = "adamw"
  config.optimizer.lr = 1e-3
  config.optimizer.weight_decay = 0.1
  config.optimizer.grad_accum_steps = 12
  config.num_epochs = 40
  config.schedule.warmup_epochs = 4.0
  if "runlocal" in variants:
    config.optimizer.grad_accum_steps = 1
  else:
    config.batch_size = 2048
  return config
