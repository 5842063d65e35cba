"""Building and describing the prepared `covid_ct` TFDS dataset."""

from __future__ import annotations

import os

from covidct.errors import CovidctError

DATASET = "covid_ct"
SPLITS = ("train", "validation", "test")


def _builder(data_dir: str | None):
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

  import tfds_covidct  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import

  return tfds.builder(DATASET, data_dir=data_dir)


def build(manual_dir: str | None = None, data_dir: str | None = None):
  """Prepares `covid_ct` into `data_dir` (TFDS's default when None); returns the builder.

  With `manual_dir`, reads the upstream files from there; without, downloads them.
  A failed build leaves nothing that `tfds.load` would pick up (TFDS writes to a temporary folder).
  """
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

  if manual_dir is not None and not os.path.isdir(manual_dir):
    raise CovidctError(
        f"--manual-dir {manual_dir} does not exist; point it at a folder with the upstream COVID-CT files "
        "(Images-processed/, Data-split/, COVID-CT-MetaInfo.xlsx, NonCOVID-CT-MetaInfo.csv).")
  builder = _builder(data_dir)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  return builder


def load_builder(data_dir: str | None = None):
  """The prepared builder; a clear error when the dataset was never built there."""
  builder = _builder(data_dir)
  if not builder.is_prepared():
    where = data_dir or "the default TFDS data dir"
    raise CovidctError(
        f"the covid_ct dataset is not prepared in {where}; build it first: "
        f"covidct data build --manual-dir PATH/TO/covid-ct{' --data-dir ' + data_dir if data_dir else ''}")
  return builder


def describe(data_dir: str | None = None) -> dict:
  """Per split: examples, per class counts, patients, image height/width range."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

  builder = load_builder(data_dir)
  names = builder.info.features["label"].names
  out = {"dataset": DATASET, "version": str(builder.info.version), "data_dir": str(builder.data_dir), "splits": {}}
  for split in SPLITS:
    ds = builder.as_dataset(split=split, decoders={"image": tfds.decode.SkipDecoding()})
    ds = ds.map(lambda e: {"shape": tf.shape(tf.io.decode_png(e["image"])), "label": e["label"],
                           "patient_id": e["patient_id"]}, num_parallel_calls=tf.data.AUTOTUNE)
    counts, patients, heights, widths = {n: 0 for n in names}, set(), [], []
    for e in tfds.as_numpy(ds):
      counts[names[int(e["label"])]] += 1
      patients.add(e["patient_id"].decode())
      heights.append(int(e["shape"][0]))
      widths.append(int(e["shape"][1]))
    out["splits"][split] = {
        "examples": sum(counts.values()), "per_class": counts, "patients": len(patients),
        "height": [min(heights), max(heights)], "width": [min(widths), max(widths)],
    }
  return out
