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
  """Some of one source's examples: a TFDS split expression (e.g. 'train+validation') of the `source` builder config,
  kept whole, or only the examples of the listed patients, or (with `exclude`) all but theirs; optionally only the
  listed file names (`files`: slices_per_patient's pick) and only one class (`label`). Cross-validation folds are
  selections. Several sources are read together as a tuple of selections (a view), one per source."""

  split: str
  patients: tuple[str, ...] | None = None
  exclude: bool = False
  source: str = "covid_ct"
  files: tuple[str, ...] | None = None
  label: int | None = None

  def __str__(self) -> str:
    text = self.split if self.source == "covid_ct" else f"{self.source}:{self.split}"
    if self.patients is not None:
      text = f"{text} {'without' if self.exclude else 'only'} {len(self.patients)} patients"
    if self.files is not None:
      text += f" ({len(self.files)} files)"
    return text if self.label is None else f"{text}, label {self.label}"


View = "str | Selection | tuple[Selection, ...]"


def as_selections(split) -> tuple[Selection, ...]:
  """A split name, a Selection or a tuple of them (a view over several sources) as a tuple of Selections."""
  if isinstance(split, Selection):
    return (split,)
  if isinstance(split, str):
    return (Selection(split),)
  return tuple(s if isinstance(s, Selection) else Selection(s) for s in split)


def describe_view(split) -> str:
  return " + ".join(str(s) for s in as_selections(split))


def _select(ds: tf.data.Dataset, selection: "Selection") -> tf.data.Dataset:
  def keep(e):
    ok = tf.constant(True)
    if selection.label is not None:
      ok = tf.logical_and(ok, tf.equal(e["label"], selection.label))
    if selection.patients is not None:
      patients = tf.constant(sorted(selection.patients) or [""], tf.string)
      hit = tf.logical_and(tf.reduce_any(tf.equal(patients, e["patient_id"])), bool(selection.patients))
      ok = tf.logical_and(ok, tf.logical_not(hit) if selection.exclude else hit)
    if selection.files is not None:
      files = tf.constant(sorted(selection.files) or [""], tf.string)
      ok = tf.logical_and(ok, tf.logical_and(tf.reduce_any(tf.equal(files, e["filename"])), bool(selection.files)))
    return ok

  if selection.patients is None and selection.files is None and selection.label is None:
    return ds
  return ds.filter(keep)


_COMMON_KEYS = ("image", "label", "patient_id", "filename", "dataset")  # what every config's examples hold


def _source_dataset(selection: Selection, data_dir) -> tf.data.Dataset:
  """One selection's examples with the keys every config shares (the image still encoded as stored)."""
  builder = load_builder(data_dir, selection.source)
  ds = builder.as_dataset(split=selection.split, shuffle_files=False)
  return _select(ds.map(lambda e: {k: e[k] for k in _COMMON_KEYS}), selection)


def load_split(split: View, data_dir: str | None, image_size: int,
               with_meta: bool = False, variants: bool = False, size: int | None = None) -> tf.data.Dataset:
  """Resized (uint8) examples of one split, Selection or view (several sources, one after another): (image, label)
  or, with_meta, dicts with patient_id, filename and dataset. With `variants`, each image is
  (len(RESIZE_VARIANTS), size, size, 1): every resize method. `size`, when the caller knows how many examples a
  filtered view holds, spares the pass over its labels that counts them."""
  selections = as_selections(split)
  ds = None
  for selection in selections:
    part = _source_dataset(selection, data_dir)
    ds = part if ds is None else ds.concatenate(part)
  if any(s.patients is not None or s.files is not None or s.label is not None for s in selections):
    # a filter hides the size, which Keras wants to know for its epochs
    count = size if size is not None else len(split_labels(selections, data_dir)["labels"])
    ds = ds.apply(tf.data.experimental.assert_cardinality(count))

  def prep(e):
    out = {"image": (resize_variants if variants else resize_image)(e["image"], image_size), "label": e["label"]}
    if with_meta:
      out.update(patient_id=e["patient_id"], filename=e["filename"], dataset=e["dataset"])
      return out
    return out["image"], out["label"]

  return ds.map(prep, num_parallel_calls=AUTOTUNE)


