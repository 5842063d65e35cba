"""The input guard: flag images that do not look like the CT slices the model was trained on.

A classifier answers for any input: random noise, a blank image or a photo of a page all get a probability. The
guard says when not to trust that answer. It does not depend on the model (so it works the same for every copy
and runtime) and reads the image as the model sees it (resized):

- cheap checks: the file's size and aspect, and a near-constant image;
- the lung field: a slice where the classical segmentation (covidct.audit.lung_mask) finds no lungs;
- a distance: how far a handful of appearance figures (grey-level mean, spread, share of black and white pixels,
  edge density, lung share and the lung field's grey level) lie from the training slices' (Mahalanobis distance on
  train + validation), with a threshold calibrated so that about 1% of those real slices are flagged, out of sample.

`calibrate` fits it at export time (guard.json beside the artifacts); `Guard.check` gives each image's reasons.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import numpy as np

from covidct.audit import lung_mask
from covidct.errors import CovidctError

GUARD_FILE = "guard.json"
FEATURES = ("mean", "std", "black_share", "white_share", "edge_density", "lung_share", "lung_mean")
MIN_SIDE = 64  # pixels, the file's longer side: COVID-CT's smallest slice is 61 x 115, so its shorter side can be
# under 64 and only the longer one is checked
MAX_ASPECT = 3.0  # long side / short side; COVID-CT's slices stay under 2
MIN_STD = 4.0  # grey levels, of the resized image: below this it is blank
VALIDATION_FLAG_RATE = 0.01
# Share of a file's pixels in colour above which it is a picture, not a slice: photographs 0.38-0.86 (scikit-image's
# astronaut, cat, coffee, rocket), COVID-CT's 746 slices at most 0.077 (paper figures with coloured arrows).
MAX_COLOUR_SHARE = 0.15


def appearance(image: np.ndarray) -> np.ndarray:
  """The appearance figures (FEATURES) of one resized (S, S, 1) uint8 image."""
  x = np.asarray(image, np.float32)
  x = x[..., 0] if x.ndim == 3 else x
  m = lung_mask(image)
  gy, gx = np.gradient(x)
  edges = float(np.mean(np.hypot(gx, gy) > 20))
  share = float(m.mean())
  return np.array([x.mean(), x.std(), np.mean(x < 16), np.mean(x > 239), edges, share,
                   x[m].mean() if share else 0.0], np.float64)


@dataclasses.dataclass(frozen=True)
class Guard:
  """A fitted guard: the training slices' appearance mean and inverse covariance, and the distance threshold."""

  mean: tuple[float, ...]
  inverse_covariance: tuple[tuple[float, ...], ...]
  threshold: float
  calibration: dict = dataclasses.field(default_factory=dict)

  def distance(self, features: np.ndarray) -> np.ndarray:
    d = np.atleast_2d(features) - np.asarray(self.mean)
    return np.sqrt(np.einsum("ij,jk,ik->i", d, np.asarray(self.inverse_covariance), d))

  def check(self, image: np.ndarray, original_size: tuple | None = None) -> list[str]:
    """Why `image` (resized (S, S, 1) uint8) does not look like a training slice; [] when it does. `original_size`:
    the file's (height, width[, colour share]) (covidct.predict.Original), where it is known."""
    reasons = []
    if original_size is not None:
      h, w = original_size[:2]
      colour = original_size[2] if len(original_size) > 2 else 0.0  # covidct.predict.Original
      if colour > MAX_COLOUR_SHARE:
        reasons.append(f"a colour picture ({colour:.0%} of its pixels in colour), not a grey CT slice")
      if max(h, w) < MIN_SIDE:
        reasons.append(f"too small ({w} x {h} pixels)")
      elif max(h, w) / max(min(h, w), 1) > MAX_ASPECT:
        reasons.append(f"not a slice's shape ({w} x {h} pixels)")
    f = appearance(image)
    if f[1] < MIN_STD:
      reasons.append("near-constant (blank)")
    elif f[5] == 0:
      reasons.append("no lung field found")
    d = float(self.distance(f)[0])
    if d > self.threshold and not reasons:
      reasons.append(f"unlike the training slices (distance {d:.1f} > {self.threshold:.1f})")
    return reasons

  def save(self, path) -> None:
    pathlib.Path(path).write_text(json.dumps({"features": FEATURES, **dataclasses.asdict(self)}, indent=2))

  @classmethod
  def load(cls, path) -> "Guard":
    try:
      d = json.loads(pathlib.Path(path).read_text())
      return cls(tuple(d["mean"]), tuple(map(tuple, d["inverse_covariance"])), float(d["threshold"]),
                 d.get("calibration", {}))
    except (OSError, ValueError, KeyError, TypeError) as e:
      raise CovidctError(f"{path}: not a covidct input guard ({type(e).__name__}); export the model again.") from None


def _fit(features: np.ndarray) -> Guard:
  mean = features.mean(axis=0)
  cov = np.cov(features, rowvar=False) + 1e-6 * np.eye(features.shape[1])
  return Guard(tuple(mean), tuple(map(tuple, np.linalg.inv(cov))), float("inf"))


