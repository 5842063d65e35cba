"""The tf.data input pipeline: covid_ct examples -> resized, cached, shuffled, batched, augmented, prefetched."""

from __future__ import annotations

import dataclasses

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


# How consumers resize, by name: the skew table of every export (export/skew.py) and `covidct cv`'s out-of-fold skew
# compare the model's decisions on each with those on the training resize.
TRAINING_RESIZE = "tf_bilinear_antialias"
CONSUMER_RESIZES = ("tf_bilinear", "tf_area", "pil_bilinear", "pil_bicubic", "pil_nearest")


def consumer_resize(image: np.ndarray, size: int, method: str) -> np.ndarray:
  """One (H, W, 1) uint8 image to (size, size, 1) uint8 by `method` (TRAINING_RESIZE or one of CONSUMER_RESIZES)."""
  from PIL import Image  # pylint: disable=import-outside-toplevel

  if method == TRAINING_RESIZE:
    return resize_image(image, size).numpy()
  if method.startswith("tf_"):
    kind = {"tf_bilinear": "bilinear", "tf_area": "area"}[method]
    out = tf.image.resize(tf.convert_to_tensor(image), (size, size), method=kind, antialias=False)
    return tf.cast(tf.clip_by_value(tf.round(out), 0, 255), tf.uint8).numpy()
  resample = {"pil_bilinear": Image.BILINEAR, "pil_bicubic": Image.BICUBIC, "pil_nearest": Image.NEAREST}[method]
  return np.asarray(Image.fromarray(image[..., 0]).resize((size, size), resample), np.uint8)[..., None]


# Training with `AugmentConfig.resize_methods` draws one of these per image and epoch, so the model's decisions do not
# hang on the resize filter. The first is `resize_image`'s.
RESIZE_VARIANTS = (("bilinear", True), ("bilinear", False), ("area", False), ("bicubic", True), ("nearest", False))


def resize_variants(image, size: int) -> tf.Tensor:
  """(len(RESIZE_VARIANTS), size, size, 1) uint8: the image resized by each method, rounded as resize_image does."""
  image = tf.convert_to_tensor(image)
  if image.shape.rank == 2:
    image = image[..., None]
  out = [tf.image.resize(image, (size, size), method=m, antialias=aa) for m, aa in RESIZE_VARIANTS]
  return tf.cast(tf.clip_by_value(tf.round(tf.stack([tf.cast(o, tf.float32) for o in out])), 0, 255), tf.uint8)


