"""The bundled demo faces: ORL as an insightface RecordIO set plus a verification ``.bin``.

``demo_path()`` is the folder ``unitsface_jax/data/demo/`` shipped with the package:
``train.rec``/``train.idx``/``property`` (40 identities x 8 images, 112x112 RGB JPEG) and
``orl_val.bin``, an insightface verification bin (pickle of ``(list of JPEG bytes, list of
bool)``) of pairs from the 2 held-out images per identity. ``python -m
unitsface_jax.data.demo --orl=<orl_faces> --out=<folder>`` rebuilds it from the ORL PGMs.
"""

from __future__ import annotations

import pathlib
import pickle

import numpy as np
from absl import app
from absl import flags

from unitsface_jax.data import recordio

TRAIN_IMAGES = (1, 2, 3, 4, 5, 6, 7, 8)  # per identity; images 9 and 10 are held out
HELD_OUT = (9, 10)
JPEG_QUALITY = 90


def demo_path() -> pathlib.Path:
  """The folder of the bundled demo dataset (a ``RecordIOSource`` directory)."""
  return pathlib.Path(__file__).resolve().parent / "demo"


def demo_bin_path() -> pathlib.Path:
  """The demo's verification ``.bin``."""
  return demo_path() / "orl_val.bin"


def _orl_jpeg(path: pathlib.Path, size: int) -> bytes:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  import simplejpeg  # pylint: disable=g-import-not-at-top
  with Image.open(path) as im:
    grey = im.convert("L").resize((size, size), Image.Resampling.BICUBIC)
  rgb = np.repeat(np.asarray(grey)[:, :, None], 3, axis=2)
  return simplejpeg.encode_jpeg(np.ascontiguousarray(rgb), quality=JPEG_QUALITY,
                                colorspace="RGB")


def build_demo(orl_dir, out_dir, size: int = 112) -> dict[str, int]:
  """Builds the demo set from ORL's ``s<k>/<i>.pgm`` (k = 1..40, i = 1..10).

  Identity ``s<k>`` gets label ``k - 1``. Verification pairs: for every identity, its two
  held-out images (same); and its first held-out image with the next identity's second one
  (different), so 40 + 40 pairs.

  Returns:
    Counts of train images, classes and pairs.
  """
  orl_dir, out_dir = pathlib.Path(orl_dir), pathlib.Path(out_dir)
  num_classes = 40
  train = [(k - 1, _orl_jpeg(orl_dir / f"s{k}" / f"{i}.pgm", size))
           for k in range(1, num_classes + 1) for i in TRAIN_IMAGES]
  recordio.write_insightface(out_dir, train, num_classes, image_size=(size, size))
  held = {k: [_orl_jpeg(orl_dir / f"s{k}" / f"{i}.pgm", size) for i in HELD_OUT]
          for k in range(1, num_classes + 1)}
  bins, issame = [], []
  for k in range(1, num_classes + 1):
    bins += [held[k][0], held[k][1]]
    issame.append(True)
  for k in range(1, num_classes + 1):
    bins += [held[k][0], held[k % num_classes + 1][1]]
    issame.append(False)
  # Repeated JPEGs are the same bytes objects, so pickle stores each once (memo references).
  with open(out_dir / "orl_val.bin", "wb") as f:
    pickle.dump((bins, issame), f, protocol=4)
  return {"images": len(train), "classes": num_classes, "pairs": len(issame)}


def main(argv):
  del argv
  counts = build_demo(flags.FLAGS.orl, flags.FLAGS.out)
  print(f"wrote {flags.FLAGS.out}: {counts}")


if __name__ == "__main__":
  # Flags are defined only when run as a program, so importing this module defines none.
  flags.DEFINE_string("orl", None, "ORL faces folder (s1..s40 of PGM images).")
  flags.DEFINE_string("out", str(demo_path()), "Output folder.")
  flags.mark_flag_as_required("orl")
  app.run(main)
