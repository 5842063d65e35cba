"""`covidct ensemble`: trained runs joined into one model that averages their probabilities."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from covidct.cli import main
from tests.conftest import SIZE


@pytest.fixture(scope="module")
def second_run(dummy_data_dir, tmp_path_factory):
  """Another small run at the same size: another architecture and seed, so its probabilities differ."""
  from covidct.config import resolve
  from covidct.train import train

  out = tmp_path_factory.mktemp("exp2") / "run"
  train(resolve("default", model="too_simple", epochs=1, image_size=SIZE, batch_size=4, seed=3,
                data_dir=str(dummy_data_dir)), out, verbose=0)
  return out


def test_ensemble_is_the_mean_and_exports(model_dir, second_run, dummy_data_dir, tmp_path):
  from covidct.data import split_arrays
  from covidct.runners import load_runner

  out = tmp_path / "ens"
  res = CliRunner().invoke(main, ["ensemble", str(model_dir), str(second_run), "--out", str(out)])
  assert res.exit_code == 0, res.output
  assert "ensemble of 2 models" in res.output
  config = json.loads((out / "config.json").read_text())
  assert config["image_size"] == SIZE and [m["config"]["model"] for m in config["members"]] == ["final", "too_simple"]
  res = CliRunner().invoke(main, ["compare", str(out)])
  assert res.exit_code == 0 and "| ensemble | 48 | ensemble of 2 runs | - |" in res.output, res.output

  images = split_arrays("test", str(dummy_data_dir), SIZE)["images"]
  edge = np.stack([np.zeros((SIZE, SIZE, 1), np.uint8), np.full((SIZE, SIZE, 1), 255, np.uint8)])
  images = np.concatenate([images, edge])
  a, b = load_runner(model_dir)(images), load_runner(second_run)(images)
  assert np.abs(a - b).max() > 1e-3  # the members disagree, so the mean is a real test
  np.testing.assert_allclose(load_runner(out)(images), (a + b) / 2, atol=1e-6)
  np.testing.assert_allclose(load_runner(out / "model.keras")(images), (a + b) / 2, atol=1e-6)

  exported = tmp_path / "export"
  res = CliRunner().invoke(main, ["export", str(out), "--out", str(exported), "--data-dir", str(dummy_data_dir),
                                  "--formats", "onnx_float32", "--bootstrap", "20"])
  assert res.exit_code == 0, res.output
  manifest = json.loads((exported / "manifest.json").read_text())
  assert manifest["parity_passed"] and len(manifest["training_config"]["members"]) == 2


def test_ensemble_errors(model_dir, dummy_data_dir, tmp_path):
  from covidct.config import resolve
  from covidct.train import train

  def run(*args):
    res = CliRunner().invoke(main, ["ensemble", *map(str, args)])
    assert res.exit_code == 1 and "Traceback" not in res.output and res.output.count("\n") == 1, res.output
    return res.output

  assert "at least two models" in run(model_dir, "--out", tmp_path / "one")
  (tmp_path / "empty").mkdir()
  assert "has no model.keras" in run(model_dir, tmp_path / "empty", "--out", tmp_path / "e")
  other = tmp_path / "other"
  train(resolve("default", model="too_simple", epochs=1, image_size=32, batch_size=4, data_dir=str(dummy_data_dir)),
        other, verbose=0)
  assert "one input size" in run(model_dir, other, "--out", tmp_path / "e")
  (tmp_path / "taken").mkdir()
  assert "exists" in run(model_dir, model_dir, "--out", tmp_path / "taken")
  assert not (tmp_path / "one").exists() and not (tmp_path / "e").exists()  # nothing half-written
