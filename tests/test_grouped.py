"""The grouped layout: values [groups, group_size, fan_in], idx [groups, fan_in].

Every kernel path against the float64 dense reference on awkward shapes, the
autograd, opcheck, TorchScript, torch.compile, the window layout built from
grouped weights, and the errors that name the bad argument."""

import pytest
import torch

import condensed_ops
from conftest import (
    INDEX_DTYPES,
    SUPPORTED_ISAS,
    VALUE_DTYPES,
    _generator,
    assert_matches_reference,
    cpu_kernel,
    index_dtype_fits,
    random_idx,
    reference_condensed_linear,
)

grouped_op = torch.ops.condensed_ops.condensed_linear_grouped


def grouped_sample(batch, in_features, groups, group_size, fan_in, dtype=torch.float32, index_dtype=torch.int32,
                   bias=True, seed=0):
    g = _generator("grouped", batch, in_features, groups, group_size, fan_in, str(dtype), str(index_dtype), seed)
    x = torch.randn(*batch, in_features, generator=g, dtype=torch.float64).to(dtype)
    values = torch.randn(groups, group_size, fan_in, generator=g, dtype=torch.float64).to(dtype)
    idx = random_idx(groups, in_features, fan_in, generator=g).to(index_dtype)
    b = torch.randn(groups * group_size, generator=g, dtype=torch.float64).to(dtype) if bias else None
    return x, values, idx, b


# (batch shape, in_features, groups, group_size, fan_in): tails of every tile
# width and of the 8-output store groups, groups that straddle them, group
# sizes that are not powers of two, one column, a full row.
SHAPES = [
    ((1,), 37, 3, 8, 11),
    ((2,), 40, 5, 3, 7),
    ((5,), 64, 4, 16, 20),
    ((9,), 50, 2, 32, 9),
    ((17,), 30, 7, 1, 5),
    ((33,), 100, 6, 4, 33),
    ((40,), 20, 3, 6, 20),
    ((70,), 300, 2, 24, 30),
    ((3, 11), 25, 5, 5, 1),
    ((31,), 16, 1, 2, 16),
]


@pytest.mark.parametrize("isa", SUPPORTED_ISAS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[0])) + f"-{s[1]}-{s[2]}x{s[3]}x{s[4]}")
@pytest.mark.parametrize("dtype", VALUE_DTYPES, ids=lambda d: str(d)[6:])
def test_matches_float64_reference(isa, shape, dtype):
    batch, in_features, groups, group_size, fan_in = shape
    x, values, idx, bias = grouped_sample(batch, in_features, groups, group_size, fan_in, dtype)
    with cpu_kernel(isa):
        y = condensed_ops.condensed_linear(x, values, idx, bias)
    assert_matches_reference(y, x, values, idx, bias)


