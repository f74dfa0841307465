"""CUDA kernels: float64 references for every value and index dtype, awkward
shapes that reach every launch plan, outputs poisoned with NaN, gradients
against the CPU kernels, determinism, bad indices, CUDA graphs and opcheck.

Skipped without a CUDA device. Paths are forced through the kernel options
(kernel_options.h): cuda_x (auto | shared | global: where the kernels read x
from) and cuda_grad_input (auto | scatter | columns).
"""

import contextlib
import math
import zlib

import pytest
import torch

import condensed_ops
from conftest import (
    INDEX_DTYPES,
    QUICK_SPECS,
    SAMPLE_SPECS,
    VALUE_DTYPES,
    SampleSpec,
    assert_matches_reference,
    index_dtype_fits,
    make_sample,
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

DEVICE = "cuda"
grad_input_op = torch.ops.condensed_ops.condensed_linear_grad_input
grad_values_op = torch.ops.condensed_ops.condensed_linear_grad_values

# Shapes that steer the planners: many batch slabs (gridDim.y > 1, partial sums
# in grad_values), x rows too long for shared memory (the L1 path), rows longer
# than a warp's packs, many short rows, and odd sizes everywhere.
CUDA_SPECS = [
    SampleSpec("cuda_batch1000", (1000,), 300, 70, 37),
    SampleSpec("cuda_batch9_in30000", (9,), 30000, 12, 50),
    SampleSpec("cuda_long_rows", (3,), 5000, 9, 3001),
    SampleSpec("cuda_many_rows", (2,), 64, 5000, 7),
    SampleSpec("cuda_k1_batch64", (64,), 100, 33, 1),
    SampleSpec("cuda_3d_batch", (7, 13), 129, 65, 10),
    SampleSpec("cuda_repeated_batch17", (17,), 48, 31, 9, repeated_idx=True),
    SampleSpec("cuda_batch40_out1", (40,), 77, 1, 30),
]
ALL_SPECS = SAMPLE_SPECS + CUDA_SPECS
_QUICK_CUDA_SPECS = [s for s in CUDA_SPECS if s.name in ("cuda_batch1000", "cuda_batch9_in30000", "cuda_3d_batch")]
DTYPE_SPECS = QUICK_SPECS + _QUICK_CUDA_SPECS

# Gradient sums run over the batch (grad_values) or a column's outputs (grad_x).
GRAD_TOLERANCES = {
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float32: dict(rtol=1e-4, atol=1e-4),
    torch.bfloat16: dict(rtol=4e-2, atol=4e-2),
    torch.float16: dict(rtol=5e-3, atol=5e-3),
}


@pytest.fixture(params=["auto", "shared", "global"])
def x_path(request, monkeypatch):
    condensed_ops._C._set_kernel_option("cuda_x", request.param)
    return request.param


@pytest.fixture(params=["auto", "scatter", "columns"])
def grad_input_path(request, monkeypatch):
    condensed_ops._C._set_kernel_option("cuda_grad_input", request.param)
    return request.param


@pytest.fixture
def deterministic():
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before)


@pytest.fixture(autouse=True)
def no_unplanned_bad_index_report():
    """After every test: no kernel may have met a bad index the test did not plant.

    The glue raises such a report on the next call on the device; a probe call
    takes it, so that one failure does not spill into the following tests.
    """
    yield
    torch.cuda.synchronize()
    try:
        condensed_ops.condensed_linear(torch.ones(1, 2, device=DEVICE), torch.ones(1, 1, device=DEVICE),
                                       torch.zeros(1, 1, dtype=torch.int32, device=DEVICE))
    except IndexError as e:
        pytest.fail(f"a kernel met an out-of-range index that this test did not plant: {e}")


