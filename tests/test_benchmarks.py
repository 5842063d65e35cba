"""The benchmark harness: statistics on known inputs, a smoke run on a tiny model, the GPU skip reasons."""

from __future__ import annotations

import json
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from benchmarks.flops import measured_gemm_gflops, model_flops
from benchmarks.latency import configurations, gpu_status
from benchmarks.stats import latency_stats
from covidct.cli import main
from covidct.versions import cpu_info


def test_latency_stats_known_inputs():
  s = latency_stats([0.001, 0.002, 0.003, 0.004, 0.010], batch_size=8)
  assert s["runs"] == 5
  assert s["p50_ms"] == pytest.approx(3.0)
  assert s["p90_ms"] == pytest.approx(7.6)  # numpy's linear interpolation: 4 + 0.6 * 6
  assert s["p99_ms"] == pytest.approx(9.76)
  assert s["mean_ms"] == pytest.approx(4.0)
  assert s["std_ms"] == pytest.approx(np.std([1, 2, 3, 4, 10], ddof=1))
  assert s["throughput_ips"] == pytest.approx(8 / 0.004)
  with pytest.raises(ValueError):
    latency_stats([], 1)


def test_flops_from_the_graph(model_dir):
  # The final model at 48x48, by hand: conv 1x1 (1->16) at 48, 3x3 (16->32) at 24, 5x5 (32->64) at 12,
  # 5x5 (64->64) at 6, dense 3*3*64->128->64->8->1; 2 FLOPs per multiply-add. The profiler also counts the
  # element-wise ops (bias adds, rescaling, sigmoid), so it is a little above the multiply-adds alone.
  macs = 48 * 48 * 16 * 1 + 24 * 24 * 32 * 16 * 9 + 12 * 12 * 64 * 32 * 25 + 6 * 6 * 64 * 64 * 25 \
      + 576 * 128 + 128 * 64 + 64 * 8 + 8
  flops = model_flops(model_dir / "saved_model")
  assert 2 * macs <= flops <= 2 * macs * 1.05


def test_peak_and_cpu_info():
  assert measured_gemm_gflops(1, n=256, repeats=2) > 0.1
  info = cpu_info()
  assert info["cores"] >= 1 and info["vector"] in ("avx512", "avx2", "sse")


def test_gpu_rows_say_why_they_are_skipped(exported):
  status = gpu_status()
  rows = configurations(exported, threads=(1,), gpu=status)
  gpu_rows = [r for r in rows if r["runtime"] in ("tf_signature_gpu", "ort_cuda", "ort_tensorrt")]
  assert {r["runtime"] for r in gpu_rows} == {"tf_signature_gpu", "ort_cuda", "ort_tensorrt"}
  import tensorflow as tf

  if not tf.config.list_physical_devices("GPU"):
    tf_row = next(r for r in gpu_rows if r["runtime"] == "tf_signature_gpu")
    assert "no GPU" in tf_row["skipped"]
  if "CUDAExecutionProvider" not in ort.get_available_providers():
    assert all("onnxruntime-gpu" in r["skipped"] for r in gpu_rows if r["runtime"] == "ort_cuda")


