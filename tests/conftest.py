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
# The other configs' dummy_data (tools/make_dummy_data.py): dummy_data/<config>/ and dummy_data/<config>_files.tsv.
DUMMY_SOURCE_COUNTS = {
    "cc_ccii": {"train": {"COVID": 2, "NonCOVID": 3}, "validation": {"COVID": 1, "NonCOVID": 1},
                "test": {"COVID": 1, "NonCOVID": 2}},
    "covid_ct_md": {"test": {"COVID": 2, "NonCOVID": 2}},
}
DUMMY_MANIFESTS = {name: DUMMY_DATA / f"{name}_files.tsv" for name in DUMMY_SOURCE_COUNTS}
SOURCE_FOLDERS = {"covid_ct": COVID_CT, "cc_ccii": SHARED / "cc-ccii", "covid_ct_md": SHARED / "covid-ct-md"}


def _need_shared():
  if not (COVID_CT / "Images-processed" / "CT_COVID.zip").exists():
    pytest.skip(reason=f"the local COVID-CT copy is not at {COVID_CT} (set COVIDCT_SHARED to the shared folder)")


@pytest.fixture(scope="session")
def sources_data_dir(full_data_dir) -> pathlib.Path:
  """The real data dir of full_data_dir with the other sources built into it too (CC-CCII, COVID-CT-MD)."""
  from covidct import dataset

  for name in ("cc_ccii", "covid_ct_md"):
    if not (SOURCE_FOLDERS[name] / "SHA256SUMS").exists():
      pytest.skip(reason=f"the local {name} copy is not at {SOURCE_FOLDERS[name]}")
    dataset.build(manual_dir=str(SOURCE_FOLDERS[name]), data_dir=str(full_data_dir), source=name)
  return full_data_dir


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
  monkeypatch.setattr(mod.Builder, "METADATA_HASHES", DUMMY_DATA / "metadata_hashes.tsv")
  monkeypatch.setattr(mod.Builder, "SOURCE_COUNTS", DUMMY_SOURCE_COUNTS)
  monkeypatch.setattr(mod.Builder, "SOURCE_MANIFESTS", DUMMY_MANIFESTS)
  return mod.Builder


@pytest.fixture
def manual_copy(tmp_path) -> pathlib.Path:
  """A writable copy of dummy_data, to damage in a test."""
  dst = tmp_path / "manual"
  shutil.copytree(DUMMY_DATA, dst)
  return dst


@pytest.fixture(scope="session")
def dummy_data_dir(tmp_path_factory) -> pathlib.Path:
  """dummy_data prepared as a TFDS dataset (12 tiny images), and its other configs (cc_ccii: 10 slices; covid_ct_md:
  4), for fast pipeline and training tests."""
  from covidct import dataset

  data_dir = tmp_path_factory.mktemp("tfds_dummy")
  with dummy_sources():
    dataset.build(manual_dir=str(DUMMY_DATA), data_dir=str(data_dir))
    for name in DUMMY_SOURCE_COUNTS:
      dataset.build(manual_dir=str(DUMMY_DATA / name), data_dir=str(data_dir), source=name)
  return data_dir


def dummy_sources():
  """A context in which the builder expects dummy_data's counts, hashes and manifests (every config)."""
  import contextlib
  from unittest import mock

  from tfds_covidct.covid_ct import covid_ct_dataset_builder as mod

  stack = contextlib.ExitStack()
  for name, value in (("EXPECTED_COUNTS", DUMMY_COUNTS), ("IMAGE_HASHES", DUMMY_DATA / "image_hashes.tsv"),
                      ("METADATA_HASHES", DUMMY_DATA / "metadata_hashes.tsv"),
                      ("SOURCE_COUNTS", DUMMY_SOURCE_COUNTS), ("SOURCE_MANIFESTS", DUMMY_MANIFESTS)):
    stack.enter_context(mock.patch.object(mod.Builder, name, value))
  return stack


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