def augment_batch(images, seed, cfg: AugmentConfig) -> tf.Tensor:
  """The article's augmentation on a whole float batch (B, H, W, C), as one affine warp per image.

  Flip, rotation, shift, shear and zoom are drawn from stateless RNGs keyed by `seed` (int32 [2]) and composed
  into a single matrix per image, so the batch is resampled once (bilinear, black fill) by TensorFlow's
  ImageProjectiveTransformV3, on whatever device runs it. Same seed, same output. With `cfg.resolution`, each image
  is first brought to a random lower resolution and back (`degrade_resolution`); with `cfg.contrast` and
  `cfg.brightness`, each warped image's contrast (about its mean) and brightness are changed (`adjust_intensity`);
  with `cfg.noise`, Gaussian pixel noise of that std (grey levels) is added last. Each has a stream of its own, so
  the warp is the same with or without them.
  """
  images = tf.convert_to_tensor(images, tf.float32)
  if 0 < cfg.resolution < 1:
    images = degrade_resolution(images, tf.random.experimental.stateless_fold_in(tf.cast(seed, tf.int32), 8),
                                cfg.resolution)
  shape = tf.shape(images)
  b = shape[0]
  h, w = tf.cast(shape[1], tf.float32), tf.cast(shape[2], tf.float32)
  seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int32), 6)

  def uniform(i, lo, hi):
    return tf.random.stateless_uniform([b], seeds[i], lo, hi)

  one, zero = tf.ones([b]), tf.zeros([b])
  flip = tf.where(uniform(0, 0.0, 1.0) < 0.5, -one, one) if cfg.horizontal_flip else one
  angle = uniform(1, -1.0, 1.0) * (cfg.rotation_degrees * np.pi / 180.0)
  tx, ty = uniform(2, -1.0, 1.0) * cfg.shift * w, uniform(3, -1.0, 1.0) * cfg.shift * h
  shear = uniform(4, -1.0, 1.0) * cfg.shear
  zoom = uniform(5, 1.0 - cfg.zoom, 1.0 + cfg.zoom)

  def mat(rows):
    return tf.stack([tf.stack(r, axis=-1) for r in rows], axis=-2)  # (B, 3, 3)

  cx, cy = (w - 1) / 2, (h - 1) / 2
  to_center = mat([[one, zero, -cx * one], [zero, one, -cy * one], [zero, zero, one]])
  scale = mat([[zoom * flip, zero, zero], [zero, zoom, zero], [zero, zero, one]])
  shear_m = mat([[one, shear, zero], [zero, one, zero], [zero, zero, one]])
  cos, sin = tf.cos(angle), tf.sin(angle)
  rotate = mat([[cos, -sin, zero], [sin, cos, zero], [zero, zero, one]])
  back = mat([[one, zero, cx + tx], [zero, one, cy + ty], [zero, zero, one]])
  forward = back @ rotate @ shear_m @ scale @ to_center  # input -> output coordinates
  inverse = tf.linalg.inv(forward)  # the op maps output pixels back to input pixels
  inverse = inverse / inverse[:, 2:3, 2:3]
  transforms = tf.reshape(inverse, [b, 9])[:, :8]
  warped = tf.raw_ops.ImageProjectiveTransformV3(
      images=images, transforms=transforms, output_shape=shape[1:3], fill_value=0.0,
      interpolation="BILINEAR", fill_mode="CONSTANT")
  if cfg.contrast or cfg.brightness:
    warped = adjust_intensity(warped, tf.random.experimental.stateless_fold_in(tf.cast(seed, tf.int32), 9),
                              cfg.contrast, cfg.brightness)
  if not cfg.noise:
    return warped
  # Gaussian pixel noise (std in grey levels), from its own stream so the warp is the same with or without it.
  noise_seed = tf.random.experimental.stateless_fold_in(tf.cast(seed, tf.int32), 7)
  return tf.clip_by_value(warped + tf.random.stateless_normal(shape, noise_seed) * cfg.noise, 0.0, 255.0)


def adjust_intensity(images, seed, contrast: float, brightness: float) -> tf.Tensor:
  """Per-image contrast and brightness on a float batch (B, H, W, C) in [0, 255]: (x - mean) * c + mean + b * 255,
  c ~ U[1 - contrast, 1 + contrast], b ~ U[-brightness, brightness], drawn per image from `seed`; clipped to
  [0, 255]."""
  images = tf.convert_to_tensor(images, tf.float32)
  b = tf.shape(images)[0]
  s1, s2 = tf.unstack(tf.random.experimental.stateless_split(tf.cast(seed, tf.int32), 2))
  factor = tf.reshape(tf.random.stateless_uniform([b], s1, 1.0 - contrast, 1.0 + contrast), [-1, 1, 1, 1])
  shift = tf.reshape(tf.random.stateless_uniform([b], s2, -brightness, brightness), [-1, 1, 1, 1]) * 255.0
  mean = tf.reduce_mean(images, axis=[1, 2, 3], keepdims=True)
  return tf.clip_by_value((images - mean) * factor + mean + shift, 0.0, 255.0)


RESOLUTION_LEVELS = 5


