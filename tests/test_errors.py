"""Malformed condensed_linear calls: the right exception type, and a message that
names the argument at fault."""

import re
import subprocess
import sys

import pytest
import torch

import condensed_ops
from conftest import INDEX_DTYPES, KERNEL_PATHS

IN_FEATURES = 10


def good_args(batch=3, dtype=torch.float32, index_dtype=torch.int32):
    g = torch.Generator().manual_seed(batch)
    x = torch.randn(batch, IN_FEATURES, generator=g).to(dtype)
    values = torch.randn(4, 3, generator=g).to(dtype)
    idx = torch.randint(0, IN_FEATURES, (4, 3), generator=g).to(index_dtype)
    bias = torch.randn(4, generator=g).to(dtype)
    return x, values, idx, bias


def _bad_calls():
    x, values, idx, bias = good_args()
    # (id, args, exception type, regex the message must match)
    yield "values_1d", (x, values[0], idx, bias), ValueError, r"values must be 2-D"
    # 3-D values are the grouped layout, whose idx is [groups, fan_in].
    yield "values_3d", (x, values[None], idx, bias), ValueError, r"idx must be \[groups, fan_in\] = \[1, "
    yield "idx_1d", (x, values, idx[0], bias), ValueError, r"idx must be 2-D"
    yield "idx_3d", (x, values, idx[None], bias), ValueError, r"idx must be 2-D"
    yield "idx_values_shape_mismatch", (x, values, idx[:, :2], bias), ValueError, r"idx must have the same shape as values"
    yield "idx_values_rows_mismatch", (x, values, idx[:3], bias), ValueError, r"idx must have the same shape as values"
    yield "bias_too_short", (x, values, idx, bias[:3]), ValueError, r"bias must have shape \[out_features\] = \[4\]"
    yield "bias_2d", (x, values, idx, bias[None]), ValueError, r"bias must have shape"
    yield "bias_scalar", (x, values, idx, bias[0]), ValueError, r"bias must have shape"
    yield "bias_float64", (x, values, idx, bias.double()), TypeError, r"bias must have values' dtype"
    yield "bias_float16", (x, values, idx, bias.half()), TypeError, r"bias must have values' dtype"
    yield "x_float64_values_float32", (x.double(), values, idx, bias), TypeError, r"x and values must share a dtype"
    yield "x_float16_values_bfloat16", (x.half(), values.bfloat16(), idx, bias.bfloat16()), TypeError, r"x and values must share a dtype"
    yield "x_int_values_float", (x.int(), values, idx, bias), TypeError, r"x and values must share a dtype"
    for dtype in (torch.float32, torch.float16, torch.int8, torch.uint8, torch.bool, torch.uint16, torch.uint32):
        yield f"idx_{str(dtype)[6:]}", (x, values, idx.to(dtype), bias), TypeError, r"idx must be int16, int32 or int64"
    for dtype in (torch.int32, torch.int64, torch.complex64):
        yield (
            f"values_{str(dtype)[6:]}",
            (x.to(dtype), values.to(dtype), idx, bias.to(dtype)),
            TypeError,
            r"values must be float32, float16, bfloat16 or float64",
        )
    yield "x_scalar", (x[0, 0], values, idx, bias), ValueError, r"x must have at least 1 dimension"


_BAD_CALLS = list(_bad_calls())


@pytest.mark.parametrize("args,error,message", [c[1:] for c in _BAD_CALLS], ids=[c[0] for c in _BAD_CALLS])
def test_malformed_call_raises_and_names_the_argument(args, error, message):
    with pytest.raises(error, match=message):
        condensed_ops.condensed_linear(*args)


@pytest.mark.parametrize("args,error,message", [c[1:] for c in _BAD_CALLS], ids=[c[0] for c in _BAD_CALLS])
def test_fake_kernel_raises_the_same(args, error, message):
    # Under FakeTensorMode only the Python fake kernel runs (what torch.compile traces).
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake_args = [None if a is None else mode.from_tensor(a) for a in args]
        with pytest.raises(error, match=message):
            condensed_ops.condensed_linear(*fake_args)


_COMPILE_CASES = [c for c in _BAD_CALLS if c[0] in ("values_1d", "bias_float64", "idx_float32", "x_float64_values_float32")]


