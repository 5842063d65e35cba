"""The tf.data pipeline on the prepared dummy dataset: dtypes, shapes, ranges, determinism, augmentation."""

import dataclasses

import numpy as np

from covidct.config import AugmentConfig
from covidct.data import build_inputs, resize_image, split_arrays


def _all(ds):
  xs, ys = zip(*[(x.numpy(), y.numpy()) for x, y in ds])
  return np.concatenate(xs), np.concatenate(ys)


def test_resize_image():
  img = np.zeros((30, 50, 1), np.uint8)
  img[:, 25:] = 255
  out = resize_image(img, 40).numpy()
  assert out.dtype == np.uint8 and out.shape == (40, 40, 1)
  assert out[:, :15].max() == 0 and out[:, -15:].min() == 255
  assert resize_image(np.full((7, 9), 17, np.uint8), 32).numpy().max() == 17  # 2-D input gets a channel


def test_pipeline_types_shapes_ranges(dummy_data_dir):
  ds = build_inputs("train", data_dir=str(dummy_data_dir), image_size=48, batch_size=4, training=True,
                    augment=AugmentConfig(), seed=1)
  x, y = _all(ds)
  assert x.dtype == np.float32 and x.shape == (6, 48, 48, 1)
  assert y.dtype == np.float32 and set(np.unique(y)) <= {0.0, 1.0} and y.sum() == 3
  assert x.min() >= 0 and x.max() <= 255


def test_seeded_training_pipeline_is_deterministic(dummy_data_dir):
  kw = dict(data_dir=str(dummy_data_dir), image_size=48, batch_size=4, training=True, augment=AugmentConfig())
  a = _all(build_inputs("train", seed=3, **kw))
  b = _all(build_inputs("train", seed=3, **kw))
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_array_equal(a[1], b[1])
  c = _all(build_inputs("train", seed=4, **kw))
  assert not np.array_equal(a[0], c[0])


def test_augmentation_changes_training_images_only(dummy_data_dir):
  kw = dict(data_dir=str(dummy_data_dir), image_size=48, batch_size=4, seed=5)
  plain = _all(build_inputs("train", training=True, augment=None, **kw))
  aug = _all(build_inputs("train", training=True, augment=AugmentConfig(), **kw))
  np.testing.assert_array_equal(plain[1], aug[1])  # same seeded order
  assert np.abs(plain[0] - aug[0]).mean() > 1.0
  # Evaluation splits: never augmented, never shuffled, whatever is asked.
  ev = _all(build_inputs("validation", training=False, augment=AugmentConfig(), **kw))
  raw = split_arrays("validation", str(dummy_data_dir), 48)
  np.testing.assert_array_equal(ev[0], raw["images"].astype(np.float32))
  np.testing.assert_array_equal(ev[1], raw["labels"].astype(np.float32))


def test_split_arrays(dummy_data_dir):
  arr = split_arrays("test", str(dummy_data_dir), 32)
  assert arr["images"].dtype == np.uint8 and arr["images"].shape == (4, 32, 32, 1)
  assert list(arr["labels"]).count(1) == 2 and all(arr["patient_ids"]) and all(arr["filenames"])


def test_augment_batch_geometry():
  import tensorflow as tf

  from covidct.data import augment_batch

  x = np.zeros((4, 64, 64, 1), np.float32)
  x[:, 20:44, 10:30] = 255
  none = AugmentConfig(horizontal_flip=False, rotation_degrees=0, shift=0, shear=0, zoom=0)
  np.testing.assert_array_equal(augment_batch(x, tf.constant([3, 4]), none).numpy(), x)  # identity
  flips = augment_batch(x, tf.constant([5, 5]), AugmentConfig(rotation_degrees=0, shift=0, shear=0, zoom=0)).numpy()
  assert all(np.array_equal(f, x[0]) or np.array_equal(f, x[0][:, ::-1]) for f in flips)
  a = augment_batch(x, tf.constant([1, 2]), AugmentConfig()).numpy()
  np.testing.assert_array_equal(a, augment_batch(x, tf.constant([1, 2]), AugmentConfig()).numpy())  # seeded
  assert not np.array_equal(a, augment_batch(x, tf.constant([2, 2]), AugmentConfig()).numpy())
  assert a.min() >= 0 and a.max() <= 255 and abs(a.mean() - x.mean()) < 0.2 * x.mean()  # light: mass preserved


