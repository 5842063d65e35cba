"""What an artifact means travels with it: ONNX metadata, and test vectors beside every copy.

An exported file is only useful to someone who knows what it takes and returns. `onnx_metadata` writes it into
the .onnx itself (ONNX's own fields and `metadata_props`, with the ONNX image keys), so a lone copy still says its
labels, threshold and preprocessing; `covidct.runners.read_onnx_meaning` reads it back through onnxruntime. `write_vectors` keeps
a handful of real test images and the SavedModel's outputs beside each artifact (the ONNX model zoo layout for
.onnx, an .npz for .tflite), and `verify` replays them on whatever runtime is installed.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np

from covidct.digest import DIGEST_KEY, onnx_weights_digest, tflite_weights_digest
from covidct.models import INPUT_NAME, OUTPUT_NAME
from covidct.vectors import VECTORS_DIR, load_vectors

LABELS = ("NonCOVID", "COVID")
N_VECTORS = 8
OUTPUT_STEP = 1.0 / 256.0  # an 8-bit probability's step
KEYS = ("labels", "operating_threshold", "target_sensitivity", "preprocessing", "input", "output", "format")


def meaning(manifest: dict, fmt: str) -> dict[str, str]:
  """The metadata every copy carries, as strings (ONNX metadata_props are str -> str)."""
  thr = manifest["operating_threshold"]
  return {
      "labels": json.dumps(list(manifest["labels"])),
      "operating_threshold": repr(float(thr["value"])),
      "target_sensitivity": repr(float(thr["target_sensitivity"])),
      "preprocessing": manifest["preprocessing"],
      "input": json.dumps(manifest["input"]),
      "output": json.dumps(manifest["output"]),
      "format": fmt,
      # ONNX's image metadata keys (onnx/docs/MetadataProps.md): one grey channel of 0-255.
      "Image.BitmapPixelFormat": "Gray8",
      "Image.ColorSpaceGamma": "SRGB",
      "Image.NominalPixelRange": "NominalRange_0_255",
  }


def onnx_metadata(path, manifest: dict, fmt: str, version: str) -> None:
  """Writes producer, version, description and metadata_props into the .onnx at `path`, in place."""
  import onnx  # pylint: disable=import-outside-toplevel

  model = onnx.load(str(path))
  model.producer_name, model.producer_version = "covidct", version
  model.model_version = 1
  model.doc_string = (f"covidct COVID-19 CT slice classifier ({fmt}). Input '{INPUT_NAME}': a batch of grayscale "
                      f"slices, uint8 {manifest['input']['shape']}, preprocessed as: {manifest['preprocessing']}. "
                      f"Output '{OUTPUT_NAME}': P(COVID). Label COVID when P >= the operating threshold "
                      f"{manifest['operating_threshold']['value']:.4f}. Not a diagnostic device.")
  del model.metadata_props[:]
  for key, value in {**meaning(manifest, fmt), DIGEST_KEY: onnx_weights_digest(model)}.items():
    model.metadata_props.add(key=key, value=value)
  onnx.save(model, str(path))


def tflite_metadata(path, manifest: dict, fmt: str, version: str) -> None:
  """Writes TFLite metadata (covidct.tflite_metadata) into the .tflite at `path`, in place: name, version,
  description, author, license; the input as a grayscale image of 0-255 and the output as P(COVID); labels.txt and
  covidct_meaning.json (the same keys as an .onnx's metadata_props, threshold included) as associated files."""
  from covidct import tflite_metadata as tm  # pylint: disable=import-outside-toplevel

  size = manifest["input"]["shape"][1]
  thr = float(manifest["operating_threshold"]["value"])
  labels = list(manifest["labels"])
  tm.write(path, {
      "name": "covidct COVID-19 CT slice classifier",
      "description": (f"{fmt}. P(COVID) of one lung CT slice; label {labels[1]} when P >= the operating threshold "
                      f"{thr:.4f}, else {labels[0]}. Preprocessing: {manifest['preprocessing']}. Not a diagnostic "
                      "device."),
      "version": version, "author": "covidct", "license": "Apache-2.0",
      "inputs": [{"name": INPUT_NAME, "image": True, "range": (0, 255),
                  "description": f"A batch of grayscale CT slices, uint8 0-255, {size}x{size}, resized as in "
                                 "training (see the description)."}],
      "outputs": [{"name": OUTPUT_NAME, "range": (0, 1),
                   "description": f"P(COVID). {labels[1]} when >= {thr:.4f} (operating threshold, chosen on "
                                  f"{manifest['operating_threshold'].get('chosen_on', 'validation')} for sensitivity "
                                  f">= {manifest['operating_threshold']['target_sensitivity']}), else {labels[0]}.",
                   "associated_files": [{"name": tm.LABELS_FILE, "type": tm.TENSOR_AXIS_LABELS,
                                         "description": "Line 1: the label below the threshold; line 2: at or "
                                                        "above it."}]}],
      "associated_files": [{"name": tm.MEANING_FILE, "type": tm.DESCRIPTIONS,
                            "description": "covidct's meaning keys: labels, operating threshold, preprocessing."}],
  }, {tm.LABELS_FILE: ("\n".join(labels) + "\n").encode(),
      tm.MEANING_FILE: json.dumps({**meaning(manifest, fmt), DIGEST_KEY: tflite_weights_digest(path)},
                                  indent=2).encode()})


def write_vectors(out_dir, artifact: str, images: np.ndarray, reference: np.ndarray, tolerance: float) -> str:
  """Saves `images` and the SavedModel's probabilities for one artifact; returns the vectors' path (relative)."""
  from onnx import numpy_helper  # pylint: disable=import-outside-toplevel

  out_dir = pathlib.Path(out_dir)
  stem = pathlib.Path(artifact).stem  # a SavedModel folder ('saved_model') keeps its name
  ref = np.asarray(reference, np.float32).reshape(-1, 1)
  if artifact.endswith(".onnx"):
    folder = out_dir / VECTORS_DIR / stem / "test_data_set_0"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "input_0.pb").write_bytes(numpy_helper.from_array(images, INPUT_NAME).SerializeToString())
    (folder / "output_0.pb").write_bytes(numpy_helper.from_array(ref, OUTPUT_NAME).SerializeToString())
    (folder.parent / "tolerance.json").write_text(json.dumps({"max_abs_diff": tolerance}))
    return str(folder.relative_to(out_dir))
  path = out_dir / VECTORS_DIR / f"{stem}.npz"
  path.parent.mkdir(parents=True, exist_ok=True)
  np.savez(path, **{INPUT_NAME: images, OUTPUT_NAME: ref, "tolerance": np.float64(tolerance)})
  return str(path.relative_to(out_dir))


def vector_tolerance(format_tolerance: float | None, measured: float) -> float:
  """How far a copy may be from the SavedModel on its vectors: the format's float tolerance, or, for copies that
  round (float16, int8), what export measured on these images plus two 8-bit output steps (another runtime may
  round a value or two the other way; a damaged copy is off by far more)."""
  return float(format_tolerance) if format_tolerance is not None else float(measured) + 2 * OUTPUT_STEP


def verify(artifact, **runner_kwargs) -> dict:
  """Replays an artifact's test vectors on the runtime installed here; passed when every probability is within the
  vectors' tolerance of the SavedModel's."""
  from covidct.runners import load_runner  # pylint: disable=import-outside-toplevel

  images, want, tolerance = load_vectors(artifact)
  runner = load_runner(artifact, **runner_kwargs)
  got = runner(images, batch_size=len(images))
  diff = float(np.max(np.abs(got.astype(np.float64) - want))) if len(want) else 0.0
  return {"artifact": str(artifact), "runtime": runner.kind, "images": int(len(images)), "max_abs_diff": diff,
          "tolerance": tolerance, "passed": bool(diff <= tolerance)}
