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
    WIDEST_ISA,
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


grouped_grad_input = torch.ops.condensed_ops.condensed_linear_grouped_grad_input
grouped_grad_values = torch.ops.condensed_ops.condensed_linear_grouped_grad_values
# Relative to the largest reference gradient: the sums run over the batch or a column's outputs.
BACKWARD_TOLERANCE = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 4e-3, torch.bfloat16: 2e-2}
# Shapes for the grouped backward kernels (float32, a batch of 16 or more,
# groups of 2 or more) on top of SHAPES: one and both batch vectors per pass,
# row blocks with tails, fan_in not a multiple of 4, one column.
BACKWARD_SHAPES = SHAPES + [((256,), 200, 9, 8, 40), ((16,), 33, 2, 13, 33), ((300,), 24, 4, 5, 1), ((4, 12), 70, 3, 9, 17)]


def runs_grouped_backward_kernels(isa, batch, group_size, dtype):
    return isa != "portable" and dtype == torch.float32 and batch >= 16 and group_size >= 2


@pytest.mark.parametrize("isa", SUPPORTED_ISAS)
@pytest.mark.parametrize("shape", BACKWARD_SHAPES, ids=lambda s: "x".join(map(str, s[0])) + f"-{s[1]}-{s[2]}x{s[3]}x{s[4]}")
@pytest.mark.parametrize("dtype", VALUE_DTYPES, ids=lambda d: str(d)[6:])
def test_backward_ops_match_float64_reference(isa, shape, dtype):
    batch, in_features, groups, group_size, fan_in = shape
    x, values, idx, _ = grouped_sample(batch, in_features, groups, group_size, fan_in, dtype, bias=False, seed=1)
    grad_y = torch.randn(*batch, groups * group_size, generator=torch.Generator().manual_seed(2)).to(dtype)
    with cpu_kernel(isa):
        grad_x = grouped_grad_input(grad_y, values, idx, in_features)
        grad_values = grouped_grad_values(grad_y, x, idx, group_size)
        kernel = condensed_ops._C._last_cpu_kernel()
    rows = torch.Size(batch).numel()
    if runs_grouped_backward_kernels(isa, rows, group_size, dtype):
        assert kernel == f"{isa} grouped_grad_values"
    x64, values64 = x.double().requires_grad_(), values.double().requires_grad_()
    reference_condensed_linear(x64, values64, idx).backward(grad_y.double())
    for got, expected in ((grad_x, x64.grad), (grad_values, values64.grad)):
        assert got.dtype == dtype and got.shape == expected.shape
        error = (got.double() - expected).abs().max().item()
        assert error <= BACKWARD_TOLERANCE[dtype] * max(1.0, expected.abs().max().item()), error


