"""Training to a SavedModel, on the prepared dummy dataset (tiny images, seconds per run)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from covidct.cli import main
from covidct.config import resolve
from covidct.data import split_arrays
from covidct.errors import CovidctError
from covidct.runners import KerasRunner, SavedModelRunner, load_runner
from covidct.train import train


def _cfg(data_dir, **kw):
  base = dict(epochs=2, image_size=48, batch_size=4, data_dir=str(data_dir), seed=7)
  base.update(kw)
  return resolve("default", **base)


@pytest.fixture(scope="module")
def trained(dummy_data_dir, tmp_path_factory):
  out = tmp_path_factory.mktemp("train") / "run"
  summary = train(_cfg(dummy_data_dir), out, verbose=0)
  return out, summary


def test_output_folder(trained):
  out, summary = trained
  for name in ("saved_model/saved_model.pb", "model.keras", "config.json", "history.json", "curves.png", "logs"):
    assert (out / name).exists(), name
  cfg = json.loads((out / "config.json").read_text())
  assert cfg["image_size"] == 48 and cfg["recipe"] == "default"
  hist = json.loads((out / "history.json").read_text())
  assert len(hist["history"]["loss"]) == summary["epochs_run"] == 2
  assert 1 <= summary["best_epoch"] <= 2 and "auc" in summary["validation"]
  assert not list(out.parent.glob(".run.partial-*"))


def test_saved_model_matches_keras(trained, dummy_data_dir):
  out, _ = trained
  images = split_arrays("test", str(dummy_data_dir), 48)["images"]
  edge = np.stack([np.zeros((48, 48, 1), np.uint8), np.full((48, 48, 1), 255, np.uint8)])
  images = np.concatenate([images, edge])
  sm = SavedModelRunner(out / "saved_model")
  assert (sm.input_name, sm.output_name, sm.image_size) == ("image", "covid_probability", 48)
  np.testing.assert_allclose(sm(images), KerasRunner(str(out / "model.keras"))(images), atol=1e-6)
  np.testing.assert_allclose(load_runner(out)(images[:1]), sm(images[:1]), atol=1e-7)  # the folder loads too


def test_seeded_training_is_reproducible(trained, dummy_data_dir, tmp_path):
  out, _ = trained
  again = tmp_path / "again"
  train(_cfg(dummy_data_dir), again, verbose=0)
  images = split_arrays("validation", str(dummy_data_dir), 48)["images"]
  np.testing.assert_allclose(SavedModelRunner(again / "saved_model")(images),
                             SavedModelRunner(out / "saved_model")(images), atol=1e-6)


def test_existing_output_refused_then_overwritten(trained, dummy_data_dir):
  out, _ = trained
  with pytest.raises(CovidctError, match="exists.*--overwrite"):
    train(_cfg(dummy_data_dir), out, verbose=0)


def test_interrupted_run_leaves_nothing(dummy_data_dir, tmp_path, monkeypatch):
  import covidct.train as train_mod

  def boom(*a, **k):
    raise KeyboardInterrupt

  monkeypatch.setattr(train_mod, "export_saved_model", boom)
  with pytest.raises(KeyboardInterrupt):
    train(_cfg(dummy_data_dir, epochs=1), tmp_path / "run", verbose=0)
  assert list(tmp_path.iterdir()) == []


def test_augmentation_in_the_training_step(dummy_data_dir, tmp_path):
  """augment_on='model': the augmenter wraps the model for fit only; the SavedModel holds no random layer."""
  out = tmp_path / "run"
  from covidct.config import AugmentConfig

  summary = train(_cfg(dummy_data_dir, epochs=1, augment_on="model", augment=AugmentConfig()), out, verbose=0)
  assert summary["augment_on"] == "model"
  images = split_arrays("test", str(dummy_data_dir), 48)["images"]
  sm = SavedModelRunner(out / "saved_model")
  np.testing.assert_array_equal(sm(images), sm(images))  # no augmentation at inference
  import keras

  model = keras.saving.load_model(out / "model.keras")
  assert not [l for l in model.layers if l.name == "augmentation" or "Random" in type(l).__name__]


def test_mixed_precision_needs_gpu(dummy_data_dir, tmp_path):
  with pytest.raises(CovidctError, match="needs a GPU"):
    train(_cfg(dummy_data_dir, mixed_precision=True), tmp_path / "run", verbose=0)


def test_multi_worker_needs_tf_config(dummy_data_dir, tmp_path, monkeypatch):
  monkeypatch.delenv("TF_CONFIG", raising=False)
  with pytest.raises(CovidctError, match="TF_CONFIG"):
    train(_cfg(dummy_data_dir, strategy="multi-worker"), tmp_path / "run", verbose=0)


def test_mirrored_on_two_logical_cpus(dummy_data_dir, tmp_path):
  code = f"""
