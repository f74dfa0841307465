"""Shared test machinery: CPU kernel paths, the one sample-input generator, the
float64 dense reference and per-dtype tolerances."""

import contextlib
import zlib
from dataclasses import dataclass
from typing import Iterator, NamedTuple, Optional, Tuple

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import condensed_ops
from condensed_ops import to_dense

VALUE_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int16, torch.int32, torch.int64)


def pytest_configure(config):
    # torch 2.13 deprecates TorchScript; the tests still check that it works.
    for line in (
        r"ignore:.*torch\.jit.*deprecated:DeprecationWarning",
        r"ignore:.*TorchScript.*deprecated:DeprecationWarning",
        r"ignore:.*torch\.jit.*deprecated:FutureWarning",
    ):
        config.addinivalue_line("filterwarnings", line)
    config.addinivalue_line("markers", "slow(reason): left out of the quick tier (--quick)")
    config.addinivalue_line("markers", "full_product: a kernel-path combination beyond pairwise coverage (left out by --quick)")


# ---- tiers: the whole suite, and --quick --------------------------------------
#
# `pytest tests` runs everything (CI). `pytest tests --quick` is the tier to run
# while working: it leaves out the tests marked slow (compilers, subprocesses,
# the CUDA emulator, end-to-end runs) and, for tests run under every CPU kernel
# path, the items beyond pairwise coverage (marked full_product): every pair of
# parameter values (kernel path x dtype, kernel path x index dtype, dtype x
# shape ...) still meets in some item.

# Whole files of slow tests, by what dominates them.
_SLOW_FILES = {
    "test_cuda_emulated.py": "compiles the CUDA kernels for the CPU emulator and mutants of them",
    "test_examples.py": "runs the examples end to end",
    "test_accuracy_script.py": "trains small models",
    "test_bench_vit.py": "times a ViT encoder",
}


# Single slow tests, by name (any parametrization): subprocesses, compilers, exporters, the fuzz.
_SLOW_TESTS = {
    "test_readme_command_runs": "runs the README's commands",
    "test_two_gloo_processes_keep_identical_condensed_and_srigl_models": "starts two processes",
    "test_cli_json_plot_and_report": "runs the benchmark command line",
    "test_onnx_export_runs_in_onnxruntime": "exports to ONNX",
    "test_loaded_script_model_trains_without_the_package": "starts a process",
    "test_compile_fullgraph_forward_backward": "inductor compiles",
    "test_compile_forward_and_backward": "inductor compiles",
    "test_fuzz_every_route": "20 s of fuzzing",
    "test_compiled_condensed_model_has_the_dense_models_graphs": "traces whole models with dynamo",
    "test_cli_times_whole_models": "times whole models",
}


# Without a CUDA device the CUDA tests are not collected at all (thousands of
# parametrized items would only skip); the summary says so.
_CUDA_FILES = ["test_cuda.py"]
collect_ignore = [] if torch.cuda.is_available() else list(_CUDA_FILES)


def pytest_addoption(parser):
    parser.addoption(
        "--quick", action="store_true",
        help="the quick tier: leave out tests marked slow and kernel-path combinations beyond pairwise coverage",
    )


def _pairwise_cover(items) -> set:
    """Indices of a subset of ``items`` (one test function's parametrizations) in
    which every pair of parameter values that occurs together occurs at least once.
    Greedy, in collection order."""
    covered, kept = set(), set()
    for i, item in enumerate(items):
        values = sorted((name, repr(value)) for name, value in item.callspec.params.items())
        pairs = {(a, b) for j, a in enumerate(values) for b in values[j + 1:]}
        if not pairs <= covered:
            covered |= pairs
            kept.add(i)
    return kept