def test_augment_batch_noise():
  import tensorflow as tf

  from covidct.data import augment_batch

  x = np.full((8, 64, 64, 1), 128, np.float32)
  x[:, :, :8] = 0  # a black band: noise there is clipped at 0
  plain = AugmentConfig(horizontal_flip=False, rotation_degrees=0, shift=0, shear=0, zoom=0)
  noisy = augment_batch(x, tf.constant([1, 2]), dataclasses.replace(plain, noise=4.0)).numpy()
  d = noisy[:, 8:56, 8:56] - 128  # away from the band and the warp's edge
  assert abs(d.mean()) < 0.1 and 3.8 < d.std() < 4.2  # the requested grey-level std
  assert noisy.min() >= 0 and noisy.max() <= 255
  np.testing.assert_array_equal(noisy, augment_batch(x, tf.constant([1, 2]), dataclasses.replace(plain, noise=4.0)))
  # the warp is drawn from its own stream: adding noise leaves the geometry as it was
  warp = AugmentConfig()
  a = augment_batch(x, tf.constant([3, 4]), warp).numpy()
  b = augment_batch(x, tf.constant([3, 4]), dataclasses.replace(warp, noise=2.0)).numpy()
  assert np.abs(b - a)[:, 16:48, 16:48].mean() < 3


def test_adjust_intensity():
  import tensorflow as tf

  from covidct.data import adjust_intensity, augment_batch

  rng = np.random.default_rng(0)
  x = rng.integers(80, 176, (64, 32, 32, 1)).astype(np.float32)  # mid-grey: no clipping at 0.3 / 0.1
  y = adjust_intensity(x, tf.constant([1, 2]), 0.3, 0.1).numpy()
  np.testing.assert_array_equal(y, adjust_intensity(x, tf.constant([1, 2]), 0.3, 0.1).numpy())  # seeded
  shift = (y.mean(axis=(1, 2, 3)) - x.mean(axis=(1, 2, 3))) / 255
  factor = y.std(axis=(1, 2, 3)) / x.std(axis=(1, 2, 3))
  assert np.abs(shift).max() <= 0.1 + 1e-4 and shift.min() < -0.05 and shift.max() > 0.05  # spread over the range
  assert 0.7 - 1e-4 <= factor.min() < 0.8 and 1.2 < factor.max() <= 1.3 + 1e-4
  # the image itself keeps its shape: a per-image affine map of the grey levels
  for i in range(4):
    assert np.corrcoef(x[i].ravel(), y[i].ravel())[0, 1] > 0.9999
  np.testing.assert_array_equal(adjust_intensity(x, tf.constant([1, 2]), 0.0, 0.0).numpy(), x)  # off: unchanged
  extreme = adjust_intensity(np.stack([np.zeros((8, 8, 1)), np.full((8, 8, 1), 255.0)]), tf.constant([3, 4]), 0.9, 0.9)
  assert extreme.numpy().min() >= 0 and extreme.numpy().max() <= 255  # clipped to grey levels
  # augment_batch applies it after the warp, from its own stream: the geometry stays as it was
  plain = AugmentConfig(contrast=0.0, brightness=0.0)
  a = augment_batch(x, tf.constant([3, 4]), plain).numpy()
  b = augment_batch(x, tf.constant([3, 4]), dataclasses.replace(plain, contrast=0.3, brightness=0.1)).numpy()
  assert not np.allclose(a, b)
  for i in range(4):
    inner = (slice(8, 24), slice(8, 24))  # the centre, away from the black fill the warp leaves at the edges
    assert np.corrcoef(a[i][inner].ravel(), b[i][inner].ravel())[0, 1] > 0.999