import tensorflow as tf
cpu = tf.config.list_physical_devices('CPU')[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from covidct.config import resolve
from covidct.train import train
s = train(resolve('default', epochs=1, image_size=48, batch_size=2, strategy='mirrored', data_dir={str(dummy_data_dir)!r}),
          {str(tmp_path / 'run')!r}, verbose=0)
print('REPLICAS', s['replicas'])
"""
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
  res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
  assert res.returncode == 0, res.stderr[-3000:]
  assert "REPLICAS 2" in res.stdout
  assert (tmp_path / "run" / "saved_model" / "saved_model.pb").exists()


# The commands, through click's CliRunner.

def test_cli_train_and_evaluate(dummy_data_dir, tmp_path):
  runner = CliRunner()
  out = tmp_path / "run"
  res = runner.invoke(main, ["train", "--out", str(out), "--epochs", "1", "--image-size", "48", "--batch-size", "4",
                             "--augment", "--noise", "2", "--resolution", "0.5", "--contrast", "0.3", "--brightness",
                             "0.1", "--mixup", "0.3", "--data-dir", str(dummy_data_dir), "--quiet"])
  assert res.exit_code == 0, res.output
  assert "best epoch 1/1" in res.output
  augment = json.loads((out / "config.json").read_text())["augment"]
  assert augment["noise"] == 2.0 and augment["resolution"] == 0.5
  assert augment["contrast"] == 0.3 and augment["brightness"] == 0.1
  assert json.loads((out / "config.json").read_text())["mixup"] == 0.3
  res = runner.invoke(main, ["evaluate", str(out), "--data-dir", str(dummy_data_dir), "--bootstrap", "50"])
  assert res.exit_code == 0, res.output
  report = json.loads((out / "evaluation-test" / "report.json").read_text())
  assert report["examples"] == 4 and report["positives"] == 2 and len(report["predictions"]) == 4
  for key in ("roc_auc", "pr_auc", "at_0.5", "at_threshold", "ci95", "threshold"):
    assert key in report
  for png in ("roc.png", "pr.png", "confusion.png"):
    assert (out / "evaluation-test" / png).stat().st_size > 1000
  again = runner.invoke(main, ["evaluate", str(out), "--data-dir", str(dummy_data_dir)])
  assert again.exit_code == 1 and "exists" in again.stderr


@pytest.mark.parametrize("args,code,message", [
    (["--epochs", "0"], 2, "must be positive"),
    (["--batch-size", "-4"], 2, "must be positive"),
    (["--image-size", "0"], 2, "must be positive"),
    (["--recipe", "fast"], 2, "'fast' is not one of"),
    (["--model", "resnet"], 1, "unknown model 'resnet'"),
    (["--noise", "3"], 1, "--noise needs augmentation"),
    (["--augment", "--noise", "-1"], 1, "zero or more grey levels"),
    (["--resolution", "0.5"], 1, "--resolution needs augmentation"),
    (["--augment", "--resolution", "1.5"], 1, "--resolution must be a fraction"),
    (["--contrast", "0.3", "--brightness", "0.1"], 1, "--contrast and --brightness need augmentation"),
    (["--augment", "--contrast", "1"], 1, "--contrast must be a fraction"),
    (["--augment", "--brightness", "-0.1"], 1, "--brightness must be a fraction"),
    (["--fine-tune-from", "-3"], 1, "fine_tune_from must be a layer index >= 0 or a layer name"),
    (["--mixup", "-1"], 1, "mixup must be a Beta alpha"),
])
def test_cli_train_bad_values(tmp_path, args, code, message):
  res = CliRunner().invoke(main, ["train", "--out", str(tmp_path / "run")] + args)
  assert res.exit_code == code
  assert message in res.output and "Traceback" not in res.output


def test_cli_train_missing_dataset_and_existing_out(tmp_path):
  res = CliRunner().invoke(main, ["train", "--out", str(tmp_path / "run"), "--data-dir", str(tmp_path / "empty")])
  assert res.exit_code == 1 and "covidct data build" in res.stderr and res.stderr.count("\n") == 1
  (tmp_path / "exists").mkdir()
  res = CliRunner().invoke(main, ["train", "--out", str(tmp_path / "exists")])
  assert res.exit_code == 1 and "--overwrite" in res.stderr


def test_cli_evaluate_missing_model(tmp_path):
  res = CliRunner().invoke(main, ["evaluate", str(tmp_path / "nope")])
  assert res.exit_code == 1 and "does not exist" in res.stderr


def test_leftovers_of_killed_runs_are_cleaned(tmp_path):
  from covidct.fsutil import atomic_dir

  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                        check=True).stdout.strip()  # a pid that no longer runs
  stale = tmp_path / f".run.partial-{dead}"
  (stale / "saved_model").mkdir(parents=True)
  live = tmp_path / f".run.partial-{os.getppid()}"  # a run still going (this test's parent) keeps its folder
  live.mkdir()
  with atomic_dir(tmp_path / "run") as tmp:
    (tmp / "x").write_text("done")
  assert not stale.exists() and live.exists() and (tmp_path / "run" / "x").exists()