def degrade_resolution(images, seed, lowest: float, levels: int = RESOLUTION_LEVELS) -> tf.Tensor:
  """Simulate low-resolution sources on a float batch (B, H, W, C): each image is scaled down to one of `levels`
  evenly spaced fractions of its size from `lowest` to 1 (antialiased bilinear, as `resize_image` does) and back
  up (bilinear, as `resize_image` upsamples a small upstream image). The fraction is drawn per image from `seed`.

  Every level is computed for the whole batch and each image picks its own, so all shapes are static (it runs in
  the training step on an accelerator too).
  """
  images = tf.convert_to_tensor(images, tf.float32)
  size = tf.shape(images)[1:3]
  versions = []
  for frac in np.linspace(lowest, 1.0, levels):
    if frac >= 1.0:
      versions.append(images)
      continue
    small_size = tf.maximum(tf.cast(tf.round(tf.cast(size, tf.float32) * float(frac)), tf.int32), 1)
    small = tf.image.resize(images, small_size, method="bilinear", antialias=True)
    versions.append(tf.image.resize(small, size, method="bilinear"))
  pick = tf.random.stateless_uniform([tf.shape(images)[0]], seed, 0, levels, dtype=tf.int32)
  return tf.gather(tf.stack(versions, axis=1), pick, axis=1, batch_dims=1)  # (B, levels, H, W, C) -> (B, H, W, C)


def mixup_batch(images, labels, seed, alpha: float):
  """mixup (Zhang et al., 2018) on a float batch: each image and label becomes lam * itself + (1 - lam) * those of
  another image of the batch, lam ~ Beta(alpha, alpha) per image, partner and lam drawn from `seed` (shape [2])."""
  images = tf.convert_to_tensor(images, tf.float32)
  labels = tf.convert_to_tensor(labels, tf.float32)
  seed = tf.cast(seed, tf.int32)
  b = tf.shape(images)[0]
  g1, g2 = (tf.random.stateless_gamma([b], tf.random.experimental.stateless_fold_in(seed, i), alpha) for i in (1, 2))
  lam = tf.math.divide_no_nan(g1, g1 + g2)  # Beta(alpha, alpha); both draws underflowing to 0 -> the partner
  partner = tf.argsort(tf.random.stateless_uniform([b], tf.random.experimental.stateless_fold_in(seed, 3)))
  lam_x = tf.reshape(lam, [-1, 1, 1, 1])
  mixed = lam_x * images + (1.0 - lam_x) * tf.gather(images, partner)
  return mixed, lam * labels + (1.0 - lam) * tf.gather(labels, partner)


def build_augmenter(cfg: AugmentConfig, seed: int):
  """`augment_batch` as a Keras layer (active only in training), to run inside the training step on the
  accelerator: it draws a fresh seed pair per batch from a seeded Keras SeedGenerator."""
  import keras  # pylint: disable=import-outside-toplevel

  class BatchAugment(keras.layers.Layer):

    def __init__(self):
      super().__init__(name="augmentation")
      self.generator = keras.random.SeedGenerator(seed)

    def call(self, x, training=None):
      if not training:
        return x
      pair = keras.random.randint((2,), 0, 2**31 - 1, seed=self.generator, dtype="int32")
      return augment_batch(x, pair, cfg)

    def compute_output_shape(self, input_shape):
      return input_shape

  return BatchAugment()


@dataclasses.dataclass(frozen=True)
class Selection:
  """Some of the dataset's examples: a TFDS split expression (e.g. 'train+validation'), kept whole, or only the
  examples of the listed patients, or (with `exclude`) all but theirs. Cross-validation folds are selections."""

  split: str
  patients: tuple[str, ...] | None = None
  exclude: bool = False

  def __str__(self) -> str:
    if self.patients is None:
      return self.split
    return f"{self.split} {'without' if self.exclude else 'only'} {len(self.patients)} patients"


def _select(ds: tf.data.Dataset, selection: "Selection") -> tf.data.Dataset:
  if selection.patients is None:
    return ds
  if not selection.patients:
    return ds if selection.exclude else ds.take(0)
  patients = tf.constant(sorted(selection.patients), tf.string)

  def keep(e):
    hit = tf.reduce_any(tf.equal(patients, e["patient_id"]))
    return tf.logical_not(hit) if selection.exclude else hit

  return ds.filter(keep)