@contextlib.contextmanager
def poisoned_allocations(*outputs):
    """Makes the next allocations of these (numel, dtype) sizes land on blocks full of NaN.

    The caching allocator hands a request the smallest free block that fits;
    blocks of exactly the output's size, freed between live spacers (so they
    cannot merge), are that block. An output element a kernel never writes then
    reads NaN and fails the comparison.
    """
    spacers, poison = [], []
    for numel, dtype in outputs:
        if numel == 0:
            continue
        for _ in range(16):
            poison.append(torch.full((numel,), float("nan"), dtype=dtype, device=DEVICE))
            spacers.append(torch.empty(numel, dtype=dtype, device=DEVICE))
    poison.clear()
    try:
        yield
    finally:
        spacers.clear()


def cuda_sample(spec, dtype, index_dtype, with_bias=True, seed=0):
    return make_sample(spec, dtype, index_dtype, bias=with_bias, device=DEVICE, seed=seed)


def rotating_index_dtype(spec, dtype):
    """One index dtype per case, rotating so every spec meets each over the dtypes."""
    fitting = [d for d in INDEX_DTYPES if index_dtype_fits(d, spec.in_features)]
    return fitting[zlib.crc32(f"{spec.name}{dtype}".encode()) % len(fitting)]


def forward_and_check(x, values, idx, bias):
    before = [t.clone() for t in (x, values, idx, bias) if t is not None]
    out_shape = (*x.shape[:-1], values.shape[0])
    with poisoned_allocations((math.prod(out_shape), x.dtype)):
        y = condensed_ops.condensed_linear(x, values, idx, bias)
    for old, new in zip(before, [t for t in (x, values, idx, bias) if t is not None]):
        assert torch.equal(old, new), "condensed_linear modified an input"
    assert y.device == x.device and y.is_contiguous() and y.shape == out_shape
    assert_matches_reference(y, x, values, idx, bias)
    return y


def test_extension_was_built_with_cuda():
    assert condensed_ops._C.with_cuda, "torch sees a GPU but the extension was built without CUDA kernels"


# ---- forward against the float64 reference -------------------------------------------


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dtype", VALUE_DTYPES, ids=str)
@pytest.mark.parametrize("spec", ALL_SPECS, ids=lambda s: s.id)
def test_forward_matches_reference(spec, dtype, with_bias, x_path):
    forward_and_check(*cuda_sample(spec, dtype, rotating_index_dtype(spec, dtype), with_bias).args)


@pytest.mark.parametrize("index_dtype", INDEX_DTYPES, ids=str)
@pytest.mark.parametrize("dtype", VALUE_DTYPES, ids=str)
@pytest.mark.parametrize("spec", DTYPE_SPECS, ids=lambda s: s.id)
def test_every_dtype_and_index_dtype(spec, dtype, index_dtype, x_path):
    if not index_dtype_fits(index_dtype, spec.in_features):
        pytest.skip("indices do not fit")
    forward_and_check(*cuda_sample(spec, dtype, index_dtype).args)


@pytest.mark.parametrize("batch", [1, 2, 3, 5, 8, 9, 16, 17, 31, 33, 100, 257])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_every_batch_tile(batch, dtype, x_path):
    # Tiles of 1, 2, 4, 8 and 16 rows, full and with padding rows.
    spec = SampleSpec(f"batch{batch}", (batch,), 96, 37, 19)
    forward_and_check(*cuda_sample(spec, dtype, torch.int16).args)


# The forward variants benchmarks/cuda_sweep.py times: every one must be right.
FORWARD_VARIANTS = [(lanes, packs, splits) for lanes in ("1", "4", "32") for packs in ("2", "4")
                    for splits in ("1", "2", "8")]


@pytest.mark.parametrize("lanes,packs,splits", FORWARD_VARIANTS, ids="-".join)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("spec", [SampleSpec("b1_long", (1,), 3000, 6, 1201), SampleSpec("b5", (5,), 100, 40, 19),
                                  SampleSpec("b3_short", (3,), 37, 29, 3)], ids=lambda s: s.id)
def test_every_forward_variant_matches_reference(spec, dtype, lanes, packs, splits, x_path):
    with condensed_ops.kernel_options(cuda_lanes_per_row=lanes, cuda_packs_in_flight=packs, cuda_splits=splits):
        forward_and_check(*cuda_sample(spec, dtype, torch.int16).args)


