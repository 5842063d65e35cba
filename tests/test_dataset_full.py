"""The full dataset, built from the local upstream copy (../shared/covid-ct)."""

from __future__ import annotations

import pytest

import json
import os
import subprocess
import sys

import numpy as np
import tensorflow_datasets as tfds

import tfds_covidct  # noqa: F401  registers covid_ct

pytestmark = pytest.mark.slow  # reads the full dataset (built once per session)

OFFICIAL = {
    "train": {"COVID": 191, "NonCOVID": 234},
    "validation": {"COVID": 60, "NonCOVID": 58},
    "test": {"COVID": 98, "NonCOVID": 105},
}


def _examples(data_dir, split):
  return list(tfds.as_numpy(tfds.load("covid_ct", split=split, data_dir=str(data_dir))))


def test_counts_balance_patients_dtype(full_data_dir):
  patients = {}
  for split, want in OFFICIAL.items():
    examples = _examples(full_data_dir, split)
    labels = np.array([e["label"] for e in examples])
    assert {"COVID": int((labels == 1).sum()), "NonCOVID": int((labels == 0).sum())} == want
    assert all(e["patient_id"] for e in examples), "every image has a patient id"
    assert len({e["filename"] for e in examples}) == len(examples)
    for e in examples:
      assert e["image"].dtype == np.uint8 and e["image"].ndim == 3 and e["image"].shape[2] == 1
      assert 61 <= e["image"].shape[0] <= 1225 and 115 <= e["image"].shape[1] <= 1671
    patients[split] = {e["patient_id"] for e in examples}
  assert not patients["train"] & patients["validation"]
  assert not patients["train"] & patients["test"]
  assert not patients["validation"] & patients["test"]
  modes = {e["original_mode"].decode() for e in _examples(full_data_dir, "train")}
  assert modes == {"L", "RGB", "RGBA"}


def test_fresh_process_loads_test_split(full_data_dir):
  code = (
      "import json, tensorflow_datasets as tfds, tfds_covidct\n"
      f"ds = tfds.load('covid_ct', split='test', data_dir={str(full_data_dir)!r})\n"
      "ex = list(tfds.as_numpy(ds))\n"
      "print(json.dumps({'n': len(ex), 'covid': int(sum(e['label'] for e in ex)),"
      " 'no_patient': sum(1 for e in ex if not e['patient_id'])}))\n"
  )
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env, timeout=300)
  assert json.loads(out.stdout.strip().splitlines()[-1]) == {"n": 203, "covid": 98, "no_patient": 0}


def test_supervised_keys(full_data_dir):
  ds = tfds.load("covid_ct", split="validation", data_dir=str(full_data_dir), as_supervised=True)
  image, label = next(iter(ds))
  assert image.dtype.name == "uint8" and image.shape[-1] == 1 and label.dtype.name == "int64"
