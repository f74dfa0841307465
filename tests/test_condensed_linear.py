"""condensed_linear: results against the float64 dense reference under every CPU
kernel path, threads, opcheck, TorchScript and torch.compile."""

import importlib.metadata
import os
import pathlib
import platform
import re
import subprocess
import sys
import zlib
from typing import Optional

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor

import condensed_ops
from conftest import (
    FORCED_KERNEL_PATHS,
    SMALL_BATCH_MAX,
    INDEX_DTYPES,
    KERNEL_PATHS,
    QUICK_SPECS,
    SAMPLE_SPECS,
    SIMD_ISAS,
    VALUE_DTYPES,
    UNSUPPORTED_ISAS,
    WIDEST_ISA,
    SampleSpec,
    assert_matches_reference,
    cpu_kernel,
    kernel_path_id,
    make_sample,
    sample_inputs,
)


def run_and_check(sample_args):
    """Call the op, check it against the reference and that no input was touched."""
    x, values, idx, bias = sample_args
    before = [t.clone() for t in (x, values, idx, bias) if t is not None]
    y = condensed_ops.condensed_linear(x, values, idx, bias)
    after = [t for t in (x, values, idx, bias) if t is not None]
    for old, new in zip(before, after):
        assert torch.equal(old, new), "condensed_linear modified an input"
    assert y.is_contiguous()
    assert_matches_reference(y, x, values, idx, bias)
    return y


# ---- correctness against the reference ------------------------------------------


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("spec", SAMPLE_SPECS, ids=lambda s: s.id)
def test_matches_reference(spec, dtype, with_bias, kernel_path):
    index_dtype = torch.int16 if zlib.crc32(spec.name.encode()) % 2 else torch.int32
    sample = make_sample(spec, dtype, index_dtype, bias=with_bias)
    run_and_check(sample.args)


_DTYPE_SPECS = [s for s in SAMPLE_SPECS if s.name in ("batch1", "batch3", "batch17", "in7", "x_4d", "repeated_idx_big_batch", "x_transposed")]


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES, ids=str)
@pytest.mark.parametrize("dtype", VALUE_DTYPES, ids=str)
@pytest.mark.parametrize("spec", _DTYPE_SPECS, ids=lambda s: s.id)
def test_every_dtype_and_index_dtype(spec, dtype, index_dtype, with_bias, kernel_path):
    sample = make_sample(spec, dtype, index_dtype, bias=with_bias)
    run_and_check(sample.args)


@pytest.mark.parametrize("batch", [3, 17])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=str)
def test_in_features_beyond_int16(index_dtype, batch, kernel_path):
    spec = SampleSpec("in40000", (batch,), 40000, 6, 7)
    sample = make_sample(spec, torch.float32, index_dtype)
    idx = sample.idx.clone()
    idx[:, 0] = 39999  # the last column
    idx[1:, 1] = 32768  # first column int16 cannot name
    run_and_check((sample.x, sample.values, idx, sample.bias))


