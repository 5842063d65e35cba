"""`covidct cv`: patient-grouped folds over train + validation, reproducible from a seed, never reading test."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from covidct.cli import main
from covidct.cv import fold_summary, make_folds


def test_folds_group_patients_stratify_and_follow_the_seed():
  rng = np.random.default_rng(0)
  patients = np.array([f"p{i}" for i in rng.integers(0, 120, 400)])
  labels = np.array([hash(p) % 2 for p in patients])  # a patient's images share a label, as in COVID-CT
  folds = make_folds(labels, patients, k=5, seed=3)
  assert set(folds) == set(range(5))
  for p in np.unique(patients):  # no patient in two folds
    assert len(set(folds[patients == p])) == 1
  share = [labels[folds == i].mean() for i in range(5)]
  assert max(share) - min(share) < 0.15  # stratified as far as whole patients allow
  np.testing.assert_array_equal(make_folds(labels, patients, k=5, seed=3), folds)  # reproducible
  assert not np.array_equal(make_folds(labels, patients, k=5, seed=4), folds)  # another seed, other folds


@pytest.mark.slow
def test_folds_of_the_real_split(full_data_dir):
  from covidct.data import split_labels

  meta = split_labels("train+validation", str(full_data_dir))
  assert len(meta["labels"]) == 543 and len(np.unique(meta["patient_ids"])) == 289
  folds = make_folds(meta["labels"], meta["patient_ids"], k=5, seed=0)
  for i in range(5):
    held_out, rest = set(meta["patient_ids"][folds == i]), set(meta["patient_ids"][folds != i])
    assert not held_out & rest
    assert 0.35 < meta["labels"][folds == i].mean() < 0.6  # 251 COVID of 543 overall (0.46)


def test_fold_summary_picks_the_epoch_and_thresholds_on_other_folds():
  rng = np.random.default_rng(0)
  labels = [rng.integers(0, 2, 40) for _ in range(4)]
  # Epoch 0 is noise, epoch 1 separates the classes, epoch 2 is as good: the earlier of the tie is chosen.
  probs = [np.stack([rng.random(40), 0.2 + 0.6 * y + rng.normal(0, 0.05, 40), 0.2 + 0.6 * y + rng.normal(0, 0.05, 40)])
           for y in labels]
  probs[0][2] = probs[0][1]  # identical on one fold, so epochs 1 and 2 tie only if every fold ties
  result = fold_summary(probs, labels, target_sensitivity=0.9)
  assert result["epochs"] in (2, 3) and result["roc_auc"]["mean"] > 0.99
  # Fold 0's threshold is chosen on folds 1-3 alone: changing fold 0's probabilities leaves it where it is.
  moved = [p.copy() for p in probs]
  moved[0][:] = moved[0] * 0.5
  again = fold_summary(moved, labels, target_sensitivity=0.9)
  assert again["epochs"] == result["epochs"]
  assert again["folds"][0]["threshold"] == result["folds"][0]["threshold"]
  assert again["folds"][1]["threshold"] != result["folds"][1]["threshold"]


@pytest.fixture(scope="module")
def cv_run(dummy_data_dir, tmp_path_factory, request):
  """A 3-fold cv of the small `final` model (48 px, 2 epochs, inputs cropped to the lungs' box) on dummy data, with every dataset
  read recorded."""
  import covidct.data

  reads = []
  original = covidct.data.load_builder

  def recording(data_dir=None, source="covid_ct"):
    builder = original(data_dir, source)
    as_dataset = builder.as_dataset

    def spy(*args, **kwargs):
      reads.append(kwargs.get("split", args[0] if args else None))
      return as_dataset(*args, **kwargs)

    builder.as_dataset = spy
    return builder

  mp = pytest.MonkeyPatch()
  mp.setattr(covidct.data, "load_builder", recording)
  out = tmp_path_factory.mktemp("cv") / "cv"
  res = CliRunner().invoke(main, ["cv", "--out", str(out), "--folds", "3", "--epochs", "2", "--image-size", "48",
                                  "--batch-size", "4", "--lung-crop", "box", "--data-dir", str(dummy_data_dir), "--quiet"])
  mp.undo()
  assert res.exit_code == 0, res.output
  return out, reads, res.output


def test_cv_command_writes_folds_and_never_reads_test(cv_run, dummy_data_dir):
  from covidct.data import split_labels

  out, reads, output = cv_run
  assert reads and all("test" not in str(split) for split in reads), reads
  folds = json.loads((out / "folds.json").read_text())
  meta = split_labels("train+validation", str(dummy_data_dir))
  patients = [set(f["patients"]) for f in folds["folds"]]
  assert set().union(*patients) == set(meta["patient_ids"]) and sum(map(len, patients)) == len(set(meta["patient_ids"]))
  # The folds written are the ones make_folds gives for the seed, so another option can be compared on them.
  want = make_folds(meta["labels"], meta["patient_ids"], k=3, seed=0)
  for i, f in enumerate(folds["folds"]):
    assert sorted(f["filenames"]) == sorted(meta["filenames"][want == i])
  result = json.loads((out / "cv.json").read_text())
  assert len(result["folds"]) == 3 and result["epochs"] in (1, 2) and result["finished_folds"] == [0, 1, 2]
  for f in result["folds"]:
    fold_dir = out / f"fold_{f['fold']}"
    summary = json.loads((fold_dir / "history.json").read_text())["summary"]
    assert summary["epochs_run"] == 2  # the full schedule: no early stopping in cv
    assert summary["kept"] == "last"  # the fold's model is never an epoch picked on its own held-out patients
    assert f"{len(folds['folds'][f['fold']]['patients'])} patients" in summary["validation_data"]
    saved = np.load(fold_dir / "validation_predictions.npz")
    assert saved["probabilities"].shape == (2, f["examples"])
  assert "mean +- sd" in output and "cv.md" in output


def test_cv_audits_each_fold_model_on_its_held_out_patients(cv_run):
  from covidct.metrics import ranking_metrics
  from covidct.data import CONSUMER_RESIZES as METHODS

  out, _, output = cv_run
  result = json.loads((out / "cv.json").read_text())
  audit = result["audit"]
  assert audit["images"] == sum(f["examples"] for f in result["folds"]) and audit["fold_model"] == "last"
  assert audit["lung_crop"] == "box" == json.loads((out / "config.json").read_text())["lung_crop"]
  assert set(audit["resize_agreement"]) == set(METHODS)
  assert all(0 <= a <= 1 for a in audit["resize_agreement"].values())
  # The audit re-scores each fold's saved model on the held-out images read afresh and cut to their lung field as
  # training cut them: its full-image ROC AUC is the one training recorded for that fold's last epoch.
  for row in audit["per_fold"]:
    saved = np.load(out / f"fold_{row['fold']}" / "validation_predictions.npz")
    assert row["full"] == pytest.approx(ranking_metrics(saved["labels"], saved["probabilities"][-1])["roc_auc"], abs=1e-6)
  assert "Out-of-fold shortcut audit" in output and "lungs hidden" in (out / "cv.md").read_text()


def test_compare_reads_a_cv_output(cv_run):
  out, _, _ = cv_run
  res = CliRunner().invoke(main, ["compare", str(out)])
  assert res.exit_code == 0, res.output
  result = json.loads((out / "cv.json").read_text())
  assert f"{result['roc_auc']['mean']:.3f} +- {result['roc_auc']['sd']:.3f}" in res.output
  assert "CV ROC AUC" in res.output
  assert "CV ROC AUC, lungs hidden" in res.output
  assert f"{result['audit']['roc_auc']['lungs_only']['mean']:.3f}" in res.output


def test_cv_stops_at_max_minutes_and_refuses_bad_input(dummy_data_dir, tmp_path):
  runner = CliRunner()
  out = tmp_path / "cv"
  # Past the limit after the first epoch of the first fold: no fold finishes, so nothing is summarised or left.
  res = runner.invoke(main, ["cv", "--out", str(out), "--folds", "3", "--epochs", "3", "--image-size", "48",
                             "--batch-size", "4", "--max-minutes", "0.0001", "--data-dir", str(dummy_data_dir),
                             "--quiet"])
  assert res.exit_code == 1 and "only 0 of 3 folds finished" in res.output and "Traceback" not in res.output
  assert not out.exists() and not list(tmp_path.glob(".cv.partial-*"))
  res = runner.invoke(main, ["cv", "--out", str(out), "--folds", "20", "--data-dir", str(dummy_data_dir)])
  assert res.exit_code == 1 and "2 <= k <= the number of patients (8)" in res.output
  (tmp_path / "exists").mkdir()
  res = runner.invoke(main, ["cv", "--out", str(tmp_path / "exists"), "--data-dir", str(dummy_data_dir)])
  assert res.exit_code == 1 and "exists" in res.output
  res = runner.invoke(main, ["cv", "--out", str(out), "--model", "nope", "--data-dir", str(dummy_data_dir)])
  assert res.exit_code == 1 and "unknown model 'nope'" in res.output
  res = runner.invoke(main, ["cv", "--out", str(out), "--lung-crop", "lungs", "--data-dir", str(dummy_data_dir)])
  assert res.exit_code == 2 and "'lungs' is not one of" in res.output
  from covidct.config import resolve
  from covidct.errors import CovidctError

  with pytest.raises(CovidctError, match="lung_crop must be one of field, box"):
    resolve("finetune", lung_crop="lungs")


def test_the_model_of_record_trains_on_two_sources_and_keeps_validation_for_its_threshold():
  """The mixed recipe has no cross-validated record: the main job trains it on train for its whole schedule
  (patience 0) and fits the threshold on every training source's validation split (the calibration split)."""
  from covidct.config import CROSS_VALIDATED, MODEL_OF_RECORD, RECIPES

  cfg = RECIPES[MODEL_OF_RECORD]
  assert MODEL_OF_RECORD == "mixed" and MODEL_OF_RECORD not in CROSS_VALIDATED
  assert cfg.sources == ("covid_ct", "cc_ccii") and cfg.patience == 0 and cfg.slices_per_patient == 4
  finetune = RECIPES["finetune"]  # the same network and schedule as the single-source recipe the protocol compared
  assert all(getattr(cfg, f) == getattr(finetune, f) for f in ("model", "image_size", "head_epochs", "epochs",
                                                               "learning_rate", "fine_tune_learning_rate",
                                                               "freeze_batch_norm", "augment"))


def test_the_finetune_recipe_is_the_schedule_its_cross_validation_chose():
  import math

  from covidct.config import CROSS_VALIDATED, RECIPES

  cfg, record = RECIPES["finetune"], CROSS_VALIDATED["finetune"]
  assert cfg.head_epochs + cfg.epochs == record.epochs
  assert 0 < record.threshold < 1 and record.temperature > 0 and record.folds == 5
  # The quantization-aware copy's probabilities are sigmoid(logit / T): the threshold moves with them.
  logit = math.log(record.threshold / (1 - record.threshold))
  assert record.quantized_threshold() == pytest.approx(1 / (1 + math.exp(-logit / record.temperature)))
  assert "covidct cv --recipe finetune" in record.command
