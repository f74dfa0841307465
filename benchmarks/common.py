"""Shared pieces of the benchmarks: the constant fan-in layers they time and the
methods they compare, so the table script and the pytest-benchmark suite time
exactly the same calls."""

from typing import Callable, Dict

import torch
import torch.nn.functional as F

import condensed_ops


def random_condensed_layer(out_features: int, in_features: int, sparsity: float, dtype=torch.float32, seed: int = 0):
    """values/idx of a random constant fan-in layer (fan_in = round((1 - sparsity) * in))."""
    g = torch.Generator().manual_seed(seed)
    fan_in = max(1, round((1.0 - sparsity) * in_features))
    scores = torch.rand(out_features, in_features, generator=g)
    idx = scores.topk(fan_in, dim=1).indices.sort(dim=1).values
    values = torch.randn(out_features, fan_in, generator=g, dtype=torch.float32).to(dtype)
    return values, idx.to(condensed_ops.layout.default_index_dtype(in_features))


def methods(values: torch.Tensor, idx: torch.Tensor, in_features: int) -> Dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """The same layer three ways: condensed, dense F.linear, F.linear with a CSR weight."""
    dense = condensed_ops.to_dense(values, idx, in_features)
    csr = dense.to_sparse_csr()
    return {
        "condensed": lambda x: condensed_ops.condensed_linear(x, values, idx),
        "dense": lambda x: F.linear(x, dense),
        "csr": lambda x: F.linear(x, csr),
    }
