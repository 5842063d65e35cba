"""Score image files with any artifact: the same decode + resize as training, then the model."""

from __future__ import annotations

import json
import pathlib

from covidct.errors import CovidctError


def find_threshold(model_path) -> float | None:
  """The operating threshold from a manifest.json beside or above the artifact, if there is one."""
  p = pathlib.Path(model_path).resolve()
  for d in [p if p.is_dir() else p.parent, p.parent, p.parent.parent]:
    for cand in (d / "manifest.json", d / "assets.extra" / "manifest.json"):
      if cand.exists():
        return float(json.loads(cand.read_text())["operating_threshold"]["value"])
  return None


def load_image(path, size: int):
  """A file -> (size, size, 1) uint8, or CovidctError saying why it cannot be read."""
  from covidct.data import resize_image  # pylint: disable=import-outside-toplevel
  from tfds_covidct.covid_ct.covid_ct_dataset_builder import CovidCtError, decode_grayscale  # pylint: disable=import-outside-toplevel

  path = pathlib.Path(path)
  if not path.is_file():
    raise CovidctError(f"{path}: no such file.")
  try:
    image, _ = decode_grayscale(path.read_bytes(), str(path))
  except CovidCtError as e:
    raise CovidctError(f"{path}: not a readable image (PNG or JPEG expected).") from e
  return resize_image(image, size).numpy()


def predict_files(model_path, files, threshold: float | None = None) -> tuple[list[dict], list[str]]:
  """Scores every readable file; returns (results, errors). One bad file never stops the others."""
  import numpy as np  # pylint: disable=import-outside-toplevel

  from covidct.runners import load_runner  # pylint: disable=import-outside-toplevel

  runner = load_runner(model_path)
  if threshold is None:
    threshold = find_threshold(model_path) or 0.5
  images, names, errors = [], [], []
  for f in files:
    try:
      images.append(load_image(f, runner.image_size))
      names.append(str(f))
    except CovidctError as e:
      errors.append(str(e))
  results = []
  if images:
    probs = runner(np.stack(images))
    results = [{"file": n, "probability": float(p), "label": "COVID" if p >= threshold else "NonCOVID",
                "threshold": threshold} for n, p in zip(names, probs)]
  return results, errors
