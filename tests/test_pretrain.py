"""Self-supervised pretraining (covidct.pretrain): the loss, the views, a short real run, its errors and the CLI."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from click.testing import CliRunner

from covidct.cli import main
from covidct.config import PretrainConfig, TrainConfig
from covidct.errors import CovidctError
from covidct.models import build_model, mobilenet_weights_file
from tests.conftest import KERAS_WEIGHTS

SIZE = 48


@pytest.fixture(autouse=True)
def _need_weights():
  if not (KERAS_WEIGHTS / mobilenet_weights_file(0.35)).exists():
    pytest.skip(reason=f"the MobileNetV2 weight files are not in {KERAS_WEIGHTS}")


def _cfg(**kw) -> PretrainConfig:
  return PretrainConfig(**{**dict(model="mobilenet_v2_0.35", image_size=SIZE, epochs=2, batch_size=4,
                                  checkpoint_every=1, weights_dir=str(KERAS_WEIGHTS)), **kw})


@pytest.fixture(scope="module")
def arrays(dummy_data_dir):
  from covidct.data import split_arrays

  return {s: split_arrays(s, str(dummy_data_dir), SIZE) for s in ("train", "validation")}


@pytest.fixture(scope="module")
def run(arrays, tmp_path_factory):
  from covidct.pretrain import pretrain

  out = tmp_path_factory.mktemp("pretrain") / "run"
  summary = pretrain(_cfg(), arrays["train"], out, validation=arrays["validation"], verbose=0)
  return out, summary


def _numpy_nt_xent(z, t):
  z = z / np.linalg.norm(z, axis=-1, keepdims=True)
  b = len(z)
  v = np.concatenate([z[:, 0], z[:, 1]])
  logits = v @ v.T / t
  np.fill_diagonal(logits, -np.inf)
  logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
  pos = np.concatenate([np.arange(b) + b, np.arange(b)])
  per_view = -logp[np.arange(2 * b), pos]
  return (per_view[:b] + per_view[b:]) / 2


def test_nt_xent_matches_a_numpy_reference():
  from covidct.pretrain import nt_xent

  rng = np.random.default_rng(0)
  z = rng.normal(size=(5, 2, 8)).astype(np.float32)
  got = np.asarray(nt_xent(0.3)(np.zeros((5, 1)), z))
  np.testing.assert_allclose(got, _numpy_nt_xent(z.astype(np.float64), 0.3), rtol=1e-4)
  aligned = np.repeat(z[:, :1], 2, axis=1) + 0.01 * z  # two views of an image nearly agree
  assert np.asarray(nt_xent(0.3)(None, aligned)).mean() < got.mean()


def test_views_flip_only_is_exact():
  """With every other transform off, the one affine warp must reproduce a mirror image exactly: the matrix maps
  output pixels to input pixels as intended."""
  from covidct.pretrain import view_augmenter

  cfg = _cfg(crop=0.0, rotation_degrees=0.0, shift=0.0, contrast=0.0, brightness=0.0, noise=0.0)
  x = np.random.default_rng(0).integers(0, 256, (16, SIZE, SIZE, 1)).astype(np.float32)
  aug = view_augmenter(cfg, 3, "view")
  y = np.asarray(aug(x, training=True))
  same = np.all(np.abs(y - x) < 1e-3, axis=(1, 2, 3))
  mirrored = np.all(np.abs(y - x[:, :, ::-1]) < 1e-3, axis=(1, 2, 3))
  assert np.all(same | mirrored) and same.any() and mirrored.any()
  np.testing.assert_array_equal(np.asarray(aug(x, training=False)), x)


def test_views_are_seeded_and_stay_grey_levels():
  from covidct.pretrain import view_augmenter

  x = np.random.default_rng(1).integers(0, 256, (8, SIZE, SIZE, 1)).astype(np.float32)
  a, b, c = (np.asarray(view_augmenter(_cfg(), s, "view")(x, training=True)) for s in (7, 7, 8))
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c) and not np.allclose(a, x)
  assert a.min() >= 0 and a.max() <= 255


def test_pretraining_run_checkpoints_probes_and_keeps_the_best(run):
  import keras

  out, summary = run
  assert summary["checkpoints"] == [0, 1, 2] and summary["epochs_run"] == 2
  assert [p["epoch"] for p in summary["probes"]] == [0, 1, 2]
  best = max(summary["probes"], key=lambda p: (p["validation_auc"], p["epoch"]))
  assert summary["kept_epoch"] == best["epoch"]
  kept = (out / "checkpoints" / f"epoch_{best['epoch']:04d}.weights.h5").read_bytes()
  assert (out / "backbone.weights.h5").read_bytes() == kept
  assert (out / "pretrain.png").stat().st_size > 0 and (out / "pretrain.json").exists()
  assert np.isfinite(summary["history"]["loss"]).all()

  def backbone(weights):
    cfg = TrainConfig(model="mobilenet_v2_0.35", image_size=SIZE, weights=weights, weights_dir=str(KERAS_WEIGHTS),
                      augment=None)
    return build_model(cfg).get_layer("backbone")

  imagenet = backbone("imagenet")
  start, end = (backbone(str(out / "checkpoints" / f"epoch_{e:04d}.weights.h5")) for e in (0, 2))
  for a, b in zip(start.get_weights(), imagenet.get_weights()):  # epoch 0 is the ImageNet file
    np.testing.assert_array_equal(a, b)
  assert not np.array_equal(end.get_layer("Conv1").get_weights()[0], imagenet.get_layer("Conv1").get_weights()[0])
  assert isinstance(end.get_layer("Conv1"), keras.layers.Conv2D)


def test_max_minutes_stops_with_a_checkpoint(arrays, tmp_path):
  from covidct.pretrain import pretrain

  summary = pretrain(_cfg(epochs=50, checkpoint_every=0), arrays["train"], tmp_path / "run", verbose=0,
                     max_minutes=1e-6)
  assert summary["epochs_run"] == 1 and summary["checkpoints"] == [0, 1] and summary["kept_epoch"] == 1
  assert summary["probes"] == [] and summary["kept_by"] == "last epoch"


def test_bad_input_is_refused_and_nothing_is_written(arrays, tmp_path):
  from covidct.pretrain import pretrain

  train = arrays["train"]
  cases = [
      (dict(train, images=train["images"][:, :32, :32]), _cfg(), "must be \\(N, 48, 48, 1\\)"),
      (dict(train, images=train["images"].astype(np.float32)), _cfg(), "must be uint8"),
      (train, _cfg(batch_size=64), "more than the 6 training images"),
      (train, _cfg(model="final"), "backbone models"),
  ]
  for i, (data, cfg, match) in enumerate(cases):
    with pytest.raises(CovidctError, match=match):
      pretrain(cfg, data, tmp_path / f"run{i}", verbose=0)
    assert not list(tmp_path.iterdir()), f"case {i} left files behind"
  (tmp_path / "taken").mkdir()
  with pytest.raises(CovidctError, match="exists"):
    pretrain(_cfg(), train, tmp_path / "taken", verbose=0)
  with pytest.raises(CovidctError, match="checkpoint_every"):
    dataclasses.replace(_cfg(), checkpoint_every=-1)
  with pytest.raises(CovidctError, match="batch_size must be at least 2"):
    _cfg(batch_size=1)


def test_a_weights_file_of_another_width_is_refused(run):
  out, _ = run
  with pytest.raises(CovidctError, match="does not fit MobileNetV2 alpha=0.5"):
    build_model(TrainConfig(model="mobilenet_v2_0.5", image_size=SIZE, weights=str(out / "backbone.weights.h5"),
                            augment=None))


def test_cli_arrays_pretrain_and_train_from_the_weights(dummy_data_dir, tmp_path):
  runner = CliRunner()
  res = runner.invoke(main, ["data", "arrays", "--out", str(tmp_path / "arrays"), "--split", "train,validation",
                             "--image-size", str(SIZE), "--data-dir", str(dummy_data_dir)])
  assert res.exit_code == 0, res.output
  assert "train: 6 images (3 COVID)" in res.output
  with np.load(tmp_path / "arrays" / "train.npz") as f:
    assert f["images"].shape == (6, SIZE, SIZE, 1) and f["images"].dtype == np.uint8 and len(f["patient_ids"]) == 6
  assert sorted(p.name for p in (tmp_path / "arrays").iterdir()) == ["train.npz", "validation.npz"]
  from covidct.data import split_arrays
  from covidct.pretrain import load_arrays

  loaded, direct = load_arrays(tmp_path / "arrays" / "validation.npz"), split_arrays("validation", str(dummy_data_dir), SIZE)
  for key in ("images", "labels", "patient_ids", "filenames"):
    np.testing.assert_array_equal(loaded[key], direct[key])

  res = runner.invoke(main, ["pretrain", "--data-dir", str(dummy_data_dir), "--out", str(tmp_path / "pre"),
                             "--model", "mobilenet_v2_0.35", "--image-size", str(SIZE), "--epochs", "1",
                             "--batch-size", "4", "--no-probe", "--weights-dir", str(KERAS_WEIGHTS), "--quiet"])
  assert res.exit_code == 0, res.output
  weights = tmp_path / "pre" / "backbone.weights.h5"
  assert "kept epoch 1 of 1" in res.output and f"--weights {weights}" in res.output

  res = runner.invoke(main, ["train", "--recipe", "finetune", "--model", "mobilenet_v2_0.35", "--image-size",
                             str(SIZE), "--batch-size", "4", "--head-epochs", "0", "--epochs", "1", "--weights",
                             str(weights), "--out", str(tmp_path / "ft"), "--data-dir", str(dummy_data_dir), "--quiet"])
  assert res.exit_code == 0, res.output
  assert f'"weights": "{weights}"' in (tmp_path / "ft" / "config.json").read_text()


@pytest.mark.parametrize("args,message", [
    (["data", "arrays", "--split", "train,dev"], "--split takes train, validation and/or test"),
    (["pretrain", "--arrays", "{tmp}/none"], "train.npz does not exist"),
    (["pretrain", "--model", "final", "--arrays", "{tmp}"], "backbone models"),
    (["pretrain", "--checkpoint-every", "-2", "--arrays", "{tmp}"], "checkpoint_every must be an integer >= 0"),
    (["train", "--recipe", "finetune", "--weights", "{tmp}/missing.weights.h5"], "no such file"),
])
def test_cli_errors_are_one_line(args, message, tmp_path):
  args = [a.replace("{tmp}", str(tmp_path)) for a in args] + ["--out", str(tmp_path / "out")]
  res = CliRunner().invoke(main, args)
  assert res.exit_code != 0 and message in res.output, res.output
  assert "Traceback" not in res.output and not (tmp_path / "out").exists()