@pytest.mark.parametrize("batch", [3, 20])
@pytest.mark.parametrize("scale", ["unit", "subnormal"])
@pytest.mark.parametrize("dtype", VALUE_DTYPES, ids=str)
def test_integer_data_gives_the_correctly_rounded_result(dtype, scale, batch, kernel_path):
    # Small integers (times a power of two) make every product and partial sum
    # exact in the accumulator, so the only rounding left is the final one to
    # dtype, which must be round-to-nearest-even, bit for bit. With "subnormal"
    # the weights are subnormal in dtype (and the products, for float32/64):
    # flush-to-zero or a wrong 16-bit widening shows up here.
    subnormal_scale = {torch.float16: 2.0**-24, torch.bfloat16: 2.0**-133, torch.float32: 2.0**-140, torch.float64: 2.0**-1060}
    unit = 1.0 if scale == "unit" else subnormal_scale[dtype]
    in_features, out_features, fan_in = 37, 21, 128
    g = torch.Generator().manual_seed(1234 + batch)
    x_int = torch.randint(0, 17, (batch, in_features), generator=g)
    values_int = torch.randint(-16, 32, (out_features, fan_in), generator=g)
    bias_int = torch.randint(-256, 1, (out_features,), generator=g) * 8
    idx = torch.randint(0, in_features, (out_features, fan_in), generator=g)  # repeats too

    x = x_int.to(dtype)
    values = (values_int.to(torch.float64) * unit).to(dtype)
    bias = (bias_int.to(torch.float64) * unit).to(dtype)
    assert torch.equal(values.to(torch.float64) / unit, values_int.to(torch.float64)), "inputs must be exact"
    if scale == "subnormal":
        assert (values.abs() < torch.finfo(dtype).tiny).all() and (values != 0).any()

    exact = (x_int[:, idx] * values_int).sum(-1) + bias_int  # int64: no rounding at all
    expected = (exact.to(torch.float64) * unit).to(dtype)
    y = condensed_ops.condensed_linear(x, values, idx.to(torch.int32), bias)
    assert y.dtype == dtype
    torch.testing.assert_close(y, expected, rtol=0, atol=0)


@pytest.mark.parametrize("batch", [3, 20])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_16bit_sums_accumulate_in_float32(dtype, batch, kernel_path):
    # 4096 ones: a 16-bit running sum stalls at 2048 (float16) or 256 (bfloat16).
    x = torch.ones(batch, 3, dtype=dtype)
    values = torch.ones(5, 4096, dtype=dtype)
    idx = torch.full((5, 4096), 1, dtype=torch.int16)
    y = condensed_ops.condensed_linear(x, values, idx)
    torch.testing.assert_close(y, torch.full((batch, 5), 4096.0, dtype=dtype), rtol=0, atol=0)


@pytest.mark.parametrize("batch", [3, 20])
def test_float64_sums_accumulate_in_float64(batch, kernel_path):
    # 1 + 1000 * 2^-30 is exact in float64 whatever the order, not in float32.
    fan_in = 1001
    x = torch.ones(batch, 2, dtype=torch.float64)
    values = torch.full((3, fan_in), 2.0**-30, dtype=torch.float64)
    values[:, 0] = 1.0
    idx = torch.zeros(3, fan_in, dtype=torch.int32)
    y = condensed_ops.condensed_linear(x, values, idx)
    torch.testing.assert_close(y, torch.full((batch, 3), 1 + 1000 * 2.0**-30, dtype=torch.float64), rtol=0, atol=0)


@pytest.mark.parametrize("batch", [3, 20])
@pytest.mark.parametrize("dtype", VALUE_DTYPES, ids=str)
def test_nonfinite_x_reaches_only_the_outputs_that_read_it(dtype, batch, kernel_path):
    g = torch.Generator().manual_seed(7)
    in_features, out_features, fan_in = 20, 12, 4
    x = torch.randn(batch, in_features, generator=g).to(dtype)
    x[:, 5] = float("nan")
    x[:, 6] = float("inf")
    idx = torch.stack([torch.randperm(in_features, generator=g)[:fan_in] for _ in range(out_features)])
    idx = torch.where((idx == 5) | (idx == 6), 0, idx)
    idx[0, 1], idx[1, 2], idx[2, 0], idx[2, 3] = 5, 6, 5, 6  # nan; inf; both; the rest read neither
    values = torch.randn(out_features, fan_in, generator=g).to(dtype)
    y = condensed_ops.condensed_linear(x, values, idx.to(torch.int16))
    # A gather-and-sum reference: a dense matmul would spread NaN through the zeros.
    expected = (x.to(torch.float64)[:, idx] * values.to(torch.float64)).sum(-1)
    assert y[:, 0].isnan().all() and y[:, 1].isinf().all() and y[:, 2].isnan().all()
    assert y[:, 3:].isfinite().all()
    torch.testing.assert_close(y[:, 3:].to(torch.float64), expected[:, 3:], rtol=1e-2, atol=1e-2 * fan_in)
    assert torch.equal(y[:, 1].to(torch.float64), expected[:, 1])


