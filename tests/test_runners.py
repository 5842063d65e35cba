"""The runners compute the same numbers on every x86-64 CPU kind (AVX2-only, AVX-512, with or without VNNI)."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest

from covidct.runners import PROBE_SIZE as SIZE
from covidct.runners import OnnxRunner


def _saturating_qdq_model(path):
  """covidct.runners' own probe: all-white input makes every pair of int8 products 255 x 127 + 255 x 127 = 64,770,
  which a 16-bit saturating add (VPMADDUBSW, ONNX Runtime's default on CPUs without VNNI) clips to 32,767."""
  from covidct.runners import int8_probe_model

  path.write_bytes(int8_probe_model())


@pytest.mark.parametrize("optimization", ["all", "basic"])
def test_onnx_runner_int8_sums_are_exact_on_every_cpu(tmp_path, optimization):
  """On an AVX2 EPYC without the precision setting this gives 128/256 (each pair clipped) instead of 254/256; on a
  VNNI CPU both are exact. Checked on an AVX2-only CPU by running this test under `qemu-x86_64 -cpu EPYC-Milan-v1`
  (docs/results/cpu-kinds.md)."""
  _saturating_qdq_model(tmp_path / "m.onnx")
  runner = OnnxRunner(tmp_path / "m.onnx", num_threads=1, optimization=optimization)
  p = runner(np.full((1, SIZE, SIZE, 1), 255, np.uint8), batch_size=1)
  np.testing.assert_allclose(p * 256, [254], atol=1e-3)  # float32 rounding of the last Mul only


def test_the_exactness_setting_is_applied_only_where_the_kernels_saturate(tmp_path, monkeypatch):
  """The setting costs speed on VNNI CPUs (it replaces their kernels: 456 -> 124 GOP/s int8 GEMM on a Sapphire Rapids
  core), so covidct applies it where the probe finds the default kernels saturating, and only there."""
  import covidct.runners as runners

  exact = runners.ort_int8_is_exact()
  _saturating_qdq_model(tmp_path / "m.onnx")
  assert OnnxRunner(tmp_path / "m.onnx").session_config == ({} if exact else runners.ONNX_SESSION_CONFIG)
  monkeypatch.setattr(runners, "ort_int8_is_exact", lambda: False)  # as on an AVX2 EPYC
  runner = OnnxRunner(tmp_path / "m.onnx", num_threads=1)
  assert runner.session_config == {"session.x64quantprecision": "1"}
  p = runner(np.full((1, SIZE, SIZE, 1), 255, np.uint8), batch_size=1)
  np.testing.assert_allclose(p * 256, [254], atol=1e-3)


def test_every_runtime_refuses_a_copy_whose_weights_no_longer_match_its_own_digest(exported, tmp_path):
  """The digest of its weights travels in each .onnx and .tflite's own metadata; load_runner checks it under every
  runtime, and writing the metadata did not change it."""
  import shutil

  from covidct.digest import check_weights
  from covidct.errors import CovidctError
  from covidct.runners import load_runner
  from tests.test_bad_inputs import _flip_weights

  for name in ("model_float32.onnx", "model_float32.tflite", "model_float16.tflite"):
    check_weights(exported / name)  # as exported: matches
    copy = pathlib.Path(shutil.copy(exported / name, tmp_path / name))
    _flip_weights(copy)
    for runtime in ("default", "openvino"):
      with pytest.raises(CovidctError, match="do not match the digest in its own metadata"):
        load_runner(copy, runtime=runtime)
