"""Export, parity, push and predict on a small model built by the real build_model and trained on dummy data."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import zipfile

import numpy as np
import pytest
from click.testing import CliRunner

from covidct.cli import main
from covidct.data import split_arrays
from covidct.errors import CovidctError
from covidct.runners import SavedModelRunner, load_runner
from covidct.train import export_saved_model
from export.errors import UnknownFormatError
from export.formats import FORMATS, export_format, parse_formats
from export.parity import check_parity
from tests.conftest import DUMMY_DATA, SIZE


def test_every_format_round_trips(model_dir, dummy_data_dir, tmp_path):
  reps = split_arrays("train", str(dummy_data_dir), SIZE)["images"]
  test = split_arrays("test", str(dummy_data_dir), SIZE)["images"]
  reference = SavedModelRunner(model_dir / "saved_model")(test)
  onnx_float = None
  for fmt in FORMATS:
    result = export_format(fmt, model_dir / "saved_model", tmp_path, reps, onnx_float)
    if fmt == "onnx_float32":
      onnx_float = result.path
    assert result.size_bytes > 0 and len(result.sha256) == 64
    runner = load_runner(result.path)
    assert (runner.input_name, runner.output_name, runner.image_size) == ("image", "covid_probability", SIZE)
    got = runner(test)
    assert got.shape == reference.shape
    tol = FORMATS[fmt][1] or 0.05
    np.testing.assert_allclose(got, reference, atol=tol, err_msg=fmt)
  assert not list(tmp_path.glob(".*partial*"))
  from export.formats import tflite_ops

  ops = tflite_ops(tmp_path / FORMATS["tflite_int8"][0])
  assert not [o for o in ops if o.lower().startswith("flex")]
  int8 = load_runner(tmp_path / FORMATS["tflite_int8"][0])
  assert int8.input_dtype == np.uint8 and int8.output["dtype"] == np.uint8  # integer in and out


def test_export_folder_and_manifest(exported):
  manifest = json.loads((exported / "manifest.json").read_text())
  assert manifest["parity_passed"] is True
  assert manifest["input"] == {"name": "image", "shape": [None, SIZE, SIZE, 1], "dtype": "uint8"}
  assert manifest["labels"] == ["NonCOVID", "COVID"]
  assert set(manifest["artifacts"]) == {"tflite_float32", "tflite_float16", "onnx_float32"}
  for name, info in manifest["files"].items():
    assert (exported / name).stat().st_size == info["bytes"]
  assert manifest["libraries"]["tensorflow"].startswith("2.21")
  parity = json.loads((exported / "parity.json").read_text())
  assert all(a["passed"] for a in parity["artifacts"])
  assert max(a["max_abs_diff"] for a in parity["artifacts"] if a["format"] != "tflite_float16") <= 1e-5
  # float16 is judged by its metrics, like the quantized copies; its max difference is reported, not gated.
  float16 = next(a for a in parity["artifacts"] if a["format"] == "tflite_float16")
  assert float16["tolerance"] is None and 0 < float16["max_abs_diff"] < 1e-2 and float16["agreement"] == 1.0
  for a in parity["artifacts"]:
    assert a["path"] == manifest["artifacts"][a["format"]]["file"]  # relative: the temporary folder is gone
    assert a["median_abs_diff"] <= a["max_abs_diff"] and a["rank_correlation"] > 0.99


def test_parity_fails_on_a_perturbed_model(model_dir, dummy_data_dir, tmp_path):
  import keras

  model = keras.saving.load_model(model_dir / "model.keras")
  last = model.get_layer("covid_probability")
  kernel, bias = last.get_weights()
  last.set_weights([kernel, bias + 0.5])  # shifts every probability
  export_saved_model(model, tmp_path / "perturbed", SIZE)
  result = export_format("tflite_float32", tmp_path / "perturbed", tmp_path)
  test = split_arrays("test", str(dummy_data_dir), SIZE)
  res = check_parity(SavedModelRunner(model_dir / "saved_model"), load_runner(result.path), "tflite_float32", test, 0.5)
  assert not res.passed and res.max_abs_diff > 1e-3
  assert any("tolerance" in f for f in res.failures)
  assert res.median_abs_diff > 1e-3  # the shift shows on the test images too; a monotone shift keeps the ranking


def test_parity_checks_names_first(model_dir, dummy_data_dir):
  ref = SavedModelRunner(model_dir / "saved_model")
  other = SavedModelRunner(model_dir / "saved_model")
  other.output_name = "logits"
  res = check_parity(ref, other, "tflite_float32", split_arrays("test", str(dummy_data_dir), SIZE), 0.5)
  assert res.failures == ["output name 'logits' != 'covid_probability'"]


def test_unknown_format_and_existing_out(model_dir, exported, tmp_path):
  with pytest.raises(UnknownFormatError, match="tflite_int4"):
    parse_formats("tflite_int4")
  res = CliRunner().invoke(main, ["export", str(model_dir), "--out", str(tmp_path / "x"), "--formats", "coreml"])
  assert res.exit_code == 1 and "unknown format" in res.stderr
  res = CliRunner().invoke(main, ["export", str(model_dir), "--out", str(exported)])
  assert res.exit_code == 1 and "exists" in res.stderr


def test_bad_model_files(tmp_path):
  (tmp_path / "broken.tflite").write_bytes(b"TFL3 not really")
  (tmp_path / "broken.onnx").write_bytes(b"\x08\x07")
  (tmp_path / "sm").mkdir()
  (tmp_path / "sm" / "saved_model.pb").write_bytes(b"garbage")
  for name in ("broken.tflite", "broken.onnx", "sm", "missing.onnx"):
    with pytest.raises(CovidctError):
      load_runner(tmp_path / name)


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
    from export.formats import sha256

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


def test_predict_scores_good_files_and_reports_bad_ones(exported, tmp_path):
  with zipfile.ZipFile(DUMMY_DATA / "Images-processed" / "CT_NonCOVID.zip") as zf:
    (tmp_path / "a.jpg").write_bytes(zf.read("CT_NonCOVID/0.jpg"))
    (tmp_path / "b.png").write_bytes(zf.read("CT_NonCOVID/14.png"))
  (tmp_path / "bad.png").write_bytes(b"not an image")
  files = [str(tmp_path / n) for n in ("a.jpg", "bad.png", "b.png")]
  for artifact in ("model_float32.tflite", "model_float32.onnx", "saved_model"):
    res = CliRunner().invoke(main, ["predict", *files, "--model", str(exported / artifact), "--json"])
    assert res.exit_code == 1
    out = json.loads(res.stdout)
    assert [r["file"] for r in out["results"]] == [files[0], files[2]]
    assert all(0 <= r["probability"] <= 1 and r["label"] in ("COVID", "NonCOVID") for r in out["results"])
    assert "bad.png: not a readable image" in res.stderr
    manifest = json.loads((exported / "manifest.json").read_text())
    assert out["results"][0]["threshold"] == pytest.approx(manifest["operating_threshold"]["value"])


def test_pipeline_end_to_end_on_dummy_data(dummy_builder, tmp_path):
  res = CliRunner().invoke(main, ["pipeline", "--out", str(tmp_path / "job"), "--manual-dir", str(DUMMY_DATA),
                                  "--data-dir", str(tmp_path / "tfds"), "--epochs", "1", "--image-size", "48",
                                  "--formats", "tflite_float32,onnx_float32", "--bootstrap", "20", "--force-push"])
  assert res.exit_code == 0, res.output
  job = tmp_path / "job"
  report = (job / "report.md").read_text()
  assert "## Artifacts and parity" in report and "tflite_float32" in report and "serving/1/" in report
  for path in ("model/saved_model/saved_model.pb", "model/evaluation-test/roc.png", "export/manifest.json",
               "export/parity.md", "serving/1/MODEL_CARD.md", "bench/bench.md"):
    assert (job / path).exists(), path
  times = dict(part.split() for part in report.split("## Wall time (s)")[1].strip().splitlines()[0].split(" | "))
  steps = [float(v) for k, v in times.items() if k != "total"]
  assert list(times) == ["dataset", "train", "evaluate", "export", "push", "bench", "total"]
  assert not any(v.startswith("-") for v in times.values())  # each step its own time, never "-0.0"
  assert abs(sum(steps) - float(times["total"])) < 0.5


def test_ensemble_and_flip_tta(model_dir, exported, dummy_data_dir, tmp_path):
  from covidct.runners import EnsembleRunner, FlipTTARunner

  images = split_arrays("test", str(dummy_data_dir), SIZE)["images"]
  a = load_runner(exported / "model_float32.onnx")
  b = load_runner(exported / "model_float32.tflite")
  np.testing.assert_allclose(EnsembleRunner([a, b])(images), (a(images) + b(images)) / 2, atol=1e-7)
  np.testing.assert_allclose(FlipTTARunner(a)(images), (a(images) + a(images[:, :, ::-1])) / 2, atol=1e-7)
  res = CliRunner().invoke(main, ["evaluate", str(model_dir), str(exported / "model_float32.onnx"), "--tta",
                                  "--data-dir", str(dummy_data_dir), "--bootstrap", "10"])
  assert res.exit_code == 1 and "needs --out" in res.stderr
  res = CliRunner().invoke(main, ["evaluate", str(model_dir), str(exported / "model_float32.onnx"), "--tta",
                                  "--data-dir", str(dummy_data_dir), "--bootstrap", "10", "--out", str(tmp_path / "e")])
  assert res.exit_code == 0, res.output
  report = json.loads((tmp_path / "e" / "report.json").read_text())
  assert len(report["model"]) == 2 and report["test_time_augmentation"] == "horizontal flip"


def test_onnx_metadata_and_test_vectors(exported, tmp_path):
  import onnxruntime as ort

  manifest = json.loads((exported / "manifest.json").read_text())
  props = ort.InferenceSession(str(exported / "model_float32.onnx")).get_modelmeta().custom_metadata_map
  assert json.loads(props["labels"]) == ["NonCOVID", "COVID"]
  assert float(props["operating_threshold"]) == manifest["operating_threshold"]["value"]
  assert props["Image.BitmapPixelFormat"] == "Gray8" and props["Image.NominalPixelRange"] == "NominalRange_0_255"
  assert "antialiasing" in props["preprocessing"]
  for fmt, art in manifest["artifacts"].items():  # the hashes are those of the files as shipped, metadata included
    assert art["sha256"] == manifest["files"][art["file"]]["sha256"], fmt
    assert art["test_vectors"]["path"] in {str(pathlib.Path(p).parent) for p in manifest["files"]} | set(manifest["files"])
  runner = CliRunner()
  res = runner.invoke(main, ["verify", *(str(exported / a["file"]) for a in manifest["artifacts"].values())])
  assert res.exit_code == 0, res.output
  assert res.output.count("pass  ") == len(manifest["artifacts"])
  # A lone copy keeps its meaning: the threshold comes from its own metadata, not from a manifest nearby.
  lone = tmp_path / "lone.onnx"
  lone.write_bytes((exported / "model_float32.onnx").read_bytes())
  with zipfile.ZipFile(DUMMY_DATA / "Images-processed" / "CT_NonCOVID.zip") as zf:
    (tmp_path / "a.jpg").write_bytes(zf.read("CT_NonCOVID/0.jpg"))
  here = json.loads(runner.invoke(main, ["predict", str(tmp_path / "a.jpg"), "--model", str(exported / "model_float32.onnx"),
                                         "--json"]).stdout)
  alone = json.loads(runner.invoke(main, ["predict", str(tmp_path / "a.jpg"), "--model", str(lone), "--json"]).stdout)
  assert alone["threshold"]["from"].endswith("(its ONNX metadata)")
  assert alone["results"][0]["label"] == here["results"][0]["label"]
  assert alone["threshold"]["value"] == here["threshold"]["value"]


def test_verify_fails_on_a_perturbed_copy(exported, tmp_path):
  import onnx
  from onnx import numpy_helper

  copy = tmp_path / "export"
  shutil.copytree(exported, copy, ignore=shutil.ignore_patterns("saved_model"))
  model = onnx.load(str(copy / "model_float32.onnx"))
  last = max((i for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT),
             key=lambda i: numpy_helper.to_array(i).size)
  w = numpy_helper.to_array(last)
  last.CopyFrom(numpy_helper.from_array((w * 1.5).astype(w.dtype), last.name))
  onnx.save(model, str(copy / "model_float32.onnx"))
  res = CliRunner().invoke(main, ["verify", str(copy / "model_float32.onnx"), str(copy / "model_float32.tflite")])
  assert res.exit_code == 1 and "FAIL  " in res.output and "pass  " in res.output
  assert "1 of 2 artifact(s) do not give the SavedModel's answers here" in res.output
  shutil.rmtree(copy / "test_data")
  res = CliRunner().invoke(main, ["verify", str(copy / "model_float32.tflite")])
  assert res.exit_code == 1 and "no test vectors" in res.output and "Traceback" not in res.output


def test_serving_saved_model_takes_encoded_images_like_predict(exported, tmp_path):
  import base64
  import subprocess

  import tensorflow as tf
  from PIL import Image

  from export.serving import BYTES_INPUT, BYTES_SIGNATURE, read_warmup

  shown = subprocess.run(["saved_model_cli", "show", "--dir", str(exported / "saved_model"), "--all"],
                         capture_output=True, text=True, check=True).stdout
  assert f"signature_def['{BYTES_SIGNATURE}']" in shown and BYTES_INPUT in shown and "DT_STRING" in shown
  files = []
  with zipfile.ZipFile(DUMMY_DATA / "Images-processed" / "CT_NonCOVID.zip") as zf:
    for name in ("CT_NonCOVID/0.jpg", "CT_NonCOVID/14.png"):
      files.append(tmp_path / pathlib.Path(name).name)
      files[-1].write_bytes(zf.read(name))
  gray = np.asarray(Image.open(files[1]).convert("L"))
  Image.fromarray((gray.astype(np.uint16) * 257)).save(tmp_path / "sixteen.png")  # 16-bit grayscale
  Image.fromarray(np.stack([gray, np.roll(gray, 7, 0), gray[::-1]], -1)).save(tmp_path / "rgb.png")  # colour
  Image.fromarray(np.stack([gray, np.full_like(gray, 128)], -1), "LA").save(tmp_path / "grey_alpha.png")
  files += [tmp_path / "sixteen.png", tmp_path / "rgb.png", tmp_path / "grey_alpha.png"]
  # What a TF Serving REST client sends: {"instances": [{"b64": ...}]}, decoded by the server into raw bytes.
  instances = [{"b64": base64.b64encode(f.read_bytes()).decode()} for f in files]
  raw = tf.constant([base64.b64decode(i["b64"]) for i in instances])
  out = tf.saved_model.load(str(exported / "saved_model")).signatures[BYTES_SIGNATURE](**{BYTES_INPUT: raw})
  res = CliRunner().invoke(main, ["predict", *map(str, files), "--model", str(exported / "saved_model"), "--json"])
  want = json.loads(res.stdout)["results"]
  np.testing.assert_allclose(out["covid_probability"].numpy(), [r["probability"] for r in want], atol=1e-6)
  assert [l.decode() for l in out["label"].numpy()] == [r["label"] for r in want]
  manifest = json.loads((exported / "manifest.json").read_text())
  assert np.allclose(out["threshold"].numpy(), manifest["operating_threshold"]["value"])
  logs = read_warmup(exported / "saved_model")
  assert [l.predict_log.request.model_spec.signature_name for l in logs] == ["serving_default", BYTES_SIGNATURE]


def test_parity_report_has_the_resize_skew(exported, dummy_data_dir):
  from covidct.data import raw_arrays
  from export.skew import METHODS, resize

  manifest = json.loads((exported / "manifest.json").read_text())
  rows = {r["method"]: r for r in manifest["resize_skew"]}
  assert set(rows) == set(METHODS) and all(0 <= r["agreement"] <= 1 for r in rows.values())
  assert "## Resize skew" in (exported / "parity.md").read_text()
  image = raw_arrays("test", str(dummy_data_dir))["images"][0]
  sizes = {m: resize(image, SIZE, m) for m in METHODS}
  assert all(v.shape == (SIZE, SIZE, 1) and v.dtype == np.uint8 for v in sizes.values())
  assert not np.array_equal(sizes["pil_nearest"], sizes["pil_bicubic"])  # the methods really differ


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


def test_os_errors_are_one_line(model_dir, dummy_data_dir, tmp_path):
  import errno as errno_module

  from covidct.cli.options import os_error_message

  (tmp_path / "a_file").write_text("x")
  res = CliRunner().invoke(main, ["export", str(model_dir), "--out", str(tmp_path / "a_file" / "export"),
                                  "--formats", "tflite_float32", "--bootstrap", "10", "--data-dir", str(dummy_data_dir)])
  assert res.exit_code == 1 and "Traceback" not in res.output
  assert "Not a directory" in res.stderr and "a file stands where a folder should be" in res.stderr
  assert not list(tmp_path.glob("a_file*/*"))
  msg = os_error_message(OSError(errno_module.ENOSPC, "No space left on device", "/data/x"))
  assert msg == "No space left on device (/data/x): the disk is full: free some space."
  assert "read-only" in os_error_message(OSError(errno_module.EROFS, "Read-only file system", "/ro"))
