"""Input-pipeline throughput against the training step rate: does the pipeline ever limit training?"""

from __future__ import annotations

import time


def _images_per_second(ds, epochs: int) -> float:
  n, t = 0, time.perf_counter()
  for _ in range(epochs):
    for x, _ in ds:
      n += int(x.shape[0])
  return n / (time.perf_counter() - t)


def measure(data_dir=None, image_size: int = 248, batch_size: int = 32, epochs: int = 3, train_steps: int = 6,
            model_name: str = "final") -> dict:
  """Images/s of the augmented training pipeline and the plain evaluation pipeline (cache warm, prefetch on),
  next to images/s of training steps of `model_name` on in-memory batches."""
  import keras  # pylint: disable=import-outside-toplevel

  from covidct.config import AugmentConfig, resolve  # pylint: disable=import-outside-toplevel
  from covidct.data import build_inputs  # pylint: disable=import-outside-toplevel
  from covidct.models import build_model  # pylint: disable=import-outside-toplevel

  train = build_inputs("train", data_dir=data_dir, image_size=image_size, batch_size=batch_size, training=True,
                       augment=AugmentConfig(), seed=0)
  plain = build_inputs("test", data_dir=data_dir, image_size=image_size, batch_size=batch_size)
  t = time.perf_counter()
  _images_per_second(train, 1)  # fills the cache: decode + resize happen once
  first_epoch_s = time.perf_counter() - t
  _images_per_second(plain, 1)
  train_ips = _images_per_second(train, epochs)
  plain_ips = _images_per_second(plain, epochs)
  model = build_model(resolve(model=model_name, image_size=image_size))
  model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="binary_crossentropy")
  x, y = next(iter(train))
  x, y = x.numpy(), y.numpy()
  model.train_on_batch(x, y)
  model.train_on_batch(x, y)
  t = time.perf_counter()
  for _ in range(train_steps):
    model.train_on_batch(x, y)
  step_s = (time.perf_counter() - t) / train_steps
  step_ips = len(x) / step_s
  return {
      "image_size": image_size, "batch_size": batch_size, "model": model_name,
      "first_epoch_s": first_epoch_s,
      "train_pipeline_augmented_ips": train_ips, "eval_pipeline_ips": plain_ips,
      "train_step_s": step_s, "train_step_ips": step_ips,
      "pipeline_over_step_ratio": train_ips / step_ips,
      "note": "pipeline measured alone after one warm epoch (cache filled); the training step on fixed batches",
  }
