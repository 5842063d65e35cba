"""Classification metrics and their confidence intervals, by scikit-learn: one place for every module that scores.

Metrics at a threshold, ranking metrics, the threshold that reaches a target sensitivity, and percentile bootstrap
intervals that resample patients (or images) with replacement.
"""

from __future__ import annotations

import numpy as np
from sklearn import metrics as skm

from covidct.config import BOOTSTRAP_RESAMPLES, TARGET_SENSITIVITY

THRESHOLD_METRICS = ("accuracy", "sensitivity", "specificity", "precision", "f1")
RANKING_METRICS = ("roc_auc", "pr_auc")


def threshold_metrics(y, p, threshold: float) -> dict:
  """Accuracy, sensitivity (recall), specificity, precision, F1 and the confusion matrix at one threshold."""
  y = np.asarray(y).astype(int)
  pred = (np.asarray(p) >= threshold).astype(int)
  tn, fp, fn, tp = skm.confusion_matrix(y, pred, labels=[0, 1]).ravel()
  return {
      "accuracy": float(skm.accuracy_score(y, pred)),
      "sensitivity": float(skm.recall_score(y, pred, pos_label=1, zero_division=0)),
      "specificity": float(skm.recall_score(y, pred, pos_label=0, zero_division=0)),
      "precision": float(skm.precision_score(y, pred, zero_division=0)),
      "f1": float(skm.f1_score(y, pred, zero_division=0)),
      "confusion_matrix": {"tn": int(tn), "fp": int(fp), "fn": int(fn), "tp": int(tp)},
  }


def ranking_metrics(y, p) -> dict:
  """ROC AUC and PR AUC (average precision); NaN when only one class is present."""
  y = np.asarray(y).astype(int)
  if len(np.unique(y)) < 2:
    return {"roc_auc": float("nan"), "pr_auc": float("nan")}
  return {"roc_auc": float(skm.roc_auc_score(y, p)), "pr_auc": float(skm.average_precision_score(y, p))}


def choose_threshold(y, p, target_sensitivity: float = TARGET_SENSITIVITY) -> float:
  """The highest threshold whose sensitivity on (y, p) reaches the target (to be applied to other data)."""
  if not 0 < target_sensitivity <= 1:
    raise ValueError(f"target sensitivity must be in (0, 1], got {target_sensitivity}.")
  _, tpr, thresholds = skm.roc_curve(np.asarray(y).astype(int), p)
  idx = int(np.argmax(tpr >= target_sensitivity - 1e-12))
  return float(min(thresholds[idx], 1.0))


def bootstrap_ci(y, p, patients, threshold: float, n_boot: int = BOOTSTRAP_RESAMPLES, seed: int = 0, level: float = 0.95) -> dict:
  """Percentile confidence intervals, resampling patients (all of a patient's images together) with replacement."""
  y, p, patients = np.asarray(y).astype(int), np.asarray(p), np.asarray(patients)
  unique, inverse = np.unique(patients, return_inverse=True)
  members = [np.flatnonzero(inverse == i) for i in range(len(unique))]
  rng = np.random.default_rng(seed)
  samples = {m: [] for m in THRESHOLD_METRICS + RANKING_METRICS}
  for _ in range(n_boot):
    idx = np.concatenate([members[i] for i in rng.integers(0, len(unique), len(unique))])
    yb, pb = y[idx], p[idx]
    for k, v in threshold_metrics(yb, pb, threshold).items():
      if k in samples:
        samples[k].append(v)
    if len(np.unique(yb)) == 2:
      for k, v in ranking_metrics(yb, pb).items():
        samples[k].append(v)
  alpha = (1 - level) / 2 * 100
  return {k: [float(np.percentile(v, alpha)), float(np.percentile(v, 100 - alpha))] if v else [float("nan")] * 2
          for k, v in samples.items()}


def evaluate_probabilities(y, p, patients, threshold: float, n_boot: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> dict:
  """All metrics at 0.5 and at `threshold` (with bootstrap CIs at `threshold`)."""
  return {
      **ranking_metrics(y, p),
      "at_0.5": threshold_metrics(y, p, 0.5),
      "at_threshold": threshold_metrics(y, p, threshold),
      "ci95": bootstrap_ci(y, p, patients, threshold, n_boot=n_boot, seed=seed) if n_boot else {},
  }


def fit_temperature(z: np.ndarray, labels: np.ndarray) -> float:
  """Temperature scaling (Guo et al., 2017): the T minimizing the log loss of sigmoid(z / T) on held-out labels. It
  leaves the ranking (ROC AUC) unchanged; an over-confident model (T > 1) gets probabilities spread out enough for an
  8-bit output, whose step is 1/256, to keep them apart."""
  from scipy.optimize import minimize_scalar  # pylint: disable=import-outside-toplevel

  y = np.asarray(labels, np.float64)

  def nll(log_t):
    s = z / np.exp(log_t)
    return float(np.mean(np.logaddexp(0.0, s) - y * s))  # -log sigmoid(s) for y = 1, -log(1 - sigmoid(s)) for 0

  return float(np.exp(minimize_scalar(nll, bounds=(np.log(0.05), np.log(100.0)), method="bounded").x))


def logit(p: np.ndarray, eps: float = 1e-7) -> np.ndarray:
  """log(p / (1 - p)), with p clipped to [eps, 1 - eps] (float32 probabilities round to 0 and 1)."""
  p = np.clip(np.asarray(p, np.float64), eps, 1 - eps)
  return np.log(p) - np.log1p(-p)
