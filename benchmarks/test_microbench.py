"""pytest-benchmark microbenchmarks: `pytest benchmarks --benchmark-only`.

One 768→3072, 90%-sparse float32 layer; every method of `python -m condensed_ops.bench`
at a few batch sizes, grouped so pytest-benchmark prints them side by side. (The
sweep, with interleaved rounds, ratios and the roofline, is the CLI.)
"""

import pytest
import torch

from condensed_ops.bench.methods import available_methods, layer_methods, random_layer

IN_FEATURES, OUT_FEATURES, SPARSITY = 768, 3072, 0.9
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="module")
def layer():
    return random_layer(IN_FEATURES, OUT_FEATURES, SPARSITY, device=DEVICE)


@pytest.mark.parametrize("batch", [1, 16, 256])
@pytest.mark.parametrize("method", available_methods(DEVICE))
def test_linear(benchmark, layer, method, batch):
    benchmark.group = f"{IN_FEATURES}->{OUT_FEATURES} {SPARSITY:.0%} batch {batch}"
    (bound,) = layer_methods(layer, batch, [method])
    if bound.call is None:
        pytest.skip(bound.unavailable)
    if DEVICE.type == "cuda":
        benchmark(lambda: (bound.call(), torch.cuda.synchronize()))
    else:
        benchmark(bound.call)
