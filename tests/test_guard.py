"""The input guard: real slices pass, obviously wrong inputs are flagged, predict warns or refuses."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from covidct.cli import main
from covidct.guard import Guard, calibrate, made_up_inputs


@pytest.fixture(scope="module")
def real_guard(full_data_dir):
  from covidct.data import split_arrays

  arrays = {s: split_arrays(s, str(full_data_dir), 224) for s in ("train", "validation", "test")}
  return calibrate(arrays["train"]["images"], arrays["validation"]["images"]), arrays["test"]


@pytest.mark.slow
def test_guard_passes_real_slices_and_flags_made_up_inputs(real_guard, tmp_path):
  guard, test = real_guard
  flagged = sum(bool(guard.check(im)) for im in test["images"])
  assert flagged <= 0.02 * len(test["images"])  # measured: 0 of 203
  # 1% by the distance, out of fold, plus the slices where the segmentation finds no lungs (8 of 543): measured 2.6%
  assert 0.01 <= guard.calibration["out_of_fold_flag_rate"] <= 0.03
  wrong = made_up_inputs(224, n=10)
  caught = {kind: sum(bool(guard.check(im)) for im in images) / len(images) for kind, images in wrong.items()}
  assert all(rate >= 0.95 for rate in caught.values()), caught
  guard.save(tmp_path / "guard.json")
  again = Guard.load(tmp_path / "guard.json")
  assert again.threshold == guard.threshold and again.check(wrong["noise"][0]) == guard.check(wrong["noise"][0])
  assert guard.check(test["images"][0], (3, 2000)) and guard.check(test["images"][0], (40, 40))  # shape, size


def test_predict_warns_and_strict_refuses(exported, tmp_path):
  assert (exported / "guard.json").exists()
  manifest = json.loads((exported / "manifest.json").read_text())
  assert manifest["input_guard"]["file"] == "guard.json" and "guard.json" in manifest["files"]
  blank = tmp_path / "blank.png"
  Image.fromarray(np.full((256, 256), 255, np.uint8)).save(blank)
  noise = tmp_path / "noise.png"  # a thumbnail: too small to be a slice (the model's 48 px is too coarse to judge)
  Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 30)).astype(np.uint8)).save(noise)
  model = str(exported / "model_float32.onnx")
  res = CliRunner().invoke(main, ["predict", str(blank), str(noise), "--model", model, "--json"])
  assert res.exit_code == 0, res.output
  out = json.loads(res.stdout)
  assert out["input_guard"] == "on"
  assert "near-constant" in out["results"][0]["warning"] and "too small (30 x 40 pixels)" in out["results"][1]["warning"]
  res = CliRunner().invoke(main, ["predict", str(blank), "--model", model])
  assert "WARNING: does not look like a CT slice" in res.stdout
  res = CliRunner().invoke(main, ["predict", str(blank), str(noise), "--model", model, "--strict"])
  assert res.exit_code == 1 and res.stderr.count("refused (--strict)") == 2 and "Traceback" not in res.output


def test_colour_photographs_are_flagged_and_real_colour_figures_are_not(exported, tmp_path):
  """Photographs were labelled without a word (issue 32): a file mostly in colour is a picture, not a CT slice. A
  grey slice saved as RGB, or with a red arrow drawn on it as COVID-CT's paper figures have (at most 7.7% of their
  pixels in colour), passes the colour check."""
  import skimage.data

  files = []
  for name in ("astronaut", "chelsea"):
    files.append(tmp_path / f"{name}.jpg")
    Image.fromarray(getattr(skimage.data, name)()).save(files[-1])
  grey = np.asarray(Image.fromarray(skimage.data.camera()).resize((256, 256)))
  rgb = np.repeat(grey[..., None], 3, axis=-1)
  arrow = rgb.copy()
  arrow[100:120, 60:160] = (230, 20, 20)  # 3% of the pixels
  for name, image in (("grey_rgb", rgb), ("red_arrow", arrow)):
    files.append(tmp_path / f"{name}.png")
    Image.fromarray(image).save(files[-1])
  res = CliRunner().invoke(main, ["predict", *map(str, files), "--model", str(exported / "model_float32.onnx"),
                                  "--json"])
  assert res.exit_code == 0, res.output
  results = json.loads(res.stdout)["results"]
  for r in results[:2]:
    assert "a colour picture" in r["warning"], r
  for r in results[2:]:
    assert "colour" not in r.get("warning", ""), r


def test_an_edited_guard_is_refused_not_trusted(exported, tmp_path):
  """guard.json's SHA-256 is in the manifest: a guard loosened to pass everything is one line, not silence."""
  import shutil

  copy = tmp_path / "export"
  shutil.copytree(exported, copy)
  guard = json.loads((copy / "guard.json").read_text())
  guard["threshold"] = 1e9
  (copy / "guard.json").write_text(json.dumps(guard))
  blank = tmp_path / "blank.png"
  Image.fromarray(np.full((256, 256), 255, np.uint8)).save(blank)
  res = CliRunner().invoke(main, ["predict", str(blank), "--model", str(copy / "model_float32.onnx")])
  assert res.exit_code == 1 and "guard.json does not match the SHA-256" in res.stderr, res.output
  assert "Traceback" not in res.output
