#!/usr/bin/env bash
# Regenerates the README's CPU results: the forward sweep, forward + backward,
# ViT-B/16 end to end, then the Markdown section and figures from their JSON.
# About 30 minutes on the 2-vCPU dev VM; run it on a quiet machine.
set -euo pipefail
cd "$(dirname "$0")/.."
out=benchmarks/results
mkdir -p "$out"
python -m condensed_ops.bench --json "$out/cpu_forward.json"
python -m condensed_ops.bench --training --sparsity 0.9 0.95 --batch 16 256 1024 --json "$out/cpu_training.json"
python -m condensed_ops.bench --no-sweep --vit --vit-attention --json "$out/cpu_vit.json"
python -m condensed_ops.bench.report "$out/cpu_forward.json" "$out/cpu_training.json" "$out/cpu_vit.json" \
  --readme README.md --figures docs/figures