@pytest.mark.parametrize("dtype", VALUE_DTYPES, ids=str)
def test_unaligned_weights_are_copied_not_misread(dtype):
    # Contiguous views whose data starts 1 element into their storage: the
    # 16-byte loads need aligned bases.
    spec = SampleSpec("unaligned", (5,), 50, 11, 13)
    x, values, idx, bias = cuda_sample(spec, dtype, torch.int16).args
    values_storage = torch.empty(values.numel() + 1, dtype=dtype, device=DEVICE)
    values_storage[1:].copy_(values.flatten())
    idx_storage = torch.empty(idx.numel() + 1, dtype=idx.dtype, device=DEVICE)
    idx_storage[1:].copy_(idx.flatten())
    forward_and_check(x, values_storage[1:].view_as(values), idx_storage[1:].view_as(idx), bias)


def test_runs_on_the_current_stream():
    x, values, idx, bias = cuda_sample(QUICK_SPECS[1], torch.float32, torch.int32).args
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        y = condensed_ops.condensed_linear(x, values, idx, bias)
    torch.cuda.current_stream().wait_stream(stream)
    assert_matches_reference(y, x, values, idx, bias)


def test_inference_mode():
    x, values, idx, bias = cuda_sample(QUICK_SPECS[0], torch.float32, torch.int16).args
    with torch.inference_mode():
        fresh_idx = idx.clone()  # an inference tensor: no version counter to cache on
        for _ in range(2):
            assert_matches_reference(condensed_ops.condensed_linear(x, values, fresh_idx, bias), x, values, idx, bias)


def test_mixed_devices_raise():
    x, values, idx, bias = cuda_sample(QUICK_SPECS[0], torch.float32, torch.int32).args
    with pytest.raises(ValueError, match="idx must be on x's device"):
        condensed_ops.condensed_linear(x, values, idx.cpu(), bias)


# ---- backward ----------------------------------------------------------------------


def dense_reference_gradients(x, values, idx, grad_y):
    """grad_x and grad_values of the masked dense layer, float64."""
    weight = condensed_ops.to_dense(values.double(), idx, x.shape[-1])
    grad_x = grad_y.double() @ weight
    batch = math.prod(x.shape[:-1])
    grad_dense = grad_y.double().reshape(batch, values.shape[0]).t() @ x.double().reshape(batch, x.shape[-1])
    return grad_x, grad_dense.gather(1, idx.long())


def grad_tolerances(dtype, batch, out_features):
    scale = max(1, batch, out_features) ** 0.5
    return {key: value * scale for key, value in GRAD_TOLERANCES[dtype].items()}


@pytest.fixture(params=["shared", "global"])
def backward_x_path(request, monkeypatch):
    condensed_ops._C._set_kernel_option("cuda_x", request.param)
    return request.param


@pytest.mark.parametrize("grad_path", ["scatter", "columns"])
@pytest.mark.parametrize("dtype", VALUE_DTYPES, ids=str)
@pytest.mark.parametrize("spec", ALL_SPECS, ids=lambda s: s.id)
def test_backward_ops_match_reference(spec, dtype, grad_path, backward_x_path, monkeypatch):
    condensed_ops._C._set_kernel_option("cuda_grad_input", grad_path)
    x, values, idx, _ = cuda_sample(spec, dtype, rotating_index_dtype(spec, dtype)).args
    grad_y = torch.randn(*x.shape[:-1], values.shape[0], generator=torch.Generator().manual_seed(1),
                         dtype=torch.float64).to(dtype).to(DEVICE)
    with poisoned_allocations((x.numel(), dtype)):
        grad_x = grad_input_op(grad_y, values, idx, x.shape[-1])
    with poisoned_allocations((values.numel(), dtype)):
        grad_values = grad_values_op(grad_y, x, idx)
    want_x, want_values = dense_reference_gradients(x, values, idx, grad_y)
    batch = grad_y.numel() // max(1, values.shape[0])
    tol = grad_tolerances(dtype, batch, values.shape[0])
    assert grad_x.shape == x.shape and grad_x.dtype == dtype and grad_x.device == x.device
    assert grad_values.shape == values.shape and grad_values.dtype == dtype
    torch.testing.assert_close(grad_x.double(), want_x, **tol, msg=lambda m: f"grad_x: {m}")
    torch.testing.assert_close(grad_values.double(), want_values, **tol, msg=lambda m: f"grad_values: {m}")


