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


def test_augmentation_differs_between_epochs(dummy_data_dir):
  ds = build_inputs("train", data_dir=str(dummy_data_dir), image_size=48, batch_size=6, training=True,
                    augment=AugmentConfig(), seed=2, shuffle_buffer=1)  # no shuffle: same images each epoch
  first, second = [x.numpy() for x, _ in ds], [x.numpy() for x, _ in ds]
  assert not np.array_equal(first[0], second[0])
