"""CondensedLinear / CondensedConv2d and condense(): outputs and gradients against the
masked dense layer (float64 reference), storage, state dicts, TorchScript, torch.compile."""

import copy
from dataclasses import dataclass
from typing import Optional, Tuple

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import condensed_ops
from condensed_ops import CondensedConv2d, CondensedLinear, condense
from condensed_ops.masks import constant_fan_in_mask, pad_to_constant_fan_in
from condensed_ops.modules import CondensedLayer

from conftest import tolerances


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny layers: a second thread costs more than it saves on a busy machine.
    torch.set_num_threads(1)


# ---- cases ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class RowsCase:
    """A weight's rows: ``fan_in`` random columns each, ``ablated`` rows emptied, and
    with ``uneven`` some rows thinned so that converting must pad them."""

    name: str
    out_features: int
    in_features: int
    fan_in: int
    ablated: Tuple[int, ...] = ()
    uneven: bool = False

    def mask(self, seed: int = 0) -> Tensor:
        """bool ``[out, in]``."""
        g = torch.Generator().manual_seed(seed)
        mask = constant_fan_in_mask(self.out_features, self.in_features, self.fan_in, generator=g)
        mask[list(self.ablated)] = False
        if self.uneven:
            for row in range(self.out_features):
                # Rows 1, 4, 7, ... lose one entry and 2, 5, 8, ... two.
                columns = mask[row].nonzero().flatten()[: row % 3]
                mask[row, columns] = False
        return mask

    @property
    def active_neurons(self) -> int:
        return self.out_features - len(self.ablated)

    @property
    def padded_entries(self) -> int:
        thinned = [row % 3 for row in range(self.out_features) if row not in self.ablated] if self.uneven else []
        return sum(thinned)


ROWS_CASES = [
    RowsCase("constant", 13, 40, 7),
    RowsCase("ablated", 13, 40, 7, ablated=(0, 5, 12)),
    RowsCase("padded", 13, 40, 7, uneven=True),
    RowsCase("ablated_padded", 13, 40, 7, ablated=(3, 4), uneven=True),
    RowsCase("all_ablated", 6, 10, 3, ablated=tuple(range(6))),
    RowsCase("fan_in_equals_in", 5, 8, 8),
    RowsCase("one_active_row", 9, 17, 4, ablated=(0, 1, 2, 3, 5, 6, 7, 8)),
]
ROWS_IDS = [case.name for case in ROWS_CASES]


def masked_linear(case: RowsCase, bias: bool, *, zero_outside: bool, dtype=torch.float32, seed: int = 0) -> Tuple[nn.Linear, Tensor]:
    """An nn.Linear and its mask; with ``zero_outside`` the weight is zero outside the mask."""
    torch.manual_seed(seed)
    linear = nn.Linear(case.in_features, case.out_features, bias=bias, dtype=dtype)
    mask = case.mask(seed)
    if zero_outside:
        with torch.no_grad():
            linear.weight.mul_(mask)
    return linear, mask


def stored_mask(mask: Tensor) -> Tensor:
    """The entries a condensed module stores for ``mask``: its rows padded, empty rows left out."""
    return pad_to_constant_fan_in(mask, pad_empty_rows=False)[0]


def assert_close_to_reference(actual: Tensor, expected_float64: Tensor, fan_in: int) -> None:
    assert actual.shape == expected_float64.shape
    torch.testing.assert_close(actual.to(torch.float64), expected_float64, **tolerances(actual.dtype, fan_in))


def values_grad_as_dense(module: CondensedLayer) -> Tensor:
    """``module.values.grad`` scattered to the dense rows ``[out, in]`` it belongs to."""
    assert module.values.grad is not None
    active_dense = condensed_ops.to_dense(module.values.grad, module.idx, module.in_features)
    if module.active_rows is None:
        return active_dense
    return active_dense.new_zeros(module.out_features, module.in_features).index_copy(0, module.active_rows, active_dense)


BATCH_SHAPES = [(), (1,), (5,), (2, 3)]


# ---- CondensedLinear ----------------------------------------------------------------------------


