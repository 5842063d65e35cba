"""Models by name: `build_model(config)` is one pure function; rescaling happens inside every model."""

from __future__ import annotations

import warnings
from typing import Callable

from covidct.errors import CovidctError

INPUT_NAME = "image"
OUTPUT_NAME = "covid_probability"

MODELS: dict[str, Callable] = {}


def register(name: str):
  """Adds a model builder under `name`: `fn(x, keras, cfg)` takes the rescaled [0, 1] grayscale tensor and returns
  the features the sigmoid head reads. No training code changes."""

  def deco(fn):
    MODELS[name] = fn
    return fn

  return deco


def _conv_stack(x, keras, convs):
  for filters, kernel in convs:
    x = keras.layers.Conv2D(filters, kernel, padding="same", activation="relu")(x)
    x = keras.layers.MaxPooling2D(2)(x)
  return keras.layers.Flatten()(x)


def _dense_stack(x, keras, dense):
  for units, dropout in dense:
    x = keras.layers.Dense(units, activation="relu")(x)
    x = keras.layers.Dropout(dropout)(x)
  return x


@register("basic")
def _basic(x, keras, cfg):  # pylint: disable=unused-argument
  """The article's first model: 4,987,361 parameters at 248x248."""
  x = _conv_stack(x, keras, [(128, 4), (64, 8), (32, 16)])
  return _dense_stack(x, keras, [(128, 0.3)])


@register("too_simple")
def _too_simple(x, keras, cfg):  # pylint: disable=unused-argument
  """The article's five-convolution model: 671,185 parameters at 248x248."""
  x = _conv_stack(x, keras, [(16, 1), (32, 3), (64, 5), (64, 5), (64, 5)])
  return _dense_stack(x, keras, [(128, 0.4), (64, 0.5), (8, 0.3)])


@register("final")
def _final(x, keras, cfg):  # pylint: disable=unused-argument
  """The article's final model: 2,010,513 parameters at 248x248."""
  x = _conv_stack(x, keras, [(16, 1), (32, 3), (64, 5), (64, 5)])
  return _dense_stack(x, keras, [(128, 0.4), (64, 0.5), (8, 0.3)])


def mobilenet_weights_file(alpha: float, size: int = 224) -> str:
  """The MobileNetV2 ImageNet no-top weight file as Keras names it in its cache ($KERAS_HOME/models/)."""
  return f"mobilenet_v2_weights_tf_dim_ordering_tf_kernels_{alpha}_{size}_no_top.h5"


def resolve_backbone_weights(cfg, alpha: float):
  """What to pass as `weights=`: None, 'imagenet' (Keras's cache, else its download), or a file found in
  `cfg.weights_dir` (or its `rebuilt/` folder). A clear error when offline and the file is nowhere."""
  import os  # pylint: disable=import-outside-toplevel

  if cfg.weights in (None, "none", ""):
    return None
  if cfg.weights != "imagenet":
    if not os.path.isfile(cfg.weights):
      raise CovidctError(f"backbone weights file {cfg.weights} does not exist.")
    return cfg.weights
  name = mobilenet_weights_file(alpha)
  weights_dir = cfg.weights_dir or os.environ.get("COVIDCT_KERAS_WEIGHTS")
  if weights_dir:
    for cand in (os.path.join(weights_dir, name), os.path.join(weights_dir, "rebuilt", name)):
      if os.path.isfile(cand):
        return cand
    raise CovidctError(f"{name} is not in {weights_dir} (nor its rebuilt/ folder); put the MobileNetV2 alpha={alpha} "
                       f"ImageNet no-top weights there, or in $KERAS_HOME/models/, or leave --weights-dir out to download.")
  return "imagenet"


def _mobilenet_v2(alpha: float):
  def build(x, keras, cfg):
    """ImageNet MobileNetV2: grayscale [0, 1] -> 3 channels in [-1, 1] inside the model. The backbone is called
    with training=False, but Keras 3's fit overrides that (keras-team/keras#20285): its batch norm runs in inference
    mode only while its layers are frozen, or with `freeze_batch_norm` (see train.py)."""
    weights = resolve_backbone_weights(cfg, alpha)
    x = keras.layers.Rescaling(2.0, offset=-1.0, name="to_minus1_1")(x)
    x = keras.layers.Concatenate(name="gray_to_rgb")([x, x, x])
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      backbone = _load_mobilenet_v2(keras, cfg, alpha, weights)
    skipped = [w for w in caught if "Skipping nested container" in str(w.message)]
    if skipped:  # Keras loads what matches and warns about the rest: a file of another network
      raise CovidctError(f"backbone weights file {weights} does not fit MobileNetV2 alpha={alpha}: {len(skipped)} "
                         "parts of it found nothing to load. Give the file `covidct pretrain --model "
                         f"mobilenet_v2_{alpha}` wrote, or the ImageNet one.")
    for w in caught:
      warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    x = backbone(x, training=False)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.layers.Dropout(cfg.dropout, name="head_dropout")(x)

  return build


