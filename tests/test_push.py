"""covidct push: bless on figures it measures, refuse damaged exports, distinct versions under concurrency."""

from __future__ import annotations

import json
import os
import pathlib
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from covidct.cli import main
from covidct.data import split_arrays
from covidct.runners import SavedModelRunner
from covidct.modelio import export_saved_model
from tests.conftest import SIZE


def test_push_versions_refusal_and_list(exported, dummy_data_dir, tmp_path):
  serving = tmp_path / "serving"
  runner = CliRunner()
  data = ["--data-dir", str(dummy_data_dir)]
  refused = runner.invoke(main, ["push", str(exported), "--serving", str(serving), "--min-roc-auc", "1",
                                 "--min-sensitivity", "1", "--min-specificity", "1", *data])
  assert refused.exit_code == 1 and "not blessed" in refused.stderr and not serving.exists() or not any(serving.iterdir())
  ok = runner.invoke(main, ["push", str(exported), "--serving", str(serving), "--min-roc-auc", "0",
                            "--min-sensitivity", "0", "--min-specificity", "0", *data])
  assert ok.exit_code == 0, ok.output
  forced = runner.invoke(main, ["push", str(exported), "--serving", str(serving), "--min-roc-auc", "1",
                                "--min-sensitivity", "1", "--min-specificity", "1", "--force", *data])
  assert forced.exit_code == 0 and "version 2" in forced.output
  assert sorted(p.name for p in serving.iterdir()) == ["1", "2"]  # no partial folder left
  for v in ("1", "2"):
    assert (serving / v / "saved_model.pb").exists() and (serving / v / "MODEL_CARD.md").exists()
    assert (serving / v / "assets.extra" / "manifest.json").exists()
  card = (serving / "1" / "MODEL_CARD.md").read_text()
  assert "not a diagnostic device" in card and "95% CI" in card and "slice" in card
  # The card gives this model's own shortcut audit, measured by the export on the test split.
  audit = json.loads((exported / "manifest.json").read_text())["shortcut_audit"]["roc_auc"]
  assert f"lungs hidden {audit['lungs_hidden']:.3f}; lungs only {audit['lungs_only']:.3f}" in card
  assert json.loads((serving / "2" / "blessing.json").read_text())["forced"] is True
  listed = runner.invoke(main, ["push", "--serving", str(serving), "--list"])
  assert listed.exit_code == 0 and "blessed" in listed.output and "FORCED" in listed.output
  np.testing.assert_allclose(SavedModelRunner(serving / "1")(np.zeros((1, SIZE, SIZE, 1), np.uint8)),
                             SavedModelRunner(exported / "saved_model")(np.zeros((1, SIZE, SIZE, 1), np.uint8)))


def test_push_gate_refuses_a_weak_model_on_figures_it_measures(model_dir, exported, dummy_data_dir, tmp_path):
  """The gate can say no: a model whose scores carry no information is refused by the default floors, whatever its
  manifest says; the figures blessed on are measured at push time."""
  import keras

  model = keras.saving.load_model(model_dir / "model.keras")
  head = model.get_layer("covid_probability")
  head.set_weights([np.zeros_like(w) for w in head.get_weights()])  # P(COVID) = 0.5 for every image
  (tmp_path / "weak").mkdir()
  export_saved_model(model, tmp_path / "weak" / "saved_model", SIZE)
  data = ["--data-dir", str(dummy_data_dir)]
  runner = CliRunner()
  res = runner.invoke(main, ["export", str(tmp_path / "weak"), "--out", str(tmp_path / "weak-export"), "--formats",
                             "tflite_float32", "--bootstrap", "10", *data])
  assert res.exit_code == 0, res.output
  manifest = json.loads((tmp_path / "weak-export" / "manifest.json").read_text())
  manifest["metrics"]["saved_model"]["test"]["roc_auc"] = 0.99  # an edited claim changes nothing
  (tmp_path / "weak-export" / "manifest.json").write_text(json.dumps(manifest))
  res = runner.invoke(main, ["push", str(tmp_path / "weak-export"), "--serving", str(tmp_path / "serving"), *data])
  assert res.exit_code == 1 and "not blessed: test roc auc 0.500 < 0.7" in res.stderr, res.output
  assert not (tmp_path / "serving").exists() or not any((tmp_path / "serving").iterdir())
  # A genuine model is then blessed on what it measures, and recorded so.
  res = runner.invoke(main, ["push", str(exported), "--serving", str(tmp_path / "serving"), "--min-roc-auc", "0",
                             "--min-sensitivity", "0", "--min-specificity", "0", *data])
  assert res.exit_code == 0, res.output
  blessing = json.loads((tmp_path / "serving" / "1" / "blessing.json").read_text())
  want = SavedModelRunner(exported / "saved_model")(split_arrays("test", str(dummy_data_dir), SIZE)["images"])
  assert blessing["test"]["examples"] == len(want) and blessing["gate"]["min_roc_auc"] == 0


