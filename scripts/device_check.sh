#!/usr/bin/env bash
# The device check on a GPU machine (export/device_check.py, installed as
# resclip_deploy.export.device_check): JSON lines on stdout, the report rewritten after every
# run with -o FILE. Arguments go to the check, e.g.
#   scripts/device_check.sh --case ade20k --frames 60 --runs 5 -o "$OUT/device_check.json"
#
# Wheels in $WHEELS (default .whl/ in the repository root) are installed first with
# `pip --target $RESCLIP_SITE` (default /tmp/resclip-site), which goes first on PYTHONPATH: on
# the device, this project's wheel and what its image lacks (DEVELOPERS.md;
# scripts/prepare_device.py builds them and reassembles the ones that travel in pieces).
set -euo pipefail
cd "$(dirname "$0")/.."
wheels="${WHEELS:-.whl}"
site="${RESCLIP_SITE:-/tmp/resclip-site}"
# The CUDA wheels (nvidia_*: NVVM) go to a folder of their own, after $site on the path: they
# install into nvidia/cu13/, which in $site would stop the nvidia/ link below.
cuda_site="${RESCLIP_CUDA_SITE:-/tmp/resclip-cuda-site}"
if [ -d "$wheels" ] && ls "$wheels"/*.whl >/dev/null 2>&1; then
    shopt -s nullglob
    cuda_wheels=("$wheels"/nvidia_*.whl)
    other_wheels=()
    for w in "$wheels"/*.whl; do
        case "$(basename "$w")" in nvidia_*) ;; *) other_wheels+=("$w") ;; esac
    done
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$site" "${other_wheels[@]}"
    if [ "${#cuda_wheels[@]}" -gt 0 ]; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$cuda_site" "${cuda_wheels[@]}"
    fi
    # onnxruntime.preload_dlls() looks for the CUDA libraries' nvidia/ folder beside
    # onnxruntime/, as one site-packages holds both in a normal install; here they are apart.
    nvidia="$(python3 -P -c 'import nvidia; print(next(iter(nvidia.__path__)))' 2>/dev/null)" \
        || nvidia=""
    if [ -n "$nvidia" ] && [ -d "$site/onnxruntime" ] && [ ! -e "$site/nvidia" ]; then
        ln -s "$nvidia" "$site/nvidia"
    fi
    if [ "${#cuda_wheels[@]}" -gt 0 ]; then
        export PYTHONPATH="$site:$cuda_site${PYTHONPATH:+:$PYTHONPATH}"
    else
        export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    fi
fi
# -P (Python >= 3.11): without it `-m` puts the current folder, the repository root, first on
# sys.path, where the source folder resclip_deploy/ shadows the installed package and lacks
# `export` (setuptools maps resclip_deploy.export to export/).
exec python3 -P -m resclip_deploy.export.device_check "$@"
