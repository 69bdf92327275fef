"""Fields every recipe has, with the official UniTSFace CASIA-WebFace values as defaults.

Recipes import this and override (flax examples style). ``get_config(arg)`` takes a comma list
of variants (``--config=configs/x.py:runlocal``), read with :func:`variants`.
"""

import ml_collections

VARIANTS = ()


def variants(arg, known) -> set[str]:
  """The comma-separated variant names in ``arg`` (the part after ``:`` on the command line).

  Raises ValueError naming any name not in ``known``, so a misspelt variant cannot silently
  run the full recipe.
  """
  names = set((arg or "").split(",")) - {""}
  unknown = sorted(names - set(known))
  if unknown:
    raise ValueError(f"unknown config variant(s) {unknown}; this recipe has {sorted(known)}")
  return names


def get_config(arg=None):
  """The base config (see module docstring); no variants."""
  variants(arg, known=VARIANTS)
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.num_devices = 0  # 0: every device of every process

  config.model = ml_collections.ConfigDict()
  config.model.name = "lresnet50_eir"
  config.model.dtype = "float32"  # activations; parameters, head and losses are float32
  config.model.dropout = 0.4
  config.model.num_features = 512
  config.model.width = 64  # channels of the first stage (x1, 2, 4, 8); 64 in every paper
  config.model.bn_stats = "global"  # global (sync over the global batch) | per_device

  config.data = ml_collections.ConfigDict()
  config.data.source = "recordio"  # recordio | tfds | folder | synthetic | auto
  config.data.path = ""
  config.data.num_classes = 10_572
  # Examples of the synthetic source (data.source = "synthetic"): recipes set their data
  # set's size, so a synthetic run of a recipe has that recipe's epoch length.
  config.data.num_images = 490_623
  config.data.skip_bad_records = False
  config.data.max_examples = 0  # > 0: train on the first N examples only (smoke runs)
  config.data.num_workers = 2
  # Threads per process that read and decode batches (the JPEG decoder releases the GIL);
  # with num_workers = 0 they are the only parallelism (BENCHMARKS.md, "Input pipeline").
  config.data.read_threads = 1

  config.loss = ml_collections.ConfigDict()
  config.loss.s2c = "cosface"  # cosface | arcface
  config.loss.s2c_scale = 64.0
  config.loss.s2c_margin = 0.4
  config.loss.s2s = "uss"  # uss | s2s_softmax | s2s_bce | none
  config.loss.s2s_scale = 64.0
  config.loss.s2s_margin = 0.1
  config.loss.uss_start_epoch = 1  # epoch 0 trains sample-to-class only, filling the memory
  config.loss.w_s2c = 1.0
  config.loss.w_s2s = 1.0
  config.loss.sample_rate = 1.0  # PartialFC negative sampling; 1.0 is the full head
  config.loss.head_dtype = "float32"  # storage of W and M (bfloat16 halves it); compute fp32

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.lr = 0.1
  config.optimizer.momentum = 0.9
  config.optimizer.weight_decay = 5e-4
  config.optimizer.clip_norm = 10.0
  config.optimizer.grad_accum_steps = 1

  config.schedule = ml_collections.ConfigDict()
  config.schedule.name = "multistep"  # multistep (official) | polynomial (insightface)
  config.schedule.decay_epochs = (16, 24)
  config.schedule.decay_factor = 0.1
  config.schedule.warmup_epochs = 0.0

  config.batch_size = 512  # global
  config.num_epochs = 28

  # Compiled programs are kept in WORKDIR/jax_cache, so a resumed run skips compilation
  # (JAX_COMPILATION_CACHE_DIR, when set, is used instead).
  config.compilation_cache = True

  config.log_every_steps = 50
  config.checkpoint_every_steps = 2000
  config.keep_checkpoints = 3
  config.eval = ml_collections.ConfigDict()
  config.eval.bins = ()  # insightface .bin verification sets
  config.eval.every_steps = 2000  # 0 disables
  config.eval.before_training = False  # also evaluate the initial weights (a fresh run only)
  config.eval.batch_size = 64

  # Drills, for tests and for rehearsing a cluster's preemption: after step N (> 0; 0 is off)
  # each process sends itself ``signal`` once, when its pending checkpoint saves are on disk.
  # SIGTERM takes the preemption path (save at the next step boundary, with several
  # processes two steps later, and exit 0); SIGKILL is a crash that saves nothing.
  config.debug = ml_collections.ConfigDict()
  config.debug.signal_after_step = 0
  config.debug.signal = "SIGTERM"  # SIGTERM | SIGKILL
  return config
