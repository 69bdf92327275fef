"""Glint360K with MobileFaceNet: arcface_torch's ``configs/glint360k_mbf.py``.

insightface recognition/arcface_torch: network mbf, embedding 512, CosFace margin 0.4 (this
package adds USS from epoch 1, as every recipe), SGD lr 0.1 / momentum 0.9 / weight decay 1e-4
(not the IResNets' 5e-4), batch 128 per GPU on 8 GPUs (global 1024), 20 epochs, polynomial
decay without warm-up, fp16 (bfloat16 here), full head (sample_rate 1.0).
"""

from configs import glint_r100

VARIANTS = glint_r100.VARIANTS


def get_config(arg=None):
  """Glint360K MobileFaceNet recipe; variants as glint_r100 (runlocal)."""
  config = glint_r100.get_config(arg)
  config.model.name = "mbf"
  config.optimizer.weight_decay = 1e-4
  return config
