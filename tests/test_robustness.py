"""Whatever a user's code does to a layer's tensors, the modules and ops give the
right answer or raise: fused optimizers, writes through ``.data`` (signalled with
mark_modified or not), out-of-range indices on every layout, index dtypes too
narrow for the layer, and mismatched dtypes. Ends with a seeded fuzz of all of it.

``.ci/asan_check.sh`` runs this file against the CPU ops built with
``-fsanitize=address,undefined``, so a read out of bounds fails here even when it
would not crash."""

import random
import time
from typing import Callable, Dict, List, Optional, Tuple

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import condensed_ops
from condensed_ops import CondensedConv2d, CondensedLinear, mark_modified
from condensed_ops.masks import constant_fan_in_mask, grouped_fan_in_mask
from condensed_ops.modules import CondensedLayer

from conftest import INDEX_DTYPES, tolerances

WINDOW_MAX_BATCH = int(condensed_ops._C.WINDOW_MAX_BATCH)
KINDS = ("row", "ablated", "grouped", "conv")
IN_FEATURES, OUT_FEATURES, FAN_IN, GROUP = 70, 24, 9, 4
CONV_CHANNELS, CONV_OUT = 6, 10  # 6 * 3 * 3 = 54 columns per output channel


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


# ---- layers and their float64 reference ----------------------------------------------------


def make_layer(kind: str, dtype=torch.float32, index_dtype=None, seed: int = 0) -> CondensedLayer:
    """A trainable layer of ``kind``: every row its own columns ("row"), rows 3, 10 and
    11 ablated ("ablated"), runs of GROUP rows sharing columns ("grouped"), or a 3x3
    conv with two ablated channels ("conv")."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    if kind == "conv":
        conv = nn.Conv2d(CONV_CHANNELS, CONV_OUT, 3, padding=1).to(dtype)
        mask = constant_fan_in_mask(CONV_OUT, CONV_CHANNELS * 9, FAN_IN, generator).view_as(conv.weight).clone()
        mask[[2, 7]] = False
        return CondensedConv2d.from_conv2d(conv, mask, index_dtype)
    linear = nn.Linear(IN_FEATURES, OUT_FEATURES).to(dtype)
    if kind == "grouped":
        mask = grouped_fan_in_mask(OUT_FEATURES, IN_FEATURES, FAN_IN, GROUP, generator)
        return CondensedLinear.from_linear(linear, mask, index_dtype, group_size=GROUP)
    mask = constant_fan_in_mask(OUT_FEATURES, IN_FEATURES, FAN_IN, generator)
    if kind == "ablated":
        mask[[3, 10, 11]] = False
    return CondensedLinear.from_linear(linear, mask, index_dtype)


def sample_input(layer: CondensedLayer, rows: int, generator: Optional[torch.Generator] = None) -> Tensor:
    """``rows`` rows of the layer's kernel input: samples of a linear layer, output
    pixels of a conv (one image of ``rows`` pixels)."""
    dtype = layer.values.dtype
    if isinstance(layer, CondensedConv2d):
        return torch.randn(1, CONV_CHANNELS, 1, rows, generator=generator).to(dtype)
    return torch.randn(rows, IN_FEATURES, generator=generator).to(dtype)


def dense_rows(layer: CondensedLayer, values: Tensor, idx: Tensor) -> Tensor:
    """The float64 weight rows ``[out, in]`` that ``values`` and ``idx`` hold for ``layer``."""
    values = values.detach().to(torch.float64)
    if values.dim() == 3:  # grouped: each idx row serves group_size value rows
        idx = idx.repeat_interleave(values.shape[1], dim=0)
        values = values.reshape(-1, values.shape[2])
    active = torch.zeros(values.shape[0], layer.in_features, dtype=torch.float64)
    active.scatter_add_(1, idx.long(), values)
    if layer.active_rows is None:
        return active
    return torch.zeros(layer.out_features, layer.in_features, dtype=torch.float64).index_copy(0, layer.active_rows, active)


def reference(layer: CondensedLayer, x: Tensor, values: Tensor, idx: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """The float64 output for ``values``, ``idx`` and ``bias`` (None: the layer's)."""
    weight = dense_rows(layer, values, idx)
    bias = layer.bias if bias is None else bias
    bias = None if bias is None else bias.detach().to(torch.float64)
    if isinstance(layer, CondensedConv2d):
        weight = weight.view(layer.out_channels, layer.in_channels, *layer.kernel_size)
        return F.conv2d(x.to(torch.float64), weight, bias, layer.stride, layer.padding, layer.dilation)
    return F.linear(x.to(torch.float64), weight, bias)


def matches(layer: CondensedLayer, y: Tensor, x: Tensor, values: Tensor, idx: Tensor, bias: Optional[Tensor] = None) -> bool:
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= layer.in_features):
        return False  # no result can come from an out-of-range index
    expected = reference(layer, x, values, idx, bias)
    return y.shape == expected.shape and torch.allclose(y.detach().to(torch.float64), expected, **tolerances(y.dtype, FAN_IN))


