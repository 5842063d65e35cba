"""The shortcut audit: does a model read the lungs, or how the image was made?

In COVID-CT every COVID image is a figure cut from a paper and every non-COVID image was crawled from the web or
MedPix, so source and label are one variable: a model can score well by recognising the look of a paper figure
(size, compression, contrast, borders) without looking at the lungs. The audit scores the model three more ways:

- **lungs hidden**: the lung field filled with its own mean grey level (the silhouette stays, the content goes);
  a model that reads the lungs falls to about 0.5 here;
- **lungs only**: everything outside the lung field set to black; a model that reads the lungs keeps its score;
- **image statistics alone**: a logistic regression, fitted on the train split, on how the file looks (size,
  aspect, grey-level mean and spread, JPEG or not, the share of flat border), never on the lungs: how far the
  look alone predicts the label in this dataset.

The lung field comes from a classical segmentation (scikit-image): the body is the largest bright connected region,
holes filled; the lungs are the one or two largest dark regions inside it, closed and filled so that vessels and
lesions inside them count as lung. `tests/test_audit.py` checks it against boxes drawn by eye on real slices.
"""

from __future__ import annotations

import numpy as np

from covidct.config import LUNG_CROPS
from covidct.errors import CovidctError

MIN_LUNG_SHARE = 0.02  # of the body's area: smaller dark regions are airways, bowel gas or noise
LUNG_CROP_MARGIN = 0.03  # of the image's side, around the lung field's box (crop_to_lungs)
STATISTICS = ("height", "width", "aspect", "mean", "std", "jpeg", "flat_border")


def lung_mask(image: np.ndarray) -> np.ndarray:
  """The lung field of one grayscale slice ((H, W) or (H, W, 1) uint8) as a boolean (H, W) mask; all False when no
  body or lung is found (e.g. a blank image)."""
  from scipy import ndimage as ndi  # pylint: disable=import-outside-toplevel
  from skimage import filters, measure, morphology  # pylint: disable=import-outside-toplevel

  x = np.asarray(image)
  x = x[..., 0] if x.ndim == 3 else x
  empty = np.zeros(x.shape, bool)
  if x.size == 0 or x.max() == x.min():
    return empty
  smooth = filters.gaussian(x.astype(np.float32) / 255.0, sigma=1)
  bright = smooth > filters.threshold_otsu(smooth)
  labels = measure.label(bright)
  if labels.max() == 0:
    return empty
  body = labels == np.argmax(np.bincount(labels.ravel())[1:]) + 1
  body = ndi.binary_fill_holes(morphology.closing(body, morphology.disk(3)))
  dark = morphology.opening(body & ~bright, morphology.disk(2))
  labels = measure.label(dark)
  regions = sorted(measure.regionprops(labels), key=lambda r: -r.area)
  keep = [r.label for r in regions[:2] if r.area > MIN_LUNG_SHARE * body.sum()]
  if not keep:  # no closed body around them (a zoomed crop, a gap in the body's outline): dark regions that do not
    # reach a corner of the image, where the air outside the body is
    labels = measure.label(morphology.opening(~bright, morphology.disk(2)))
    corners = {labels[0, 0], labels[0, -1], labels[-1, 0], labels[-1, -1]}
    regions = sorted((r for r in measure.regionprops(labels) if r.label not in corners), key=lambda r: -r.area)
    keep = [r.label for r in regions[:2] if r.area > MIN_LUNG_SHARE * x.size]
  if not keep:
    return empty
  lungs = morphology.closing(np.isin(labels, keep), morphology.disk(5))
  return ndi.binary_fill_holes(lungs)


def lung_masks(images: np.ndarray) -> np.ndarray:
  """lung_mask of each image of a batch (N, H, W, 1) -> (N, H, W) bool."""
  return np.stack([lung_mask(im) for im in images]) if len(images) else np.zeros((0,) + images.shape[1:3], bool)


