"""Bulk inference on Apache Beam's DirectRunner: the same answers as `covidct predict`, bad files reported not fatal,
every output format, and a failed run that leaves nothing behind."""

from __future__ import annotations

import json
import zipfile

import pytest
from click.testing import CliRunner

from covidct.cli import main
from tests.conftest import DUMMY_DATA

beam = pytest.importorskip("apache_beam")


@pytest.fixture
def archive(tmp_path):
  """The dummy data's images as files, with two that cannot be read."""
  folder = tmp_path / "archive"
  folder.mkdir()
  for z in ("CT_COVID.zip", "CT_NonCOVID.zip"):
    with zipfile.ZipFile(DUMMY_DATA / "Images-processed" / z) as zf:
      for n in zf.namelist():
        if n.lower().endswith((".png", ".jpg")):
          (folder / f"{z[3:-4]}-{n.rsplit('/', 1)[-1]}").write_bytes(zf.read(n))
  (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
  (folder / "notes.png").write_text("a text file")
  return folder


def _read_jsonl(folder, prefix):
  return [json.loads(line) for f in sorted(folder.glob(f"{prefix}-*.jsonl")) for line in f.read_text().splitlines()]


@pytest.mark.parametrize("artifact", ["model_float32.onnx", "model_float32.tflite", "saved_model"])
def test_bulk_results_equal_predict(exported, archive, tmp_path, artifact):
  from covidct.predict import predict_files

  model = exported / artifact
  out = tmp_path / "bulk"
  res = CliRunner().invoke(main, ["bulk-predict", "--model", str(model), "--input", str(archive / "*.png"),
                                  "--input", str(archive / "*.jpg"), "--out", str(out), "--batch-size", "4"])
  assert res.exit_code == 0, res.output
  files = sorted(str(p) for p in archive.iterdir())
  want, errors, _ = predict_files(model, files)
  got = {r["file"]: r for r in _read_jsonl(out, "results")}
  assert sorted(got) == sorted(r["file"] for r in want) and len(got) == len(files) - 2
  for r in want:
    g = got[r["file"]]
    assert (g["probability"], g["label"], g["threshold"], g.get("warning")) == \
        (r["probability"], r["label"], r["threshold"], r.get("warning"))  # exactly
    assert g["artifact_sha256"] and g["model_version"]
  bad = {e["file"]: e["error"] for e in _read_jsonl(out, "errors")}
  assert sorted(bad) == sorted(str(archive / n) for n in ("broken.png", "notes.png"))
  assert sorted(bad.values()) == sorted(errors)  # the same reasons predict gives
  assert (out / "_SUCCESS").exists() and f"{len(got)} images scored, 2 refused" in res.stdout


def test_formats_file_list_and_two_workers(exported, archive, tmp_path):
  import pyarrow.parquet as pq

  model = str(exported / "model_float32.tflite")
  listing = tmp_path / "files.txt"
  listing.write_text("# one path per line\n" + "\n".join(str(p) for p in sorted(archive.iterdir())) + "\n")
  runs = {}
  for fmt in ("jsonl", "csv", "parquet"):
    out = tmp_path / fmt
    res = CliRunner().invoke(main, ["bulk-predict", "--model", model, "--files-from", str(listing), "--out", str(out),
                                    "--format", fmt, "--direct_num_workers=2", "--direct_running_mode=multi_threading"])
    assert res.exit_code == 0, res.output
    if fmt == "jsonl":
      rows = _read_jsonl(out, "results")
    elif fmt == "csv":
      import csv

      rows = [r for f in sorted(out.glob("results-*.csv")) for r in csv.DictReader(f.open())]
      rows = [{**r, "probability": float(r["probability"])} for r in rows]
    else:
      rows = [r for f in sorted(out.glob("results-*.parquet")) for r in pq.read_table(f).to_pylist()]
    runs[fmt] = {r["file"]: r["probability"] for r in rows}
  assert runs["jsonl"] == runs["parquet"] and len(runs["jsonl"]) == len(list(archive.iterdir())) - 2
  assert runs["csv"].keys() == runs["jsonl"].keys()
  assert all(abs(runs["csv"][k] - v) < 1e-12 for k, v in runs["jsonl"].items())


def test_a_failed_run_leaves_nothing_and_a_rerun_starts_clean(exported, archive, tmp_path, monkeypatch):
  import covidct.runners as runners

  calls = {"n": 0}
  original = runners.LiteRTRunner._run

  def dies_on_the_second_batch(self, batch):
    calls["n"] += 1
    if calls["n"] == 2:
      raise RuntimeError("worker lost")
    return original(self, batch)

  monkeypatch.setattr(runners.LiteRTRunner, "_run", dies_on_the_second_batch)
  model = str(exported / "model_float32.tflite")
  out = tmp_path / "out"
  res = CliRunner().invoke(main, ["bulk-predict", "--model", model, "--input", str(archive / "*"), "--out", str(out),
                                  "--batch-size", "2"])
  assert res.exit_code == 1 and "the Beam pipeline failed (RuntimeError: worker lost" in res.stderr, res.output
  assert not out.exists() and not [p for p in tmp_path.iterdir() if ".partial" in p.name]
  monkeypatch.setattr(runners.LiteRTRunner, "_run", original)
  res = CliRunner().invoke(main, ["bulk-predict", "--model", model, "--input", str(archive / "*"), "--out", str(out)])
  assert res.exit_code == 0, res.output
  assert len(_read_jsonl(out, "results")) == len(list(archive.iterdir())) - 2
  res = CliRunner().invoke(main, ["bulk-predict", "--model", model, "--input", str(archive / "*"), "--out", str(out)])
  assert res.exit_code == 1 and "exists; choose another" in res.stderr  # never mixed into an earlier output


@pytest.mark.parametrize("args, message", [
    (["--input", "{tmp}/nothing-*.png"], "no file matches"),
    ([], "no input: give glob patterns"),
    (["--files-from", "{tmp}/missing.txt"], "cannot read the file list"),
    (["--input", "{archive}/*", "--batch-size", "0"], "the batch size must be positive"),
])
def test_bad_bulk_inputs(exported, archive, tmp_path, args, message):
  args = [a.format(tmp=tmp_path, archive=archive) for a in args]
  res = CliRunner().invoke(main, ["bulk-predict", "--model", str(exported / "model_float32.onnx"), "--out",
                                  str(tmp_path / "out"), *args])
  assert res.exit_code == 1 and message in res.stderr and "Traceback" not in res.output, res.output
  assert not (tmp_path / "out").exists()


def test_peak_memory_counts_the_whole_process_tree():
  import sys

  from benchmarks.bulk import run_measured

  child = "import time; b = bytearray(150 * 2**20); b[::4096] = b'x' * len(b[::4096]); time.sleep(1.5)"
  parent = (f"import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', {child!r}]); "
            "b = bytearray(100 * 2**20); b[::4096] = b'x' * len(b[::4096]); p.wait()")
  got = run_measured([sys.executable, "-c", parent])
  assert got["returncode"] == 0 and got["peak_rss_mb"] > 250 and got["seconds"] >= 1.5


@pytest.mark.slow
def test_bulk_equals_predict_on_the_real_test_images(exported, tmp_path):
  """The 203 official test slices as they come (PNG and JPEG, 61 to 1671 pixels a side), from ../shared."""
  from covidct.predict import predict_files
  from tests.conftest import COVID_CT, _need_shared

  _need_shared()
  folder = tmp_path / "test_images"
  folder.mkdir()
  for cls in ("COVID", "NonCOVID"):
    names = set((COVID_CT / "Data-split" / cls / f"testCT_{cls}.txt").read_text().split())
    with zipfile.ZipFile(COVID_CT / "Images-processed" / f"CT_{cls}.zip") as zf:
      for n in zf.namelist():
        if n.rsplit("/", 1)[-1] in names:
          (folder / f"{cls}-{n.rsplit('/', 1)[-1]}").write_bytes(zf.read(n))
  files = sorted(str(p) for p in folder.iterdir())
  assert len(files) == 203
  model = exported / "model_float32.onnx"
  out = tmp_path / "bulk"
  res = CliRunner().invoke(main, ["bulk-predict", "--model", str(model), "--input", str(folder / "*"), "--out",
                                  str(out), "--format", "csv"])
  assert res.exit_code == 0, res.output
  import csv

  got = {r["file"]: r for f in out.glob("results-*.csv") for r in csv.DictReader(f.open())}
  want, errors, _ = predict_files(model, files)
  assert not errors and len(got) == len(want) == 203
  for r in want:  # CSV holds Python's repr of each float: it round-trips exactly
    g = got[r["file"]]
    assert (float(g["probability"]), g["label"], g["warning"] or None) == (r["probability"], r["label"], r.get("warning"))


def test_a_fifo_among_the_inputs_is_refused_not_waited_on(exported, archive, tmp_path):
  """A named pipe matches the glob like a file; reading it would block for ever (issue 32's hang)."""
  import os

  os.mkfifo(archive / "pipe.png")
  out = tmp_path / "bulk"
  res = CliRunner().invoke(main, ["bulk-predict", "--model", str(exported / "model_float32.onnx"), "--input",
                                  str(archive / "*.png"), "--out", str(out)])
  assert res.exit_code == 0, res.output
  bad = {e["file"]: e["error"] for e in _read_jsonl(out, "errors")}
  assert "not a regular file" in bad[str(archive / "pipe.png")]
