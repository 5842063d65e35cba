"""ImageNet MobileNetV2 backbones, built offline from ../shared/keras-weights, and a short fine-tuning run."""

from __future__ import annotations

import shutil

import h5py
import numpy as np
import pytest

from covidct.config import resolve
from covidct.errors import CovidctError
from covidct.models import build_model, mobilenet_weights_file
from tests.conftest import KERAS_WEIGHTS


@pytest.fixture(autouse=True)
def _need_weights():
  if not (KERAS_WEIGHTS / mobilenet_weights_file(0.35)).exists():
    pytest.skip(reason=f"the MobileNetV2 weight files are not in {KERAS_WEIGHTS}")


def _file_kernel(alpha):
  name = mobilenet_weights_file(alpha)
  path = KERAS_WEIGHTS / name if (KERAS_WEIGHTS / name).exists() else KERAS_WEIGHTS / "rebuilt" / name
  with h5py.File(path) as f:  # the distributed files name datasets 'kernel:0', the rebuilt one 'kernel'
    get = lambda key: np.array(f[key] if key in f else f[key + ":0"])  # noqa: E731
    return get("Conv1/Conv1/kernel"), get("bn_Conv1/bn_Conv1/moving_mean")


@pytest.mark.parametrize("alpha,params", [(0.35, 410_208), (0.5, 706_224), (1.0, 2_257_984)])
def test_backbone_built_offline_with_the_files_weights(alpha, params):
  model = build_model(resolve(model=f"mobilenet_v2_{alpha}", image_size=96, weights_dir=str(KERAS_WEIGHTS)))
  backbone = model.get_layer("backbone")
  assert backbone.count_params() == params
  kernel, mean = _file_kernel(alpha)
  np.testing.assert_array_equal(backbone.get_layer("Conv1").get_weights()[0], kernel)
  np.testing.assert_array_equal(backbone.get_layer("bn_Conv1").get_weights()[2], mean)
  assert model.count_params() == params + backbone.output_shape[-1] + 1  # + the sigmoid head


def test_keras_cache_path(tmp_path, monkeypatch):
  """weights='imagenet' with the file in $KERAS_HOME/models/: what Keras does after a download, offline."""
  (tmp_path / "models").mkdir()
  shutil.copy(KERAS_WEIGHTS / mobilenet_weights_file(0.35), tmp_path / "models")
  monkeypatch.setenv("KERAS_HOME", str(tmp_path))
  monkeypatch.delenv("COVIDCT_KERAS_WEIGHTS", raising=False)
  import keras.src.backend.config as keras_config

  monkeypatch.setattr(keras_config, "_KERAS_DIR", str(tmp_path))  # Keras reads KERAS_HOME once, at import
  model = build_model(resolve(model="mobilenet_v2_0.35", image_size=224))
  np.testing.assert_array_equal(model.get_layer("backbone").get_layer("Conv1").get_weights()[0], _file_kernel(0.35)[0])


def test_missing_weight_file_says_where_to_put_it(tmp_path):
  with pytest.raises(CovidctError, match=r"mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.5_224_no_top.h5.*KERAS_HOME"):
    build_model(resolve(model="mobilenet_v2_0.5", image_size=96, weights_dir=str(tmp_path)))


def test_grayscale_to_rgb_inside_the_model():
  import keras

  model = build_model(resolve(model="mobilenet_v2_0.35", image_size=96, weights_dir=str(KERAS_WEIGHTS)))
  assert model.input.shape[-1] == 1
  probe = keras.Model(model.input, model.get_layer("gray_to_rgb").output)
  x = np.stack([np.zeros((96, 96, 1)), np.full((96, 96, 1), 255.0), np.full((96, 96, 1), 127.5)]).astype(np.float32)
  rgb = probe(x).numpy()
  assert rgb.shape == (3, 96, 96, 3)
  np.testing.assert_allclose(rgb[0], -1.0)
  np.testing.assert_allclose(rgb[1], 1.0)
  np.testing.assert_allclose(rgb[2], 0.0, atol=1e-6)
  np.testing.assert_array_equal(rgb[..., 0], rgb[..., 2])


