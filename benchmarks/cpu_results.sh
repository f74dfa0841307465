#!/usr/bin/env bash
# Regenerates the CPU results: the forward sweep, the 4096x14336 layer, 16-bit
# layers, every kernel path forced, forward + backward, ViT-B/16 end to end;
# then docs/results.md (every table, figures) and the README's summary.
# About an hour on a 2-vCPU VM; run it on a quiet machine.
set -euo pipefail
cd "$(dirname "$0")/.."
out=benchmarks/results
mkdir -p "$out"
bench="python -m condensed_ops.bench --threads 1 2 --no-progress"
$bench --json "$out/cpu_forward.json"
$bench --shapes 4096x14336 --sparsity 0.9 --batch 1 4 16 64 256 --methods condensed condensed_packed dense csr \
  --json "$out/cpu_forward_large.json"
$bench --shapes 768x3072 3072x768 4096x14336 --sparsity 0.9 --batch 1 16 256 --dtype float32 bfloat16 float16 \
  --methods condensed condensed_packed dense dense_fp32 --json "$out/cpu_16bit.json"
# Each kernel path forced (a CPU with slow gathers runs the gather-free ones).
paths=()
for isa in portable avx2 avx512; do
  for strategy in gather scalar tiled; do
    [[ $isa == portable && $strategy == gather ]] && continue
    json="$out/cpu_path_${isa}_${strategy}.json"
    if CONDENSED_OPS_CPU_ISA=$isa CONDENSED_OPS_CPU_STRATEGY=$strategy python -m condensed_ops.bench --threads 1 \
        --no-progress --shapes 768x3072 --sparsity 0.9 --batch 1 4 16 256 --methods condensed condensed_packed dense \
        --json "$json"; then
      paths+=("$json")
    fi
  done
done
$bench --training --sparsity 0.9 0.95 --batch 16 256 1024 --json "$out/cpu_training.json"
python -m condensed_ops.bench --no-sweep --vit --vit-attention --no-progress --json "$out/cpu_vit.json"
# The grouped layout against the row layout and dense, forward and forward + backward.
$bench --shapes 768x3072 4096x14336 --sparsity 0.9 --batch 1 16 256 --group 4 8 16 32 --methods condensed dense csr \
  --json "$out/cpu_grouped.json"
$bench --training --shapes 768x3072 3072x768 --sparsity 0.9 --batch 256 --group 8 16 --methods condensed dense \
  --json "$out/cpu_grouped_training.json"
python benchmarks/report.py "$out/cpu_forward.json" "$out/cpu_forward_large.json" "$out/cpu_16bit.json" \
  "${paths[@]}" "$out/cpu_training.json" "$out/cpu_vit.json" "$out/cpu_grouped.json" "$out/cpu_grouped_training.json" \
  --readme README.md --results-doc docs/results.md --figures docs/figures
