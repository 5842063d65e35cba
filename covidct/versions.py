"""Versions of the libraries our artifacts and figures depend on (no heavy imports: usable without TensorFlow)."""

from __future__ import annotations

from importlib import metadata

LIBRARIES = ("tensorflow", "keras", "tensorflow-datasets", "tf2onnx", "onnx", "onnxruntime", "onnxruntime-gpu",
             "ai-edge-litert", "scikit-learn", "numpy")


def library_versions() -> dict:
  out = {}
  for name in LIBRARIES:
    try:
      out[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      out[name] = None
  return out
