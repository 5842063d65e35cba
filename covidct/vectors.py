"""Test vectors beside every exported copy: a handful of real test images and the SavedModel's outputs (written by
`export.meaning.write_vectors`), read back here by `covidct verify` and by the push's server check."""

from __future__ import annotations

import json
import pathlib

import numpy as np

from covidct.errors import CovidctError
from covidct.models import INPUT_NAME, OUTPUT_NAME

VECTORS_DIR = "test_data"  # beside the artifacts: test_data/<stem>/test_data_set_0/{input_0,output_0}.pb, <stem>.npz


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
