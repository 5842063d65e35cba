"""Meaning travels with the file: ONNX metadata, test vectors beside every copy, and `covidct verify`."""

from __future__ import annotations

import json
import pathlib
import shutil
import zipfile

from click.testing import CliRunner

from covidct.cli import main
from tests.conftest import DUMMY_DATA


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