def test_short_fine_tuning_run(dummy_data_dir, tmp_path):
  from covidct.runners import KerasRunner, SavedModelRunner
  from covidct.data import split_arrays
  from covidct.train import train

  cfg = resolve("finetune", model="mobilenet_v2_0.35", image_size=96, batch_size=4, head_epochs=1, epochs=1,
                data_dir=str(dummy_data_dir), weights_dir=str(KERAS_WEIGHTS))
  summary = train(cfg, tmp_path / "run", verbose=0)
  assert summary["epochs_run"] == 2 and summary["best_epoch"] in (1, 2)
  images = split_arrays("test", str(dummy_data_dir), 96)["images"]
  sm = SavedModelRunner(tmp_path / "run" / "saved_model")
  np.testing.assert_allclose(sm(images), KerasRunner(str(tmp_path / "run" / "model.keras"))(images), atol=1e-5)
  # The kept epoch decides the backbone: stage 1 (head only) leaves the ImageNet values, stage 2 changes them.
  import keras

  model = keras.saving.load_model(tmp_path / "run" / "model.keras")
  unchanged = np.array_equal(model.get_layer("backbone").get_layer("Conv1").get_weights()[0], _file_kernel(0.35)[0])
  assert unchanged == (summary["best_epoch"] == 1)


def test_fine_tune_start_by_index_and_by_block_name():
  import keras

  from covidct.models import fine_tune_start

  backbone = keras.applications.MobileNetV2(input_shape=(96, 96, 3), alpha=0.35, include_top=False, weights=None)
  assert backbone.layers[fine_tune_start(backbone, "block_13")].name == "block_13_expand"
  assert backbone.layers[fine_tune_start(backbone, "block_1")].name == "block_1_expand"  # not block_10...
  assert fine_tune_start(backbone, 100) == 100 and fine_tune_start(backbone, 0) == 0
  with pytest.raises(CovidctError, match="block_1 to block_16"):
    fine_tune_start(backbone, "block_99")
  with pytest.raises(CovidctError, match="has 154 layers"):
    fine_tune_start(backbone, 154)


def test_partial_fine_tuning_freezes_the_layers_below(dummy_data_dir, tmp_path):
  """Fine-tuning from block 16: the layers below keep the file's weights, block 16 moves."""
  import keras

  from covidct.train import train

  cfg = resolve("finetune", model="mobilenet_v2_0.35", image_size=96, batch_size=4, head_epochs=0, epochs=1,
                fine_tune_from="block_16", data_dir=str(dummy_data_dir),
                weights_dir=str(KERAS_WEIGHTS))
  train(cfg, tmp_path / "run", verbose=0)
  trained = keras.saving.load_model(tmp_path / "run" / "model.keras").get_layer("backbone")
  start = build_model(cfg).get_layer("backbone")  # the ImageNet weights, as loaded from the file
  for name in ("Conv1", "block_15_project", "block_15_project_BN"):
    for got, want in zip(trained.get_layer(name).get_weights(), start.get_layer(name).get_weights()):
      np.testing.assert_array_equal(got, want)
  assert not np.array_equal(trained.get_layer("block_16_project").get_weights()[0],
                            start.get_layer("block_16_project").get_weights()[0])
  assert '"fine_tune_from": "block_16"' in (tmp_path / "run" / "config.json").read_text()


def test_fine_tune_from_needs_a_backbone(dummy_data_dir, tmp_path):
  from covidct.train import train

  with pytest.raises(CovidctError, match="applies to backbone models"):
    train(resolve("default", epochs=1, fine_tune_from="block_13", data_dir=str(dummy_data_dir)), tmp_path / "run")
  assert not (tmp_path / "run").exists() and not list(tmp_path.iterdir())


@pytest.mark.parametrize("freeze", [True, False])
def test_freeze_batch_norm_keeps_the_imagenet_statistics(dummy_data_dir, tmp_path, freeze):
  """Keras 3's fit calls the backbone with training=True although the model calls it with training=False
  (keras-team/keras#20285): unfrozen batch norm then updates its statistics. `freeze_batch_norm` keeps them."""
  import keras

  from covidct.train import train

  cfg = resolve("finetune", model="mobilenet_v2_0.35", image_size=96, batch_size=4, head_epochs=0, epochs=1,
                freeze_batch_norm=freeze, data_dir=str(dummy_data_dir), weights_dir=str(KERAS_WEIGHTS))
  train(cfg, tmp_path / "run", verbose=0)
  trained = keras.saving.load_model(tmp_path / "run" / "model.keras").get_layer("backbone")
  start = build_model(cfg).get_layer("backbone")
  bn = [l.name for l in start.layers if isinstance(l, keras.layers.BatchNormalization)]
  kept = [all(np.array_equal(a, b) for a, b in zip(trained.get_layer(n).get_weights(), start.get_layer(n).get_weights()))
          for n in bn]
  assert all(kept) if freeze else not any(kept)
  assert not np.array_equal(trained.get_layer("Conv1").get_weights()[0], start.get_layer("Conv1").get_weights()[0])
  assert f'"freeze_batch_norm": {str(freeze).lower()}' in (tmp_path / "run" / "config.json").read_text()
