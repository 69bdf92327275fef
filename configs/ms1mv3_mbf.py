"""MS1MV3 with MobileFaceNet: arcface_torch's ``configs/ms1mv3_mbf.py``.

insightface recognition/arcface_torch: network mbf, ArcFace margin 0.5 (margin_list (1.0, 0.5,
0.0); this package adds USS from epoch 1), SGD lr 0.1 / momentum 0.9 / weight decay 1e-4,
batch 128 per GPU on 8 GPUs (global 1024), 40 epochs, polynomial decay without warm-up, fp16
(bfloat16 here), 93,431 identities.
"""

from configs import glint_mbf

VARIANTS = glint_mbf.VARIANTS


def get_config(arg=None):
  """MS1MV3 MobileFaceNet recipe; variants as glint_r100 (runlocal)."""
  config = glint_mbf.get_config(arg)
  config.data.path = "gs://YOUR_BUCKET/ms1mv3"
  config.data.num_classes = 93_431
  config.data.num_images = 5_179_510
  config.num_epochs = 40
  config.loss.s2c = "arcface"
  config.loss.s2c_margin = 0.5
  return config
