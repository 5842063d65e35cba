"""The tf.data input pipeline: covid_ct examples -> resized, cached, shuffled, batched, augmented, prefetched."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from covidct.config import AugmentConfig
from covidct.dataset import load_builder

AUTOTUNE = tf.data.AUTOTUNE


def resize_image(image, size: int) -> tf.Tensor:
  """The one preprocessing step outside the model: (H, W, 1) uint8 -> (size, size, 1) uint8.

  Bilinear with antialiasing, rounded. Training, evaluation, predict and the benchmarks all use this function;
  rescaling to [0, 1] happens inside the model.
  """
  image = tf.convert_to_tensor(image)
  if image.shape.rank == 2:
    image = image[..., None]
  resized = tf.image.resize(image, (size, size), method="bilinear", antialias=True)
  return tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8)


def build_augmenter(cfg: AugmentConfig, seed: int):
  """The article's augmentation as Keras layers, on whole float batches; a fresh one per pipeline keeps it seeded."""
  import keras  # pylint: disable=import-outside-toplevel

  layers = []
  if cfg.horizontal_flip:
    layers.append(keras.layers.RandomFlip("horizontal", seed=seed))
  if cfg.rotation_degrees:
    layers.append(keras.layers.RandomRotation(cfg.rotation_degrees / 360.0, fill_mode="constant", seed=seed + 1))
  if cfg.shift:
    layers.append(keras.layers.RandomTranslation(cfg.shift, cfg.shift, fill_mode="constant", seed=seed + 2))
  if cfg.shear:
    layers.append(keras.layers.RandomShear(cfg.shear, cfg.shear, fill_mode="constant", seed=seed + 3))
  if cfg.zoom:
    layers.append(keras.layers.RandomZoom(cfg.zoom, cfg.zoom, fill_mode="constant", seed=seed + 4))
  return keras.Sequential(layers, name="augmentation")


def load_split(split: str, data_dir: str | None, image_size: int, with_meta: bool = False) -> tf.data.Dataset:
  """Resized (uint8) examples of one split: (image, label) or, with_meta, dicts with patient_id and filename."""
  builder = load_builder(data_dir)
  ds = builder.as_dataset(split=split, shuffle_files=False)

  def prep(e):
    out = {"image": resize_image(e["image"], image_size), "label": e["label"]}
    if with_meta:
      out.update(patient_id=e["patient_id"], filename=e["filename"])
      return out
    return out["image"], out["label"]

  return ds.map(prep, num_parallel_calls=AUTOTUNE)


def build_inputs(split: str, *, data_dir: str | None = None, image_size: int = 248, batch_size: int = 32,
                 training: bool = False, augment: AugmentConfig | None = None, seed: int = 0,
                 shuffle_buffer: int = 1024, cache: bool = True, drop_remainder: bool = False) -> tf.data.Dataset:
  """Batches of (float32 images in [0, 255], float32 labels) for Keras.

  Decode and resize run in parallel and are cached; training shuffles (seeded) and, with `augment`, applies the
  augmentation to whole batches. Evaluation splits are never augmented nor shuffled. `drop_remainder` keeps every
  batch full (what a multi-replica strategy needs for training).
  """
  ds = load_split(split, data_dir, image_size)
  if cache:
    ds = ds.cache()
  if training:
    ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
  ds = ds.batch(batch_size, drop_remainder=drop_remainder)
  ds = ds.map(lambda x, y: (tf.cast(x, tf.float32), tf.cast(y, tf.float32)), num_parallel_calls=AUTOTUNE)
  if training and augment is not None:
    augmenter = build_augmenter(augment, seed)
    apply = tf.autograph.experimental.do_not_convert(lambda x, y: (augmenter(x, training=True), y))
    # One batch at a time: the layers draw from a seeded random state, so parallel calls would race for it.
    # Each call is a vectorised op over the whole batch, multi-threaded inside TensorFlow.
    ds = ds.map(apply)
  return ds.prefetch(AUTOTUNE)


def split_arrays(split: str, data_dir: str | None, image_size: int) -> dict[str, np.ndarray]:
  """A whole split as numpy: images (N, size, size, 1) uint8, labels, patient ids, file names."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

  rows = list(tfds.as_numpy(load_split(split, data_dir, image_size, with_meta=True)))
  return {
      "images": np.stack([r["image"] for r in rows]).astype(np.uint8),
      "labels": np.array([int(r["label"]) for r in rows], dtype=np.int64),
      "patient_ids": np.array([r["patient_id"].decode() for r in rows]),
      "filenames": np.array([r["filename"].decode() for r in rows]),
  }
