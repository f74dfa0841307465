"""The window layout (pack_for_inference, condensed_linear_packed): results against
the float64 reference under every CPU flavour that packs and every one that
runs, its cache (never stale), damaged layouts, opcheck, TorchScript,
torch.compile, and the modules' switch to it."""

import random

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import condensed_ops
from conftest import (
    INDEX_DTYPES,
    QUICK_SPECS,
    SAMPLE_SPECS,
    SUPPORTED_ISAS,
    VALUE_DTYPES,
    SampleSpec,
    assert_matches_reference,
    cpu_kernel,
    index_dtype_fits,
    make_sample,
    sample_inputs,
)

pack = condensed_ops.pack_for_inference
packed_linear = condensed_ops.condensed_linear_packed


def run_packed(x, values, idx, bias):
    before = [t.clone() for t in (x, values, idx, bias) if t is not None]
    layout = pack(values, idx, x.shape[-1])
    y = packed_linear(x, layout, values.shape[0], bias)
    for old, new in zip(before, [t for t in (x, values, idx, bias) if t is not None]):
        assert torch.equal(old, new), "an input was modified"
    assert y.is_contiguous()
    return y


# (isa that packs, isa that runs, how the AVX2 kernel reads x): the layout's
# window width follows the packing CPU flavour (64 with AVX-512, 256
# otherwise); every flavour runs every width, the AVX2 one with x gathered and
# loaded one by one (cpu_small_batch forces it; "auto" times the two once).
ISA_PAIRS = [(packer, runner, loads) for packer in SUPPORTED_ISAS for runner in SUPPORTED_ISAS
             for loads in (("gather", "scalar") if runner == "avx2" else ("auto",))]


@pytest.fixture(params=ISA_PAIRS, ids=[f"pack_{p}-run_{r}-x_{x}" for p, r, x in ISA_PAIRS])
def isa_pair(request):
    return request.param


def packed_under(isa_pair, x, values, idx, bias):
    packer, runner, loads = isa_pair
    with cpu_kernel(packer):
        layout = pack(values, idx, x.shape[-1])
    with condensed_ops.kernel_options(cpu_isa=runner, cpu_small_batch=loads):
        y = packed_linear(x, layout, values.shape[0], bias)
        if runner == "avx2" and values.dtype != torch.float64:
            assert condensed_ops._C._last_cpu_kernel() == ("avx2 window_gather" if loads == "gather" else "avx2 window")
        return y


# ---- correctness ---------------------------------------------------------------------------


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("spec", SAMPLE_SPECS, ids=lambda s: s.id)
def test_matches_reference(spec, with_bias, isa_pair):
    sample = make_sample(spec, torch.float32, torch.int16 if index_dtype_fits(torch.int16, spec.in_features) else torch.int32, bias=with_bias)
    y = packed_under(isa_pair, *sample.args)
    assert_matches_reference(y, *sample.args)


_DTYPE_SPECS = [s for s in SAMPLE_SPECS if s.name in ("batch1", "batch3", "batch5", "batch9", "x_4d", "repeated_idx", "many_windows", "x_transposed")]


@pytest.mark.parametrize("index_dtype", INDEX_DTYPES, ids=str)
@pytest.mark.parametrize("dtype", VALUE_DTYPES, ids=str)
@pytest.mark.parametrize("spec", _DTYPE_SPECS, ids=lambda s: s.id)
def test_every_dtype_and_index_dtype(spec, dtype, index_dtype, isa_pair):
    sample = make_sample(spec, dtype, index_dtype)
    y = packed_under(isa_pair, *sample.args)
    assert y.dtype == dtype
    assert_matches_reference(y, *sample.args)


@pytest.mark.parametrize("in_features", [1, 62, 63, 64, 126, 127, 254, 255, 256, 511, 40000])
def test_window_edges(in_features, isa_pair):
    # Columns on either side of every window edge (63 columns per 64-slot
    # window, 255 per 256-slot one), and the last column.
    g = torch.Generator().manual_seed(in_features)
    out_features, fan_in = 37, min(in_features, 9)
    edges = torch.tensor([c for w in (63, 255) for k in range(1, 4) for c in (k * w - 1, k * w, k * w + 1)] + [in_features - 1, 0])
    edges = edges[edges < in_features]
    idx = edges[torch.randint(0, edges.numel(), (out_features, fan_in), generator=g)]
    x = torch.randn(2, in_features, generator=g, dtype=torch.float64).float()
    values = torch.randn(out_features, fan_in, generator=g, dtype=torch.float64).float()
    index_dtype = torch.int16 if in_features <= 32767 else torch.int32
    y = packed_under(isa_pair, x, values, idx.to(index_dtype), None)
    assert_matches_reference(y, x, values, idx, None)