def pytest_collection_modifyitems(config, items):
    by_function = {}
    for item in items:
        reason = _SLOW_FILES.get(item.path.name) or _SLOW_TESTS.get(item.originalname)
        if reason is not None:
            item.add_marker(pytest.mark.slow(reason=reason))
        callspec = getattr(item, "callspec", None)
        if callspec is not None and "kernel_path" in callspec.params and len(callspec.params) > 2:
            by_function.setdefault((item.path, item.originalname), []).append(item)
    for group in by_function.values():
        kept = _pairwise_cover(group)
        for i, item in enumerate(group):
            if i not in kept:
                item.add_marker(pytest.mark.full_product)
    if config.getoption("--quick"):
        left_out = [item for item in items if item.get_closest_marker("slow") or item.get_closest_marker("full_product")]
        if left_out:
            config.hook.pytest_deselected(items=left_out)
            items[:] = [item for item in items if not (item.get_closest_marker("slow") or item.get_closest_marker("full_product"))]


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Say which compiled SIMD flavours no op of this run executed (the extension
    counts the ops each flavour ran), and why."""
    if config.option.collectonly:
        return
    if collect_ignore:
        terminalreporter.write_line(f"condensed_ops: no CUDA device, so {', '.join(collect_ignore)} was not collected", yellow=True)
    runs = condensed_ops._C._kernel_runs()
    for isa in SIMD_ISAS:
        if not _CAPABILITIES.get(f"{isa}_compiled", False) or runs.get(isa, 0) > 0:
            continue
        why = "this CPU cannot run it" if isa in UNSUPPORTED_ISAS else "no selected test ran it"
        terminalreporter.write_line(f"condensed_ops: the {isa} CPU kernels were compiled but not tested ({why})", yellow=True)


# ---- CPU kernel paths ---------------------------------------------------------

_CAPABILITIES = condensed_ops._C.cpu_capabilities()
SMALL_BATCH_MAX = int(_CAPABILITIES["small_batch_max"])
# SIMD flavours, narrowest first; a build that does not know one reports no key for it.
SIMD_ISAS = ("avx2", "avx512")
SUPPORTED_ISAS = ["portable"] + [isa for isa in SIMD_ISAS if _CAPABILITIES.get(f"{isa}_supported", False)]
UNSUPPORTED_ISAS = [isa for isa in SIMD_ISAS if isa not in SUPPORTED_ISAS]
WIDEST_ISA = SUPPORTED_ISAS[-1]  # what "auto" should run
ROW_STRATEGIES = ("gather", "scalar", "tiled")

# (isa, strategy): every forced flavour this CPU can run, plus the automatic
# choice. The portable flavour has no gather.
KERNEL_PATHS = [("auto", "auto")] + [
    (isa, strategy) for isa in SUPPORTED_ISAS for strategy in ROW_STRATEGIES if (isa, strategy) != ("portable", "gather")
]
FORCED_KERNEL_PATHS = [path for path in KERNEL_PATHS if path != ("auto", "auto")]


def kernel_path_id(path: Tuple[str, str]) -> str:
    return "auto" if path == ("auto", "auto") else f"{path[0]}-{path[1]}"


def set_kernel_options(**options: str) -> None:
    for name, value in options.items():
        condensed_ops._C._set_kernel_option(name, value)


def reset_kernel_options() -> None:
    set_kernel_options(**{name: "auto" for name in condensed_ops._C._kernel_options()})



# The SIMD flavours some test forced or ran by "auto": the summary names compiled ones left out.
def cpu_kernel(isa: str, strategy: str = "auto") -> contextlib.AbstractContextManager:
    """Force a CPU kernel path for the duration of the block."""
    return condensed_ops.kernel_options(cpu_isa=isa, cpu_strategy=strategy)


@pytest.fixture(params=KERNEL_PATHS, ids=kernel_path_id)
def kernel_path(request):
    """Runs the test once under each CPU kernel path; yields (isa, strategy)."""
    with cpu_kernel(*request.param):
        yield request.param


@pytest.fixture(autouse=True)
def _restore_cpu_kernel_and_threads():
    # A test that fails half-way must not leave a forced path or thread count behind.
    threads = torch.get_num_threads()
    yield
    reset_kernel_options()
    torch.set_num_threads(threads)


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# ---- sample inputs ------------------------------------------------------------


@dataclass(frozen=True)
class SampleSpec:
    """A shape and memory layout for one condensed_linear call."""

    name: str
    batch_shape: Tuple[int, ...]
    in_features: int
    out_features: int
    fan_in: int
    bias: bool = True
    # "contiguous" | "transposed" (inner stride != 1) | "strided_rows" (inner
    # stride 1, rows further apart than in_features) | "strided_cols" (inner
    # stride 2) | "expanded" (stride-0 batch dims)
    x_layout: str = "contiguous"
    # "contiguous" | "strided" (values and idx are column slices / column-major)
    weight_layout: str = "contiguous"
    # Rows draw their columns with replacement and contain a repeat for sure.
    repeated_idx: bool = False

    @property
    def id(self) -> str:
        return self.name


def _batch_specs():
    # Around the small-batch/tiled crossover and every tile width (8, 16, 32
    # rows, and a partial last tile); out=13 leaves a tail after the blocks of
    # outputs and a partial 16-row window block, fan_in=19 a tail after the
    # 8-wide vectors.
    return [SampleSpec(f"batch{b}", (b,), 40, 13, 19) for b in (1, 2, 3, 4, 5, 8, 9, 15, 16, 17, 31, 33, 40, 257)]


SAMPLE_SPECS = [
    SampleSpec("x_1d", (), 33, 9, 5),
    SampleSpec("in1_k1", (3,), 1, 4, 1),
    SampleSpec("in7", (5,), 7, 6, 3),
    SampleSpec("in33", (17,), 33, 10, 8),
    SampleSpec("in100", (20,), 100, 12, 17),
    SampleSpec("k1", (4,), 64, 8, 1),
    SampleSpec("k1_big_batch", (18,), 64, 8, 1),
    SampleSpec("k_equals_in", (6,), 24, 8, 24),
    SampleSpec("k_equals_in_big_batch", (21,), 24, 8, 24),
    SampleSpec("repeated_idx", (3,), 10, 7, 12, repeated_idx=True),
    SampleSpec("repeated_idx_big_batch", (19,), 10, 7, 12, repeated_idx=True),
    SampleSpec("out1", (3,), 20, 1, 4),
    SampleSpec("out1_big_batch", (40,), 20, 1, 4),
    SampleSpec("batch0", (0,), 16, 8, 4),
    *_batch_specs(),
    SampleSpec("x_3d", (2, 9), 30, 11, 6),
    SampleSpec("x_4d", (2, 3, 4), 30, 11, 6),
    SampleSpec("x_3d_zero_leading", (0, 5), 16, 8, 4),
    SampleSpec("x_4d_zero_middle", (3, 0, 2), 16, 8, 4),
    SampleSpec("fan_in0", (5,), 16, 6, 0),
    SampleSpec("out0", (5,), 16, 0, 4),
    SampleSpec("wide_out_chunks", (20,), 64, 130, 8),  # tiled splits outputs too
    SampleSpec("many_windows", (3,), 700, 40, 90),  # 11 windows of 63 columns, 3 of 255
    SampleSpec("x_transposed_small", (3,), 24, 10, 9, x_layout="transposed"),
    SampleSpec("x_transposed", (20,), 24, 10, 9, x_layout="transposed"),
    SampleSpec("x_transposed_3d", (3, 6), 24, 10, 9, x_layout="transposed"),
    SampleSpec("x_strided_rows_small", (3,), 24, 10, 9, x_layout="strided_rows"),
    SampleSpec("x_strided_rows", (20,), 24, 10, 9, x_layout="strided_rows"),
    SampleSpec("x_strided_cols", (20,), 24, 10, 9, x_layout="strided_cols"),
    SampleSpec("x_expanded_small", (3,), 24, 10, 9, x_layout="expanded"),
    SampleSpec("x_expanded", (20,), 24, 10, 9, x_layout="expanded"),
    SampleSpec("x_expanded_3d", (2, 17), 24, 10, 9, x_layout="expanded"),
    SampleSpec("weights_strided_small", (3,), 24, 10, 9, weight_layout="strided"),
    SampleSpec("weights_strided", (20,), 24, 10, 9, weight_layout="strided"),
]

# A handful of cheap, representative cases for the slow machinery (compile, script).
QUICK_SPEC_NAMES = ("batch3", "batch17", "x_4d", "x_transposed", "repeated_idx")
QUICK_SPECS = [spec for spec in SAMPLE_SPECS if spec.name in QUICK_SPEC_NAMES]
assert len(QUICK_SPECS) == len(QUICK_SPEC_NAMES)


class Sample(NamedTuple):
    name: str
    x: Tensor
    values: Tensor
    idx: Tensor
    bias: Optional[Tensor]

    @property
    def args(self):
        return (self.x, self.values, self.idx, self.bias)


def index_dtype_fits(index_dtype: torch.dtype, in_features: int) -> bool:
    return in_features - 1 <= torch.iinfo(index_dtype).max


def _generator(*parts) -> torch.Generator:
    # Deterministic per case (reproducible failures), different between cases.
    return torch.Generator().manual_seed(zlib.crc32(repr(parts).encode()))


def random_idx(out_features, in_features, fan_in, *, repeated=False, generator=None) -> Tensor:
    """int64 [out, fan_in]; distinct columns per row (random order) unless repeated."""
    if fan_in == 0 or out_features == 0:
        return torch.zeros(out_features, fan_in, dtype=torch.int64)
    if repeated or fan_in > in_features:
        idx = torch.randint(0, in_features, (out_features, fan_in), generator=generator)
        if fan_in > 1:
            idx[:, -1] = idx[:, 0]  # at least one repeat in every row
        return idx
    scores = torch.rand(out_features, in_features, generator=generator)
    return scores.argsort(dim=1)[:, :fan_in]


def make_sample(
    spec: SampleSpec,
    dtype: torch.dtype = torch.float32,
    index_dtype: torch.dtype = torch.int32,
    *,
    bias: Optional[bool] = None,
    device: str = "cpu",
    seed: int = 0,
) -> Sample:
    """Random unit-scale inputs for ``spec`` (bias: None keeps the spec's choice)."""
    g = _generator(spec, str(dtype), str(index_dtype), seed)
    with_bias = spec.bias if bias is None else bias
    *batch, in_features = (*spec.batch_shape, spec.in_features)
    out_features, fan_in = spec.out_features, spec.fan_in

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)

    full_shape = (*batch, in_features)
    if spec.x_layout == "contiguous":
        x = randn(*full_shape)
    elif spec.x_layout == "transposed":
        x = randn(*reversed(full_shape)).permute(*reversed(range(len(full_shape))))
    elif spec.x_layout == "strided_rows":
        x = randn(*batch[:-1], 2 * batch[-1], in_features + 5)[..., ::2, 3 : 3 + in_features]
    elif spec.x_layout == "strided_cols":
        x = randn(*batch, 2 * in_features)[..., ::2]
    elif spec.x_layout == "expanded":
        x = randn(in_features).expand(*full_shape)
    else:
        raise ValueError(spec.x_layout)
    assert x.shape == full_shape

    idx = random_idx(out_features, in_features, fan_in, repeated=spec.repeated_idx, generator=g)
    values = randn(out_features, fan_in)
    if spec.weight_layout == "strided":
        values = randn(out_features, 2 * fan_in)[:, 1::2]  # column slice: row stride 2 * fan_in
        idx = idx.t().contiguous().t()  # column-major
    elif spec.weight_layout != "contiguous":
        raise ValueError(spec.weight_layout)
    idx = idx.to(index_dtype)
    b = randn(out_features) if with_bias else None
    return Sample(spec.name, x.to(device), values.to(device), idx.to(device), None if b is None else b.to(device))


