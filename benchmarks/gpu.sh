#!/usr/bin/env bash
# BERT-Base (bf16-mixed, seq 128) and CLIP ViT-B/16 training throughput and MFU on one GPU, in a few minutes.
# Usage: bash benchmarks/gpu.sh [extra args for benchmarks/gpu_throughput.py]
# Records to paste into the README: one line per model, eager and torch.compile.
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
timeout 240 python benchmarks/gpu_throughput.py --model both "$@"
timeout 300 python benchmarks/gpu_throughput.py --model both --compile "$@"