def test_padding_adds_exactly_zero_whatever_x_holds(isa_pair):
    # Rows of one block with very different counts per window: the short lanes
    # are padded. Padding must read the zero slot, not a column of x (inf * 0 = NaN).
    in_features, out_features = 200, 16
    idx = torch.zeros(out_features, 8, dtype=torch.int16)
    idx[0] = torch.arange(8)  # lane 0: 8 entries in the first window
    for o in range(1, out_features):
        idx[o] = torch.arange(8) * 25 + 8 + o  # the others: spread out, all finite
    values = torch.randn(out_features, 8)
    x = torch.full((1, in_features), float("inf"))
    x[:, 8:] = 1.0  # lane 0's columns are inf; everything else finite
    y = packed_under(isa_pair, x, values, idx, None)
    expected = condensed_ops.condensed_linear(x, values, idx)
    assert torch.isinf(y[0, 0]) or torch.isnan(y[0, 0])
    assert torch.isfinite(y[0, 1:]).all()
    torch.testing.assert_close(y[0, 1:], expected[0, 1:])


def test_integer_data_is_exact(isa_pair):
    g = torch.Generator().manual_seed(7)
    x = torch.randint(0, 17, (3, 300), generator=g).float()
    values = torch.randint(-16, 17, (50, 40), generator=g).float()
    idx = torch.randint(0, 300, (50, 40), generator=g)
    exact = (x.long()[:, idx] * values.long()).sum(-1).float()
    assert torch.equal(packed_under(isa_pair, x, values, idx.to(torch.int16), None), exact)


@pytest.mark.skipif("avx2" not in SUPPORTED_ISAS, reason="needs an AVX2 CPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_avx2_gathers_and_scalar_loads_give_identical_bits(dtype):
    """The two ways the AVX2 kernel reads x add the same products in the same
    order, so the once-per-process timing that picks one cannot change results."""
    _, x, values, idx, bias = make_sample(SampleSpec("bits", (3,), 700, 90, 61), dtype=dtype)
    with cpu_kernel("avx2"):
        layout = pack(values, idx, 700)
    outputs = []
    for loads in ("gather", "scalar"):
        with condensed_ops.kernel_options(cpu_isa="avx2", cpu_small_batch=loads):
            outputs.append(packed_linear(x, layout, 90, bias))
            assert condensed_ops._C.cpu_capabilities()["window_x_loads"].startswith(
                f"{'gathers' if loads == 'gather' else 'scalar loads'}, forced")
    assert torch.equal(outputs[0], outputs[1])
    with condensed_ops.kernel_options(cpu_isa="avx2"):
        packed_linear(x, layout, 90, bias)  # auto: timed once per process, then fixed
        assert condensed_ops._C.cpu_capabilities()["window_x_loads"].startswith(("gathers, timed", "scalar loads, timed"))


@pytest.mark.parametrize("threads", [1, 2])
def test_threads_give_identical_results(threads):
    sample = make_sample(SampleSpec("wide", (3,), 300, 1000, 30))
    torch.set_num_threads(1)
    one = run_packed(*sample.args)
    torch.set_num_threads(threads)
    assert torch.equal(run_packed(*sample.args), one)


def test_the_layout_has_the_documented_size():
    # 90% sparse 768 -> 3072 with random columns: about 1.4x the row layout's
    # bytes with 64-slot windows, within a few percent of it with 256-slot ones.
    g = torch.Generator().manual_seed(0)
    idx = torch.rand(3072, 768, generator=g).argsort(1)[:, :77].sort(1).values.to(torch.int16)
    values = torch.randn(3072, 77, generator=g)
    row_bytes = values.numel() * 6
    for isa in SUPPORTED_ISAS:
        with cpu_kernel(isa):
            ratio = pack(values, idx, 768).numel() / row_bytes
        assert (1.3 < ratio < 1.5) if isa == "avx512" else (1.0 < ratio < 1.12), (isa, ratio)


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_active_rows_place_the_outputs_and_ablated_ones_give_their_bias(with_bias, isa_pair):
    sample = make_sample(SampleSpec("ablated", (3,), 70, 23, 9), bias=False)
    out_features = 40
    active_rows = torch.randperm(out_features, generator=torch.Generator().manual_seed(1))[:23]
    bias = torch.randn(out_features) if with_bias else None
    packer, runner, _ = isa_pair
    with cpu_kernel(packer):
        layout = pack(sample.values, sample.idx, 70, active_rows, out_features)
    with cpu_kernel(runner):
        y = packed_linear(sample.x, layout, out_features, bias)
    expected = torch.zeros(3, out_features, dtype=torch.float64) if bias is None else bias.double().expand(3, -1).clone()
    expected[:, active_rows] += condensed_ops.condensed_linear(sample.x.double(), sample.values.double(), sample.idx)
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)


