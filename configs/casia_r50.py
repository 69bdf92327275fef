"""The official UniTSFace setup on CASIA-WebFace: LResNet50-EIR, CosFace + USS from epoch 1.

SGD 0.1 / 0.9 / 5e-4, lr x0.1 at epochs 16 and 24 of 28, batch 512, global-norm clip 10
(CVI-SZU/UniTSFace train.py). ``--config=configs/casia_r50.py:runlocal`` shrinks it; a loss
variant (``:adaface``, ``:curricularface``, ``:magface``, ``:combined``, ``:normbce``, ``:uce``;
``default.LOSS_VARIANTS``) replaces CosFace with that loss and its reference values, USS kept.
"""

from configs import default

VARIANTS = ("runlocal",) + default.LOSS_VARIANTS


def get_config(arg=None):
  """CASIA-WebFace recipe; variants: runlocal and the loss variants."""
  variants = default.variants(arg, known=VARIANTS)
  config = default.get_config()
  config.data.path = "/data/casia-webface"  # insightface faces_webface_112x112 (train.rec/.idx)
  default.set_loss(config, variants)
  if "runlocal" in variants:
    config.batch_size = 32
    config.num_epochs = 2
  return config