@dataclasses.dataclass(frozen=True)
class Mix:
  """How training samples several sources: each source's share of the training images (`weights`, summing to 1),
  each source's classes in equal shares (`class_balance`) or as they come, and `epoch_images` images an epoch.
  covidct.train builds it from the TrainConfig and records `plan()` in the run's history.json."""

  weights: dict[str, float]
  class_balance: bool = True
  epoch_images: int = 0

  def __post_init__(self):
    from covidct.errors import CovidctError  # pylint: disable=import-outside-toplevel

    if not self.weights or any(not w > 0 for w in self.weights.values()):
      raise CovidctError(f"every mixed source needs a weight > 0, got {self.weights}.")
    if abs(sum(self.weights.values()) - 1) > 1e-6:
      raise CovidctError(f"source weights must sum to 1, got {self.weights}.")
    if self.epoch_images < 0:
      raise CovidctError(f"epoch_images must be zero (all the training images) or more, got {self.epoch_images}.")

  def streams(self, selections: tuple[Selection, ...], data_dir) -> list[tuple[Selection, float, int]]:
    """(selection of one source and class, probability of drawing from it, images in it) for every stream."""
    out = []
    for sel in selections:
      labels = split_labels(sel, data_dir)["labels"]
      counts = np.bincount(labels, minlength=2)
      for c in (0, 1):
        if counts[c]:
          share = 0.5 if self.class_balance else counts[c] / len(labels)
          out.append((dataclasses.replace(sel, label=c), self.weights[sel.source] * share, int(counts[c])))
    total = sum(p for _, p, _ in out)  # a source with one class only gives that class the source's whole weight
    return [(sel, p / total, n) for sel, p, n in out]

  def plan(self, selections: tuple[Selection, ...], data_dir) -> dict:
    streams = self.streams(selections, data_dir)
    images = sum(n for _, _, n in streams)
    return {"weights": dict(self.weights), "class_balance": self.class_balance,
            "epoch_images": self.epoch_images or images,
            "streams": [{"source": sel.source, "selection": str(dataclasses.replace(sel, label=None)),
                         "class": ("NonCOVID", "COVID")[sel.label], "images": n, "probability": round(p, 6)}
                        for sel, p, n in streams]}


def mix_of(cfg) -> Mix | None:
  """How a TrainConfig samples its sources, or None for one source (read as it is)."""
  if len(cfg.sources) < 2:
    return None
  return Mix(dict(zip(cfg.sources, cfg.source_weights)), cfg.class_balance, cfg.epoch_images)


def training_view(cfg, split) -> tuple[Selection, ...]:
  """The selections a TrainConfig trains on for `split` (a split name such as 'train+validation', or the view of a
  cross-validation fold): the split of every source in cfg.sources, each cut to cfg.slices_per_patient."""
  selections = tuple(Selection(split, source=s) for s in cfg.sources) if isinstance(split, str) \
      else as_selections(split)
  if cfg.slices_per_patient:
    selections = tuple(cap_slices(s, cfg.data_dir, cfg.slices_per_patient, cfg.seed) for s in selections)
  return selections


def _prepared(selection, data_dir, image_size, variants: bool, lung_crop: str, cache: bool,
              size: int | None = None) -> tf.data.Dataset:
  """(image, label) of one selection: resized (or every resize variant), cut to the lungs with `lung_crop`, cached."""
  ds = load_split(selection, data_dir, image_size, variants=variants, size=size)
  if lung_crop:
    from covidct.audit import crop_to_lungs  # pylint: disable=import-outside-toplevel

    crop = lambda image: crop_to_lungs(image, keep=lung_crop)  # noqa: E731
    ds = ds.map(lambda x, y: (tf.ensure_shape(tf.numpy_function(crop, [x], tf.uint8, stateful=False),
                                              (image_size, image_size, 1)), y), num_parallel_calls=AUTOTUNE)
  return ds.cache() if cache else ds


