"""`covidct bench`: every artifact x runtime x batch size, the FLOP limit, the input pipeline; JSON, Markdown, PNGs."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import platform
import time

from benchmarks.flops import measured_gemm_gflops, measured_int8_gemm_gops, model_flops
from benchmarks.latency import configurations, gpu_status, nvidia_gpus, run_worker
from covidct.errors import CovidctError
from covidct.fsutil import atomic_dir
from covidct.manifest import Manifest
from covidct.versions import cpu_info, cpu_label


def environment(threads) -> dict:
  from covidct.versions import library_versions  # pylint: disable=import-outside-toplevel

  gpu = gpu_status()
  return {"cpu": cpu_info(), "python": platform.python_version(), "platform": platform.platform(),
          "threads_benchmarked": list(threads), "libraries": library_versions(), "gpu": gpu,
          "gpu_devices": nvidia_gpus()}


INT8_FORMATS = ("tflite_int8", "onnx_int8")  # copies that compute in 8-bit integers (tflite_dynamic: float activations)
RUNTIMES = ("tf_signature", "keras_predict", "keras_call", "litert", "ort", "openvino", "tf_signature_gpu", "ort_cuda",
            "ort_tensorrt")
# How each row's copy was checked against the SavedModel: the export checked each artifact under covidct's default
# runtime for it (the SavedModel is the reference itself); a row under another runtime is checked here.
EXPORT_CHECKED = {"tf_signature": "reference", "litert": "export", "ort": "export"}


def row_parity(root: pathlib.Path, manifest: Manifest, row: dict, data_dir, cache: dict) -> dict:
  """{'passed': bool | None, 'how': str, ...}: whether this artifact under this runtime gives the SavedModel's answers.

  Rows under the runtime the export checked take the export's verdict; an OpenVINO row is checked here by the same
  rules (export.parity.check_parity) on the test split, once per artifact; Keras rows run the SavedModel's own
  model. Without the dataset (no data_dir), an unchecked row is never recommended.
  """
  runtime, artifact = row["runtime"], row["artifact"]
  how = EXPORT_CHECKED.get(runtime.replace("_gpu", ""))
  if artifact == "saved_model" or artifact == "keras":
    return {"passed": True, "how": "the reference model"}
  if how == "export":
    passed = manifest.artifacts[artifact]["parity"]["passed"]
    return {"passed": bool(passed), "how": "export parity (same runtime)"}
  if runtime != "openvino":
    return {"passed": None, "how": f"not checked under {runtime}"}
  key = (artifact, runtime)
  if key not in cache:
    try:
      from covidct.data import eval_set  # pylint: disable=import-outside-toplevel
      from covidct.runners import SavedModelRunner, load_runner  # pylint: disable=import-outside-toplevel
      from export.parity import check_parity  # pylint: disable=import-outside-toplevel

      if "test" not in cache:
        cache["reference"] = SavedModelRunner(root / "saved_model")
        cache["test"] = eval_set("covid_ct", "test", manifest.image_size, data_dir).arrays()
      candidate = load_runner(row["path"], runtime=runtime)
      r = check_parity(cache["reference"], candidate, artifact, cache["test"], manifest.threshold,
                       quantized_reference=manifest.quantization_aware)
      cache[key] = {"passed": r.passed, "how": "checked here on the test split", "max_abs_diff": r.max_abs_diff,
                    "agreement": r.agreement, "roc_auc": r.roc_auc, "failures": r.failures}
    except CovidctError as e:
      cache[key] = {"passed": None, "how": f"not checked: {str(e).splitlines()[0]}"}
  return cache[key]


def recommend(results: list[dict], batch_sizes, threads) -> dict:
  """The fastest parity-passing artifact x runtime for each batch size and thread count (among the export folder's
  own files: not the Keras rows, whose model lives elsewhere), and the default: the smallest batch on the most
  threads measured (one request, the whole machine)."""
  best = []
  for t in threads:
    for b in batch_sizes:
      rows = [r for r in results if r["status"] == "measured" and r.get("threads") == t and r["artifact"] != "keras"
              and (r.get("parity") or {}).get("passed") and str(b) in r.get("batches", {})]
      if rows:
        r = min(rows, key=lambda r: r["batches"][str(b)]["p50_ms"])
        best.append({"batch": b, "threads": t, "artifact": r["artifact"], "runtime": r["runtime"],
                     "file": pathlib.Path(r["path"]).name, "p50_ms": r["batches"][str(b)]["p50_ms"],
                     "images_per_s": r["batches"][str(b)]["throughput_ips"]})
  default = next((x for x in best if x["batch"] == min(batch_sizes) and x["threads"] == max(threads)), None)
  return {"default": default, "per_setting": best}


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
                  progress=print, runtimes=None, load_seconds: float | None = None) -> dict:
  """Benchmarks the export folder `artifacts_dir`; writes bench.json, bench.md, latency.png, scaling.png (latency
  against batch size and threads), accuracy_latency.png.

  `runtimes` (names from RUNTIMES) keeps only those rows: e.g. ('ort', 'ort_cuda') on a GPU machine that has
  ONNX Runtime but no TensorFlow. Without TensorFlow, FLOPs are not measured and the rows that need it are skipped.
  `load_seconds` adds a load test of the export behind `covidct serve` (benchmarks.serving), that long per concurrency.
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
  from covidct.manifest import MANIFEST_FILE  # pylint: disable=import-outside-toplevel
  from covidct.predict import check_listed_file  # pylint: disable=import-outside-toplevel

  for info in manifest.artifacts.values():  # a changed copy must not be timed, nor carry export's parity verdict
    if not (root / info["file"]).is_file():
      raise CovidctError(f"{root / info['file']} is listed in {root / MANIFEST_FILE} but missing; copy the whole "
                         "export folder again.")
    check_listed_file(root / info["file"], manifest, root / MANIFEST_FILE)
  flops, flops_source = _flops(root / "saved_model")
  peaks = {t: measured_gemm_gflops(t) for t in threads}
  int8_peaks = {t: measured_int8_gemm_gops(t) for t in threads}
  results, parity_cache = [], {}
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
      int8 = row["artifact"] in INT8_FORMATS or (manifest.quantization_aware and row["artifact"] != "saved_model"
                                                   and row["artifact"] != "keras" and "float" not in row["artifact"])
      if res.get("kernels"):  # OpenVINO's own choice: it runs a quantization-aware model's QDQ float32 copy in int8
        int8 = sum(k["share"] for k in res["kernels"] if k["kernel"].lower().endswith("_i8")) > 0.5
      peak = (int8_peaks if int8 else peaks).get(row["threads"])
      result["peak_kind"] = "int8 GEMM" if int8 else "float32 GEMM"
      for stats in res["batches"].values():
        stats["gflops"] = flops * stats["throughput_ips"] / 1e9
        stats["fraction_of_peak"] = stats["gflops"] / peak if peak else None
    result["parity"] = row_parity(root, manifest, row, data_dir, parity_cache)
    auc = manifest.metrics.get(row["artifact"] if row["artifact"] != "keras" else "saved_model", {})
    result["test_roc_auc"] = auc.get("test", {}).get("roc_auc")
    result["file_bytes"] = _size(pathlib.Path(row["path"]))
    results.append(result)
  report = {
      "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
      "artifacts_dir": str(root.resolve()), "environment": env,
      "model": {"flops_per_image": flops, "flops_source": flops_source, "input": manifest.input},
      "peak": {"measured_gemm_gflops": {str(t): v for t, v in peaks.items()},
               "measured_int8_gemm_gops": {str(t): v for t, v in int8_peaks.items()},
               "how_int8": "uint8 x int8 1024x1024 MatMulInteger in ONNX Runtime (MLAS), best of 5, the runners' "
                           "session settings; the int8 rows' % peak is against it",
               "how": "float32 1024x1024 GEMM through numpy's BLAS, best of 5, threadpoolctl limits",
               "theoretical_gflops_per_core": env["cpu"]["theoretical_gflops_per_core"],
               "theoretical_basis": env["cpu"]["theoretical_basis"]},
      "settings": {"batch_sizes": list(batch_sizes), "runs": runs, "warmup": warmup, "max_seconds": max_seconds,
                   "inputs": "seeded random uint8 images of the model's input size"},
      "results": results,
  }
  report["recommendation"] = recommend(results, batch_sizes, threads)
  best = report["recommendation"]["default"]
  if best:
    cpu = env["cpu"]
    recorded = dataclasses.replace(manifest, recommended={
        **best, "per_setting": report["recommendation"]["per_setting"],
        "measured_on": cpu_label(cpu),
        "measured": report["created"]})
    try:
      where = f"written to {recorded.save(root)}"
    except OSError as e:  # a read-only export: the measurements still stand, in the report
      where = f"not written to {root}/manifest.json ({e.strerror or e}): it stays in the report"
    progress(f"recommended: {best['file']} on {best['runtime']} ({where})")
  if pipeline:
    from benchmarks.pipeline_throughput import measure  # pylint: disable=import-outside-toplevel

    progress("input pipeline")
    report["pipeline"] = measure(data_dir, image_size=manifest.image_size)
  from benchmarks.report import markdown, plots  # pylint: disable=import-outside-toplevel

  with atomic_dir(out_dir, overwrite) as tmp:
    if load_seconds:
      from benchmarks.serving import load_test  # pylint: disable=import-outside-toplevel

      report["load_test"] = load_test(root, tmp / "load_test", seconds=load_seconds, progress=progress)
    (tmp / "bench.json").write_text(json.dumps(report, indent=2))
    (tmp / "bench.md").write_text(markdown(report))
    plots(report, tmp)
  return report


def _size(path: pathlib.Path) -> int:
  if path.is_dir():
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
  return path.stat().st_size if path.exists() else 0
