"""condensed_ops where PyTorch users put it: autocast, distributed data parallel,
transformer layers, export."""

import pathlib
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import condensed_ops
from condensed_ops.masks import constant_fan_in_mask
from conftest import make_sample, QUICK_SPECS, reference_condensed_linear


def _mlp(hidden=96, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(32, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 5))
    condensed_ops.condense(model, masks={"2": constant_fan_in_mask(hidden, hidden, 12)}, min_weights=0)
    assert isinstance(model[2], condensed_ops.CondensedLinear)
    return model


# ---- autocast -----------------------------------------------------------------------------


def test_autocast_runs_the_op_in_the_autocast_dtype():
    x, values, idx, bias = make_sample(QUICK_SPECS[1]).args
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = condensed_ops.condensed_linear(x, values, idx, bias)
        mixed = condensed_ops.condensed_linear(x.bfloat16(), values, idx, bias)  # a bf16 activation, fp32 weights
    expected = condensed_ops.condensed_linear(x.bfloat16(), values.bfloat16(), idx, bias.bfloat16())
    assert y.dtype == mixed.dtype == torch.bfloat16
    assert torch.equal(y, expected) and torch.equal(mixed, expected)


def test_autocast_leaves_float64_alone():
    x, values, idx, bias = make_sample(QUICK_SPECS[1], torch.float64).args
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = condensed_ops.condensed_linear(x, values, idx, bias)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, reference_condensed_linear(x, values, idx, bias))


def test_autocast_gradients_reach_the_float32_weights():
    x, values, idx, bias = make_sample(QUICK_SPECS[1]).args
    values = values.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = condensed_ops.condensed_linear(x, values, idx, bias)
    y.float().sum().backward()
    assert values.grad is not None and values.grad.dtype == torch.float32
    reference = values.detach().clone().requires_grad_()
    condensed_ops.condensed_linear(x.bfloat16(), reference.bfloat16(), idx, bias.bfloat16()).float().sum().backward()
    torch.testing.assert_close(values.grad, reference.grad)


def test_a_model_trains_under_autocast():
    model = _mlp()
    g = torch.Generator().manual_seed(1)
    x, target = torch.randn(64, 32, generator=g), torch.randint(0, 5, (64,), generator=g)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(x)
            assert logits.dtype == torch.bfloat16
            loss = F.cross_entropy(logits.float(), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert model[2].values.dtype == torch.float32
    assert losses[-1] < 0.5 * losses[0]
    # Inference on one row under autocast: the row layout (the window layout holds float32 weights).
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        one = model(x[:1])
    assert one.dtype == torch.bfloat16


def test_compiled_model_under_autocast(fresh_dynamo):
    model = _mlp()
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(3, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected, actual = model(x), compiled(x)
    assert actual.dtype == torch.bfloat16
    torch.testing.assert_close(actual, expected, rtol=2e-2, atol=2e-2)


# ---- distributed data parallel --------------------------------------------------------------


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")
def test_two_gloo_processes_keep_identical_condensed_and_srigl_models(tmp_path):
    worker = pathlib.Path(__file__).with_name("ddp_worker.py")
    result = subprocess.run([sys.executable, str(worker), str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "DDP OK" in result.stdout, result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for part in ("condensed", "dense", "masks", "fsdp"):
        first, second = ranks[0][part], ranks[1][part]
        assert first.keys() == second.keys()
        for key in first:
            assert torch.equal(first[key], second[key]), f"{part}.{key} differs between ranks"
    assert ranks[0]["condensed"]["0.idx"].dtype == torch.int16  # the default index dtype, broadcast as bytes
    assert ranks[0]["masks"]["0"].float().mean() < 0.5  # SRigL's masks, not all-ones
    assert "condense the model first, then wrap it" in ranks[0]["refused"]
    losses = ranks[0]["fsdp_losses"]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]


# ---- ONNX export --------------------------------------------------------------------------------


def _export_and_run(model, x, dynamo):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    import io

    buffer = io.BytesIO()
    torch.onnx.export(model, (x,), buffer, dynamo=dynamo)
    graph = onnx.load_from_string(buffer.getvalue()).graph
    session = ort.InferenceSession(buffer.getvalue())
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    return torch.from_numpy(out), {node.domain for node in graph.node}, {node.op_type for node in graph.node}


def _exportable_models():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8))
    mask = constant_fan_in_mask(64, 32, 4)
    mask[3] = False  # an ablated neuron
    condensed_ops.condense(mlp, masks={"0": mask}, min_weights=0)
    conv = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))
    condensed_ops.condense(conv, masks={"0": constant_fan_in_mask(8, 27, 5).view(8, 3, 3, 3)}, min_weights=0)
    return {"mlp": (mlp.eval(), torch.randn(3, 32)), "mlp_one_row": (mlp.eval(), torch.randn(1, 32)), "conv": (conv.eval(), torch.randn(2, 3, 6, 6))}


@pytest.mark.parametrize("form", ["gather", "dense"])
@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
@pytest.mark.parametrize("name", ["mlp", "mlp_one_row", "conv"])
def test_onnx_export_runs_in_onnxruntime(name, dynamo, form):
    model, x = _exportable_models()[name]
    with condensed_ops.onnx_export_as(form):
        out, domains, ops = _export_and_run(model, x, dynamo)
    assert domains <= {""}, f"non-standard ONNX domains {domains}"  # standard operators only
    if form == "gather":
        assert {"Gather", "Mul", "ReduceSum"} <= ops, ops
    with torch.no_grad():
        torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-5)


def test_onnx_export_form_is_checked_and_restored():
    with pytest.raises(ValueError, match="form must be one of"):
        condensed_ops.onnx_export_as("sparse")
    with condensed_ops.onnx_export_as("dense"):
        assert condensed_ops.ops._onnx_form == "dense"
    assert condensed_ops.ops._onnx_form == "gather"
