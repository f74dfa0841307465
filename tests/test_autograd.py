"""Gradients of condensed_linear: x, values and bias, on every kernel path.

The reference is the masked dense layer in float64: scatter values into a dense
weight (a differentiable scatter_add, so repeated indices sum) and F.linear.
"""

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import condensed_ops
from conftest import (
    SMALL_BATCH_MAX,
    INDEX_DTYPES,
    QUICK_SPECS,
    SAMPLE_SPECS,
    Sample,
    VALUE_DTYPES,
    make_sample,
    sample_inputs,
)

# Gradient sums run over the batch (grad_values) or over up to out_features
# entries (grad_x), so 16-bit tolerances scale with the sum's length.
GRAD_TOLERANCES = {
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float32: dict(rtol=1e-4, atol=1e-4),
    torch.bfloat16: dict(rtol=4e-2, atol=4e-2),
    torch.float16: dict(rtol=5e-3, atol=5e-3),
}


def reference_gradients(x, values, idx, bias, grad_y):
    x64 = x.detach().double().requires_grad_()
    values64 = values.detach().double().requires_grad_()
    bias64 = None if bias is None else bias.detach().double().requires_grad_()
    weight = torch.zeros(values.shape[0], x.shape[-1], dtype=torch.float64).scatter_add(1, idx.long(), values64)
    F.linear(x64, weight, bias64).backward(grad_y.double())
    return x64.grad, values64.grad, None if bias is None else bias64.grad


def check_gradients(sample, dtype):
    x = sample.x.detach().clone().requires_grad_()
    values = sample.values.detach().clone().requires_grad_()
    bias = None if sample.bias is None else sample.bias.detach().clone().requires_grad_()
    y = condensed_ops.condensed_linear(x, values, sample.idx, bias)
    grad_y = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).to(dtype)
    y.backward(grad_y)
    expected = reference_gradients(x, values, sample.idx, bias, grad_y)
    batch = y.numel() // max(1, y.shape[-1])
    scale = max(1, batch, values.shape[0]) ** 0.5  # longest sum: over the batch or a column's outputs
    tol = {key: value * scale for key, value in GRAD_TOLERANCES[dtype].items()}
    for name, got, want in zip(("x", "values", "bias"), (x.grad, values.grad, None if bias is None else bias.grad), expected):
        if want is None:
            continue
        assert got.dtype == dtype and got.shape == want.shape, name
        torch.testing.assert_close(got.double(), want, **tol, msg=lambda m: f"grad_{name}: {m}")


_GRAD_SPECS = [spec for spec in SAMPLE_SPECS if spec.in_features > 0]


@pytest.mark.parametrize("spec", _GRAD_SPECS, ids=lambda s: s.id)
def test_gradients_match_masked_dense_layer(spec, kernel_path):
    dtype = torch.float64 if kernel_path[0] == "portable" else torch.float32
    check_gradients(make_sample(spec, dtype), dtype)


@pytest.mark.parametrize("index_dtype", INDEX_DTYPES, ids=str)
@pytest.mark.parametrize("dtype", VALUE_DTYPES, ids=str)
@pytest.mark.parametrize("spec", QUICK_SPECS, ids=lambda s: s.id)
def test_gradients_every_dtype(spec, dtype, index_dtype, kernel_path):
    check_gradients(make_sample(spec, dtype, index_dtype), dtype)


@pytest.mark.parametrize("out_features", [3, 40_000])  # int16 and int32 row indices in W's column layout
def test_gradients_wide_layers(out_features, kernel_path):
    g = torch.Generator().manual_seed(out_features)
    x = torch.randn(SMALL_BATCH_MAX + 3, 50, generator=g)
    values = torch.randn(out_features, 4, generator=g)
    idx = torch.randint(0, 50, (out_features, 4), generator=g).to(torch.int32)
    check_gradients(Sample("wide", x, values, idx, None), torch.float32)


def test_only_requested_gradients_are_computed():
    sample = make_sample(QUICK_SPECS[1])
    x = sample.x.detach().clone().requires_grad_()
    y = condensed_ops.condensed_linear(x, sample.values, sample.idx, sample.bias)
    y.sum().backward()
    assert x.grad is not None and sample.values.grad is None and sample.bias.grad is None


def test_gradcheck_float64():
    for sample in sample_inputs((torch.float64,), (torch.int16,), specs=QUICK_SPECS):
        inputs = [sample.x.detach().clone().requires_grad_(), sample.values.detach().clone().requires_grad_()]
        if sample.bias is not None:
            inputs.append(sample.bias.detach().clone().requires_grad_())

        def fn(x, values, *bias, idx=sample.idx):
            return condensed_ops.condensed_linear(x, values, idx, bias[0] if bias else None)

        assert torch.autograd.gradcheck(fn, inputs), sample.name


def test_double_backward_is_refused():
    sample = make_sample(QUICK_SPECS[0], torch.float64)
    x = sample.x.detach().clone().requires_grad_()
    values = sample.values.detach().clone().requires_grad_()
    y = condensed_ops.condensed_linear(x, values, sample.idx)
    # grad_x depends on values: differentiating it again must fail loudly.
    (grad_x,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="not implemented"):
        grad_x.sum().backward()


_OPCHECK_SAMPLES = list(sample_inputs((torch.float32, torch.float64), (torch.int16, torch.int64), specs=QUICK_SPECS))


