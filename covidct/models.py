"""Models by name: `build_model(config)` is one pure function; rescaling happens inside every model."""

from __future__ import annotations

from typing import Callable

from covidct.errors import CovidctError

INPUT_NAME = "image"
OUTPUT_NAME = "covid_probability"

MODELS: dict[str, Callable] = {}


def register(name: str):
  """Adds a model builder `fn(x, keras) -> logits-free sigmoid output` under `name`: no training code changes."""

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
def _basic(x, keras):
  """The article's first model: 4,987,361 parameters at 248x248."""
  x = _conv_stack(x, keras, [(128, 4), (64, 8), (32, 16)])
  return _dense_stack(x, keras, [(128, 0.3)])


@register("too_simple")
def _too_simple(x, keras):
  """The article's five-convolution model: 671,185 parameters at 248x248."""
  x = _conv_stack(x, keras, [(16, 1), (32, 3), (64, 5), (64, 5), (64, 5)])
  return _dense_stack(x, keras, [(128, 0.4), (64, 0.5), (8, 0.3)])


@register("final")
def _final(x, keras):
  """The article's final model: 2,010,513 parameters at 248x248."""
  x = _conv_stack(x, keras, [(16, 1), (32, 3), (64, 5), (64, 5)])
  return _dense_stack(x, keras, [(128, 0.4), (64, 0.5), (8, 0.3)])


def build_model(cfg):
  """The model named by `cfg.model` for `cfg.image_size`: float32 (size, size, 1) images in [0, 255] -> P(COVID)."""
  import keras  # pylint: disable=import-outside-toplevel

  if cfg.model not in MODELS:
    raise CovidctError(f"unknown model {cfg.model!r}; choose one of {', '.join(sorted(MODELS))}.")
  inputs = keras.Input(shape=(cfg.image_size, cfg.image_size, 1), dtype="float32", name=INPUT_NAME)
  x = keras.layers.Rescaling(1.0 / 255.0, name="rescale")(inputs)
  x = MODELS[cfg.model](x, keras)
  outputs = keras.layers.Dense(1, activation="sigmoid", dtype="float32", name=OUTPUT_NAME)(x)
  return keras.Model(inputs, outputs, name=cfg.model)
