"""The bundled demo: the 40 ORL identities at 112x112, an IResNet-18, on a CPU.

``--config=configs/demo.py`` trains a few epochs and reports the held-out verification
accuracy before and after training; ``configs/demo.py:smoke`` runs 16 steps on 64 images
with a quarter-width IResNet-18 (tests, CI). The data ship with the package
(``unitsface_jax/data/demo/``): a RecordIO set of images 1-8 of each identity, and a
verification .bin of pairs from the held-out images 9 and 10. A loss variant
(``configs/demo.py:adaface``, ...; ``default.LOSS_VARIANTS``) trains with that loss instead of
CosFace, so two runs compare two losses on the same faces (README.md, "Losses").
"""

from configs import default
from unitsface_jax.data import demo as demo_data

VARIANTS = ("smoke",) + default.LOSS_VARIANTS


def get_config(arg=None):
  """Demo recipe; variants: smoke and the loss variants."""
  variants = default.variants(arg, known=VARIANTS)
  config = default.get_config()
  config.model.name = "iresnet18"
  config.model.dropout = 0.0
  config.data.source = "recordio"
  config.data.path = str(demo_data.demo_path())
  config.data.num_classes = 40
  config.data.num_images = 320
  config.data.num_workers = 0
  config.batch_size = 32
  config.num_epochs = 6
  config.optimizer.lr = 0.05
  config.schedule.decay_epochs = (4, 5)
  config.log_every_steps = 5
  config.checkpoint_every_steps = 20
  config.eval.bins = (str(demo_data.demo_bin_path()),)
  config.eval.every_steps = 20
  config.eval.before_training = True
  default.set_loss(config, variants)
  if "smoke" in variants:  # 16 steps on 64 images: CosFace in epoch 0, + USS in epoch 1
    config.num_epochs = 2
    config.batch_size = 8
    config.data.max_examples = 64
    config.schedule.decay_epochs = ()
    config.log_every_steps = 1
    config.checkpoint_every_steps = 4
    config.eval.every_steps = 0
    # A quarter-width trunk (3.9M parameters, 0.17 GMACs a face, ~1/16 of the full width's
    # convolution work): the tests train it a few dozen times.
    config.model.width = 16
  return config
