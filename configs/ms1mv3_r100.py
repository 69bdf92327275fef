"""MS1MV3 with IResNet-100: 93,431 classes, insightface's polynomial schedule, 20 epochs."""

from configs import default


def get_config(arg=None):
  """MS1MV3 recipe; variants: runlocal."""
  variants = set((arg or "").split(",")) - {""}
  config = default.get_config()
  config.model.name = "iresnet100"
  config.model.dropout = 0.0
  config.model.dtype = "bfloat16"
  config.data.path = "gs://YOUR_BUCKET/ms1mv3"
  config.data.num_classes = 93_431
  config.data.num_images = 5_179_510
  config.batch_size = 1024
  config.num_epochs = 20
  config.schedule.name = "polynomial"
  config.schedule.decay_epochs = ()
  if "runlocal" in variants:
    config.model.dtype = "float32"
    config.batch_size = 16
  return config