def load_split(split: "str | Selection", data_dir: str | None, image_size: int,
               with_meta: bool = False, variants: bool = False) -> tf.data.Dataset:
  """Resized (uint8) examples of one split (or Selection): (image, label) or, with_meta, dicts with patient_id and
  filename. With `variants`, each image is (len(RESIZE_VARIANTS), size, size, 1): every resize method."""
  selection = split if isinstance(split, Selection) else Selection(split)
  builder = load_builder(data_dir)
  ds = _select(builder.as_dataset(split=selection.split, shuffle_files=False), selection)
  if selection.patients is not None:  # a filter hides the size, which Keras wants to know for its epochs
    ds = ds.apply(tf.data.experimental.assert_cardinality(len(split_labels(selection, data_dir)["labels"])))

  def prep(e):
    out = {"image": (resize_variants if variants else resize_image)(e["image"], image_size), "label": e["label"]}
    if with_meta:
      out.update(patient_id=e["patient_id"], filename=e["filename"])
      return out
    return out["image"], out["label"]

  return ds.map(prep, num_parallel_calls=AUTOTUNE)


def build_inputs(split: "str | Selection", *, data_dir: str | None = None, image_size: int = 248, batch_size: int = 32,
                 training: bool = False, augment: AugmentConfig | None = None, seed: int = 0,
                 shuffle_buffer: int = 1024, cache: bool = True, drop_remainder: bool = False,
                 mixup: float = 0.0, lung_crop: str = "") -> tf.data.Dataset:
  """Batches of (float32 images in [0, 255], float32 labels) for Keras.

  Decode and resize run in parallel and are cached; training shuffles (seeded) and, with `augment`, applies the
  augmentation to whole batches. Evaluation splits are never augmented nor shuffled. `drop_remainder` keeps every
  batch full (what a multi-replica strategy needs for training). `mixup` > 0 mixes each training batch after its
  augmentation (`mixup_batch`, alpha = `mixup`): its labels become soft. `lung_crop` ('field' or 'box') cuts every
  image (training and evaluation) down to its lung field first (covidct.audit.crop_to_lungs), before the cache.
  """
  variants = bool(training and augment is not None and augment.resize_methods)
  if variants and lung_crop:
    from covidct.errors import CovidctError  # pylint: disable=import-outside-toplevel

    raise CovidctError("--lung-crop and --resize-methods cannot be combined yet; choose one.")
  ds = load_split(split, data_dir, image_size, variants=variants)
  if lung_crop:
    from covidct.audit import crop_to_lungs  # pylint: disable=import-outside-toplevel

    crop = lambda image: crop_to_lungs(image, keep=lung_crop)  # noqa: E731
    ds = ds.map(lambda x, y: (tf.ensure_shape(tf.numpy_function(crop, [x], tf.uint8, stateful=False),
                                              (image_size, image_size, 1)), y), num_parallel_calls=AUTOTUNE)
  if cache:
    ds = ds.cache()
  if training:
    ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
  if variants:  # one resize method per image, drawn anew every epoch from a seeded stream
    picks = tf.data.Dataset.random(seed=seed + 1, rerandomize_each_iteration=True)
    ds = tf.data.Dataset.zip((ds, picks)).map(
        lambda xy, r: (xy[0][r % len(RESIZE_VARIANTS)], xy[1]), num_parallel_calls=AUTOTUNE)
  if training and augment is not None and augment.jpeg_quality:  # every image re-compressed, both classes
    seeds = tf.data.Dataset.random(seed=seed + 2, rerandomize_each_iteration=True).batch(2)
    ds = tf.data.Dataset.zip((ds, seeds)).map(
        lambda xy, s: (tf.image.stateless_random_jpeg_quality(xy[0], augment.jpeg_quality, 100,
                                                              tf.cast(s % (2**31 - 1), tf.int32)), xy[1]),
        num_parallel_calls=AUTOTUNE)
  ds = ds.batch(batch_size, drop_remainder=drop_remainder)
  ds = ds.map(lambda x, y: (tf.cast(x, tf.float32), tf.cast(y, tf.float32)), num_parallel_calls=AUTOTUNE)
  if training and (augment is not None or mixup):
    # Each batch carries its own seed pair from a seeded random stream (new values every epoch), so the batches
    # can be augmented in parallel and still come out the same for the same seed.
    seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)

    def step(xy, s):
      x, y = xy
      s = tf.cast(s % (2**31 - 1), tf.int32)
      if augment is not None:
        x = augment_batch(x, s, augment)
      if mixup:
        x, y = mixup_batch(x, y, tf.random.experimental.stateless_fold_in(s, 11), mixup)
      return x, y

    ds = tf.data.Dataset.zip((ds, seeds)).map(step, num_parallel_calls=AUTOTUNE)
  return ds.prefetch(AUTOTUNE)