@pytest.mark.parametrize("mask_source", ["mask", "nonzeros"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("case", ROWS_CASES, ids=ROWS_IDS)
def test_linear_matches_masked_dense(case, bias, mask_source):
    linear, mask = masked_linear(case, bias, zero_outside=mask_source == "nonzeros")
    module = CondensedLinear.from_linear(linear, mask if mask_source == "mask" else None)
    assert module.active_neurons == case.active_neurons
    assert module.padded_entries == case.padded_entries
    assert module.values.shape == module.idx.shape == (case.active_neurons, module.fan_in)
    assert (module.active_rows is None) == (not case.ablated)
    weight = (linear.weight * mask).detach().double()
    bias64 = None if linear.bias is None else linear.bias.detach().double()
    for batch_shape in BATCH_SHAPES:
        x = torch.randn(*batch_shape, case.in_features)
        assert_close_to_reference(module(x), F.linear(x.double(), weight, bias64), module.fan_in)


@pytest.mark.parametrize("case", ROWS_CASES, ids=ROWS_IDS)
def test_linear_to_dense_is_the_masked_weight(case):
    linear, mask = masked_linear(case, True, zero_outside=False)
    module = CondensedLinear.from_linear(linear, mask)
    assert torch.equal(module.to_dense(), linear.weight.detach() * mask)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("case", ROWS_CASES, ids=ROWS_IDS)
def test_linear_gradients_match_masked_dense(case, bias):
    # The masked dense layer's mask is what the module stores (padding included:
    # padded entries are zeros at first, then trainable like the others).
    linear, mask = masked_linear(case, bias, zero_outside=True, dtype=torch.float64)
    module = CondensedLinear.from_linear(linear)
    stored = stored_mask(mask)
    x = torch.randn(2, 3, case.in_features, dtype=torch.float64, requires_grad=True)
    x_dense = x.detach().clone().requires_grad_(True)
    grad_y = torch.randn(2, 3, case.out_features, dtype=torch.float64)

    module(x).backward(grad_y)
    F.linear(x_dense, linear.weight * stored, linear.bias).backward(grad_y)

    torch.testing.assert_close(x.grad, x_dense.grad)
    torch.testing.assert_close(values_grad_as_dense(module), linear.weight.grad * stored)
    if bias:
        torch.testing.assert_close(module.bias.grad, linear.bias.grad)


def test_linear_trains_like_masked_dense():
    # A few SGD steps: the condensed values follow the masked dense weights.
    case = RowsCase("train", 12, 30, 5, ablated=(2, 7), uneven=True)
    linear, mask = masked_linear(case, True, zero_outside=True, dtype=torch.float64)
    stored = stored_mask(mask)
    module = CondensedLinear.from_linear(linear)
    dense_opt = torch.optim.SGD(linear.parameters(), lr=0.1, momentum=0.9)
    condensed_opt = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9)
    for step in range(4):
        x = torch.randn(8, case.in_features, dtype=torch.float64)
        target = torch.randn(8, case.out_features, dtype=torch.float64)
        for model, opt in ((lambda v: F.linear(v, linear.weight * stored, linear.bias), dense_opt), (module, condensed_opt)):
            opt.zero_grad()
            F.mse_loss(model(x), target).backward()
            opt.step()
    torch.testing.assert_close(module.to_dense(), linear.weight.detach() * stored)
    torch.testing.assert_close(module.bias, linear.bias)


def test_frozen_layer_stays_frozen():
    linear, _ = masked_linear(ROWS_CASES[0], True, zero_outside=True)
    linear.weight.requires_grad_(False)
    module = CondensedLinear.from_linear(linear)
    assert not module.values.requires_grad and module.bias.requires_grad
    assert CondensedLinear.from_dense(linear.weight.detach()).values.requires_grad


def test_state_dict_with_bad_active_rows_fails():
    module = CondensedLinear.from_linear(masked_linear(ROWS_CASES[1], True, zero_outside=True)[0])
    state = module.state_dict()
    state["active_rows"] = torch.arange(10).flip(0).clamp(max=8)  # a repeated row
    with pytest.raises(RuntimeError, match="active_rows: entries must be distinct outputs"):
        CondensedLinear(40, 13, module.fan_in, active_neurons=10).load_state_dict(state)


def test_linear_rejects_wrong_input_width():
    module = CondensedLinear(10, 4, 3)
    with pytest.raises(ValueError, match=r"expected input \[\.\.\., 10\]"):
        module(torch.randn(2, 11))


def test_linear_constructor_is_a_random_static_sparse_layer():
    torch.manual_seed(0)
    module = CondensedLinear(50, 20, 6, active_neurons=15)
    assert module.values.shape == module.idx.shape == (15, 6)
    assert module.idx.dtype == torch.int16
    idx = module.idx.long()
    assert bool((idx[:, 1:] > idx[:, :-1]).all()), "columns must be distinct and ascending per row"
    assert 0 <= int(idx.min()) and int(idx.max()) < 50
    assert float(module.values.detach().abs().max()) <= 6**-0.5
    assert module.active_rows is not None and module.active_rows.tolist() == list(range(15))
    assert module(torch.randn(3, 50)).shape == (3, 20)


def test_module_dtype_conversion_keeps_indices():
    linear, mask = masked_linear(ROWS_CASES[1], True, zero_outside=True)
    module = CondensedLinear.from_linear(linear).double()
    assert module.values.dtype == module.bias.dtype == torch.float64
    assert module.idx.dtype == torch.int16 and module.active_rows.dtype == torch.int64
    x = torch.randn(4, 40, dtype=torch.float64)
    assert_close_to_reference(module(x), F.linear(x, linear.weight.double(), linear.bias.double()), module.fan_in)


# ---- CondensedConv2d --------------------------------------------------------------------------


@dataclass(frozen=True)
class ConvCase:
    name: str
    in_channels: int
    out_channels: int
    kernel_size: Tuple[int, int]
    fan_in: int
    stride: Tuple[int, int] = (1, 1)
    padding: Tuple[int, int] = (0, 0)
    dilation: Tuple[int, int] = (1, 1)
    image: Tuple[int, int] = (7, 9)  # H, W
    ablated: Tuple[int, ...] = ()
    uneven: bool = False

    def conv(self, bias: bool, dtype=torch.float32, seed: int = 0) -> Tuple[nn.Conv2d, Tensor]:
        """A Conv2d whose weight is zero outside its mask, and the mask (the weight's shape)."""
        torch.manual_seed(seed)
        conv = nn.Conv2d(
            self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding, self.dilation, bias=bias, dtype=dtype
        )
        mask = self.rows().mask(seed).view(conv.weight.shape)
        with torch.no_grad():
            conv.weight.mul_(mask)
        return conv, mask

    def rows(self) -> RowsCase:
        """The weight's rows ``[C_out, C_in * kh * kw]``."""
        in_features = self.in_channels * self.kernel_size[0] * self.kernel_size[1]
        return RowsCase(self.name, self.out_channels, in_features, self.fan_in, self.ablated, self.uneven)

    def reference(self, x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        return F.conv2d(x.double(), weight.double(), None if bias is None else bias.double(), self.stride, self.padding, self.dilation)


CONV_CASES = [
    ConvCase("k3", 3, 5, (3, 3), 9),
    ConvCase("k3x2_stride2x1_pad1x2", 4, 6, (3, 2), 7, stride=(2, 1), padding=(1, 2), image=(8, 7)),
    ConvCase("k3_stride2_pad1_dil2x1", 2, 4, (3, 3), 5, stride=(2, 2), padding=(1, 1), dilation=(2, 1), image=(11, 10)),
    ConvCase("k1", 3, 8, (1, 1), 2, image=(5, 4)),
    ConvCase("k5x3_ablated_padded", 3, 7, (5, 3), 12, stride=(1, 3), padding=(2, 0), dilation=(1, 2), image=(9, 12), ablated=(1, 4), uneven=True),
    ConvCase("kernel_covers_image", 2, 3, (4, 4), 10, image=(4, 4)),
]
CONV_IDS = [case.name for case in CONV_CASES]
IMAGE_BATCHES = [None, 1, 3]  # None: an unbatched [C, H, W] image


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("case", CONV_CASES, ids=CONV_IDS)
def test_conv2d_matches_masked_dense(case, bias):
    conv, mask = case.conv(bias)
    module = CondensedConv2d.from_conv2d(conv)
    assert module.active_neurons == case.out_channels - len(case.ablated)
    assert torch.equal(module.to_dense(), conv.weight.detach())
    for batch in IMAGE_BATCHES:
        x = torch.randn(*(() if batch is None else (batch,)), case.in_channels, *case.image)
        assert_close_to_reference(module(x), case.reference(x, conv.weight.detach(), conv.bias), module.fan_in)


@pytest.mark.parametrize("case", CONV_CASES, ids=CONV_IDS)
def test_conv2d_gradients_match_masked_dense(case):
    conv, mask = case.conv(True, dtype=torch.float64)
    module = CondensedConv2d.from_conv2d(conv, mask)
    stored = stored_mask(mask.flatten(1)).view(mask.shape)
    x = torch.randn(2, case.in_channels, *case.image, dtype=torch.float64, requires_grad=True)
    x_dense = x.detach().clone().requires_grad_(True)
    y = module(x)
    grad_y = torch.randn_like(y)
    y.backward(grad_y)
    case.reference(x_dense, conv.weight * stored, conv.bias).backward(grad_y)

    torch.testing.assert_close(x.grad, x_dense.grad)
    torch.testing.assert_close(values_grad_as_dense(module).view(mask.shape), conv.weight.grad * stored)
    torch.testing.assert_close(module.bias.grad, conv.bias.grad)


@pytest.mark.parametrize(
    "conv, message",
    [
        (nn.Conv2d(4, 4, 3, groups=2), "groups=2"),
        (nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), "padding_mode='reflect'"),
        (nn.Conv2d(4, 4, 2, padding="same"), "uneven padding"),
    ],
    ids=["groups", "padding_mode", "same_uneven"],
)
def test_from_conv2d_rejects_unsupported(conv, message):
    with pytest.raises(ValueError, match=message):
        CondensedConv2d.from_conv2d(conv)


@pytest.mark.parametrize("padding", ["same", "valid"])
def test_from_conv2d_string_padding(padding):
    conv = nn.Conv2d(3, 4, (3, 5), padding=padding, dilation=(2, 1))
    module = CondensedConv2d.from_conv2d(conv)
    x = torch.randn(2, 3, 8, 9)
    assert_close_to_reference(module(x), F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), padding=padding, dilation=(2, 1)), module.fan_in)