def sample_inputs(
    dtypes=(torch.float32,),
    index_dtypes=(torch.int32,),
    *,
    specs=SAMPLE_SPECS,
    biases=(True, False),
    device: str = "cpu",
) -> Iterator[Sample]:
    """The one source of condensed_linear cases: every spec x dtype x index dtype x bias."""
    for spec in specs:
        for dtype in dtypes:
            for index_dtype in index_dtypes:
                if not index_dtype_fits(index_dtype, spec.in_features):
                    continue
                for with_bias in biases:
                    sample = make_sample(spec, dtype, index_dtype, bias=with_bias, device=device)
                    name = f"{spec.name}-{str(dtype)[6:]}-{str(index_dtype)[6:]}-{'bias' if with_bias else 'nobias'}"
                    yield sample._replace(name=name)


# ---- reference and tolerances -------------------------------------------------


def reference_condensed_linear(x: Tensor, values: Tensor, idx: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """float64 dense reference: scatter (values, idx) into a dense weight, then F.linear.
    Grouped values ``[groups, group_size, fan_in]`` read their group's idx row."""
    if values.dim() == 3:
        idx = idx.repeat_interleave(values.shape[1], dim=0)
        values = values.reshape(-1, values.shape[2])
    weight = to_dense(values.to(torch.float64), idx, x.shape[-1])
    return F.linear(x.to(torch.float64), weight, None if bias is None else bias.to(torch.float64))


# rtol: rounding the result to its dtype (16-bit: about one unit in the last
# place) -- the float32 figure is the project's standard.
# atol_per_term: accumulator error per summed product of unit-scale inputs
# (float32 for the 16-bit types and float32, float64 for float64), which
# dominates when a sum cancels to near zero.
_TOLERANCES = {
    torch.float64: (1e-12, 1e-13),
    torch.float32: (1e-4, 1e-6),
    torch.float16: (1e-3, 1e-5),
    torch.bfloat16: (8e-3, 1e-5),
}


def tolerances(dtype: torch.dtype, fan_in: int) -> dict:
    rtol, atol_per_term = _TOLERANCES[dtype]
    return dict(rtol=rtol, atol=atol_per_term * max(fan_in, 1))


def assert_matches_reference(actual: Tensor, x: Tensor, values: Tensor, idx: Tensor, bias: Optional[Tensor] = None):
    expected = reference_condensed_linear(x, values, idx, bias)
    assert actual.dtype == x.dtype, f"output dtype {actual.dtype}, expected x's {x.dtype}"
    assert actual.shape == expected.shape, f"output shape {tuple(actual.shape)}, expected {tuple(expected.shape)}"
    assert actual.device == x.device
    torch.testing.assert_close(actual.to(torch.float64), expected, **tolerances(x.dtype, values.shape[-1]))
