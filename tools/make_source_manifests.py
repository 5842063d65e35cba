"""Writes the file manifests of the `covid_ct/cc_ccii` and `covid_ct/covid_ct_md` configs (run once; committed).

    python tools/make_source_manifests.py ../shared

Each manifest lists every file of its source as `path<TAB>split<TAB>sha256`, the hashes taken from the source's own
`SHA256SUMS` after checking them against the files. CC-CCII is split here, once, by patient: patients are grouped by
(class, patient id), as its README asks, shuffled with a fixed seed within each diagnosis (normal, common pneumonia,
COVID) and cut 65 / 15 / 20 into train / validation / test, so every split holds every diagnosis and no patient is in
two splits. COVID-CT-MD is a test split only (an external site). Its clinical table is listed too (hashed like an
image), since the builder reads ages and sexes from it. The builder asserts these lists; rerunning this script with
the same inputs writes the same files.
"""

from __future__ import annotations

import collections
import hashlib
import pathlib
import sys

import numpy as np

OUT = pathlib.Path(__file__).resolve().parents[1] / "tfds_covidct" / "covid_ct"
SPLIT_SEED = 20261202
FRACTIONS = (("train", 0.65), ("validation", 0.15), ("test", 0.20))


def _sums(root: pathlib.Path) -> dict[str, str]:
  sums = {}
  for line in (root / "SHA256SUMS").read_text().splitlines():
    if line.strip():
      digest, path = line.split(maxsplit=1)
      path = path.strip().removeprefix("./")
      actual = hashlib.sha256((root / path).read_bytes()).hexdigest()
      if actual != digest:
        sys.exit(f"{root / path}: SHA-256 {actual} is not the {digest} of {root / 'SHA256SUMS'}")
      sums[path] = digest
  return sums


def cc_ccii_split(paths: list[str]) -> dict[str, str]:
  """path -> split, by (class, patient id), stratified by diagnosis."""
  patients = collections.defaultdict(set)  # diagnosis -> {patient key}
  for path in paths:
    stem = pathlib.PurePosixPath(path).name
    cls, pid = stem.split("_")[:2]
    patients[cls].add(f"{cls}_{pid}")
  rng = np.random.default_rng(SPLIT_SEED)
  split_of = {}
  for cls in sorted(patients):
    keys = sorted(patients[cls])
    order = [keys[i] for i in rng.permutation(len(keys))]
    n_val = round(len(keys) * FRACTIONS[1][1])
    n_test = round(len(keys) * FRACTIONS[2][1])
    n_train = len(keys) - n_val - n_test
    for i, key in enumerate(order):
      split_of[key] = "train" if i < n_train else "validation" if i < n_train + n_val else "test"
  return {p: split_of["_".join(pathlib.PurePosixPath(p).name.split("_")[:2])] for p in paths}


def _write(name: str, rows: list[tuple[str, str, str]], header: str) -> None:
  text = header + "".join(f"{p}\t{s}\t{h}\n" for p, s, h in sorted(rows))
  (OUT / name).write_text(text)
  print(f"{OUT / name}: {len(rows)} files")


def main(shared: pathlib.Path) -> None:
  cc = _sums(shared / "cc-ccii")
  images = sorted(p for p in cc if p.endswith(".png"))
  splits = cc_ccii_split(images)
  _write("cc_ccii_files.tsv", [(p, splits[p], cc[p]) for p in images],
         "# CC-CCII (128 x 128 slices): path in the manual dir, split (by patient, fixed once by "
         "tools/make_source_manifests.py), sha256\n")
  md = _sums(shared / "covid-ct-md")
  rows = [(p, "test", h) for p, h in md.items() if p.endswith(".jpg")]
  clinical = shared / "covid-ct-md" / "meta" / "Clinical-data.csv"  # not in its SHA256SUMS: hashed here
  rows.append(("meta/Clinical-data.csv", "meta", hashlib.sha256(clinical.read_bytes()).hexdigest()))
  _write("covid_ct_md_files.tsv", rows,
         "# COVID-CT-MD (one slice per patient): path in the manual dir, split ('meta' for the clinical table), "
         "sha256\n")


if __name__ == "__main__":
  main(pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "../shared"))