def test_training_runs_the_grouped_backward_kernels():
    x, values, idx, bias = grouped_sample((64,), 120, 6, 8, 15)
    x.requires_grad_(), values.requires_grad_()
    grad_y = torch.randn(64, 48)
    with cpu_kernel(WIDEST_ISA):
        condensed_ops.condensed_linear(x, values, idx, bias).backward(grad_y)
        ran = condensed_ops._C._last_cpu_kernel()
    assert ran.endswith(("grouped_grad_values", "grouped_grad_input")) or WIDEST_ISA == "portable", ran
    x64, values64 = x.detach().double().requires_grad_(), values.detach().double().requires_grad_()
    reference_condensed_linear(x64, values64, idx, bias.double()).backward(grad_y.double())
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(values.grad.double(), values64.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch", [1, 20])
def test_backward_ops_opcheck(batch):
    x, values, idx, _ = grouped_sample((batch,), 40, 3, 8, 6)
    grad_y = torch.randn(batch, 24)
    torch.library.opcheck(grouped_grad_input.default, (grad_y, values, idx, 40))
    torch.library.opcheck(grouped_grad_values.default, (grad_y, x, idx, 8))


def test_backward_ops_reject_bad_input_naming_it():
    x, values, idx, _ = grouped_sample((20,), 40, 3, 8, 6)
    grad_y = torch.randn(20, 24)
    bad = idx.clone()
    bad[2, 5] = 40
    with pytest.raises(IndexError, match="idx"):
        grouped_grad_input(grad_y, values, bad, 40)
    with pytest.raises(IndexError, match="idx"):
        grouped_grad_values(grad_y, x, bad, 8)
    with pytest.raises(ValueError, match="group_size"):
        grouped_grad_values(grad_y, x, idx, 0)
    with pytest.raises(ValueError, match="grad_y"):
        grouped_grad_values(grad_y, x, idx, 4)
    with pytest.raises(ValueError, match="grad_y"):
        grouped_grad_input(grad_y[:, :20], values, idx, 40)
    with pytest.raises(ValueError, match="values must be 3-D"):
        grouped_grad_input(grad_y, values.reshape(24, 6), idx, 40)
    with pytest.raises(TypeError, match="grad_y"):
        grouped_grad_input(grad_y.double(), values, idx, 40)


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


# ---- modules and conversion -----------------------------------------------------------


def grouped_mask(out_features, in_features, fan_in, group_size, ablated_groups=(), seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(out_features, in_features, dtype=torch.bool)
    for group in range(out_features // group_size):
        if group not in ablated_groups:
            mask[group * group_size : (group + 1) * group_size, torch.randperm(in_features, generator=g)[:fan_in]] = True
    return mask


def masked_linear(in_features, out_features, mask):
    linear = torch.nn.Linear(in_features, out_features)
    with torch.no_grad():
        linear.weight.mul_(mask)
    return linear


@pytest.mark.parametrize("ablated", [(), (1,)])
@pytest.mark.parametrize("batch", [1, 3, 40])
def test_condensed_linear_from_a_grouped_mask_matches_the_masked_linear(ablated, batch):
    mask = grouped_mask(32, 50, 6, 8, ablated)
    linear = masked_linear(50, 32, mask)
    module = condensed_ops.CondensedLinear.from_linear(linear, mask, group_size=8)
    assert module.values.shape == (4 - len(ablated), 8, 6) and module.idx.shape == (4 - len(ablated), 6)
    assert module.padded_entries == 0 and module.out_features - module.active_neurons == 8 * len(ablated)
    x = torch.randn(batch, 50)
    torch.testing.assert_close(module(x), linear(x))
    with torch.no_grad():  # batch <= WINDOW_MAX_BATCH runs the window layout
        torch.testing.assert_close(module(x), linear(x))
    torch.testing.assert_close(module.to_dense(), linear.weight.detach())


def test_grouping_an_ungrouped_weight_pads_each_group_to_its_union():
    mask = torch.rand(16, 20, generator=torch.Generator().manual_seed(3)) < 0.3
    linear = masked_linear(20, 16, mask)
    module = condensed_ops.CondensedLinear.from_linear(linear, group_size=4)
    union = mask.view(4, 4, 20).any(1).sum(1)
    assert module.fan_in == int(union.max())
    assert module.padded_entries == 16 * module.fan_in - int(mask.sum())
    x = torch.randn(9, 20)
    torch.testing.assert_close(module(x), linear(x))


def test_grouped_module_trains_saves_loads_scripts_and_compiles(tmp_path):
    mask = grouped_mask(32, 50, 6, 8, (2,))
    linear = masked_linear(50, 32, mask)
    module = condensed_ops.CondensedLinear.from_linear(linear, mask, group_size=8)
    x = torch.randn(12, 50)
    module(x).square().sum().backward()
    linear(x).square().sum().backward()
    active_rows = module.active_rows
    expected = linear.weight.grad[active_rows].gather(1, module.idx.long().repeat_interleave(8, 0))
    torch.testing.assert_close(module.values.grad.reshape(-1, 6), expected)
    torch.testing.assert_close(module.bias.grad, linear.bias.grad)

    blank = condensed_ops.CondensedLinear(50, 32, 3)  # other sizes, row layout: the checkpoint decides
    blank.load_state_dict(module.state_dict())
    assert blank.group_size == 8 and blank.values.shape == module.values.shape
    torch.testing.assert_close(blank(x), module(x))
    path = tmp_path / "grouped.pt"
    torch.jit.save(torch.jit.script(module), str(path))
    torch.testing.assert_close(torch.jit.load(str(path))(x), module(x))
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(module, fullgraph=True, backend="eager")(x), module(x))


def test_grouped_conv2d_matches_the_masked_conv():
    conv = torch.nn.Conv2d(3, 16, 3, padding=1)
    mask = grouped_mask(16, 27, 5, 8).view(16, 3, 3, 3)
    with torch.no_grad():
        conv.weight.mul_(mask)
    module = condensed_ops.CondensedConv2d.from_conv2d(conv, mask, group_size=8)
    assert module.values.shape == (2, 8, 5)
    x = torch.randn(2, 3, 9, 7)
    torch.testing.assert_close(module(x), conv(x), rtol=1e-5, atol=1e-5)


def test_condense_groups_where_it_can_and_load_condensed_rebuilds():
    masks = {"0": grouped_mask(64, 40, 4, 8), "2": grouped_mask(10, 64, 6, 1)}
    model = torch.nn.Sequential(torch.nn.Linear(40, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    with torch.no_grad():
        for name, mask in masks.items():
            model.get_submodule(name).weight.mul_(mask)
    x = torch.randn(20, 40)
    expected = model(x)
    report = condensed_ops.condense(model, masks=masks, min_weights=0, group_size=8, inplace=False)
    # 10 rows: 8 does not divide them, so the last layer keeps the row layout.
    assert [layer.group_size for layer in report.converted] == [8, 1]
    assert "group" in str(report)
    torch.testing.assert_close(report.model(x), expected)
    blank = torch.nn.Sequential(torch.nn.Linear(40, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    condensed_ops.load_condensed(blank, report.model.state_dict())
    assert blank[0].group_size == 8
    torch.testing.assert_close(blank(x), expected)


def test_condense_keeps_the_row_layout_where_grouping_would_pad():
    # Constant fan-in but not grouped: a group's union would be mostly padding.
    mask = condensed_ops.masks.constant_fan_in_mask(64, 40, 4, generator=torch.Generator().manual_seed(1))
    model = torch.nn.Sequential(torch.nn.Linear(40, 64))
    report = condensed_ops.condense(model, masks={"0": mask}, min_weights=0, group_size=8)
    assert report.converted[0].group_size == 1 and report.converted[0].padded_entries == 0


@pytest.mark.parametrize("group_size", [0, -2, 2.0, True])
def test_bad_group_size_is_refused(group_size):
    with pytest.raises(ValueError, match="group_size must be an int >= 1"):
        condensed_ops.CondensedLinear.from_linear(torch.nn.Linear(8, 8), group_size=group_size)
    with pytest.raises(ValueError, match="group_size must be an int >= 1"):
        condensed_ops.condense(torch.nn.Sequential(torch.nn.Linear(8, 8)), group_size=group_size)


def test_group_size_must_divide_the_rows():
    with pytest.raises(ValueError, match="group_size=4 must divide the layer's 10 output rows"):
        condensed_ops.CondensedLinear.from_linear(torch.nn.Linear(8, 10), group_size=4)


def test_grouped_srigl_masks_condense_into_the_grouped_layout_exactly():
    """Train with grouped SRigL, condense with the same group size: no padding, same function."""
    from condensed_ops.srigl import SRigL

    g = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(48, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    updater = SRigL(model, sparsity=0.9, t_end=40, delta_t=5, optimizer=opt, generator=g, group_size=8)
    for _ in range(50):
        x, y = torch.randn(16, 48, generator=g), torch.randint(0, 10, (16,), generator=g)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        updater.step()
        opt.step()
    masks = {name: layer.mask for name, layer in updater.layers.items()}
    x = torch.randn(33, 48, generator=g)
    expected = model(x)
    report = condensed_ops.condense(model, masks=masks, min_weights=0, max_density=1.0, group_size=8, inplace=False)
    by_name = {layer.name: layer for layer in report.converted}
    assert by_name["0"].group_size == 8 and by_name["2"].group_size == 8
    assert by_name["0"].padded_entries == 0 and by_name["2"].padded_entries == 0
    torch.testing.assert_close(report.model(x), expected)
