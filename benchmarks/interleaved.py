"""Several export folders benchmarked in one run, interleaved (`covidct bench-compare`).

On a shared or throttling machine latency drifts by tens of percent within minutes (this repository's 2-core VMs
measured their own float32 GEMM peak at 96 and 139 GFLOP/s ten minutes apart), so two `covidct bench` runs of two
exports cannot be compared. Here every round runs each artifact x runtime of every export once (one batch size, one
thread count, a fresh worker process each time, as `covidct bench` does), in the same order; an export's speed
against the first export's is the median over rounds of the per-round ratio of their fastest parity-passing rows,
so drift falls on both sides of each ratio alike. The typical use: a float model's export against its
quantization-aware twin's (`covidct qat`), to see whether int8 pays on the machine at hand.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np

from benchmarks.latency import configurations, run_worker
from benchmarks.run import row_parity
from benchmarks.worker import ISA_VARIABLE
from covidct.errors import CovidctError
from covidct.fsutil import atomic_dir, refuse_existing
from covidct.manifest import Manifest
from covidct.reporting import table

DEFAULT_ROUNDS = 15
# oneDNN's instruction-set caps (ONEDNN_MAX_CPU_ISA), for a row of what a CPU with fewer extensions would run. Only
# the runtimes built on oneDNN honour one: OpenVINO's convolutions and matrix products (its own small element-wise
# kernels keep the full set) and TensorFlow's; ONNX Runtime (MLAS) and LiteRT (XNNPACK) pick theirs from the CPU.
MAX_ISAS = {"avx2": "AVX2", "avx2_vnni": "AVX2_VNNI", "avx512_core": "AVX512_CORE",
            "avx512_core_vnni": "AVX512_CORE_VNNI"}
ISA_CAPPED_RUNTIMES = ("openvino", "tf_signature")
SKIPPED_RUNTIMES = ("keras_predict", "keras_call")  # their model is the training run's, not the export's files


def export_names(exports) -> list[str]:
  """A short, distinct name for each export folder: its own name, with a number added to repeats."""
  names, seen = [], {}
  for e in exports:
    name = pathlib.Path(e).resolve().name
    seen[name] = seen.get(name, 0) + 1
    names.append(name if seen[name] == 1 else f"{name} ({seen[name]})")
  return names


def compare_exports(exports, out_dir, rounds: int = DEFAULT_ROUNDS, batch: int = 1, threads: int = 1,
                    runtimes=None, runs: int = 50, warmup: int = 5, max_seconds: float = 3.0, data_dir=None,
                    max_isa: str | None = None, overwrite: bool = False, progress: bool = True) -> dict:
  """Benchmarks every artifact x runtime of `exports` in `rounds` interleaved rounds; writes compare.json and .md.

  Args:
    exports: `covidct export` folders; the first is the baseline the others are compared with.
    out_dir: the report folder (written atomically; must not exist unless `overwrite`).
    rounds: how many times each row runs; each time gives one p50 latency.
    batch, threads: the one setting measured.
    runtimes: only these runtimes (names of benchmarks.latency.RUNTIMES); None: all but the Keras rows.
    runs, warmup, max_seconds: per row and round, as in `covidct bench`.
    data_dir: the dataset, for the parity of rows that the export did not check itself (OpenVINO's).
    max_isa: a key of MAX_ISAS: every row runs with oneDNN capped at that instruction set, which only the
      ISA_CAPPED_RUNTIMES honour (the rows are limited to them); OpenVINO rows are checked for parity under it.
    overwrite: replace an existing `out_dir`.
    progress: a progress bar over the rounds.

  Returns:
    {"rows": [...each with its per-round p50s...], "exports": [...each with its fastest parity-passing row and its
    speed against the first export's...], "settings": {...}}.

  Raises:
    CovidctError: fewer than two exports, a folder that is not an export, rounds < 2, nothing to measure, an
      unknown `max_isa` or one asked of runtimes that ignore it.
  """
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel

  from covidct.versions import cpu_kind  # pylint: disable=import-outside-toplevel

  if len(exports) < 2:
    raise CovidctError("bench-compare needs at least two export folders (the first is the baseline).")
  if rounds < 2:
    raise CovidctError(f"--rounds must be at least 2 (a ratio per round, then their median), got {rounds}.")
  if max_isa is not None:
    if max_isa not in MAX_ISAS:
      raise CovidctError(f"unknown --max-isa {max_isa!r}; choose from {', '.join(MAX_ISAS)}.")
    ignoring = sorted(set(runtimes or ()) - set(ISA_CAPPED_RUNTIMES))
    if ignoring:
      raise CovidctError(f"--max-isa caps oneDNN, which only {' and '.join(ISA_CAPPED_RUNTIMES)} use; "
                         f"{', '.join(ignoring)} would run uncapped: leave them out of --runtimes.")
    runtimes = list(runtimes or ISA_CAPPED_RUNTIMES)
  refuse_existing(out_dir, overwrite)
  rows, names, capped = [], export_names(exports), {}
  for name, e in zip(names, exports):
    root = pathlib.Path(e)
    manifest = Manifest.load(root)
    cache: dict = {}
    for r in configurations(root, (threads,), None):
      if "skipped" in r or r["runtime"] in SKIPPED_RUNTIMES or (runtimes and r["runtime"] not in runtimes):
        continue
      if max_isa and r["runtime"] == "openvino":  # checked under the cap, in a process of its own, once per file
        key = str(pathlib.Path(r["path"]).resolve())
        if key not in capped:
          res = run_worker({"mode": "parity", "root": str(root), "row": r, "data_dir": data_dir},
                           env={ISA_VARIABLE: MAX_ISAS[max_isa]})
          capped[key] = {"passed": None, "how": f"not checked: {res['error']}"} if "error" in res else \
              {**res, "how": f"{res['how']}, oneDNN capped at {MAX_ISAS[max_isa]}"}
        check = capped[key]
      else:
        check = row_parity(root, manifest, r, data_dir, cache)
      rows.append({"export": name, **r, "parity": check, "rounds_ms": []})
  if not rows:
    raise CovidctError(f"nothing to measure: no artifact of these exports runs under {', '.join(runtimes or [])} here.")
  spec = {"batch_sizes": [batch], "runs": runs, "warmup": warmup, "max_seconds": max_seconds}
  for i in tqdm(range(rounds), desc=f"{len(rows)} rows x {rounds} rounds", unit="round", disable=not progress):
    for row in rows:
      res = run_worker({k: v for k, v in row.items() if k not in ("parity", "rounds_ms", "export", "kernels")}
                       | spec | {"kernels": i == 0}, env={ISA_VARIABLE: MAX_ISAS[max_isa]} if max_isa else None)
      if "error" in res:
        row["error"] = res["error"]
      else:
        row["rounds_ms"].append(res["batches"][str(batch)]["p50_ms"])
        if "kernels" in res:
          row["kernels"] = res["kernels"]
  for row in rows:
    row["median_ms"] = float(np.median(row["rounds_ms"])) if row["rounds_ms"] else None
  result = {"settings": {"batch": batch, "threads": threads, "rounds": rounds, "runs": runs, "warmup": warmup,
                         "max_seconds": max_seconds, "inputs": "seeded random uint8 images of the model's input size",
                         "cpu": cpu_kind(), "max_isa": MAX_ISAS[max_isa] if max_isa else None},
            "rows": rows, "exports": _per_export(rows, names, rounds)}
  with atomic_dir(out_dir, overwrite) as tmp:
    (tmp / "compare.json").write_text(json.dumps(result, indent=2, default=str))
    (tmp / "compare.md").write_text(markdown(result))
  return result


def _per_export(rows, names, rounds) -> list[dict]:
  """Each export's fastest parity-passing row (by median) and, per round, its best such row's latency; the speedup
  of each against the first export: the median over rounds of baseline best / its best."""
  out = []
  for name in names:
    ok = [r for r in rows if r["export"] == name and (r["parity"] or {}).get("passed")
          and len(r["rounds_ms"]) == rounds]
    best = min(ok, key=lambda r: r["median_ms"]) if ok else None
    per_round = np.min([r["rounds_ms"] for r in ok], axis=0) if ok else None
    out.append({"export": name, "fastest": best and {k: best[k] for k in ("artifact", "runtime", "median_ms")},
                "best_per_round_ms": per_round.tolist() if per_round is not None else None})
  base = out[0]["best_per_round_ms"]
  for e in out:
    if base is None or e["best_per_round_ms"] is None:
      e["speedup"] = None
      continue
    ratios = np.asarray(base) / np.asarray(e["best_per_round_ms"])
    e["speedup"] = {"median": float(np.median(ratios)), "min": float(ratios.min()), "max": float(ratios.max())}
  return out


def markdown(result: dict) -> str:
  """The per-row medians, then each export's fastest row and its speed against the first export's."""
  s = result["settings"]

  def parity(r):
    p = (r["parity"] or {}).get("passed")
    return "pass" if p else "FAIL" if p is False else "not checked"

  rows = sorted(result["rows"], key=lambda r: (r["median_ms"] is None, r["median_ms"] or 0))
  lines = [f"# Exports compared in one interleaved run (batch {s['batch']}, {s['threads']} thread(s), "
           f"{s['rounds']} rounds)", "",
           f"CPU: {s.get('cpu', 'not recorded')}"
           + (f"; oneDNN capped at {s['max_isa']} (OpenVINO's convolutions and matrix products and TensorFlow's "
              "kernels use no more than it, parity checks included)." if s.get("max_isa") else "."), "",
           "Every round ran each row once, in a fresh worker process, in the same order; p50 latency per round, "
           "then the median over rounds. Compare these rows with each other only.", "",
           table(["export", "artifact / runtime", "parity", "median ms", "min ms", "max ms"],
                 [(r["export"], f"{r['artifact']} / {r['runtime']}", parity(r),
                   *(f"{v:.2f}" if v is not None else r.get("error", "-")[:60]
                     for v in (r["median_ms"], min(r["rounds_ms"], default=None), max(r["rounds_ms"], default=None))))
                  for r in rows], align="lllrrr"), "",
           f"Fastest parity-passing row of each export, and its speed against {result['exports'][0]['export']}'s "
           "(the median over rounds of the per-round ratio of their fastest rows; range over rounds):", "",
           table(["export", "fastest row", "median ms", "speed against the first"],
                 [(e["export"],
                   f"{e['fastest']['artifact']} / {e['fastest']['runtime']}" if e["fastest"] else "none passes",
                   f"{e['fastest']['median_ms']:.2f}" if e["fastest"] else "-",
                   f"{e['speedup']['median']:.2f}x ({e['speedup']['min']:.2f}-{e['speedup']['max']:.2f})"
                   if e["speedup"] else "-") for e in result["exports"]], align="llrr")]
  kernels = [r for r in rows if r.get("kernels")]
  if kernels:
    lines += ["", "The kernels OpenVINO ran the convolutions and matrix products with (layers, share of their time); "
              "the name gives the instruction set and the precision:", "",
              table(["export", "artifact", "kernels"],
                    [(r["export"], r["artifact"], ", ".join(f"{k['kernel']} ({k['layers']}, {100 * k['share']:.0f}%)"
                                                             for k in r["kernels"])) for r in kernels], align="lll")]
  return "\n".join(lines) + "\n"