def test_conv2d_rejects_wrong_channels():
    module = CondensedConv2d(3, 4, 3, 5)
    with pytest.raises(ValueError, match="expected 3 input channels"):
        module(torch.randn(1, 4, 6, 6))


# ---- storage, state dict, index dtype --------------------------------------------------------


def test_storage_bytes_and_repr():
    case = RowsCase("storage", 10, 20, 3, ablated=(0, 9))
    linear, mask = masked_linear(case, True, zero_outside=True)
    module = CondensedLinear.from_linear(linear)
    # values 8x3 float32, idx 8x3 int16, bias 10 float32, active_rows 8 int64
    assert module.storage_bytes() == 8 * 3 * 4 + 8 * 3 * 2 + 10 * 4 + 8 * 8 == 248
    assert module.dense_storage_bytes() == (10 * 20 + 10) * 4 == 840
    text = repr(module)
    for fact in ("in_features=20", "out_features=10", "fan_in=3", "ablated_neurons=2", "padded_entries=0", "248 B", "29.5% of dense 840 B"):
        assert fact in text, text

    no_bias = CondensedLinear.from_linear(masked_linear(RowsCase("nb", 10, 20, 3), False, zero_outside=True)[0])
    assert no_bias.storage_bytes() == 10 * 3 * (4 + 2) and no_bias.dense_storage_bytes() == 10 * 20 * 4

    case = CONV_CASES[4]  # 7 output channels, 2 ablated, 3x5x3 inputs, fan-in 12
    conv = CondensedConv2d.from_conv2d(case.conv(True)[0])
    assert conv.storage_bytes() == 5 * 12 * (4 + 2) + 7 * 4 + 5 * 8
    assert conv.dense_storage_bytes() == (7 * 3 * 5 * 3 + 7) * 4
    assert conv.padded_entries == case.rows().padded_entries > 0
    assert f"padded_entries={conv.padded_entries}" in repr(conv) and "kernel_size=(5, 3)" in repr(conv)