@pytest.mark.parametrize("damage", ["flipped byte", "extra file", "symlink", "missing file", "bad manifest",
                                    "wrong answers"])
def test_push_refuses_a_damaged_export_and_leaves_nothing(exported, dummy_data_dir, tmp_path, damage):
  copy = tmp_path / "export"
  shutil.copytree(exported, copy)
  if damage == "flipped byte":
    data = bytearray((copy / "model_float32.tflite").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / "model_float32.tflite").write_bytes(bytes(data))
    want = "model_float32.tflite does not match its SHA-256"
  elif damage == "extra file":
    (copy / "notes.txt").write_text("hello")
    want = "holds files its manifest does not list (notes.txt)"
  elif damage == "symlink":
    (tmp_path / "secret.txt").write_text("outside the export")
    (copy / "link.txt").symlink_to(tmp_path / "secret.txt")
    want = "link.txt is a symbolic link"
  elif damage == "missing file":
    (copy / "model_float32.onnx").unlink()
    want = "model_float32.onnx is listed in the manifest but missing"
  elif damage == "bad manifest":
    (copy / "manifest.json").write_text("{not json")
    want = "manifest.json is not a covidct manifest"
  else:  # files and hashes consistent, but the SavedModel does not give the answers recorded for it
    from covidct.fsutil import sha256

    vectors = copy / "test_data" / "saved_model.npz"
    with np.load(vectors) as z:
      saved = dict(z)
    saved["covid_probability"] = 1 - saved["covid_probability"]
    np.savez(vectors, **saved)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["files"]["test_data/saved_model.npz"] = {"bytes": vectors.stat().st_size, "sha256": sha256(vectors)}
    (copy / "manifest.json").write_text(json.dumps(manifest))
    want = "does not give its recorded answers in a fresh process: FAIL"
  res = CliRunner().invoke(main, ["push", str(copy), "--serving", str(tmp_path / "serving"), "--force",
                                  "--data-dir", str(dummy_data_dir)])
  assert res.exit_code == 1 and want in res.stderr and "Traceback" not in res.output, res.output
  assert not (tmp_path / "serving").exists() or not any((tmp_path / "serving").iterdir())


def test_concurrent_pushes_get_distinct_versions(exported, dummy_data_dir, tmp_path, monkeypatch):
  import covidct.push as push_module

  serving = tmp_path / "serving"
  gate = ["--min-roc-auc", "0", "--min-sensitivity", "0", "--min-specificity", "0", "--data-dir", str(dummy_data_dir)]
  assert CliRunner().invoke(main, ["push", str(exported), "--serving", str(serving), *gate]).exit_code == 0
  # A second push that read the versions before the first one landed (a stale view) must not overwrite version 1.
  monkeypatch.setattr(push_module, "versions", lambda root: [])
  real_rename = os.rename
  calls = []

  def racing_rename(src, dst):  # another push lands version 2 just before this one renames
    calls.append(dst)
    if len(calls) == 1:
      shutil.copytree(serving / "1", serving / "2")
    return real_rename(src, dst)

  monkeypatch.setattr(os, "rename", racing_rename)
  res = CliRunner().invoke(main, ["push", str(exported), "--serving", str(serving), *gate])
  assert res.exit_code == 0 and "version 3" in res.output, res.output
  assert sorted(p.name for p in serving.iterdir()) == ["1", "2", "3"]
  assert "version 3" in (serving / "3" / "MODEL_CARD.md").read_text()


def test_the_gate_holds_every_source_to_its_floors_and_names_the_one_that_fails():
  from covidct.config import GateConfig
  from covidct.push import bless

  good = {"roc_auc": 0.9, "sensitivity": 0.9, "specificity": 0.9}
  sources = {"rows": [
      {"source": "covid_ct", "roc_auc": 0.1, "at_threshold": {"sensitivity": 0.0, "specificity": 0.0}},  # `good`'s
      {"source": "cc_ccii", "roc_auc": 0.95, "at_threshold": {"sensitivity": 0.9, "specificity": 0.3}},
      # the external site is held to the ROC AUC floor only
      {"source": "covid_ct_md", "roc_auc": 0.65, "at_threshold": {"sensitivity": 0.1, "specificity": 0.1}}]}
  ok, reasons = bless(good, None, GateConfig(), True, sources)
  assert not ok and reasons == ["cc_ccii test specificity 0.300 < 0.5", "covid_ct_md test roc auc 0.650 < 0.7"]
  sources["rows"][1]["at_threshold"]["specificity"] = 0.6
  sources["rows"][2]["roc_auc"] = float("nan")  # one class only: not a pass
  assert bless(good, None, GateConfig(), True, sources)[1] == ["covid_ct_md test roc auc nan < 0.7"]
  sources["rows"][2]["roc_auc"] = 0.71
  assert bless(good, None, GateConfig(), True, sources) == (True, [])
  assert bless(good, None, GateConfig(), True, None) == (True, [])  # no other source prepared: COVID-CT alone


