r"""Command line evaluation: verification sets, IJB-B/C or MegaFace, from a model or features.

  python -m unitsface_jax.evaluate --protocol=verification \
      --data=lfw.bin,cfp_fp.bin,agedb_30.bin --params=backbone.pth
  python -m unitsface_jax.evaluate --protocol=verification --data=lfw.bin --workdir=/runs/casia
  python -m unitsface_jax.evaluate --protocol=verification --data=lfw.bin --features=lfw.npz
  python -m unitsface_jax.evaluate --protocol=ijb --data=IJB_release/IJBC --features=ijbc.npz
  python -m unitsface_jax.evaluate --protocol=megaface --data=feature_out \
      --facescrub_list=facescrub_lst --megaface_list=megaface_lst --algo=insightface

Embeddings files (``--features``) are ``.npz`` with ``embeddings`` [N, D] (raw f(x), in the
order of the .bin images or of the IJB meta files), optionally ``embeddings_flip`` (raw
f(flip x)) and, for verification, ``issame``. Results go to ``--out``: a table on the
console, ``<protocol>.json`` and ROC PNGs. A missing or unreadable input ends the run with
one line that names it (exit status 2). On the CPU the run is tuned
(``unitsface_jax.cpu_tuning``) unless ``--nocpu_tuning`` or ``UNITSFACE_NO_XLA_FLAGS=1``.
"""

from __future__ import annotations

import os

import numpy as np
from absl import app, flags, logging
from etils import epath

from unitsface_jax import cli, errors, storage
from unitsface_jax.evaluation import extract, ijb, megaface, report, verification

FLAGS = flags.FLAGS
flags.DEFINE_enum("protocol", "verification", ["verification", "ijb", "megaface"],
                  "Evaluation protocol.")
flags.DEFINE_list("data", [], "verification: .bin files or LFW-style image folders (with "
                  "--pairs); ijb: the IJB folder (with meta/ and loose_crop/); megaface: the "
                  "devkit feature folder.")
flags.DEFINE_string("workdir", None, "A training run: its latest checkpoint's backbone.")
flags.DEFINE_string("features", None, "An .npz of precomputed embeddings (no model needed).")
flags.DEFINE_string("params", None, "Model weights (.npz/.safetensors/.pth, e.g. insightface's "
                    "backbone.pth).")
flags.DEFINE_string("model", None, "Backbone name; by default the one stored with the weights "
                    "or inferred from their key names.")
flags.DEFINE_string("out", "eval_results", "Output folder for JSON and ROC plots.")
flags.DEFINE_integer("batch_size", 128, "Global batch for embedding extraction.")
flags.DEFINE_integer("nfolds", 10, "Folds for verification accuracy.")
flags.DEFINE_string("pairs", None, "pairs.txt for image-folder verification data.")
flags.DEFINE_list("folds", [], "Folds (1-based) of --pairs to use; default all.")
flags.DEFINE_enum("crop", "center", ["center", "aligned"], "Image-folder crop (see load_pairs).")
flags.DEFINE_enum("target", "IJBC", ["IJBB", "IJBC"], "IJB target.")
flags.DEFINE_bool("norm_score", True, "IJB N1: keep the feature norm as a quality weight.")
flags.DEFINE_bool("detector_score", True, "IJB D1: weight features by faceness.")
flags.DEFINE_bool("flip_test", True, "Flip fusion f(x) + f(flip x).")
flags.DEFINE_integer("decode_workers", -1, "IJB: processes that decode and align the images "
                     "while the model embeds; -1: one per CPU core, up to 8; 0: threads in "
                     "this process.")
flags.DEFINE_string("crop_cache", None, "IJB: a folder (local or gs://) for a cache of the "
                    "aligned crops, so evaluating another model skips decode and align "
                    "(IJB-C at 112x112: 17.7 GB).")
