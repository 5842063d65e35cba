"""Inputs as they come: 16-bit scans, decompression bombs, models that return nonsense, bad thresholds."""

from __future__ import annotations

import json
import struct
import zlib

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from covidct.cli import main
from covidct.errors import CovidctError
from covidct.models import INPUT_NAME, OUTPUT_NAME
from tests.conftest import SIZE


def _png(array: np.ndarray, path):
  Image.fromarray(array).save(path)
  return str(path)


def _scan(seed=0) -> np.ndarray:
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[:96, :96]
  body = ((x - 48) ** 2 / 40 ** 2 + (y - 48) ** 2 / 30 ** 2 < 1) * 180
  return np.clip(body + rng.normal(0, 20, body.shape), 0, 255).astype(np.uint8)


def test_16bit_png_decodes_like_its_8bit_source(exported, tmp_path):
  eight = _scan()
  a = _png(eight, tmp_path / "eight.png")
  b = _png((eight.astype(np.uint16) * 257), tmp_path / "sixteen.png")  # PNG's own 8 -> 16 bit scaling
  assert Image.open(b).mode.startswith("I")
  res = CliRunner().invoke(main, ["predict", a, b, "--model", str(exported / "model_float32.onnx"), "--json"])
  assert res.exit_code == 0, res.output
  p = [r["probability"] for r in json.loads(res.stdout)["results"]]
  assert p[0] == p[1]  # the same pixels reach the model: not clipped to white
  from tfds_covidct.covid_ct.covid_ct_dataset_builder import decode_grayscale

  wide = np.full((8, 8), 1000, np.uint16)  # a 12-bit-range value in a 16-bit file: scaled, never clipped
  got, mode = decode_grayscale(open(_png(wide, tmp_path / "w.png"), "rb").read(), "w.png")
  assert mode.startswith("I") and np.all(got == round(1000 / 257))


def _bomb_png(width: int, height: int) -> bytes:
  """A valid PNG header (and a tiny compressed stream) that claims width x height pixels."""
  def chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
  return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
          + chunk(b"IDAT", zlib.compress(b"\x00" * 1000)) + chunk(b"IEND", b""))


def test_decompression_bomb_is_refused_before_decoding(exported, tmp_path):
  (tmp_path / "bomb.png").write_bytes(_bomb_png(30000, 30000))  # past Pillow's own limit too
  (tmp_path / "big.png").write_bytes(_bomb_png(8000, 8000))  # under Pillow's, over ours
  ok = _png(_scan(), tmp_path / "ok.png")
  res = CliRunner().invoke(main, ["predict", str(tmp_path / "bomb.png"), str(tmp_path / "big.png"), ok, "--model",
                                  str(exported / "model_float32.onnx")])
  assert res.exit_code == 1 and "Traceback" not in res.output
  assert "bomb.png: the image claims more pixels than the limit of 40,000,000" in res.stderr
  assert "big.png: the image claims 8000 x 8000 pixels" in res.stderr
  assert "ok.png" in res.stdout  # the good file is still scored


def _onnx(path, body: str):
  """A tiny ONNX model with covidct's input and output names whose output is `body` of the image."""
  import onnx
  from onnx import TensorProto, helper, numpy_helper

  nodes = [helper.make_node("Cast", [INPUT_NAME], ["x"], to=TensorProto.FLOAT),
           helper.make_node("ReduceMax", ["x", "axes"], ["m"], keepdims=1),
           helper.make_node("Reshape", ["m", "shape1"], ["m1"])]
  if body == "grey":  # the brightest grey level, 0-255: not a probability
    nodes.append(helper.make_node("Identity", ["m1"], [OUTPUT_NAME]))
  elif body == "nan":
    nodes += [helper.make_node("Sub", ["m1", "m1"], ["z"]), helper.make_node("Div", ["z", "z"], [OUTPUT_NAME])]
  elif body == "two":  # two values per image
    nodes.append(helper.make_node("Concat", ["m1", "m1"], [OUTPUT_NAME], axis=1))
  inits = [numpy_helper.from_array(np.array([1, 2, 3], np.int64), "axes"),
           numpy_helper.from_array(np.array([-1, 1], np.int64), "shape1")]
  graph = helper.make_graph(nodes, body, [helper.make_tensor_value_info(INPUT_NAME, TensorProto.UINT8,
                                                                        [None, SIZE, SIZE, 1])],
                            [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, None)], inits)
  onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
  return str(path)