def test_bench_smoke(exported, dummy_data_dir, tmp_path, monkeypatch):
  export = tmp_path / "export"  # bench writes its recommendation into the export's manifest: not the shared fixture's
  shutil.copytree(exported, export)
  out = tmp_path / "bench"
  res = CliRunner().invoke(main, ["bench", str(export), "--out", str(out), "--batch-sizes", "1,2", "--threads", "1",
                                  "--runs", "3", "--warmup", "1", "--max-seconds", "0.2",
                                  "--data-dir", str(dummy_data_dir)])
  assert res.exit_code == 0, res.output
  report = json.loads((out / "bench.json").read_text())
  measured = [r for r in report["results"] if r["status"] == "measured"]
  assert {r["runtime"] for r in measured} >= {"tf_signature", "keras_predict", "keras_call", "litert", "ort", "openvino"}
  for r in measured:
    assert r["load_s"] >= 0 and r["first_inference_ms"] > 0 and r["peak_rss_mb"] > 0 and r["file_bytes"] > 0
    for b in ("1", "2"):
      s = r["batches"][b]
      assert s["runs"] >= 3 and 0 < s["p50_ms"] <= s["p99_ms"] and s["throughput_ips"] > 0 and s["gflops"] > 0
  assert report["model"]["flops_per_image"] > 0
  assert report["pipeline"]["train_pipeline_augmented_ips"] > 0 and report["pipeline"]["train_step_ips"] > 0
  assert "tensorflow" in report["environment"]["libraries"] and report["environment"]["cpu"]["cores"] >= 1
  for name in ("bench.md", "latency.png", "scaling.png", "accuracy_latency.png"):
    assert (out / name).stat().st_size > 500
  assert "| tflite_float32 / litert / 1t | pass |" in (out / "bench.md").read_text()
  # OpenVINO reads the .onnx and the float .tflite copies; each is checked against the SavedModel here.
  ov_rows = [r for r in measured if r["runtime"] == "openvino"]
  assert {r["artifact"] for r in ov_rows} == {"onnx_float32", "tflite_float32", "tflite_float16"}
  assert all(r["parity"]["how"] == "checked here on the test split" and r["parity"]["passed"] for r in ov_rows)
  for r in ov_rows:  # the kernels it ran, float32 ones for this float model, and the peak they are measured against
    assert r["kernels"] and all(k["kernel"].lower().endswith("_f32") for k in r["kernels"]), r["kernels"]
    assert r["peak_kind"] == "float32 GEMM"
  # The recommendation: the fastest row that passes parity, per setting, and the default written to the manifest.
  rec = report["recommendation"]
  fastest = min((r for r in measured if r["artifact"] != "keras" and r["parity"]["passed"]),
                key=lambda r: r["batches"]["1"]["p50_ms"])
  assert (rec["default"]["artifact"], rec["default"]["runtime"]) == (fastest["artifact"], fastest["runtime"])
  assert {(x["batch"], x["threads"]) for x in rec["per_setting"]} == {(1, 1), (2, 1)}
  from covidct.manifest import Manifest
  from covidct.predict import resolve_model

  written = Manifest.load(export).recommended
  assert written["file"] == rec["default"]["file"] and written["measured_on"]
  artifact, runtime, why = resolve_model(export)
  assert artifact.name == rec["default"]["file"] and "recommended by covidct bench" in why
  assert runtime == ("openvino" if rec["default"]["runtime"] == "openvino" else "default")
  image = tmp_path / "scan.png"
  from PIL import Image

  Image.fromarray(np.full((64, 64), 90, np.uint8)).save(image)
  res = CliRunner().invoke(main, ["predict", str(image), "--model", str(export)])
  assert res.exit_code == 0 and f"model {rec['default']['file']} on" in res.stdout, res.output
  # On another kind of CPU the recommendation is set aside (its copy passed parity there, not necessarily here).
  import covidct.versions

  monkeypatch.setattr(covidct.versions, "cpu_label", lambda info=None: "AMD EPYC 7763 64-Core Processor (avx2)")
  artifact, runtime, why = resolve_model(export)
  assert (artifact, runtime) == (export, "default") and written["measured_on"] in why and "run covidct bench" in why
  res = CliRunner().invoke(main, ["predict", str(image), "--model", str(export)])
  assert res.exit_code == 0 and "not on this CPU (AMD EPYC" in res.stdout, res.output


def test_a_copy_that_fails_parity_is_never_recommended():
  from benchmarks.run import recommend

  def row(artifact, runtime, ms, passed):
    return {"status": "measured", "artifact": artifact, "runtime": runtime, "threads": 1, "path": f"/x/{artifact}",
            "parity": {"passed": passed}, "batches": {"1": {"p50_ms": ms, "throughput_ips": 1000 / ms}}}

  rec = recommend([row("tflite_int8", "litert", 1.0, False), row("onnx_float32", "openvino", 2.0, True),
                   row("onnx_float32", "ort", 3.0, True), row("keras", "keras_call", 0.5, True),
                   row("onnx_int8", "ort_cuda", 0.1, None)], batch_sizes=(1,), threads=(1,))
  assert (rec["default"]["artifact"], rec["default"]["runtime"]) == ("onnx_float32", "openvino")
  assert recommend([row("tflite_int8", "litert", 1.0, False)], (1,), (1,)) == {"default": None, "per_setting": []}


