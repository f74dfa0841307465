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
    for part in ("condensed", "dense", "masks", "fsdp", "sparse_to_sparse"):
        first, second = ranks[0][part], ranks[1][part]
        assert first.keys() == second.keys()
        for key in first:
            assert torch.equal(first[key], second[key]), f"{part}.{key} differs between ranks"
    assert ranks[0]["condensed"]["0.idx"].dtype == torch.int16  # the default index dtype, broadcast as bytes
    assert ranks[0]["masks"]["0"].float().mean() < 0.5  # SRigL's masks, not all-ones
    assert "condense the model first, then wrap it" in ranks[0]["refused"]
    assert ranks[0]["resized"] > 0  # ablation resized values: DDP was rebuilt and the ranks still agree
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


# ---- transformers ---------------------------------------------------------------------------


def _sparsify_everything(model, fan_in_share=0.15, seed=0):
    """Constant fan-in masks on every sparsifiable weight (attention projections
    included), applied to the weights; returns the masks by name."""
    g = torch.Generator().manual_seed(seed)
    masks = {}
    with torch.no_grad():
        for name, weight in condensed_ops.masks.sparsifiable_weights(model).items():
            rows = weight.flatten(1)
            mask = constant_fan_in_mask(rows.shape[0], rows.shape[1], max(1, round(fan_in_share * rows.shape[1])), generator=g)
            weight.mul_(mask.view(weight.shape))
            masks[name] = mask.view(weight.shape)
    return masks


def _condensed_pair(model, **condense_options):
    masks = _sparsify_everything(model)
    dense = __import__("copy").deepcopy(model)
    report = condensed_ops.condense(model, masks=masks, min_weights=0, **condense_options)
    return model, dense, report


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
def test_transformer_encoder_converts_fully_and_matches_the_masked_dense_model(batch_first, fresh_dynamo):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=batch_first)
    model, dense, report = _condensed_pair(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False))
    converted = {layer.name for layer in report.converted}
    for i in range(2):
        for part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "linear1", "linear2"):
            assert f"layers.{i}.{part}" in converted
        assert isinstance(model.layers[i].self_attn, condensed_ops.CondensedMultiheadAttention)
    x = torch.randn(3, 7, 32) if batch_first else torch.randn(7, 3, 32)
    padding = torch.zeros(3, 7, dtype=torch.bool)
    padding[:, -2:] = True
    causal = nn.Transformer.generate_square_subsequent_mask(7)
    for mode in ("train", "eval"):
        model.train(mode == "train")
        dense.train(mode == "train")
        with torch.no_grad():
            for kwargs in ({}, {"src_key_padding_mask": padding}, {"mask": causal, "is_causal": True}):
                torch.testing.assert_close(model(x, **kwargs), dense(x, **kwargs), rtol=1e-5, atol=1e-5)
    model.eval()
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, src_key_padding_mask=padding), dense(x, src_key_padding_mask=padding), rtol=1e-5, atol=1e-5)
    model.train()
    dense.train()
    out = torch.compile(model, fullgraph=True)(x)
    torch.testing.assert_close(out, dense(x), rtol=1e-5, atol=1e-5)
    out.square().sum().backward()
    assert model.layers[0].self_attn.v_proj.values.grad is not None


def test_transformer_encoder_with_the_nested_tensor_fast_path_runs_condensed():
    # Built with the dense fast path on: condense turns it off (it reads dense weights).
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
    model, dense, _ = _condensed_pair(nn.TransformerEncoder(layer, 2, enable_nested_tensor=True))
    model.eval()
    dense.eval()
    x = torch.randn(3, 7, 32)
    padding = torch.zeros(3, 7, dtype=torch.bool)
    padding[:, -2:] = True
    with torch.no_grad():
        out, reference = model(x, src_key_padding_mask=padding), dense(x, src_key_padding_mask=padding)
    # The dense fast path leaves padded positions undefined: compare the others.
    torch.testing.assert_close(out[:, :-2], reference[:, :-2], rtol=1e-5, atol=1e-5)


def test_transformer_decoder_layer_with_cross_attention():
    torch.manual_seed(0)
    model, dense, report = _condensed_pair(nn.TransformerDecoderLayer(32, 4, 64, dropout=0.0, batch_first=True))
    assert isinstance(model.self_attn, condensed_ops.CondensedMultiheadAttention)
    assert isinstance(model.multihead_attn, condensed_ops.CondensedMultiheadAttention)
    target, memory = torch.randn(2, 5, 32), torch.randn(2, 9, 32)
    causal = nn.Transformer.generate_square_subsequent_mask(5)
    for training in (True, False):
        model.train(training)
        dense.train(training)
        torch.testing.assert_close(model(target, memory, tgt_mask=causal), dense(target, memory, tgt_mask=causal), rtol=1e-5, atol=1e-5)
    out = model(target, memory, tgt_mask=causal)
    out.square().sum().backward()
    assert model.self_attn.q_proj.values.grad is not None and model.linear1.values.grad is not None


