"""A digest of an exported copy's own weights, carried in its own metadata, so that a .onnx or .tflite that travels
alone can tell it was changed: a flipped weight byte still gives probabilities in [0, 1] and can change labels.

The digest covers the weights only (ONNX initializers by name; TFLite buffers other than the metadata's), so that
writing the metadata itself does not change it. `covidct export` writes it (`weights_sha256` in an .onnx's
metadata_props, in a .tflite's covidct_meaning.json); `covidct.runners.load_runner` checks it for every path that
runs a copy (predict, bulk-predict, serve, verify, bench, parity)."""

from __future__ import annotations

import hashlib
import pathlib

from covidct.errors import CovidctError

DIGEST_KEY = "weights_sha256"


def onnx_weights_digest(model) -> str:
  """SHA-256 of an onnx.ModelProto's initializers: each name and its values, in name order."""
  from onnx import numpy_helper  # pylint: disable=import-outside-toplevel

  h = hashlib.sha256()
  for init in sorted(model.graph.initializer, key=lambda t: t.name):
    h.update(init.name.encode() + b"\0")
    h.update(numpy_helper.to_array(init).tobytes())
  return h.hexdigest()


def tflite_buffers_digest(buffers) -> str:
  """SHA-256 of a TFLite model's buffers, in order (each as bytes)."""
  h = hashlib.sha256()
  for i, data in enumerate(buffers):
    h.update(f"{i}:{len(data)}:".encode())
    h.update(data)
  return h.hexdigest()


def tflite_weights_digest(path) -> str:
  """The digest of a .tflite's weight buffers (its metadata buffer, if any, left out)."""
  return _tflite_stored(path)[0]


def _tflite_stored(path) -> tuple[str, str | None]:
  """(the digest of a .tflite's weight buffers as stored now, the digest its metadata records or None)."""
  from ai_edge_litert import schema_py_generated as schema  # pylint: disable=import-outside-toplevel

  from covidct.tflite_metadata import METADATA_NAME, read_meaning_dict  # pylint: disable=import-outside-toplevel

  data = pathlib.Path(path).read_bytes()
  model = schema.Model.GetRootAs(data, 0)
  skip = {model.Metadata(i).Buffer() for i in range(model.MetadataLength())
          if model.Metadata(i).Name() in (METADATA_NAME.encode(), METADATA_NAME)}
  buffers = []
  for i in range(model.BuffersLength()):
    if i in skip:
      continue
    b = model.Buffers(i)
    buffers.append(b.DataAsNumpy().tobytes() if b.DataLength() else b"")
  return tflite_buffers_digest(buffers), (read_meaning_dict(path) or {}).get(DIGEST_KEY)


def check_weights(path) -> None:
  """Raises CovidctError when an .onnx or .tflite records a digest of its weights that they no longer match. A
  copy that records none (written before there was one, or by another tool) is not checked."""
  path = pathlib.Path(path)
  suffix = path.suffix.lower()
  try:
    if suffix == ".onnx":
      import onnx  # pylint: disable=import-outside-toplevel

      model = onnx.load(str(path))
      recorded = next((p.value for p in model.metadata_props if p.key == DIGEST_KEY), None)
      actual = onnx_weights_digest(model) if recorded else None
    elif suffix == ".tflite":
      actual, recorded = _tflite_stored(path)
    else:
      return
  except CovidctError:
    raise
  except Exception:  # pylint: disable=broad-except  # an unreadable file: its runner says why
    return
  if recorded and actual != recorded:
    raise CovidctError(f"{path}: its weights do not match the digest in its own metadata (changed or damaged since "
                       "export); copy it again from the export, or export again.")