@pytest.mark.parametrize(
    "in_features, expected", [(1, torch.int16), (32767, torch.int16), (32768, torch.int32)], ids=["1", "32767", "32768"]
)
def test_index_dtype_follows_in_features(in_features, expected):
    weight = torch.zeros(2, in_features)
    weight[0, -1] = 1.0
    weight[1, 0] = 2.0
    module = CondensedLinear.from_dense(weight)
    assert module.idx.dtype == expected
    assert module.idx.flatten().tolist() == [in_features - 1, 0]
    x = torch.randn(3, in_features)
    torch.testing.assert_close(module(x), torch.stack([x[:, -1], 2 * x[:, 0]], dim=1))


def test_index_dtype_of_a_wide_conv_and_override():
    conv = CondensedConv2d.from_conv2d(nn.Conv2d(4096, 1, 3, bias=False))  # 36864 columns
    assert conv.idx.dtype == torch.int32
    assert CondensedLinear.from_dense(torch.eye(4), index_dtype=torch.int64).idx.dtype == torch.int64


def _round_trip(module: CondensedLayer, blank: CondensedLayer, x: Tensor) -> None:
    state = module.state_dict()
    expected_keys = {"values", "idx"} | ({"bias"} if module.bias is not None else set()) | ({"active_rows"} if module.active_rows is not None else set())
    assert set(state) == expected_keys
    blank.load_state_dict(state)
    assert blank.idx.dtype == module.idx.dtype
    torch.testing.assert_close(blank(x), module(x), rtol=0, atol=0)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("case", ROWS_CASES[:4], ids=ROWS_IDS[:4])
def test_linear_state_dict_round_trip(case, bias):
    module = CondensedLinear.from_linear(masked_linear(case, bias, zero_outside=True)[0])
    active = case.active_neurons if case.ablated else None
    blank = CondensedLinear(case.in_features, case.out_features, module.fan_in, bias, active_neurons=active)
    _round_trip(module, blank, torch.randn(4, case.in_features))


def test_conv2d_state_dict_round_trip():
    case = CONV_CASES[4]
    module = CondensedConv2d.from_conv2d(case.conv(True)[0])
    blank = CondensedConv2d(
        case.in_channels, case.out_channels, case.kernel_size, module.fan_in, case.stride, case.padding, case.dilation,
        active_neurons=module.active_neurons,
    )
    _round_trip(module, blank, torch.randn(2, case.in_channels, *case.image))


