"""The main job (`covidct pipeline`) end to end on dummy data."""

from __future__ import annotations


import pytest
from click.testing import CliRunner

from covidct.cli import main
from tests.conftest import DUMMY_DATA


def test_pipeline_end_to_end_on_dummy_data(dummy_builder, tmp_path):
  from covidct.models import mobilenet_weights_file
  from tests.conftest import KERAS_WEIGHTS

  if not (KERAS_WEIGHTS / mobilenet_weights_file(0.35)).exists():
    pytest.skip(reason=f"the MobileNetV2 weight files are not in {KERAS_WEIGHTS}")
  # The two-source recipe with a smaller schedule: no cross-validated record, so it trains on train for the whole
  # schedule and fits its threshold on the validation splits of both sources (the record's path: the next test).
  # Trained on two sources (one slice per patient), evaluated on all three: COVID-CT-MD is an external site.
  res = CliRunner().invoke(main, ["pipeline", "--out", str(tmp_path / "job"), "--manual-dir", str(DUMMY_DATA),
                                  "--manual-dir", f"cc_ccii={DUMMY_DATA / 'cc_ccii'}", "--manual-dir",
                                  f"covid_ct_md={DUMMY_DATA / 'covid_ct_md'}", "--recipe", "mixed",
                                  "--slices-per-patient", "1",
                                  "--data-dir", str(tmp_path / "tfds"), "--weights-dir", str(KERAS_WEIGHTS),
                                  "--model", "mobilenet_v2_0.35", "--head-epochs", "1", "--epochs", "1",
                                  "--image-size", "48", "--formats", "tflite_float32,onnx_float32", "--bootstrap",
                                  "20", "--force-push"])
  assert res.exit_code == 0, res.output
  assert "Recipe `mixed`, model `mobilenet_v2_0.35`" in res.output
  assert ("trained on `covid_ct` + `cc_ccii`; trained on train for 2 epochs (all kept; validation untouched), then "
          "made quantization-aware") in res.output
  job = tmp_path / "job"
  # The shipped threshold is fitted on the calibration split: the highest one that reaches the target sensitivity on
  # each training source's validation split, whose figures at it the report states.
  from covidct.config import TARGET_SENSITIVITY
  from covidct.data import eval_set
  from covidct.manifest import Manifest
  from covidct.metrics import choose_threshold, threshold_metrics
  from covidct.runners import SavedModelRunner

  runner = SavedModelRunner(job / "model-qat" / "saved_model")  # the shipped, quantization-aware copy
  val = {s: eval_set(s, "validation", 48, str(tmp_path / "tfds")) for s in ("covid_ct", "cc_ccii")}
  probs = {s: runner(v.images).ravel() for s, v in val.items()}
  shipped = Manifest.load(job / "export").threshold
  assert shipped == pytest.approx(min(choose_threshold(val[s].labels, probs[s]) for s in val), abs=1e-6)
  for s, v in val.items():
    assert threshold_metrics(v.labels, probs[s], shipped)["sensitivity"] >= TARGET_SENSITIVITY
  calibration = res.output.split("## The operating point, fitted on a calibration split")[1].split("##")[0]
  assert "`covid_ct`" in calibration and "`cc_ccii`" in calibration and f"{shipped:.4f}" in calibration
  report = (job / "report.md").read_text()
  card = (job / "serving" / "1" / "MODEL_CARD.md").read_text()
  for text in (report, card):
    table = text.split("## Every source's test split")[1]
    assert "`covid_ct_md`" in table and "**external**" in table and table.count("trained on") >= 2
  import json

  config = json.loads((job / "model" / "config.json").read_text())
  assert config["sources"] == ["covid_ct", "cc_ccii"] and config["slices_per_patient"] == 1
  blessing = json.loads((job / "serving" / "1" / "blessing.json").read_text())
  assert [r["source"] for r in blessing["sources"]["rows"]] == ["covid_ct", "cc_ccii", "covid_ct_md"]
  assert "## Artifacts and parity" in report and "tflite_float32" in report and "serving/1/" in report
  for path in ("model/saved_model/saved_model.pb", "model-qat/evaluation-test/roc.png", "export/manifest.json",
               "export/parity.md", "serving/1/MODEL_CARD.md", "bench/bench.md"):
    assert (job / path).exists(), path
  times = dict(part.split() for part in report.split("## Wall time (s)")[1].strip().splitlines()[0].split(" | "))
  steps = [float(v) for k, v in times.items() if k != "total"]
  assert list(times) == ["dataset", "train", "qat", "calibrate", "evaluate", "export", "bench", "push", "total"]
  # Benchmarked before the push: the pushed version carries the recommendation, and predict on it uses it.
  from covidct.predict import resolve_model

  recommended = Manifest.load(job / "serving" / "1" / "assets.extra").recommended
  assert recommended and recommended == Manifest.load(job / "export").recommended
  assert "Recommended on this machine" in report and recommended["file"] in report
  assert resolve_model(job / "serving" / "1")[0] == job / "serving" / "1" / "assets.extra" / recommended["file"]
  assert not any(v.startswith("-") for v in times.values())  # each step its own time, never "-0.0"
  assert abs(sum(steps) - float(times["total"])) < 0.5


