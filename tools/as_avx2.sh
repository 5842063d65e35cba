#!/usr/bin/env bash
# Runs a Python command as it runs on an AVX2-only x86-64 CPU (AMD EPYC Zen 3: AVX2 and FMA, no AVX-512, no VNNI),
# on any x86-64 machine: QEMU's user-mode emulator reports that CPU to the program, so ONNX Runtime (MLAS), LiteRT
# (XNNPACK) and TensorFlow (oneDNN, Eigen) pick the kernels they pick there. About 10-30x slower than native.
#
#   tools/as_avx2.sh -m pytest tests/test_runners.py tests/test_quantize.py
#   tools/as_avx2.sh my_script.py
#
# Uses the active virtual environment (or .venv); installs qemu-user from Debian's packages when it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${VIRTUAL_ENV:-$PWD/.venv}
[ -x "$venv/bin/python" ] || { echo "as_avx2.sh: no virtual environment at $venv; run the README's setup first." >&2; exit 2; }
if ! command -v qemu-x86_64 >/dev/null; then
  apt-get update -qq && apt-get install -y -qq qemu-user >/dev/null
fi
python=$(readlink -f "$venv/bin/python")  # the interpreter itself: qemu runs a binary, not the venv's link
site=$("$venv/bin/python" -c 'import site; print(site.getsitepackages()[0])')
# QEMU 7.2's TCG lacks a few of EPYC-Milan's minor flags (pcid, sha-ni, ...) and says so on every start: hidden.
PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}" TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-3} \
  qemu-x86_64 -cpu EPYC-Milan-v1 "$python" "$@" 2> >(grep -v "TCG doesn't support requested feature" >&2)
