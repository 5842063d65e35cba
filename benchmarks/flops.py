"""The model's FLOPs per image, counted from the graph, and this machine's peak rate."""

from __future__ import annotations

import time

import numpy as np


def model_flops(saved_model_dir) -> int:
  """FLOPs of one image through the SavedModel's serving signature, by TensorFlow's profiler on the frozen graph.

  A multiply-add counts as 2 FLOPs (the profiler's convention).
  """
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  from tensorflow.python.framework.convert_to_constants import (  # pylint: disable=import-outside-toplevel
      convert_variables_to_constants_v2)

  loaded = tf.saved_model.load(str(saved_model_dir))
  sig = loaded.signatures["serving_default"]
  spec = list(sig.structured_input_signature[1].values())[0]
  fn = tf.function(lambda x: sig(**{spec.name or "image": x})).get_concrete_function(
      tf.TensorSpec([1] + spec.shape.as_list()[1:], spec.dtype))
  frozen = convert_variables_to_constants_v2(fn)
  opts = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
  opts["output"] = "none"
  graph = frozen.graph
  prof = tf.compat.v1.profiler.profile(graph=graph, options=opts)
  return int(prof.total_float_ops)


def measured_gemm_gflops(threads: int = 1, n: int = 1024, repeats: int = 5) -> float:
  """float32 GEMM rate of numpy's BLAS on `threads` threads (best of `repeats`), in GFLOP/s."""
  from threadpoolctl import threadpool_limits  # pylint: disable=import-outside-toplevel

  rng = np.random.default_rng(0)
  a = rng.standard_normal((n, n), dtype=np.float32)
  b = rng.standard_normal((n, n), dtype=np.float32)
  with threadpool_limits(limits=threads):
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
  return 2 * n ** 3 / best / 1e9


def measured_int8_gemm_gops(threads: int = 1, n: int = 1024, repeats: int = 5) -> float | None:
  """uint8 x int8 -> int32 GEMM rate of ONNX Runtime's MatMulInteger (its MLAS int8 kernels, with the session
  settings covidct's runners use) on `threads` threads, best of `repeats`, in GOP/s (a multiply-add = 2 ops); None
  without onnxruntime. The int8 copies' distance to the machine's limit is measured against this."""
  try:
    import onnxruntime as ort  # pylint: disable=import-outside-toplevel
    from onnx import TensorProto, helper, numpy_helper  # pylint: disable=import-outside-toplevel
  except ImportError:
    return None
  from covidct.runners import onnx_session_config  # pylint: disable=import-outside-toplevel

  rng = np.random.default_rng(0)
  b = rng.integers(-127, 128, (n, n), dtype=np.int8)
  graph = helper.make_graph(
      [helper.make_node("MatMulInteger", ["a", "b"], ["y"])], "int8_gemm",
      [helper.make_tensor_value_info("a", TensorProto.UINT8, [n, n])],
      [helper.make_tensor_value_info("y", TensorProto.INT32, [n, n])], [numpy_helper.from_array(b, "b")])
  model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
  options = ort.SessionOptions()
  options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
  for key, value in onnx_session_config().items():
    options.add_session_config_entry(key, value)
  session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
  a = rng.integers(0, 256, (n, n), dtype=np.uint8)
  session.run(None, {"a": a})
  best = min(_timed(lambda: session.run(None, {"a": a})) for _ in range(repeats))
  return 2 * n ** 3 / best / 1e9


def _timed(fn) -> float:
  t = time.perf_counter()
  fn()
  return time.perf_counter() - t
