"""The SavedModel's encoded-image signature for model servers, and its warmup file."""

from __future__ import annotations

import json
import pathlib
import zipfile

import numpy as np
from click.testing import CliRunner

from covidct.cli import main
from tests.conftest import DUMMY_DATA


def test_serving_saved_model_takes_encoded_images_like_predict(exported, tmp_path):
  import base64
  import subprocess

  import tensorflow as tf
  from PIL import Image

  from export.serving import BYTES_INPUT, BYTES_SIGNATURE, read_warmup

  shown = subprocess.run(["saved_model_cli", "show", "--dir", str(exported / "saved_model"), "--all"],
                         capture_output=True, text=True, check=True).stdout
  assert f"signature_def['{BYTES_SIGNATURE}']" in shown and BYTES_INPUT in shown and "DT_STRING" in shown
  files = []
  with zipfile.ZipFile(DUMMY_DATA / "Images-processed" / "CT_NonCOVID.zip") as zf:
    for name in ("CT_NonCOVID/0.jpg", "CT_NonCOVID/14.png"):
      files.append(tmp_path / pathlib.Path(name).name)
      files[-1].write_bytes(zf.read(name))
  gray = np.asarray(Image.open(files[1]).convert("L"))
  Image.fromarray((gray.astype(np.uint16) * 257)).save(tmp_path / "sixteen.png")  # 16-bit grayscale
  Image.fromarray(np.stack([gray, np.roll(gray, 7, 0), gray[::-1]], -1)).save(tmp_path / "rgb.png")  # colour
  Image.fromarray(np.stack([gray, np.full_like(gray, 128)], -1), "LA").save(tmp_path / "grey_alpha.png")
  files += [tmp_path / "sixteen.png", tmp_path / "rgb.png", tmp_path / "grey_alpha.png"]
  # What a TF Serving REST client sends: {"instances": [{"b64": ...}]}, decoded by the server into raw bytes.
  instances = [{"b64": base64.b64encode(f.read_bytes()).decode()} for f in files]
  raw = tf.constant([base64.b64decode(i["b64"]) for i in instances])
  out = tf.saved_model.load(str(exported / "saved_model")).signatures[BYTES_SIGNATURE](**{BYTES_INPUT: raw})
  res = CliRunner().invoke(main, ["predict", *map(str, files), "--model", str(exported / "saved_model"), "--json"])
  want = json.loads(res.stdout)["results"]
  np.testing.assert_allclose(out["covid_probability"].numpy(), [r["probability"] for r in want], atol=1e-6)
  assert [l.decode() for l in out["label"].numpy()] == [r["label"] for r in want]
  manifest = json.loads((exported / "manifest.json").read_text())
  assert np.allclose(out["threshold"].numpy(), manifest["operating_threshold"]["value"])
  logs = read_warmup(exported / "saved_model")
  assert [l.predict_log.request.model_spec.signature_name for l in logs] == ["serving_default", BYTES_SIGNATURE]