@pytest.mark.parametrize("dtype", VALUE_DTYPES, ids=str)
@pytest.mark.parametrize("spec", DTYPE_SPECS, ids=lambda s: s.id)
def test_autograd_matches_cpu(spec, dtype, grad_input_path):
    sample = cuda_sample(spec, dtype, rotating_index_dtype(spec, dtype))
    grad_y = torch.randn(*sample.x.shape[:-1], sample.values.shape[0], generator=torch.Generator().manual_seed(2),
                         dtype=torch.float64).to(dtype)
    results = {}
    for device in ("cpu", DEVICE):
        leaves = [t.detach().to(device).requires_grad_() for t in (sample.x, sample.values, sample.bias)]
        y = condensed_ops.condensed_linear(leaves[0], leaves[1], sample.idx.to(device), leaves[2])
        y.backward(grad_y.to(device))
        results[device] = [y.detach().cpu()] + [leaf.grad.cpu() for leaf in leaves]
    batch = grad_y.numel() // max(1, sample.values.shape[0])
    tol = grad_tolerances(dtype, batch, sample.values.shape[0])
    for name, on_cpu, on_cuda in zip(("y", "grad_x", "grad_values", "grad_bias"), results["cpu"], results[DEVICE]):
        torch.testing.assert_close(on_cuda.double(), on_cpu.double(), **tol, msg=lambda m: f"{name}: {m}")


def test_gradcheck_float64():
    spec = SampleSpec("gradcheck", (3, 2), 12, 5, 4)
    x, values, idx, bias = (t.requires_grad_() if t.is_floating_point() else t
                            for t in cuda_sample(spec, torch.float64, torch.int32).args)
    assert torch.autograd.gradcheck(lambda a, b, c: condensed_ops.condensed_linear(a, b, idx, c), (x, values, bias))


@pytest.mark.parametrize("batch", [1, 4, 8, 40])
def test_deterministic_mode_is_bitwise_reproducible(batch, deterministic):
    spec = SampleSpec("det", (batch,), 300, 500, 60, repeated_idx=True)
    x, values, idx, bias = cuda_sample(spec, torch.float32, torch.int16).args
    grad_y = torch.randn(batch, 500, device=DEVICE)
    first = [condensed_ops.condensed_linear(x, values, idx, bias), grad_input_op(grad_y, values, idx, 300),
             grad_values_op(grad_y, x, idx)]
    for _ in range(3):
        again = [condensed_ops.condensed_linear(x, values, idx, bias), grad_input_op(grad_y, values, idx, 300),
                 grad_values_op(grad_y, x, idx)]
        for a, b in zip(first, again):
            assert torch.equal(a, b)


def test_forced_atomic_grad_input_refuses_deterministic_mode(deterministic, monkeypatch):
    condensed_ops._C._set_kernel_option("cuda_grad_input", "scatter")
    x, values, idx, _ = cuda_sample(QUICK_SPECS[0], torch.float32, torch.int32).args
    grad_y = torch.randn(*x.shape[:-1], values.shape[0], device=DEVICE)
    with pytest.raises(RuntimeError, match="deterministic"):
        grad_input_op(grad_y, values, idx, x.shape[-1])


def test_bad_kernel_option_is_refused():
    # The environment variables go through the same check (test_condensed_linear.py).
    with pytest.raises(ValueError, match="cuda_x"):
        condensed_ops._C._set_kernel_option("cuda_x", "texture")
    assert condensed_ops._C._kernel_options()["cuda_x"] == "auto"


