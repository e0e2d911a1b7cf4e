#!/usr/bin/env bash
# The device check on a GPU machine (see resclip_deploy/export/device_check.py): one JSON line.
#
# The machine needs only Python with torch; everything else travels as wheels in $WHEELS
# (default .whl/ in the repository root): this project's wheel (`pip wheel --no-deps -w .whl .`)
# and its dependencies for the machine's Python (open_clip_torch, onnx, onnxscript, onnx-ir,
# ml_dtypes, tokenizers, opencv-python-headless, click, scipy, safetensors, huggingface_hub,
# ftfy, regex, wcwidth, tqdm, timm, and onnxruntime-gpu, whose wheel may travel in pieces:
# `split -b 60M` here, `cat part-* > onnxruntime_gpu-*.whl` there). Arguments go to the check,
# e.g. `scripts/device_check.sh --frames 100 -o $OUT/device_check.json`.
set -euo pipefail
cd "$(dirname "$0")/.."
wheels="${WHEELS:-.whl}"
if [ -d "$wheels" ] && ls "$wheels"/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/resclip-site "$wheels"/*.whl
    export PYTHONPATH="/tmp/resclip-site${PYTHONPATH:+:$PYTHONPATH}"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >&2 || true
exec python3 -m resclip_deploy.export.device_check "$@"
