"""The article's architectures, by name, with exactly the article's parameter counts."""

import numpy as np
import pytest

from covidct.config import resolve
from covidct.errors import CovidctError
from covidct.models import INPUT_NAME, MODELS, OUTPUT_NAME, build_model


@pytest.mark.parametrize("name,params", [("basic", 4_987_361), ("too_simple", 671_185), ("final", 2_010_513)])
def test_article_parameter_counts(name, params):
  assert build_model(resolve(model=name)).count_params() == params


def test_rescaling_inside_and_names():
  model = build_model(resolve(model="final", image_size=64))
  assert model.input.name == INPUT_NAME or model.inputs[0].name == INPUT_NAME
  assert model.layers[1].name == "rescale"
  assert model.layers[-1].name == OUTPUT_NAME
  # The rescaling layer maps [0, 255] to [0, 1]: a white image reaches the first conv as ones.
  import keras

  probe = keras.Model(model.input, model.get_layer("rescale").output)
  np.testing.assert_allclose(probe(np.full((1, 64, 64, 1), 255.0, np.float32)).numpy(), 1.0, rtol=1e-6)
  p = model(np.zeros((2, 64, 64, 1), np.float32)).numpy()
  assert p.shape == (2, 1) and np.all((p >= 0) & (p <= 1))


def test_unknown_model_name():
  with pytest.raises(CovidctError, match="unknown model 'resnet'.*final"):
    build_model(resolve(model="resnet"))


def test_registry_takes_new_models():
  from covidct.models import register

  @register("tiny_test_model")
  def _tiny(x, keras, cfg):  # noqa: ARG001
    return keras.layers.GlobalAveragePooling2D()(x)

  try:
    assert build_model(resolve(model="tiny_test_model", image_size=32)).count_params() == 2
  finally:
    MODELS.pop("tiny_test_model")


@pytest.mark.parametrize("field,value", [("epochs", 0), ("batch_size", -1), ("image_size", 0), ("image_size", 8),
                                         ("learning_rate", 0.0), ("strategy", "tpu"), ("blur", -1.0),
                                         ("blur", 20.0), ("mixup", -0.2), ("mixup", 50.0)])
def test_nonsense_config(field, value):
  with pytest.raises(CovidctError, match=field if field != "strategy" else "unknown strategy"):
    resolve(**{field: value})


def test_unknown_recipe():
  with pytest.raises(CovidctError, match="unknown recipe 'fast'"):
    resolve("fast")


def test_article_recipe_is_the_articles():
  cfg = resolve("article")
  assert (cfg.learning_rate, cfg.batch_size, cfg.monitor, cfg.patience, cfg.model) == (0.01, 64, "val_loss", 7, "final")
  assert cfg.augment.rotation_degrees == 5 and cfg.augment.shift == cfg.augment.shear == cfg.augment.zoom == 0.05


def test_blur_is_a_fixed_gaussian_inside_the_model(tmp_path):
  """`blur`: a non-trainable Gaussian right after the rescaling, so every exported copy carries it."""
  import keras

  from covidct.models import gaussian_kernel

  assert "blur" not in [l.name for l in build_model(resolve(model="final", image_size=64)).layers]
  model = build_model(resolve(model="final", image_size=64, blur=1.5))
  assert [l.name for l in model.layers][1:3] == ["rescale", "blur"]
  layer = model.get_layer("blur")
  assert not layer.trainable_weights and len(layer.non_trainable_weights) == 1
  kernel = gaussian_kernel(1.5)[:, :, 0, 0]
  assert kernel.shape == (11, 11) and abs(kernel.sum() - 1) < 1e-6
  impulse = np.zeros((1, 64, 64, 1), np.float32)
  impulse[0, 32, 32, 0] = 255.0  # white dot -> the kernel itself, centred on it
  out = keras.Model(model.input, layer.output)(impulse).numpy()[0, :, :, 0]
  np.testing.assert_allclose(out[27:38, 27:38], kernel, atol=1e-6)
  assert abs(out.sum() - 1.0) < 1e-5
  model.save(tmp_path / "m.keras")
  again = keras.saving.load_model(tmp_path / "m.keras")
  np.testing.assert_array_equal(again.get_layer("blur").get_weights()[0], layer.get_weights()[0])


def test_per_image_standardisation_removes_each_images_brightness_and_contrast(tmp_path):
  """`normalize='image'`: inside the model, after the rescaling, so every copy carries it; an image and the same
  image brighter and with more contrast reach the network alike, and the model saves and loads with it."""
  import keras

  assert "per_image_standardize" not in [l.name for l in build_model(resolve(model="final", image_size=32)).layers]
  model = build_model(resolve(model="final", image_size=32, normalize="image"))
  assert [l.name for l in model.layers][1:3] == ["rescale", "per_image_standardize"]
  rng = np.random.default_rng(0)
  image = rng.uniform(60, 160, (1, 32, 32, 1)).astype(np.float32)
  brighter = np.clip((image - image.mean()) * 1.5 + image.mean() + 30, 0, 255)  # no clipping at these levels
  blank = np.full((1, 32, 32, 1), 7.0, np.float32)
  inner = keras.Model(model.input, model.get_layer("per_image_standardize").output)
  out = inner(np.concatenate([image, brighter, blank])).numpy()
  np.testing.assert_allclose(out[0], out[1], atol=1e-5)
  assert abs(out[0].mean() - 0.5) < 1e-5 and abs(out[0].std() - 0.25) < 1e-4
  np.testing.assert_allclose(out[2], 0.5, atol=1e-6)  # a blank image: its own mean, no division by zero
  np.testing.assert_allclose(model(image).numpy(), model(brighter).numpy(), atol=1e-5)
  model.save(tmp_path / "m.keras")
  again = keras.saving.load_model(tmp_path / "m.keras")
  np.testing.assert_allclose(again(image).numpy(), model(image).numpy(), atol=1e-6)
  with pytest.raises(CovidctError, match="normalize must be 'image'"):
    resolve(normalize="histogram")
