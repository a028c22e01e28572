#!/usr/bin/env bash
# Creates the peers' virtualenvs for bench/small_jobs.py (`make bench-peers`):
#   bench/peers/.venv-ray      ray[serve]
#   bench/peers/.venv-bentoml  bentoml 1.4
# each with the same tensorflow-cpu, keras, numpy and pillow versions as the project's venv,
# so the model and the decoder cost the same everywhere. Never part of `make test`.
#
#   bench/peers/install.sh [ray] [bentoml]      (both when none is named; FORCE=1 rebuilds)
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
python="${PYTHON:-python3}"
project_venv="${VENV:-$root/.venv}"
peers=("$@")
[ ${#peers[@]} -eq 0 ] && peers=(ray bentoml)

# Pin the shared packages to what the project's venv has.
pins=()
if [ -x "$project_venv/bin/pip" ]; then
    while IFS= read -r line; do
        pins+=("$line")
    done < <("$project_venv/bin/pip" freeze 2>/dev/null | grep -iE '^(tensorflow-cpu|tensorflow_cpu|keras|numpy|pillow)==')
fi
if [ ${#pins[@]} -lt 4 ]; then
    echo "warning: could not read all pins from $project_venv (got: ${pins[*]:-none}); installing unpinned" >&2
    pins=(tensorflow-cpu keras numpy pillow)
fi

for peer in "${peers[@]}"; do
    case "$peer" in
        ray) spec=("ray[serve]") ;;
        bentoml) spec=("bentoml>=1.4,<1.5") ;;
        *) echo "unknown peer: $peer (ray, bentoml)" >&2; exit 2 ;;
    esac
    venv="$here/.venv-$peer"
    want="${spec[*]} ${pins[*]}"
    if [ -z "${FORCE:-}" ] && [ -f "$venv/.installed" ] && [ "$(cat "$venv/.installed")" = "$want" ]; then
        echo "== $peer: $venv is up to date ($want; FORCE=1 rebuilds it)"
        continue
    fi
    start=$(date +%s)
    echo "== $peer: $venv ($want)"
    rm -rf "$venv"
    "$python" -m venv "$venv"
    # (pip's warnings about this machine's extra package indexes that are absent are dropped)
    "$venv/bin/pip" install --quiet --upgrade pip 2>&1 | { grep -v 'is ignored: it is neither' || true; }
    "$venv/bin/pip" install --quiet "${spec[@]}" "${pins[@]}" 2>&1 | { grep -v 'is ignored: it is neither' || true; }
    echo "$want" > "$venv/.installed"
    end=$(date +%s)
    echo "== $peer: installed in $((end - start)) s, $(du -sh "$venv" | cut -f1)"
done
