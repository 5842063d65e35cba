"""Shared fixtures: the local upstream copy in ../shared, the synthetic dummy_data, one full build per session."""

from __future__ import annotations

import os
import pathlib
import shutil

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get("COVIDCT_SHARED", ROOT.parent / "shared"))
COVID_CT = SHARED / "covid-ct"
KERAS_WEIGHTS = SHARED / "keras-weights"
DUMMY_DATA = ROOT / "tfds_covidct" / "covid_ct" / "dummy_data"
DUMMY_COUNTS = {
    "train": {"COVID": 3, "NonCOVID": 3},
    "validation": {"COVID": 1, "NonCOVID": 2},
    "test": {"COVID": 2, "NonCOVID": 2},
}


def _need_shared():
  if not (COVID_CT / "Images-processed" / "CT_COVID.zip").exists():
    pytest.skip(reason=f"the local COVID-CT copy is not at {COVID_CT} (set COVIDCT_SHARED to the shared folder)")


@pytest.fixture(scope="session")
def full_data_dir(tmp_path_factory) -> pathlib.Path:
  """The real dataset, built once per session from ../shared/covid-ct into a temporary data dir."""
  _need_shared()
  from covidct import dataset

  data_dir = tmp_path_factory.mktemp("tfds_full")
  dataset.build(manual_dir=str(COVID_CT), data_dir=str(data_dir))
  return data_dir


@pytest.fixture
def dummy_builder(monkeypatch):
  """The builder class, set to expect the dummy_data counts and hashes instead of the official ones."""
  from tfds_covidct.covid_ct import covid_ct_dataset_builder as mod

  monkeypatch.setattr(mod.Builder, "EXPECTED_COUNTS", DUMMY_COUNTS)
  monkeypatch.setattr(mod.Builder, "IMAGE_HASHES", DUMMY_DATA / "image_hashes.tsv")
  return mod.Builder


@pytest.fixture
def manual_copy(tmp_path) -> pathlib.Path:
  """A writable copy of dummy_data, to damage in a test."""
  dst = tmp_path / "manual"
  shutil.copytree(DUMMY_DATA, dst)
  return dst


@pytest.fixture(scope="session")
def dummy_data_dir(tmp_path_factory) -> pathlib.Path:
  """dummy_data prepared as a TFDS dataset (12 tiny images), for fast pipeline and training tests."""
  from unittest import mock

  from covidct import dataset
  from tfds_covidct.covid_ct import covid_ct_dataset_builder as mod

  data_dir = tmp_path_factory.mktemp("tfds_dummy")
  with mock.patch.object(mod.Builder, "EXPECTED_COUNTS", DUMMY_COUNTS), \
       mock.patch.object(mod.Builder, "IMAGE_HASHES", DUMMY_DATA / "image_hashes.tsv"):
    dataset.build(manual_dir=str(DUMMY_DATA), data_dir=str(data_dir))
  return data_dir


SIZE = 48


@pytest.fixture(scope="session")
def model_dir(dummy_data_dir, tmp_path_factory):
  """A small `final` model (48x48) trained for one epoch on dummy data."""
  from covidct.config import resolve
  from covidct.train import train

  out = tmp_path_factory.mktemp("exp") / "run"
  train(resolve("default", epochs=1, image_size=SIZE, batch_size=4, data_dir=str(dummy_data_dir)), out, verbose=0)
  return out


@pytest.fixture(scope="session")
def exported(model_dir, dummy_data_dir, tmp_path_factory):
  """Its float exports (TFLite float32/float16, ONNX float32) with parity report and manifest."""
  from click.testing import CliRunner

  from covidct.cli import main

  out = tmp_path_factory.mktemp("export") / "artifacts"
  res = CliRunner().invoke(main, ["export", str(model_dir), "--out", str(out), "--data-dir", str(dummy_data_dir),
                                  "--formats", "tflite_float32,tflite_float16,onnx_float32", "--bootstrap", "20"])
  assert res.exit_code == 0, res.output
  return out
