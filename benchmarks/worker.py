"""One benchmark configuration in its own process, so load time and peak memory belong to it alone.

`python -m benchmarks.worker '<spec json>'` prints one JSON line. Inputs are seeded random uint8 images of the
model's size: latency does not depend on the pixel values for these models.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time

ISA_VARIABLE = "ONEDNN_MAX_CPU_ISA"  # oneDNN's cap on the instruction set its kernels may use (OpenVINO, TensorFlow)


def _rss_mb() -> float:
  """Peak resident memory of this process so far (VmHWM: unlike ru_maxrss, it does not carry over the parent's peak
  through fork and exec)."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) / 1024.0
  except OSError:
    pass
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


KERNEL_NODES = ("Convolution", "GroupConvolution", "FullyConnected", "MatMul")


def openvino_kernels(path, threads, batch: int) -> list[dict]:
  """The kernels OpenVINO picked for the file's convolutions and matrix products on this CPU (their names carry the
  instruction set and precision, e.g. brgconv_avx512_1x1_I8, jit_avx2_I8): a profiled inference at `batch`, each
  kernel with its layer count and share of those layers' time."""
  import numpy as np  # pylint: disable=import-outside-toplevel

  from covidct.runners import OpenVINORunner  # pylint: disable=import-outside-toplevel

  r = OpenVINORunner(path, num_threads=threads, config={"PERF_COUNT": True})
  request = r.compiled.create_infer_request()
  x = np.random.default_rng(0).integers(0, 256, (batch, r.image_size, r.image_size, 1), dtype=np.uint8)
  for _ in range(3):  # the counters hold the last inference: one after the first-run set-up
    request.infer({0: x})
  times: dict = {}
  for p in request.get_profiling_info():
    if p.node_type in KERNEL_NODES and p.exec_type:
      n, us = times.get(p.exec_type, (0, 0.0))
      times[p.exec_type] = (n + 1, us + p.real_time.total_seconds() * 1e6)
  total = sum(us for _, us in times.values()) or 1.0
  return [{"kernel": k, "layers": n, "share": us / total}
          for k, (n, us) in sorted(times.items(), key=lambda kv: -kv[1][1])]


def make_call(spec):
  """(callable batch -> probabilities, image size) for the spec's runtime."""
  runtime, path, threads = spec["runtime"], spec["path"], spec.get("threads")
  if runtime.startswith("tf_") or runtime.startswith("keras_"):
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    if threads:
      tf.config.threading.set_intra_op_parallelism_threads(threads)
      tf.config.threading.set_inter_op_parallelism_threads(1)
    if not runtime.endswith("_gpu"):
      tf.config.set_visible_devices([], "GPU")
    device = "/GPU:0" if runtime.endswith("_gpu") else "/CPU:0"
    if runtime.startswith("tf_signature"):
      from covidct.runners import SavedModelRunner  # pylint: disable=import-outside-toplevel

      r = SavedModelRunner(path)

      def call(x):
        with tf.device(device):
          return r.raw(x)

      return call, r.image_size
    import numpy as np  # pylint: disable=import-outside-toplevel

    from covidct.modelio import load_keras  # pylint: disable=import-outside-toplevel

    model = load_keras(path)  # covidct's own layers known: a quantization-aware model holds FakeQuant
    size = int(model.input_shape[1])
    if runtime == "keras_predict":
      return (lambda x: model.predict(x.astype(np.float32), batch_size=len(x), verbose=0)), size
    return (lambda x: model(x.astype(np.float32), training=False).numpy()), size
  if runtime == "litert":
    from covidct.runners import LiteRTRunner  # pylint: disable=import-outside-toplevel

    r = LiteRTRunner(path, num_threads=threads)
    return r.raw, r.image_size
  if runtime == "openvino":
    from covidct.runners import OpenVINORunner  # pylint: disable=import-outside-toplevel

    r = OpenVINORunner(path, num_threads=threads)
    return r.raw, r.image_size
  if runtime.startswith("ort"):
    from covidct.runners import OnnxRunner  # pylint: disable=import-outside-toplevel

    providers = {"ort": ["CPUExecutionProvider"], "ort_cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
                 "ort_tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]}
    r = OnnxRunner(path, num_threads=threads, providers=providers[runtime])
    return r.raw, r.image_size
  raise ValueError(f"unknown runtime {runtime!r}")


def run(spec: dict) -> dict:
  import numpy as np  # pylint: disable=import-outside-toplevel

  from benchmarks.stats import latency_stats  # pylint: disable=import-outside-toplevel

  rss_start = _rss_mb()
  t = time.perf_counter()
  call, size = make_call(spec)
  load_s = time.perf_counter() - t
  rng = np.random.default_rng(0)
  out = {"load_s": load_s, "batches": {}}
  for i, batch in enumerate(spec["batch_sizes"]):
    x = rng.integers(0, 256, (batch, size, size, 1), dtype=np.uint8)
    t = time.perf_counter()
    call(x)
    first = time.perf_counter() - t
    if i == 0:
      out["first_inference_ms"] = first * 1000
    for _ in range(spec["warmup"]):
      call(x)
    samples, deadline = [], time.perf_counter() + spec["max_seconds"]
    while len(samples) < spec["runs"] and (len(samples) < 5 or time.perf_counter() < deadline):
      t = time.perf_counter()
      call(x)
      samples.append(time.perf_counter() - t)
    out["batches"][str(batch)] = latency_stats(samples, batch)
  out["peak_rss_mb"] = _rss_mb()
  out["rss_before_load_mb"] = rss_start
  # After the timing and the memory peak, so neither includes the profiled copy; bench-compare asks once per row.
  if spec["runtime"] == "openvino" and spec.get("kernels", True):
    out["kernels"] = openvino_kernels(spec["path"], spec.get("threads"), spec["batch_sizes"][0])
  if os.environ.get(ISA_VARIABLE):
    out["max_isa"] = os.environ[ISA_VARIABLE]
  return out


def parity(spec: dict) -> dict:
  """A row's parity (benchmarks.run.row_parity) checked in this process, so under this process's environment (an
  instruction-set cap)."""
  import pathlib  # pylint: disable=import-outside-toplevel

  from benchmarks.run import row_parity  # pylint: disable=import-outside-toplevel
  from covidct.manifest import Manifest  # pylint: disable=import-outside-toplevel

  root = pathlib.Path(spec["root"])
  return row_parity(root, Manifest.load(root), spec["row"], spec.get("data_dir"), {})


if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  spec_ = json.loads(sys.argv[1])
  print("BENCH " + json.dumps(parity(spec_) if spec_.get("mode") == "parity" else run(spec_), default=float))
