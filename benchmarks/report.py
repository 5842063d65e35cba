"""The benchmark report drawn from its JSON: a Markdown table and two plots."""

from __future__ import annotations

import pathlib


def _label(r) -> str:
  return f"{r['artifact']} / {r['runtime']}" + (f" / {r['threads']}t" if r.get("threads") else "")


def _parity(p: dict | None) -> str:
  if not p:
    return ""
  if p.get("passed") is None:
    return "not checked"
  if p["passed"]:
    return "pass" + (f" ({p['max_abs_diff']:.0e})" if p.get("max_abs_diff") is not None else "")
  return "**FAIL**" + (f": {p['failures'][0]}" if p.get("failures") else "")


def markdown(report: dict) -> str:
  env, model, peak = report["environment"], report["model"], report["peak"]
  cpu = env["cpu"]
  bs = report["settings"]["batch_sizes"]
  lines = [
      "# Inference benchmark", "",
      *([f"GPU: {', '.join(env['gpu_devices'])}.", ""] if env.get("gpu_devices") else []),
      f"CPU: {cpu['model']}, {cpu['cores']} cores, {cpu['mhz']:.0f} MHz, {cpu['vector']}"
      f"{', AMX-INT8' if cpu['amx_int8'] else ''}{', VNNI' if cpu['vnni'] else ''}. "
      + (f"Model: {model['flops_per_image'] / 1e9:.3f} GFLOP per image ({model['flops_source']})."
       if model.get("flops_per_image") else f"Model FLOPs: {model['flops_source']}."), "",
      "Peak: measured float32 GEMM " + ", ".join(f"{v:.1f} GFLOP/s on {t} thread(s)"
                                                 for t, v in peak["measured_gemm_gflops"].items())
      + ("; int8 GEMM (ONNX Runtime MatMulInteger) " + ", ".join(
          f"{v:.1f} GOP/s on {t} thread(s)" for t, v in peak["measured_int8_gemm_gops"].items() if v)
         if any((peak.get("measured_int8_gemm_gops") or {}).values()) else "")
      + f"; theoretical {peak['theoretical_gflops_per_core']:.1f} GFLOP/s per core ({peak['theoretical_basis']}). "
      "`% peak` is achieved GOP/s over the measured GEMM rate at the same thread count: the int8 GEMM's for the "
      "int8 copies (tflite_int8, onnx_int8, every copy of a quantization-aware model but the float ones; an "
      "OpenVINO row by the kernels it ran, which run a quantization-aware model's QDQ float copies in int8), the "
      "float32 GEMM's for the others.", "",
      f"Latency per batch in ms (p50 / p99), throughput in images/s; {report['settings']['inputs']}.", "",
      "| artifact / runtime / threads | parity | test AUC | MB | load s | first ms | peak RSS MB | "
      + " | ".join(f"b{b} p50 | b{b} p99 | b{b} img/s | b{b} % peak" for b in bs) + " |",
      "| --- | --- | ---: | ---: | ---: | ---: | ---: | " + " | ".join("---: | ---: | ---: | ---:" for _ in bs) + " |",
  ]
  for r in report["results"]:
    parity = _parity(r.get("parity"))
    if r["status"] != "measured":
      lines.append(f"| {_label(r)} | {parity} | | | | | | {r['status']}: {r.get('skipped') or r.get('error')} |")
      continue
    auc = f"{r['test_roc_auc']:.4f}" if r.get("test_roc_auc") is not None else ""
    cells = []
    for b in bs:
      s = r["batches"][str(b)]
      frac = f"{s['fraction_of_peak']:.0%}" if s.get("fraction_of_peak") is not None else ""
      cells.append(f"{s['p50_ms']:.2f} | {s['p99_ms']:.2f} | {s['throughput_ips']:.0f} | {frac}")
    lines.append(f"| {_label(r)} | {parity} | {auc} | {r['file_bytes'] / 1e6:.2f} | {r['load_s']:.2f} | "
                 f"{r['first_inference_ms']:.1f} | {r['peak_rss_mb']:.0f} | " + " | ".join(cells) + " |")
  rec = report.get("recommendation") or {}
  if rec.get("per_setting"):
    d = rec["default"]
    lines += ["", "## Recommendation on this machine", "",
              "The fastest artifact x runtime that passes parity (a faster copy that fails parity is never chosen), "
              "per batch size and thread count"
              + (f"; the default, written to the export's manifest.json and used by `covidct predict`, "
                 f"`bulk-predict` when given the export folder: **{d['file']} on {d['runtime']}** "
                 f"(batch {d['batch']}, {d['threads']} threads, {d['p50_ms']:.2f} ms)." if d else "."), "",
              "| batch | threads | artifact | runtime | p50 ms | images/s |", "| ---: | ---: | --- | --- | ---: | ---: |"]
    lines += [f"| {x['batch']} | {x['threads']} | {x['artifact']} | {x['runtime']} | {x['p50_ms']:.2f} | "
              f"{x['images_per_s']:.0f} |" for x in rec["per_setting"]]
  if "pipeline" in report:
    p = report["pipeline"]
    lines += ["", "## Input pipeline", "",
              f"{p['image_size']}x{p['image_size']}, batch {p['batch_size']}: training pipeline with augmentation "
              f"{p['train_pipeline_augmented_ips']:.0f} images/s, evaluation pipeline {p['eval_pipeline_ips']:.0f} "
              f"images/s; a training step of `{p['model']}` {p['train_step_ips']:.0f} images/s: the pipeline is "
              f"{p['pipeline_over_step_ratio']:.1f}x the step rate. First (cache-filling) epoch "
              f"{p['first_epoch_s']:.1f} s."]
  gpu = env["gpu"]
  lines += ["", "## GPU", ""] + [f"- {k}: {'available' if v['available'] else 'not measured: ' + v['reason']}"
                                 for k, v in gpu.items()]
  if report.get("load_test"):
    from benchmarks.serving import markdown as load_markdown  # pylint: disable=import-outside-toplevel

    lines += ["", load_markdown(report["load_test"]).rstrip()]
  return "\n".join(lines) + "\n"


