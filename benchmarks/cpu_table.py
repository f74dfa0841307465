"""Condensed vs dense F.linear vs torch.sparse CSR on the CPU, ViT-B/16 MLP shapes.

    python benchmarks/cpu_table.py [--rounds 40] [--threads 1 2] [--batch 1 16 256]

Every method runs once per round in a shuffled order (interleaved, so drifting
clocks and a busy neighbour hit all methods alike); the table shows medians
over rounds and ratios taken from them. Prints a Markdown table.
"""

import argparse
import platform
import random
import statistics
import time
import warnings

import torch

import condensed_ops
from common import methods, random_condensed_layer

SHAPES = [(768, 3072), (3072, 768)]  # (in_features, out_features) of the ViT-B/16 MLP


def time_interleaved(calls, x, rounds, min_seconds=2e-4):
    """Median seconds per call for each method; fast calls repeat within a sample."""
    for call in calls.values():  # warm caches, pages and the thread pool
        for _ in range(3):
            call(x)
    repeats = {}
    for name, call in calls.items():
        start = time.perf_counter()
        call(x)
        repeats[name] = max(1, int(min_seconds / max(time.perf_counter() - start, 1e-9)))
    samples = {name: [] for name in calls}
    order = list(calls)
    for _ in range(rounds):
        random.shuffle(order)
        for name in order:
            start = time.perf_counter()
            for _ in range(repeats[name]):
                calls[name](x)
            samples[name].append((time.perf_counter() - start) / repeats[name])
    return {name: statistics.median(s) for name, s in samples.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16, 256])
    parser.add_argument("--sparsity", type=float, nargs="+", default=[0.9, 0.95])
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message=".*Sparse CSR tensor support is in beta.*")

    print(f"condensed_ops {condensed_ops.__version__}, torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"kernels: {condensed_ops._C.cpu_capabilities()['active_isa']}")
    print()
    print("| in→out | sparsity | batch | threads | condensed µs | dense µs | CSR µs | vs dense | vs CSR |")
    print("|---|---|---|---|---|---|---|---|---|")
    for in_features, out_features in SHAPES:
        for sparsity in args.sparsity:
            values, idx = random_condensed_layer(out_features, in_features, sparsity)
            calls = methods(values, idx, in_features)
            for batch in args.batch:
                x = torch.randn(batch, in_features)
                for threads in args.threads:
                    torch.set_num_threads(threads)
                    t = time_interleaved(calls, x, args.rounds)
                    print(f"| {in_features}→{out_features} | {sparsity:.0%} | {batch} | {threads} | "
                          f"{t['condensed'] * 1e6:.1f} | {t['dense'] * 1e6:.1f} | {t['csr'] * 1e6:.1f} | "
                          f"{t['dense'] / t['condensed']:.2f}× | {t['csr'] / t['condensed']:.2f}× |", flush=True)


if __name__ == "__main__":
    main()