def test_degrade_resolution():
  import tensorflow as tf

  from covidct.data import RESOLUTION_LEVELS, augment_batch, degrade_resolution

  rng = np.random.default_rng(0)
  x = rng.integers(0, 256, (64, 48, 48, 1)).astype(np.float32)  # white noise: all detail is fine detail
  y = degrade_resolution(x, tf.constant([1, 2]), 0.25).numpy()
  assert y.shape == x.shape
  np.testing.assert_array_equal(y, degrade_resolution(x, tf.constant([1, 2]), 0.25).numpy())  # seeded
  # each image keeps its mean brightness and loses detail to its level: a fifth untouched, the rest smoother
  np.testing.assert_allclose(y.mean(axis=(1, 2, 3)), x.mean(axis=(1, 2, 3)), atol=3)
  untouched = np.all(y == x, axis=(1, 2, 3))
  assert 0 < untouched.sum() < len(x) // 2
  detail = np.abs(np.diff(y, axis=2)).mean(axis=(1, 2, 3)) / np.abs(np.diff(x, axis=2)).mean(axis=(1, 2, 3))
  assert np.all(detail[~untouched] < 0.8) and len(np.unique(detail.round(2))) >= RESOLUTION_LEVELS - 1
  # a flat image stays flat
  np.testing.assert_allclose(degrade_resolution(np.full((4, 48, 48, 1), 77.0, np.float32), tf.constant([3, 3]), 0.25),
                             77.0, atol=1e-3)
  # in augment_batch: off by default, and the warp's random stream is the same with or without it
  plain = AugmentConfig(horizontal_flip=False, rotation_degrees=0, shift=0, shear=0, zoom=0)
  np.testing.assert_array_equal(augment_batch(x, tf.constant([1, 2]), plain).numpy(), x)
  blurred = augment_batch(x, tf.constant([1, 2]), dataclasses.replace(plain, resolution=0.25)).numpy()
  assert not np.array_equal(blurred, x)
  sharp = np.zeros((2, 48, 48, 1), np.float32)
  sharp[:, 16:32, 16:32] = 255
  warp = AugmentConfig()
  a = augment_batch(sharp, tf.constant([3, 4]), warp).numpy()
  b = augment_batch(sharp, tf.constant([3, 4]), dataclasses.replace(warp, resolution=0.5)).numpy()
  assert np.abs(b.mean(axis=(1, 2, 3)) - a.mean(axis=(1, 2, 3))).max() < 2  # same square, same place


def test_augmentation_differs_between_epochs(dummy_data_dir):
  ds = build_inputs("train", data_dir=str(dummy_data_dir), image_size=48, batch_size=6, training=True,
                    augment=AugmentConfig(), seed=2, shuffle_buffer=1)  # no shuffle: same images each epoch
  first, second = [x.numpy() for x, _ in ds], [x.numpy() for x, _ in ds]
  assert not np.array_equal(first[0], second[0])


def test_mixup_batch():
  import tensorflow as tf

  from covidct.data import mixup_batch

  # Constant images equal to their labels: a mixed image must equal its mixed label everywhere.
  n = 512
  values = np.linspace(0, 1, n, dtype=np.float32)
  x = np.broadcast_to(values[:, None, None, None], (n, 4, 4, 1)).copy()
  mx, my = (t.numpy() for t in mixup_batch(x, values, tf.constant([1, 2]), 0.4))
  np.testing.assert_allclose(mx, np.broadcast_to(my[:, None, None, None], mx.shape), atol=1e-6)
  assert not np.allclose(my, values)  # mixed
  assert abs(my.mean() - values.mean()) < 0.02  # partners are a permutation: the mean label stays
  assert my.min() >= 0 and my.max() <= 1
  again = mixup_batch(x, values, tf.constant([1, 2]), 0.4)[1].numpy()
  np.testing.assert_array_equal(my, again)  # seeded
  assert not np.array_equal(my, mixup_batch(x, values, tf.constant([1, 3]), 0.4)[1].numpy())

  # 0/1 labels: alpha sets how far they are mixed (Beta(0.2, 0.2) mostly near 0 or 1, Beta(4, 4) near 0.5).
  y = (np.arange(4096) % 2).astype(np.float32)
  images = np.zeros((4096, 2, 2, 1), np.float32)

  def middle(alpha):
    m = mixup_batch(images, y, tf.constant([5, 6]), alpha)[1].numpy()
    return np.mean((m > 0.1) & (m < 0.9))

  assert middle(0.2) < 0.25 and middle(4.0) > 0.4


def test_mixup_in_the_training_pipeline_only(dummy_data_dir):
  kw = dict(data_dir=str(dummy_data_dir), image_size=48, batch_size=6, seed=5)
  plain = _all(build_inputs("train", training=True, augment=AugmentConfig(), **kw))
  mixed = _all(build_inputs("train", training=True, augment=AugmentConfig(), mixup=0.4, **kw))
  assert not set(np.unique(mixed[1])) <= {0.0, 1.0}  # soft labels
  assert mixed[0].min() >= 0 and mixed[0].max() <= 255 and not np.array_equal(plain[0], mixed[0])
  # mixup without augmentation runs too, and evaluation splits are never mixed
  assert not set(np.unique(_all(build_inputs("train", training=True, mixup=0.4, **kw))[1])) <= {0.0, 1.0}
  ev = _all(build_inputs("validation", training=False, mixup=0.4, **kw))
  np.testing.assert_array_equal(ev[1], split_arrays("validation", str(dummy_data_dir), 48)["labels"])


