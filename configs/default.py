"""Fields every recipe has, with the official UniTSFace CASIA-WebFace values as defaults.

Recipes import this and override (flax examples style). ``get_config(arg)`` takes a comma list
of variants (``--config=configs/x.py:runlocal``), read with :func:`variants`.
"""

import ml_collections

from unitsface_jax.losses import registry

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


# One variant per sample-to-class loss family, each with the values of its reference
# implementation (README.md, "Losses"; each loss's file in unitsface_jax/losses/s2c/):
# recipes accept them beside their own variants.
LOSS_VARIANTS = tuple(registry.variants())


def set_loss(config, names) -> None:
  """Sets ``config.loss`` to the loss family named in ``names`` (at most one of the
  registry's variants; none leaves the config's loss as it is)."""
  found = registry.variants()
  chosen = sorted(set(names) & set(found))
  if len(chosen) > 1:
    raise ValueError(f"config variants {chosen} each choose a loss: pick one")
  for variant in chosen:
    loss = found[variant]
    config.loss.s2c = loss.name
    for name, value in loss.variant_values.items():
      config.loss[name] = value


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
  # Rematerialise each residual block in the backward pass (IR-ResNets): a block's
  # activations live only while it runs, for one more forward pass of FLOPs (plan.py's lever).
  config.model.remat = False

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
  # records: an exact shuffle of the whole set each epoch. chunks: a random order of chunks of
  # chunk_records consecutive records, the records of shuffle_window chunks shuffled together;
  # a RecordIO file in GCS larger than 256 MiB then costs one request per chunk per reading
  # process (per record: num_workers / chunk_records), not one per record. Batches mix
  # shuffle_window chunks, and with several hosts the global batch depends on their number
  # (README.md, "Which layout on GCS").
  config.data.shuffle = "records"
  config.data.chunk_records = 1024
  config.data.shuffle_window = 16

  config.loss = ml_collections.ConfigDict()
  # A registered sample-to-class loss (README.md, "Losses"; unitsface_jax/losses/s2c/); the
  # loss variants of the recipes set each one's reference values.
  config.loss.s2c = "cosface"
  config.loss.s2c_scale = 64.0
  config.loss.s2c_margin = 0.4  # m of cosface, arcface, adaface, curricularface, BCE, UCE
  config.loss.s2s = "uss"  # a registered sample-to-sample loss (unitsface_jax/losses/s2s/)
  config.loss.s2s_scale = 64.0
  config.loss.s2s_margin = 0.1
  # Every registered loss's own options (combined_m1, adaface_h, uss_form, ...), each with its
  # default and its meaning in the loss's file.
  for name, value in registry.option_defaults().items():
    config.loss[name] = value
  config.loss.uss_start_epoch = 1  # epoch 0 trains sample-to-class only, filling the memory
  config.loss.w_s2c = 1.0
  config.loss.w_s2s = 1.0
  config.loss.sample_rate = 1.0  # PartialFC negative sampling; 1.0 is the full head
  config.loss.head_dtype = "float32"  # storage of W and M (bfloat16 halves it); compute fp32

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.name = "sgd"  # sgd (official; coupled decay) | adamw (decoupled decay)
  config.optimizer.lr = 0.1
  config.optimizer.momentum = 0.9
  config.optimizer.weight_decay = 5e-4
  config.optimizer.clip_norm = 10.0
  config.optimizer.grad_accum_steps = 1
  # adamw only (torch.optim.AdamW's defaults, which arcface_torch's ViT recipes keep).
  config.optimizer.b1 = 0.9
  config.optimizer.b2 = 0.999
  config.optimizer.eps = 1e-8

  config.schedule = ml_collections.ConfigDict()
  config.schedule.name = "multistep"  # multistep (official) | polynomial (insightface)
  config.schedule.decay_epochs = (16, 24)
  config.schedule.decay_factor = 0.1
  config.schedule.warmup_epochs = 0.0
  # polynomial only: lr * (1 - p)^power after the warm-up (arcface_torch's PolynomialLRWarmup
  # default, 1: linear decay to 0).
  config.schedule.power = 1.0

  # Fine-tuning: the backbone's weights before step 0, from an insightface backbone.pth, a
  # .safetensors/.npz of this package or another run's workdir (its latest checkpoint); the
  # head starts fresh. The first head_only_steps train steps train the head alone (backbone
  # frozen, BatchNorm statistics included). A run that resumes reads its own checkpoint.
  config.init = ml_collections.ConfigDict()
  config.init.backbone = ""
  config.init.head_only_steps = 0

  config.batch_size = 512  # global
  config.num_epochs = 28

  # Compiled programs are kept in WORKDIR/jax_cache, so a resumed run skips compilation
  # (JAX_COMPILATION_CACHE_DIR, when set, is used instead).
  config.compilation_cache = True

  # A step that has not finished after this many seconds ends the process (exit 3, as a lost
  # peer: a hung collective; restart every process to resume). 0: automatic, 20 median steps
  # and at least 5 minutes, after 3 warm-up steps; < 0: off (run_control.StepWatchdog).
  config.step_timeout_s = 0.0

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
  # processes two steps later, and exit 0); SIGKILL is a crash that saves nothing; SIGSTOP
  # pauses the run until a SIGCONT (a test changes the world in between: stops the storage).
  config.debug = ml_collections.ConfigDict()
  config.debug.signal_after_step = 0
  config.debug.signal = "SIGTERM"  # SIGTERM | SIGKILL | SIGSTOP
  return config
