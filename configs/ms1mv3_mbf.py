"""MS1MV3 with MobileFaceNet: arcface_torch's ``configs/ms1mv3_mbf.py``.

insightface recognition/arcface_torch: network mbf, ArcFace margin 0.5 (margin_list (1.0, 0.5,
0.0); this package adds USS from epoch 1), SGD lr 0.1 / momentum 0.9 / weight decay 1e-4,
batch 128 per GPU on 8 GPUs (global 1024), 40 epochs, polynomial decay without warm-up, fp16
(bfloat16 here), 93,431 identities.
"""

from configs import ms1mv3_r100

VARIANTS = ms1mv3_r100.VARIANTS


def get_config(arg=None):
  """MS1MV3 MobileFaceNet recipe; variants as glint_r100 (runlocal)."""
  config = ms1mv3_r100.get_config(arg)
  config.model.name = "mbf"
  config.optimizer.weight_decay = 1e-4
  config.num_epochs = 40
  config.loss.s2c = "arcface"
  config.loss.s2c_margin = 0.5
  return config
