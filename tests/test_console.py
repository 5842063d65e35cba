"""The console: covidct's own lines pass, TensorFlow's and the runtimes' start-up chatter does not (unless --verbose)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
from PIL import Image

from covidct.cli.quiet import NOISE
from tests.conftest import ROOT


def test_noise_patterns():
  noise = [b"I0000 00:00:1796157173.043699   20819 port.cc:153] oneDNN custom operations are on.",
           b"W0000 00:00:1796157173.045468   20819 cudart_stub.cc:31] Could not find cuda drivers",
           b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
           b"INFO: Created TensorFlow Lite XNNPACK delegate for CPU.",
           b"fully_quantize: 0, inference_type: 6, input_inference_type: UINT8, output_inference_type: UINT8"]
  kept = [b"Error: /tmp/x.png: not a readable image (PNG, JPEG or TIFF expected).", b"2/6 training",
          b"0.6140  COVID     /tmp/x.png", b"Epoch 1/40", b"recommended: model_float32.tflite on litert"]
  assert all(NOISE.match(line) for line in noise) and not any(NOISE.match(line) for line in kept)


def test_the_command_is_quiet_unless_verbose(exported, tmp_path):
  image = tmp_path / "scan.png"
  Image.fromarray(np.full((64, 64), 90, np.uint8)).save(image)
  cmd = [sys.executable, "-m", "covidct.cli", "predict", str(image), "--model", str(exported / "model_float32.tflite")]
  quiet = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=False)
  assert quiet.returncode == 0 and "COVID" in quiet.stdout, quiet.stderr
  assert "XNNPACK" not in quiet.stderr and "I0000" not in quiet.stderr and "absl" not in quiet.stderr, quiet.stderr
  loud = subprocess.run([*cmd[:3], "--verbose", *cmd[3:]], capture_output=True, text=True, cwd=ROOT, check=False)
  assert loud.returncode == 0 and "XNNPACK" in loud.stderr  # the runtime's own line, shown on request