@pytest.mark.parametrize("sample", _OPCHECK_SAMPLES, ids=lambda s: s.name)
def test_opcheck_with_requires_grad(sample):
    args = (
        sample.x.detach().clone().requires_grad_(),
        sample.values.detach().clone().requires_grad_(),
        sample.idx,
        None if sample.bias is None else sample.bias.detach().clone().requires_grad_(),
    )
    torch.library.opcheck(torch.ops.condensed_ops.condensed_linear.default, args)


@pytest.mark.parametrize("sample", _OPCHECK_SAMPLES[:4], ids=lambda s: s.name)
def test_opcheck_backward_ops(sample):
    grad_y = torch.randn(*sample.x.shape[:-1], sample.values.shape[0], dtype=sample.x.dtype)
    torch.library.opcheck(
        torch.ops.condensed_ops.condensed_linear_grad_input.default, (grad_y, sample.values, sample.idx, sample.x.shape[-1])
    )
    torch.library.opcheck(torch.ops.condensed_ops.condensed_linear_grad_values.default, (grad_y, sample.x, sample.idx))


def test_backward_ops_reject_bad_input():
    sample = make_sample(QUICK_SPECS[0])
    grad_y = torch.randn(*sample.x.shape[:-1], sample.values.shape[0])
    grad_input = torch.ops.condensed_ops.condensed_linear_grad_input
    grad_values = torch.ops.condensed_ops.condensed_linear_grad_values
    with pytest.raises(ValueError, match="grad_y"):
        grad_input(grad_y[..., :-1], sample.values, sample.idx, sample.x.shape[-1])
    with pytest.raises(TypeError, match="grad_y"):
        grad_input(grad_y.double(), sample.values, sample.idx, sample.x.shape[-1])
    bad_idx = sample.idx.clone()
    bad_idx[0, 0] = sample.x.shape[-1]
    with pytest.raises(IndexError, match="idx"):
        grad_input(grad_y, sample.values, bad_idx, sample.x.shape[-1])
    with pytest.raises(IndexError, match="idx"):
        grad_values(grad_y, sample.x, bad_idx)
    with pytest.raises(ValueError, match="grad_y"):
        grad_values(grad_y[:1], sample.x, sample.idx)
    with pytest.raises(TypeError, match="idx"):
        grad_values(grad_y, sample.x, sample.idx.float())


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_forward_and_backward(backend):
    torch._dynamo.reset()
    sample = make_sample(QUICK_SPECS[1])

    def loss_fn(x, values, bias):
        return condensed_ops.condensed_linear(x, values, sample.idx, bias).square().sum()

    compiled = torch.compile(loss_fn, fullgraph=True, backend=backend)
    grads = []
    for fn in (compiled, loss_fn):
        inputs = [t.detach().clone().requires_grad_() for t in (sample.x, sample.values, sample.bias)]
        fn(*inputs).backward()
        grads.append([t.grad for t in inputs])
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


def test_loaded_script_model_trains_without_the_package(tmp_path):
    # Autograd is registered in C++: a TorchScript model loaded with only the
    # library (no Python import of condensed_ops) still has gradients.
    sample = make_sample(QUICK_SPECS[1])

    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.values = torch.nn.Parameter(sample.values.clone())
            self.register_buffer("idx", sample.idx.clone())

        def forward(self, x):
            return condensed_ops.condensed_linear(x, self.values, self.idx)

    layer = Layer()
    layer(sample.x).sum().backward()
    torch.jit.save(torch.jit.script(Layer()), str(tmp_path / "m.pt"))
    torch.save({"x": sample.x, "grad": layer.values.grad}, tmp_path / "io.pt")
    code = (
        "import sys, torch\n"
        f"torch.ops.load_library({condensed_ops._C.__file__!r})\n"
        f"m = torch.jit.load({str(tmp_path / 'm.pt')!r})\n"
        f"io = torch.load({str(tmp_path / 'io.pt')!r})\n"
        "m(io['x']).sum().backward()\n"
        "assert 'condensed_ops' not in sys.modules\n"
        "torch.testing.assert_close(m.values.grad, io['grad'])\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]


def test_grad_x_follows_in_place_changes_of_idx_and_values():
    # W's column layout is cached per version of idx; each step must see the
    # idx and values of that step (an SRigL update rewrites idx in place).
    g = torch.Generator().manual_seed(3)
    idx = torch.randint(0, 30, (12, 5), generator=g).to(torch.int16)
    values = torch.randn(12, 5, generator=g, dtype=torch.float64)
    for step in range(4):
        x = torch.randn(6, 30, generator=g, dtype=torch.float64)
        grad_y = torch.randn(6, 12, generator=g, dtype=torch.float64)
        check_gradients(Sample(f"step{step}", x, values, idx, None), torch.float64)
        x_leaf = x.clone().requires_grad_()
        condensed_ops.condensed_linear(x_leaf, values, idx).backward(grad_y)
        expected, _, _ = reference_gradients(x, values, idx, None, grad_y)
        torch.testing.assert_close(x_leaf.grad, expected)
        with torch.no_grad():
            if step % 2:
                idx[step, :] = torch.randint(0, 30, (5,), generator=g).to(torch.int16)
            else:
                values.mul_(-1.5)