def plots(report: dict, out_dir) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel

  out_dir = pathlib.Path(out_dir)
  rows = [r for r in report["results"] if r["status"] == "measured"]
  bs = report["settings"]["batch_sizes"]
  fig, ax = plt.subplots(figsize=(10, 0.35 * max(len(rows), 4) + 1.5))
  y = np.arange(len(rows))
  h = 0.8 / len(bs)
  for i, b in enumerate(bs):
    ax.barh(y + i * h, [r["batches"][str(b)]["p50_ms"] / b for r in rows], h, label=f"batch {b}")
  ax.set_yticks(y + 0.4 - h / 2)
  ax.set_yticklabels([_label(r) for r in rows], fontsize=8)
  ax.set_xscale("log")
  ax.set_xlabel("p50 latency per image (ms, log scale)")
  ax.legend()
  ax.invert_yaxis()
  fig.tight_layout()
  fig.savefig(out_dir / "latency.png", dpi=100)
  plt.close(fig)
  scaling(rows, bs, out_dir / "scaling.png")
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for r in rows:
    if r.get("test_roc_auc") is None:
      continue
    ax.scatter(r["batches"][str(bs[0])]["p50_ms"], r["test_roc_auc"], s=25)
    ax.annotate(_label(r), (r["batches"][str(bs[0])]["p50_ms"], r["test_roc_auc"]), fontsize=6)
  ax.set_xscale("log")
  ax.set_xlabel(f"p50 latency at batch {bs[0]} (ms, log scale)")
  ax.set_ylabel("test ROC AUC")
  ax.set_title("Accuracy against latency")
  fig.tight_layout()
  fig.savefig(out_dir / "accuracy_latency.png", dpi=100)
  plt.close(fig)


def scaling(rows: list, batch_sizes: list, path) -> None:
  """How latency grows with batch size and threads: p50 per image against batch size, one line per artifact x
  runtime, one panel per thread count (copies that fail parity dashed)."""
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  threads = sorted({r["threads"] for r in rows})
  names = sorted({f"{r['artifact']} / {r['runtime']}" for r in rows})  # one colour per copy in every panel
  fig, axes = plt.subplots(1, len(threads), figsize=(6 * len(threads), 4.5), sharey=True, squeeze=False)
  for ax, t in zip(axes[0], threads):
    for r in (r for r in rows if r["threads"] == t):
      ms = [r["batches"][str(b)]["p50_ms"] / b for b in batch_sizes if str(b) in r["batches"]]
      passed = (r.get("parity") or {}).get("passed")
      name = f"{r['artifact']} / {r['runtime']}"
      ax.plot(batch_sizes[:len(ms)], ms, marker="o", linestyle="-" if passed is not False else "--",
              color=plt.cm.tab20(names.index(name) % 20), label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_title(f"{t} thread{'s' if t > 1 else ''}")
  axes[0][0].set_ylabel("p50 latency per image (ms)")
  axes[0][-1].legend(fontsize=6, loc="upper right")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
