"""Metrics against hand-computed values, threshold choice, patient bootstrap."""

import json
import math
import pathlib

import numpy as np
import pytest

from click.testing import CliRunner

from covidct.cli import main
from covidct.metrics import bootstrap_ci, choose_threshold, ranking_metrics, threshold_metrics

Y = np.array([0, 0, 1, 1, 1])
P = np.array([0.1, 0.6, 0.4, 0.8, 0.9])


def test_threshold_metrics_known_arrays():
  m = threshold_metrics(Y, P, 0.5)
  assert m["confusion_matrix"] == {"tn": 1, "fp": 1, "fn": 1, "tp": 2}
  assert m["accuracy"] == pytest.approx(0.6)
  assert m["sensitivity"] == pytest.approx(2 / 3)
  assert m["specificity"] == pytest.approx(0.5)
  assert m["precision"] == pytest.approx(2 / 3)
  assert m["f1"] == pytest.approx(2 / 3)


def test_ranking_metrics_known_arrays():
  r = ranking_metrics(Y, P)
  assert r["roc_auc"] == pytest.approx(5 / 6)
  # Average precision: ranks .9(+) .8(+) .6(-) .4(+) -> (1 + 1 + 3/4) / 3
  assert r["pr_auc"] == pytest.approx((1 + 1 + 0.75) / 3)
  assert math.isnan(ranking_metrics([1, 1], [0.2, 0.3])["roc_auc"])


def test_choose_threshold():
  assert choose_threshold(Y, P, 1.0) == pytest.approx(0.4)
  assert choose_threshold(Y, P, 0.6) == pytest.approx(0.8)
  assert threshold_metrics(Y, P, choose_threshold(Y, P, 0.9))["sensitivity"] >= 0.9
  with pytest.raises(ValueError):
    choose_threshold(Y, P, 0.0)


def test_bootstrap_over_patients():
  rng = np.random.default_rng(0)
  y = np.repeat([0, 1] * 20, 3)  # 40 patients, 3 near-identical images each, one label per patient
  p = np.clip(y * 0.3 + np.repeat(rng.uniform(0, 0.7, 40), 3) + rng.normal(0, 0.01, len(y)), 0, 1)
  patients = np.repeat(np.arange(40), 3)
  ci = bootstrap_ci(y, p, patients, 0.5, n_boot=300, seed=1)
  assert ci == bootstrap_ci(y, p, patients, 0.5, n_boot=300, seed=1)  # seeded
  point = ranking_metrics(y, p)["roc_auc"]
  assert ci["roc_auc"][0] < point < ci["roc_auc"][1]
  acc = threshold_metrics(y, p, 0.5)["accuracy"]
  assert ci["accuracy"][0] <= acc <= ci["accuracy"][1]
  # Resampling whole patients: images of one patient stay together, so intervals are wider than per image.
  per_image = bootstrap_ci(y, p, np.arange(len(y)), 0.5, n_boot=300, seed=1)
  width = lambda c: c["accuracy"][1] - c["accuracy"][0]  # noqa: E731
  assert width(ci) > width(per_image)
  perfect = bootstrap_ci(y, y.astype(float), patients, 0.5, n_boot=50)
  assert perfect["roc_auc"] == [1.0, 1.0] and perfect["sensitivity"] == [1.0, 1.0]


def _user_folder(root, dummy_zip_dir, sixteen_bit: bool = True):
  """A hospital-style folder from the dummy data's images: COVID/ and NonCOVID/, one COVID scan as 16-bit PNG."""
  import zipfile

  import numpy as np
  from PIL import Image

  for label, zname in (("COVID", "CT_COVID.zip"), ("NonCOVID", "CT_NonCOVID.zip")):
    (root / label).mkdir(parents=True)
    with zipfile.ZipFile(dummy_zip_dir / zname) as zf:
      for name in [n for n in zf.namelist() if not n.endswith("/")][:3]:
        (root / label / pathlib.Path(name).name).write_bytes(zf.read(name))
  if sixteen_bit:
    first = sorted((root / "COVID").iterdir())[0]
    gray = np.asarray(Image.open(first).convert("L"), np.uint16) * 257
    Image.fromarray(gray).save(root / "COVID" / "sixteen_bit.png")
  return root


def test_evaluate_on_a_users_folder(model_dir, tmp_path):
  from tests.conftest import DUMMY_DATA

  folder = _user_folder(tmp_path / "scans", DUMMY_DATA / "Images-processed")
  out = tmp_path / "report"
  res = CliRunner().invoke(main, ["evaluate", str(model_dir), "--folder", str(folder), "--out", str(out),
                                  "--bootstrap", "20", "--threshold", "0.4"])
  assert res.exit_code == 0, res.output
  report = json.loads((out / "report.json").read_text())
  assert report["examples"] == 7 and report["positives"] == 4 and report["bootstrap"]["unit"] == "image"
  assert report["threshold"] == {"value": 0.4, "from": "--threshold", "chosen_on": "the model"}
  assert report["shortcut_audit"]["image_statistics"] is None and "lungs only" in res.output
  by_name = {r["filename"]: r["probability"] for r in report["predictions"]}
  first = sorted(n for n in by_name if n.startswith("COVID/") and "sixteen" not in n)[0]
  assert by_name["COVID/sixteen_bit.png"] == pytest.approx(by_name[first], abs=1e-6)  # 16-bit read as its 8-bit source
  # Patients: CIs resample patients; every image must have one.
  rows = ["file,patient_id"] + [f"{n},p{i // 2}" for i, n in enumerate(sorted(by_name))]
  (tmp_path / "patients.csv").write_text("\n".join(rows))
  res = CliRunner().invoke(main, ["evaluate", str(model_dir), "--folder", str(folder), "--out", str(tmp_path / "r2"),
                                  "--bootstrap", "20", "--patients", str(tmp_path / "patients.csv")])
  assert res.exit_code == 0, res.output
  report = json.loads((tmp_path / "r2" / "report.json").read_text())
  assert report["bootstrap"]["unit"] == "patient" and report["patients"] == 4


@pytest.mark.parametrize("damage, message", [
    ("no COVID folder", "has no COVID/ folder"), ("empty NonCOVID", "NonCOVID holds no image"),
    ("unreadable image", "COVID/broken.png: not a readable image"), ("not a folder", "is not a folder"),
    ("patients missing", "has no patient for 1 image(s)")])
def test_evaluate_folder_refuses_what_it_cannot_score(model_dir, tmp_path, damage, message):
  import shutil

  from tests.conftest import DUMMY_DATA

  folder = _user_folder(tmp_path / "scans", DUMMY_DATA / "Images-processed", sixteen_bit=False)
  extra = []
  if damage == "no COVID folder":
    shutil.rmtree(folder / "COVID")
  elif damage == "empty NonCOVID":
    for p in (folder / "NonCOVID").iterdir():
      p.unlink()
  elif damage == "unreadable image":
    (folder / "COVID" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
  elif damage == "not a folder":
    folder = tmp_path / "nothing"
  else:
    names = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    (tmp_path / "patients.csv").write_text("file,patient_id\n" + "\n".join(f"{n},p" for n in names[1:]))
    extra = ["--patients", str(tmp_path / "patients.csv")]
  res = CliRunner().invoke(main, ["evaluate", str(model_dir), "--folder", str(folder), "--out", str(tmp_path / "r"),
                                  "--bootstrap", "10", *extra])
  assert res.exit_code == 1 and message in res.output and "Traceback" not in res.output, res.output
  assert not (tmp_path / "r").exists()
