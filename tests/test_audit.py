"""The shortcut audit: the lung segmentation on real slices checked by eye, the masking, the statistics baseline."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest

from covidct.audit import (crop_to_lungs, hide_lungs, image_statistics, lung_mask, lung_masks, lungs_only,
                           statistics_auc)

BOXES = json.loads((pathlib.Path(__file__).parent / "fixtures" / "lung_boxes.json").read_text())


@pytest.fixture(scope="module")
def boxed_slices(full_data_dir):
  from covidct.data import split_arrays

  arrays = split_arrays(BOXES["split"], str(full_data_dir), BOXES["size"])
  index = {f: i for i, f in enumerate(arrays["filenames"])}
  return [(s, arrays["images"][index[s["file"]]]) for s in BOXES["slices"]]


@pytest.mark.slow
def test_lung_masks_match_boxes_drawn_by_eye(boxed_slices):
  found = 0
  for s, image in boxed_slices:
    mask = lung_mask(image)
    if s.get("expect") == "no lung field":
      assert not mask.any(), s["file"]
      continue
    x0, y0, x1, y1 = s["box"]
    box = np.zeros_like(mask)
    box[y0:y1, x0:x1] = True
    ys, xs = np.nonzero(mask)
    got = np.zeros_like(mask)
    got[ys.min():ys.max() + 1, xs.min():xs.max() + 1] = True
    iou = (got & box).sum() / (got | box).sum()
    assert iou >= 0.65, (s["file"], iou)  # measured 0.67-1.00
    assert (mask & box).sum() >= 0.8 * mask.sum(), s["file"]  # the field lies in the lungs' box (measured >= 0.83)
    assert 0.25 <= mask.sum() / box.sum() <= 1.0, s["file"]  # and fills a good part of it, not a sliver
    found += 1
  assert found == 9


@pytest.mark.slow
def test_masking_hides_or_keeps_the_lung_field(boxed_slices):
  images = np.stack([image for _, image in boxed_slices])
  masks = lung_masks(images)
  hidden, only = hide_lungs(images, masks), lungs_only(images, masks)
  for im, m, h, o in zip(images[..., 0], masks, hidden[..., 0], only[..., 0]):
    if not m.any():
      np.testing.assert_array_equal(h, im)  # nothing to hide
      assert not o.any()
      continue
    assert np.ptp(h[m]) == 0 and abs(int(h[m][0]) - im[m].mean()) <= 0.5  # one grey: the field's mean
    np.testing.assert_array_equal(h[~m], im[~m])
    np.testing.assert_array_equal(o[m], im[m])
    assert not o[~m].any()
  assert not lung_mask(np.full((64, 64, 1), 120, np.uint8)).any()  # a blank image has no lungs


@pytest.mark.slow
def test_lung_crop_shows_the_lung_field_alone_and_fills_the_frame(boxed_slices):
  cropped = 0
  for s, image in boxed_slices:
    out = crop_to_lungs(image)
    assert out.shape == image.shape and out.dtype == np.uint8
    mask = lung_mask(image)
    if not mask.any():
      np.testing.assert_array_equal(out, image)  # nothing to crop to: the slice as it is
      continue
    visible = out[..., 0] > 0
    ys, xs = np.nonzero(visible)
    # Zoomed to the field's square box: the field spans (nearly) the whole frame along its longer side ...
    assert max(ys.max() - ys.min(), xs.max() - xs.min()) + 1 >= 0.9 * image.shape[0], s["file"]
    # ... and covers at least as much of the frame as it did of the slice; what shows is the field's own grey levels.
    assert visible.mean() >= mask.mean(), s["file"]
    assert abs(out[..., 0][visible].mean() - image[..., 0][mask].mean()) < 12, s["file"]
    np.testing.assert_array_equal(crop_to_lungs(image, mask), out)  # the mask given or found: the same crop
    # keep="box": the same box with nothing blacked out; the field crop is the box crop of the lungs-only image.
    box = crop_to_lungs(image, mask, keep="box")
    assert (box > 0).sum() > visible.sum(), s["file"]
    np.testing.assert_array_equal(crop_to_lungs(lungs_only(image[None], mask[None])[0], mask, keep="box"), out)
    cropped += 1
  assert cropped == 9


@pytest.mark.slow
def test_training_inputs_are_lung_cropped_when_asked(full_data_dir):
  from covidct.data import build_inputs, load_split

  plain = next(iter(load_split("validation", str(full_data_dir), 96).batch(8)))[0].numpy()
  for keep in ("field", "box"):
    cropped = next(iter(build_inputs("validation", data_dir=str(full_data_dir), image_size=96, batch_size=8,
                                     lung_crop=keep)))[0].numpy()
    np.testing.assert_array_equal(cropped, np.stack([crop_to_lungs(im, keep=keep) for im in plain]).astype(np.float32))
    assert not np.array_equal(cropped, plain.astype(np.float32))


def test_a_lung_cropped_run_is_refused_where_no_runner_crops(model_dir, dummy_data_dir, tmp_path):
  import shutil

  from click.testing import CliRunner

  from covidct.cli import main

  run = tmp_path / "run"
  shutil.copytree(model_dir, run)
  config = json.loads((run / "config.json").read_text())
  (run / "config.json").write_text(json.dumps({**config, "lung_crop": "field"}))
  for args in (["evaluate", str(run), "--data-dir", str(dummy_data_dir)],
               ["export", str(run), "--out", str(tmp_path / "export"), "--data-dir", str(dummy_data_dir)]):
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 1 and "--lung-crop" in res.output and "Traceback" not in res.output, res.output
  assert not (tmp_path / "export").exists() and not (run / "evaluation-test").exists()


def test_image_statistics_baseline_finds_a_planted_cue():
  rng = np.random.default_rng(0)

  def fake(n, label):  # label 1: JPEGs with a flat 10-pixel border, as a paper figure might be
    images = []
    for _ in range(n):
      im = rng.integers(0, 256, (100, 120, 1)).astype(np.uint8)
      if label:
        im[:10], im[-10:], im[:, :10], im[:, -10:] = 255, 255, 255, 255
      images.append(im)
    return images, [f"x.{'jpg' if label else 'png'}"] * n

  def split(n):
    a, fa = fake(n, 1)
    b, fb = fake(n, 0)
    return {"images": a + b, "filenames": np.array(fa + fb), "labels": np.array([1] * n + [0] * n)}

  result = statistics_auc(split(20), split(10))
  assert result["roc_auc"] == 1.0
  stats = image_statistics(split(1)["images"][0], "x.jpg")
  assert stats[0] == 100 and stats[1] == 120 and stats[5] == 1.0
  assert stats[6] == pytest.approx(20 / 110, abs=0.02)  # 10 of 100 rows and 10 of 120 columns from each side


def test_evaluate_reports_the_audit(model_dir, dummy_data_dir, tmp_path):
  from click.testing import CliRunner

  from covidct.cli import main

  res = CliRunner().invoke(main, ["evaluate", str(model_dir), "--out", str(tmp_path / "ev"), "--data-dir",
                                  str(dummy_data_dir), "--bootstrap", "10"])
  assert res.exit_code == 0, res.output
  report = json.loads((tmp_path / "ev" / "report.json").read_text())
  audit = report["shortcut_audit"]
  assert audit["roc_auc"]["full"] == pytest.approx(report["roc_auc"])
  assert set(audit["roc_auc"]) == {"full", "lungs_hidden", "lungs_only"}
  assert audit["segmentation"]["images"] == report["examples"]
  assert "## Shortcut audit" in (tmp_path / "ev" / "report.md").read_text()
