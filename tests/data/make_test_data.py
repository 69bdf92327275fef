"""Rebuilds tests/data from the project's shared data folder (run once; the result is committed).

  python tests/data/make_test_data.py /path/to/shared/data

Copies the small real-MXNet files byte for byte (``orl_112``, ``orl20_im2rec``, the MANIFEST
with the SHA-256 of every real file), the source images the pixel tests compare against, and
writes ``lfw62_112_head4``: the first 4 identities of ``lfw62_112`` in the same header-last
layout, re-framed by our own writer from the real records' JPEG bytes (the real file is 3.5 MB).
The two corrupted copies are not stored: the tests rebuild them from ``orl_112`` and check them
against the MANIFEST checksums of the real corrupted files.
"""

import csv
import pathlib
import shutil
import sys

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from unitsface_jax.data import recordio  # pylint: disable=g-import-not-at-top,wrong-import-position

ORL_IDENTITIES = ("s1", "s3", "s25")  # orl_112 keys 1-10 and 21-30, and the badmagic key 250
LFW_IDENTITIES = 4


def main(shared: pathlib.Path) -> None:
  formats = shared / "formats"
  for name, files in (("orl_112", ("train.rec", "train.idx", "property", "sources.tsv")),
                      ("orl20_im2rec", ("train.rec", "train.idx", "train.lst"))):
    (HERE / name).mkdir(exist_ok=True)
    for f in files:
      shutil.copyfile(formats / name / f, HERE / name / f)
  shutil.copyfile(formats / "MANIFEST.json", HERE / "MANIFEST.json")
  for ident in ORL_IDENTITIES:
    shutil.copytree(shared / "orl_faces" / ident, HERE / "orl_faces" / ident, dirs_exist_ok=True)

  reader = recordio.open_rec(formats / "lfw62_112")
  with open(formats / "lfw62_112" / "sources.tsv") as f:
    rows = [r for r in csv.DictReader(f, delimiter="\t") if int(r["label"]) < LFW_IDENTITIES]
  examples = []
  for row in rows:
    header, image = reader.read_header(int(row["record"]))
    assert recordio.class_label(header) == int(row["label"])
    examples.append((int(row["label"]), image))
  out = HERE / "lfw62_112_head4"
  recordio.write_insightface(out, examples, LFW_IDENTITIES, header_first=False)
  with open(out / "sources.tsv", "w") as f:
    f.write("record\tlabel\tsource\n")
    f.writelines(f"{r['record']}\t{r['label']}\t{r['source']}\n" for r in rows)
  # One source image per identity for the pixel check.
  for label in range(LFW_IDENTITIES):
    src = rows[label * 10]["source"]
    dst = HERE / src
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(shared / src, dst)
  # An IJB-C "loose crop" (byte-identical to Andre_Agassi_0002.jpg, record 32) with its five
  # landmarks in ijbc_mini/meta: the alignment test warps it and compares with record 32.
  (HERE / "ijbc_mini").mkdir(exist_ok=True)
  shutil.copyfile(formats / "ijbc_mini" / "loose_crop" / "27.jpg", HERE / "ijbc_mini" / "27.jpg")


if __name__ == "__main__":
  main(pathlib.Path(sys.argv[1]))
