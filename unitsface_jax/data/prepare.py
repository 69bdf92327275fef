"""Convert a face dataset to TFDS ArrayRecord: ``python -m unitsface_jax.data.prepare``.

  python -m unitsface_jax.data.prepare --source=/data/faces_emore --out=gs://bucket/tfds \
      --name=ms1mv2

``--source`` is an insightface RecordIO folder or an image folder (local or ``gs://``); the
result lands in ``<out>/face_dataset/<name>/1.0.0`` and is read with
``sources.TFDSSource(<that folder>)``. TFDS shows a progress bar; the end prints the number of
images and classes written.
"""

from __future__ import annotations

import os

from absl import app
from absl import flags


def prepare(source_dir, out, name: str = "custom", skip_bad_records: bool = False) -> dict:
  """Builds the ArrayRecord dataset; returns its folder and counts."""
  # Imported here so `--help` answers without loading TFDS.
  from unitsface_jax.data import sources  # pylint: disable=g-import-not-at-top
  from unitsface_jax.data import tfds_builder  # pylint: disable=g-import-not-at-top

  source = sources.make_source("auto", source_dir)
  builder = tfds_builder.FaceDataset(source=source, skip_bad_records=skip_bad_records,
                                     config=name, data_dir=os.fspath(out),
                                     file_format="array_record")
  builder.download_and_prepare()
  written = builder.info.splits["train"].num_examples
  return {"dir": tfds_builder.builder_dir(out, name), "images": int(written),
          "classes": int(source.num_classes), "skipped": len(builder.skipped)}


def _define_flags() -> None:
  # Defined only when run as a program, so importing this module defines no global flags.
  flags.DEFINE_string("source", None, "RecordIO folder or image folder to convert.")
  flags.DEFINE_string("out", None, "TFDS data_dir to write (local or gs://).")
  flags.DEFINE_enum(
      "name", "custom",
      ["casia_webface", "ms1mv2", "ms1mv3", "glint360k", "webface", "custom"],
      "Builder config name (names the output folder and the description).")
  flags.DEFINE_bool("skip_bad_records", False,
                    "Log and leave out bad records instead of stopping.")
  flags.mark_flags_as_required(["source", "out"])


def main(argv):
  del argv
  f = flags.FLAGS
  result = prepare(f.source, f.out, f.name, f.skip_bad_records)
  print(f"wrote {result['images']} images of {result['classes']} classes to {result['dir']}"
        + (f" ({result['skipped']} bad records skipped)" if result["skipped"] else ""))


if __name__ == "__main__":
  _define_flags()
  app.run(main)
