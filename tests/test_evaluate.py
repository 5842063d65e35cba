"""Metrics against hand-computed values, threshold choice, patient bootstrap."""

import math

import numpy as np
import pytest

from covidct.evaluate import bootstrap_ci, choose_threshold, ranking_metrics, threshold_metrics

Y = np.array([0, 0, 1, 1, 1])
P = np.array([0.1, 0.6, 0.4, 0.8, 0.9])


def test_threshold_metrics_known_arrays():
  m = threshold_metrics(Y, P, 0.5)
  assert m["confusion_matrix"] == {"tn": 1, "fp": 1, "fn": 1, "tp": 2}
  assert m["accuracy"] == pytest.approx(0.6)
  assert m["sensitivity"] == pytest.approx(2 / 3)
  assert m["specificity"] == pytest.approx(0.5)
  assert m["precision"] == pytest.approx(2 / 3)
  assert m["f1"] == pytest.approx(2 / 3)


def test_ranking_metrics_known_arrays():
  r = ranking_metrics(Y, P)
  assert r["roc_auc"] == pytest.approx(5 / 6)
  # Average precision: ranks .9(+) .8(+) .6(-) .4(+) -> (1 + 1 + 3/4) / 3
  assert r["pr_auc"] == pytest.approx((1 + 1 + 0.75) / 3)
  assert math.isnan(ranking_metrics([1, 1], [0.2, 0.3])["roc_auc"])


def test_choose_threshold():
  assert choose_threshold(Y, P, 1.0) == pytest.approx(0.4)
  assert choose_threshold(Y, P, 0.6) == pytest.approx(0.8)
  assert threshold_metrics(Y, P, choose_threshold(Y, P, 0.9))["sensitivity"] >= 0.9
  with pytest.raises(ValueError):
    choose_threshold(Y, P, 0.0)


def test_bootstrap_over_patients():
  rng = np.random.default_rng(0)
  y = np.repeat([0, 1] * 20, 3)  # 40 patients, 3 near-identical images each, one label per patient
  p = np.clip(y * 0.3 + np.repeat(rng.uniform(0, 0.7, 40), 3) + rng.normal(0, 0.01, len(y)), 0, 1)
  patients = np.repeat(np.arange(40), 3)
  ci = bootstrap_ci(y, p, patients, 0.5, n_boot=300, seed=1)
  assert ci == bootstrap_ci(y, p, patients, 0.5, n_boot=300, seed=1)  # seeded
  point = ranking_metrics(y, p)["roc_auc"]
  assert ci["roc_auc"][0] < point < ci["roc_auc"][1]
  acc = threshold_metrics(y, p, 0.5)["accuracy"]
  assert ci["accuracy"][0] <= acc <= ci["accuracy"][1]
  # Resampling whole patients: images of one patient stay together, so intervals are wider than per image.
  per_image = bootstrap_ci(y, p, np.arange(len(y)), 0.5, n_boot=300, seed=1)
  width = lambda c: c["accuracy"][1] - c["accuracy"][0]  # noqa: E731
  assert width(ci) > width(per_image)
  perfect = bootstrap_ci(y, y.astype(float), patients, 0.5, n_boot=50)
  assert perfect["roc_auc"] == [1.0, 1.0] and perfect["sensitivity"] == [1.0, 1.0]
