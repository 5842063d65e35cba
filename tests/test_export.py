"""Export and parity on a small model built by the real build_model and trained on dummy data."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from covidct.cli import main
from covidct.data import split_arrays
from covidct.errors import CovidctError
from covidct.runners import SavedModelRunner, load_runner
from covidct.modelio import export_saved_model
from export.errors import UnknownFormatError
from export.formats import FORMATS, export_format, parse_formats
from export.parity import check_parity
from tests.conftest import SIZE


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
  from export.formats import tflite_weights_to_7bit_grid

  # Post-training int8 weights lie on the converter's own 8-bit grid: nothing to put back on a 7-bit one.
  assert tflite_weights_to_7bit_grid((tmp_path / FORMATS["tflite_int8"][0]).read_bytes())[1] == 0


def test_export_folder_and_manifest(exported):
  manifest = json.loads((exported / "manifest.json").read_text())
  assert manifest["parity_passed"] is True
  assert manifest["input"] == {"name": "image", "shape": [None, SIZE, SIZE, 1], "dtype": "uint8"}
  assert manifest["labels"] == ["NonCOVID", "COVID"]
  assert set(manifest["artifacts"]) == {"tflite_float32", "tflite_float16", "onnx_float32"}
  for name, info in manifest["files"].items():
    assert (exported / name).stat().st_size == info["bytes"]
  assert manifest["libraries"]["tensorflow"].startswith("2.21")
  assert "in_sample" not in manifest["metrics"]["saved_model"]["validation"]  # trained on train: held out
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


def test_input_preprocessing_runs_flat_and_exact(tmp_path):
  """ONNX Runtime's slow broadcast over a trailing dimension of 1: the exporter runs the input's elementwise chain on
  an (N, S*S) view, with the same values out."""
  import onnx
  import onnxruntime as ort
  from onnx import TensorProto, helper, numpy_helper

  from export.formats import flatten_input_elementwise

  s = 16
  inits = [numpy_helper.from_array(np.array(v, np.float32), n) for n, v in (("a", 2 / 255), ("b", -1.0))]
  nodes = [helper.make_node("Cast", ["image"], ["c"], to=TensorProto.FLOAT), helper.make_node("Mul", ["c", "a"], ["m"]),
           helper.make_node("Add", ["m", "b"], ["x"]), helper.make_node("Concat", ["x", "x", "x"], ["rgb"], axis=3),
           helper.make_node("ReduceMean", ["rgb"], ["y"], keepdims=0)]
  graph = helper.make_graph(nodes, "pre", [helper.make_tensor_value_info("image", TensorProto.UINT8, [None, s, s, 1])],
                            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])], inits)
  model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
  x = np.random.default_rng(0).integers(0, 256, (3, s, s, 1), dtype=np.uint8)
  want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"image": x})[0]
  assert flatten_input_elementwise(model) == 3  # Cast, Mul, Add; not the Concat
  onnx.checker.check_model(model)
  ops = [n.op_type for n in model.graph.node]
  assert ops == ["Reshape", "Cast", "Mul", "Add", "Reshape", "Concat", "ReduceMean"]
  got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"image": x})[0]
  np.testing.assert_array_equal(got, want)


def test_gray_to_rgb_runs_channels_first_and_exact(tmp_path):
  """OpenVINO's slow last-axis Concat: the exporter copies the gray channel to RGB on a channels-first view and drops
  the Transpose after it, with the same values out under ONNX Runtime and OpenVINO."""
  import onnx
  import onnxruntime as ort
  import openvino as ov
  from onnx import TensorProto, helper, numpy_helper

  from export.formats import gray_to_rgb_channels_first

  s = 12
  w = np.random.default_rng(1).normal(size=(4, 3, 3, 3)).astype(np.float32)
  nodes = [helper.make_node("Concat", ["image", "image", "image"], ["rgb"], axis=3),
           helper.make_node("Transpose", ["rgb"], ["nchw"], perm=[0, 3, 1, 2]),
           helper.make_node("Conv", ["nchw", "w"], ["y"], kernel_shape=[3, 3])]
  graph = helper.make_graph(nodes, "gray", [helper.make_tensor_value_info("image", TensorProto.FLOAT, [None, s, s, 1])],
                            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4, s - 2, s - 2])],
                            [numpy_helper.from_array(w, "w")])
  model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
  x = np.random.default_rng(0).normal(size=(2, s, s, 1)).astype(np.float32)

  def outputs(m):
    data = m.SerializeToString()
    path = tmp_path / f"m{len(list(tmp_path.iterdir()))}.onnx"
    path.write_bytes(data)
    got_ort = ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, {"image": x})[0]
    got_ov = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})(x)[0]
    return got_ort, got_ov

  want_ort, want_ov = outputs(model)
  assert gray_to_rgb_channels_first(model) is True
  onnx.checker.check_model(model)
  assert [n.op_type for n in model.graph.node] == ["Reshape", "Concat", "Conv"]
  assert [a.i for a in model.graph.node[1].attribute if a.name == "axis"] == [1]
  got_ort, got_ov = outputs(model)
  np.testing.assert_array_equal(got_ort, want_ort)
  np.testing.assert_allclose(got_ov, want_ov, rtol=0, atol=1e-5)
  assert gray_to_rgb_channels_first(model) is False  # nothing left to rewrite