_ATTENTION_CALLS = {
    "plain": lambda q, k, v, s, b: dict(),
    "weights_per_head": lambda q, k, v, s, b: dict(need_weights=True, average_attn_weights=False),
    "no_weights": lambda q, k, v, s, b: dict(need_weights=False),
    "bool_attn_mask": lambda q, k, v, s, b: dict(attn_mask=torch.rand(q.shape[-2], s) < 0.3),
    "float_attn_mask_3d": lambda q, k, v, s, b: dict(attn_mask=torch.randn(b * 4, q.shape[-2], s), need_weights=False),
    "key_padding": lambda q, k, v, s, b: dict(key_padding_mask=torch.arange(s).expand(b, s) >= s - 2),
    "float_key_padding": lambda q, k, v, s, b: dict(key_padding_mask=torch.zeros(b, s).index_fill_(1, torch.tensor([0]), float("-inf"))),
}


@pytest.mark.parametrize("call", sorted(_ATTENTION_CALLS))
@pytest.mark.parametrize("kdim", [None, 24], ids=["packed", "kdim24"])
def test_multihead_attention_matches_the_dense_module(call, kdim):
    torch.manual_seed(0)
    attention = nn.MultiheadAttention(32, 4, batch_first=True, kdim=kdim, vdim=kdim)
    model, dense, _ = _condensed_pair(nn.Sequential(attention))
    condensed = model[0]
    assert isinstance(condensed, condensed_ops.CondensedMultiheadAttention)
    width = kdim or 32
    q, k, v = torch.randn(2, 5, 32), torch.randn(2, 6, width), torch.randn(2, 6, width)
    kwargs = _ATTENTION_CALLS[call](q, k, v, 6, 2)
    out, weights = condensed(q, k, v, **kwargs)
    expected_out, expected_weights = dense[0](q, k, v, **kwargs)
    torch.testing.assert_close(out, expected_out, rtol=1e-5, atol=1e-5)
    assert (weights is None) == (expected_weights is None)
    if weights is not None:
        torch.testing.assert_close(weights, expected_weights, rtol=1e-5, atol=1e-5)
    unbatched, expected_unbatched = condensed(q[0], k[0], v[0])[0], dense[0](q[0], k[0], v[0])[0]
    torch.testing.assert_close(unbatched, expected_unbatched, rtol=1e-5, atol=1e-5)


def test_multihead_attention_scripts():
    torch.manual_seed(0)
    model, _, _ = _condensed_pair(nn.Sequential(nn.MultiheadAttention(32, 4)))
    scripted = torch.jit.script(model[0])
    q = torch.randn(5, 2, 32)
    torch.testing.assert_close(scripted(q, q, q)[0], model[0](q, q, q)[0])


def test_attention_condense_reports_unsupported_and_kept_dense_projections():
    torch.manual_seed(0)
    unsupported = nn.Sequential(nn.MultiheadAttention(32, 4, add_bias_kv=True))
    report = condensed_ops.condense(unsupported, min_weights=0)
    assert not report.converted and "add_bias_kv=True" in report.skipped[0].reason
    model = nn.Sequential(nn.MultiheadAttention(32, 4))
    masks = {"0.in_proj_weight": constant_fan_in_mask(96, 32, 4)}  # out_proj stays dense (no mask, no zeros)
    with torch.no_grad():
        model[0].in_proj_weight.mul_(masks["0.in_proj_weight"])
    report = condensed_ops.condense(model, masks=masks, min_weights=0)
    assert {layer.name for layer in report.converted} == {"0.q_proj", "0.k_proj", "0.v_proj"}
    assert any(layer.name == "0.out_proj" and "too dense" in layer.reason for layer in report.skipped)
    assert isinstance(model[0].out_proj, nn.Linear)


def test_srigl_covers_attention_projections_and_condenses_to_the_same_model():
    torch.manual_seed(0)
    model = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    updater = condensed_ops.srigl.SRigL(model, sparsity=0.85, t_end=20, delta_t=5, optimizer=optimizer, generator=torch.Generator().manual_seed(0))
    assert "self_attn.in_proj_weight" in updater.layers and "self_attn.out_proj" in updater.layers
    g = torch.Generator().manual_seed(1)
    for _ in range(12):
        x = torch.randn(4, 6, 32, generator=g)
        loss = model(x).square().mean()
        optimizer.zero_grad()
        loss.backward()
        updater.step()
        optimizer.step()
    in_proj = updater.layers["self_attn.in_proj_weight"]
    assert float(in_proj.mask.float().mean()) < 0.5 and bool((model.self_attn.in_proj_weight[~in_proj.mask] == 0).all())
    masks = {name: layer.mask for name, layer in updater.layers.items()}
    updater.remove_optimizer_hook()
    dense = __import__("copy").deepcopy(model).eval()
    report = condensed_ops.condense(model, masks=masks, min_weights=0)
    assert any(layer.name == "self_attn.q_proj" for layer in report.converted)
    model.eval()
    x = torch.randn(2, 6, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), dense(x), rtol=1e-5, atol=1e-5)


def test_load_condensed_rebuilds_condensed_attention(tmp_path):
    torch.manual_seed(0)

    def make():
        return nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True), 2, enable_nested_tensor=False)

    model, _, _ = _condensed_pair(make())
    torch.save(model.state_dict(), tmp_path / "encoder.pt")
    loaded = condensed_ops.load_condensed(make(), torch.load(tmp_path / "encoder.pt"))
    assert isinstance(loaded.layers[1].self_attn, condensed_ops.CondensedMultiheadAttention)
    model.eval()
    loaded.eval()
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