def test_state_dict_loads_into_a_module_of_other_sizes():
    # Sizes come from the checkpoint: fan_in, active neurons, ablation.
    module = CondensedLinear.from_linear(masked_linear(ROWS_CASES[1], True, zero_outside=True)[0])
    for blank in (CondensedLinear(40, 13, 3), CondensedLinear(40, 13, 9, active_neurons=4)):
        blank.load_state_dict(module.state_dict())
        assert (blank.fan_in, blank.active_neurons) == (module.fan_in, module.active_neurons)
        x = torch.randn(3, 40)
        assert torch.equal(blank(x), module(x))
    full = CondensedLinear.from_linear(masked_linear(ROWS_CASES[0], True, zero_outside=True)[0])
    ablated = CondensedLinear(40, full.out_features, 2, active_neurons=3)
    ablated.load_state_dict(full.state_dict())
    assert ablated.active_rows is None and torch.equal(ablated(torch.ones(2, 40)), full(torch.ones(2, 40)))


def _checkpoint(ablated=True):
    case = ROWS_CASES[3] if ablated else ROWS_CASES[0]
    module = CondensedLinear.from_linear(masked_linear(case, True, zero_outside=True)[0])
    return module, {key: value.clone() for key, value in module.state_dict().items()}


def _spoil(state, key, change):
    state = dict(state)
    state[key] = change(state[key].clone())
    return state


_BAD_CHECKPOINTS = [
    ("idx_wraps_in_int16", "idx", lambda t: t.long().index_fill_(1, torch.tensor([0]), 2**16 + 3), r"idx: entry \[0, 0\] = 65539 is outside"),
    ("idx_float", "idx", lambda t: t.float() + 0.75, r"idx: must be an integer tensor, got torch.float32"),
    ("idx_negative", "idx", lambda t: t.index_fill_(0, torch.tensor([2]), -1), r"idx: entry \[2, 0\] = -1 is outside"),
    ("idx_too_large", "idx", lambda t: t.index_fill_(0, torch.tensor([1]), 40), r"idx: entry \[1, 0\] = 40 is outside \[0, in_features=40\)"),
    ("idx_shape", "idx", lambda t: t[:, :-1], r"idx: must have shape \[\d+, \d+\] for values of shape"),
    ("values_4d", "values", lambda t: t[None, None], r"values: must be a floating-point tensor \[active_neurons, fan_in\]"),
    ("values_int", "values", lambda t: t.long(), r"values: must be a floating-point tensor \[active_neurons, fan_in\]"),
    ("values_too_wide", "values", lambda t: torch.zeros(t.shape[0], 41), r"values: has shape \[\d+, 41\]"),
    ("active_rows_negative", "active_rows", lambda t: t.index_fill_(0, torch.tensor([0]), -1), r"active_rows: entries must lie in \[0, out_features=13\)"),
    ("active_rows_too_large", "active_rows", lambda t: t.index_fill_(0, torch.tensor([0]), 13), r"active_rows: entries must lie in \[0, out_features=13\)"),
    ("active_rows_repeated", "active_rows", lambda t: t.index_fill_(0, torch.tensor([1]), int(t[0])), r"active_rows: entries must be distinct"),
    ("active_rows_float", "active_rows", lambda t: t.double(), r"active_rows: must be a 1-D integer tensor"),
    ("active_rows_short", "active_rows", lambda t: t[1:], r"active_rows: must name one output per row of values"),
]


@pytest.mark.parametrize("key,change,message", [c[1:] for c in _BAD_CHECKPOINTS], ids=[c[0] for c in _BAD_CHECKPOINTS])
def test_a_bad_checkpoint_raises_naming_the_key_and_changes_nothing(key, change, message):
    module, state = _checkpoint()
    target, _ = _checkpoint()
    with torch.no_grad():
        target.values.mul_(2)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(RuntimeError, match=message):
        target.load_state_dict(_spoil(state, key, change))
    after = target.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_a_checkpoint_without_active_rows_must_fill_every_output():
    module, state = _checkpoint()
    del state["active_rows"]
    with pytest.raises(RuntimeError, match=r"active_rows: missing: values has 11 rows for out_features=13"):
        CondensedLinear(40, 13, 2).load_state_dict(state)
    with pytest.raises(RuntimeError, match=r"idx: missing"):
        CondensedLinear(40, 13, 2).load_state_dict({"values": state["values"], "bias": state["bias"]})


def test_load_condensed_into_a_dense_architecture(tmp_path):
    torch.manual_seed(0)

    def make():
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 6 * 6, 20), nn.ReLU(), nn.Linear(20, 4))

    model = make()
    masks = {"0": constant_fan_in_mask(8, 27, 5).view(8, 3, 3, 3), "2": constant_fan_in_mask(20, 288, 30)}
    masks["2"][7] = False  # an ablated neuron
    condense(model, masks=masks, min_weights=0)
    assert isinstance(model[0], CondensedConv2d) and isinstance(model[2], CondensedLinear)
    torch.save(model.state_dict(), tmp_path / "condensed.pt")
    loaded = condensed_ops.load_condensed(make(), torch.load(tmp_path / "condensed.pt"))  # weights_only=True
    assert isinstance(loaded[0], CondensedConv2d) and isinstance(loaded[2], CondensedLinear) and isinstance(loaded[4], nn.Linear)
    x = torch.randn(2, 3, 6, 6)
    assert torch.equal(loaded(x), model(x))
    with pytest.raises(ValueError, match="does not have"):
        condensed_ops.load_condensed(nn.Sequential(nn.Linear(3, 3)), {"9.values": torch.zeros(1, 1), "9.idx": torch.zeros(1, 1)})