# ---- bad indices ---------------------------------------------------------------------

IN_FEATURES = 40


def bad_index_values(index_dtype):
    info = torch.iinfo(index_dtype)
    bad = {-1, IN_FEATURES, IN_FEATURES + 1, info.min, info.max}
    if index_dtype == torch.int64:
        bad |= {2**32 + 1, -(2**32) + 1, 2**31}  # 1, 1 and INT32_MIN once truncated
    return sorted(bad)


BAD_INDEX_CASES = [(d, v) for d in INDEX_DTYPES for v in bad_index_values(d)]


def call_op(op, x, values, idx, bias, grad_y):
    if op == "forward":
        return condensed_ops.condensed_linear(x, values, idx, bias)
    if op == "grad_input":
        return grad_input_op(grad_y, values, idx, x.shape[-1])
    return grad_values_op(grad_y, x, idx)


def bad_index_args(batch, index_dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, IN_FEATURES, generator=g)
    values = torch.randn(13, 19, generator=g)
    idx = torch.randint(0, IN_FEATURES, (13, 19), generator=g).to(index_dtype)
    bias = torch.randn(13, generator=g)
    grad_y = torch.randn(batch, 13, generator=g)
    return [t.to(DEVICE) for t in (x, values, idx, bias, grad_y)]


@pytest.mark.parametrize("op", ["forward", "grad_input", "grad_values"])
@pytest.mark.parametrize("batch", [1, 20])
@pytest.mark.parametrize("index_dtype,bad_value", BAD_INDEX_CASES, ids=[f"{str(d)[6:]}={v}" for d, v in BAD_INDEX_CASES])
def test_bad_index_raises_before_any_kernel_runs(index_dtype, bad_value, batch, op):
    x, values, idx, bias, grad_y = bad_index_args(batch, index_dtype)
    idx[2, 7] = bad_value
    idx[5, 0] = -1  # a later bad entry: the message names the first one
    with pytest.raises(IndexError, match=rf"idx\[2, 7\] = {bad_value} is outside \[0, in_features={IN_FEATURES}\)"):
        call_op(op, x, values, idx, bias, grad_y)
    # Caught before launch: the device flag stays clear, the next call is fine.
    idx[2, 7] = 3
    idx[5, 0] = 4
    call_op(op, x, values, idx, bias, grad_y)
    torch.cuda.synchronize()
    call_op(op, x, values, idx, bias, grad_y)


def test_in_place_change_is_revalidated():
    x, values, idx, bias, _ = bad_index_args(3, torch.int32)
    condensed_ops.condensed_linear(x, values, idx, bias)  # validated and remembered
    idx[4, 4] = IN_FEATURES  # bumps the version counter
    with pytest.raises(IndexError, match=rf"idx\[4, 4\] = {IN_FEATURES} is outside"):
        condensed_ops.condensed_linear(x, values, idx, bias)


@pytest.mark.parametrize("op", ["forward", "grad_input", "grad_values"])
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES, ids=str)
@pytest.mark.parametrize("batch", [1, 20])
def test_kernels_skip_indices_they_were_not_told_about(index_dtype, batch, op, monkeypatch):
    # .data writes bypass the version counter, so the glue still trusts idx:
    # the kernels' own guard must skip the entries (reading nothing out of
    # bounds: the values are far outside x) and the next call must report it.
    if op == "grad_input":
        condensed_ops._C._set_kernel_option("cuda_grad_input", "columns" if batch > 1 else "scatter")
    x, values, idx, bias, grad_y = bad_index_args(batch, index_dtype, seed=3)
    call_op(op, x, values, idx, bias, grad_y)
    version = idx._version
    info = torch.iinfo(index_dtype)
    idx.data[2, 7] = info.max
    idx.data[9, 18] = info.min
    assert idx._version == version
    got = call_op(op, x, values, idx, bias, grad_y)
    torch.cuda.synchronize()
    # The same call with those two weights zeroed (and valid columns).
    values_ref, idx_ref = values.clone(), idx.clone()
    for r, c in ((2, 7), (9, 18)):
        values_ref[r, c] = 0
        idx_ref[r, c] = 0
    with pytest.raises(IndexError, match="an earlier call on cuda"):
        condensed_ops.condensed_linear(x, values, idx_ref, bias)
    want = call_op(op, x, values_ref, idx_ref, bias, grad_y)  # reported once: this call runs
    if op == "grad_values":
        want[2, 7] = want[9, 18] = 0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ---- CUDA graphs -----------------------------------------------------------------------