def test_resize_variants_are_the_consumers_resizes():
  import tensorflow as tf

  from covidct.data import RESIZE_VARIANTS, resize_variants

  rng = np.random.default_rng(3)
  image = rng.integers(0, 256, (97, 61, 1)).astype(np.uint8)
  out = resize_variants(image, 32).numpy()
  assert out.shape == (len(RESIZE_VARIANTS), 32, 32, 1) and out.dtype == np.uint8
  np.testing.assert_array_equal(out[0], resize_image(image, 32).numpy())  # the first is inference's own resize
  nearest = tf.image.resize(image, (32, 32), method="nearest").numpy()
  np.testing.assert_array_equal(out[RESIZE_VARIANTS.index(("nearest", False))], nearest)
  assert len({out[i].tobytes() for i in range(len(out))}) == len(out)  # five different images


def test_random_resize_methods_in_training_only(dummy_data_dir):
  from covidct.data import resize_variants

  plain = AugmentConfig(horizontal_flip=False, rotation_degrees=0, shift=0, shear=0, zoom=0)
  cfg = dataclasses.replace(plain, resize_methods=True)
  kw = dict(data_dir=str(dummy_data_dir), image_size=32, batch_size=64)
  train = build_inputs("train", training=True, augment=cfg, seed=0, **kw)
  epochs = [next(iter(train))[0].numpy() for _ in range(2)]
  again = next(iter(build_inputs("train", training=True, augment=cfg, seed=0, **kw)))[0].numpy()
  np.testing.assert_array_equal(epochs[0], again)  # seeded
  # Every training image is one of its five resizes, not always the same one, and the picks change between epochs.
  raw = split_arrays("train", str(dummy_data_dir), 32)
  import tensorflow_datasets as tfds

  from covidct.dataset import load_builder

  originals = [e["image"] for e in tfds.as_numpy(load_builder(str(dummy_data_dir)).as_dataset(split="train"))]
  variants = {resize_variants(o, 32).numpy()[k].tobytes(): k for o in originals for k in range(5)}
  picks = [[variants[x.astype(np.uint8).tobytes()] for x in batch] for batch in epochs]
  assert len(picks[0]) == len(raw["images"]) and len(set(picks[0])) > 1 and picks[0] != picks[1]
  # Evaluation is never resized another way.
  val = next(iter(build_inputs("validation", augment=cfg, **kw)))[0].numpy().astype(np.uint8)
  np.testing.assert_array_equal(val, split_arrays("validation", str(dummy_data_dir), 32)["images"][:len(val)])


def test_jpeg_recompression_in_training_only(dummy_data_dir):
  import pytest

  from covidct.errors import CovidctError

  plain = AugmentConfig(horizontal_flip=False, rotation_degrees=0, shift=0, shear=0, zoom=0)
  kw = dict(data_dir=str(dummy_data_dir), image_size=48, batch_size=64, seed=0)
  base = next(iter(build_inputs("train", training=True, augment=plain, **kw)))[0].numpy()
  cfg = dataclasses.replace(plain, jpeg_quality=20)
  train = build_inputs("train", training=True, augment=cfg, **kw)
  a, b = next(iter(train))[0].numpy(), next(iter(train))[0].numpy()
  again = next(iter(build_inputs("train", training=True, augment=cfg, **kw)))[0].numpy()
  np.testing.assert_array_equal(a, again)  # seeded
  assert a.shape == base.shape and 0 < np.abs(a - base).mean() < 20  # artefacts, not another image
  assert not np.array_equal(a, b)  # the quality is drawn anew every epoch
  val = next(iter(build_inputs("validation", augment=cfg, **kw)))[0].numpy()
  np.testing.assert_array_equal(val, split_arrays("validation", str(dummy_data_dir), 48)["images"][:len(val)])
  for bad in (100, -1, 1.5, True):
    with pytest.raises(CovidctError, match="jpeg_quality"):
      AugmentConfig(jpeg_quality=bad)