# ---- the cache: never stale ----------------------------------------------------------------


def test_repeated_packing_returns_the_cached_layout():
    sample = make_sample(QUICK_SPECS[0])
    first = pack(sample.values, sample.idx, sample.x.shape[-1])
    assert pack(sample.values, sample.idx, sample.x.shape[-1]) is first or torch.equal(
        pack(sample.values, sample.idx, sample.x.shape[-1]), first
    )
    assert pack(sample.values, sample.idx, sample.x.shape[-1]).data_ptr() == first.data_ptr()


@pytest.mark.parametrize("change", ["values", "idx", "values_no_grad_param"])
def test_an_in_place_change_rebuilds_the_layout(change):
    sample = make_sample(SampleSpec("cache", (2,), 50, 20, 6))
    x, values, idx, bias = sample.args
    values = nn.Parameter(values) if change == "values_no_grad_param" else values.clone()
    idx = idx.clone()
    old = pack(values, idx, 50)
    with torch.no_grad():
        if change == "idx":
            idx[3, 1] = (idx[3, 1] + 7) % 50
        else:
            values[2, 4] += 3.0
    new = pack(values, idx, 50)
    assert new.data_ptr() != old.data_ptr()
    y = packed_linear(x, new, 20, bias)
    assert_matches_reference(y, x, values.detach(), idx, bias)


def test_a_rebuilt_layout_is_checked_again():
    sample = make_sample(SampleSpec("recheck", (2,), 50, 20, 6))
    idx = sample.idx.clone()
    pack(sample.values, idx, 50)
    idx[0, 0] = 50
    with pytest.raises(IndexError, match=r"idx\[0, 0\] = 50 is outside \[0, in_features=50\)"):
        pack(sample.values, idx, 50)


def test_cache_lets_go_of_dead_weights():
    condensed_ops._C._clear_caches()
    for _ in range(5):
        sample = make_sample(SampleSpec("dead", (1,), 64, 32, 8))
        pack(sample.values, sample.idx, 64)
    # Each insert drops entries whose tensors died: only the live ones remain.
    entries = condensed_ops._C._cache_entries()
    assert entries["cpu window layouts"] == 1 and entries["validated indices"] == 1, entries


# ---- bad input ------------------------------------------------------------------------------


def test_bad_index_raises_naming_it():
    sample = make_sample(SampleSpec("bad", (1,), 30, 5, 4))
    idx = sample.idx.clone()
    idx[2, 3] = -1
    with pytest.raises(IndexError, match=r"idx\[2, 3\] = -1 is outside \[0, in_features=30\)"):
        pack(sample.values, idx, 30)


