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


def test_tflite_metadata_says_what_a_lone_copy_means(exported, tmp_path):
  from covidct import tflite_metadata as tm

  manifest = json.loads((exported / "manifest.json").read_text())
  tflites = [a["file"] for a in manifest["artifacts"].values() if a["file"].endswith(".tflite")]
  assert tflites
  for name in tflites:
    meta = tm.read(exported / name)
    assert meta["name"].startswith("covidct") and meta["author"] == "covidct" and meta["license"] == "Apache-2.0"
    assert meta["version"] and meta["min_parser_version"] == "1.0.0"
    assert f"{manifest['operating_threshold']['value']:.4f}" in meta["description"]
    assert [t["content"] for t in meta["inputs"]] == ["image"] and "grayscale" in meta["inputs"][0]["description"]
    assert meta["outputs"][0]["name"] == "covid_probability" and "P(COVID)" in meta["outputs"][0]["description"]
    assert [f["name"] for f in meta["outputs"][0]["associated_files"]] == ["labels.txt"]
    assert tm.associated_file(exported / name, "labels.txt").decode().split() == ["NonCOVID", "COVID"]
    assert tm.read_meaning(exported / name) == {"labels": ["NonCOVID", "COVID"],
                                                "threshold": manifest["operating_threshold"]["value"]}
  # The schema's own generated reader (tflite-support's, where installed) reads the same fields.
  generated = _tflite_support_schema()
  if generated is not None:
    from ai_edge_litert import schema_py_generated as schema

    data = (exported / tflites[0]).read_bytes()
    model = schema.Model.GetRootAs(data, 0)
    entry = next(model.Metadata(i) for i in range(model.MetadataLength()) if model.Metadata(i).Name() == b"TFLITE_METADATA")
    buf = model.Buffers(entry.Buffer()).DataAsNumpy().tobytes()
    assert generated.ModelMetadata.ModelMetadataBufferHasIdentifier(buf, 0)
    parsed = generated.ModelMetadataT.InitFromPackedBuf(buf, 0)
    tensor = parsed.subgraphMetadata[0].inputTensorMetadata[0]
    assert tensor.content.contentProperties.colorSpace == generated.ColorSpaceType.GRAYSCALE
    assert list(tensor.stats.min) == [0.0] and list(tensor.stats.max) == [255.0]
  # Copied alone to an empty folder, a .tflite predicts what it predicts in place, with its own threshold.
  runner = CliRunner()
  (tmp_path / "lone").mkdir()
  lone = tmp_path / "lone" / "copy.tflite"
  lone.write_bytes((exported / "model_float32.tflite").read_bytes())
  with zipfile.ZipFile(DUMMY_DATA / "Images-processed" / "CT_COVID.zip") as zf:
    names = [n for n in zf.namelist() if not n.endswith("/")][:3]
    files = []
    for i, n in enumerate(names):
      (tmp_path / f"{i}{pathlib.Path(n).suffix}").write_bytes(zf.read(n))
      files.append(str(tmp_path / f"{i}{pathlib.Path(n).suffix}"))
  here = json.loads(runner.invoke(main, ["predict", *files, "--model", str(exported / "model_float32.tflite"),
                                         "--json"]).stdout)
  alone = json.loads(runner.invoke(main, ["predict", *files, "--model", str(lone), "--json"]).stdout)
  assert alone["threshold"]["from"].endswith("(its TFLite metadata)")
  assert alone["threshold"]["value"] == here["threshold"]["value"]
  assert [r["label"] for r in alone["results"]] == [r["label"] for r in here["results"]]
  assert [r["probability"] for r in alone["results"]] == [r["probability"] for r in here["results"]]


def _tflite_support_schema():
  """tflite-support's generated metadata schema module, loaded from its file (its package needs libusb), or None."""
  import importlib.util

  spec = importlib.util.find_spec("tensorflow_lite_support")
  if spec is None or not spec.submodule_search_locations:
    return None
  path = pathlib.Path(list(spec.submodule_search_locations)[0]) / "metadata" / "metadata_schema_py_generated.py"
  if not path.exists():
    return None
  module_spec = importlib.util.spec_from_file_location("tflite_metadata_schema", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module


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
  # Its own digest gives it away first: the weights no longer match what its metadata records.
  res = CliRunner().invoke(main, ["verify", str(copy / "model_float32.onnx")])
  assert res.exit_code == 1 and "do not match the digest in its own metadata" in res.output
  # Without the digest (a copy written before there was one), its test vectors still do.
  kept = [p for p in model.metadata_props if p.key != "weights_sha256"]
  del model.metadata_props[:]
  model.metadata_props.extend(kept)
  onnx.save(model, str(copy / "model_float32.onnx"))
  res = CliRunner().invoke(main, ["verify", str(copy / "model_float32.onnx"), str(copy / "model_float32.tflite")])
  assert res.exit_code == 1 and "FAIL  " in res.output and "pass  " in res.output
  assert "1 of 2 artifact(s) do not give the SavedModel's answers here" in res.output
  shutil.rmtree(copy / "test_data")
  res = CliRunner().invoke(main, ["verify", str(copy / "model_float32.tflite")])
  assert res.exit_code == 1 and "no test vectors" in res.output and "Traceback" not in res.output