flags.DEFINE_string("facescrub_list", None, "MegaFace devkit FaceScrub list.")
flags.DEFINE_string("megaface_list", None, "MegaFace devkit distractor list.")
flags.DEFINE_string("algo", "insightface", "MegaFace feature file suffix.")
flags.DEFINE_string("facescrub_noises", None, "Published FaceScrub noise list.")
flags.DEFINE_string("megaface_noises", None, "Published MegaFace noise list.")
flags.DEFINE_integer("num_distractors", None, "Use only the first N distractors.")
cli.define_flags()
_PATH_FLAGS = ("data", "workdir", "features", "params", "out", "pairs", "facescrub_list",
               "megaface_list", "facescrub_noises", "megaface_noises", "crop_cache")


class InputError(errors.UserError):
  """A model input the run cannot use (weights or a checkpoint of another architecture)."""


def load_model_apply_fn(model_name: str | None, params_path: str) -> extract.ApplyFn:
  """A pure apply_fn of the backbone stored in ``params_path`` (.npz/.safetensors/.pth).

  The architecture is the one stored with the weights, else ``model_name``, else inferred
  from the PyTorch key names (so insightface's ``backbone.pth`` works as it is).
  """
  from unitsface_jax import export  # pylint: disable=g-import-not-at-top
  try:
    name, model = export.load_params(params_path, model_name)
  except ValueError as e:
    raise InputError(str(e)) from e
  logging.info("loaded %s from %s", name, params_path)
  model.eval()
  return extract.nnx_apply_fn(model)


def _load_npz(path: str) -> dict[str, np.ndarray]:
  # allow_pickle=False: an .npz holding object arrays is refused, never unpickled.
  with np.load(epath.Path(path).open("rb"), allow_pickle=False) as z:
    return {k: z[k] for k in z.files}


def run_verification(apply_fn) -> dict:
  results = {}
  if FLAGS.features:
    if len(FLAGS.data) > 1:
      raise app.UsageError("--features holds one set; pass one --data entry (or none)")
    z = _load_npz(FLAGS.features)
    if "issame" in z:
      issame = z["issame"].astype(bool)
    elif FLAGS.data:
      issame = verification.read_bin(FLAGS.data[0])[1]
    else:
      raise app.UsageError("the .npz has no issame; pass the .bin as --data")
    name = epath.Path(FLAGS.data[0]).stem if FLAGS.data else epath.Path(FLAGS.features).stem
    flip = z.get("embeddings_flip") if FLAGS.flip_test else None
    results[name] = verification.verification_metrics(z["embeddings"], issame, emb_flip=flip,
                                                      nfolds=FLAGS.nfolds)
  else:
    for entry in FLAGS.data:
      path = epath.Path(entry)
      if path.is_dir():
        if not FLAGS.pairs:
          raise app.UsageError(f"{entry} is a folder; pass --pairs=pairs.txt")
        folds = [int(f) for f in FLAGS.folds] or None
        data = verification.load_pairs(path, FLAGS.pairs, crop=FLAGS.crop, folds=folds,
                                       name=path.name)
      else:
        data = verification.load_bin(path)
      results[data.name] = verification.evaluate_set(
          apply_fn, data, batch_size=FLAGS.batch_size, nfolds=FLAGS.nfolds,
          flip=FLAGS.flip_test)
  cols = ["accuracy", "std", "tar_at_far_0.001"]
  print(report.format_table(results, cols))
  print(report.format_table({k: {"xnorm": v["xnorm"]} for k, v in results.items()},
                            ["xnorm"], percent=False))
  report.plot_roc({k: (v["roc_fpr"], v["roc_tpr"]) for k, v in results.items()},
                  epath.Path(FLAGS.out) / "verification_roc.png", title="Verification ROC",
                  xlim=(1e-4, 1.0))
  return results


