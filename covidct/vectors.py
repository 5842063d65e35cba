"""Test vectors beside every exported copy: a handful of real test images and the SavedModel's outputs (written by
`export.meaning.write_vectors`), read back here by `covidct verify` and by the push's server check."""

from __future__ import annotations

import json
import pathlib

import numpy as np

from covidct.errors import CovidctError
from covidct.models import INPUT_NAME, OUTPUT_NAME

VECTORS_DIR = "test_data"  # beside the artifacts: test_data/<stem>/test_data_set_0/{input_0,output_0}.pb, <stem>.npz
# The most any exported copy may differ from the SavedModel on its vectors: float copies 1e-4, rounded ones (float16,
# int8) what export measured plus two 8-bit output steps, a few hundredths (export.meaning.vector_tolerance). A vector
# file that allows more was edited: verify refuses it rather than pass whatever the copy computes.
MAX_TOLERANCE = 0.1


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
      images, want = arrays
    else:
      with np.load(base / f"{artifact.stem}.npz", allow_pickle=False) as z:
        images, want, tolerance = z[INPUT_NAME], z[OUTPUT_NAME], z["tolerance"]
    return _checked(images, want, tolerance)
  except FileNotFoundError:
    raise CovidctError(f"no test vectors for {artifact} (looked in {base}); they are written by `covidct export` "
                       "beside each artifact: copy the test_data/ folder with it.") from None
  except CovidctError as e:
    raise CovidctError(f"the test vectors of {artifact} in {base} are damaged: {e} Copy them again from the export "
                       "folder.") from None
  except Exception as e:  # pylint: disable=broad-except  (zip, protobuf, JSON and numpy each raise their own)
    raise CovidctError(f"the test vectors of {artifact} in {base} are damaged ({type(e).__name__}); copy them again "
                       "from the export folder.") from None


def _checked(images, want, tolerance) -> tuple[np.ndarray, np.ndarray, float]:
  """The vectors as verify uses them, or CovidctError saying what is wrong with them."""
  images, want = np.asarray(images), np.asarray(want)
  if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 1 or images.shape[1] != images.shape[2]:
    raise CovidctError(f"the images are {images.dtype} {list(images.shape)}, not uint8 (N, S, S, 1).")
  if not len(images):
    raise CovidctError("they hold no image.")
  want = want.reshape(-1) if want.dtype.kind == "f" else np.array([np.nan])
  if len(want) != len(images) or not np.all((want >= 0) & (want <= 1)):
    raise CovidctError(f"{len(images)} images need {len(images)} probabilities in [0, 1].")
  tolerance = np.asarray(tolerance)
  if tolerance.shape != () or tolerance.dtype.kind not in "fiu" or not 0 <= float(tolerance) <= MAX_TOLERANCE:
    raise CovidctError(f"their tolerance must be one number from 0 to {MAX_TOLERANCE} (no exported copy may differ "
                       "more), got " + (f"{float(tolerance)!r}." if tolerance.shape == () and tolerance.dtype.kind in
                                        "fiu" else f"a {tolerance.dtype} {list(tolerance.shape)}."))
  return images, want, float(tolerance)