def capture(fn, warmup=True):
    """Captures fn() in a CUDA graph (after warm-up runs on a side stream, as torch advises)."""
    if warmup:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


@pytest.mark.parametrize("grad_path", ["scatter", "columns"])
@pytest.mark.parametrize("warmup", [True, False], ids=["warm", "cold"])
@pytest.mark.parametrize("spec", [QUICK_SPECS[0], CUDA_SPECS[0]], ids=lambda s: s.id)
def test_cuda_graph_capture_and_replay(spec, warmup, grad_path, monkeypatch):
    # Cold: the first call of a fresh idx happens inside the capture, where the
    # glue cannot validate it (no sync): the kernels' guard covers it.
    condensed_ops._C._set_kernel_option("cuda_grad_input", grad_path)
    x, values, idx, bias = cuda_sample(spec, torch.float32, torch.int64).args
    idx = idx.clone()
    static_x = x.clone()
    static_grad_y = torch.zeros(*x.shape[:-1], values.shape[0], device=DEVICE)

    def step():
        return (condensed_ops.condensed_linear(static_x, values, idx, bias),
                grad_input_op(static_grad_y, values, idx, x.shape[-1]),
                grad_values_op(static_grad_y, static_x, idx))

    graph, outs = capture(step, warmup)
    for trial in range(3):
        static_x.copy_(torch.randn_like(x))
        static_grad_y.copy_(torch.randn_like(static_grad_y))
        graph.replay()
        torch.cuda.synchronize()
        for got, want in zip(outs, step()):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_bad_index_in_a_captured_graph_is_reported_after_replay():
    x, values, idx, bias, _ = bad_index_args(4, torch.int16, seed=5)
    # An eager call first: the device's flag is created outside any capture.
    condensed_ops.condensed_linear(x, values, idx, bias)
    idx = idx.clone()
    idx[3, 3] = IN_FEATURES + 7  # never validated: the capture cannot sync to check it
    graph, y = capture(lambda: condensed_ops.condensed_linear(x, values, idx, bias), warmup=False)
    graph.replay()
    torch.cuda.synchronize()
    good = idx.clone()
    good[3, 3] = 0
    with pytest.raises(IndexError, match="an earlier call on cuda"):
        condensed_ops.condensed_linear(x, values, good, bias)
    values_ref = values.clone()
    values_ref[3, 3] = 0
    torch.testing.assert_close(y, condensed_ops.condensed_linear(x, values_ref, good, bias))


# ---- opcheck -----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("spec", QUICK_SPECS[:3], ids=lambda s: s.id)
def test_opcheck(spec, dtype):
    x, values, idx, bias = cuda_sample(spec, dtype, torch.int16).args
    torch.library.opcheck(torch.ops.condensed_ops.condensed_linear.default, (x, values, idx, bias))
    args = (x.requires_grad_(), values.requires_grad_(), idx, bias.requires_grad_())
    torch.library.opcheck(torch.ops.condensed_ops.condensed_linear.default, args)
    grad_y = torch.randn(*x.shape[:-1], values.shape[0], device=DEVICE, dtype=dtype)
    torch.library.opcheck(grad_input_op.default, (grad_y, values.detach(), idx, x.shape[-1]))
    torch.library.opcheck(grad_values_op.default, (grad_y, x.detach(), idx))


# ---- grouped layout: values [groups, group_size, fan_in], idx [groups, fan_in] -------------
#
# float16 / bfloat16 with a group size the tensor-core kernel takes (multiples
# of 8 up to 64) run grouped_forward.cu; everything else, and every backward,
# runs the per-row kernels on the expanded idx.