def _load_mobilenet_v2(keras, cfg, alpha: float, weights):
  try:
    return keras.applications.MobileNetV2(input_shape=(cfg.image_size, cfg.image_size, 3), alpha=alpha,
                                          include_top=False, weights=weights, name="backbone")
  except Exception as e:  # a failed download surfaces as URLError, OSError or an Exception from get_file
    if weights == "imagenet" and ("URL" in str(e) or "fetch" in str(e) or isinstance(e, OSError)):
      raise CovidctError(
          f"cannot download {mobilenet_weights_file(alpha)} (offline?): put it in $KERAS_HOME/models/ "
          f"(default ~/.keras/models/) or pass --weights-dir DIR holding it.") from None
    if weights not in (None, "imagenet"):  # a file given by path: another width, or not a weights file at all
      raise CovidctError(f"backbone weights file {weights} does not fit MobileNetV2 alpha={alpha}: "
                         f"{str(e).splitlines()[0]} Give the file `covidct pretrain --model mobilenet_v2_{alpha}` "
                         f"wrote, or the ImageNet one.") from None
    raise


for _alpha in (0.35, 0.5, 1.0):
  register(f"mobilenet_v2_{_alpha}")(_mobilenet_v2(_alpha))


def fine_tune_start(backbone, spec: int | str) -> int:
  """The index of the first backbone layer to fine-tune: `spec` itself when an index, else the first layer whose
  name is `spec` or starts with `spec` + '_' (e.g. 'block_13' for MobileNetV2's block 13)."""
  names = [layer.name for layer in backbone.layers]
  if isinstance(spec, int):
    if spec >= len(names):
      raise CovidctError(f"fine_tune_from {spec} is past the backbone's last layer (it has {len(names)} layers).")
    return spec
  for i, name in enumerate(names):
    if name == spec or name.startswith(spec + "_"):
      return i
  blocks = sorted({n.split("_")[0] + "_" + n.split("_")[1] for n in names if n.startswith("block_")},
                  key=lambda b: int(b.split("_")[1]))
  hint = f" ({blocks[0]} to {blocks[-1]})" if blocks else ""
  raise CovidctError(f"no backbone layer is named {spec!r} or starts with '{spec}_'; give a layer index "
                     f"(0-{len(names) - 1}) or a block name{hint}.")


def gaussian_kernel(sigma: float):
  """A normalised 2-D Gaussian, (k, k, 1, 1) for a DepthwiseConv2D, k = 2 * ceil(3 sigma) + 1."""
  import numpy as np  # pylint: disable=import-outside-toplevel

  half = int(np.ceil(3 * sigma))
  g = np.exp(-0.5 * (np.arange(-half, half + 1) / sigma) ** 2)
  k = np.outer(g, g)
  return (k / k.sum()).astype("float32")[:, :, None, None]


def build_model(cfg):
  """The model named by `cfg.model` for `cfg.image_size`: float32 (size, size, 1) images in [0, 255] -> P(COVID)."""
  import keras  # pylint: disable=import-outside-toplevel

  if cfg.model not in MODELS:
    raise CovidctError(f"unknown model {cfg.model!r}; choose one of {', '.join(sorted(MODELS))}.")
  inputs = keras.Input(shape=(cfg.image_size, cfg.image_size, 1), dtype="float32", name=INPUT_NAME)
  x = keras.layers.Rescaling(1.0 / 255.0, name="rescale")(inputs)
  if cfg.normalize == "image":
    from covidct.layers import PerImageStandardize  # pylint: disable=import-outside-toplevel

    x = PerImageStandardize(name="per_image_standardize")(x)
  if cfg.blur:
    # A fixed Gaussian low-pass on every image, in training and in every exported copy: equal sharpness for
    # every source (train COVID images are smaller, so blurrier once resized, than the rest).
    kernel = gaussian_kernel(cfg.blur)
    blur = keras.layers.DepthwiseConv2D(kernel.shape[0], padding="same", use_bias=False, trainable=False, name="blur")
    x = blur(x)
    blur.set_weights([kernel])
  x = MODELS[cfg.model](x, keras, cfg)
  outputs = keras.layers.Dense(1, activation="sigmoid", dtype="float32", name=OUTPUT_NAME)(x)
  return keras.Model(inputs, outputs, name=cfg.model)
