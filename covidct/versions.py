"""Versions of the libraries our artifacts and figures depend on, and the CPU they ran on (no heavy imports: usable
without TensorFlow)."""

from __future__ import annotations

import os
import platform
import re
from importlib import metadata

LIBRARIES = ("covidct", "tensorflow", "keras", "tensorflow-datasets", "tf2onnx", "onnx", "onnxruntime", "onnxruntime-gpu",
             "ai-edge-litert", "scikit-learn", "numpy")


def library_versions() -> dict:
  out = {}
  for name in LIBRARIES:
    try:
      out[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      out[name] = None
  return out


def cpu_info() -> dict:
  """CPU model, cores, clock, vector extensions and the theoretical float32 peak per core they imply."""
  text = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
  model = (re.search(r"model name\s*:\s*(.*)", text) or [None, platform.processor()])[1]
  mhz = float((re.search(r"cpu MHz\s*:\s*([\d.]+)", text) or [None, "nan"])[1])
  flags = set((re.search(r"flags\s*:\s*(.*)", text) or [None, ""])[1].split())
  lanes = 16 if "avx512f" in flags else 8 if "avx2" in flags else 4
  fma = 2 if "fma" in flags else 1
  # Two FMA ports per core on server cores with AVX-512/AVX2: lanes x 2 (mul+add) x 2 ports.
  per_cycle = lanes * fma * 2
  return {"model": model, "cores": os.cpu_count(), "mhz": mhz,
          "vector": "avx512" if lanes == 16 else "avx2" if lanes == 8 else "sse",
          "amx_int8": "amx_int8" in flags, "vnni": bool({"avx512_vnni", "avx_vnni"} & flags),
          "theoretical_gflops_per_core": per_cycle * mhz / 1000.0 if mhz == mhz else None,
          "theoretical_basis": f"{lanes} float32 lanes x {fma} (FMA) x 2 ports x {mhz:.0f} MHz"}


def cpu_label(info: dict | None = None) -> str:
  """The CPU as `covidct bench` records where it measured a recommendation, e.g. 'Intel(R) Xeon(R) Processor (avx512,
  VNNI)': a recommendation holds on CPUs with this same label only."""
  info = info or cpu_info()
  return f"{info['model']} ({info['vector']}{', VNNI' if info['vnni'] else ''})"


def cpu_kind(info: dict | None = None) -> str:
  """One line naming the CPU and the instruction sets that decide which kernels the runtimes pick, e.g.
  'AMD EPYC 7763 64-Core Processor (AVX2, no VNNI)'."""
  info = info or cpu_info()
  vector = {"avx512": "AVX-512", "avx2": "AVX2", "sse": "SSE"}[info["vector"]]
  return f"{info['model']} ({vector}, {'VNNI' if info['vnni'] else 'no VNNI'})"
