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

from covidct.errors import CovidctError
from covidct.models import INPUT_NAME, OUTPUT_NAME

LABELS = ("NonCOVID", "COVID")
VECTORS_DIR = "test_data"  # beside the artifacts: test_data/<stem>/test_data_set_0/{input_0,output_0}.pb, <stem>.npz
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
  for key, value in meaning(manifest, fmt).items():
    model.metadata_props.add(key=key, value=value)
  onnx.save(model, str(path))


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


def load_vectors(artifact) -> tuple[np.ndarray, np.ndarray, float]:
  """(images, SavedModel probabilities, tolerance) kept beside `artifact` by write_vectors."""
  from onnx import TensorProto, numpy_helper  # pylint: disable=import-outside-toplevel

  artifact = pathlib.Path(artifact)
  base = artifact.parent / VECTORS_DIR
  try:
    if artifact.suffix == ".onnx":
      folder = base / artifact.stem / "test_data_set_0"
      arrays = []
      for name in ("input_0.pb", "output_0.pb"):
        tensor = TensorProto()
        tensor.ParseFromString((folder / name).read_bytes())
        arrays.append(numpy_helper.to_array(tensor))
      tolerance = json.loads((base / artifact.stem / "tolerance.json").read_text())["max_abs_diff"]
      return arrays[0], arrays[1].reshape(-1), float(tolerance)
    with np.load(base / f"{artifact.stem}.npz") as z:
      return z[INPUT_NAME], z[OUTPUT_NAME].reshape(-1), float(z["tolerance"])
  except FileNotFoundError:
    raise CovidctError(f"no test vectors for {artifact} (looked in {base}); they are written by `covidct export` "
                       "beside each artifact: copy the test_data/ folder with it.") from None
  except (ValueError, KeyError, OSError) as e:
    raise CovidctError(f"the test vectors of {artifact} in {base} are damaged ({type(e).__name__}); copy them again "
                       "from the export folder.") from None


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
