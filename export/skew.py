"""Training/serving skew from the resize: how many decisions change when a consumer resizes the image another way.

The model was trained on images resized by covidct.data.resize_image (TensorFlow's bilinear filter with
antialiasing, rounded to uint8). Mobile and server code often resizes otherwise: TensorFlow's default (bilinear
without antialiasing), area averaging, or Pillow's filters. The parity report shows, for each, the share of test
decisions at the operating threshold that stay as they are with the training resize.
"""

from __future__ import annotations

import numpy as np

from covidct.data import CONSUMER_RESIZES as METHODS  # the skew table's rows
from covidct.data import consumer_resize as resize


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