def test_a_push_measures_and_records_every_prepared_source(exported, dummy_data_dir, tmp_path):
  res = CliRunner().invoke(main, ["push", str(exported), "--serving", str(tmp_path / "serving"), "--min-roc-auc",
                                  "0", "--min-sensitivity", "0", "--min-specificity", "0", "--skip-infra-validation",
                                  "--data-dir", str(dummy_data_dir)])
  assert res.exit_code == 0, res.output
  blessing = json.loads((tmp_path / "serving" / "1" / "blessing.json").read_text())
  rows = {r["source"]: r for r in blessing["sources"]["rows"]}
  assert list(rows) == ["covid_ct", "cc_ccii", "covid_ct_md"] and "predictions" not in rows["cc_ccii"]
  assert rows["covid_ct"]["roc_auc"] == pytest.approx(blessing["test"]["roc_auc"])
  card = (tmp_path / "serving" / "1" / "MODEL_CARD.md").read_text()
  assert "## Every source's test split (SavedModel, measured at push)" in card and "**external**" in card


def test_export_bench_evaluate_then_push_works_and_ships_only_the_export(exported, dummy_data_dir, tmp_path):
  """The documented flow: `covidct bench EXPORT` writes EXPORT/bench/ and `covidct evaluate EXPORT/FILE` writes a
  report folder beside the file; push neither refuses them as unlisted files nor ships them (issue 32)."""
  copy = tmp_path / "export"
  shutil.copytree(exported, copy)
  data = ["--data-dir", str(dummy_data_dir)]
  res = CliRunner().invoke(main, ["bench", str(copy), "--batch-sizes", "1", "--threads", "1", "--runs", "3",
                                  "--warmup", "1", "--runtimes", "litert", *data])
  assert res.exit_code == 0 and (copy / "bench" / "bench.json").is_file(), res.output
  res = CliRunner().invoke(main, ["evaluate", str(copy / "model_float32.tflite"), "--bootstrap", "10", *data])
  assert res.exit_code == 0, res.output
  reports = [p.name for p in copy.iterdir() if p.is_dir() and "evaluation-" in p.name]
  assert reports == ["model_float32-evaluation-test"]
  res = CliRunner().invoke(main, ["push", str(copy), "--serving", str(tmp_path / "serving"), "--force", *data])
  assert res.exit_code == 0, res.output
  shipped = {p.name for p in (tmp_path / "serving" / "1" / "assets.extra").iterdir()}
  assert "bench" not in shipped and not any("evaluation" in n for n in shipped)
  (copy / "bench" / "notes.txt").write_text("not bench's")  # anything else in the export is still refused
  (copy / "extra").mkdir()
  (copy / "extra" / "x.bin").write_bytes(b"x")
  res = CliRunner().invoke(main, ["push", str(copy), "--serving", str(tmp_path / "serving"), "--force", *data])
  assert res.exit_code == 1 and "does not list (extra/x.bin)" in res.stderr, res.output


def test_a_file_swapped_after_the_checks_is_not_pushed(exported, dummy_data_dir, tmp_path, monkeypatch):
  """Push checks what it wrote: a copy changed between the checks and the copy (a race, or an attacker with write
  access) is refused, and nothing is left behind."""
  import covidct.push as push_module

  real_stage = push_module.stage_version

  def swapped(src, dst):
    real_stage(src, dst)
    target = pathlib.Path(dst) / "assets.extra" / "model_float32.onnx"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))

  monkeypatch.setattr(push_module, "stage_version", swapped)
  serving = tmp_path / "serving"
  res = CliRunner().invoke(main, ["push", str(exported), "--serving", str(serving), "--force", "--data-dir",
                                  str(dummy_data_dir), "--skip-infra-validation"])
  assert res.exit_code == 1 and "model_float32.onnx changed while it was being pushed" in res.stderr, res.output
  assert not serving.exists() or not [p for p in serving.iterdir() if p.name != "push"]
  assert not list(serving.rglob(".push.partial*"))


def test_the_model_card_shows_what_push_measured_not_what_the_manifest_claims(exported, dummy_data_dir, tmp_path):
  """Forged test figures in a manifest (its own file has no hash) never reach the model card, even with --force."""
  copy = tmp_path / "export"
  shutil.copytree(exported, copy)
  manifest = json.loads((copy / "manifest.json").read_text())
  manifest["metrics"]["saved_model"]["test"]["roc_auc"] = 0.987654
  (copy / "manifest.json").write_text(json.dumps(manifest))
  res = CliRunner().invoke(main, ["push", str(copy), "--serving", str(tmp_path / "serving"), "--force",
                                  "--skip-infra-validation", "--data-dir", str(dummy_data_dir)])
  assert res.exit_code == 0, res.output
  card = (tmp_path / "serving" / "1" / "MODEL_CARD.md").read_text()
  blessing = json.loads((tmp_path / "serving" / "1" / "blessing.json").read_text())
  assert "0.988" not in card and "measured at push" in card
  assert f"{blessing['test']['roc_auc']:.3f}" in card.split("## Metrics")[1].split("##")[0]