@pytest.mark.parametrize("args,error,message", [c[1:] for c in _COMPILE_CASES], ids=[c[0] for c in _COMPILE_CASES])
def test_compile_reports_the_same_error_at_trace_time(args, error, message):
    torch._dynamo.reset()

    def call(x, values, idx, bias):
        return condensed_ops.condensed_linear(x, values, idx, bias)

    compiled = torch.compile(call, fullgraph=True, backend="eager")
    # Dynamo wraps what the fake kernel raised; the original type and text survive in its message.
    with pytest.raises((error, RuntimeError)) as info:
        compiled(*args)
    assert re.search(message, str(info.value)), str(info.value)
    if not isinstance(info.value, error):
        assert error.__name__ in str(info.value), str(info.value)
    torch._dynamo.reset()


def test_compiled_call_still_checks_index_values():
    torch._dynamo.reset()
    x, values, idx, bias = good_args()
    compiled = torch.compile(lambda *a: condensed_ops.condensed_linear(*a), fullgraph=True, backend="eager")
    compiled(x, values, idx, bias)
    bad = idx.clone()
    bad[2, 1] = IN_FEATURES
    with pytest.raises(IndexError, match=rf"idx\[2, 1\] = {IN_FEATURES} is outside \[0, in_features={IN_FEATURES}\)"):
        compiled(x, values, bad, bias)
    torch._dynamo.reset()


def test_message_names_the_dtypes_and_shapes_it_got():
    x, values, idx, bias = good_args()
    # C++ spells dtypes as ScalarType names, the fake kernel as torch dtypes.
    with pytest.raises(TypeError, match=r"got x (Double|torch\.float64) and values (Float|torch\.float32)"):
        condensed_ops.condensed_linear(x.double(), values, idx, bias)
    with pytest.raises(ValueError, match=r"got idx \[4, 2\] and values \[4, 3\]"):
        condensed_ops.condensed_linear(x, values, idx[:, :2], bias)
    with pytest.raises(ValueError, match=r"got \[5\]"):
        condensed_ops.condensed_linear(x, values, idx, torch.zeros(5))


# ---- index values ---------------------------------------------------------------------


def _bad_index_values(index_dtype):
    info = torch.iinfo(index_dtype)
    bad = {-1, IN_FEATURES, IN_FEATURES + 1, info.min, info.max}
    if index_dtype == torch.int64:
        # Truncated to 32 bits these would be the valid columns 1, 3 and 1.
        bad |= {2**32 + 1, 2**32 + 3, -(2**32) + 1, 2**31}
    if index_dtype == torch.int32:
        bad |= {2**31 - 1}
    return sorted(bad)


_INDEX_CASES = [(d, v) for d in INDEX_DTYPES for v in _bad_index_values(d)]


@pytest.mark.parametrize("batch", [3, 20])
@pytest.mark.parametrize("index_dtype,bad_value", _INDEX_CASES, ids=[f"{str(d)[6:]}={v}" for d, v in _INDEX_CASES])
def test_index_outside_in_features_raises_index_error(index_dtype, bad_value, batch, kernel_path):
    x, values, idx, bias = good_args(batch, index_dtype=index_dtype)
    idx = idx.clone()
    idx[2, 1] = bad_value
    idx[3, 0] = -1  # a later bad entry: the message must name the first one
    assert int(idx[2, 1]) == bad_value
    expected = rf"idx\[2, 1\] = {bad_value} is outside \[0, in_features={IN_FEATURES}\)"
    with pytest.raises(IndexError, match=expected):
        condensed_ops.condensed_linear(x, values, idx, bias)


@pytest.mark.parametrize("batch", [1, 3, 20])
@pytest.mark.parametrize("position", [0, 7, 8, 15, 16, 18], ids=lambda j: f"j{j}")
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES, ids=str)
def test_bad_index_is_found_anywhere_in_a_row(index_dtype, position, batch, kernel_path):
    # fan_in 19 = two 8-wide vectors and a tail of 3; the last row's tail has no
    # room after it for a full-width load. Checks that fuse into the loads must
    # cover every part, in every row, for both signs.
    g = torch.Generator().manual_seed(position)
    x = torch.randn(batch, 40, generator=g)
    values = torch.randn(13, 19, generator=g)
    for row, bad_value in ((0, 40), (6, -1), (12, 41), (12, -32768)):
        idx = torch.randint(0, 40, (13, 19), generator=g).to(index_dtype)
        idx[row, position] = bad_value
        with pytest.raises(IndexError, match=rf"idx\[{row}, {position}\] = {bad_value} is outside \[0, in_features=40\)"):
            condensed_ops.condensed_linear(x, values, idx)


