"""Throughput and peak memory of `covidct predict` against `covidct bulk-predict` (Apache Beam's DirectRunner, 1 and
2 workers) on an archive of image files (tools/make_archive.py writes one).

Usage:
  python -m benchmarks.bulk --model EXPORT/model_float32.onnx --archive ARCHIVE --files 2000,20000 --out REPORT_DIR

Each command runs in its own process tree; memory is the peak of the tree's summed resident set size, sampled every
0.2 s (psutil), so a multi-process runner's workers are counted together. Results: REPORT_DIR/bulk.json and bulk.md.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

from covidct.reporting import table
from covidct.versions import cpu_info


def run_measured(cmd: list[str], stdout=subprocess.DEVNULL) -> dict:
  """Runs `cmd`; returns {'seconds', 'peak_rss_mb', 'returncode'} (peak of the process tree's summed RSS)."""
  import psutil  # pylint: disable=import-outside-toplevel

  start = time.time()
  proc = subprocess.Popen(cmd, stdout=stdout, stderr=subprocess.PIPE, text=True)  # pylint: disable=consider-using-with
  root = psutil.Process(proc.pid)
  peak = 0
  while proc.poll() is None:
    try:
      rss = sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])
      peak = max(peak, rss)
    except psutil.Error:
      pass
    time.sleep(0.2)
  _, err = proc.communicate()
  return {"seconds": round(time.time() - start, 2), "peak_rss_mb": round(peak / 2**20, 1),
          "returncode": proc.returncode, "stderr_tail": err.strip().splitlines()[-1:] if err else []}


def measure(model: str, files: list[str], workdir: pathlib.Path) -> list[dict]:
  """The three ways, on the same files."""
  covidct = [sys.executable, "-m", "covidct.cli"]
  listing = workdir / "files.txt"
  listing.write_text("\n".join(files) + "\n")
  rows = []
  with open(workdir / "predict.txt", "w", encoding="utf-8") as out:
    rows.append({"way": "covidct predict", **run_measured([*covidct, "predict", "--model", model, *files], out)})
  for label, extra in (("bulk-predict, DirectRunner, 1 worker", []),
                       ("bulk-predict, DirectRunner, 2 workers (multi_processing)",
                        ["--direct_num_workers=2", "--direct_running_mode=multi_processing"])):
    out_dir = workdir / f"bulk-{len(rows)}"
    rows.append({"way": label, **run_measured([*covidct, "bulk-predict", "--model", model, "--files-from",
                                               str(listing), "--out", str(out_dir), *extra])})
    shutil.rmtree(out_dir, ignore_errors=True)
  for r in rows:
    r["files"] = len(files)
    r["files_per_s"] = round(len(files) / r["seconds"], 1) if r["returncode"] in (0, 1) else None
  return rows


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--model", required=True)
  ap.add_argument("--archive", required=True, type=pathlib.Path)
  ap.add_argument("--files", default="2000,20000", help="comma-separated archive sizes to measure")
  ap.add_argument("--out", required=True, type=pathlib.Path)
  args = ap.parse_args(argv)
  every = sorted(str(p) for p in args.archive.glob("study_*/*"))
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    for n in (int(x) for x in args.files.split(",")):
      if n > len(every):
        raise SystemExit(f"the archive has {len(every)} files, fewer than {n}")
      rows += measure(args.model, every[:n], pathlib.Path(tmp))
  args.out.mkdir(parents=True, exist_ok=True)
  report = {"cpu": cpu_info(), "model": args.model, "rows": rows}
  (args.out / "bulk.json").write_text(json.dumps(report, indent=2))
  md = table(["files", "way", "wall s", "files/s", "peak RSS MB (whole process tree)", "exit"],
             [(r["files"], r["way"], r["seconds"], r["files_per_s"], r["peak_rss_mb"], r["returncode"]) for r in rows],
             align="rlrrrr")
  cpu = report["cpu"]
  (args.out / "bulk.md").write_text(f"CPU: {cpu['model']}, {cpu['cores']} cores, {cpu['vector']}, VNNI {cpu['vnni']}"
                                    f"\n\nModel: `{args.model}`\n\n{md}\n")
  print(md)


if __name__ == "__main__":
  main()