def run_ijb(apply_fn) -> dict:
  if len(FLAGS.data) != 1:
    raise app.UsageError("--data must name one IJB folder")
  root = FLAGS.data[0]
  kw = dict(use_norm_score=FLAGS.norm_score, use_detector_score=FLAGS.detector_score,
            use_flip_test=FLAGS.flip_test)
  if FLAGS.features:
    z = _load_npz(FLAGS.features)
    meta = ijb.read_meta(root, FLAGS.target)
    if z["embeddings"].shape[0] != meta.image_names.size:
      raise app.UsageError(f"{FLAGS.features}: {z['embeddings'].shape[0]} rows for "
                           f"{meta.image_names.size} images")
    res = ijb.evaluate_features(meta, z["embeddings"], z.get("embeddings_flip"), **kw)
  else:
    workers = FLAGS.decode_workers
    if workers < 0:
      workers = min(8, os.cpu_count() or 1)
    res = ijb.evaluate(apply_fn, root, FLAGS.target, batch_size=FLAGS.batch_size,
                       workers=workers, cache_dir=FLAGS.crop_cache, **kw)
  name = f"{FLAGS.target}-{res['mode']}"
  print(report.format_table({name: res["verification"]["tar_at_far"]}))
  if "identification" in res:
    ident = res["identification"]
    print(report.format_table({name: {**{k: ident[k] for k in ("rank1", "rank5", "rank10")},
                                      **{f"tpir@{k}": v for k, v in
                                         ident["tpir_at_fpir"].items()}}}))
  v = res["verification"]
  report.plot_roc({name: (v["roc_fpr"], v["roc_tpr"])},
                  epath.Path(FLAGS.out) / f"{FLAGS.target.lower()}_roc.png",
                  title=f"ROC on {FLAGS.target}", ylim=(0.3, 1.0), xlim=(1e-6, 0.1))
  return res


def run_megaface() -> dict:
  if len(FLAGS.data) != 1 or not FLAGS.facescrub_list or not FLAGS.megaface_list:
    raise app.UsageError("megaface needs --data=FEATURE_DIR, --facescrub_list, --megaface_list")
  res = megaface.evaluate_devkit(FLAGS.data[0], FLAGS.facescrub_list, FLAGS.megaface_list,
                                 algo=FLAGS.algo, facescrub_noises=FLAGS.facescrub_noises,
                                 megaface_noises=FLAGS.megaface_noises,
                                 num_distractors=FLAGS.num_distractors)
  print(report.format_table({"megaface": {"rank1": res["rank1"],
                                          "tar@1e-6": res["tar_at_far_1e-06"]}}))
  return res


def _model_apply_fn() -> extract.ApplyFn:
  if FLAGS.workdir:
    from unitsface_jax import checkpoint  # pylint: disable=g-import-not-at-top
    try:
      _, model = checkpoint.backbone_from_workdir(FLAGS.workdir)
    except ValueError as e:
      raise InputError(str(e)) from e
    return extract.nnx_apply_fn(model)
  if FLAGS.params:
    return load_model_apply_fn(FLAGS.model, FLAGS.params)
  raise app.UsageError("pass --workdir (a training run), --params (a model) or --features "
                       "(precomputed embeddings)")


# A missing or unreadable input: one line that names it, exit status 2, instead of a
# traceback or the flags' help.
@cli.command(usage_errors=(OSError,))
def main(argv) -> int:
  del argv
  if not FLAGS.data:
    raise app.UsageError("--data is required")
  storage.require_gcs_all({f"--{name}": FLAGS[name].value for name in _PATH_FLAGS})
  apply_fn = None
  if FLAGS.protocol != "megaface" and not FLAGS.features:
    apply_fn = _model_apply_fn()
  if FLAGS.protocol == "verification":
    res = run_verification(apply_fn)
  elif FLAGS.protocol == "ijb":
    res = run_ijb(apply_fn)
  else:
    res = run_megaface()
  path = report.write_json(FLAGS.out, FLAGS.protocol, res)
  logging.info("wrote %s", path)
  print(f"results: {path}")
  return 0


if __name__ == "__main__":
  cli.run(main)