def test_openvino_runs_the_onnx_and_tflite_copies_in_float32(exported, dummy_data_dir):
  from covidct.data import split_arrays
  from covidct.runners import OPENVINO_CONFIG, SavedModelRunner, load_runner

  images = split_arrays("test", str(dummy_data_dir), 48)["images"]
  want = SavedModelRunner(exported / "saved_model")(images)
  for name in ("model_float32.onnx", "model_float32.tflite"):
    runner = load_runner(exported / name, runtime="openvino", num_threads=1)
    assert (runner.kind, runner.input_name, runner.output_name) == ("openvino", "image", "covid_probability")
    np.testing.assert_allclose(runner(images), want, atol=1e-4)
  assert OPENVINO_CONFIG["INFERENCE_PRECISION_HINT"] == "f32"  # bfloat16 on BF16/AMX CPUs failed parity (0.11)


def test_bench_needs_an_export_folder(tmp_path):
  res = CliRunner().invoke(main, ["bench", str(tmp_path)])
  assert res.exit_code == 1 and "manifest.json" in res.stderr
  res = CliRunner().invoke(main, ["bench", str(tmp_path), "--batch-sizes", "1,x"])
  assert res.exit_code == 2


def test_bench_on_a_machine_without_tensorflow(exported, tmp_path):
  """What a GPU machine with onnxruntime-gpu and no TensorFlow runs: `--runtimes ort` in a process where TensorFlow
  cannot be imported. FLOPs are reported as not measured; the ONNX rows are measured."""
  exported = shutil.copytree(exported, tmp_path / "export")
  out = tmp_path / "bench"
  script = ("import sys; sys.modules['tensorflow'] = None\n"
            "from covidct.cli import main\n"
            f"main(['bench', {str(exported)!r}, '--out', {str(out)!r}, '--runtimes', 'ort,ort_cuda', '--threads', '1',"
            " '--batch-sizes', '1', '--runs', '3', '--warmup', '1', '--max-seconds', '0.2', '--no-pipeline'])\n")
  res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False,
                       cwd=pathlib.Path(__file__).parents[1])
  assert res.returncode == 0, res.stderr[-2000:]
  report = json.loads((out / "bench.json").read_text())
  assert {r["runtime"] for r in report["results"]} <= {"ort", "ort_cuda"}
  measured = [r for r in report["results"] if r["status"] == "measured"]
  assert [r["runtime"] for r in measured][:1] == ["ort"] and measured[0]["batches"]["1"]["p50_ms"] > 0
  assert report["model"]["flops_per_image"] is None and "TensorFlow is not installed" in report["model"]["flops_source"]
  assert "Model FLOPs: not measured" in (out / "bench.md").read_text()


def test_bench_rejects_an_unknown_runtime(exported, tmp_path):
  res = CliRunner().invoke(main, ["bench", str(exported), "--out", str(tmp_path / "b"), "--runtimes", "ort,tpu"])
  assert res.exit_code == 1 and "unknown runtimes ['tpu']" in res.stderr


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(),
                    reason="this machine's onnxruntime has CUDA: there is no CPU fallback to provoke")
def test_onnx_runner_refuses_a_silent_cpu_fallback(exported):
  from covidct.errors import CovidctError
  from covidct.runners import OnnxRunner

  with pytest.raises(CovidctError, match="could not start CUDAExecutionProvider"):
    OnnxRunner(exported / "model_float32.onnx", providers=["CUDAExecutionProvider", "CPUExecutionProvider"])


def test_tensorrt_needs_its_library():
  from benchmarks.latency import _loadable

  assert _loadable("libc.so.6") and not _loadable("libnvinfer-not-here.so.10")
  trt = gpu_status()["onnxruntime_tensorrt"]
  if not _loadable("libnvinfer.so.10"):  # onnxruntime-gpu may list the provider; without TensorRT it cannot run
    assert trt["available"] is False and trt["reason"]


