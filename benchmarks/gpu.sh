#!/usr/bin/env bash
# One GPU, under 10 minutes: BERT-Base (bf16, seq 128) tokens/s and MFU, ours vs transformers.BertForPreTraining,
# and CLIP ViT-B/16 pairs/s and MFU, ours (text tower in open_clip's shape: 12 x 512, 8 heads, 77 tokens) vs
# open_clip at the same batch, each eager and compiled, every line ending in `ratio:` (ours / theirs) and what
# each side computes (the same shapes; ours skips the MLM head's unmasked rows and the captions' padding).
# Then the CLIP step with patch dropout 0.5 against 0.0 (ViT-B/16, 224 px; goal: ratio >= 1.6).
# Goals: BERT-Base MFU >= 45% on H100/H200, ratio >= 2 vs transformers, >= 1.1 vs open_clip.
# Usage: bash benchmarks/gpu.sh [extra args for benchmarks/gpu_throughput.py, e.g. --batch 128 --clip-batch 128]
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
timeout 560 python benchmarks/gpu_throughput.py --model both --modes eager,compiled "$@"
timeout 90 python benchmarks/patch_dropout.py --vit-b --device cuda --steps 10 --warmup 3
