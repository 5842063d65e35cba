"""Training/serving skew from the resize: how many decisions change when a consumer resizes the image another way.

The model was trained on images resized by covidct.data.resize_image (TensorFlow's bilinear filter with
antialiasing, rounded to uint8). Mobile and server code often resizes otherwise: TensorFlow's default (bilinear
without antialiasing), area averaging, or Pillow's filters. The parity report shows, for each, the share of test
decisions at the operating threshold that stay as they are with the training resize.
"""

from __future__ import annotations

import numpy as np

REFERENCE = "tf_bilinear_antialias"
METHODS = ("tf_bilinear", "tf_area", "pil_bilinear", "pil_bicubic", "pil_nearest")


def resize(image: np.ndarray, size: int, method: str) -> np.ndarray:
  """One (H, W, 1) uint8 image to (size, size, 1) uint8 by `method` (REFERENCE or one of METHODS)."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  from PIL import Image  # pylint: disable=import-outside-toplevel

  if method == REFERENCE:
    from covidct.data import resize_image  # pylint: disable=import-outside-toplevel

    return resize_image(image, size).numpy()
  if method.startswith("tf_"):
    kind = {"tf_bilinear": "bilinear", "tf_area": "area"}[method]
    out = tf.image.resize(tf.convert_to_tensor(image), (size, size), method=kind, antialias=False)
    return tf.cast(tf.clip_by_value(tf.round(out), 0, 255), tf.uint8).numpy()
  resample = {"pil_bilinear": Image.BILINEAR, "pil_bicubic": Image.BICUBIC, "pil_nearest": Image.NEAREST}[method]
  return np.asarray(Image.fromarray(image[..., 0]).resize((size, size), resample), np.uint8)[..., None]


def skew_table(runner, raw_images: list, reference_probs: np.ndarray, threshold: float) -> list[dict]:
  """For each resize method: decision agreement at `threshold` with the training resize, and the largest and median
  change of the probability, on `raw_images` (the test split as stored)."""
  ref_decisions = np.asarray(reference_probs) >= threshold
  rows = []
  for method in METHODS:
    p = runner(np.stack([resize(im, runner.image_size, method) for im in raw_images]))
    diff = np.abs(p.astype(np.float64) - reference_probs)
    rows.append({"method": method, "agreement": float(np.mean((p >= threshold) == ref_decisions)),
                 "max_abs_diff": float(diff.max()), "median_abs_diff": float(np.median(diff))})
  return rows


def markdown(rows: list[dict], threshold: float) -> str:
  from covidct.reporting import table  # pylint: disable=import-outside-toplevel

  lines = ["## Resize skew", "",
           f"Test decisions at threshold {threshold:.4f} that stay the same when the image is resized another way "
           "than in training (TensorFlow bilinear with antialiasing, rounded: covidct.data.resize_image). Resize "
           "inputs as training does; the `serving_bytes` signature and `covidct predict` do.", "",
           table(["resize", "decision agreement", "median change", "max change"],
                 [(r["method"], f"{r['agreement']:.1%}", f"{r['median_abs_diff']:.1e}", f"{r['max_abs_diff']:.1e}")
                  for r in rows])]
  return "\n".join(lines) + "\n"
