"""`covidct bench`: every artifact x runtime x batch size, the FLOP limit, the input pipeline; JSON, Markdown, PNGs."""

from __future__ import annotations

import json
import pathlib
import platform
import time

from benchmarks.flops import measured_gemm_gflops, model_flops
from benchmarks.latency import configurations, gpu_status, nvidia_gpus, run_worker
from covidct.errors import CovidctError
from covidct.fsutil import atomic_dir
from covidct.manifest import Manifest
from covidct.versions import cpu_info


def environment(threads) -> dict:
  from covidct.versions import library_versions  # pylint: disable=import-outside-toplevel

  gpu = gpu_status()
  return {"cpu": cpu_info(), "python": platform.python_version(), "platform": platform.platform(),
          "threads_benchmarked": list(threads), "libraries": library_versions(), "gpu": gpu,
          "gpu_devices": nvidia_gpus()}


RUNTIMES = ("tf_signature", "keras_predict", "keras_call", "litert", "ort", "tf_signature_gpu", "ort_cuda",
            "ort_tensorrt")


def _flops(saved_model_dir) -> tuple[int | None, str]:
  """FLOPs per image from the SavedModel's graph, or None (and why) where TensorFlow is not installed."""
  try:
    import tensorflow  # pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    return None, "not measured: TensorFlow is not installed here"
  return model_flops(saved_model_dir), ("tf.compat.v1.profiler float_operation on the frozen serving graph, batch 1 "
                                        "(multiply-add = 2)")


def run_benchmark(artifacts_dir, out_dir, batch_sizes=(1, 8, 32), threads=(1, 2), runs: int = 50, warmup: int = 5,
                  max_seconds: float = 5.0, data_dir=None, pipeline: bool = True, overwrite: bool = False,
                  progress=print, runtimes=None) -> dict:
  """Benchmarks the export folder `artifacts_dir`; writes bench.json, bench.md, latency.png, accuracy_latency.png.

  `runtimes` (names from RUNTIMES) keeps only those rows: e.g. ('ort', 'ort_cuda') on a GPU machine that has
  ONNX Runtime but no TensorFlow. Without TensorFlow, FLOPs are not measured and the rows that need it are skipped.
  """
  root = pathlib.Path(artifacts_dir)
  if runtimes:
    unknown = set(runtimes) - set(RUNTIMES)
    if unknown:
      raise CovidctError(f"unknown runtimes {sorted(unknown)}; choose from {', '.join(RUNTIMES)}.")
  env = environment(threads)
  rows = configurations(root, threads, env["gpu"])
  if runtimes:
    rows = [r for r in rows if r["runtime"] in runtimes]
  manifest = Manifest.load(root)
  flops, flops_source = _flops(root / "saved_model")
  peaks = {t: measured_gemm_gflops(t) for t in threads}
  results = []
  for i, row in enumerate(rows, 1):
    label = f"{row['artifact']} / {row['runtime']}" + (f" / {row['threads']} thr" if row.get("threads") else "")
    if "skipped" in row:
      results.append({**row, "status": "not measured"})
      continue
    progress(f"[{i}/{len(rows)}] {label}")
    spec = {**row, "batch_sizes": list(batch_sizes), "runs": runs, "warmup": warmup, "max_seconds": max_seconds}
    res = run_worker(spec)
    result = {**row, **res, "status": "error" if "error" in res else "measured"}
    if "batches" in res and flops:
      peak = peaks.get(row["threads"])
      for stats in res["batches"].values():
        stats["gflops"] = flops * stats["throughput_ips"] / 1e9
        stats["fraction_of_peak"] = stats["gflops"] / peak if peak else None
    auc = manifest.metrics.get(row["artifact"] if row["artifact"] != "keras" else "saved_model", {})
    result["test_roc_auc"] = auc.get("test", {}).get("roc_auc")
    result["file_bytes"] = _size(pathlib.Path(row["path"]))
    results.append(result)
  report = {
      "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
      "artifacts_dir": str(root.resolve()), "environment": env,
      "model": {"flops_per_image": flops, "flops_source": flops_source, "input": manifest.input},
      "peak": {"measured_gemm_gflops": {str(t): v for t, v in peaks.items()},
               "how": "float32 1024x1024 GEMM through numpy's BLAS, best of 5, threadpoolctl limits",
               "theoretical_gflops_per_core": env["cpu"]["theoretical_gflops_per_core"],
               "theoretical_basis": env["cpu"]["theoretical_basis"]},
      "settings": {"batch_sizes": list(batch_sizes), "runs": runs, "warmup": warmup, "max_seconds": max_seconds,
                   "inputs": "seeded random uint8 images of the model's input size"},
      "results": results,
  }
  if pipeline:
    from benchmarks.pipeline_throughput import measure  # pylint: disable=import-outside-toplevel

    progress("input pipeline")
    report["pipeline"] = measure(data_dir, image_size=manifest.image_size)
  from benchmarks.report import markdown, plots  # pylint: disable=import-outside-toplevel

  with atomic_dir(out_dir, overwrite) as tmp:
    (tmp / "bench.json").write_text(json.dumps(report, indent=2))
    (tmp / "bench.md").write_text(markdown(report))
    plots(report, tmp)
  return report


def _size(path: pathlib.Path) -> int:
  if path.is_dir():
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
  return path.stat().st_size if path.exists() else 0