def test_the_model_of_record_trains_on_train_and_validation_and_ships_its_cross_validated_threshold(
    dummy_builder, tmp_path):
  import dataclasses
  import json

  import numpy as np

  from covidct.config import CrossValidated
  from covidct.errors import CovidctError
  from covidct.models import mobilenet_weights_file
  from covidct.pipeline import run
  from covidct.runners import SavedModelRunner
  from tests.conftest import KERAS_WEIGHTS

  if not (KERAS_WEIGHTS / mobilenet_weights_file(0.35)).exists():
    pytest.skip(reason=f"the MobileNetV2 weight files are not in {KERAS_WEIGHTS}")
  record = CrossValidated(epochs=2, threshold=0.3, temperature=2.0, roc_auc=0.8, roc_auc_sd=0.05,
                          pooled_roc_auc=0.79, sensitivity=0.9, specificity=0.6, folds=5, command="covidct cv ...",
                          measured="here")
  overrides = dict(model="mobilenet_v2_0.35", image_size=64, batch_size=4, head_epochs=1, epochs=1,
                   weights_dir=str(KERAS_WEIGHTS))
  with pytest.raises(CovidctError, match="not the 3 epochs"):
    run(tmp_path / "bad", manual_dir=DUMMY_DATA, data_dir=tmp_path / "tfds", recipe="finetune", overrides=overrides,
        record=dataclasses.replace(record, epochs=3), echo=lambda m: None)
  assert not (tmp_path / "bad").exists()
  job = tmp_path / "job"
  run(job, manual_dir=DUMMY_DATA, data_dir=tmp_path / "tfds", recipe="finetune", overrides=overrides,
      formats="tflite_float32,onnx_int8", n_boot=20, force_push=True, record=record, echo=lambda m: None)
  history = json.loads((job / "model" / "history.json").read_text())["summary"]
  assert history["train_data"] == "train+validation" and history["kept"] == "last" and history["epochs_run"] == 2
  qat_config = json.loads((job / "model-qat" / "config.json").read_text())["quantization_aware"]
  assert qat_config["temperature"] == 2.0 and qat_config["epochs"] == 0
  # The shipped threshold is the record's, mapped through the temperature: the float model's decisions at 0.3 are
  # the quantization-aware model's at sigmoid(logit(0.3) / 2).
  from covidct.manifest import Manifest

  manifest = Manifest.load(job / "export")
  expected = 1 / (1 + np.exp(-np.log(0.3 / 0.7) / 2.0))
  assert manifest.threshold == record.quantized_threshold() and abs(manifest.threshold - expected) < 1e-12
  assert "cross-validation" in manifest.operating_threshold["chosen_on"]
  # It trained on the validation split: the manifest says its validation figures are in-sample.
  assert manifest.metrics["saved_model"]["validation"]["in_sample"] is True
  assert "in_sample" not in manifest.metrics["saved_model"]["test"]
  pushed = Manifest.load(job / "serving" / "1" / "assets.extra")
  assert pushed.threshold == manifest.threshold
  assert "cross-validation" in (job / "serving" / "1" / "MODEL_CARD.md").read_text()
  report = (job / "report.md").read_text()
  assert "## Chosen by cross-validation" in report and "trained on train + validation for 2 epochs" in report
  times = report.split("## Wall time (s)")[1]
  assert "train" in times and "qat" in times
  # The shipped copy is the quantization-aware one: it computes in 8-bit steps, its output on the 8-bit grid.
  from covidct.data import split_arrays
  from covidct.quantize import is_quantization_aware

  assert manifest.quantization_aware and is_quantization_aware(job / "model-qat" / "saved_model")
  images = split_arrays("test", str(tmp_path / "tfds"), 64)["images"]
  p_qat = SavedModelRunner(job / "model-qat" / "saved_model")(images).reshape(-1)
  np.testing.assert_allclose(p_qat * 256, np.round(p_qat * 256), atol=1e-4)