@pytest.mark.parametrize("index_dtype", INDEX_DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("batch", [1, 3, 64])
def test_every_index_dtype_and_no_bias(index_dtype, batch):
    x, values, idx, _ = grouped_sample((batch,), 90, 6, 8, 13, index_dtype=index_dtype, bias=False)
    assert_matches_reference(grouped_op(x, values, idx), x, values, idx)


def test_strided_inputs_are_read_correctly():
    x, values, idx, bias = grouped_sample((48,), 60, 4, 8, 10)
    x_strided = torch.randn(48, 120)[:, ::2].copy_(x)
    values_t = values.transpose(1, 2).contiguous().transpose(1, 2)  # non-contiguous, same numbers
    idx_t = idx.t().contiguous().t()
    y = condensed_ops.condensed_linear(x_strided, values_t, idx_t, bias)
    assert_matches_reference(y, x, values, idx, bias)


def test_equals_the_row_layout_with_repeated_indices():
    """The grouped layout is the row layout with each group's idx row repeated."""
    x, values, idx, bias = grouped_sample((37,), 80, 5, 8, 12)
    rows = condensed_ops.condensed_linear(x, values.reshape(40, 12), idx.repeat_interleave(8, 0), bias)
    torch.testing.assert_close(condensed_ops.condensed_linear(x, values, idx, bias), rows, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("batch", [1, 6, 40])
def test_gradients_match_float64_reference(batch):
    x, values, idx, bias = grouped_sample((batch,), 30, 3, 4, 7, dtype=torch.float64)
    x.requires_grad_(), values.requires_grad_(), bias.requires_grad_()
    grad_y = torch.randn(batch, 12, dtype=torch.float64)
    condensed_ops.condensed_linear(x, values, idx, bias).backward(grad_y)
    got = [t.grad.clone() for t in (x, values, bias)]
    for t in (x, values, bias):
        t.grad = None
    reference_condensed_linear(x, values, idx, bias).backward(grad_y)
    for actual, t in zip(got, (x, values, bias)):
        assert actual.shape == t.shape
        torch.testing.assert_close(actual, t.grad, rtol=1e-12, atol=1e-12)


def test_gradcheck():
    x, values, idx, bias = grouped_sample((5,), 12, 2, 3, 4, dtype=torch.float64)
    inputs = (x.requires_grad_(), values.requires_grad_(), idx, bias.requires_grad_())
    assert torch.autograd.gradcheck(grouped_op, inputs)


@pytest.mark.parametrize("batch", [1, 20])
def test_opcheck(batch):
    x, values, idx, bias = grouped_sample((batch,), 40, 3, 8, 6)
    torch.library.opcheck(grouped_op.default, (x, values, idx, bias))
    torch.library.opcheck(grouped_op.default, (x.requires_grad_(), values.requires_grad_(), idx, None))


def test_torchscript_and_compile_match_eager():
    x, values, idx, bias = grouped_sample((24,), 40, 4, 8, 6)

    def call(x: torch.Tensor, values: torch.Tensor, idx: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return condensed_ops.condensed_linear(x, values, idx, bias)

    eager = call(x, values, idx, bias)
    torch.testing.assert_close(torch.jit.script(call)(x, values, idx, bias), eager, rtol=0, atol=0)
    torch._dynamo.reset()
    compiled = torch.compile(call, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x, values, idx, bias), eager, rtol=0, atol=0)


@pytest.mark.parametrize("active", [False, True])
def test_window_layout_from_grouped_weights(active):
    x, values, idx, bias = grouped_sample((3,), 70, 4, 8, 9)
    active_rows = torch.arange(32) * 2 if active else None
    out_features = 64 if active else 32
    packed = condensed_ops.pack_for_inference(values, idx, 70, active_rows, out_features)
    assert condensed_ops.pack_for_inference(values, idx, 70, active_rows, out_features) is packed  # cached
    full_bias = torch.randn(out_features)
    y = condensed_ops.condensed_linear_packed(x, packed, out_features, full_bias)
    rows = condensed_ops.condensed_linear(x, values, idx)
    expected = full_bias.expand(3, out_features).clone()
    expected[:, active_rows if active else slice(None)] += rows
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


def test_bad_index_names_the_group_entry():
    x, values, idx, bias = grouped_sample((40,), 30, 3, 8, 5)
    idx[2, 4] = 30
    for batch in (1, 40):
        with pytest.raises(IndexError, match=r"idx\[2, 4\] = 30 is outside \[0, in_features=30\)"):
            condensed_ops.condensed_linear(x[:batch], values, idx, bias)


@pytest.mark.parametrize(
    "change, error, message",
    [
        (lambda a: a.update(idx=a["idx"][:2]), ValueError, r"idx must be \[groups, fan_in\] = \[3, 5\]"),
        (lambda a: a.update(idx=a["idx"].float()), TypeError, "idx must be int16, int32 or int64"),
        (lambda a: a.update(values=a["values"][0]), ValueError, "values must be 3-D"),
        (lambda a: a.update(values=a["values"].double()), TypeError, "x and values must share a dtype"),
        (lambda a: a.update(bias=a["bias"][:-1]), ValueError, r"bias must have shape \[out_features\] = \[24\]"),
        (lambda a: a.update(x=a["x"][0, 0]), ValueError, "x must have at least 1 dimension"),
        (lambda a: a.update(values=a["values"].int(), x=a["x"].int()), TypeError, "values must be float32"),
    ],
)
def test_bad_arguments_raise_naming_them(change, error, message):
    x, values, idx, bias = grouped_sample((4,), 30, 3, 8, 5)
    arguments = dict(x=x, values=values, idx=idx, bias=bias)
    change(arguments)
    with pytest.raises(error, match=message):
        grouped_op(**arguments)
    # The fake kernel (torch.compile's tracing) says the same.
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fake = {k: None if v is None else mode.from_tensor(v) for k, v in arguments.items()}
        with pytest.raises(error, match=message):
            grouped_op(**fake)