def build_inputs(split: View, *, data_dir: str | None = None, image_size: int = 248, batch_size: int = 32,
                 training: bool = False, augment: AugmentConfig | None = None, seed: int = 0,
                 shuffle_buffer: int = 1024, cache: bool = True, drop_remainder: bool = False,
                 mixup: float = 0.0, lung_crop: str = "", mix: Mix | None = None) -> tf.data.Dataset:
  """Batches of (float32 images in [0, 255], float32 labels) for Keras.

  Decode and resize run in parallel and are cached; training shuffles (seeded) and, with `augment`, applies the
  augmentation to whole batches. Evaluation splits are never augmented nor shuffled. `drop_remainder` keeps every
  batch full (what a multi-replica strategy needs for training). `mixup` > 0 mixes each training batch after its
  augmentation (`mixup_batch`, alpha = `mixup`): its labels become soft. `lung_crop` ('field' or 'box') cuts every
  image (training and evaluation) down to its lung field first (covidct.audit.crop_to_lungs), before the cache.
  With `mix` (training on a view of several sources), every source and class is a cached, endlessly shuffled
  stream, and each epoch draws `mix.epoch_images` images from them with the probabilities of `Mix.streams`.
  """
  variants = bool(training and augment is not None and augment.resize_methods)
  if variants and lung_crop:
    from covidct.errors import CovidctError  # pylint: disable=import-outside-toplevel

    raise CovidctError("--lung-crop and --resize-methods cannot be combined yet; choose one.")
  if training and mix is not None:
    streams = mix.streams(as_selections(split), data_dir)
    parts = [_prepared(sel, data_dir, image_size, variants, lung_crop, cache, size=n)
             .repeat().shuffle(min(shuffle_buffer, n), seed=seed + i, reshuffle_each_iteration=True)
             for i, (sel, _, n) in enumerate(streams)]
    epoch = mix.epoch_images or sum(n for _, _, n in streams)
    ds = tf.data.Dataset.sample_from_datasets(parts, weights=[p for _, p, _ in streams], seed=seed,
                                              rerandomize_each_iteration=True).take(epoch)
  else:
    ds = _prepared(split, data_dir, image_size, variants, lung_crop, cache)
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


def cap_slices(selection: Selection, data_dir, per_patient: int, seed: int = 0) -> Selection:
  """`selection` with at most `per_patient` images of each patient, drawn once from `seed` (the same pick on every
  machine); the selection itself when no patient has more."""
  meta = split_labels(selection, data_dir)
  rng = np.random.default_rng(seed)
  keep = []
  for pid in sorted(set(meta["patient_ids"])):
    names = sorted(meta["filenames"][meta["patient_ids"] == pid])
    keep += names if len(names) <= per_patient else [names[i] for i in sorted(rng.permutation(len(names))[:per_patient])]
  if len(keep) == len(meta["filenames"]):
    return selection
  return dataclasses.replace(selection, files=tuple(sorted(keep)))


def split_arrays(split: View, data_dir: str | None, image_size: int) -> dict[str, np.ndarray]:
  """A whole split (or Selection, or view) as numpy: images (N, size, size, 1) uint8, labels, patient ids, file
  names and the source of each."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

  rows = list(tfds.as_numpy(load_split(split, data_dir, image_size, with_meta=True)))
  return {
      "images": np.stack([r["image"] for r in rows]).astype(np.uint8),
      "labels": np.array([int(r["label"]) for r in rows], dtype=np.int64),
      "patient_ids": np.array([r["patient_id"].decode() for r in rows]),
      "filenames": np.array([r["filename"].decode() for r in rows]),
      "sources": np.array([r["dataset"].decode() for r in rows]),
  }


def split_labels(split: View, data_dir: str | None) -> dict[str, np.ndarray]:
  """Labels, patient ids, file names and sources of a split (or Selection, or view), without decoding any image."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

  rows = []
  for selection in as_selections(split):
    ds = load_builder(data_dir, selection.source).as_dataset(
        split=selection.split, shuffle_files=False, decoders={"image": tfds.decode.SkipDecoding()})
    ds = _select(ds.map(lambda e: {k: e[k] for k in ("label", "patient_id", "filename", "dataset")}), selection)
    rows += list(tfds.as_numpy(ds))
  return {
      "labels": np.array([int(r["label"]) for r in rows], dtype=np.int64),
      "patient_ids": np.array([r["patient_id"].decode() for r in rows]),
      "filenames": np.array([r["filename"].decode() for r in rows]),
      "sources": np.array([r["dataset"].decode() for r in rows]),
  }