def split_arrays(split: "str | Selection", data_dir: str | None, image_size: int) -> dict[str, np.ndarray]:
  """A whole split as numpy: images (N, size, size, 1) uint8, labels, patient ids, file names."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

  rows = list(tfds.as_numpy(load_split(split, data_dir, image_size, with_meta=True)))
  return {
      "images": np.stack([r["image"] for r in rows]).astype(np.uint8),
      "labels": np.array([int(r["label"]) for r in rows], dtype=np.int64),
      "patient_ids": np.array([r["patient_id"].decode() for r in rows]),
      "filenames": np.array([r["filename"].decode() for r in rows]),
  }


def split_labels(split: "str | Selection", data_dir: str | None) -> dict[str, np.ndarray]:
  """Labels, patient ids and file names of a split (or Selection), without decoding any image."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

  selection = split if isinstance(split, Selection) else Selection(split)
  ds = load_builder(data_dir).as_dataset(split=selection.split, shuffle_files=False,
                                         decoders={"image": tfds.decode.SkipDecoding()})
  ds = _select(ds.map(lambda e: {k: e[k] for k in ("label", "patient_id", "filename")}), selection)
  rows = list(tfds.as_numpy(ds))
  return {
      "labels": np.array([int(r["label"]) for r in rows], dtype=np.int64),
      "patient_ids": np.array([r["patient_id"].decode() for r in rows]),
      "filenames": np.array([r["filename"].decode() for r in rows]),
  }


def raw_arrays(split: "str | Selection", data_dir: str | None) -> dict:
  """A split's images as stored (original sizes, (H, W, 1) uint8, in a list), with labels and file names."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

  selection = split if isinstance(split, Selection) else Selection(split)
  ds = _select(load_builder(data_dir).as_dataset(split=selection.split, shuffle_files=False), selection)
  rows = list(tfds.as_numpy(ds.map(lambda e: {k: e[k] for k in ("image", "label", "filename", "patient_id")})))
  return {"images": [r["image"] for r in rows], "labels": np.array([int(r["label"]) for r in rows], np.int64),
          "filenames": np.array([r["filename"].decode() for r in rows])}


def write_arrays(out_dir, splits, image_size: int, data_dir=None, overwrite: bool = False) -> list[tuple[str, int, int]]:
  """Writes each split as OUT/SPLIT.npz (split_arrays: images, labels, patient ids, file names), atomically; returns
  (split, images, COVID images) for each."""
  from covidct.errors import CovidctError  # pylint: disable=import-outside-toplevel
  from covidct.fsutil import atomic_dir, refuse_existing  # pylint: disable=import-outside-toplevel

  names = [s.strip() for s in splits if s.strip()]
  bad = [s for s in names if s not in ("train", "validation", "test")]
  if bad or not names:
    raise CovidctError(f"--split takes train, validation and/or test, got {','.join(splits)!r}.")
  refuse_existing(out_dir, overwrite)
  load_builder(data_dir)  # a clear error before anything is written when the dataset is missing
  done = []
  with atomic_dir(out_dir, overwrite) as tmp:
    for name in names:
      arrays = split_arrays(name, data_dir, image_size)
      np.savez_compressed(tmp / f"{name}.npz", **arrays)
      done.append((name, len(arrays["labels"]), int(arrays["labels"].sum())))
  return done
