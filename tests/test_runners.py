"""The runners compute the same numbers on every x86-64 CPU kind (AVX2-only, AVX-512, with or without VNNI)."""

from __future__ import annotations

import numpy as np
import pytest

from covidct.models import INPUT_NAME, OUTPUT_NAME
from covidct.runners import OnnxRunner

SIZE = 8
OUT_SCALE = 8160.0  # 64 x 255 x 127 = 2,072,640 = 254 output steps exactly


def _saturating_qdq_model(path):
  """A QDQ int8 model, laid out as our quantization-aware exports are (uint8 activations, per-channel int8 weights):
  the image's 64 pixels times weights of 127, summed. All-white input makes every pair of products 255 x 127 +
  255 x 127 = 64,770, which a 16-bit saturating add (VPMADDUBSW, ONNX Runtime's default on CPUs without VNNI)
  clips to 32,767: the sum then comes out near half of the true one."""
  import onnx
  from onnx import TensorProto, helper, numpy_helper

  inits = [
      numpy_helper.from_array(np.array([1, SIZE * SIZE], np.int64), "flat"),
      numpy_helper.from_array(np.array(1.0, np.float32), "x_scale"),
      numpy_helper.from_array(np.array(0, np.uint8), "x_zero"),
      numpy_helper.from_array(np.full((SIZE * SIZE, 1), 127, np.int8), "w"),
      numpy_helper.from_array(np.ones(1, np.float32), "w_scale"),
      numpy_helper.from_array(np.zeros(1, np.int8), "w_zero"),
      numpy_helper.from_array(np.array(OUT_SCALE, np.float32), "y_scale"),
      numpy_helper.from_array(np.array(0, np.uint8), "y_zero"),
      numpy_helper.from_array(np.array(1 / (256 * OUT_SCALE), np.float32), "to_probability"),
  ]
  nodes = [
      helper.make_node("Reshape", [INPUT_NAME, "flat"], ["x"]),
      helper.make_node("DequantizeLinear", ["x", "x_scale", "x_zero"], ["xf"]),
      helper.make_node("DequantizeLinear", ["w", "w_scale", "w_zero"], ["wf"], axis=1),
      helper.make_node("MatMul", ["xf", "wf"], ["yf"]),
      helper.make_node("QuantizeLinear", ["yf", "y_scale", "y_zero"], ["yq"]),
      helper.make_node("DequantizeLinear", ["yq", "y_scale", "y_zero"], ["y"]),
      helper.make_node("Mul", ["y", "to_probability"], [OUTPUT_NAME]),
  ]
  graph = helper.make_graph(nodes, "saturation", [helper.make_tensor_value_info(INPUT_NAME, TensorProto.UINT8,
                                                                                [1, SIZE, SIZE, 1])],
                            [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, [1, 1])], inits)
  model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
  onnx.checker.check_model(model)
  onnx.save(model, str(path))


@pytest.mark.parametrize("optimization", ["all", "basic"])
def test_onnx_runner_int8_sums_are_exact_on_every_cpu(tmp_path, optimization):
  """On an AVX2 EPYC without the precision setting this gives 128/256 (each pair clipped) instead of 254/256; on a
  VNNI CPU both are exact. Checked on an AVX2-only CPU by running this test under `qemu-x86_64 -cpu EPYC-Milan-v1`
  (docs/results/cpu-kinds.md)."""
  _saturating_qdq_model(tmp_path / "m.onnx")
  runner = OnnxRunner(tmp_path / "m.onnx", num_threads=1, optimization=optimization)
  p = runner(np.full((1, SIZE, SIZE, 1), 255, np.uint8), batch_size=1)
  np.testing.assert_allclose(p * 256, [254], atol=1e-3)  # float32 rounding of the last Mul only
