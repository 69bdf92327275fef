"""Glint360K with IResNet-100: 360,232 classes, 20 epochs, global batch 1024 (TPU/GPU pod)."""

from configs import default

VARIANTS = ("runlocal",)


def get_config(arg=None):
  """Glint360K recipe; variants: runlocal (float32, batch 16)."""
  variants = default.variants(arg, known=VARIANTS)
  config = default.get_config()
  config.model.name = "iresnet100"
  config.model.dropout = 0.0
  config.model.dtype = "bfloat16"
  config.data.path = "gs://YOUR_BUCKET/glint360k"
  # In GCS: chunks of consecutive records, one range request each, not one request a record
  # (configs/default.py, "shuffle"; README, "Data in Google Cloud Storage"). The recipes built
  # on this one (ms1mv3, wf42m, *_mbf) read from GCS too and keep it.
  config.data.shuffle = "chunks"
  config.data.num_classes = 360_232
  config.data.num_images = 17_091_657
  config.batch_size = 1024
  config.num_epochs = 20
  config.schedule.name = "polynomial"
  config.schedule.warmup_epochs = 0.0
  config.schedule.decay_epochs = ()
  config.loss.sample_rate = 1.0
  if "runlocal" in variants:
    config.model.dtype = "float32"
    config.batch_size = 16
  return config
