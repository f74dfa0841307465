"""The models users bring (transformers, timm, torchvision; small configs, nothing
downloaded): condense -> outputs against a float64 dense reference -> compile in as
many graphs as the dense model -> save (safetensors, save_pretrained) and load.

A family whose library does not import is skipped with the reason (the test extras
install transformers and safetensors; timm and torchvision need a torchvision built
for the installed torch).
"""

import copy
import json
import os

import pytest
import torch
from torch import nn

from condensed_ops import CondensedLinear, condense, load_condensed
from condensed_ops.bench import models
from condensed_ops.srigl import SRigL

FAMILIES = list(models.FAMILIES)


def _require(family: str) -> None:
    reason = models.unavailable_reason(family)
    if reason is not None:
        pytest.skip(reason)


def _first(output) -> torch.Tensor:
    return models._first_output(output)


def _double(inputs: dict) -> dict:
    return {k: v.double() if v.is_floating_point() else v for k, v in inputs.items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_condensed_model_matches_the_float64_dense_model(family):
    _require(family)
    model, masks, inputs = models.build(family, "tiny")
    reference = copy.deepcopy(model).double()
    dense_weights = {name: model.get_submodule(name).weight for name in masks}
    report = condense(model, masks=masks, min_weights=0)
    assert sorted(layer.name for layer in report.converted) == sorted(masks), str(report)
    for skipped in report.skipped:  # every module with a weight of its own is accounted for
        assert skipped.reason
    for name, weight in dense_weights.items():
        view = model.get_submodule(name).weight  # model code reads .weight.dtype / .shape
        assert (view.shape, view.dtype, view.device) == (weight.shape, weight.dtype, weight.device), name
        torch.testing.assert_close(view.dense(), weight.detach())
    for batch in (1, 3):  # the window layout (few rows) and the row layout
        x = inputs(batch)
        with torch.no_grad():
            expected = _first(reference(**_double(x)))
            actual = _first(model(**x))
        scale = float(expected.abs().max())
        torch.testing.assert_close(actual.double(), expected, rtol=1e-4, atol=1e-4 * max(scale, 1.0))


@pytest.mark.parametrize("family", ["bert", "vit", "resnet50", "gpt2"])
def test_compiled_condensed_model_has_the_dense_models_graphs(family):
    _require(family)
    model, masks, inputs = models.build(family, "tiny")
    batches = (1, 4, 32) if family != "gpt2" else (4,)
    dense_graphs = {}
    for batch in batches:
        torch._dynamo.reset()
        with torch.no_grad():
            dense_graphs[batch] = torch._dynamo.explain(model)(**inputs(batch)).graph_count
    condense(model, masks=masks, min_weights=0)
    for batch in batches:
        torch._dynamo.reset()
        with torch.no_grad():
            explained = torch._dynamo.explain(model)(**inputs(batch))
        reasons = [str(reason.reason).splitlines()[0] for reason in explained.break_reasons]
        assert explained.graph_count == dense_graphs[batch], (batch, reasons)
    torch._dynamo.reset()


@pytest.mark.parametrize("family", ["bert", "gpt2", "vit"])
def test_safetensors_and_save_pretrained_round_trip(family, tmp_path):
    _require(family)
    safetensors_torch = pytest.importorskip("safetensors.torch")
    model, masks, inputs = models.build(family, "tiny")
    report = condense(model, masks=masks, min_weights=0)
    # 90% kept at 6 bytes per entry (float32 + int16) plus the bias: about 15% of dense.
    assert report.condensed_bytes() < 0.2 * report.dense_bytes()
    x = inputs(2)
    with torch.no_grad():
        expected = _first(model(**x))

    safetensors_torch.save_model(model, str(tmp_path / "model.safetensors"))  # handles tied weights
    fresh = models.FAMILIES[family].build("tiny").eval()
    load_condensed(fresh, safetensors_torch.load_file(str(tmp_path / "model.safetensors")))
    with torch.no_grad():
        torch.testing.assert_close(_first(fresh(**x)), expected, rtol=0, atol=0)

    model.save_pretrained(str(tmp_path / "pretrained"))
    saved = os.path.getsize(tmp_path / "pretrained" / "model.safetensors")
    dense_bytes = sum(p.numel() * p.element_size() for p in models.FAMILIES[family].build("tiny").state_dict().values())
    assert saved < dense_bytes - 0.7 * report.dense_bytes()  # the condensed layers are stored condensed
    transformers = pytest.importorskip("transformers")
    config = transformers.AutoConfig.from_pretrained(str(tmp_path / "pretrained"))
    restored = type(model)(config).eval()  # the architecture from the config, then the condensed weights
    load_condensed(restored, safetensors_torch.load_file(str(tmp_path / "pretrained" / "model.safetensors")))
    with torch.no_grad():
        torch.testing.assert_close(_first(restored(**x)), expected, rtol=0, atol=0)


def test_load_condensed_still_names_keys_that_are_really_missing(tmp_path):
    _require("gpt2")
    model, masks, _ = models.build("gpt2", "tiny")
    condense(model, masks=masks, min_weights=0)
    state = dict(model.state_dict())
    del state["transformer.ln_f.weight"]  # not tied to anything
    with pytest.raises(RuntimeError, match="transformer.ln_f.weight"):
        load_condensed(models.FAMILIES["gpt2"].build("tiny"), state)


def test_gpt2_conv1d_layers_condense_as_the_linear_they_are():
    _require("gpt2")
    model, masks, inputs = models.build("gpt2", "tiny")
    conv1d = [name for name, m in model.named_modules() if type(m).__name__ == "Conv1D"]
    assert conv1d and set(conv1d) <= set(masks)
    for name in conv1d:  # masks are in the weight's shape [in, out], constant fan-in per output
        weight, mask = model.get_submodule(name).weight, masks[name]
        assert mask.shape == weight.shape and len(set(mask.sum(0).tolist())) == 1
    report = condense(model, masks=masks, min_weights=0)
    kinds = {layer.name: layer.kind for layer in report.converted}
    assert all(kinds[name] == "Conv1D" for name in conv1d)
    layer = model.get_submodule(conv1d[0])
    assert isinstance(layer, CondensedLinear) and layer.transposed_weight
    assert layer.weight.shape == masks[conv1d[0]].shape  # [in, out], as the Conv1D's
    skipped = {s.name: s for s in report.skipped}
    assert "lookup table" in skipped["transformer.wte"].reason


def test_masked_srigl_on_conv1d_decides_as_on_the_equal_linear():
    """GPT-2 with its Conv1D layers, and a twin where each is the nn.Linear holding the
    transposed weight: the same SRigL decisions on the same batches."""
    _require("gpt2")
    model, _, _ = models.build("gpt2", "tiny", sparsity=0.0)
    model.train()
    twin = copy.deepcopy(model)
    conv1d = [name for name, m in twin.named_modules() if type(m).__name__ == "Conv1D"]
    for name in conv1d:
        layer = twin.get_submodule(name)
        linear = nn.Linear(layer.nx, layer.nf)
        with torch.no_grad():
            linear.weight.copy_(layer.weight.t())
            linear.bias.copy_(layer.bias)
        parent, _, attribute = name.rpartition(".")
        setattr(twin.get_submodule(parent), attribute, linear)
    exclude = ["lm_head"]  # tied to the token embedding
    runs = []
    for network in (model, twin):
        optimizer = torch.optim.AdamW(network.parameters(), lr=1e-3)
        updater = SRigL(network, 0.9, optimizer=optimizer, delta_t=4, t_end=32, exclude=exclude, generator=torch.Generator().manual_seed(1))
        runs.append((network, optimizer, updater))
    data = torch.Generator().manual_seed(2)
    for step in range(32):
        ids = torch.randint(0, 1000, (4, 16), generator=data)
        for network, optimizer, updater in runs:
            optimizer.zero_grad()
            network(input_ids=ids, labels=ids).loss.backward()
            updater.step()
            optimizer.step()
        for name in conv1d:
            ours, theirs = runs[0][2].layers[name], runs[1][2].layers[name]
            assert torch.equal(ours.mask.t(), theirs.mask), (step, name)
            assert torch.equal(ours.ablated_neurons, theirs.ablated_neurons) and ours.fan_in == theirs.fan_in
    assert any(runs[0][2].layers[name].active_neurons < runs[0][2].layers[name].out_features for name in conv1d)
    for name in conv1d:
        torch.testing.assert_close(model.get_submodule(name).weight.t(), twin.get_submodule(name).weight, rtol=1e-4, atol=1e-5)


def test_cli_times_whole_models(tmp_path):
    _require("bert")
    from condensed_ops.bench.__main__ import main

    out_json = tmp_path / "models.json"
    main(["--no-sweep", "--model", "bert", "timm_vit", "--model-size", "tiny", "--model-batch", "1", "3", "--threads", "1",
          "--rounds", "2", "--json", str(out_json), "--no-progress"])
    rows = json.loads(out_json.read_text())["models"]
    timed = [row for row in rows if "skipped" not in row]
    assert [row["batch"] for row in timed] == [1, 3] and all(row["family"] == "bert" for row in timed)
    assert all(row["speedup"] > 0 and row["max_abs_diff_over_scale"] < 1e-4 for row in timed)
    assert all(row["condensed_layer_bytes"] < 0.2 * row["dense_layer_bytes"] for row in timed)
    assert len(rows) == 3 or models.unavailable_reason("timm_vit") is None
    assert "Whole models" in models.format_markdown(rows)