def assert_current(layer: CondensedLayer, y: Tensor, x: Tensor) -> None:
    expected = reference(layer, x, layer.values, layer.idx)
    torch.testing.assert_close(y.detach().to(torch.float64), expected, **tolerances(y.dtype, FAN_IN))


def eval_forward(layer: CondensedLayer, rows: int, seed: int = 1) -> Tuple[Tensor, Tensor]:
    x = sample_input(layer, rows, torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return x, layer.eval()(x)


# ---- 1. optimizers that write without moving the version counter ---------------------------


class DataWritingSGD(torch.optim.Optimizer):
    """Plain SGD written the old way, through ``p.data``: torch sees no in-place op."""

    def __init__(self, params, lr: float) -> None:
        super().__init__(params, dict(lr=lr))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.data.add_(p.grad, alpha=-group["lr"])


OPTIMIZERS: Dict[str, Callable] = {
    "adamw-fused": lambda p: torch.optim.AdamW(p, lr=0.05, fused=True),
    "adam-fused": lambda p: torch.optim.Adam(p, lr=0.05, fused=True),
    "sgd-fused": lambda p: torch.optim.SGD(p, lr=0.5, momentum=0.9, fused=True),
    "adamw-foreach": lambda p: torch.optim.AdamW(p, lr=0.05, foreach=True),
    "sgd-data-writes": lambda p: DataWritingSGD(p, lr=0.5),
}


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("kind", KINDS)
def test_inference_after_an_optimizer_step_uses_the_new_weights(optimizer, kind):
    layer = make_layer(kind)
    opt = OPTIMIZERS[optimizer](layer.parameters())
    for rows in (1, WINDOW_MAX_BATCH, 2 * WINDOW_MAX_BATCH):
        eval_forward(layer, rows)  # fills every inference cache from the old weights
    before = layer.values.detach().clone()
    for step in range(2):
        layer.train()
        layer(sample_input(layer, 16, torch.Generator().manual_seed(10 + step))).square().sum().backward()
        opt.step()
        opt.zero_grad()
        assert not torch.equal(layer.values.detach(), before), "the step changed nothing: the test could not fail"
        for rows in (1, WINDOW_MAX_BATCH, 2 * WINDOW_MAX_BATCH):
            x, y = eval_forward(layer, rows, seed=step)
            assert_current(layer, y, x)


def test_the_optimizer_hook_marks_only_parameters_with_a_gradient():
    layer = make_layer("row")
    layer.bias.requires_grad_(False)
    opt = torch.optim.AdamW(layer.parameters(), fused=True)
    layer(sample_input(layer, 4)).sum().backward()
    versions = (layer.values._version, layer.bias._version)
    opt.step()
    assert layer.values._version > versions[0]
    assert layer.bias._version == versions[1]


# ---- 2. out-of-range indices written through .data, on every route -------------------------


def bad_values(index_dtype: torch.dtype, in_features: int) -> List[int]:
    values = [in_features, -1, 30000]
    values += {torch.int16: [-32768, 32767], torch.int32: [2**31 - 1, -(2**31)], torch.int64: [2**33, -(2**40)]}[index_dtype]
    return values


def write_bad_index(layer: CondensedLayer, value: int, position: int = 5) -> None:
    layer.idx.data.view(-1)[position] = value


ROUTES = ("mark_modified", "values_in_place", "idx_in_place", "unsignalled")


def signal(layer: CondensedLayer, route: str) -> None:
    if route == "mark_modified":
        mark_modified(layer)
    elif route == "values_in_place":
        with torch.no_grad():
            layer.values.mul_(0.5)
    elif route == "idx_in_place":
        layer.idx.add_(0)


def _bad_index_cases():
    for index_dtype in INDEX_DTYPES:
        for kind in KINDS:
            in_features = CONV_CHANNELS * 9 if kind == "conv" else IN_FEATURES
            for value in bad_values(index_dtype, in_features):
                if torch.iinfo(index_dtype).min <= value <= torch.iinfo(index_dtype).max:
                    yield pytest.param(kind, index_dtype, value, id=f"{kind}-{str(index_dtype)[6:]}-{value}")


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("kind,index_dtype,value", list(_bad_index_cases()))
def test_a_bad_index_written_through_data_raises_or_is_stale_never_reads_out_of_bounds(kind, index_dtype, value, route):
    layer = make_layer(kind, torch.float64, index_dtype)
    old_values, old_idx = layer.values.detach().clone(), layer.idx.clone()
    for rows in (1, WINDOW_MAX_BATCH, 2 * WINDOW_MAX_BATCH):
        eval_forward(layer, rows)  # caches built from the good indices
    write_bad_index(layer, value)
    signal(layer, route)
    for rows in (1, WINDOW_MAX_BATCH, 2 * WINDOW_MAX_BATCH):
        for grad in (False, True):
            x = sample_input(layer, rows)
            with torch.set_grad_enabled(grad):
                try:
                    y = layer.train(grad)(x)
                except IndexError as error:
                    assert "outside [0, in_features" in str(error)
                    continue
            # Only a write torch did not see may leave a cached layout of the old indices in use.
            assert route == "unsignalled", f"{rows} rows, grad={grad}: a result from an out-of-range index"
            assert matches(layer, y, x, layer.values, old_idx) or matches(layer, y, x, old_values, old_idx)


@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
@pytest.mark.parametrize("grouped", (False, True), ids=("rows", "grouped"))
def test_pack_for_inference_refuses_an_index_written_through_data(index_dtype, grouped):
    layer = make_layer("grouped" if grouped else "ablated", torch.float32, index_dtype)
    pack = lambda: condensed_ops.pack_for_inference(layer.values, layer.idx, IN_FEATURES, layer.active_rows, OUT_FEATURES)
    pack()
    for value in bad_values(index_dtype, IN_FEATURES):
        if not torch.iinfo(index_dtype).min <= value <= torch.iinfo(index_dtype).max:
            continue
        good = int(layer.idx.view(-1)[5])
        write_bad_index(layer, value)
        mark_modified(layer.idx)
        with pytest.raises(IndexError, match=r"idx\[\d+, \d+\] = -?\d+ is outside \[0, in_features=70\)"):
            pack()
        write_bad_index(layer, good)
        mark_modified(layer.idx)
        pack()


def test_a_whole_tensor_rewritten_through_data_is_detected_without_mark_modified():
    layer = make_layer("row")
    eval_forward(layer, 1)
    layer.values.data.copy_(torch.randn_like(layer.values))
    x, y = eval_forward(layer, 1)
    assert_current(layer, y, x)


@pytest.mark.parametrize("kind", KINDS)
def test_mark_modified_after_a_one_entry_write_gives_the_new_result(kind):
    layer = make_layer(kind)
    for rows in (1, 2 * WINDOW_MAX_BATCH):
        eval_forward(layer, rows)
    layer.values.data.view(-1)[3] += 5.0
    layer.idx.data.view(-1)[7] = (int(layer.idx.view(-1)[7]) + 1) % layer.in_features
    mark_modified(layer)
    for rows in (1, WINDOW_MAX_BATCH, 2 * WINDOW_MAX_BATCH):
        x, y = eval_forward(layer, rows)
        assert_current(layer, y, x)


def test_mark_modified_names_what_it_cannot_take():
    with pytest.raises(TypeError, match="expected tensors or nn.Modules, got int"):
        mark_modified(3)
    mark_modified(torch.zeros(2), nn.Linear(2, 2))
    with torch.inference_mode():
        mark_modified(torch.zeros(2))  # inference tensors have no version: nothing to do


# ---- 3. index dtypes too narrow for the layer ------------------------------------------------


@pytest.mark.parametrize(
    "make,columns",
    [
        (lambda dt: CondensedLinear(65538, 80, 6, index_dtype=dt, group_size=8), 65538),
        (lambda dt: CondensedLinear(32769, 8, 3, index_dtype=dt), 32769),
        (lambda dt: CondensedConv2d(3642, 48, 3, fan_in=4, index_dtype=dt, group_size=4), 32778),
    ],
    ids=("linear-65538-grouped", "linear-32769", "conv-32778-grouped"),
)
def test_int16_indices_that_cannot_reach_every_column_are_refused(make, columns):
    with pytest.raises(ValueError, match=rf"index_dtype=torch.int16 cannot address the layer's {columns} input columns"):
        make(torch.int16)
    assert make(torch.int32).idx.dtype == torch.int32


def test_int16_reaches_exactly_32768_columns():
    layer = CondensedLinear(32768, 4, 3, index_dtype=torch.int16)
    layer.idx.data[0, 0] = 32767
    mark_modified(layer)
    x = torch.randn(2, 32768)
    assert_current(layer, layer(x), x)


@pytest.mark.parametrize("index_dtype", (torch.uint8, torch.float32, "int16"))
def test_an_index_dtype_the_ops_do_not_take_is_a_type_error(index_dtype):
    with pytest.raises(TypeError, match="index_dtype must be torch.int16, torch.int32 or torch.int64"):
        CondensedLinear(16, 4, 3, index_dtype=index_dtype)


def test_a_checkpoint_with_int16_indices_for_too_many_columns_is_refused():
    model = nn.Sequential(nn.Linear(40000, 4))
    state = {"0.values": torch.randn(4, 3), "0.idx": torch.zeros(4, 3, dtype=torch.int16), "0.bias": torch.zeros(4)}
    with pytest.raises(ValueError, match="index_dtype=torch.int16 cannot address the layer's 40000 input columns"):
        condensed_ops.load_condensed(model, state)


# ---- 4. dtype errors name x and both dtypes, on every layout ---------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("rows", (1, 2 * WINDOW_MAX_BATCH))
@pytest.mark.parametrize("grad", (False, True))
def test_x_of_another_dtype_is_a_type_error_naming_both(kind, rows, grad):
    layer = make_layer(kind, torch.bfloat16)
    x = sample_input(layer, rows).to(torch.float64)
    with torch.set_grad_enabled(grad), pytest.raises(TypeError, match=r"x .*torch.float64.*torch.bfloat16|x .*torch.bfloat16.*torch.float64"):
        layer(x)


def test_packed_layout_with_x_of_another_dtype_names_both():
    layer = make_layer("row")
    packed = condensed_ops.pack_for_inference(layer.values, layer.idx, IN_FEATURES)
    with pytest.raises(TypeError, match="x is torch.float64 but packed holds torch.float32 values"):
        condensed_ops.condensed_linear_packed(torch.randn(1, IN_FEATURES, dtype=torch.float64), packed, OUT_FEATURES)


def test_a_damaged_packed_layout_is_a_value_error():
    layer = make_layer("row")
    packed = condensed_ops.pack_for_inference(layer.values, layer.idx, IN_FEATURES).clone()
    packed[:16] = 255
    with pytest.raises(ValueError, match="packed is not a window layout made by pack_for_inference"):
        condensed_ops.condensed_linear_packed(torch.randn(1, IN_FEATURES), packed, OUT_FEATURES)


# ---- 5. the fuzz ---------------------------------------------------------------------------------


class Fuzz:
    """Drives one layer through random calls and writes, checking each call against
    the layer's current content. A call may return a stale result only after a write
    torch did not see (``.data`` without mark_modified): it must then match the
    content of some moment since the last write torch saw."""

    def __init__(self, rng: random.Random, kind: str, dtype: torch.dtype, index_dtype: torch.dtype) -> None:
        self.rng = rng
        self.layer = make_layer(kind, dtype, index_dtype, seed=rng.randrange(1000))
        self.opt = torch.optim.AdamW(self.layer.parameters(), lr=0.02, fused=rng.random() < 0.5)
        self.outcomes: Dict[str, int] = {}
        # What values and idx held since torch last saw each change: a cache may hold any of it.
        self.values_moments: List[Tensor] = []
        self.idx_moments: List[Tensor] = []
        self._signalled()

    # content bookkeeping
    def _snapshot(self) -> Tuple[Tensor, Tensor]:
        return self.layer.values.detach().clone(), self.layer.idx.clone()

    def _bias(self) -> Optional[Tensor]:
        return None if self.layer.bias is None else self.layer.bias.detach().clone()

    def _signalled(self, values: Optional[bool] = True, idx: Optional[bool] = True) -> None:
        """Record a write of ``values`` / ``idx``: True when torch saw the tensor change
        (its version moved, which brings every cache keyed on it up to date), False
        when it did not, None when the tensor was not written."""
        self.unseen_values = getattr(self, "unseen_values", False) if values is None else not values
        self.unseen_idx = getattr(self, "unseen_idx", False) if idx is None else not idx
        self.unseen_write = self.unseen_values or self.unseen_idx
        values_now, idx_now = self._snapshot()
        self.values_moments = self.values_moments + [values_now] if self.unseen_values else [values_now]
        self.idx_moments = self.idx_moments + [idx_now] if self.unseen_idx else [idx_now]

    def _stale(self, y: Tensor, x: Tensor, bias: Optional[Tensor] = None) -> bool:
        return self.unseen_write and any(
            matches(self.layer, y, x, v, i, bias) for v in self.values_moments for i in self.idx_moments)

    def _idx_valid(self) -> bool:
        idx = self.layer.idx
        return idx.numel() == 0 or (int(idx.min()) >= 0 and int(idx.max()) < self.layer.in_features)

    def count(self, outcome: str) -> None:
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1

    # calls
    def call(self, run: Callable[[], Tensor], x: Tensor, name: str) -> None:
        try:
            y = run()
        except IndexError as error:
            assert "outside [0, in_features" in str(error), error
            assert not self._idx_valid() or self.unseen_write, f"{name}: IndexError on valid indices: {error}"
            self.count("index_error")
            return
        if self._idx_valid() and matches(self.layer, y, x, self.layer.values, self.layer.idx):
            self.count("correct")
            return
        assert self.unseen_write, f"{name}: wrong result after writes torch saw"
        assert self._stale(y, x), f"{name}: a result that matches no content the layer held"
        self.count("stale")

    def forward(self) -> None:
        rows = self.rng.choice((1, 2, WINDOW_MAX_BATCH, WINDOW_MAX_BATCH + 1, 33))
        grad = self.rng.random() < 0.3
        x = sample_input(self.layer, rows)
        self.layer.train(grad)

        def run() -> Tensor:
            with torch.set_grad_enabled(grad):
                y = self.layer(x)
                if grad:
                    y.square().sum().backward()
                    self.opt.step()  # the hook moves the versions: content read below is the new one
                    self.opt.zero_grad()
                return y

        if grad:
            before, bias = self._snapshot(), self._bias()
            try:
                y = run()
            except IndexError:
                self.count("index_error")
                assert not self._idx_valid() or self.unseen_write
                return
            # y came from the weights before the step.
            ok = matches(self.layer, y, x, *before, bias) or self._stale(y, x, bias)
            assert ok, f"training forward: wrong result (unseen writes: values {self.unseen_values}, idx {self.unseen_idx})"
            self.count("correct" if matches(self.layer, y, x, *before, bias) else "stale")
            self._signalled(values=True, idx=None)  # the step moved the parameters' versions
            return
        self.call(run, x, f"forward rows={rows}")

    def op(self) -> None:
        """The functional op and the packed pair on the module's tensors (linear layers)."""
        layer = self.layer
        if isinstance(layer, CondensedConv2d) or layer.active_rows is not None:
            return self.forward()
        x = sample_input(layer, self.rng.choice((1, 3, 40)))
        if self.rng.random() < 0.5:
            run = lambda: condensed_ops.condensed_linear(x, layer.values.detach(), layer.idx, layer.bias.detach())
        else:
            run = lambda: condensed_ops.condensed_linear_packed(
                x, condensed_ops.pack_for_inference(layer.values.detach(), layer.idx, IN_FEATURES), OUT_FEATURES, layer.bias.detach())
        with torch.no_grad():
            self.call(run, x, "op")

    # writes
    def write(self) -> None:
        layer, rng = self.layer, self.rng
        route = rng.choice(("data_value", "data_idx", "data_bad_idx", "in_place_values", "in_place_idx",
                            "mark_modified", "load", "load_bad", "repair"))
        if route == "data_value":
            layer.values.data.view(-1)[rng.randrange(layer.values.numel())] += 1.0
        elif route == "data_idx":
            layer.idx.data.view(-1)[rng.randrange(layer.idx.numel())] = rng.randrange(layer.in_features)
        elif route == "data_bad_idx":
            info = torch.iinfo(layer.idx.dtype)
            bad = rng.choice([layer.in_features, -1, info.max, info.min, layer.in_features + rng.randrange(1000)])
            layer.idx.data.view(-1)[rng.randrange(layer.idx.numel())] = max(info.min, min(info.max, bad))
        elif route == "in_place_values":
            with torch.no_grad():
                layer.values.mul_(0.9)
        elif route == "in_place_idx":
            layer.idx.add_(0)
        elif route == "load_bad":
            state = {k: v.clone() for k, v in layer.state_dict().items()}
            state["idx"].view(-1)[0] = layer.in_features
            with pytest.raises(RuntimeError, match="is outside"):
                layer.load_state_dict(state)
            self.count("load_refused")
            return
        elif route in ("load", "repair"):
            source = make_layer(self.kind_of(layer), layer.values.dtype, layer.idx.dtype, seed=rng.randrange(1000))
            if route == "load":
                layer.load_state_dict(source.state_dict())
            else:
                layer.idx.copy_(source.idx)
        else:
            mark_modified(layer)
        self.count(f"write_{route}")
        seen = {"data_value": (False, None), "data_idx": (None, False), "data_bad_idx": (None, False),
                "in_place_values": (True, None), "in_place_idx": (None, True), "repair": (None, True)}
        self._signalled(*seen.get(route, (True, True)))

    @staticmethod
    def kind_of(layer: CondensedLayer) -> str:
        if isinstance(layer, CondensedConv2d):
            return "conv"
        if layer.group_size > 1:
            return "grouped"
        return "ablated" if layer.active_rows is not None else "row"


def test_fuzz_every_route(capsys):
    rng = random.Random(20261203)
    deadline = time.monotonic() + 20.0
    totals: Dict[str, int] = {}
    layers = 0
    while time.monotonic() < deadline:
        fuzz = Fuzz(rng, rng.choice(KINDS), rng.choice((torch.float32, torch.float64)), rng.choice(INDEX_DTYPES))
        for _ in range(40):
            rng.choice((fuzz.forward, fuzz.forward, fuzz.op, fuzz.write))()
        layers += 1
        for outcome, n in fuzz.outcomes.items():
            totals[outcome] = totals.get(outcome, 0) + n
    calls = sum(n for outcome, n in totals.items() if not outcome.startswith("write_"))
    assert totals.get("correct", 0) > 0 and totals.get("index_error", 0) > 0
    with capsys.disabled():
        print(f"\nfuzz: {layers} layers, {calls} calls: " + ", ".join(f"{k}={v}" for k, v in sorted(totals.items())))