# ---- TorchScript and torch.compile --------------------------------------------------------------


def module_under_test(name: str) -> Tuple[CondensedLayer, Tensor]:
    """A fresh module and input: Linear with and without ablated rows, Conv2d with them."""
    ablated = ROWS_CASES[3]
    if name == "linear":
        return CondensedLinear.from_linear(masked_linear(ROWS_CASES[0], True, zero_outside=True)[0]), torch.randn(2, 3, 40)
    if name == "linear_ablated":
        return CondensedLinear.from_linear(masked_linear(ablated, True, zero_outside=True)[0]), torch.randn(5, 40)
    if name == "linear_nobias_ablated":
        return CondensedLinear.from_linear(masked_linear(ablated, False, zero_outside=True)[0]), torch.randn(40)
    assert name == "conv2d_ablated"
    case = CONV_CASES[4]
    return CondensedConv2d.from_conv2d(case.conv(True)[0]), torch.randn(2, case.in_channels, *case.image)


MODULE_NAMES = ["linear", "linear_ablated", "linear_nobias_ablated", "conv2d_ablated"]


@pytest.mark.parametrize("name", MODULE_NAMES)
def test_script_save_load(tmp_path, name):
    module, x = module_under_test(name)
    scripted = torch.jit.script(module)
    torch.jit.save(scripted, str(tmp_path / "module.pt"))
    loaded = torch.jit.load(str(tmp_path / "module.pt"))
    expected = module(x)
    torch.testing.assert_close(scripted(x), expected, rtol=0, atol=0)
    torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)
    loaded(x).sum().backward()  # the C++ autograd needs no Python
    assert loaded.values.grad is not None and loaded.values.grad.shape == module.values.shape


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("name", MODULE_NAMES)
def test_compile_fullgraph_forward_backward(name, dynamic, fresh_dynamo):
    module, x = module_under_test(name)
    compiled_module = copy.deepcopy(module)
    compiled = torch.compile(compiled_module, fullgraph=True, backend="aot_eager", dynamic=dynamic)
    x_eager = x.clone().requires_grad_(True)
    x_compiled = x.clone().requires_grad_(True)
    y_eager = module(x_eager)
    y_compiled = compiled(x_compiled)
    torch.testing.assert_close(y_compiled, y_eager, rtol=0, atol=0)
    grad_y = torch.randn_like(y_eager)
    y_eager.backward(grad_y)
    y_compiled.backward(grad_y)
    torch.testing.assert_close(x_compiled.grad, x_eager.grad, rtol=0, atol=0)
    for (param_name, expected), actual in zip(module.named_parameters(), compiled_module.parameters()):
        torch.testing.assert_close(actual.grad, expected.grad, rtol=0, atol=0, msg=param_name)
    if x.dim() > 1:  # another leading size: dynamic shapes must not bake in the first
        x_more = torch.cat([x, x[:1]])
        torch.testing.assert_close(compiled(x_more), module(x_more), rtol=0, atol=0)


# ---- condense ---------------------------------------------------------------------------------


def _sparsify(layer: nn.Module, mask: Tensor) -> Tensor:
    with torch.no_grad():
        layer.weight.mul_(mask.view(layer.weight.shape))
    return mask