def crop_to_lungs(image: np.ndarray, mask: np.ndarray | None = None, keep: str = "field") -> np.ndarray:
  """De-confounding preprocessing (`--lung-crop`): one (S, S, 1) uint8 slice cropped to its lung field's square box
  (plus a margin) and resized back to (S, S, 1) (bilinear, antialiased), so that neither the border, the annotations
  nor where the lungs sit in the figure reaches the model. keep="field" also blacks out everything outside the field
  (the lungs alone); keep="box" keeps all that is inside the box (mediastinum, chest wall, lesions at the pleura that
  the dark-region field leaves out). `mask` is the lung field (lung_mask of the image when None); a slice without one
  comes back as it is."""
  from skimage.transform import resize  # pylint: disable=import-outside-toplevel

  x = np.asarray(image)
  m = lung_mask(x) if mask is None else np.asarray(mask, bool)
  if not m.any():
    return x.astype(np.uint8)
  size = x.shape[0]
  rows, cols = np.flatnonzero(m.any(axis=1)), np.flatnonzero(m.any(axis=0))
  side = min(size, max(rows[-1] - rows[0], cols[-1] - cols[0]) + 1 + 2 * int(round(LUNG_CROP_MARGIN * size)))
  top = int(np.clip((rows[0] + rows[-1] + 1 - side) // 2, 0, size - side))
  left = int(np.clip((cols[0] + cols[-1] + 1 - side) // 2, 0, size - side))
  if keep not in LUNG_CROPS:
    raise CovidctError(f"keep must be one of {', '.join(LUNG_CROPS)}, got {keep!r}.")
  kept = np.where(m[..., None], x, 0) if keep == "field" else x
  crop = kept[top:top + side, left:left + side].astype(np.float32)
  out = resize(crop, (size, size, 1), order=1, anti_aliasing=side > size, preserve_range=True)
  return np.clip(np.round(out), 0, 255).astype(np.uint8)


def hide_lungs(images: np.ndarray, masks: np.ndarray) -> np.ndarray:
  """Each image with its lung field filled with the field's mean grey level (an image without a field: as is)."""
  out = np.array(images, copy=True)
  for im, m in zip(out, masks):
    if m.any():
      im[m] = np.round(im[m].mean()).astype(np.uint8)
  return out


def lungs_only(images: np.ndarray, masks: np.ndarray) -> np.ndarray:
  """Each image with everything outside its lung field set to black."""
  return np.where(masks[..., None], images, 0).astype(np.uint8)


def image_statistics(image: np.ndarray, filename: str) -> np.ndarray:
  """How a file looks, not what it shows: height, width, aspect, grey-level mean and std, whether it is a JPEG, and
  the share of its rows and columns, from the edges in, that are flat (a border or padding)."""
  x = np.asarray(image, np.float32)
  x = x[..., 0] if x.ndim == 3 else x
  h, w = x.shape

  def flat_run(lines):  # how many lines from the start are flat
    flat = lines.std(axis=1) < 2.0
    return int(np.argmin(flat)) if not flat.all() else len(flat)

  border = (flat_run(x) + flat_run(x[::-1]) + flat_run(x.T) + flat_run(x.T[::-1])) / (2 * h + 2 * w) * 2
  jpeg = float(str(filename).lower().endswith((".jpg", ".jpeg")))
  return np.array([h, w, w / h, x.mean(), x.std(), jpeg, border], np.float64)


def statistics_auc(train: dict, split: dict) -> dict:
  """ROC AUC on `split` of a logistic regression on image_statistics fitted on `train` (dicts of raw 'images',
  'filenames', 'labels'), with the fitted coefficients (on standardised features)."""
  from sklearn.linear_model import LogisticRegression  # pylint: disable=import-outside-toplevel
  from sklearn.pipeline import make_pipeline  # pylint: disable=import-outside-toplevel
  from sklearn.preprocessing import StandardScaler  # pylint: disable=import-outside-toplevel

  from covidct.metrics import ranking_metrics  # pylint: disable=import-outside-toplevel

  def features(d):
    return np.stack([image_statistics(im, f) for im, f in zip(d["images"], d["filenames"])])

  if len(np.unique(train["labels"])) < 2:
    raise CovidctError("the image-statistics baseline needs both classes in the train split.")
  model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
  model.fit(features(train), train["labels"])
  p = model.predict_proba(features(split))[:, 1]
  coef = model[-1].coef_[0]
  return {"roc_auc": ranking_metrics(split["labels"], p)["roc_auc"],
          "coefficients": {name: float(c) for name, c in zip(STATISTICS, coef)}}


AUDIT_INPUTS = ("full", "lungs_hidden", "lungs_only")


def masked_scores(predict, images: np.ndarray, labels: np.ndarray, masks: np.ndarray, prepare=None):
  """ROC AUC of `predict` on the images as they are, with the lungs hidden and with the lungs only ({input: auc}),
  and its probabilities on the images as they are. `prepare(images, masks)`, when given, is the preprocessing a
  model applies before it sees an image (`--lung-crop`), with the lung field found on the image as it is."""
  from covidct.metrics import ranking_metrics  # pylint: disable=import-outside-toplevel

  inputs = {"full": images, "lungs_hidden": hide_lungs(images, masks), "lungs_only": lungs_only(images, masks)}
  p = {name: np.asarray(predict(prepare(x, masks) if prepare else x), np.float64).reshape(-1)
       for name, x in inputs.items()}
  return {name: ranking_metrics(labels, q)["roc_auc"] for name, q in p.items()}, p["full"]


def audit(predict, arrays: dict, raw_train: dict | None, raw_split: dict | None) -> dict:
  """The shortcut audit of `predict` (uint8 (N, S, S, 1) -> P(COVID)) on one split.

  Args:
    predict: the model, as a runner.
    arrays: the split as the model sees it (covidct.data.split_arrays: resized 'images', 'labels').
    raw_train, raw_split: the train split and this split as stored (covidct.data.raw_arrays), for the
      image-statistics baseline; None leaves it out (a user's folder has no train split to fit it on).

  Returns:
    ROC AUC on full images, with the lungs hidden and on the lungs only; the image-statistics baseline; how the
    segmentation went (images without a lung field, median share of the image that is lung).
  """
  images, labels = arrays["images"], arrays["labels"]
  masks = lung_masks(images)
  auc, _ = masked_scores(predict, images, labels, masks)
  share = masks.reshape(len(masks), -1).mean(axis=1) if len(masks) else np.zeros(0)
  return {
      "roc_auc": auc,
      "image_statistics": statistics_auc(raw_train, raw_split) if raw_train and raw_split else None,
      "segmentation": {"images": int(len(masks)), "without_lung_field": int(np.sum(share == 0)),
                       "median_lung_share": float(np.median(share)) if len(share) else float("nan")},
  }


def markdown(result: dict) -> str:
  """The audit as a report section."""
  auc, stats, seg = result["roc_auc"], result["image_statistics"], result["segmentation"]
  from covidct.reporting import table  # pylint: disable=import-outside-toplevel

  rows = [("full image", f"{auc['full']:.3f}", ""),
          ("lungs hidden (lung field filled with its mean grey)", f"{auc['lungs_hidden']:.3f}", "falls to about 0.5"),
          ("lungs only (everything else black)", f"{auc['lungs_only']:.3f}", "keeps the full-image score")]
  note = ""
  if stats:
    strongest = max(stats["coefficients"].items(), key=lambda kv: abs(kv[1]))
    rows.append(("image statistics alone, no model (logistic regression fitted on train)", f"{stats['roc_auc']:.3f}",
                 "-"))
    note = (f"Image statistics: {', '.join(STATISTICS)}; the largest standardised coefficient is {strongest[0]} "
            f"({strongest[1]:+.2f}). ")
  lines = ["## Shortcut audit: does the model read the lungs?", "",
           table(["input", "ROC AUC", "a model that reads the lungs"], rows, align="lrl")]
  return "\n".join(lines + ["", note + "Lung field: classical segmentation (covidct.audit.lung_mask); "
                             f"{seg['without_lung_field']} of {seg['images']} images had none (scored as they are), "
                             f"median lung share {seg['median_lung_share']:.2f}.", ""])