grouped_op = torch.ops.condensed_ops.condensed_linear_grouped

# (batch shape, in_features, groups, group_size, fan_in): batch tails of the
# 64- and 128-column tiles and of the 8-column copies, fan_in tails of the k16
# step and the 32-wide chunk, pipelines shorter than the ring, every kernel
# group size (m16 tiles half used at 8, 24, 40, 56) and fallback ones (3, 12).
GROUPED_SHAPES = [
    ((1,), 37, 1, 8, 11),
    ((3,), 50, 5, 16, 13),
    ((17,), 64, 2, 24, 40),
    ((130,), 100, 1, 32, 77),
    ((5,), 33, 5, 40, 1),
    ((17,), 200, 1, 48, 33),
    ((3,), 45, 1, 56, 16),
    ((70,), 90, 2, 64, 32),
    ((7, 13), 129, 3, 16, 50),
    ((300,), 4096, 4, 32, 410),
    ((9,), 30, 4, 3, 7),
    ((20,), 40, 2, 12, 9),
]


def grouped_cuda_sample(batch, in_features, groups, group_size, fan_in, dtype, index_dtype, bias=True, seed=0):
    g = torch.Generator().manual_seed(zlib.crc32(repr((batch, in_features, groups, group_size, fan_in, seed)).encode()))
    x = torch.randn(*batch, in_features, generator=g, dtype=torch.float64).to(dtype)
    values = torch.randn(groups, group_size, fan_in, generator=g, dtype=torch.float64).to(dtype)
    idx = torch.stack([torch.randperm(in_features, generator=g)[:fan_in] for _ in range(groups)]).to(index_dtype)
    b = torch.randn(groups * group_size, generator=g, dtype=torch.float64).to(dtype) if bias else None
    return [t.to(DEVICE) if t is not None else None for t in (x, values, idx, b)]


def grouped_forward_and_check(x, values, idx, bias):
    out_shape = (*x.shape[:-1], values.shape[0] * values.shape[1])
    with poisoned_allocations((math.prod(out_shape), x.dtype)):
        y = condensed_ops.condensed_linear(x, values, idx, bias)
    assert y.shape == out_shape and y.is_contiguous() and y.device == x.device
    assert_matches_reference(y, x, values, idx, bias)
    return y


@pytest.mark.parametrize("index_dtype", INDEX_DTYPES, ids=str)
@pytest.mark.parametrize("dtype", VALUE_DTYPES, ids=str)
@pytest.mark.parametrize("shape", GROUPED_SHAPES, ids=lambda s: "x".join(map(str, s[0])) + f"-{s[1]}-{s[2]}x{s[3]}x{s[4]}")
def test_grouped_forward_matches_reference(shape, dtype, index_dtype):
    if not index_dtype_fits(index_dtype, shape[1]):
        pytest.skip("indices do not fit")
    grouped_forward_and_check(*grouped_cuda_sample(*shape, dtype, index_dtype))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_grouped_forward_without_bias_and_with_strided_x(dtype):
    x, values, idx, _ = grouped_cuda_sample((33,), 80, 3, 32, 45, dtype, torch.int16)
    wide = torch.randn(33, 200, device=DEVICE).to(dtype)
    wide[:, 10:90] = x
    grouped_forward_and_check(wide[:, 10:90], values, idx, None)  # row stride 200
    grouped_forward_and_check(x[:1].expand(9, 80), values, idx, None)  # row stride 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_grouped_autograd_matches_dense(dtype):
    x, values, idx, bias = grouped_cuda_sample((21,), 60, 3, 16, 17, dtype, torch.int32)
    leaves = [t.detach().clone().requires_grad_() for t in (x, values, bias)]
    y = condensed_ops.condensed_linear(leaves[0], leaves[1], idx, leaves[2])
    grad_y = torch.randn_like(y)
    y.backward(grad_y)
    dense_leaves = [t.detach().double().requires_grad_() for t in (x, values, bias)]
    expanded = idx.long().repeat_interleave(16, 0)
    weight = torch.zeros(48, 60, dtype=torch.float64, device=DEVICE)
    weight = weight.scatter(1, expanded, dense_leaves[1].reshape(48, 17))
    (dense_leaves[0] @ weight.t() + dense_leaves[2]).backward(grad_y.double())
    tol = grad_tolerances(dtype, 21, 48)
    for name, got, want in zip(("grad_x", "grad_values", "grad_bias"), leaves, dense_leaves):
        torch.testing.assert_close(got.grad.double(), want.grad, **tol, msg=lambda m: f"{name}: {m}")