def make_mixed_model() -> Tuple[nn.Module, dict]:
    """A small CNN mixing sparse Linear/Conv2d, a grouped conv, dense layers and nesting;
    returns it and the facts condense should report about it."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),  # 0: constant fan-in -> converted
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=2),  # 2: grouped -> skipped
        nn.Sequential(  # 3
            nn.Conv2d(8, 6, 3, stride=2),  # 3.0: one ablated channel -> converted
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
        ),
        nn.Linear(24, 32),  # 4: uneven rows -> converted with padding
        nn.ReLU(),
        nn.Linear(32, 32),  # 6: dense -> skipped
        nn.ReLU(),
        nn.Linear(32, 10),  # 8: masked at fan-in 8, one kept weight exactly 0
    )
    g = torch.Generator().manual_seed(1)
    _sparsify(model[0], constant_fan_in_mask(8, 27, 7, generator=g))
    _sparsify(model[2], constant_fan_in_mask(8, 36, 5, generator=g))
    conv_mask = constant_fan_in_mask(6, 72, 10, generator=g)
    conv_mask[2] = False
    _sparsify(model[3][0], conv_mask)
    _sparsify(model[4], RowsCase("uneven", 32, 24, 6, uneven=True).mask(seed=2))
    last_mask = _sparsify(model[8], constant_fan_in_mask(10, 32, 8, generator=g))
    with torch.no_grad():
        model[8].weight[0, last_mask[0].nonzero()[0]] = 0.0
    padded_rows_4 = sum(row % 3 for row in range(32))
    facts = {
        "converted": {
            # name: (kind, out, in, fan_in, active neurons, padded entries)
            "0": ("Conv2d", 8, 27, 7, 8, 0),
            "3.0": ("Conv2d", 6, 72, 10, 5, 0),
            "4": ("Linear", 32, 24, 6, 32, padded_rows_4),
            "8": ("Linear", 10, 32, 8, 10, 0),
        },
        "skipped": {"2": "groups=2", "6": "too dense"},
        "last_mask": last_mask,
    }
    return model, facts


def test_condense_mixed_model_report_and_outputs():
    model, facts = make_mixed_model()
    original = copy.deepcopy(model)
    report = condense(model, min_weights=0, masks={"8": facts["last_mask"]})
    assert report.model is model

    converted = {layer.name: layer for layer in report.converted}
    assert list(converted) == list(facts["converted"])
    for name, (kind, out_features, in_features, fan_in, active, padded) in facts["converted"].items():
        layer = converted[name]
        module = model.get_submodule(name)
        assert isinstance(module, CondensedConv2d if kind == "Conv2d" else CondensedLinear)
        assert (layer.kind, layer.out_features, layer.in_features, layer.fan_in) == (kind, out_features, in_features, fan_in)
        assert (layer.ablated_neurons, layer.padded_entries) == (out_features - active, padded)
        assert layer.padding_fraction == pytest.approx(padded / (active * fan_in))
        assert layer.density == pytest.approx(active * fan_in / (out_features * in_features))
        assert layer.dense_bytes == (out_features * in_features + out_features) * 4
        index_bytes = active * 8 if active < out_features else 0
        assert layer.condensed_bytes == module.storage_bytes() == active * fan_in * (4 + 2) + out_features * 4 + index_bytes
    assert report.dense_bytes() == sum(layer.dense_bytes for layer in report.converted)
    assert report.condensed_bytes() < report.dense_bytes()

    skipped = {layer.name: layer for layer in report.skipped}
    assert set(skipped) == set(facts["skipped"])
    for name, reason in facts["skipped"].items():
        assert reason in skipped[name].reason
        assert type(model.get_submodule(name)) in (nn.Linear, nn.Conv2d)

    text = str(report)
    assert "converted 4 of 6" in text
    for name in ["3.0", "too dense", "groups=2", "32x24", f"{facts['converted']['4'][5]} ("]:
        assert name in text, text

    x = torch.randn(3, 3, 9, 9)
    torch.testing.assert_close(model(x), original(x), rtol=1e-5, atol=1e-5)


def test_condense_without_mask_pads_a_kept_zero():
    model, facts = make_mixed_model()
    report = condense(model, min_weights=0)
    last = next(layer for layer in report.converted if layer.name == "8")
    assert last.padded_entries == 1  # the kept weight that is exactly 0 is not a nonzero


def test_condense_not_inplace_leaves_the_model():
    model, _ = make_mixed_model()
    before = copy.deepcopy(model.state_dict())
    report = condense(model, min_weights=0, inplace=False)
    assert report.model is not model
    assert isinstance(report.model[0], CondensedConv2d) and isinstance(model[0], nn.Conv2d)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    x = torch.randn(2, 3, 9, 9)
    torch.testing.assert_close(report.model(x), model(x), rtol=1e-5, atol=1e-5)


def test_condense_thresholds():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 10), nn.Linear(10, 10))
    _sparsify(model[0], constant_fan_in_mask(10, 20, 12))  # density 0.6
    uneven = torch.zeros(10, 10, dtype=torch.bool)
    uneven[:, 0] = True
    uneven[0, :5] = True  # one row of 5, nine of 1: padding 36 of 50 stored
    _sparsify(model[1], uneven)

    report = condense(copy.deepcopy(model), min_weights=0)
    reasons = {layer.name: layer.reason for layer in report.skipped}
    assert "density 0.600 > max_density 0.5" in reasons["0"]
    assert "padding would be 72.0%" in reasons["1"]

    report = condense(copy.deepcopy(model), max_density=0.7, max_padding=0.75, min_weights=0)
    assert [layer.name for layer in report.converted] == ["0", "1"]


def test_condense_keeps_small_linears_by_default():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(300, 400), nn.Linear(400, 200))  # 120k and 80k weights
    for layer in model:
        _sparsify(layer, constant_fan_in_mask(layer.out_features, layer.in_features, layer.in_features // 10))
    report = condense(copy.deepcopy(model))
    assert [layer.name for layer in report.converted] == ["0"]
    assert "too small to gain at batch 1: 80000 weights < min_weights 100000" in report.skipped[0].reason
    assert "too small" in str(report)
    assert [layer.name for layer in condense(copy.deepcopy(model), min_weights=0).converted] == ["0", "1"]
    with pytest.raises(ValueError, match="min_weights must be >= 0"):
        condense(model, min_weights=-1)


def test_condense_skips_what_a_swap_would_break():
    torch.manual_seed(0)

    class Subclassed(nn.Linear):
        pass

    shared = nn.Linear(6, 6)
    tied_a, tied_b = nn.Linear(6, 6), nn.Linear(6, 6)
    tied_b.weight = tied_a.weight
    hooked = nn.Linear(6, 6)
    hooked.register_forward_hook(lambda module, args, output: output * 2)
    model = nn.Sequential(shared, tied_a, tied_b, hooked, Subclassed(6, 6), nn.Sequential(shared))
    for layer in (shared, tied_a, hooked, model[4]):
        _sparsify(layer, constant_fan_in_mask(6, 6, 2))
    original = copy.deepcopy(model)

    report = condense(model, min_weights=0)
    assert [layer.name for layer in report.converted] == ["0"]
    assert model[0] is model[5][0] and isinstance(model[0], CondensedLinear), "a shared module is replaced at every name"
    reasons = {layer.name: layer.reason for layer in report.skipped}
    assert set(reasons) == {"1", "2", "3", "4"}
    assert "shared" in reasons["1"] and "shared" in reasons["2"]
    assert "hooks" in reasons["3"] and "subclass" in reasons["4"]
    x = torch.randn(3, 6)
    torch.testing.assert_close(model(x), original(x), rtol=1e-5, atol=1e-5)

    root = nn.Linear(6, 6)
    _sparsify(root, constant_fan_in_mask(6, 6, 2))
    assert "the model is itself the layer" in condense(root).skipped[0].reason


def test_condense_rejects_unknown_mask_names():
    with pytest.raises(ValueError, match="nope"):
        condense(nn.Sequential(nn.Linear(4, 4)), masks={"nope": torch.ones(4, 4, dtype=torch.bool)})


def test_condensed_model_scripts():
    model, _ = make_mixed_model()
    condense(model, min_weights=0)
    scripted = torch.jit.script(model)
    x = torch.randn(2, 3, 9, 9)
    torch.testing.assert_close(scripted(x), model(x), rtol=0, atol=0)


# ---- .weight: what model code reads of the replaced layer -------------------------------


@pytest.mark.parametrize("make", [
    lambda: nn.Linear(24, 10),
    lambda: nn.Conv2d(3, 8, (3, 2)),
])
def test_weight_answers_the_replaced_modules_metadata_and_builds_values_on_use(make):
    torch.manual_seed(0)
    dense = make().double()
    rows = dense.weight.detach().flatten(1)
    _sparsify(dense, constant_fan_in_mask(rows.shape[0], rows.shape[1], 4).view(dense.weight.shape))
    condensed = (CondensedLinear.from_linear if isinstance(dense, nn.Linear) else CondensedConv2d.from_conv2d)(dense)
    weight = condensed.weight
    assert (weight.shape, weight.dtype, weight.device, weight.requires_grad) == (
        dense.weight.shape, dense.weight.dtype, dense.weight.device, True
    )
    assert weight.size(0) == weight.shape[0] and weight.dim() == dense.weight.dim() and weight.numel() == dense.weight.numel()
    torch.testing.assert_close(weight.dense(), dense.weight.detach(), rtol=0, atol=0)
    torch.testing.assert_close(weight + 0, dense.weight.detach(), rtol=0, atol=0)  # operators
    torch.testing.assert_close(weight.sum(), dense.weight.sum().detach())  # Tensor methods
    x = torch.randn(5, dense.weight.shape[1], dtype=torch.float64) if isinstance(dense, nn.Linear) else None
    if x is not None:
        y = F.linear(x, weight)  # torch functions take it; the gradient reaches values
        y.sum().backward()
        assert condensed.values.grad is not None and condensed.values.grad.abs().sum() > 0


def test_writes_through_weight_raise_naming_the_module():
    condensed = CondensedLinear(16, 8, 4)
    for write in (
        lambda w: nn.init.normal_(w),
        lambda w: w.mul_(2),
        lambda w: w.data.zero_(),
        lambda w: w.copy_(torch.zeros(8, 16)),
    ):
        with pytest.raises(RuntimeError, match=r"CondensedLinear\(out=8, in=16, fan_in=4\).*write its `values`"):
            write(condensed.weight)
    assert "DenseWeightView(shape=[8, 16]" in repr(condensed.weight)


def test_modules_with_weight_still_script():
    model = nn.Sequential(CondensedLinear(16, 8, 4), nn.ReLU(), CondensedLinear(8, 4, 2))
    scripted = torch.jit.script(model)
    x = torch.randn(3, 16)
    torch.testing.assert_close(scripted(x), model(x))
