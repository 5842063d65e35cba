#!/usr/bin/env bash
# `covidct pretrain` on a GPU machine that has JAX but neither TensorFlow nor network access.
#
#   tools/gpu_pretrain.sh WHEELS ARRAYS OUT [covidct pretrain options ...]
#
# WHEELS: a folder of wheels for what the machine may lack (keras, click, h5py, optree, scikit-learn, ...), fetched
#   beforehand with `pip download --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 --no-deps`
#   and unpacked into $COVIDCT_SITE (default /tmp/covidct-site), which goes first on PYTHONPATH.
#   Keras comes from there whatever the machine has, so its weight files match this repository's Keras; the rest is
#   installed only where the import fails.
# ARRAYS: train.npz and validation.npz from `covidct data arrays --image-size S`.
# OUT: the pretraining output folder (backbone.weights.h5, pretrain.json, checkpoints/); its log is OUT.log.
# Give --weights-dir DIR holding the ImageNet file when the machine has no Keras cache.
set -euo pipefail
[ $# -ge 3 ] || { echo "usage: $0 WHEELS ARRAYS OUT [covidct pretrain options]" >&2; exit 2; }
wheels=$1 arrays=$2 out=$3
shift 3
repo=$(cd "$(dirname "$0")/.." && pwd)
site=${COVIDCT_SITE:-${TMPDIR:-/tmp}/covidct-site}
py=${PYTHON:-$(command -v python3 || command -v python)}

mkdir -p "$site"
install() {  # unpack the wheels named by these prefixes into $site (what pip --target does; no pip needed)
  local name file
  for name in "$@"; do
    file=$(ls "$wheels"/"$name"-*.whl 2>/dev/null | head -1)
    [ -n "$file" ] || { echo "no $name wheel in $wheels" >&2; exit 1; }
    "$py" -c "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])" "$file" "$site"
  done
}
[ -e "$site/keras" ] || install keras
export PYTHONPATH="$site:$repo${PYTHONPATH:+:$PYTHONPATH}"
missing=()
for pair in absl:absl_py click:click h5py:h5py namex:namex optree:optree rich:rich markdown_it:markdown_it_py \
            mdurl:mdurl pygments:pygments packaging:packaging sklearn:scikit_learn joblib:joblib \
            threadpoolctl:threadpoolctl; do
  "$py" -c "import ${pair%%:*}" 2>/dev/null || missing+=("${pair##*:}")
done
[ ${#missing[@]} -eq 0 ] || { echo "installing from $wheels: ${missing[*]}"; install "${missing[@]}"; }

export KERAS_BACKEND=${KERAS_BACKEND:-jax}
"$py" - <<'EOF'
import sys, keras, numpy
print("python", sys.version.split()[0], "| numpy", numpy.__version__, "| keras", keras.__version__, keras.backend.backend())
if keras.backend.backend() == "jax":
  import jax
  print("jax", jax.__version__, jax.devices())
EOF
mkdir -p "$(dirname "$out")"
"$py" -m covidct.cli pretrain --arrays "$arrays" --out "$out" --quiet "$@" 2>&1 | tee "$out.log"
