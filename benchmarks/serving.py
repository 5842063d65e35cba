"""A load test of `covidct serve` with a real load generator (Locust, headless), loopback only.

The export is staged as a pushed version in a temporary folder and served in a subprocess (KServe's model server);
Locust runs closed-loop users at each concurrency for a fixed time, each sending one TF-Serving-style v1 request
with a base64 PNG (decode, resize and model on the server). Reported per concurrency: requests, errors, p50/p99
latency, images/s, and the server's peak resident memory. KServe's Python server has no dynamic batching (its batcher
is a Kubernetes sidecar), so each request is scored on its own.
"""

from __future__ import annotations

import csv
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

from covidct.errors import CovidctError

LOCUSTFILE = pathlib.Path(__file__).with_name("locustfile.py")
CONCURRENCIES = (1, 8, 32)


def _peak_rss(pid: int, stop: threading.Event, out: list) -> None:
  import psutil  # pylint: disable=import-outside-toplevel

  peak = 0
  try:
    proc = psutil.Process(pid)
    while not stop.is_set():
      peak = max(peak, sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)]))
      time.sleep(0.2)
  except psutil.Error:
    pass
  out.append(peak)


def load_test(export_dir, out_dir, concurrencies=CONCURRENCIES, seconds: float = 15.0, runtime: str | None = None,
              progress=print) -> dict:
  """Serves the export with `covidct serve` and loads it with Locust at each concurrency.

  Args:
    export_dir: a `covidct export` folder (with its test vectors: the request images).
    out_dir: where Locust's CSV files go.
    concurrencies: numbers of concurrent users.
    seconds: how long each concurrency runs.
    runtime: the server's --runtime (default: the export's recommended copy).
    progress: called with one line per step.
  Returns:
    {'server', 'requests', 'rows': [{'concurrency', 'requests', 'errors', 'p50_ms', 'p99_ms', 'images_per_s',
    'server_peak_rss_mb'}]}.
  Raises:
    CovidctError: Locust is missing, or the server does not start.
  """
  from covidct.extras import require  # pylint: disable=import-outside-toplevel
  from covidct.push import stage_version  # pylint: disable=import-outside-toplevel
  from covidct.serve import serving_subprocess  # pylint: disable=import-outside-toplevel

  require("bench", "the serving load test (--load-test)")
  require("serve", "the serving load test (--load-test)")
  from covidct.vectors import load_vectors  # pylint: disable=import-outside-toplevel
  from export.package import encode_png  # pylint: disable=import-outside-toplevel

  locust = shutil.which("locust", path=str(pathlib.Path(sys.executable).parent)) or shutil.which("locust")
  if locust is None:
    raise CovidctError("the load test needs Locust: pip install locust.")
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  images, _, _ = load_vectors(pathlib.Path(export_dir) / "saved_model")
  stage = pathlib.Path(tempfile.mkdtemp(prefix="covidct-load-"))
  rows = []
  try:
    stage_version(export_dir, stage / "1")
    encoded = [encode_png(im) for im in images]  # one flat buffer and offsets: fixed-width bytes would strip NULs
    np.savez(stage / "images.npz", data=np.frombuffer(b"".join(encoded), np.uint8),
             ends=np.cumsum([len(e) for e in encoded]))
    args = ["--max-batch", "64"] + (["--runtime", runtime] if runtime else [])
    with serving_subprocess(stage, 1, out / "server.log", args=args) as (url, server):
      for c in concurrencies:
        progress(f"load test: {c} concurrent client(s) for {seconds:.0f} s")
        stop, peak = threading.Event(), []
        sampler = threading.Thread(target=_peak_rss, args=(server.pid, stop, peak))
        sampler.start()
        prefix = out / f"locust_c{c}"
        res = subprocess.run([locust, "-f", str(LOCUSTFILE), "--headless", "-u", str(c), "-r", str(c), "-t",
                              f"{int(seconds)}s", "--host", url, "--csv", str(prefix), "--only-summary",
                              "--loglevel", "WARNING", "--exit-code-on-error", "0"],
                             env={**os.environ, "COVIDCT_LOAD_IMAGES": str(stage / "images.npz")},
                             capture_output=True, text=True, check=False, timeout=seconds + 120)
        stop.set()
        sampler.join()
        stats = _aggregated(prefix.parent / f"{prefix.name}_stats.csv")
        if stats is None:
          raise CovidctError(f"Locust wrote no statistics (exit {res.returncode}): {res.stderr.strip()[-300:]}")
        rows.append({"concurrency": c, **stats, "server_peak_rss_mb": peak[0] / 2**20 if peak else None})
  finally:
    shutil.rmtree(stage, ignore_errors=True)
  return {"server": "covidct serve (KServe model server), v1 :predict with one base64 PNG per request, loopback",
          "seconds": seconds, "dynamic_batching": "not available in KServe's Python server", "rows": rows}


def _aggregated(path: pathlib.Path) -> dict | None:
  if not path.exists():
    return None
  with open(path, newline="") as fh:
    for row in csv.DictReader(fh):
      if row.get("Name") == "Aggregated":
        n = int(row["Request Count"])
        return {"requests": n, "errors": int(row["Failure Count"]),
                "p50_ms": float(row["50%"]) if n else None, "p99_ms": float(row["99%"]) if n else None,
                "images_per_s": float(row["Requests/s"])}
  return None


def markdown(load: dict) -> str:
  from covidct.reporting import table  # pylint: disable=import-outside-toplevel

  return "\n".join([
      "## Served: load test", "",
      f"{load['server']}; Locust, closed-loop users, {load['seconds']:.0f} s per concurrency. Dynamic batching: "
      f"{load['dynamic_batching']}.", "",
      table(["concurrency", "requests", "errors", "p50 ms", "p99 ms", "images/s", "server peak RSS MB"],
            [(r["concurrency"], r["requests"], r["errors"], f"{r['p50_ms']:.0f}" if r["p50_ms"] is not None else "-",
              f"{r['p99_ms']:.0f}" if r["p99_ms"] is not None else "-", f"{r['images_per_s']:.1f}",
              f"{r['server_peak_rss_mb']:.0f}" if r["server_peak_rss_mb"] else "-") for r in load["rows"]],
            align="r" * 7)]) + "\n"
