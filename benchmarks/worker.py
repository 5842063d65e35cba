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
  return out


if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  print("BENCH " + json.dumps(run(json.loads(sys.argv[1]))))
