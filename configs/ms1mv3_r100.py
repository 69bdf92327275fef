"""MS1MV3 with IResNet-100: the Glint360K recipe (insightface's polynomial schedule, 20
epochs, batch 1024) on MS1MV3's 93,431 identities."""

from configs import glint_r100

VARIANTS = glint_r100.VARIANTS


def get_config(arg=None):
  """MS1MV3 recipe; variants as glint_r100 (runlocal, ...)."""
  config = glint_r100.get_config(arg)
  config.data.path = "gs://YOUR_BUCKET/ms1mv3"
  config.data.num_classes = 93_431
  config.data.num_images = 5_179_510
  return config