@pytest.mark.parametrize("index_dtype", INDEX_DTYPES, ids=str)
def test_index_error_with_non_contiguous_idx_names_the_logical_position(index_dtype, kernel_path):
    x, values, _, bias = good_args(17, index_dtype=index_dtype)
    idx = torch.randint(0, IN_FEATURES, (3, 4)).to(index_dtype).t()  # [4, 3], column-major
    idx[1, 2] = IN_FEATURES + 5
    with pytest.raises(IndexError, match=rf"idx\[1, 2\] = {IN_FEATURES + 5} is outside \[0, in_features={IN_FEATURES}\)"):
        condensed_ops.condensed_linear(x, values, idx, bias)


# idx is validated once per version; a write that bypasses the version counter
# (through .data or numpy) is caught by the kernels' own checks.
_BYPASS_WRITES = {
    "data": lambda idx, row, column, value: idx.data.__setitem__((row, column), value),
    "numpy": lambda idx, row, column, value: idx.numpy().__setitem__((row, column), value),
}


@pytest.mark.parametrize("batch", [1, 3, 20])
@pytest.mark.parametrize("write", sorted(_BYPASS_WRITES))
@pytest.mark.parametrize("index_dtype", [torch.int16, torch.int32], ids=str)
def test_a_write_that_bypasses_the_version_counter_is_still_caught(index_dtype, write, batch, kernel_path):
    x, values, idx, bias = good_args(batch, index_dtype=index_dtype)
    condensed_ops.condensed_linear(x, values, idx, bias)  # validated and cached
    version = idx._version
    _BYPASS_WRITES[write](idx, 2, 1, IN_FEATURES + 3)
    assert idx._version == version, "the write was meant to bypass the version counter"
    with pytest.raises(IndexError, match=rf"idx\[2, 1\] = {IN_FEATURES + 3} is outside"):
        condensed_ops.condensed_linear(x, values, idx, bias)
    # The failure forgets the validation: the next call checks idx again.
    with pytest.raises(IndexError, match=rf"idx\[2, 1\] = {IN_FEATURES + 3} is outside"):
        condensed_ops.condensed_linear(x, values, idx, bias)


def test_grad_values_catches_a_bypassing_write():
    x, values, idx, _ = good_args(5)
    grad_y = torch.randn(5, 4)
    torch.ops.condensed_ops.condensed_linear_grad_values(grad_y, x, idx)
    idx.data[3, 2] = -7
    with pytest.raises(IndexError, match=r"idx\[3, 2\] = -7 is outside"):
        torch.ops.condensed_ops.condensed_linear_grad_values(grad_y, x, idx)


def test_an_in_place_change_is_validated_again():
    x, values, idx, bias = good_args()
    condensed_ops.condensed_linear(x, values, idx, bias)
    idx[1, 1] = IN_FEATURES  # bumps the version counter
    with pytest.raises(IndexError, match=rf"idx\[1, 1\] = {IN_FEATURES} is outside"):
        condensed_ops.condensed_linear(x, values, idx, bias)


def test_validation_against_a_wider_x_is_not_reused_for_a_narrower_one():
    _, values, idx, bias = good_args()
    idx = idx.clone()
    idx[0, 0] = IN_FEATURES - 1
    condensed_ops.condensed_linear(torch.randn(2, IN_FEATURES), values, idx, bias)
    with pytest.raises(IndexError, match=r"idx\[0, 0\] = 9 is outside \[0, in_features=9\)"):
        condensed_ops.condensed_linear(torch.randn(2, IN_FEATURES - 1), values, idx, bias)


_ZERO_IN_FEATURES_SCRIPT = """
import sys, torch, condensed_ops
paths = {paths!r}
for isa, strategy in paths:
    condensed_ops._C._set_kernel_option("cpu_isa", isa)
    condensed_ops._C._set_kernel_option("cpu_strategy", strategy)
    for index_dtype in (torch.int16, torch.int32, torch.int64):
        for batch in (1, 3, 20):
            for fan_in in (2, 8, 19):
                case = f"{{isa}}/{{strategy}} {{index_dtype}} batch={{batch}} fan_in={{fan_in}}"
                print("CASE", case, flush=True)
                try:
                    condensed_ops.condensed_linear(
                        torch.randn(batch, 0), torch.randn(4, fan_in), torch.zeros(4, fan_in, dtype=index_dtype))
                except IndexError as e:
                    assert "idx[0, 0] = 0 is outside [0, in_features=0)" in str(e), (case, str(e))
                else:
                    raise AssertionError("no IndexError: " + case)
print("ALL OK", flush=True)
"""


