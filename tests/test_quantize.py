"""Quantization-aware fine-tuning (covidct.quantize, `covidct qat`): the quantized twin computes what TFLite's int8
kernels compute, and the exported copies of a QAT model agree with it."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from covidct.cli import main
from covidct.config import resolve
from covidct.models import build_model, mobilenet_weights_file
from tests.conftest import KERAS_WEIGHTS

SIZE = 64


@pytest.fixture(scope="module")
def float_model():
  """A MobileNetV2 0.35 classifier (random init, 64x64) with batch-norm statistics and a head made non-trivial, so
  folding and quantization have something to get wrong."""
  model = build_model(resolve(model="mobilenet_v2_0.35", image_size=SIZE, weights="none"))
  rng = np.random.default_rng(0)
  for layer in model.get_layer("backbone").layers:
    if layer.__class__.__name__ == "BatchNormalization":
      gamma, beta, mean, var = layer.get_weights()
      layer.set_weights([rng.uniform(0.5, 1.5, gamma.shape), rng.normal(0, 0.1, beta.shape),
                         rng.normal(0, 0.2, mean.shape), rng.uniform(0.5, 2.0, var.shape)])
  dense = model.get_layer("covid_probability")
  dense.set_weights([rng.normal(0, 0.5, w.shape).astype(np.float32) for w in dense.get_weights()])
  return model


@pytest.fixture(scope="module")
def images():
  rng = np.random.default_rng(1)
  base = rng.integers(0, 256, (6, SIZE, SIZE, 1))
  return np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)


def test_twin_without_quantization_is_the_float_model(float_model, images):
  import keras

  from covidct.quantize import logits, quantized_twin

  twin, points = quantized_twin(float_model, None, quantize_weights=False)
  assert {"rescale", "Conv1_relu", "block_16_project", "block_2_add", "pool", "logit"} <= set(points)
  assert not [l for l in twin.layers if l.__class__.__name__ == "BatchNormalization"]  # all folded
  z = np.asarray(keras.Model(twin.input, twin.get_layer("logit").output)(images.astype(np.float32))).ravel()
  np.testing.assert_allclose(z, logits(float_model, images), rtol=1e-4, atol=1e-4)
  # The probability is the float model's on TFLite's 8-bit output grid (step 1/256).
  p = np.asarray(twin(images.astype(np.float32))).ravel()
  want = np.asarray(float_model(images.astype(np.float32))).ravel()
  assert np.all(np.abs(p - want) <= 1 / 512 + 1e-6)
  np.testing.assert_allclose(p * 256, np.round(p * 256), atol=1e-4)


@pytest.mark.parametrize("bits", [8, 7])
def test_weights_on_a_per_channel_int8_grid(float_model, bits):
  from covidct.quantize import QuantConv, quantized_twin
  from export.formats import weight_levels

  levels = 2 ** (bits - 1) - 1  # 127, or 63: a 7-bit grid that cannot saturate 16-bit pair sums on AVX2
  twin, _ = quantized_twin(float_model, None, weight_bits=bits)
  kinds = set()
  for layer in twin.layers:
    if not isinstance(layer, QuantConv):
      continue
    kinds.add(layer.kind)
    w, q = layer.get_weights()[0], np.asarray(layer.quantized_kernel())
    axis = 2 if layer.kind == "dw" else w.ndim - 1
    other = tuple(i for i in range(w.ndim) if i != axis)
    scale = np.abs(w).max(axis=other, keepdims=True) / levels
    steps = q / scale
    np.testing.assert_allclose(steps, np.round(steps), atol=2e-3)  # integers ...
    assert np.abs(np.round(steps)).max() <= levels  # ... in [-levels, levels]
    assert weight_levels(q, axis) == levels  # the exporter reads the grid back from the baked weights
    np.testing.assert_allclose(np.abs(q).max(axis=other, keepdims=True), np.abs(w).max(axis=other, keepdims=True),
                               rtol=1e-5)
    assert np.all(np.abs(q - w) <= scale / 2 + 1e-7)
  assert kinds == {"conv", "dw", "dense"}


def test_calibrated_ranges_and_baked_copy(float_model, images):
  from covidct.quantize import FakeQuant, bake, calibrate_ranges, quantized_twin

  ranges = calibrate_ranges(float_model, images)
  assert ranges["rescale"][0] == 0.0 and ranges["rescale"][1] <= 1.0
  assert all(lo <= 0.0 <= hi and hi - lo > 0 for lo, hi in ranges.values())
  assert all(0.0 == ranges[p][0] and ranges[p][1] <= 6.0 for p in ranges if p.endswith("_relu"))
  twin, _ = quantized_twin(float_model, ranges)
  # The input path is exact where it can be: every grey level k lands on the nearest step of the backbone's input
  # grid (step 1/128, 0 on it), never on a rounding tie that TF and TFLite would break differently.
  import keras

  grey = np.arange(256, dtype=np.float32).reshape(1, 16, 16, 1)
  grey = np.tile(grey, (1, SIZE // 16, SIZE // 16, 1))
  v = np.asarray(keras.Model(twin.input, twin.get_layer("fq_to_minus1_1").output)(grey))
  want = 2 * grey / 255 - 1
  assert ranges["to_minus1_1"] == (-1.0, 127 / 128)
  np.testing.assert_allclose(v * 128, np.round(v * 128), atol=1e-4)
  steps = want[want < 127 / 128] * 128
  assert np.abs(steps - np.floor(steps) - 0.5).min() > 1e-3  # no grey level on a tie (calibrated [-1, 1]: all)
  np.testing.assert_allclose(v, np.round(np.minimum(want, 127 / 128) * 128) / 128, atol=1e-6)  # nearest step
  baked = bake(twin)
  assert not any(getattr(l, "quantize_weights", False) for l in baked.layers)
  assert sum(isinstance(l, FakeQuant) for l in baked.layers) == len(ranges) + 1  # + the probability
  x = images.astype(np.float32)
  np.testing.assert_allclose(np.asarray(baked(x)), np.asarray(twin(x)), atol=1e-6)
  # Quantizing changed the logits (the twin is not the float model in disguise), by little.
  import keras

  unquantized, _ = quantized_twin(float_model, None, quantize_weights=False)
  z_q, z_f = (np.asarray(keras.Model(m.input, m.get_layer("logit").output)(x)) for m in (twin, unquantized))
  assert 0 < np.abs(z_q - z_f).max() < 0.1 * np.abs(z_f).max()


def test_fit_temperature_recovers_an_over_confident_scale():
  from covidct.metrics import fit_temperature

  rng = np.random.default_rng(0)
  z = rng.normal(0, 2, 4000)
  y = (rng.random(4000) < 1 / (1 + np.exp(-z))).astype(int)  # labels drawn from calibrated probabilities
  assert fit_temperature(6.0 * z, y) == pytest.approx(6.0, rel=0.15)
  assert fit_temperature(z, y) == pytest.approx(1.0, rel=0.15)


@pytest.fixture(scope="module")
def finetuned(dummy_data_dir, tmp_path_factory):
  if not (KERAS_WEIGHTS / mobilenet_weights_file(0.35)).exists():
    pytest.skip(reason=f"the MobileNetV2 weight files are not in {KERAS_WEIGHTS}")
  from covidct.train import train

  out = tmp_path_factory.mktemp("qat") / "run"
  train(resolve("finetune", model="mobilenet_v2_0.35", image_size=SIZE, batch_size=4, head_epochs=1, epochs=1,
                data_dir=str(dummy_data_dir), weights_dir=str(KERAS_WEIGHTS)), out, verbose=0)
  return out


def test_qat_command_writes_a_quantized_model_whose_copies_agree(finetuned, dummy_data_dir, tmp_path):
  from covidct.data import split_arrays
  from covidct.quantize import is_quantization_aware
  from covidct.runners import KerasRunner, SavedModelRunner

  out = tmp_path / "qat"
  # --temperature 1: three validation images cannot fit one (the fit runs on real data; see the test above).
  res = CliRunner().invoke(main, ["qat", str(finetuned), "--out", str(out), "--epochs", "1", "--quiet",
                                  "--temperature", "1", "--data-dir", str(dummy_data_dir)])
  assert res.exit_code == 0, res.output
  assert "temperature 1;" in res.output and "kept (epoch" in res.output
  config = json.loads((out / "config.json").read_text())
  assert config["quantization_aware"]["epoch_kept"] in (0, 1) and config["quantization_aware"]["temperature"] == 1
  assert config["quantization_aware"]["weight_bits"] == 7  # the default: exact on CPUs without VNNI
  assert config["source"]["config"]["model"] == "mobilenet_v2_0.35"
  res = CliRunner().invoke(main, ["compare", str(finetuned), str(out)])  # the QAT run beside the run it came from
  assert res.exit_code == 0, res.output
  assert "| batch_size=4, epochs=1, head_epochs=1 |" in res.output
  assert "| qat epochs=1 of (batch_size=4, epochs=1, head_epochs=1) |" in res.output
  assert is_quantization_aware(out / "saved_model") and not is_quantization_aware(finetuned / "saved_model")
  test_images = split_arrays("test", str(dummy_data_dir), SIZE)["images"]
  saved = SavedModelRunner(out / "saved_model")(test_images)
  np.testing.assert_allclose(KerasRunner(str(out / "model.keras"))(test_images), saved, atol=1e-6)
  np.testing.assert_allclose(saved * 256, np.round(saved * 256), atol=1e-4)  # the 8-bit output grid
  from benchmarks.latency import run_worker  # the bench's Keras rows load it too, in a fresh process

  bench = run_worker({"artifact": "keras", "runtime": "keras_call", "path": str(out / "model.keras"), "threads": 1,
                      "batch_sizes": [1], "runs": 1, "warmup": 0, "max_seconds": 1.0})
  assert "error" not in bench and bench["batches"]["1"]["p50_ms"] > 0, bench

  # Export: four test images cannot rank copies (one tie moves ROC AUC by 0.25), so this checks the mechanics; the
  # agreement on real scans is measured in docs/results/official-split.md. The verdict may go either way here.
  export = tmp_path / "export"
  res = CliRunner().invoke(main, ["export", str(out), "--out", str(export), "--data-dir", str(dummy_data_dir),
                                  "--bootstrap", "20"])
  assert res.exit_code in (0, 1) and "Traceback" not in res.output, res.output
  assert "quantization-aware" in (export / "parity.md").read_text()
  manifest = json.loads((export / "manifest.json").read_text())
  assert manifest["quantization_aware"]
  from covidct.manifest import Manifest
  from covidct.push import model_card

  assert "quantization-aware (`covidct qat`)" in model_card(Manifest.load(export), 1)
  assert manifest["artifacts"]["onnx_int8"]["quant_format"].startswith("QDQ (from quantization-aware")
  assert set(manifest["artifacts"]) == {"tflite_float32", "tflite_float16", "tflite_dynamic", "tflite_int8",
                                        "onnx_float32", "onnx_int8"}
  for fmt, art in manifest["artifacts"].items():
    assert art["parity"]["tolerance"] is None, fmt  # every format held to the quantized rules
    # Within a few 8-bit output steps of the SavedModel, on every CPU kind: the copies compute integers, and the
    # runtimes compute the same integers on AVX2 and AVX-512 CPUs (ONNX Runtime with ONNX_SESSION_CONFIG; without
    # it, an AVX2 EPYC saturated int8 products and the ONNX copies were 10 steps off). What is left is the SavedModel's
    # float32 sums landing on the other side of a rounding step than the integer sums, a few values in a run:
    # measured 4 (ONNX) and 6 (TFLite) steps here with 8-bit weights, the same under an emulated EPYC
    # (docs/results/cpu-kinds.md). The quantized TFLite copies compute their integers in other steps than the float
    # SavedModel (XNNPACK's requantization): with 7-bit weights put back on their grid (below), 8 steps here for
    # float16 and dynamic, 34 for int8 on the all-white input (8 on the test images), 12 on the model of record.
    quantized_tflite = fmt in ("tflite_float16", "tflite_dynamic", "tflite_int8")
    assert art["parity"]["max_abs_diff"] <= (40 if quantized_tflite else 8) / 256, fmt
    if quantized_tflite:  # the converter's 8-bit weight grid undone: the trained 7-bit weights, as in the ONNX copies
      assert art["weights_on_7bit_grid"] > 50, fmt
      from tensorflow.lite.tools import flatbuffer_utils

      tfl = flatbuffer_utils.read_model(str(export / art["file"]))
      int8 = [np.asarray(tfl.buffers[t.buffer].data, np.uint8).view(np.int8) for t in tfl.subgraphs[0].tensors
              if t.type == 9 and t.quantization is not None and t.quantization.scale is not None
              and len(t.quantization.scale) > 1 and tfl.buffers[t.buffer].data is not None]
      assert int8 and max(int(np.abs(w.astype(np.int32)).max()) for w in int8) == 63, fmt
    if fmt.startswith("onnx"):
      assert art["onnxruntime_session_config"] == {"session.x64quantprecision": "1"}
  assert manifest["parity_verified_on"].endswith(("VNNI)", "no VNNI)"))  # the CPU kind the copies were checked on
  import onnx

  graph = onnx.load(str(export / "model_float32.onnx")).graph
  ops = [n.op_type for n in graph.node]
  # Every weight sits behind a per-channel DequantizeLinear: onnxruntime must not quantize them itself.
  assert ops.count("DequantizeLinear") >= ops.count("Conv") + ops.count("MatMul") > 50
  assert ops.count("QuantizeLinear") > 50  # the activation ranges, from the fake-quant ops
  from onnx import numpy_helper

  # The weights stay on the model's 7-bit grid: no uint8 x int8 pair of products can reach 16-bit saturation
  # (255 x 63 x 2 = 32,130 <= 32,767), so OpenVINO's AVX2 kernels compute what its VNNI ones do.
  weights = [numpy_helper.to_array(i) for i in graph.initializer if i.name.endswith("_int8")]
  assert len(weights) >= ops.count("Conv") and max(int(np.abs(w.astype(np.int32)).max()) for w in weights) == 63


def test_twin_refuses_a_layout_it_cannot_rebuild(tmp_path):
  from covidct.errors import CovidctError
  from covidct.quantize import quantized_twin

  model = build_model(resolve(model="mobilenet_v2_0.35", image_size=SIZE, weights="none", blur=1.0))
  with pytest.raises(CovidctError, match="also has blur"):
    quantized_twin(model)
  # `covidct qat` refuses it before reading any data (here there is none) or writing anything
  (tmp_path / "run").mkdir()
  model.save(tmp_path / "run" / "model.keras")
  res = CliRunner().invoke(main, ["qat", str(tmp_path / "run"), "--out", str(tmp_path / "q"), "--data-dir",
                                  str(tmp_path / "no-data")])
  assert res.exit_code == 1 and "also has blur" in res.output and "Traceback" not in res.output
  assert not (tmp_path / "q").exists()


def test_qat_refuses_what_it_cannot_do(model_dir, finetuned, dummy_data_dir, tmp_path):
  runner = CliRunner()
  res = runner.invoke(main, ["qat", str(model_dir), "--out", str(tmp_path / "q"), "--data-dir", str(dummy_data_dir)])
  assert res.exit_code == 1 and "supports the MobileNetV2 models" in res.output and "Traceback" not in res.output
  assert not (tmp_path / "q").exists()
  (tmp_path / "exists").mkdir()
  res = runner.invoke(main, ["qat", str(finetuned), "--out", str(tmp_path / "exists"), "--data-dir",
                             str(dummy_data_dir)])
  assert res.exit_code == 1 and "exists" in res.output
  res = runner.invoke(main, ["qat", str(finetuned), "--out", str(tmp_path / "q"), "--epochs", "-1"])
  assert res.exit_code == 2 and "--epochs" in res.output
  res = runner.invoke(main, ["qat", str(tmp_path / "nothing"), "--out", str(tmp_path / "q")])
  assert res.exit_code == 1 and "model.keras" in res.output