# "two" declares its output [N, 2]: refused at load, from its signature, before any image is scored
@pytest.mark.parametrize("body, message", [("grey", "outside [0, 1]"), ("nan", "non-finite values"),
                                           ("two", "gives covid_probability tensor(float) [None, 2]")])
def test_a_model_returning_nonsense_is_an_error_not_a_label(tmp_path, body, message):
  model = _onnx(tmp_path / f"{body}.onnx", body)
  image = _png(_scan(), tmp_path / "scan.png")
  res = CliRunner().invoke(main, ["predict", image, "--model", model, "--json"])
  assert res.exit_code == 1 and message in res.stderr and "Traceback" not in res.output, res.output
  assert model in res.stderr and res.stdout == ""  # names the model; prints no result
  from covidct.runners import load_runner

  with pytest.raises(CovidctError, match="onnx model" if body != "two" else "not a model covidct can run"):
    load_runner(model)(np.full((1, SIZE, SIZE, 1), 200, np.uint8))


def test_threshold_is_checked_and_its_source_shown(exported, tmp_path):
  image = _png(_scan(), tmp_path / "scan.png")
  runner = CliRunner()
  for bad in ("1.5", "0", "-0.2", "1"):
    res = runner.invoke(main, ["predict", image, "--model", str(exported / "model_float32.onnx"), "--threshold", bad])
    assert res.exit_code == 1 and "strictly between 0 and 1" in res.stderr, bad
  res = runner.invoke(main, ["predict", image, "--model", str(exported / "model_float32.tflite")])
  assert res.exit_code == 0 and "model_float32.tflite (its TFLite metadata))" in res.stdout
  res = runner.invoke(main, ["predict", image, "--model", str(exported / "saved_model")])
  assert res.exit_code == 0 and f"(from {exported.resolve() / 'manifest.json'})" in res.stdout
  res = runner.invoke(main, ["predict", image, "--model", str(exported / "model_float32.onnx"), "--threshold", "0.3",
                             "--json"])
  out = json.loads(res.stdout)
  assert out["threshold"] == {"value": 0.3, "from": "--threshold"} and out["results"][0]["threshold"] == 0.3
  (tmp_path / "lone").mkdir()
  lone = tmp_path / "lone" / "m.tflite"  # no metadata of its own (covidct's copies have it) and no manifest
  lone.write_bytes(_without_metadata(exported / "model_float32.tflite"))
  res = runner.invoke(main, ["predict", image, "--model", str(lone)])
  assert res.exit_code == 0 and "threshold 0.5000 (from default (no manifest found))" in res.stdout


def _without_metadata(path) -> bytes:
  """The .tflite's model flatbuffer with its TFLITE_METADATA entry (and the appended zip) left out."""
  from ai_edge_litert.tools import flatbuffer_utils

  model = flatbuffer_utils.convert_bytearray_to_object(bytearray(path.read_bytes()))
  model.metadata = [m for m in model.metadata if m.name not in (b"TFLITE_METADATA", "TFLITE_METADATA")]
  return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def test_predict_streams_in_batches(exported, tmp_path, monkeypatch):
  import covidct.predict as predict

  monkeypatch.setattr(predict, "BATCH_SIZE", 4)
  seen = []
  from covidct.runners import OnnxRunner

  original = OnnxRunner._run
  monkeypatch.setattr(OnnxRunner, "_run", lambda self, batch: seen.append(len(batch)) or original(self, batch))
  files = [_png(_scan(i), tmp_path / f"{i}.png") for i in range(10)]
  files.insert(5, str(tmp_path / "missing.png"))
  results, errors, _ = predict.predict_files(exported / "model_float32.onnx", files)
  assert seen == [4, 3, 3]  # 4 files at a time: [0-3], [4, missing, 5, 6], [7-9]; never all at once
  assert [r["file"] for r in results] == [f for f in files if "missing" not in f] and len(errors) == 1
