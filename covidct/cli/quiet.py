"""Quiet by default: the console shows covidct's steps, progress and errors, not TensorFlow's start-up chatter.

TensorFlow 2.21 writes its C++ log lines (oneDNN, CUDA stubs, CPU features) straight to file descriptor 2 before
any log level is read, so environment variables alone do not silence them. `install` puts a filter on descriptor 2
for the `covidct` console command: lines that match NOISE are dropped, everything else passes through unchanged.
`covidct --verbose ...` (or COVIDCT_VERBOSE=1) leaves the console as it is.
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import sys
import threading
import warnings

NOISE = re.compile(
    rb"^(?:[IWE]\d{4} [\d:.]+\s+\d+ \S+:\d+\] "  # absl/glog C++ lines below ERROR
    rb"|WARNING: All log messages before absl::InitializeLog\(\)"
    rb"|To enable the following instructions: .*rebuild TensorFlow"
    rb"|This TensorFlow binary is optimized to use available CPU instructions"
    rb"|WARNING:absl:"  # Python absl warnings (e.g. compiled metrics not built)
    rb"|WARNING:tensorflow:"
    rb"|WARNING:root:(?:apitools not found|Resource module is not available)"  # Apache Beam's import-time notes
    rb"|INFO: Created TensorFlow Lite XNNPACK delegate for CPU"
    rb"|fully_quantize: \d+, inference_type: "  # the TFLite converter's quantizer
    rb")")


def _pump(read_fd: int, out_fd: int) -> None:
  pending = b""
  with os.fdopen(read_fd, "rb", buffering=0) as src:
    while True:
      chunk = src.read(65536)
      if not chunk:
        break
      pending += chunk
      *lines, pending = pending.split(b"\n")
      keep = b"".join(line + b"\n" for line in lines if not NOISE.match(line))
      if keep:
        os.write(out_fd, keep)
  if pending and not NOISE.match(pending):
    os.write(out_fd, pending)


def quiet_python() -> None:
  """Python-level warnings and loggers of the ML libraries: errors only."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  for name in ("tensorflow", "absl", "keras", "tf2onnx", "onnx", "tensorflow_datasets", "h5py"):
    logging.getLogger(name).setLevel(logging.ERROR)
  logging.getLogger("apache_beam").setLevel(logging.CRITICAL)  # a failed pipeline is reported in one line by covidct
  for module in ("tensorflow", "keras", "tf2onnx", "tensorflow_datasets", "onnx", "google.protobuf", "absl"):
    warnings.filterwarnings("ignore", module=module)


def install() -> None:
  """Filters file descriptor 2 for the rest of this process (and the processes it starts)."""
  quiet_python()
  try:
    original = os.dup(2)
    read_fd, write_fd = os.pipe()
  except OSError:
    return
  sys.stderr.flush()
  os.dup2(write_fd, 2)
  os.close(write_fd)
  thread = threading.Thread(target=_pump, args=(read_fd, original), daemon=True)
  thread.start()

  def restore():
    try:
      sys.stderr.flush()
    except (OSError, ValueError):
      pass
    os.dup2(original, 2)  # closes the pipe's last write end in this process: the pump drains and stops
    thread.join(timeout=2)

  atexit.register(restore)