@pytest.mark.parametrize(
    "make_call,error,message",
    [
        (lambda x, v, i, p: packed_linear(x.double(), p, 7), TypeError, "x is torch.float64 but packed holds torch.float32 values"),
        (lambda x, v, i, p: packed_linear(x, p[:-64], 7), ValueError, "sections do not match its size"),
        (lambda x, v, i, p: packed_linear(x, p.float(), 7), TypeError, "packed must be the 1-D uint8 tensor"),
        (lambda x, v, i, p: packed_linear(x, p.view(1, -1), 7), TypeError, "packed must be the 1-D uint8 tensor"),
        (lambda x, v, i, p: packed_linear(x, p, 8), ValueError, "holds a 40 -> 7 layer"),
        (lambda x, v, i, p: packed_linear(x[:, :39], p, 7), ValueError, "holds a 40 -> 7 layer"),
        (lambda x, v, i, p: packed_linear(x, p, -1), ValueError, "out_features must be >= 0"),
        (lambda x, v, i, p: packed_linear(x, p, 7, torch.zeros(6)), ValueError, r"bias must have shape \[out_features\] = \[7\]"),
        (lambda x, v, i, p: packed_linear(x, p, 7, torch.zeros(7, dtype=torch.float64)), TypeError, "bias must have x's dtype"),
        (lambda x, v, i, p: packed_linear(x[0, 0], p, 7), ValueError, "at least 1 dimension"),
        (lambda x, v, i, p: packed_linear(x.int(), p, 7), TypeError, "x must be float32"),
        (lambda x, v, i, p: pack(v, i.float(), 40), TypeError, "pack_for_inference: idx must be int16"),
        (lambda x, v, i, p: pack(v[:, :2], i, 40), ValueError, "pack_for_inference: idx must have the same shape as values"),
        (lambda x, v, i, p: pack(v, i, -3), ValueError, r"pack_for_inference: in_features must be in \[0, 2\^31\), got -3"),
        (lambda x, v, i, p: pack(v, i, 40, None, 9), ValueError, r"out_features must be the rows of values \(7\) without active_rows, got 9"),
        (lambda x, v, i, p: pack(v, i, 40, torch.arange(7), 6), ValueError, r"out_features must be >= the rows of values \(7\)"),
        (lambda x, v, i, p: pack(v, i, 40, torch.arange(7).int(), 9), TypeError, "active_rows must be int64"),
        (lambda x, v, i, p: pack(v, i, 40, torch.arange(6), 9), ValueError, r"active_rows must have one entry per row of values \(7\)"),
        (lambda x, v, i, p: pack(v, i, 40, torch.tensor([0, 1, 2, 3, 4, 5, 5]), 9), ValueError, r"distinct outputs in \[0, out_features=9\), got active_rows\[6\] = 5 twice"),
        (lambda x, v, i, p: pack(v, i, 40, torch.tensor([0, 1, 2, 3, 4, 5, 9]), 9), ValueError, r"got active_rows\[6\] = 9"),
        (lambda x, v, i, p: pack(v, i, 40, torch.tensor([-1, 1, 2, 3, 4, 5, 6]), 9), ValueError, r"got active_rows\[0\] = -1"),
    ],
)
def test_malformed_calls_raise_and_name_the_argument(make_call, error, message):
    sample = make_sample(SampleSpec("malformed", (3,), 40, 7, 5))
    layout = pack(sample.values, sample.idx, 40)
    with pytest.raises(error, match=message):
        make_call(sample.x, sample.values, sample.idx, layout)


def test_damaged_layouts_raise_never_crash():
    # Flip bytes all over a layout (header, tables, values, slots): every call
    # must either raise ValueError or return a finite result of the right shape.
    sample = make_sample(SampleSpec("damage", (2,), 300, 40, 30))
    layout = pack(sample.values, sample.idx, 300)
    rng = random.Random(0)
    raised = 0
    for trial in range(400):
        damaged = layout.clone()
        for _ in range(rng.choice((1, 4))):
            at = rng.randrange(0, 256) if trial % 2 else rng.randrange(0, damaged.numel())
            damaged[at] = rng.randrange(0, 256)
        try:
            y = packed_linear(sample.x, damaged, 40)
        except ValueError:
            raised += 1
        else:
            assert y.shape == (2, 40)
    assert raised > 50


def test_gradients_are_refused():
    sample = make_sample(QUICK_SPECS[0])
    x = sample.x.clone().requires_grad_()
    y = packed_linear(x, pack(sample.values, sample.idx, x.shape[-1]), sample.values.shape[0])
    with pytest.raises(RuntimeError, match="not implemented"):
        y.sum().backward()


# ---- opcheck, TorchScript, torch.compile ---------------------------------------------------------


_OPCHECK_SAMPLES = list(sample_inputs((torch.float32,), (torch.int16,), specs=QUICK_SPECS)) + list(
    sample_inputs((torch.float64, torch.bfloat16), (torch.int32,), specs=QUICK_SPECS[:2], biases=(True,))
)


@pytest.mark.parametrize("sample", _OPCHECK_SAMPLES, ids=lambda s: s.name)
def test_opcheck(sample):
    x, values, idx, bias = sample.args
    layout = pack(values, idx, x.shape[-1])
    torch.library.opcheck(torch.ops.condensed_ops.condensed_linear_packed, (x, layout, values.shape[0], bias))
    torch.library.opcheck(
        torch.ops.condensed_ops.pack_for_inference, (values, idx, x.shape[-1]),
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )
    windowed = torch.ops.condensed_ops.condensed_linear_windowed
    torch.library.opcheck(windowed, (x, values, idx, values.shape[0], bias))
    torch.testing.assert_close(windowed(x, values, idx, values.shape[0], bias), packed_linear(x, layout, values.shape[0], bias), rtol=0, atol=0)


