"""pytest-benchmark microbenchmarks: `pytest benchmarks --benchmark-only`.

One 768→3072, 90%-sparse float32 layer; condensed, dense and CSR at a few
batch sizes, grouped so pytest-benchmark prints them side by side.
"""

import warnings

import pytest
import torch

from common import methods, random_condensed_layer

IN_FEATURES, OUT_FEATURES, SPARSITY = 768, 3072, 0.9


@pytest.fixture(scope="module")
def layer_methods():
    warnings.filterwarnings("ignore", message=".*Sparse CSR tensor support is in beta.*")
    values, idx = random_condensed_layer(OUT_FEATURES, IN_FEATURES, SPARSITY)
    return methods(values, idx, IN_FEATURES)


@pytest.mark.parametrize("batch", [1, 16, 256])
@pytest.mark.parametrize("method", ["condensed", "dense", "csr"])
def test_linear(benchmark, layer_methods, method, batch):
    benchmark.group = f"{IN_FEATURES}->{OUT_FEATURES} {SPARSITY:.0%} batch {batch}"
    x = torch.randn(batch, IN_FEATURES)
    benchmark(layer_methods[method], x)
