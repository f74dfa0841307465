"""Forward + backward through CondensedLinear vs nn.Linear (the training step's layer cost).

    python benchmarks/train_table.py [--rounds 30] [--threads 1 2] [--batch 256]

The dense layer is the masked one a sparse training run would otherwise use; the
condensed layer holds the same weights. One step = forward, then backward of a
fixed upstream gradient to x, the weights and the bias. Interleaved rounds,
medians, ratios of medians (see cpu_table.py).
"""

import argparse
import platform

import torch

import condensed_ops
from common import random_condensed_layer
from cpu_table import time_interleaved


def training_step(layer: torch.nn.Module, x: torch.Tensor, grad_y: torch.Tensor) -> None:
    layer.zero_grad(set_to_none=True)
    x.grad = None
    layer(x).backward(grad_y)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch", type=int, nargs="+", default=[256])
    parser.add_argument("--sparsity", type=float, nargs="+", default=[0.9])
    args = parser.parse_args()

    print(f"condensed_ops {condensed_ops.__version__}, torch {torch.__version__}, {platform.machine()}, "
          f"kernels: {condensed_ops._C.cpu_capabilities()['active_isa']}")
    print()
    print("| in→out | sparsity | batch | threads | condensed fwd+bwd ms | dense fwd+bwd ms | speed-up |")
    print("|---|---|---|---|---|---|---|")
    for in_features, out_features in [(768, 3072), (3072, 768)]:
        for sparsity in args.sparsity:
            values, idx = random_condensed_layer(out_features, in_features, sparsity)
            dense = torch.nn.Linear(in_features, out_features)
            with torch.no_grad():
                dense.weight.copy_(condensed_ops.to_dense(values, idx, in_features))
            condensed = condensed_ops.CondensedLinear.from_linear(dense)
            for batch in args.batch:
                x = torch.randn(batch, in_features, requires_grad=True)
                grad_y = torch.randn(batch, out_features)
                calls = {
                    "condensed": lambda x, layer=condensed: training_step(layer, x, grad_y),
                    "dense": lambda x, layer=dense: training_step(layer, x, grad_y),
                }
                for threads in args.threads:
                    torch.set_num_threads(threads)
                    t = time_interleaved(calls, x, args.rounds)
                    print(f"| {in_features}→{out_features} | {sparsity:.0%} | {batch} | {threads} | "
                          f"{t['condensed'] * 1e3:.2f} | {t['dense'] * 1e3:.2f} | {t['dense'] / t['condensed']:.2f}× |",
                          flush=True)


if __name__ == "__main__":
    main()
