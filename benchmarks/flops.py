"""The model's FLOPs per image, counted from the graph, and this machine's peak rate."""

from __future__ import annotations

import os
import platform
import re
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


def _timed(fn) -> float:
  t = time.perf_counter()
  fn()
  return time.perf_counter() - t


def cpu_info() -> dict:
  """CPU model, cores, clock, vector extensions and the theoretical float32 peak per core they imply."""
  text = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
  model = (re.search(r"model name\s*:\s*(.*)", text) or [None, platform.processor()])[1]
  mhz = float((re.search(r"cpu MHz\s*:\s*([\d.]+)", text) or [None, "nan"])[1])
  flags = set((re.search(r"flags\s*:\s*(.*)", text) or [None, ""])[1].split())
  lanes = 16 if "avx512f" in flags else 8 if "avx2" in flags else 4
  fma = 2 if "fma" in flags else 1
  # Two FMA ports per core on server cores with AVX-512/AVX2: lanes x 2 (mul+add) x 2 ports.
  per_cycle = lanes * fma * 2
  return {"model": model, "cores": os.cpu_count(), "mhz": mhz,
          "vector": "avx512" if lanes == 16 else "avx2" if lanes == 8 else "sse",
          "amx_int8": "amx_int8" in flags, "vnni": "avx512_vnni" in flags,
          "theoretical_gflops_per_core": per_cycle * mhz / 1000.0 if mhz == mhz else None,
          "theoretical_basis": f"{lanes} float32 lanes x {fma} (FMA) x 2 ports x {mhz:.0f} MHz"}
