"""The official UniTSFace CASIA-WebFace setup (configs/casia_r50.py) with MobileFaceNet.

The backbone is arcface_torch's ``mbf`` (no dropout: the reference has none); weight decay
1e-4 as arcface_torch's MobileFaceNet recipes use (``configs/*_mbf.py`` there), everything
else as casia_r50. ``--config=configs/casia_mbf.py:runlocal`` shrinks it.
"""

from configs import casia_r50

VARIANTS = casia_r50.VARIANTS


def get_config(arg=None):
  """CASIA-WebFace MobileFaceNet recipe; variants: runlocal."""
  config = casia_r50.get_config(arg)
  config.model.name = "mbf"
  config.model.dropout = 0.0
  config.optimizer.weight_decay = 1e-4
  return config
