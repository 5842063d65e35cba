"""Every artifact on every runtime: one worker process per (artifact, runtime, threads), all batch sizes inside."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

from covidct.extras import available
from covidct.manifest import Manifest


def nvidia_gpus() -> list[str]:
  """Names and driver of the NVIDIA GPUs here, by nvidia-smi (empty where there is none)."""
  try:
    res = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=30, check=False)
  except (OSError, subprocess.TimeoutExpired):
    return []
  return [f"{name.strip()} ({mem.strip()}, driver {drv.strip()})" for name, mem, drv in
          (l.split(",") for l in res.stdout.splitlines() if l.count(",") == 2)] if res.returncode == 0 else []


def gpu_status() -> dict:
  """Whether TensorFlow and ONNX Runtime can use a GPU here, and the reason when not."""
  out = {}
  try:
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    gpus = tf.config.list_physical_devices("GPU")
    out["tensorflow"] = {"available": bool(gpus), "devices": [g.name for g in gpus],
                         "reason": None if gpus else "TensorFlow sees no GPU on this machine"}
  except ImportError:
    out["tensorflow"] = {"available": False, "reason": "TensorFlow is not installed"}
  import onnxruntime as ort  # pylint: disable=import-outside-toplevel

  if hasattr(ort, "preload_dlls"):  # onnxruntime-gpu: load CUDA and cuDNN from the nvidia-* wheels, if installed
    try:
      ort.preload_dlls()
    except Exception:  # pylint: disable=broad-except
      pass
  providers = ort.get_available_providers()
  for name, key in (("CUDAExecutionProvider", "onnxruntime_cuda"), ("TensorrtExecutionProvider", "onnxruntime_tensorrt")):
    ok = name in providers
    out[key] = {"available": ok, "reason": None if ok else
                f"{name} is not in this onnxruntime ({ort.__version__}, providers {providers}); "
                "install onnxruntime-gpu (extra 'gpu') on a machine with CUDA"}
  if out["onnxruntime_tensorrt"]["available"] and not _loadable("libnvinfer.so.10"):
    # onnxruntime-gpu lists TensorRT whenever it was built with it; the session then falls back to CUDA.
    out["onnxruntime_tensorrt"] = {
        "available": False, "reason": "onnxruntime-gpu has TensorrtExecutionProvider, but TensorRT's libnvinfer.so.10 "
                                      "is not installed (install TensorRT 10 for CUDA 13, e.g. the tensorrt-cu13 wheel)"}
  return out


def _loadable(library: str) -> bool:
  import ctypes  # pylint: disable=import-outside-toplevel

  try:
    ctypes.CDLL(library)
    return True
  except OSError:
    return False


# The copies OpenVINO reads and runs as they are (its TFLite reader does not take the full-int8 and dynamic-range
# .tflite files' quantized tensors as covidct's runners do).
OPENVINO_FORMATS = ("onnx_float32", "onnx_int8", "tflite_float32", "tflite_float16")


def configurations(artifacts_dir, threads=(1, 2), gpu: dict | None = None) -> list[dict]:
  """The rows: (label, runtime, path, threads, artifact format) for every artifact in an export folder."""
  root = pathlib.Path(artifacts_dir)
  manifest = Manifest.load(root)
  rows = []
  keras_file = pathlib.Path(manifest.source_model) / "model.keras"
  for t in threads:
    rows.append(dict(artifact="saved_model", runtime="tf_signature", path=str(root / "saved_model"), threads=t))
    if keras_file.exists():
      rows.append(dict(artifact="keras", runtime="keras_predict", path=str(keras_file), threads=t))
      rows.append(dict(artifact="keras", runtime="keras_call", path=str(keras_file), threads=t))
    for fmt, info in manifest.artifacts.items():
      runtime = "litert" if fmt.startswith("tflite") else "ort"
      rows.append(dict(artifact=fmt, runtime=runtime, path=str(root / info["file"]), threads=t))
      if fmt in OPENVINO_FORMATS:
        row = dict(artifact=fmt, runtime="openvino", path=str(root / info["file"]), threads=t)
        if not available("openvino"):
          row["skipped"] = "OpenVINO is not installed (pip install 'covidct[openvino]')"
        rows.append(row)
  gpu = gpu or {}
  gpu_rows = [dict(artifact="saved_model", runtime="tf_signature_gpu", path=str(root / "saved_model"), threads=None,
                   needs="tensorflow")]
  for fmt, info in manifest.artifacts.items():
    if fmt.startswith("onnx"):
      gpu_rows.append(dict(artifact=fmt, runtime="ort_cuda", path=str(root / info["file"]), threads=None,
                           needs="onnxruntime_cuda"))
      gpu_rows.append(dict(artifact=fmt, runtime="ort_tensorrt", path=str(root / info["file"]), threads=None,
                           needs="onnxruntime_tensorrt"))
  for row in gpu_rows:
    status = gpu.get(row.pop("needs"), {"available": False, "reason": "not checked"})
    if not status["available"]:
      row["skipped"] = status["reason"]
    rows.append(row)
  return rows


def run_worker(spec: dict, timeout: float = 600, env: dict | None = None) -> dict:
  """Runs one configuration in a fresh process (`benchmarks.worker`), with `env` added to this process's
  environment; returns its result, or {"error": ...}."""
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", **(env or {}))
  if spec.get("threads"):
    env.update(OMP_NUM_THREADS=str(spec["threads"]))
  res = subprocess.run([sys.executable, "-m", "benchmarks.worker", json.dumps(spec)], capture_output=True, text=True,
                       env=env, timeout=timeout, check=False)
  line = [l for l in res.stdout.splitlines() if l.startswith("BENCH ")]
  if res.returncode != 0 or not line:
    err = [l for l in res.stderr.splitlines() if l.strip()][-1:] or ["no output"]
    return {"error": f"worker exited {res.returncode}: {err[0][:300]}"}
  return json.loads(line[-1][6:])
