"""covidct predict and the runners on exported copies: good files scored, bad ones reported; ensembles and TTA."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest
from click.testing import CliRunner

from covidct.cli import main
from covidct.data import split_arrays
from covidct.runners import load_runner
from tests.conftest import DUMMY_DATA, SIZE


def test_predict_scores_good_files_and_reports_bad_ones(exported, tmp_path):
  with zipfile.ZipFile(DUMMY_DATA / "Images-processed" / "CT_NonCOVID.zip") as zf:
    (tmp_path / "a.jpg").write_bytes(zf.read("CT_NonCOVID/0.jpg"))
    (tmp_path / "b.png").write_bytes(zf.read("CT_NonCOVID/14.png"))
  (tmp_path / "bad.png").write_bytes(b"not an image")
  files = [str(tmp_path / n) for n in ("a.jpg", "bad.png", "b.png")]
  for artifact in ("model_float32.tflite", "model_float32.onnx", "saved_model"):
    res = CliRunner().invoke(main, ["predict", *files, "--model", str(exported / artifact), "--json"])
    assert res.exit_code == 1
    out = json.loads(res.stdout)
    assert [r["file"] for r in out["results"]] == [files[0], files[2]]
    assert all(0 <= r["probability"] <= 1 and r["label"] in ("COVID", "NonCOVID") for r in out["results"])
    assert "bad.png: not a readable image" in res.stderr
    manifest = json.loads((exported / "manifest.json").read_text())
    assert out["results"][0]["threshold"] == pytest.approx(manifest["operating_threshold"]["value"])


def test_ensemble_and_flip_tta(model_dir, exported, dummy_data_dir, tmp_path):
  from covidct.runners import EnsembleRunner, FlipTTARunner

  images = split_arrays("test", str(dummy_data_dir), SIZE)["images"]
  a = load_runner(exported / "model_float32.onnx")
  b = load_runner(exported / "model_float32.tflite")
  np.testing.assert_allclose(EnsembleRunner([a, b])(images), (a(images) + b(images)) / 2, atol=1e-7)
  np.testing.assert_allclose(FlipTTARunner(a)(images), (a(images) + a(images[:, :, ::-1])) / 2, atol=1e-7)
  res = CliRunner().invoke(main, ["evaluate", str(model_dir), str(exported / "model_float32.onnx"), "--tta",
                                  "--data-dir", str(dummy_data_dir), "--bootstrap", "10"])
  assert res.exit_code == 1 and "needs --out" in res.stderr
  res = CliRunner().invoke(main, ["evaluate", str(model_dir), str(exported / "model_float32.onnx"), "--tta",
                                  "--data-dir", str(dummy_data_dir), "--bootstrap", "10", "--out", str(tmp_path / "e")])
  assert res.exit_code == 0, res.output
  report = json.loads((tmp_path / "e" / "report.json").read_text())
  assert len(report["model"]) == 2 and report["test_time_augmentation"] == "horizontal flip"