def test_bench_compare_interleaves_exports_and_ranks_their_fastest_rows(exported, dummy_data_dir, tmp_path):
  out = tmp_path / "cmp"
  res = CliRunner().invoke(main, ["bench-compare", str(exported), str(exported), "--out", str(out), "--rounds", "2",
                                  "--runtimes", "litert,ort", "--data-dir", str(dummy_data_dir)])
  assert res.exit_code == 0, res.output
  result = json.loads((out / "compare.json").read_text())
  names = ["artifacts", "artifacts (2)"]
  assert [e["export"] for e in result["exports"]] == names
  assert {r["export"] for r in result["rows"]} == set(names)
  assert {r["runtime"] for r in result["rows"]} == {"litert", "ort"}
  for r in result["rows"]:
    assert len(r["rounds_ms"]) == 2 and r["median_ms"] == pytest.approx(float(np.median(r["rounds_ms"])))
  base, other = result["exports"]
  assert base["speedup"]["median"] == 1.0  # the baseline against itself, round by round
  # The second export's speed is the median of per-round ratios of the two exports' fastest rows.
  ratios = np.array(base["best_per_round_ms"]) / np.array(other["best_per_round_ms"])
  assert other["speedup"]["median"] == pytest.approx(float(np.median(ratios)))
  for e in result["exports"]:
    fastest = [r for r in result["rows"] if r["export"] == e["export"]
               and (r["artifact"], r["runtime"]) == (e["fastest"]["artifact"], e["fastest"]["runtime"])]
    assert fastest and fastest[0]["parity"]["passed"]
    assert e["best_per_round_ms"] == [min(r["rounds_ms"][i] for r in result["rows"] if r["export"] == e["export"])
                                      for i in range(2)]
  assert "speed against the first" in (out / "compare.md").read_text() and "Report:" in res.output


def test_bench_compare_refuses_what_it_cannot_compare(exported, tmp_path):
  runner = CliRunner()
  res = runner.invoke(main, ["bench-compare", str(exported), "--out", str(tmp_path / "a")])
  assert res.exit_code == 1 and "at least two export folders" in res.output and "Traceback" not in res.output
  res = runner.invoke(main, ["bench-compare", str(exported), str(tmp_path), "--out", str(tmp_path / "b")])
  assert res.exit_code == 1 and "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1, res.output
  assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_bench_compare_runs_openvino_as_an_avx2_cpu_would(exported, dummy_data_dir, tmp_path):
  """--max-isa avx2 caps oneDNN: OpenVINO's convolutions then run AVX2 kernels (named in the report), checked for
  parity under the same cap; runtimes that ignore the cap are refused, not run uncapped."""
  from benchmarks.interleaved import compare_exports, markdown

  result = compare_exports([exported, exported], tmp_path / "cmp", rounds=2, runtimes=["openvino"], runs=5, warmup=1,
                           max_seconds=0.2, data_dir=str(dummy_data_dir), max_isa="avx2", progress=False)
  rows = result["rows"]
  assert rows and {r["runtime"] for r in rows} == {"openvino"} and result["settings"]["max_isa"] == "AVX2"
  for r in rows:
    assert len(r["rounds_ms"]) == 2, r.get("error")
    kernels = [k["kernel"] for k in r["kernels"]]
    assert kernels and not [k for k in kernels if "avx512" in k.lower()], kernels
    assert [k for k in kernels if "avx2" in k.lower()], kernels
    assert sum(k["share"] for k in r["kernels"]) == pytest.approx(1.0)
    assert r["parity"]["passed"] is not None and "capped at AVX2" in r["parity"]["how"], r["parity"]
  md = markdown(result)
  assert "capped at AVX2" in md and result["settings"]["cpu"] in md and "avx2" in md
  res = CliRunner().invoke(main, ["bench-compare", str(exported), str(exported), "--out", str(tmp_path / "x"),
                                  "--max-isa", "avx2", "--runtimes", "openvino,ort"])
  assert res.exit_code == 1 and "ort would run uncapped" in res.output and "Traceback" not in res.output
  assert not (tmp_path / "x").exists()
