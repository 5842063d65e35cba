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