def calibrate(train_images: np.ndarray, validation_images: np.ndarray, flag_rate: float = VALIDATION_FLAG_RATE,
              folds: int = 5, seed: int = 0) -> Guard:
  """Fits the distance on the train and validation slices (those the cheap checks pass) and sets its threshold so
  that `flag_rate` of them are flagged, judged out of sample: each slice's distance comes from a fit on the other
  folds. (Calibrated on the 118 validation slices alone, the 1% quantile is their second-largest distance, and it
  flagged 8% of the test split; out of fold over all 543 slices it flagged none.)"""
  feats = {name: np.stack([appearance(im) for im in images])
           for name, images in (("train", train_images), ("validation", validation_images))}
  both = np.concatenate([feats["train"], feats["validation"]])
  plain = (both[:, 1] >= MIN_STD) & (both[:, 5] > 0)
  real = both[plain]
  fold = np.random.default_rng(seed).integers(0, folds, len(real))
  oof = np.zeros(len(real))
  for k in range(folds):
    oof[fold == k] = _fit(real[fold != k]).distance(real[fold == k])
  guard = dataclasses.replace(_fit(real), threshold=float(np.quantile(oof, 1 - flag_rate)))
  val = feats["validation"]
  val_plain = (val[:, 1] >= MIN_STD) & (val[:, 5] > 0)
  return dataclasses.replace(guard, calibration={
      "train_images": int(len(feats["train"])), "validation_images": int(len(val)), "target_flag_rate": flag_rate,
      "out_of_fold_flag_rate": float(np.mean(np.concatenate([oof > guard.threshold, np.ones(np.sum(~plain), bool)]))),
      "validation_flagged": int(np.sum(~val_plain) + np.sum(guard.distance(val[val_plain]) > guard.threshold))})


def made_up_inputs(size: int, n: int = 20, seed: int = 0) -> dict[str, np.ndarray]:
  """Obviously wrong inputs, resized (S, S, 1) uint8, n of each kind: uniform and Gaussian noise, blank images,
  rendered text on paper, smooth chest-X-ray-like gradients, and random blobs (a photo's broad shapes)."""
  from PIL import Image, ImageDraw  # pylint: disable=import-outside-toplevel

  rng = np.random.default_rng(seed)
  y, x = np.mgrid[:size, :size] / size
  out: dict[str, list] = {k: [] for k in ("noise", "blank", "text", "xray_like_gradient", "blobs")}
  words = "the quick brown fox jumps over the lazy dog lorem ipsum dolor sit amet covid patient report".split()
  for i in range(n):
    out["noise"].append(rng.integers(0, 256, (size, size)) if i % 2 else
                        np.clip(rng.normal(128, 50, (size, size)), 0, 255))
    out["blank"].append(np.full((size, size), [0, 255, 128, 200][i % 4]) + rng.normal(0, 1, (size, size)))
    page = Image.new("L", (size, size), int(rng.integers(220, 256)))
    draw = ImageDraw.Draw(page)
    for row in range(2, size - 10, 12):
      draw.text((4, row), " ".join(rng.choice(words, 4)), fill=int(rng.integers(0, 60)))
    out["text"].append(np.asarray(page))
    cx, cy, w = rng.uniform(0.4, 0.6), rng.uniform(0.4, 0.6), rng.uniform(0.25, 0.4)
    body = np.exp(-(((x - cx) / w) ** 2 + ((y - cy) / (w * 1.2)) ** 2))
    lungs = np.exp(-(((np.abs(x - cx) - w / 2) / (w / 3)) ** 2 + ((y - cy) / (w * 0.8)) ** 2))
    out["xray_like_gradient"].append(255 * np.clip(body - 0.6 * lungs, 0, 1))
    img = np.zeros((size, size))
    for _ in range(6):
      bx, by, r = rng.uniform(0, 1, 2).tolist() + [rng.uniform(0.05, 0.3)]
      img += rng.uniform(40, 200) * (((x - bx) ** 2 + (y - by) ** 2) < r ** 2)
    out["blobs"].append(img)
  return {k: np.clip(np.stack(v), 0, 255).astype(np.uint8)[..., None] for k, v in out.items()}


def find_guard(model_path) -> pathlib.Path | None:
  """The path of the guard.json beside or above an artifact (as `covidct export` writes it), or None."""
  p = pathlib.Path(model_path).resolve()
  for d in [p if p.is_dir() else p.parent, p.parent, p.parent.parent]:
    for cand in (d / GUARD_FILE, d / "assets.extra" / GUARD_FILE):
      if cand.exists():
        return cand
  return None


def load_guard_near(model_path) -> Guard | None:
  """The guard.json beside or above an artifact, loaded, or None. Where the export's manifest sits beside it and
  records its SHA-256, the file must match: an edited guard would silence the warnings it exists to give."""
  from covidct.fsutil import sha256  # pylint: disable=import-outside-toplevel
  from covidct.manifest import MANIFEST_FILE, Manifest  # pylint: disable=import-outside-toplevel

  path = find_guard(model_path)
  if path is None:
    return None
  if (path.parent / MANIFEST_FILE).is_file():
    info = Manifest.load(path.parent).files.get(GUARD_FILE)
    if isinstance(info, dict) and info.get("sha256") and sha256(path) != info["sha256"]:
      raise CovidctError(f"{path} does not match the SHA-256 that its manifest records (changed or damaged): the "
                         "input guard cannot be trusted; copy it again from the export, or export again.")
  return Guard.load(path)