def test_grouped_gradcheck_float64():
    x, values, idx, bias = grouped_cuda_sample((3, 2), 12, 2, 3, 4, torch.float64, torch.int32)
    x, values, bias = (t.requires_grad_() for t in (x, values, bias))
    assert torch.autograd.gradcheck(lambda a, b, c: condensed_ops.condensed_linear(a, b, idx, c), (x, values, bias))


# Raises IndexError: benchmarks/device_check.sh runs these apart from the rest
# (a torch build that crashed when a C++ op raised IndexError would take the
# whole pytest run down with it).
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES, ids=str)
def test_grouped_bad_index_raises_naming_the_group_entry(index_dtype, dtype):
    x, values, idx, bias = grouped_cuda_sample((5,), IN_FEATURES, 4, 16, 9, dtype, index_dtype)
    idx[2, 7] = IN_FEATURES
    idx[3, 0] = -1
    with pytest.raises(IndexError, match=rf"idx\[2, 7\] = {IN_FEATURES} is outside \[0, in_features={IN_FEATURES}\)"):
        condensed_ops.condensed_linear(x, values, idx, bias)
    idx[2, 7] = 1
    idx[3, 0] = 2
    grouped_forward_and_check(x, values, idx, bias)


@pytest.mark.parametrize("index_dtype", INDEX_DTYPES, ids=str)
def test_grouped_kernel_skips_indices_it_was_not_told_about(index_dtype):
    x, values, idx, bias = grouped_cuda_sample((20,), IN_FEATURES, 4, 16, 9, torch.bfloat16, index_dtype, seed=3)
    condensed_ops.condensed_linear(x, values, idx, bias)  # validated and remembered
    info = torch.iinfo(index_dtype)
    idx.data[1, 4] = info.max
    idx.data[3, 8] = info.min
    got = condensed_ops.condensed_linear(x, values, idx, bias)
    torch.cuda.synchronize()
    values_ref, idx_ref = values.clone(), idx.clone()
    for gr, j in ((1, 4), (3, 8)):
        values_ref[gr, :, j] = 0
        idx_ref[gr, j] = 0
    with pytest.raises(IndexError, match="an earlier call on cuda"):
        condensed_ops.condensed_linear(x, values, idx_ref, bias)
    torch.testing.assert_close(got, condensed_ops.condensed_linear(x, values_ref, idx_ref, bias), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("warmup", [True, False], ids=["warm", "cold"])
def test_grouped_cuda_graph_capture_and_replay(warmup, dtype):
    x, values, idx, bias = grouped_cuda_sample((40,), 96, 6, 32, 20, dtype, torch.int64)
    idx = idx.clone()
    static_x = x.clone()
    graph, y = capture(lambda: condensed_ops.condensed_linear(static_x, values, idx, bias), warmup)
    for _ in range(3):
        static_x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(y, condensed_ops.condensed_linear(static_x, values, idx, bias), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_grouped_opcheck(dtype):
    x, values, idx, bias = grouped_cuda_sample((6,), 50, 3, 16, 11, dtype, torch.int16)
    torch.library.opcheck(grouped_op.default, (x, values, idx, bias))
    torch.library.opcheck(grouped_op.default, (x.requires_grad_(), values.requires_grad_(), idx, bias.requires_grad_()))