def _packed_call(x: torch.Tensor, values: torch.Tensor, idx: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return condensed_ops.condensed_linear_packed(x, condensed_ops.pack_for_inference(values, idx, x.shape[-1]), values.shape[0], bias)


def test_script_matches_eager(tmp_path):
    scripted = torch.jit.script(_packed_call)
    path = tmp_path / "packed.pt"
    scripted.save(str(path))
    loaded = torch.jit.load(str(path))
    for sample in sample_inputs(specs=QUICK_SPECS, biases=(True,)):
        assert torch.equal(loaded(*sample.args), _packed_call(*sample.args))


@pytest.mark.parametrize("dynamic", [False, True])
def test_compile_fullgraph_matches_eager(dynamic, fresh_dynamo):
    compiled = torch.compile(_packed_call, fullgraph=True, dynamic=dynamic)
    for sample in sample_inputs(specs=QUICK_SPECS, biases=(True,)):
        torch.testing.assert_close(compiled(*sample.args), _packed_call(*sample.args))


# ---- the modules' switch ------------------------------------------------------------------------


def _module(out_features=40, in_features=90, ablate=False):
    torch.manual_seed(0)
    linear = nn.Linear(in_features, out_features)
    mask = torch.rand(out_features, in_features) < 0.15
    mask[:, 0] = True
    if ablate:
        mask[3] = False
    return condensed_ops.CondensedLinear.from_linear(linear, mask), linear, mask


@pytest.mark.parametrize("ablate", [False, True])
@pytest.mark.parametrize("batch_shape", [(), (1,), (4,), (2, 2), (5,), (33,)])
def test_module_inference_matches_training_path(batch_shape, ablate):
    module, linear, mask = _module(ablate=ablate)
    x = torch.randn(*batch_shape, 90)
    expected = torch.nn.functional.linear(x.double(), (linear.weight * mask).double(), linear.bias.double())
    with torch.no_grad():
        inference = module(x)
    training = module(x)
    assert training.requires_grad and not inference.requires_grad
    torch.testing.assert_close(inference.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(inference, training.detach(), rtol=1e-5, atol=1e-6)


class _OpNames(TorchDispatchMode):
    """Records the names of the ops that run under it."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def _runs_window_layout(module, x) -> bool:
    with _OpNames() as recorder:
        module(x)
    return "condensed_ops.condensed_linear_windowed" in recorder.names


def test_module_uses_the_window_layout_only_when_it_should():
    module, _, _ = _module(ablate=True)
    limit = condensed_ops._C.WINDOW_MAX_BATCH
    with torch.no_grad():
        assert _runs_window_layout(module, torch.randn(limit, 90))
        assert _runs_window_layout(module, torch.randn(90))
        assert not _runs_window_layout(module, torch.randn(limit + 1, 90))
        module.inference_layout = False
        assert not _runs_window_layout(module, torch.randn(1, 90))
        module.inference_layout = True
    assert not _runs_window_layout(module, torch.randn(1, 90))  # values need a gradient: the row layout
    module.requires_grad_(False)
    assert _runs_window_layout(module, torch.randn(1, 90))
    assert not _runs_window_layout(module, torch.randn(1, 90, requires_grad=True))


def test_module_sees_an_optimizer_step():
    # The layout is rebuilt after the optimizer changes values in place.
    module, _, _ = _module()
    x = torch.randn(1, 90)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.5)
    with torch.no_grad():
        before = module(x)
    module(torch.randn(8, 90)).square().sum().backward()
    optimizer.step()
    with torch.no_grad():
        after = module(x)
        expected = torch.nn.functional.linear(x.double(), module.to_dense().double(), module.bias.double())
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after.double(), expected, rtol=1e-5, atol=1e-6)


def test_compiled_module_sees_in_place_changes(fresh_dynamo):
    module, _, _ = _module()
    compiled = torch.compile(module, fullgraph=True)
    x = torch.randn(2, 90)
    with torch.no_grad():
        compiled(x)
        module.values.mul_(-2)
        expected = torch.nn.functional.linear(x.double(), module.to_dense().double(), module.bias.double())
        torch.testing.assert_close(compiled(x).double(), expected, rtol=1e-5, atol=1e-6)