def test_op_is_the_registered_dispatcher_op():
    sample = make_sample(SAMPLE_SPECS[0])
    assert torch.equal(
        condensed_ops.condensed_linear(*sample.args), torch.ops.condensed_ops.condensed_linear(*sample.args)
    )


def test_sample_layouts_are_what_they_claim():
    # Guards the generator itself: the non-contiguous cases must stay non-contiguous.
    for spec in SAMPLE_SPECS:
        sample = make_sample(spec)
        if spec.x_layout != "contiguous":
            assert not sample.x.is_contiguous(), spec.name
        if spec.x_layout == "strided_rows":
            assert sample.x.stride(-1) == 1 and sample.x.stride(-2) > spec.in_features, spec.name
        if spec.x_layout == "expanded":
            assert sample.x.stride(0) == 0, spec.name
        if spec.weight_layout != "contiguous":
            assert not sample.values.is_contiguous() and not sample.idx.is_contiguous(), spec.name
        if spec.repeated_idx:
            assert all(len(set(row.tolist())) < spec.fan_in for row in sample.idx), spec.name


# ---- random shapes (hypothesis) -------------------------------------------------


@settings(max_examples=50, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_shapes_match_reference(data):
    batch_shape = tuple(data.draw(st.lists(st.integers(0, 20), max_size=3), label="batch_shape"))
    in_features = data.draw(st.integers(1, 70), label="in_features")
    out_features = data.draw(st.integers(1, 40), label="out_features")
    fan_in = data.draw(st.integers(1, 2 * in_features), label="fan_in")  # above in_features: repeats
    layouts = ["contiguous", "transposed", "strided_cols", "expanded"] + (["strided_rows"] if batch_shape else [])
    spec = SampleSpec(
        "hypothesis",
        batch_shape,
        in_features,
        out_features,
        fan_in,
        x_layout=data.draw(st.sampled_from(layouts), label="x_layout"),
        weight_layout=data.draw(st.sampled_from(["contiguous", "strided"]), label="weight_layout") if fan_in > 1 else "contiguous",
        repeated_idx=data.draw(st.booleans(), label="repeated_idx"),
    )
    dtype = data.draw(st.sampled_from(VALUE_DTYPES), label="dtype")
    index_dtype = data.draw(st.sampled_from(INDEX_DTYPES), label="index_dtype")
    with_bias = data.draw(st.booleans(), label="bias")
    path = data.draw(st.sampled_from(KERNEL_PATHS), label="kernel_path")
    sample = make_sample(spec, dtype, index_dtype, bias=with_bias, seed=data.draw(st.integers(0, 2**16), label="seed"))
    with cpu_kernel(*path):
        run_and_check(sample.args)


# ---- kernel choice -----------------------------------------------------------------


def kernel_that_ran(args, **options):
    """The result and the kernel ("<isa> <kernel>") condensed_linear ran, under kernel options."""
    with condensed_ops.kernel_options(**options):
        y = condensed_ops.condensed_linear(*args)
        return y, condensed_ops._C._last_cpu_kernel()


@pytest.mark.parametrize("batch", sorted({1, SMALL_BATCH_MAX, SMALL_BATCH_MAX + 1, 5, 40}))
def test_auto_picks_the_small_batch_kernel_then_tiled(batch):
    caps = condensed_ops._C.cpu_capabilities()
    assert caps["active_isa"] == WIDEST_ISA
    strategy = caps["small_batch_kernel"] if batch <= SMALL_BATCH_MAX else "tiled"
    sample = make_sample(SampleSpec("auto", (batch,), 64, 16, 37))
    auto, auto_kernel = kernel_that_ran(sample.args)
    forced, forced_kernel = kernel_that_ran(sample.args, cpu_isa=WIDEST_ISA, cpu_strategy=strategy)
    assert auto_kernel == forced_kernel and auto_kernel.endswith(" " + strategy), (batch, auto_kernel, forced_kernel)
    # Gather and scalar have AVX2 flavours only.
    assert auto_kernel.startswith(WIDEST_ISA if strategy == "tiled" or WIDEST_ISA == "portable" else "avx2"), auto_kernel
    assert torch.equal(auto, forced)


def test_each_forced_path_runs_its_kernel():
    sample = make_sample(SampleSpec("forced", (3,), 64, 16, 37))
    for isa, strategy in KERNEL_PATHS:
        if "auto" in (isa, strategy):
            continue
        _, kernel = kernel_that_ran(sample.args, cpu_isa=isa, cpu_strategy=strategy)
        flavour = "avx2" if isa == "avx512" and strategy != "tiled" else isa
        assert kernel == f"{flavour} {strategy}", (isa, strategy, kernel)
    _, kernel = kernel_that_ran((sample.args[0].double(), sample.args[1].double(), sample.args[2], None), cpu_strategy="tiled")
    assert kernel == "portable tiled", kernel  # float64 has portable kernels only


def test_small_batch_choice_is_calibrated_reported_and_used():
    caps = condensed_ops._C.cpu_capabilities()
    sample = make_sample(SampleSpec("calibrated", (1,), 64, 16, 37))
    _, kernel = kernel_that_ran(sample.args)
    if WIDEST_ISA == "portable":
        assert caps["small_batch_kernel"] == "scalar" and kernel == "portable scalar"
        return
    assert re.fullmatch(r"calibrated: gather [0-9.]+ us, scalar [0-9.]+ us", caps["small_batch_reason"]), caps["small_batch_reason"]
    chosen = caps["small_batch_kernel"]
    assert caps["small_batch_pin"] == f"CONDENSED_OPS_CPU_SMALL_BATCH={chosen}"
    assert kernel == f"avx2 {chosen}", (kernel, caps)  # what one row runs is what was reported
    other = "gather" if chosen == "scalar" else "scalar"
    with condensed_ops.kernel_options(cpu_small_batch=other):
        forced = condensed_ops._C.cpu_capabilities()
        _, forced_kernel = kernel_that_ran(sample.args)
    assert forced["small_batch_kernel"] == other and "forced" in forced["small_batch_reason"]
    assert forced_kernel == f"avx2 {other}", forced_kernel
    assert condensed_ops._C.cpu_capabilities()["small_batch_kernel"] == chosen  # the calibration is kept


_ENVIRONMENT_SCRIPT = """
import torch, condensed_ops
caps = condensed_ops._C.cpu_capabilities()
print(caps["kernel_options"], caps["small_batch_kernel"], caps["small_batch_reason"])
"""


@pytest.mark.parametrize("value", ["gather", "scalar"])
def test_environment_variable_forces_the_small_batch_kernel(value):
    if WIDEST_ISA == "portable":
        pytest.skip("the portable flavour has no gather")
    env = dict(os.environ, CONDENSED_OPS_CPU_SMALL_BATCH=value)
    result = subprocess.run([sys.executable, "-c", _ENVIRONMENT_SCRIPT], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"'cpu_small_batch': '{value}'" in result.stdout and f"}} {value} forced" in result.stdout


def test_a_bad_environment_variable_is_named_on_first_use():
    script = "import torch, condensed_ops\ncondensed_ops.condensed_linear(torch.randn(2, 4), torch.randn(3, 2), torch.zeros(3, 2, dtype=torch.int16))"
    env = dict(os.environ, CONDENSED_OPS_CPU_STRATEGY="fastest")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode != 0
    assert "CONDENSED_OPS_CPU_STRATEGY must be one of 'auto', 'gather', 'scalar', 'tiled', got 'fastest'" in result.stderr


@pytest.mark.parametrize("path", FORCED_KERNEL_PATHS, ids=kernel_path_id)
def test_forcing_a_kernel_is_reported_and_undone(path):
    with cpu_kernel(*path):
        caps = condensed_ops._C.cpu_capabilities()
        assert caps["active_isa"] == path[0]
        assert caps["kernel_options"]["cpu_strategy"] == path[1]
    assert condensed_ops._C.cpu_capabilities()["active_isa"] == WIDEST_ISA
    assert set(condensed_ops._C._kernel_options().values()) == {"auto"}


@pytest.mark.parametrize(
    "name,value",
    [("cpu_isa", "sse"), ("cpu_isa", "AVX2"), ("cpu_strategy", "transposed"), ("cpu_small_batch", "tiled"), ("cpu_isa", ""), ("gpu", "auto")],
)
def test_unknown_kernel_options_are_rejected(name, value):
    with cpu_kernel("portable", "scalar"):
        with pytest.raises(ValueError, match=re.escape(repr(name if name == "gpu" else value))):
            condensed_ops._C._set_kernel_option(name, value)
        # A rejected call changes nothing.
        options = condensed_ops._C._kernel_options()
        assert (options.pop("cpu_isa"), options.pop("cpu_strategy")) == ("portable", "scalar")
        assert set(options.values()) == {"auto"}


def test_kernel_options_restores_what_was_in_force_and_refuses_bad_choices():
    with condensed_ops.kernel_options(cpu_strategy="scalar"):
        with condensed_ops.kernel_options(cpu_isa="portable", cpu_small_batch="gather") as inside:
            assert (inside["cpu_isa"], inside["cpu_strategy"], inside["cpu_small_batch"]) == ("portable", "scalar", "gather")
            assert condensed_ops._C.cpu_capabilities()["active_isa"] == "portable"
        assert condensed_ops.current_kernel_options()["cpu_isa"] == "auto"
        assert condensed_ops.current_kernel_options()["cpu_strategy"] == "scalar"
        with pytest.raises(ValueError, match="unknown kernel option 'gpu'"):
            with condensed_ops.kernel_options(cpu_isa="portable", gpu="fast"):
                pass
        with pytest.raises(TypeError, match="cpu_isa must be a str"):
            with condensed_ops.kernel_options(cpu_isa=2):
                pass
        assert condensed_ops.current_kernel_options()["cpu_isa"] == "auto", "a refused block must leave nothing behind"
    assert set(condensed_ops.current_kernel_options().values()) == {"auto"}


@pytest.mark.parametrize("isa", UNSUPPORTED_ISAS or [pytest.param(None, marks=pytest.mark.skip(reason="this CPU/build runs every SIMD flavour"))])
def test_forcing_a_flavour_the_cpu_lacks_is_refused(isa):
    with pytest.raises(ValueError, match=isa):
        condensed_ops._C._set_kernel_option("cpu_isa", isa)
    assert condensed_ops._C.cpu_capabilities()["active_isa"] == WIDEST_ISA


# ---- threads ---------------------------------------------------------------------------


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs at least 2 CPUs")
def test_parallel_for_really_uses_several_threads():
    # Without -fopenmp at::parallel_for silently runs on one thread.
    torch.set_num_threads(2)
    assert condensed_ops._C._threads_used_by_parallel_for(64) > 1
    torch.set_num_threads(1)
    assert condensed_ops._C._threads_used_by_parallel_for(64) == 1


@pytest.mark.parametrize(
    "spec",
    [
        SampleSpec("gather_split_outputs", (3,), 200, 1030, 64),
        SampleSpec("tiled_split_outputs", (20,), 100, 260, 24),
        SampleSpec("tiled_split_tiles", (70,), 100, 130, 24),
    ],
    ids=lambda s: s.id,
)
def test_one_and_two_threads_give_identical_results(spec, kernel_path):
    sample = make_sample(spec)
    torch.set_num_threads(1)
    one = condensed_ops.condensed_linear(*sample.args)
    torch.set_num_threads(2)
    two = condensed_ops.condensed_linear(*sample.args)
    assert torch.equal(one, two)
    assert_matches_reference(two, *sample.args)


# ---- autograd (gradients are tested in test_autograd.py) ----------------------------


def test_no_graph_without_requires_grad():
    y = condensed_ops.condensed_linear(*make_sample(SAMPLE_SPECS[0]).args)
    assert not y.requires_grad and y.grad_fn is None


# ---- opcheck -------------------------------------------------------------------------------

_OPCHECK_SAMPLES = list(sample_inputs((torch.float32,), (torch.int32,))) + list(
    sample_inputs((torch.float64, torch.float16, torch.bfloat16), INDEX_DTYPES, specs=QUICK_SPECS)
) + list(sample_inputs((torch.float32,), (torch.int16, torch.int64), specs=QUICK_SPECS))


@pytest.mark.parametrize("sample", _OPCHECK_SAMPLES, ids=lambda s: s.name)
def test_opcheck(sample):
    torch.library.opcheck(torch.ops.condensed_ops.condensed_linear.default, sample.args)


# ---- TorchScript -------------------------------------------------------------------------


def call_condensed_linear(x: Tensor, values: Tensor, idx: Tensor, bias: Optional[Tensor]) -> Tensor:
    return condensed_ops.condensed_linear(x, values, idx, bias)


class CondensedLinear(torch.nn.Module):
    def __init__(self, values: Tensor, idx: Tensor, bias: Optional[Tensor]):
        super().__init__()
        self.register_buffer("values", values.clone())
        self.register_buffer("idx", idx.clone())
        self.register_buffer("bias", None if bias is None else bias.clone())

    def forward(self, x: Tensor) -> Tensor:
        return condensed_ops.condensed_linear(x, self.values, self.idx, self.bias)


_SCRIPT_SAMPLES = list(sample_inputs(VALUE_DTYPES, (torch.int16, torch.int64), specs=QUICK_SPECS))


@pytest.fixture(scope="module")
def scripted_call():
    return torch.jit.script(call_condensed_linear)


@pytest.mark.parametrize("sample", _SCRIPT_SAMPLES, ids=lambda s: s.name)
def test_script_matches_eager(sample, scripted_call):
    torch.testing.assert_close(scripted_call(*sample.args), call_condensed_linear(*sample.args), rtol=0, atol=0)


def test_script_save_load_round_trip(tmp_path, scripted_call):
    path = tmp_path / "call.pt"
    torch.jit.save(scripted_call, str(path))
    loaded = torch.jit.load(str(path))
    for sample in _SCRIPT_SAMPLES[:12]:
        torch.testing.assert_close(loaded(*sample.args), call_condensed_linear(*sample.args), rtol=0, atol=0)


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_scripted_module_save_load_round_trip(tmp_path, with_bias):
    sample = make_sample(QUICK_SPECS[1], bias=with_bias)
    module = CondensedLinear(sample.values, sample.idx, sample.bias)
    scripted = torch.jit.script(module)
    path = tmp_path / "module.pt"
    torch.jit.save(scripted, str(path))
    loaded = torch.jit.load(str(path))
    eager = module(sample.x)
    torch.testing.assert_close(scripted(sample.x), eager, rtol=0, atol=0)
    torch.testing.assert_close(loaded(sample.x), eager, rtol=0, atol=0)


def test_saved_script_runs_where_the_package_was_never_imported(tmp_path):
    # The schema lives in C++: loading the library alone must make a saved
    # model runnable, with no Python import of condensed_ops.
    sample = make_sample(QUICK_SPECS[1])
    torch.jit.save(torch.jit.script(CondensedLinear(sample.values, sample.idx, sample.bias)), str(tmp_path / "m.pt"))
    torch.save({"x": sample.x, "expected": CondensedLinear(sample.values, sample.idx, sample.bias)(sample.x)}, tmp_path / "io.pt")
    code = (
        "import sys, torch\n"
        f"torch.ops.load_library({condensed_ops._C.__file__!r})\n"
        f"m = torch.jit.load({str(tmp_path / 'm.pt')!r})\n"
        f"io = torch.load({str(tmp_path / 'io.pt')!r})\n"
        "assert 'condensed_ops' not in sys.modules, 'the package was imported'\n"
        "assert torch.equal(m(io['x']), io['expected'])\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]


# ---- torch.compile -----------------------------------------------------------------------


_COMPILE_SAMPLES = list(sample_inputs((torch.float32, torch.bfloat16), (torch.int16,), specs=QUICK_SPECS, biases=(True,))) + list(
    sample_inputs((torch.float32,), (torch.int64,), specs=QUICK_SPECS[:1], biases=(False,))
)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
@pytest.mark.parametrize("sample", _COMPILE_SAMPLES, ids=lambda s: s.name)
def test_compile_fullgraph_matches_eager(sample, backend, fresh_dynamo):
    compiled = torch.compile(call_condensed_linear, fullgraph=True, backend=backend)
    torch.testing.assert_close(compiled(*sample.args), call_condensed_linear(*sample.args), rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compile_dynamic_one_graph_for_every_batch_shape(backend, fresh_dynamo):
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(call_condensed_linear, fullgraph=True, dynamic=True, backend=counter)
    for batch in (2, 3, 17, 33):
        sample = make_sample(SampleSpec(f"dynamic{batch}", (batch,), 40, 13, 19))
        torch.testing.assert_close(compiled(*sample.args), call_condensed_linear(*sample.args), rtol=0, atol=0)
    assert counter.frame_count == 1, "dynamic shapes recompiled for a new batch size"
    x3d = make_sample(SampleSpec("dynamic3d", (4, 5), 40, 13, 19))  # a new rank may compile once more
    torch.testing.assert_close(compiled(*x3d.args), call_condensed_linear(*x3d.args), rtol=0, atol=0)
    assert counter.frame_count <= 2


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_compile_inductor_module_matches_eager(dynamic, fresh_dynamo):
    spec = SampleSpec("inductor", (6,), 40, 13, 19)
    sample = make_sample(spec)
    module = CondensedLinear(sample.values, sample.idx, sample.bias)

    def model(x):
        return torch.relu(module(x * 2)) + 1  # something for inductor to fuse around the op

    compiled = torch.compile(model, fullgraph=True, dynamic=dynamic)
    for batch in (6, 20):
        x = make_sample(SampleSpec("inductor", (batch,), 40, 13, 19)).x
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-6, atol=1e-6)


# ---- build facts ---------------------------------------------------------------------------


def _cpuinfo_flags() -> set:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def test_build_facts():
    assert condensed_ops.__version__ == importlib.metadata.version("condensed_ops")
    if torch.version.cuda is None:
        assert condensed_ops._C.with_cuda is False, "a CUDA build cannot come from a CPU-only torch"
    caps = condensed_ops._C.cpu_capabilities()
    if platform.machine() in ("x86_64", "AMD64"):
        # What the extension detects is what the OS says this CPU has.
        flags = _cpuinfo_flags()
        assert caps["avx2_compiled"] and caps["avx512_compiled"], "x86-64 builds carry both SIMD flavours"
        assert caps["avx2_supported"] == ({"avx2", "fma", "f16c"} <= flags), (caps, sorted(flags & {"avx2", "fma", "f16c"}))
        assert caps["avx512_supported"] == ({"avx2", "fma", "f16c", "avx512f"} <= flags), caps
    widest = "avx512" if caps["avx512_supported"] else "avx2" if caps["avx2_supported"] else "portable"
    if "CONDENSED_OPS_CPU_ISA" not in os.environ:
        assert caps["active_isa"] == widest
    assert caps["window_width"] == (64 if caps["active_isa"] == "avx512" else 256)


def test_the_extension_refuses_a_torch_release_it_was_not_built_against():
    from condensed_ops import _build_info

    assert _build_info.TORCH_VERSION == torch.__version__
    script = "import torch; torch.__version__ = '1.0.0'; import condensed_ops"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert f"condensed_ops was built against torch {torch.__version__}, but torch 1.0.0 is installed" in result.stderr