def raw_arrays(split: View, data_dir: str | None) -> dict:
  """A split's images as stored (original sizes, (H, W, 1) uint8, in a list), with labels and file names."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

  rows = []
  for selection in as_selections(split):
    rows += list(tfds.as_numpy(_source_dataset(selection, data_dir)))
  return {"images": [r["image"] for r in rows], "labels": np.array([int(r["label"]) for r in rows], np.int64),
          "filenames": np.array([r["filename"].decode() for r in rows])}


@dataclasses.dataclass(frozen=True, eq=False)
class EvalSet:
  """One source's split as every evaluation step reads it: resized images, labels, patients, file names, the
  source, and (for the shortcut audit) the images as stored. Loaded once per run (`eval_set`) and handed on."""

  source: str
  split: str
  image_size: int
  images: np.ndarray
  labels: np.ndarray
  patient_ids: np.ndarray
  filenames: np.ndarray
  raw: list | None = None

  def arrays(self) -> dict:
    """As split_arrays gives it."""
    return {"images": self.images, "labels": self.labels, "patient_ids": self.patient_ids,
            "filenames": self.filenames, "sources": np.full(len(self.labels), self.source)}

  def raw_arrays(self) -> dict:
    """As raw_arrays gives it."""
    return {"images": self.raw, "labels": self.labels, "filenames": self.filenames}


_EVAL_SETS: dict = {}


def eval_set(source: str, split: str, image_size: int, data_dir=None, raw: bool = False) -> EvalSet:
  """The EvalSet of one source's split, read once per process: every later call with the same arguments (evaluate,
  the audit, export's parity, push, bench in one run) gets the same object. Its arrays are read-only."""
  import os  # pylint: disable=import-outside-toplevel

  key = (os.path.abspath(data_dir) if data_dir else None, source, split, image_size)
  found = _EVAL_SETS.get(key)
  if found is not None and (found.raw is not None or not raw):
    return found
  arrays = split_arrays(Selection(split, source=source), data_dir, image_size)
  stored = raw_arrays(Selection(split, source=source), data_dir)["images"] if raw else None
  for a in arrays.values():
    a.setflags(write=False)
  found = EvalSet(source, split, image_size, arrays["images"], arrays["labels"], arrays["patient_ids"],
                  arrays["filenames"], stored)
  _EVAL_SETS[key] = found
  return found


def write_arrays(out_dir, splits, image_size: int, data_dir=None, overwrite: bool = False,
                 source: str = "covid_ct") -> list[tuple[str, int, int]]:
  """Writes each split of `source` as OUT/SPLIT.npz (split_arrays: images, labels, patient ids, file names,
  sources), atomically; returns (split, images, COVID images) for each."""
  from covidct.errors import CovidctError  # pylint: disable=import-outside-toplevel
  from covidct.fsutil import atomic_dir, refuse_existing  # pylint: disable=import-outside-toplevel

  names = [s.strip() for s in splits if s.strip()]
  from covidct.dataset import SOURCE_SPLITS  # pylint: disable=import-outside-toplevel

  bad = [s for s in names if s not in SOURCE_SPLITS[source]]
  if bad or not names:
    takes = "train, validation and/or test" if len(SOURCE_SPLITS[source]) == 3 else f"test ({source} has no other)"
    raise CovidctError(f"--split takes {takes}, got {','.join(splits)!r}.")
  refuse_existing(out_dir, overwrite)
  load_builder(data_dir, source)  # a clear error before anything is written when the dataset is missing
  done = []
  with atomic_dir(out_dir, overwrite) as tmp:
    for name in names:
      arrays = split_arrays(Selection(name, source=source), data_dir, image_size)
      np.savez_compressed(tmp / f"{name}.npz", **arrays)
      done.append((name, len(arrays["labels"]), int(arrays["labels"].sum())))
  return done