def test_zero_in_features_with_positive_fan_in_raises():
    # Every index is outside [0, 0). Run in a child process: a kernel that
    # dereferences the empty x would take the whole test session down with it.
    script = _ZERO_IN_FEATURES_SCRIPT.format(paths=KERNEL_PATHS)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240)
    cases = [line for line in result.stdout.splitlines() if line.startswith("CASE")]
    assert result.returncode == 0 and "ALL OK" in result.stdout, (
        f"exit code {result.returncode} during {cases[-1] if cases else 'start-up'}\n{result.stderr[-2000:]}"
    )


@pytest.mark.parametrize("batch_shape", [(0,), (2, 0)], ids=["batch0", "batch2x0"])
def test_index_outside_in_features_raises_even_for_an_empty_batch(batch_shape):
    # The docstring promises every idx entry is checked; a model's bad weights
    # should not slip through just because a batch happened to be empty.
    x = torch.randn(*batch_shape, IN_FEATURES)
    _, values, idx, bias = good_args()
    idx = idx.clone()
    idx[1, 1] = IN_FEATURES
    with pytest.raises(IndexError, match=rf"in_features={IN_FEATURES}"):
        condensed_ops.condensed_linear(x, values, idx, bias)


def test_in_features_beyond_int32_is_refused():
    # Indices travel as int32 in the kernels; an expanded x costs no memory.
    x = torch.zeros(1, 1).expand(2, 2**31)
    _, values, idx, _ = good_args()
    with pytest.raises(ValueError, match=r"in_features.*2147483648"):
        condensed_ops.condensed_linear(x, values, idx)


# ---- devices ---------------------------------------------------------------------------


@pytest.mark.parametrize("on_meta", ["x", "values", "idx", "bias"])
def test_mixed_devices_raise_and_name_the_argument(on_meta):
    args = dict(zip(("x", "values", "idx", "bias"), good_args()))
    args[on_meta] = args[on_meta].to("meta")
    # With x elsewhere, the first argument not on x's device is the one named.
    named = "values" if on_meta == "x" else on_meta
    with pytest.raises(ValueError, match=rf"{named} must be on x's device"):
        condensed_ops.condensed_linear(**args)


def test_all_meta_inputs_give_a_meta_result():
    args = [t.to("meta") for t in good_args()]
    y = condensed_ops.condensed_linear(*args)
    assert y.device.type == "meta" and y.shape == (3, 4) and y.dtype == torch.float32



# ---- rough edges users meet first ---------------------------------------------------------


def test_a_list_for_x_is_a_type_error_naming_x():
    _, values, idx, bias = good_args()
    with pytest.raises(TypeError, match="condensed_linear: x must be a torch.Tensor, got list"):
        condensed_ops.condensed_linear([[0.0] * IN_FEATURES], values, idx, bias)
    with pytest.raises(TypeError, match="idx must be a torch.Tensor, got tuple"):
        condensed_ops.condensed_linear(torch.randn(2, IN_FEATURES), values, (1, 2), bias)


def test_x_narrower_than_the_largest_index_says_so():
    x, values, idx, bias = good_args()
    with pytest.raises(IndexError, match=r"is outside \[0, in_features=5\) \(in_features is x's last dimension: is x narrower"):
        condensed_ops.condensed_linear(x[:, :5], values, idx.clamp(min=5), bias)


def test_grad_input_names_its_in_features_argument():
    _, values, idx, _ = good_args()
    with pytest.raises(ValueError, match=r"in_features must be in \[0, 2\^31\), got -1") as info:
        torch.ops.condensed_ops.condensed_linear_grad_input(torch.randn(2, 4), values, idx, -1)
    assert "x's last dimension" not in str(info.value)


def test_layer_densities_names_a_bad_sparsity():
    with pytest.raises(TypeError, match="sparsity must be a number"):
        condensed_ops.masks.layer_densities(torch.nn.Linear(4, 4), None)
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
        condensed_ops.masks.layer_densities(torch.nn.Linear(4, 4), 1.5)


def test_masks_module_lists_its_api():
    names = dir(condensed_ops.masks)
    assert names == sorted(condensed_ops.masks.__all__) and "math" not in names and "nn" not in names


def test_a_missing_extension_says_how_to_build_it():
    # As in a source tree that was never built: importing the compiled module fails.
    script = "import sys; sys.modules['condensed_ops._C'] = None; import condensed_ops"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "the compiled extension condensed_ops._C is missing" in result.stderr
    assert "pip install --no-build-isolation" in result.stderr and "circular import" not in result.stderr
