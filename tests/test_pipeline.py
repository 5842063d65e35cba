"""The main job (`covidct pipeline`) end to end on dummy data."""

from __future__ import annotations


from click.testing import CliRunner

from covidct.cli import main
from tests.conftest import DUMMY_DATA


def test_pipeline_end_to_end_on_dummy_data(dummy_builder, tmp_path):
  res = CliRunner().invoke(main, ["pipeline", "--out", str(tmp_path / "job"), "--manual-dir", str(DUMMY_DATA),
                                  "--data-dir", str(tmp_path / "tfds"), "--epochs", "1", "--image-size", "48",
                                  "--formats", "tflite_float32,onnx_float32", "--bootstrap", "20", "--force-push"])
  assert res.exit_code == 0, res.output
  job = tmp_path / "job"
  report = (job / "report.md").read_text()
  assert "## Artifacts and parity" in report and "tflite_float32" in report and "serving/1/" in report
  for path in ("model/saved_model/saved_model.pb", "model/evaluation-test/roc.png", "export/manifest.json",
               "export/parity.md", "serving/1/MODEL_CARD.md", "bench/bench.md"):
    assert (job / path).exists(), path
  times = dict(part.split() for part in report.split("## Wall time (s)")[1].strip().splitlines()[0].split(" | "))
  steps = [float(v) for k, v in times.items() if k != "total"]
  assert list(times) == ["dataset", "train", "evaluate", "export", "bench", "push", "total"]
  # Benchmarked before the push: the pushed version carries the recommendation, and predict on it uses it.
  from covidct.manifest import Manifest
  from covidct.predict import resolve_model

  recommended = Manifest.load(job / "serving" / "1" / "assets.extra").recommended
  assert recommended and recommended == Manifest.load(job / "export").recommended
  assert "Recommended on this machine" in report and recommended["file"] in report
  assert resolve_model(job / "serving" / "1")[0] == job / "serving" / "1" / "assets.extra" / recommended["file"]
  assert not any(v.startswith("-") for v in times.values())  # each step its own time, never "-0.0"
  assert abs(sum(steps) - float(times["total"])) < 0.5
